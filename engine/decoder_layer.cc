#include "engine/decoder_layer.h"

#include <algorithm>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/ops.h"

namespace nibble::engine {
namespace k = kernels::cpu;

namespace {

void Append(std::vector<float>* sink, const std::vector<float>& values) {
  if (sink) sink->insert(sink->end(), values.begin(), values.end());
}

}  // namespace

std::vector<float> RopeInverseFrequenciesForLength(const ModelConfig& config, int64_t length) {
  std::vector<float> inv_freq(config.head_dim / 2);
  k::RopeInverseFrequencies(config.RopeBaseForLength(length), config.head_dim, inv_freq.data());
  if (config.rope_scaling == RopeScaling::kLinear) {
    for (float& f : inv_freq) f = static_cast<float>(f / config.rope_scaling_factor);
  }
  return inv_freq;
}

void RunDecoderLayerBatch(const ModelConfig& config, const LayerWeights& layer,
                          const LayerSpan* spans, int64_t num_spans, float* x,
                          LayerInputCapture* capture) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_dim = config.q_dim();
  const int64_t kv_dim = config.kv_dim();
  const int64_t ffn = config.intermediate_size;
  const int64_t d = config.head_dim;
  const float eps = static_cast<float>(config.rms_norm_eps);
  LayerInputCapture none;
  if (capture == nullptr) capture = &none;
  int64_t n = 0;
  for (int64_t s = 0; s < num_spans; ++s) n += spans[s].tokens;

  std::vector<float> normed(n * hidden), q(n * q_dim), new_keys(n * kv_dim),
      new_values(n * kv_dim), attention(n * q_dim), projected(n * hidden), gate(n * ffn),
      up(n * ffn);
  k::RmsNorm(x, layer.attention_norm.data(), n, hidden, eps, normed.data());
  Append(capture->qkv_input, normed);
  layer.q_proj->Forward(normed.data(), n, q.data());
  layer.k_proj->Forward(normed.data(), n, new_keys.data());
  layer.v_proj->Forward(normed.data(), n, new_values.data());
  std::vector<k::AttentionSpan> attention_spans(static_cast<size_t>(num_spans));
  for (int64_t s = 0, row = 0; s < num_spans; ++s) {
    const LayerSpan& span = spans[s];
    for (int64_t t = 0; t < span.tokens; ++t, ++row) {
      const int64_t position = span.start + t;
      k::RopeRotateHalf(q.data() + row * q_dim, config.num_heads, d, position, span.inv_freq);
      k::RopeRotateHalf(new_keys.data() + row * kv_dim, config.num_kv_heads, d, position,
                        span.inv_freq);
      const int64_t offset = span.kv.RowOffset(position, kv_dim);
      std::copy_n(new_keys.data() + row * kv_dim, kv_dim, span.kv.keys + offset);
      std::copy_n(new_values.data() + row * kv_dim, kv_dim, span.kv.values + offset);
    }
    attention_spans[s] = {span.tokens, span.start, span.kv};
  }
  const k::AttentionShape shape{config.num_heads, config.num_kv_heads, d};
  k::PagedCausalAttention(q.data(), attention_spans.data(), num_spans, shape, attention.data());
  Append(capture->o_input, attention);
  layer.o_proj->Forward(attention.data(), n, projected.data());
  k::AddInPlace(x, projected.data(), n * hidden);

  k::RmsNorm(x, layer.ffn_norm.data(), n, hidden, eps, normed.data());
  Append(capture->ffn_input, normed);
  layer.gate_proj->Forward(normed.data(), n, gate.data());
  layer.up_proj->Forward(normed.data(), n, up.data());
  k::SiluMulInPlace(gate.data(), up.data(), n * ffn);
  Append(capture->down_input, gate);
  layer.down_proj->Forward(gate.data(), n, projected.data());
  k::AddInPlace(x, projected.data(), n * hidden);
}

void RunDecoderLayer(const ModelConfig& config, const LayerWeights& layer, int64_t n,
                     int64_t start, const std::vector<float>& inv_freq, float* keys,
                     float* values, float* x, LayerInputCapture* capture) {
  const int32_t only_block = 0;
  LayerSpan span;
  span.tokens = n;
  span.start = start;
  span.inv_freq = inv_freq.data();
  span.kv.keys = keys;
  span.kv.values = values;
  span.kv.block_table = &only_block;
  span.kv.block_seq_len = start + n;
  RunDecoderLayerBatch(config, layer, &span, 1, x, capture);
}

}  // namespace nibble::engine
