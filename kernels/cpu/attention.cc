#include "kernels/cpu/attention.h"

#include <cmath>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"

namespace nibble::kernels::cpu {

void CausalAttention(const float* q, int64_t tokens, int64_t start, const float* keys,
                     const float* values, const AttentionShape& shape, float* out) {
  const int64_t d = shape.head_dim;
  const int64_t group = shape.heads / shape.kv_heads;
  const int64_t kv_stride = shape.kv_heads * d;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const int64_t pairs = tokens * shape.heads;
  const bool parallel = pairs * (start + tokens) * d >= (1 << 17);  // as in matmul.cc
#pragma omp parallel if (parallel)
  {
    std::vector<float> scores(static_cast<size_t>(start + tokens));
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t t = pair / shape.heads;
      const int64_t h = pair % shape.heads;
      const int64_t kv_head = h / group;
      const int64_t visible = start + t + 1;
      const float* query = q + (t * shape.heads + h) * d;
      for (int64_t p = 0; p < visible; ++p) {
        scores[p] = Dot(query, keys + p * kv_stride + kv_head * d, d) * scale;
      }
      Softmax(scores.data(), visible);
      float* o = out + (t * shape.heads + h) * d;
      for (int64_t i = 0; i < d; ++i) o[i] = 0;
      for (int64_t p = 0; p < visible; ++p) {
        const float weight = scores[p];
        const float* v = values + p * kv_stride + kv_head * d;
        for (int64_t i = 0; i < d; ++i) o[i] += weight * v[i];
      }
    }
  }
}

}  // namespace nibble::kernels::cpu
