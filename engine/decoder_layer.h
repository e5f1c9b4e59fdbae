// One decoder layer of the LLaMA family on the CPU, in fp32: the piece the CPU backend runs
// per layer and the AWQ search runs to see each linear's real inputs.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/model_config.h"
#include "engine/model_weights.h"
#include "kernels/cpu/attention.h"

namespace nibble::engine {

// The inputs the layer's linears saw, appended per call (for calibration): the normed input
// of q/k/v, the attention output (o's input), the normed input of gate/up, and
// silu(gate)·up (down's input). Null members are not captured.
struct LayerInputCapture {
  std::vector<float>* qkv_input = nullptr;   // [tokens, hidden]
  std::vector<float>* o_input = nullptr;     // [tokens, q_dim]
  std::vector<float>* ffn_input = nullptr;   // [tokens, hidden]
  std::vector<float>* down_input = nullptr;  // [tokens, intermediate]
};

// RoPE inverse frequencies for a step that ends with `length` tokens in the cache (dynamic
// NTK picks its base from that length, for every token of the step, as HF does).
std::vector<float> RopeInverseFrequenciesForLength(const ModelConfig& config, int64_t length);

// One sequence's tokens in a batched layer call: positions start .. start + tokens - 1,
// rotated with `inv_freq` (its own, from its own length), and this layer's cache in blocks.
// The new tokens' keys and values are written into `kv` at their positions.
struct LayerSpan {
  int64_t tokens = 0;
  int64_t start = 0;
  const float* inv_freq = nullptr;  // [head_dim / 2]
  kernels::cpu::PagedKv kv;
};

// Runs `layer` on x[Σ tokens, hidden] in place, the spans' rows one after another. The
// linears see all rows at once (the weights are read once per call); RoPE and attention go
// per sequence. Every row's result depends only on its own sequence, never on the batch.
void RunDecoderLayerBatch(const ModelConfig& config, const LayerWeights& layer,
                          const LayerSpan* spans, int64_t num_spans, float* x,
                          LayerInputCapture* capture = nullptr);

// One sequence with a contiguous cache: runs `layer` on x[n, hidden] in place, for
// positions start .. start + n - 1. `keys` and `values` are this layer's cache,
// [capacity, kv_dim] from position 0; the new tokens' keys and values are written at `start`.
void RunDecoderLayer(const ModelConfig& config, const LayerWeights& layer, int64_t n,
                     int64_t start, const std::vector<float>& inv_freq, float* keys,
                     float* values, float* x, LayerInputCapture* capture = nullptr);

}  // namespace nibble::engine
