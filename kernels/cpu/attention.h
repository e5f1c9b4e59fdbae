// Causal grouped-query attention against a KV cache kept in fixed-size blocks (paged), fp32.
// One implementation serves every caller: a contiguous cache is a single block.
#pragma once

#include <cstdint>

namespace nibble::kernels::cpu {

struct AttentionShape {
  int64_t heads;     // query heads
  int64_t kv_heads;  // key/value heads; heads % kv_heads == 0 (query head h reads h / group)
  int64_t head_dim;
};

// One sequence's cache for one layer, in blocks of `block_seq_len` positions. Position p lives
// in block block_table[p / block_seq_len], row p % block_seq_len; a block's rows are
// [block_seq_len, kv_heads, head_dim] starting at keys + id * block_stride (values likewise).
// Owns nothing. A contiguous cache: block_table = {0}, block_seq_len >= its length.
struct PagedKv {
  float* keys = nullptr;
  float* values = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_seq_len = 0;
  int64_t block_stride = 0;  // floats from one block id to the next

  int64_t RowOffset(int64_t position, int64_t kv_stride) const {
    return block_table[position / block_seq_len] * block_stride +
           (position % block_seq_len) * kv_stride;
  }
};

// The tokens one sequence contributes to a batched attention call: positions
// start .. start + tokens - 1, whose keys and values are already in `kv`.
struct AttentionSpan {
  int64_t tokens = 0;
  int64_t start = 0;
  PagedKv kv;
};

// q: [Σ tokens, heads, head_dim], the spans' rows one after another; out: the same shape.
// Token t of a span attends to its own cache's positions 0 .. start + t. Scores are scaled
// by 1/sqrt(head_dim). Parallel over all (row, head) pairs of the batch; each pair is
// computed by one thread in a fixed order that depends only on its query and the cache
// positions it sees, so a row's result is bit-identical whatever the batch, the chunking of
// the prompt, the block size or the thread count.
void PagedCausalAttention(const float* q, const AttentionSpan* spans, int64_t num_spans,
                          const AttentionShape& shape, float* out);

// A contiguous cache: keys, values [start + tokens, kv_heads, head_dim], including these
// tokens; q, out [tokens, heads, head_dim]. The one-span, one-block case of the above.
void CausalAttention(const float* q, int64_t tokens, int64_t start, const float* keys,
                     const float* values, const AttentionShape& shape, float* out);

}  // namespace nibble::kernels::cpu
