// The AWQ search's kernels (awq.h). A group of a row is one warp's: lane l holds features
// l, l + 32, l + 64, l + 96 of the group, so min, max and sums are warp shuffles. The
// quantization's arithmetic uses the _rn intrinsics so that nothing is contracted into an FMA:
// the CPU reference is compiled with -ffp-contract=off, and the two must quantize alike.
#include "kernels/cuda/awq.h"

#include <algorithm>
#include <cmath>

#include <cuda_fp16.h>

#include "kernels/cuda/check.h"

namespace nibble::kernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kPerLane = static_cast<int>(kMaxAwqGroup) / kWarp;  // features per lane

__device__ __forceinline__ float WarpMin(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// A butterfly: every lane ends with the same sum (each step adds the same two partials).
__device__ __forceinline__ double WarpSum(double v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// quant/rtn.h's scale and zero of a group whose values span [lo, hi].
struct RtnGroup {
  float scale;
  float zero;
};
__device__ __forceinline__ RtnGroup RtnParams(float lo, float hi) {
  const float range = fmaxf(__fsub_rn(hi, lo), 1e-5f);
  const float scale = __half2float(__float2half_rn(__fdiv_rn(range, 15.0f)));
  const float zero = fminf(fmaxf(rintf(__fdiv_rn(-lo, scale)), 0.0f), 15.0f);
  return {scale, zero};
}
// The value w quantizes to: (level - zero) * scale.
__device__ __forceinline__ float RtnValue(float w, RtnGroup g) {
  const float level = fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(w, g.scale)), g.zero), 0.0f), 15.0f);
  return __fmul_rn(__fsub_rn(level, g.zero), g.scale);
}

__global__ void AddColumnAbsSumsKernel(const __half* __restrict__ x, int64_t rows, int64_t cols,
                                       double* sums) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  constexpr int kUnroll = 16;  // independent loads in flight: few threads, long columns
  double total = 0;
  int64_t r = 0;
  for (; r + kUnroll <= rows; r += kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __half2float(x[(r + u) * cols + c]);
    float part = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) part += fabsf(v[u]);
    total += part;
  }
  for (; r < rows; ++r) total += fabsf(__half2float(x[r * cols + c]));
  sums[c] += total;
}

__global__ void AwqScaledQuantizationErrorKernel(const float* __restrict__ w, int64_t out,
                                                 int64_t in, int64_t group,
                                                 const float* __restrict__ s, float* d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t groups = (in + group - 1) / group;
  const int64_t task = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  if (task >= out * groups) return;  // whole warps leave together
  const int64_t n = task / groups;
  const int64_t begin = (task % groups) * group;
  const int64_t len = min(group, in - begin);
  const float* row = w + n * in + begin;
  float scaled[kPerLane], lo = INFINITY, hi = -INFINITY;
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int64_t k = lane + c * kWarp;
    scaled[c] = k < len ? __fmul_rn(row[k], s[begin + k]) : 0.0f;
    if (k < len) {
      lo = fminf(lo, scaled[c]);
      hi = fmaxf(hi, scaled[c]);
    }
  }
  const RtnGroup g = RtnParams(WarpMin(lo), WarpMax(hi));
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) {
    const int64_t k = lane + c * kWarp;
    if (k < len) {
      const float q = __fdiv_rn(RtnValue(scaled[c], g), s[begin + k]);
      d[n * in + begin + k] = __fsub_rn(row[k], q);
    }
  }
}

constexpr int kSumBlocks = 528;
constexpr int kSumThreads = 256;

template <int kThreads>
__device__ double BlockSum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

__global__ void SumOfProductsKernel(const float* __restrict__ a, const float* __restrict__ b,
                                    int64_t n, double* partials) {
  __shared__ double shared[kSumThreads];
  double total = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kSumThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(kSumBlocks) * kSumThreads) {
    total += static_cast<double>(a[i]) * b[i];
  }
  const double sum = BlockSum<kSumThreads>(total, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

constexpr int kFinalThreads = 1024;

__global__ void SumPartialsKernel(const double* __restrict__ partials, double* result) {
  __shared__ double shared[kFinalThreads];
  const double v = threadIdx.x < kSumBlocks ? partials[threadIdx.x] : 0.0;
  const double sum = BlockSum<kFinalThreads>(v, shared);
  if (threadIdx.x == 0) *result = sum;
}

__global__ void GroupGramKernel(const float* __restrict__ x, int64_t tokens, int64_t in,
                                int64_t group, const float* __restrict__ s, float* gram) {
  const int64_t entry = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t groups = (in + group - 1) / group;
  if (entry >= groups * group * group) return;
  const int64_t j = entry / (group * group);
  const int64_t a = entry / group % group;
  const int64_t b = entry % group;
  const int64_t begin = j * group;
  const int64_t len = min(group, in - begin);
  float sum = 0;
  if (a < len && b < len) {
    const int64_t ca = begin + a, cb = begin + b;
    for (int64_t t = 0; t < tokens; ++t) {
      sum += __fdiv_rn(x[t * in + ca], s[ca]) * __fdiv_rn(x[t * in + cb], s[cb]);
    }
  }
  gram[entry] = sum;
}

constexpr int kClipWarps = 4;
constexpr int kClipRowsPerWarp = 8;

// Block: one group's Gram block in shared memory, kClipWarps warps taking a row each.
__global__ void AwqClipSearchKernel(float* w, int64_t out, int64_t in, int64_t group,
                                    const float* __restrict__ gram, int n_grid, int steps) {
  extern __shared__ float shared[];
  float* g = shared;                       // [group][group]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  float* e = shared + group * group + warp * group;  // this warp's error vector
  const int64_t j = blockIdx.x;
  const int64_t begin = j * group;
  const int64_t len = min(group, in - begin);
  for (int64_t i = threadIdx.x; i < group * group; i += blockDim.x) {
    g[i] = gram[j * group * group + i];
  }
  __syncthreads();
  const int64_t first_row = static_cast<int64_t>(blockIdx.y) * kClipWarps * kClipRowsPerWarp;
  for (int r = 0; r < kClipRowsPerWarp; ++r) {
    const int64_t n = first_row + static_cast<int64_t>(r) * kClipWarps + warp;
    if (n >= out) break;  // the same for the whole warp
    float* row = w + n * in + begin;
    float v[kPerLane];
    float max_abs = 0;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int64_t k = lane + c * kWarp;
      v[c] = k < len ? row[k] : 0.0f;
      max_abs = fmaxf(max_abs, fabsf(v[c]));
    }
    max_abs = WarpMax(max_abs);
    double best_error = INFINITY;
    float best_bound = max_abs;
    for (int i = 0; i <= steps; ++i) {
      const float bound =
          __fmul_rn(max_abs, __fsub_rn(1.0f, __fdiv_rn(static_cast<float>(i),
                                                       static_cast<float>(n_grid))));
      float clipped[kPerLane], lo = INFINITY, hi = -INFINITY;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        // std::clamp(v, -bound, bound)
        clipped[c] = v[c] < -bound ? -bound : (bound < v[c] ? bound : v[c]);
        if (lane + c * kWarp < len) {
          lo = fminf(lo, clipped[c]);
          hi = fmaxf(hi, clipped[c]);
        }
      }
      const RtnGroup q = RtnParams(WarpMin(lo), WarpMax(hi));
      float err[kPerLane];
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int64_t k = lane + c * kWarp;
        err[c] = k < len ? __fsub_rn(RtnValue(clipped[c], q), v[c]) : 0.0f;
        if (k < group) e[k] = err[c];
      }
      __syncwarp();
      // eᵀ G e, G symmetric: lane's y_k = Σ_m G[m][k] e[m] reads consecutive k across lanes.
      double partial = 0;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        const int64_t k = lane + c * kWarp;
        if (k >= len) continue;
        float y = 0;
        for (int64_t m = 0; m < len; ++m) y = fmaf(g[m * group + k], e[m], y);
        partial += static_cast<double>(y) * err[c];
      }
      const double error = WarpSum(partial);
      __syncwarp();  // e is rewritten by the next candidate
      if (error < best_error) {
        best_error = error;
        best_bound = bound;
      }
    }
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int64_t k = lane + c * kWarp;
      if (k < len) row[k] = v[c] < -best_bound ? -best_bound : (best_bound < v[c] ? best_bound : v[c]);
    }
  }
}

bool ValidGroup(int64_t group) { return group >= 2 && group <= kMaxAwqGroup; }

unsigned Blocks(int64_t threads_total, int threads) {
  return static_cast<unsigned>((threads_total + threads - 1) / threads);
}

}  // namespace

cudaError_t AddColumnAbsSums(const uint16_t* x, int64_t rows, int64_t cols, double* sums,
                             cudaStream_t stream) {
  if (rows < 0 || cols <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  AddColumnAbsSumsKernel<<<Blocks(cols, 128), 128, 0, stream>>>(
      reinterpret_cast<const __half*>(x), rows, cols, sums);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

cudaError_t AwqScaledQuantizationError(const float* w, int64_t out, int64_t in, int64_t group,
                                       const float* s, float* d, cudaStream_t stream) {
  if (out <= 0 || in <= 0 || !ValidGroup(group)) return cudaErrorInvalidValue;
  const int64_t warps = out * ((in + group - 1) / group);
  AwqScaledQuantizationErrorKernel<<<Blocks(warps * kWarp, 256), 256, 0, stream>>>(w, out, in,
                                                                                  group, s, d);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

int64_t SumOfProductsPartials() { return kSumBlocks; }

cudaError_t SumOfProducts(const float* a, const float* b, int64_t n, double* partials,
                          double* result, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  SumOfProductsKernel<<<kSumBlocks, kSumThreads, 0, stream>>>(a, b, n, partials);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  SumPartialsKernel<<<1, kFinalThreads, 0, stream>>>(partials, result);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

cudaError_t GroupGram(const float* x, int64_t tokens, int64_t in, int64_t group, const float* s,
                      float* gram, cudaStream_t stream) {
  if (tokens < 0 || in <= 0 || !ValidGroup(group)) return cudaErrorInvalidValue;
  const int64_t entries = (in + group - 1) / group * group * group;
  GroupGramKernel<<<Blocks(entries, 256), 256, 0, stream>>>(x, tokens, in, group, s, gram);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

cudaError_t AwqClipSearch(float* w, int64_t out, int64_t in, int64_t group, const float* gram,
                          int n_grid, int steps, cudaStream_t stream) {
  if (out <= 0 || in <= 0 || !ValidGroup(group) || n_grid <= 0 || steps < 0) {
    return cudaErrorInvalidValue;
  }
  const size_t smem = static_cast<size_t>(group * group + kClipWarps * group) * sizeof(float);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      AwqClipSearchKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((in + group - 1) / group),
                  Blocks(out, kClipWarps * kClipRowsPerWarp));
  AwqClipSearchKernel<<<grid, kClipWarps * kWarp, smem, stream>>>(w, out, in, group, gram,
                                                                   n_grid, steps);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

}  // namespace nibble::kernels::cuda
