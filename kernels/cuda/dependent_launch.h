// Programmatic dependent launch (PDL, sm_90). A kernel launched with the programmatic-
// serialization attribute (LaunchKernel with dependent = true) may start as soon as every
// block of the kernel before it in the stream has called AllowDependentLaunch, instead of when
// that kernel has finished: its launch and block scheduling (and, in the W4A16 decode kernel,
// its first weight loads) overlap the previous kernel's tail. Before it touches memory that any
// earlier kernel reads or writes it calls WaitForPriorGrid (griddepcontrol.wait), which returns
// once the previous kernel has finished and its writes are visible (and so, transitively, every
// kernel before it). Both device calls are no-ops before sm_90 and when the kernel was launched
// plainly, so a kernel may be launched either way.
#pragma once

#include <cuda_runtime.h>

namespace nibble::kernels::cuda {

__device__ __forceinline__ void AllowDependentLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void WaitForPriorGrid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), with the programmatic-serialization attribute
// when `dependent` and `stream` is not null (a stream of the caller's own: the legacy default
// stream does not offer it), and in thread block clusters of `cluster` blocks (sm_90; a
// cluster of one block is a plain launch; more than 8 needs the kernel's
// cudaFuncAttributeNonPortableClusterSizeAllowed). The caller passes dependent only on sm_90
// and later, and only for kernels that call WaitForPriorGrid before their first dependent
// memory access.
template <typename... Params, typename... Args>
cudaError_t LaunchKernelInClusters(bool dependent, dim3 cluster, void (*kernel)(Params...),
                                   dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                   Args... args) {
  cudaLaunchAttribute attr[2];
  unsigned num_attrs = 0;
  if (dependent && stream != nullptr) {
    attr[num_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[num_attrs].val.programmaticStreamSerializationAllowed = 1;
    ++num_attrs;
  }
  if (cluster.x * cluster.y * cluster.z > 1) {
    attr[num_attrs].id = cudaLaunchAttributeClusterDimension;
    attr[num_attrs].val.clusterDim.x = cluster.x;
    attr[num_attrs].val.clusterDim.y = cluster.y;
    attr[num_attrs].val.clusterDim.z = cluster.z;
    ++num_attrs;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = num_attrs;
  const cudaError_t launched = cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
  // A failed launch is reported here; cleared, so that a later check of cudaGetLastError (after
  // a plain launch elsewhere) does not report it a second time.
  if (launched != cudaSuccess) (void)cudaGetLastError();
  return launched;
}

template <typename... Params, typename... Args>
cudaError_t LaunchKernel(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block,
                         size_t smem, cudaStream_t stream, Args... args) {
  return LaunchKernelInClusters(dependent, dim3(1, 1, 1), kernel, grid, block, smem, stream, args...);
}

}  // namespace nibble::kernels::cuda
