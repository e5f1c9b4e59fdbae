// y[m, n] = x[m, k] · Wᵀ (+ bias) with W int4 in groups along k (W4A16 on the CPU):
// W[n, k] = (q[n, k] - zero[n, k / group]) * scale[n, k / group].
//
// Layout (what the engine repacks AWQ checkpoints into at load): `q` row-major [n, ceil(k/2)]
// bytes, element k in the low nibble of byte k/2 when k is even, the high nibble when odd;
// `zeros` one byte (0..15) and `scales` IEEE fp16 bits, both [n, ceil(k / group)]: what the
// format stores, so resident memory is what the checkpoint says. Each weight row is
// dequantized once into fp32 (through a 16-entry table per group) and reused for every row of
// x, so results equal the fp32 product of the dequantized weight bit for bit (the value
// (q - z) * s is exact in fp32), and each output row is independent of the others.
#pragma once

#include <cstdint>

namespace nibble::kernels::cpu {

void MatMulW4A16(const float* x, const uint8_t* q, const uint8_t* zeros, const uint16_t* scales,
                 const float* bias, int64_t m, int64_t n, int64_t k, int64_t group, float* y);

// Row `col` of the dequantized weight, out[k] (the kernel's own dequantization).
void DequantizeW4Row(const uint8_t* q, const uint8_t* zeros, const uint16_t* scales, int64_t col,
                     int64_t k, int64_t group, float* out);

}  // namespace nibble::kernels::cpu
