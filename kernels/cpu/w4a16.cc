#include "kernels/cpu/w4a16.h"

#include <algorithm>
#include <cstddef>
#include <vector>

#include "kernels/cpu/half.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/simd.h"

namespace nibble::kernels::cpu {
namespace {

// Expands `count` nibbles starting at element `first` of a packed row, through the group's
// table of the 16 possible values.
void ExpandGroup(const uint8_t* packed, int64_t first, int64_t count, const float* table,
                 float* out) {
  int64_t i = 0;
  if (first & 1) out[i++] = table[packed[first / 2] >> 4];  // odd group sizes only
  const uint8_t* bytes = packed + (first + i) / 2;
  for (; i + 2 <= count; i += 2) {
    const uint8_t b = *bytes++;
    out[i] = table[b & 15];
    out[i + 1] = table[b >> 4];
  }
  if (i < count) out[i] = table[*bytes & 15];
}

}  // namespace

void DequantizeW4Row(const uint8_t* q, const uint8_t* zeros, const uint16_t* scales, int64_t col,
                     int64_t k, int64_t group, float* out) {
  const int64_t row_bytes = (k + 1) / 2;
  const int64_t groups = (k + group - 1) / group;
  const uint8_t* packed = q + col * row_bytes;
  float table[16];
  for (int64_t g = 0; g < groups; ++g) {
    const float zero = static_cast<float>(zeros[col * groups + g]);
    const float scale = HalfToFloat(scales[col * groups + g]);
    for (int v = 0; v < 16; ++v) table[v] = (static_cast<float>(v) - zero) * scale;
    const int64_t first = g * group;
    ExpandGroup(packed, first, std::min(group, k - first), table, out + first);
  }
}

NIBBLE_SIMD_CLONES
void MatMulW4A16(const float* x, const uint8_t* q, const uint8_t* zeros, const uint16_t* scales,
                 const float* bias, int64_t m, int64_t n, int64_t k, int64_t group, float* y) {
#pragma omp parallel if (m * n * k >= (1 << 17))  // the threshold of matmul.cc
  {
    std::vector<float> w_row(static_cast<std::size_t>(k));
#pragma omp for schedule(static)
    for (int64_t col = 0; col < n; ++col) {
      DequantizeW4Row(q, zeros, scales, col, k, group, w_row.data());
      const float b = bias ? bias[col] : 0.0f;
      for (int64_t row = 0; row < m; ++row) {
        y[row * n + col] = Dot(x + row * k, w_row.data(), k) + b;
      }
    }
  }
}

}  // namespace nibble::kernels::cpu
