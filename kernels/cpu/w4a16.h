// y[m, n] = x[m, k] · Wᵀ (+ bias) with W int4 in groups along k (W4A16 on the CPU):
// W[n, k] = (q[n, k] - zero[n, k / group]) * scale[n, k / group].
//
// Layout (what the engine repacks AWQ checkpoints into at load): `q` row-major [n, ceil(k/2)]
// bytes, element k in the low nibble of byte k/2 when k is even, the high nibble when odd;
// `zeros` and `scales` fp32 [n, ceil(k / group)]. Each weight row is dequantized once into
// fp32 and reused for every row of x, so results equal the fp32 product of the dequantized
// weight bit for bit (the dequantized value (q - z) * s is exact in fp32).
#pragma once

#include <cstdint>

namespace nibble::kernels::cpu {

void MatMulW4A16(const float* x, const uint8_t* q, const float* zeros, const float* scales,
                 const float* bias, int64_t m, int64_t n, int64_t k, int64_t group, float* y);

}  // namespace nibble::kernels::cpu
