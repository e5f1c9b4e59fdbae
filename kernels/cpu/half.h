// IEEE binary16 and bfloat16 <-> float conversions, exact and portable (no F16C needed), so
// the CPU reference gives the same bits on x86-64 and on a Jetson's Arm cores.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nibble::kernels::cpu {

float HalfToFloat(uint16_t h);
// Round to nearest even; overflow gives +-inf, NaN stays NaN.
uint16_t FloatToHalf(float f);
float Bf16ToFloat(uint16_t b);
uint16_t FloatToBf16(float f);  // round to nearest even

// On the calling thread (a row of a product: called per column inside parallel loops).
void HalfToFloat(const uint16_t* in, size_t n, float* out);
void FloatToHalf(const float* in, size_t n, uint16_t* out);
void Bf16ToFloat(const uint16_t* in, size_t n, float* out);

// Whole tensors (a model's weights at load, the GPU's uploads, checkpoints): the same bits,
// on every core for a million values or more, unless called from inside a parallel region.
void HalfToFloatBulk(const uint16_t* in, size_t n, float* out);
void FloatToHalfBulk(const float* in, size_t n, uint16_t* out);
void Bf16ToFloatBulk(const uint16_t* in, size_t n, float* out);

}  // namespace nibble::kernels::cpu
