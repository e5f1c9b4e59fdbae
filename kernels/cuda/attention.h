// Paged-KV attention on the GPU, decode (one query token per sequence), fp16 q / KV / out,
// fp32 scores, softmax and accumulation. CPU reference: kernels/cpu/attention.h
// PagedCausalAttention (a span of one token whose keys and values are already in the cache);
// tests/gpu/attention_test.cc compares them. Prefill (many query tokens per sequence, causal)
// is not here yet: the CUDA backend's next kernel.
//
// KV layout (the same as engine/cpu_backend.cc's blocks, in fp16): the pool is num_blocks
// blocks; a block holds, for block_seq_len positions, every layer's keys and values:
//   block[layer][keys | values][block_seq_len][kv_heads][head_dim]
// One layer's view (PagedKvView) is `keys` = pool + 2 * layer * block_seq_len * kv_dim,
// `values` = keys + block_seq_len * kv_dim, block_stride = 2 * layers * block_seq_len * kv_dim
// elements (kv_dim = kv_heads * head_dim): position p of a sequence is row p % block_seq_len of
// block table[p / block_seq_len], at keys + table[p / bsl] * block_stride + (p % bsl) * kv_dim.
// A row of one kv head is head_dim contiguous halves (256 bytes at d = 128): 16 lanes read it
// with one 16-byte load each, so a warp reads two positions per load instruction, whole
// sectors. The backend owns the pool; these kernels only read it.
//
// Split along the sequence (flash-decoding): the positions are cut into splits of
// plan.split_tokens; one block per (sequence, kv head, up to 8 of its query heads, split)
// computes the scores of its query heads against its positions, a partial softmax (its max and
// sum) and the unnormalized weighted sum of the values, into the workspace; a second kernel
// combines the splits (rescaled by exp(m_i - max)). With a single split the first kernel writes
// the output directly and the second does not run. Query heads of one kv head share its K/V
// reads (GQA: heads % kv_heads == 0, query head h reads kv head h / (heads / kv_heads)).
//
// Ownership: nothing is owned or allocated; every pointer is device memory the caller keeps
// alive until the stream has run the work, the workspace included (plan.workspace_bytes).
// The sequence lengths are read on the device (a CUDA graph can replay with new lengths and
// block tables, as long as every length is <= the plan's max_seq_len).
// Errors: the launch's cudaError_t; cudaErrorInvalidValue for unsupported shapes (head_dim not
// 8, 64 or 128, heads % kv_heads != 0, ...) or a plan made for another shape. A length outside
// [1, max_seq_len] on the device cannot be reported: that sequence's output is NaN.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace nibble::kernels::cuda {

struct PagedKvView {
  const uint16_t* keys = nullptr;    // block 0's keys of this layer (fp16)
  const uint16_t* values = nullptr;  // block 0's values of this layer
  int64_t block_stride = 0;          // halves from one block to the next
  int32_t block_seq_len = 0;         // positions per block
};

struct DecodeAttentionShape {
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;  // 8, 64 or 128
};

struct DecodeAttentionPlan {
  DecodeAttentionShape shape;
  int64_t num_seqs = 0;
  int64_t max_seq_len = 0;
  int32_t split_tokens = 0;  // positions per split
  int32_t max_splits = 0;    // ceil(max_seq_len / split_tokens)
  int64_t workspace_bytes = 0;  // 0 when max_splits == 1
};

// Plans a decode attention call for up to `num_seqs` sequences of up to `max_seq_len`
// positions on the current device: split_tokens (a multiple of 64, at most 512) is chosen so
// that the first kernel has about 4 blocks per multiprocessor; split_tokens > 0 forces that
// split size instead (rounded up to a multiple of 64; tests). max_seq_len <= 4096 * 512. Errors: unsupported shape,
// non-positive sizes.
cudaError_t PlanPagedDecodeAttention(const DecodeAttentionShape& shape, int64_t num_seqs,
                                     int64_t max_seq_len, DecodeAttentionPlan* plan,
                                     int32_t split_tokens = 0);

// out[s, h, :] = softmax(q[s, h, :] . K_s[0 .. len_s - 1, h / group, :] / sqrt(head_dim)) V_s
// for s < num_seqs (<= plan.num_seqs), len_s = seq_lens[s] (device, in [1, plan.max_seq_len]:
// the new token's keys and values already in the cache), sequence s's block ids at
// block_tables + s * block_table_stride (device, at least ceil(len_s / block_seq_len) valid
// ids). q and out: [num_seqs, heads, head_dim] contiguous fp16; out is fully written.
cudaError_t PagedDecodeAttention(const DecodeAttentionPlan& plan, const uint16_t* q,
                                 const PagedKvView& kv, const int32_t* block_tables,
                                 int64_t block_table_stride, const int32_t* seq_lens,
                                 int64_t num_seqs, void* workspace, uint16_t* out,
                                 cudaStream_t stream);

}  // namespace nibble::kernels::cuda
