// A product's output left as the split-k GEMM's fp32 partial sums (MatMulW4A16 with
// `unreduced`), for the element-wise kernel after the product to add up as it loads them
// (AddRmsNorm, SiluMul in ops.h) instead of a separate reduce kernel writing fp16 in between.
// Element (r, c) is fp16(sums[0 * split_stride + r * row_stride + c] + ... + sums[(splits - 1)
// * split_stride + ...] + bias[c]): fp32 additions in split order, then the bias, rounded once,
// which is what the reduce kernel (W4A16SplitReduceKernel) writes, bit for bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace nibble::kernels::cuda {

struct SplitSums {
  const float* sums = nullptr;  // device; 16-byte aligned for the vector paths
  int64_t row_stride = 0;       // floats from one row to the next
  int64_t split_stride = 0;     // floats from one split's sums to the next
  int32_t splits = 0;           // >= 1 to be read; MatMulW4A16 leaves 0 where it did not split
  const float* bias = nullptr;  // device [columns], or null
  // The sums of columns [column, ...): a part of a stacked product's output (e.g. up of
  // [gate | up]). The kernels cannot check that the part's columns end within the row: the
  // caller's column + width <= row_stride.
  SplitSums Columns(int64_t column) const {
    SplitSums part = *this;
    part.sums += column;
    if (part.bias != nullptr) part.bias += column;
    return part;
  }
};

#if defined(__CUDACC__)
// V consecutive elements of row r from column c, as floats holding the fp16-rounded values.
// V = 8 needs row_stride, split_stride and c multiples of 4 and sums 16-byte aligned.
template <int V>
__device__ __forceinline__ void LoadSplitSums(const SplitSums& s, int64_t r, int64_t c, float* f) {
  const float* p = s.sums + r * s.row_stride + c;
  if constexpr (V == 8) {
    float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
#pragma unroll 4
    for (int i = 1; i < s.splits; ++i) {
      const float4 u = *reinterpret_cast<const float4*>(p + i * s.split_stride);
      const float4 v = *reinterpret_cast<const float4*>(p + i * s.split_stride + 4);
      a.x += u.x;
      a.y += u.y;
      a.z += u.z;
      a.w += u.w;
      b.x += v.x;
      b.y += v.y;
      b.z += v.z;
      b.w += v.w;
    }
    f[0] = a.x;
    f[1] = a.y;
    f[2] = a.z;
    f[3] = a.w;
    f[4] = b.x;
    f[5] = b.y;
    f[6] = b.z;
    f[7] = b.w;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      f[j] = p[j];
      for (int i = 1; i < s.splits; ++i) f[j] += p[i * s.split_stride + j];
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (s.bias != nullptr) f[j] += s.bias[c + j];
    f[j] = __half2float(__float2half_rn(f[j]));
  }
}
#endif

}  // namespace nibble::kernels::cuda
