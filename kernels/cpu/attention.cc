#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"

namespace nibble::kernels::cpu {

void PagedCausalAttention(const float* q, const AttentionSpan* spans, int64_t num_spans,
                          const AttentionShape& shape, float* out) {
  const int64_t d = shape.head_dim;
  const int64_t group = shape.heads / shape.kv_heads;
  const int64_t kv_stride = shape.kv_heads * d;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  // Row -> (span, token) map, so that one flat loop covers the whole batch.
  std::vector<int64_t> row_span, row_token;
  int64_t longest = 0, work = 0;
  for (int64_t s = 0; s < num_spans; ++s) {
    for (int64_t t = 0; t < spans[s].tokens; ++t) {
      row_span.push_back(s);
      row_token.push_back(t);
    }
    const int64_t visible = spans[s].start + spans[s].tokens;
    longest = std::max(longest, visible);
    work += spans[s].tokens * visible;
  }
  const int64_t pairs = static_cast<int64_t>(row_span.size()) * shape.heads;
  const bool parallel = work * shape.heads * d >= (1 << 17);  // as in matmul.cc
#pragma omp parallel if (parallel)
  {
    std::vector<float> scores(static_cast<size_t>(longest));
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const int64_t row = pair / shape.heads;
      const int64_t h = pair % shape.heads;
      const AttentionSpan& span = spans[row_span[row]];
      const int64_t kv_offset = (h / group) * d;
      const int64_t visible = span.start + row_token[row] + 1;
      const float* query = q + (row * shape.heads + h) * d;
      const PagedKv& kv = span.kv;
      // Block by block: positions p0 .. p0 + rows - 1 sit in block b, one row apart.
      for (int64_t p0 = 0, b = 0; p0 < visible; p0 += kv.block_seq_len, ++b) {
        const float* keys = kv.keys + kv.block_table[b] * kv.block_stride + kv_offset;
        const int64_t rows = std::min(kv.block_seq_len, visible - p0);
        for (int64_t r = 0; r < rows; ++r) {
          scores[p0 + r] = Dot(query, keys + r * kv_stride, d) * scale;
        }
      }
      Softmax(scores.data(), visible);
      float* o = out + (row * shape.heads + h) * d;
      for (int64_t i = 0; i < d; ++i) o[i] = 0;
      for (int64_t p0 = 0, b = 0; p0 < visible; p0 += kv.block_seq_len, ++b) {
        const float* values = kv.values + kv.block_table[b] * kv.block_stride + kv_offset;
        const int64_t rows = std::min(kv.block_seq_len, visible - p0);
        for (int64_t r = 0; r < rows; ++r) {
          const float weight = scores[p0 + r];
          const float* v = values + r * kv_stride;
          for (int64_t i = 0; i < d; ++i) o[i] += weight * v[i];
        }
      }
    }
  }
}

void CausalAttention(const float* q, int64_t tokens, int64_t start, const float* keys,
                     const float* values, const AttentionShape& shape, float* out) {
  const int32_t only_block = 0;
  AttentionSpan span;
  span.tokens = tokens;
  span.start = start;
  // The kernel only reads the cache; PagedKv is mutable because writers share it.
  span.kv.keys = const_cast<float*>(keys);
  span.kv.values = const_cast<float*>(values);
  span.kv.block_table = &only_block;
  span.kv.block_seq_len = start + tokens;
  PagedCausalAttention(q, &span, 1, shape, out);
}

}  // namespace nibble::kernels::cpu
