// W4A16 matrix multiply on the GPU: y[m, n] = x[m, k] · Wᵀ (+ bias), x and y fp16, W int4 in
// groups along k, (q - zero) * scale as in kernels/cpu/w4a16.h (the CPU reference), fp32
// accumulation, fp16 output (round to nearest). W is in the device layout of w4a16_layout.h
// (RepackW4A16 once at load).
//
// Ownership: the kernels own nothing and allocate nothing; every pointer is device memory the
// caller keeps alive until the stream has run the work. x is row-major [m, k], y row-major
// [m, n] (fully written, never read; MatMulW4A16Fused: as its W4A16Fusion says), bias fp32 [n]
// or null. Any k (partial last group);
// n a multiple of 8 (CheckW4A16Shape).
// workspace (optional, device memory, 16-byte aligned, contents not kept): the GEMM kernels'
// split-k partial sums (fp32, splits x m x n); it must not be in use by other work on other
// streams meanwhile. Without one (or too small) they run unsplit.
// Thread safety: none needed; launches go on `stream` and return at once.
// Errors: the launch's cudaError_t (printed with file:line by NIBBLE_CUDA_RETURN_IF_ERROR);
// cudaErrorInvalidValue for an unsupported shape or m < 0. m == 0 does nothing.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/cuda/split_sums.h"
#include "kernels/cuda/w4a16_layout.h"

namespace nibble::kernels::cuda {

// Which kernel runs. kAuto is what the engine uses; the others exist for tests and benchmarks.
//  kDecode8 / kDecode16: 8 / 16 tokens per block row (any m works; kAuto picks kDecode16 up
//    to m = 64 for small weights, re-reading the weight from L2 per block row): one 16-feature
//    tile per block, the k range split into contiguous runs over 4-16 warps (as many as keep
//    every block resident at once), the weight streamed with an L2 evict-first hint, 4 chunks
//    (weight + scale/zero) in flight per thread in registers; for group >= 64 the scale is
//    applied to the fp32 mma result.
//  kDecode8Ring: kDecode8 with each thread's chunks in flight (8 of them) in a private ring in
//    shared memory filled by cp.async instead of registers: twice the bytes in flight per SM at
//    the same 64 registers and warps (W4A16DecodeKernel's comment). kAuto's choice for m <= 8.
//    Up to ~104 KB of shared memory per block: fewer warps per block where a block may have
//    less (99 KB on sm_86 / sm_89).
//  kTiled64: 64 features x 64 tokens per block (4 warps along n, 2 along k), activations read
//    by 4 warps through L1 (slow: 4-7x cuBLAS fp16 at m = 256); only the GEMM's fallback for
//    unaligned activations above 64 tokens.
//  kGemm16 / kGemm32: the tensor-core GEMM (W4A16GemmKernel), 128 features x 16 / 32 tokens per
//    block, weight, scale/zero and activation tiles of 64 k streamed through a 6 / 5 stage
//    cp.async shared-memory pipeline, the weight dequantized in registers once per block of
//    tokens. With a workspace the k range is split over blocks (enough blocks to fill the card
//    twice) and a second kernel adds the fp32 partial sums (+ bias). They need k % 8 == 0 and x
//    16-byte aligned; otherwise decode16 runs (tiled64 above 64 tokens).
//  kDecode8Pdl / kDecode8RingPdl: kDecode8 / kDecode8Ring with programmatic dependent launch on
//    sm_90 and a non-default stream (elsewhere the plain launch): the kernel may start while the
//    kernel before it ends (if that one allows it, kernels/cuda/dependent_launch.h), issues its
//    first weight loads (qw and zs must not be written by the work before it), then waits for it
//    (griddepcontrol.wait) before reading x and writing y. The engine launches kDecode8RingPdl
//    wherever kAuto picks kDecode8Ring.
// (Run 16's kStream8, a bulk-copy ring per block fed by a producer warp, was removed in run 24:
// the per-thread ring matched it on the one shape it won and beat it on all others.)
enum class W4A16Kernel {
  kAuto, kDecode8, kDecode16, kTiled64, kGemm16, kGemm32,
  kDecode8Pdl, kDecode8Ring, kDecode8RingPdl
};

// kAuto's choice for m tokens on this weight, with or without a workspace (measured on the
// H100, tests/gpu/NOTES.md runs 12-16 and 24): up to 8 tokens decode8 with the ring; decode16
// for small weights up to 32 or 64 tokens and for every weight up to 64 without a workspace;
// else gemm16 / gemm32.
W4A16Kernel ChooseW4A16Kernel(const W4A16Layout& layout, int64_t m, bool workspace);

// unreduced (optional): where the launch splits k (a GEMM kernel with a workspace), the split
// reduce is left to the caller: *unreduced describes the fp32 partial sums (and the bias) in the
// workspace, y is not written, and the caller's next kernel on `stream` adds them up as it
// loads them (ops.h AddRmsNorm / SiluMul with SplitSums; the same bits as y). The workspace
// must then stay untouched until that kernel has run; since it allows the kernel after it an
// early (programmatic) launch, that next kernel must not write the workspace before its
// griddepcontrol.wait (a plain launch, as every W4A16 GEMM's, is safe). Elsewhere
// unreduced->splits = 0 and y is written.
cudaError_t MatMulW4A16(const W4A16Layout& layout, const uint16_t* x, const uint32_t* qw,
                        const uint32_t* zs, const float* bias, uint16_t* y, int64_t m,
                        cudaStream_t stream, W4A16Kernel kernel = W4A16Kernel::kAuto,
                        void* workspace = nullptr, size_t workspace_bytes = 0,
                        SplitSums* unreduced = nullptr);

// For benchmarks: decode8, decode8ring (each with or without PDL) or decode16 (`kernel`; others
// are refused) with `warps` warps per block (at most 16 and k / 64; the ring at most what its
// shared memory allows) instead of the launch's own choice.
cudaError_t MatMulW4A16WithWarps(const W4A16Layout& layout, const uint16_t* x,
                                 const uint32_t* qw, const uint32_t* zs, const float* bias,
                                 uint16_t* y, int64_t m, cudaStream_t stream, W4A16Kernel kernel,
                                 int warps);

// The decode step's element-wise kernels folded into its products (m <= 8, the ring kernels).
// Precision: x = fp16(r * w * c) is rounded before the per-token normalization, so a residual
// row of very small magnitude (|r * w * c| near fp16's subnormal range, ~6e-5) keeps fewer bits
// than RmsNorm's fp16(r / rms * w) would; c scales the norm weight's largest |w * c| into
// (0.5, 1], which keeps it finite and as far from that range as the residual allows.
// The engine uses them where kernels launch without PDL (before sm_90): on the H100 with PDL
// the kernels they replace already overlap the next product's first loads, and the fused step
// measured slower there (tests/gpu/NOTES.md run 25). Each part is off when its pointer is null
// (gated: false); gated and the residual epilogue exclude each other.
struct W4A16Fusion {
  // The RMSNorm of the activations, folded: x[tok] holds fp16(r * (norm_weight * x_norm_c)) of a
  // residual row r (as the residual epilogue below writes it) and x_sumsq[tok * x_sumsq_parts +
  // p] the partial sums of r^2 (its sumsq; x_sumsq_parts = ceil(k / 16)); y = (x · Wᵀ) / (x_norm_c * sqrt(sum / k + x_eps))
  // + bias, the per-token scale applied to the fp32 sums. Up to fp16 rounding of the
  // activations, RmsNorm(r) then the product.
  const float* x_sumsq = nullptr;
  int64_t x_sumsq_parts = 0;
  float x_eps = 0.0f;
  float x_norm_c = 1.0f;  // a power of two
  // The stacked [gate | up] product (n = 2 * ffn, n % 32 == 0): y [m, n / 2] = silu(gate) * up
  // of the fp16-rounded gate and up, as SiluMul (ops.h) forms it, without the [m, n]
  // intermediate.
  bool gated = false;
  // The residual add and the next norm's inputs: y, the residual stream [m, n], is read and
  // y = fp16(y + fp16(x · Wᵀ + bias)) written (AddRmsNorm's x, bit for bit); normed [m, n] =
  // fp16(y * (norm_weight * norm_c)) and sumsq [m, n_pad / 16] the sums of y^2 over each 16
  // features: the next product's x and x_sumsq. norm_c, a power of two with
  // |norm_weight * norm_c| <= 1, keeps normed finite (|y| is).
  const uint16_t* norm_weight = nullptr;
  float norm_c = 1.0f;
  uint16_t* normed = nullptr;
  float* sumsq = nullptr;
};

// nullptr when `fusion` fits the layout, else what is wrong.
const char* CheckW4A16Fusion(const W4A16Layout& layout, const W4A16Fusion& fusion);

// MatMulW4A16 with `fusion`; kernel kDecode8Ring or kDecode8RingPdl (others:
// cudaErrorInvalidValue), any m (the engine passes m <= 8).
cudaError_t MatMulW4A16Fused(const W4A16Layout& layout, const uint16_t* x, const uint32_t* qw,
                             const uint32_t* zs, const float* bias, uint16_t* y, int64_t m,
                             cudaStream_t stream, W4A16Kernel kernel, const W4A16Fusion& fusion);

// w[r, c] = (q - zero) * scale of the weight in the device layout, rounded to fp16, for r < n,
// c < k: w row-major [n, k] (fully written). For large m the engine multiplies this with
// cuBLAS (a dense GEMM's tensor-core throughput beats re-reading the 4-bit weight per tile of
// tokens once m reaches ~100); w is the caller's scratch. staged: the rows go out through
// shared memory as whole 512-byte pieces (false: each lane stores its own 32 bytes of 8 rows;
// kept for the benchmark's comparison, tests/gpu/NOTES.md run 26).
cudaError_t DequantizeW4A16(const W4A16Layout& layout, const uint32_t* qw, const uint32_t* zs,
                            uint16_t* w, cudaStream_t stream, bool staged = true);

}  // namespace nibble::kernels::cuda
