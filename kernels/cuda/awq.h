// The arithmetic of the AWQ search on the GPU (quant/awq_cuda.cc drives it; quant/awq.cc is
// the CPU reference it is checked against). The search asks, for each candidate, how much a
// linear's output on the calibration tokens changes when its weight is fake-quantized. With
// X the inputs and D = W - Q(W) the weight's error, that is Σ_t ||D x_t||² = Σ_n d_nᵀ G d_n
// with the Gram matrix G = Σ_t x_t x_tᵀ: the tokens are summed once (a GEMM), and each
// candidate costs a product with G instead of a pass over every token.
//
// The fake quantization is quant/rtn.h's round-to-nearest, bit for bit: per group of a row,
// scale = fp16(max(max - min, 1e-5) / 15), zero = clamp(rint(-min / scale), 0, 15),
// level = clamp(rint(w / scale) + zero, 0, 15), w' = (level - zero) * scale (fp32, no
// contraction into FMAs), so the GPU and the CPU see the same quantized weights.
//
// Ownership: none; every pointer is device memory the caller keeps alive until the stream
// has run the work. Groups of at most kMaxAwqGroup input features; the last group of a row
// may be partial. Deterministic: the same inputs give the same bits on the same device (no
// atomics; fixed reduction orders), so a resumed search writes what an uninterrupted one
// would.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace nibble::kernels::cuda {

inline constexpr int64_t kMaxAwqGroup = 128;

// sums[c] += Σ_r |x[r, c]| for c < cols: x fp16 row-major [rows, cols], sums fp64.
cudaError_t AddColumnAbsSums(const uint16_t* x, int64_t rows, int64_t cols, double* sums,
                             cudaStream_t stream);

// d[n, k] = w[n, k] - Q(w[n, :] * s)[k] / s[k]: the error of linear w [out, in] (fp32) when it
// is quantized with its input channels multiplied by s (the AWQ scale candidate) and the
// scales divided out again. Q quantizes each group of `group` features of a row.
cudaError_t AwqScaledQuantizationError(const float* w, int64_t out, int64_t in, int64_t group,
                                       const float* s, float* d, cudaStream_t stream);

// The number of doubles SumOfProducts needs as `partials`.
int64_t SumOfProductsPartials();

// *result = Σ_i a[i] * b[i], i < n, summed in fp64 in a fixed order (partials: device scratch
// of SumOfProductsPartials() doubles).
cudaError_t SumOfProducts(const float* a, const float* b, int64_t n, double* partials,
                          double* result, cudaStream_t stream);

// The diagonal blocks of the Gram matrix of x / s: for group j (features j*group ..), gram
// [j][a][b] = Σ_t (x[t, j*group + a] / s[..]) * (x[t, j*group + b] / s[..]), t < tokens; x fp32
// [tokens, in], s fp32 [in], gram fp32 [ceil(in / group), group, group] (a partial last
// group's block uses its first len x len entries).
cudaError_t GroupGram(const float* x, int64_t tokens, int64_t in, int64_t group, const float* s,
                      float* gram, cudaStream_t stream);

// AWQ's clipping search, in place on w [out, in] (fp32): for each group of each row, the
// bounds b_i = max|w| * (1 - i / n_grid), i = 0 .. steps, are tried; each clamps the group to
// [-b_i, b_i] and quantizes it; the error eᵀ G_j e (e = quantized - original, G_j the group's
// block from GroupGram) picks the bound (the first of equal errors), and the group is
// clamped to it.
cudaError_t AwqClipSearch(float* w, int64_t out, int64_t in, int64_t group, const float* gram,
                          int n_grid, int steps, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
