// Device helpers shared by the kernels that rotate by RoPE (ops.cu RopeKernel, attention.cu's
// decode kernel with the rotation folded in): the angle's cos / sin and the rotation of one
// pair, each with one fixed order of roundings, so that both kernels give the same bits.
#pragma once

#include <cuda_runtime.h>

namespace nibble::kernels::cuda {

// The rotation angle position * inv_freq, exact in double (a 31-bit integer times a 24-bit
// significand), reduced to [-pi, pi] in double, then sin and cos in fp32.
__device__ __forceinline__ void RopeCosSin(int position, float inv_freq, float* c, float* s) {
  const double a = static_cast<double>(position) * static_cast<double>(inv_freq);
  const double k = rint(a * 0.15915494309189535);  // 1 / (2 pi)
  double r = fma(-k, 6.283185307179586, a);        // 2 pi, high part
  r = fma(-k, 2.4492935982947064e-16, r);          // 2 pi, low part
  sincosf(static_cast<float>(r), s, c);
}

// rotate_half's pair (x at i, y at i + head_dim / 2): (x c - y s, y c + x s) in fp32. Explicit
// intrinsics: left to itself the compiler may contract either product into an fma, and not
// necessarily the same one in two kernels.
__device__ __forceinline__ float2 RotatePair(float x, float y, float c, float s) {
  return make_float2(__fmaf_rn(x, c, -__fmul_rn(y, s)), __fmaf_rn(y, c, __fmul_rn(x, s)));
}

}  // namespace nibble::kernels::cuda
