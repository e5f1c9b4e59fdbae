// Causal grouped-query attention of one sequence against its KV cache, fp32.
#pragma once

#include <cstdint>

namespace nibble::kernels::cpu {

struct AttentionShape {
  int64_t heads;     // query heads
  int64_t kv_heads;  // key/value heads; heads % kv_heads == 0 (query head h reads h / group)
  int64_t head_dim;
};

// q: [tokens, heads, head_dim] for positions start .. start + tokens - 1.
// keys, values: [start + tokens, kv_heads, head_dim], the cache including these tokens.
// out: [tokens, heads, head_dim]. Token t attends to cache positions 0 .. start + t.
// Scores are scaled by 1/sqrt(head_dim). Parallel over (token, head) pairs.
void CausalAttention(const float* q, int64_t tokens, int64_t start, const float* keys,
                     const float* values, const AttentionShape& shape, float* out);

}  // namespace nibble::kernels::cpu
