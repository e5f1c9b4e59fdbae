#include "kernels/cpu/w4a16.h"

#include <cstddef>
#include <vector>

#include "kernels/cpu/matmul.h"

namespace nibble::kernels::cpu {

void MatMulW4A16(const float* x, const uint8_t* q, const float* zeros, const float* scales,
                 const float* bias, int64_t m, int64_t n, int64_t k, int64_t group, float* y) {
  const int64_t row_bytes = (k + 1) / 2;
  const int64_t groups = (k + group - 1) / group;
#pragma omp parallel if (m * n * k >= (1 << 17))  // the threshold of matmul.cc
  {
    std::vector<float> w_row(static_cast<std::size_t>(k));
#pragma omp for schedule(static)
    for (int64_t col = 0; col < n; ++col) {
      const uint8_t* packed = q + col * row_bytes;
      const float* z = zeros + col * groups;
      const float* s = scales + col * groups;
      for (int64_t i = 0; i < k; ++i) {
        const int nibble = (packed[i / 2] >> (4 * (i & 1))) & 15;
        w_row[i] = (static_cast<float>(nibble) - z[i / group]) * s[i / group];
      }
      const float b = bias ? bias[col] : 0.0f;
      for (int64_t row = 0; row < m; ++row) {
        y[row * n + col] = Dot(x + row * k, w_row.data(), k) + b;
      }
    }
  }
}

}  // namespace nibble::kernels::cpu
