// Device helpers shared by the kernels of kernels/cuda: eight fp16 values held in one 16-byte
// register (a uint4, as one 16-byte load gives them) to fp32.
#pragma once

#include <cuda_fp16.h>

namespace nibble::kernels::cuda {

// The 8 halves of u (in memory order) to f[0..7].
__device__ __forceinline__ void Half8ToFloat(const uint4& u, float* f) {
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 t = __half22float2(h[j]);
    f[2 * j] = t.x;
    f[2 * j + 1] = t.y;
  }
}

}  // namespace nibble::kernels::cuda
