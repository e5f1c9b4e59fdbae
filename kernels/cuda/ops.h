// Element-wise and per-row operations of the transformer forward pass on the GPU, fp16 in and
// out, fp32 arithmetic. CPU references: kernels/cpu/ops.h (RmsNorm, AddInPlace, SiluMulInPlace,
// RopeRotateHalf); tests/gpu/ops_test.cc compares them.
//
// Ownership: the kernels own nothing and allocate nothing; every pointer is device memory
// (unless named host_) that the caller keeps alive until the stream has run the work. Matrices
// are row-major with the row strides given in elements (a stride lets a kernel work on a slice
// of a fused buffer, e.g. the q and k parts of a fused qkv product).
// Thread safety: none needed; launches go on `stream` and return at once.
// dependent (RmsNorm, AddRmsNorm, SiluMul, RopeRotateHalf): launch with programmatic dependent
// launch (kernels/cuda/dependent_launch.h) on a stream of the caller's own: the kernel may start
// while the one before it ends, and waits for it before any memory access. The caller passes
// true only on sm_90 and later (these functions do not check the device).
// Errors: the launch's cudaError_t (printed with file:line by NIBBLE_CUDA_RETURN_IF_ERROR);
// cudaErrorInvalidValue for negative sizes or other bad arguments (stated per function).
// Zero rows (tokens) do nothing.
// 16-byte loads and stores are used where dimensions and pointers allow (multiples of 8 halves,
// 16-byte aligned); anything else runs on a scalar path with the same results.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/cuda/split_sums.h"

namespace nibble::kernels::cuda {

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight, for `rows` rows of `dim`; x, y
// contiguous [rows, dim]; y may alias x. One block per row, sum of squares in fp32.
cudaError_t RmsNorm(const uint16_t* x, const uint16_t* weight, int64_t rows, int64_t dim,
                    float eps, uint16_t* y, cudaStream_t stream, bool dependent = false);

// The residual add fused with the next norm: x += residual (the sum rounded to fp16 and
// stored in x, the residual stream), then y = RmsNorm(x) of the stored (rounded) x, so that y
// is exactly RmsNorm of what the next residual add will read. y must not alias x or residual.
cudaError_t AddRmsNorm(uint16_t* x, const uint16_t* residual, const uint16_t* weight,
                       int64_t rows, int64_t dim, float eps, uint16_t* y, cudaStream_t stream,
                       bool dependent = false);

// AddRmsNorm with the residual given as a product's split-k partial sums (split_sums.h): the
// same bits as the reduce kernel's fp16 output passed to AddRmsNorm, without that kernel.
cudaError_t AddRmsNorm(uint16_t* x, const SplitSums& residual, const uint16_t* weight,
                       int64_t rows, int64_t dim, float eps, uint16_t* y, cudaStream_t stream,
                       bool dependent = false);

// out[r, c] = silu(gate[r, c]) * up[r, c] = gate / (1 + exp(-gate)) * up, c < cols.
// out may alias gate (same stride).
cudaError_t SiluMul(const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                    int64_t up_stride, int64_t rows, int64_t cols, uint16_t* out,
                    int64_t out_stride, cudaStream_t stream, bool dependent = false);

// SiluMul of a product's split-k partial sums (split_sums.h; for a stacked [gate | up] product,
// up = gate.Columns(cols)): the same bits as the reduce kernel's fp16 output passed to SiluMul.
// out must not overlap the sums.
cudaError_t SiluMul(const SplitSums& gate, const SplitSums& up, int64_t rows, int64_t cols,
                    uint16_t* out, int64_t out_stride, cudaStream_t stream,
                    bool dependent = false);

// Rotary embedding, "rotate_half" layout (kernels/cpu/ops.h RopeRotateHalf), in place on the
// q heads and the k heads of `tokens` tokens: token t's q heads start at q + t * q_stride
// (`heads` heads of head_dim), its k heads at k + t * k_stride (`kv_heads` heads); k may be
// null (kv_heads ignored). Token t is at position positions[t] (>= 0) and rotates with the
// inverse-frequency row inv_freq + freq_index[t] * head_dim / 2 (fp32, head_dim / 2 each):
// one row per span gives each sequence its own dynamic-NTK base; freq_index null = row 0 for
// every token. The angle position * inv_freq is formed exactly in double and reduced modulo
// 2 pi there (positions beyond 32k keep their phase, as the CPU reference's double angle), then
// sincosf on the reduced angle. head_dim even, <= 1024.
//
// With `store` (k not null): the keys and values also go into the paged KV pool in the same
// kernel (PagedKvView's layout in attention.h; the slots are the caller's, checked against its
// pool on the host): token t's rotated k row and its v row (kv_heads * head_dim halves at
// store->v + t * store->v_stride) are written to position slots[t] of the layer's keys /
// values; k itself is then left as it was (only q is rotated in place).
struct RopeKvStore {
  const uint16_t* v = nullptr;
  int64_t v_stride = 0;
  const int32_t* slots = nullptr;  // device, one per token, checked by the caller
  uint16_t* keys = nullptr;        // this layer's keys / values of block 0 (attention.h)
  uint16_t* values = nullptr;
  int64_t block_stride = 0;        // halves from one block to the next
  int32_t block_seq_len = 0;       // positions per block
};
cudaError_t RopeRotateHalf(uint16_t* q, int64_t q_stride, int64_t heads, uint16_t* k,
                           int64_t k_stride, int64_t kv_heads, int64_t head_dim, int64_t tokens,
                           const int32_t* positions, const float* inv_freq,
                           const int32_t* freq_index, cudaStream_t stream,
                           const RopeKvStore* store = nullptr, bool dependent = false);

// cudaErrorInvalidValue (and a message) if any host_ids[i] is outside [0, vocab).
cudaError_t CheckTokenIds(const int32_t* host_ids, int64_t n, int64_t vocab);

// out[i, :] = table[ids[i], :], table fp16 [vocab, hidden], ids (device) [n], out [n, hidden].
// The ids are checked on the host: pass the same ids in host memory as host_ids (checked with
// CheckTokenIds before the launch; null when the caller has checked them, e.g. before copying
// them into a CUDA graph's id buffer). The kernel still never reads outside the table: a row
// whose id is out of range is written as NaN.
cudaError_t Embedding(const uint16_t* table, int64_t vocab, int64_t hidden, const int32_t* ids,
                      int64_t n, uint16_t* out, cudaStream_t stream,
                      const int32_t* host_ids = nullptr);

// y[r, c] += bias[c] for r < rows, c < cols (y fp16 with row stride y_stride, bias fp32; the
// sum formed in fp32 and rounded once): the bias of a dense (cuBLAS) linear.
cudaError_t AddBias(uint16_t* y, int64_t y_stride, const float* bias, int64_t rows, int64_t cols,
                    cudaStream_t stream);

// out[r] = the index of the largest of x[r, 0 .. cols - 1] (row stride `stride` floats), the
// lowest such index on ties: std::max_element's answer for rows without NaN (greedy decoding
// on the device, so that only the token ids leave it). One block per row.
cudaError_t ArgMaxRows(const float* x, int64_t rows, int64_t cols, int64_t stride, int32_t* out,
                       cudaStream_t stream);

// out[i] = in[i] as fp32, i < n (logits leave the device in fp32).
cudaError_t HalfToFloat(const uint16_t* in, int64_t n, float* out, cudaStream_t stream);

// out[i] = in[i] rounded to the nearest fp16, i < n (activations kept in fp32 on the host
// entering the device, as the GPU quantizer's calibration states).
cudaError_t FloatToHalf(const float* in, int64_t n, uint16_t* out, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
