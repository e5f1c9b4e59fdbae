#include "kernels/cpu/half.h"

#include <omp.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/simd.h"

namespace nibble::kernels::cpu {
namespace {

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mantissa << 13));  // inf/NaN
  if (exponent != 0) return BitsToFloat(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return BitsToFloat(sign);  // +-0
  // Subnormal half: value = mantissa * 2^-24, exactly representable as a normal float.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

uint16_t FloatToHalf(float f) {
  const uint32_t bits = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits >= 0x7f800000u) {  // inf or NaN (keep NaN quiet and non-zero)
    return sign | 0x7c00u | (abs_bits > 0x7f800000u ? 0x200u : 0u);
  }
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow
  if (abs_bits < 0x38800000u) {
    // Result is subnormal (or zero): scale to units of 2^-24 and round to nearest even.
    const float magnitude = BitsToFloat(abs_bits);
    const float scaled = magnitude * 16777216.0f;  // exact: power of two
    uint32_t units = static_cast<uint32_t>(scaled);
    const float remainder = scaled - static_cast<float>(units);
    if (remainder > 0.5f || (remainder == 0.5f && (units & 1u))) ++units;
    return sign | static_cast<uint16_t>(units);
  }
  // Normal: rebias exponent, round the 13 dropped mantissa bits to nearest even.
  uint32_t half = ((abs_bits >> 13) - (112u << 10));
  const uint32_t dropped = abs_bits & 0x1fffu;
  if (dropped > 0x1000u || (dropped == 0x1000u && (half & 1u))) ++half;
  return sign | static_cast<uint16_t>(half);
}

float Bf16ToFloat(uint16_t b) { return BitsToFloat(static_cast<uint32_t>(b) << 16); }

uint16_t FloatToBf16(float f) {
  const uint32_t bits = FloatBits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// Branch-free, so the compiler vectorizes it (this converts every fp16 weight row of a
// product, per token): shift exponent and mantissa into place and rebias; inf/NaN get the
// float's all-ones exponent; a subnormal half is renormalized by one exact float subtraction.
// Bit-identical to the scalar HalfToFloat for all 65536 inputs (kernels test).
NIBBLE_SIMD_CLONES
void HalfToFloat(const uint16_t* in, size_t n, float* out) {
  constexpr uint32_t kExponentMask = 0x7c00u << 13;
  constexpr uint32_t kRebias = (127 - 15) << 23;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t h = in[i];
    const uint32_t shifted = (h & 0x7fffu) << 13;
    const uint32_t exponent = shifted & kExponentMask;
    uint32_t bits = shifted + kRebias;
    bits += exponent == kExponentMask ? (128u - 16u) << 23 : 0u;  // inf/NaN
    float magnitude = BitsToFloat(bits + (exponent == 0 ? 1u << 23 : 0u));
    // Subnormal or zero: the bits above are 2^-14 * (1 + m/1024); take 2^-14 away, exactly.
    magnitude -= exponent == 0 ? BitsToFloat(113u << 23) : 0.0f;
    out[i] = BitsToFloat(FloatBits(magnitude) | ((h & 0x8000u) << 16));
  }
}

void FloatToHalf(const float* in, size_t n, uint16_t* out) {
  for (size_t i = 0; i < n; ++i) out[i] = FloatToHalf(in[i]);
}

void Bf16ToFloat(const uint16_t* in, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = Bf16ToFloat(in[i]);
}

namespace {

// An element-wise conversion of n values in chunks over the cores (the same bits as one
// call). The pragma's own `if` clause would still enter the OpenMP runtime on every call, so
// small and nested calls are kept out of it here.
template <typename In, typename Out, typename Convert>
void ConvertBulk(const In* in, size_t n, Out* out, Convert convert) {
  constexpr size_t kChunk = size_t{1} << 16;
  if (n < (size_t{1} << 20) || omp_in_parallel()) {
    convert(in, n, out);
    return;
  }
  const size_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (size_t c = 0; c < chunks; ++c) {
    const size_t begin = c * kChunk;
    convert(in + begin, std::min(kChunk, n - begin), out + begin);
  }
}

}  // namespace

void HalfToFloatBulk(const uint16_t* in, size_t n, float* out) {
  ConvertBulk(in, n, out, [](const uint16_t* i, size_t m, float* o) { HalfToFloat(i, m, o); });
}

void FloatToHalfBulk(const float* in, size_t n, uint16_t* out) {
  ConvertBulk(in, n, out, [](const float* i, size_t m, uint16_t* o) { FloatToHalf(i, m, o); });
}

void Bf16ToFloatBulk(const uint16_t* in, size_t n, float* out) {
  ConvertBulk(in, n, out, [](const uint16_t* i, size_t m, float* o) { Bf16ToFloat(i, m, o); });
}

}  // namespace nibble::kernels::cpu
