// Loads of the W4A16 weights, which a product reads exactly once: past L1, and marked
// evict-first in L2 so that the activations, the scales and the next layer's data keep the cache.
// Shared by the W4A16 kernels and tests/gpu/read_probe.cu (which times these very loads alone).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nibble::kernels::cuda {

// An L2 policy that marks every line it touches evict-first.
__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// 16 bytes at p (read-only for the kernel's life), with an L2 policy (EvictFirstPolicy).
__device__ __forceinline__ uint4 LoadWeights(const uint4* p, uint64_t policy) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(policy));
  return v;
}

}  // namespace nibble::kernels::cuda
