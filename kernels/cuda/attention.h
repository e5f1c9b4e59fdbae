// Paged-KV attention on the GPU, decode (one query token per sequence), fp16 q / KV / out,
// fp32 scores, softmax and accumulation. CPU reference: kernels/cpu/attention.h
// PagedCausalAttention (a span of one token whose keys and values are already in the cache);
// tests/gpu/attention_test.cc compares them. Prefill (many query tokens per sequence, causal,
// PagedPrefillAttention) is further down, after the decode kernel.
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
// sectors. The backend owns the pool; these kernels only read it, except
// PagedDecodeAttentionWithRope, which writes the new token's key and value.
//
// Split along the sequence (flash-decoding): the positions are cut into splits of
// plan.split_tokens; one block per (sequence, kv head, up to 8 of its query heads, split)
// computes the scores of its query heads against its positions, a partial softmax (its max and
// sum) and the unnormalized weighted sum of the values, into the workspace; a second kernel
// combines the splits (rescaled by exp(m_i - max)). With a single split the first kernel writes
// the output directly and the second does not run. On sm_90 and later, with at most 16 splits
// and a small grid (plan.combine_in_cluster), the splits of one (sequence, kv head, up to 8 of its query heads)
// are one thread block cluster and combine through distributed shared memory instead: one
// kernel, no workspace, the same bits as the combine kernel. Query heads of one kv head share its K/V
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
  int64_t workspace_bytes = 0;  // 0 when max_splits == 1; unused with combine_in_cluster
  // The splits can combine inside a thread block cluster (no combine kernel, no workspace):
  // 2 to 16 splits on sm_90 and later, where the kernels have sm_90 code and a cluster of
  // max_splits blocks fits the device.
  bool cluster_fits = false;
  // They do: the planner sets it where cluster_fits and the split kernel's grid is at most one
  // block per multiprocessor (batch 1 at short contexts: one kernel fewer; larger grids measured
  // slower in clusters, tests/gpu/NOTES.md run 27). A caller may set or clear it where
  // cluster_fits (tests, benchmarks), never set it otherwise.
  bool combine_in_cluster = false;
  // Launch with programmatic dependent launch (kernels/cuda/dependent_launch.h) on a stream of
  // the caller's own: the kernels may start while the one before them ends. The caller sets it
  // only on sm_90 and later (PagedDecodeAttention does not check the device).
  bool dependent_launch = false;
};

// Plans a decode attention call for up to `num_seqs` sequences of up to `max_seq_len`
// positions on the current device: split_tokens (32 or a multiple of 64, at most 512) is chosen so
// that the first kernel has about 4 blocks per multiprocessor; split_tokens > 0 forces that
// split size instead (rounded up to 32 or a multiple of 64; tests; more than 4096 splits are
// refused). max_seq_len <= 4096 * 512. Errors: unsupported shape,
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

// The decode step's RoPE folded into the attention: the new token of each sequence (at
// position seq_lens[s] - 1) as the q/k/v product leaves it, unrotated. Row s of q / k / v at
// q + s * q_stride etc. (heads * head_dim, kv_heads * head_dim halves; strides in halves),
// rotated as RopeRotateHalf (kernels/cuda/ops.h) rotates it: angle positions[s] *
// inv_freq[freq_index[s] * head_dim / 2 + i] (freq_index null: table 0).
struct DecodeRopeInput {
  const uint16_t* q = nullptr;
  int64_t q_stride = 0;
  const uint16_t* k = nullptr;
  int64_t k_stride = 0;
  const uint16_t* v = nullptr;
  int64_t v_stride = 0;
  const int32_t* positions = nullptr;   // device [num_seqs]
  const float* inv_freq = nullptr;      // device [tables][head_dim / 2]
  const int32_t* freq_index = nullptr;  // device [num_seqs], or null
  const int32_t* slots = nullptr;       // device [num_seqs]: the cache row of the new token
  uint16_t* keys = nullptr;             // the view's keys and values, writable: the new token's
  uint16_t* values = nullptr;           // key and value go there (as RopeKvStore's do)
};

// RopeRotateHalf with a RopeKvStore followed by PagedDecodeAttention, in one kernel (two with
// the combine): the same bits in out and in the cache, except that q is not rotated in place
// (rope.q is only read). The new token's key and value are written at slot slots[s] and, for
// the attention, taken from the block's shared memory, never read back from the cache: the rest
// of sequence s (positions < len_s - 1) must already be there. With dependent_launch the kernel
// reads those cache rows, seq_lens and the block tables before it waits for the kernel before
// it: no kernel still running when it starts may write them (the engine copies the metadata in
// before the step; earlier steps wrote those rows). A sequence whose length is
// outside [1, max_seq_len] gets a NaN output row and nothing written to the cache.
cudaError_t PagedDecodeAttentionWithRope(const DecodeAttentionPlan& plan,
                                         const DecodeRopeInput& rope, const PagedKvView& kv,
                                         const int32_t* block_tables, int64_t block_table_stride,
                                         const int32_t* seq_lens, int64_t num_seqs,
                                         void* workspace, uint16_t* out, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Prefill: causal attention of many query tokens per sequence (flash-attention 2 style), over
// the same paged pool (PagedKvView) and fp16 q / out, fp32 softmax and accumulation. CPU
// reference: kernels/cpu/attention.h PagedCausalAttention with the same spans.
//
// A span is a run of consecutive query tokens of one sequence: span s's query rows are
// first_row[s] .. first_row[s] + tokens[s] - 1 of q and out, at positions start[s] ..
// start[s] + tokens[s] - 1; the keys and values of positions 0 .. start[s] + tokens[s] - 1
// (the cache before the span and the span's own tokens) are already in the pool, and its
// block table is at block_tables + s * block_table_stride (at least
// ceil((start + tokens) / block_seq_len) valid ids). The query token at position p attends to
// positions 0 .. p. A span may be a whole prompt (start 0), a prompt chunk after cached tokens
// (start > 0), or one decode token (tokens 1: correct, but the decode kernel is faster there).
//
// Work split: a span's (token, query head) pairs of one kv head, token-major (row r: token
// r / group, query head kv_head * group + r % group, group = heads / kv_heads), are cut into
// tiles of tile_rows (64 or 128) rows; one block of tile_rows / 16 warps (16 rows each) per
// (tile, kv head) loops over the positions the tile can see in tiles of 64 keys, loaded once
// into shared memory (cp.async, double-buffered) and shared by the tile's tokens and by the
// query heads of the group (GQA).
// Scores Q K^T and P V on the tensor cores (mma.sync m16n8k16, fp16 inputs, fp32
// accumulation); online softmax in fp32 (exp2, max-subtracted); P is rounded to fp16 for the
// P V product (as in flash-attention). head_dim 8 runs the same code with the QK^T reduction
// zero-padded to 16. The tiles of a span are visited last (longest) first. Precision: P's
// fp16 rounding puts an output element within ~2^-11 sum_i w_i |v_i| of the fp32 result
// (attention_test's bound). Speed (H100, attention_bench, one layer at 32/8/128, blocks of
// 128): a 2048-token prompt in ~200 µs (~170 TFLOP/s of causal work), ~17x faster than
// PagedDecodeAttention with one sequence per query row.
//
// Ownership: nothing is owned or allocated, no workspace; every pointer is device memory the
// caller keeps alive until the stream has run the work. The span table is read on the device
// (a CUDA graph can replay it with new spans, as long as the plan's bounds hold). Each call
// also raises the kernel's dynamic shared-memory limit (cudaFuncSetAttribute, host-side: fine
// during stream capture).
// Errors: the launch's cudaError_t; cudaErrorInvalidValue for unsupported shapes or a call
// beyond its plan (num_spans > plan.max_spans) or misaligned pointers (q, out, keys, values
// need 16 bytes). Not checkable on the host, the caller's to keep: Σ tokens <= plan.max_rows
// (rows beyond are left unwritten), a span's rows do not overlap another's; a span with
// tokens <= 0 or start < 0 is skipped (its rows are left unwritten).

// Device arrays of num_spans entries each (see above), and the block tables.
struct PrefillSpanTable {
  const int32_t* first_row = nullptr;     // the span's first row of q / out
  const int32_t* start = nullptr;         // the position of its first query token
  const int32_t* tokens = nullptr;        // its query tokens
  const int32_t* block_tables = nullptr;  // span s's block ids at + s * block_table_stride
  int64_t block_table_stride = 0;
};

struct PrefillAttentionPlan {
  DecodeAttentionShape shape;
  int64_t max_rows = 0;    // Σ tokens of a call, at most
  int64_t max_spans = 0;   // spans of a call, at most
  int32_t tile_rows = 0;   // (token, query head) rows per block: 64 (4 warps) or 128 (8)
  int32_t tile_keys = 0;   // key positions per shared-memory K / V tile: 64
  int64_t smem_bytes = 0;  // dynamic shared memory per block (69632 at head_dim 128)
};

// Plans prefill attention calls of up to `max_rows` query tokens in all, in up to `max_spans`
// spans. The grid is (kv_heads, ceil(max_rows * group / tile_rows) + num_spans): that bound
// must be <= 65535 (e.g. max_rows 16384 at group 4 with up to 64511 spans). tile_rows 64 or
// 128 forces that tile (tests, benchmarks); 0 chooses on the current device: 128 when
// ceil(max_rows * group / 128) * kv_heads >= its multiprocessors, else 64. Errors: unsupported
// shape (as the decode plan's), non-positive or too large sizes, tile_rows not 0, 64 or 128.
cudaError_t PlanPagedPrefillAttention(const DecodeAttentionShape& shape, int64_t max_rows,
                                      int64_t max_spans, PrefillAttentionPlan* plan,
                                      int32_t tile_rows = 0);

// out[r, h, :] = softmax(q[r, h, :] . K_s[0 .. p, h / group, :] / sqrt(head_dim)) V_s for every
// row r = first_row[s] + t of every span s < num_spans (<= plan.max_spans), t < tokens[s],
// p = start[s] + t. q and out: [rows, heads, head_dim] contiguous fp16; only the spans' rows of
// out are written, each completely. Rows of one call must not exceed plan.max_rows in all.
cudaError_t PagedPrefillAttention(const PrefillAttentionPlan& plan, const uint16_t* q,
                                  const PagedKvView& kv, const PrefillSpanTable& spans,
                                  int64_t num_spans, uint16_t* out, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
