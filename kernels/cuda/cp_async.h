// Asynchronous copies global -> shared (cp.async, sm_80+), shared by the W4A16 and attention
// kernels. A thread's copies complete in the order of its commit groups; CpAsyncWait<N> returns
// once at most N of the thread's groups are still in flight, and the landed bytes are then
// visible to that thread (to others only after a barrier). The "memory" clobbers keep the
// compiler from moving shared-memory reads and writes across them.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nibble::kernels::cuda {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, past L1; zero-filled (nothing read) when !valid.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// As CpAsync16, with an L2 cache policy (EvictFirstPolicy in weight_load.h).
__device__ __forceinline__ void CpAsync16Hint(uint32_t dst, const void* src, bool valid,
                                              uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;" ::"r"(dst),
               "l"(src), "r"(valid ? 16 : 0), "l"(policy)
               : "memory");
}

// 4 bytes global -> shared, through L1 (neighbouring threads and chunks reread the same words).
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

}  // namespace nibble::kernels::cuda
