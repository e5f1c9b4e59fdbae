// Programmatic dependent launch (sm_90): a kernel launched after this one with the
// programmatic-serialization attribute (today the W4A16 decode kernel, kDecode8Pdl) may start
// as soon as every block of this one has called AllowDependentLaunch, instead of when this one
// has finished: its launch and its first weight loads overlap this kernel's tail. It is safe to
// call first thing: the dependent still waits (griddepcontrol.wait) for this kernel to finish
// and its writes to be visible before it reads what this kernel wrote. A no-op before sm_90,
// and when the next kernel is launched normally.
#pragma once

namespace nibble::kernels::cuda {

__device__ __forceinline__ void AllowDependentLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace nibble::kernels::cuda
