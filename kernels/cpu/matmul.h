// Matrix products of the linear layers: y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n]).
// W is row-major [out_features, in_features] as nn.Linear stores it. fp32 accumulation.
// Parallel over output features with OpenMP when the product is large enough to pay for it;
// `threads` <= 0 means OpenMP's default. Results do not depend on the thread count: each
// output element is computed by one thread in a fixed order.
#pragma once

#include <cstdint>

namespace nibble::kernels::cpu {

void MatMulWeightsF32(const float* x, const float* w, const float* bias, int64_t m, int64_t n,
                      int64_t k, float* y);
// The same with W stored as IEEE fp16 bits (converted to fp32 on the fly, a row at a time).
void MatMulWeightsF16(const float* x, const uint16_t* w, const float* bias, int64_t m,
                      int64_t n, int64_t k, float* y);

// Dot product with eight independent partial sums (vectorizable without -ffast-math);
// the summation order is fixed, so results are reproducible on any SIMD width. Inline: it
// sits in the innermost loop of every product.
inline float Dot(const float* a, const float* b, int64_t k) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    for (int j = 0; j < 8; ++j) partial[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; i < k; ++i, ++j) partial[j] += a[i] * b[i];
  return ((partial[0] + partial[4]) + (partial[1] + partial[5])) +
         ((partial[2] + partial[6]) + (partial[3] + partial[7]));
}

}  // namespace nibble::kernels::cpu
