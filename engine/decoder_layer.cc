#include "engine/decoder_layer.h"

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

void RunDecoderLayer(const ModelConfig& config, const LayerWeights& layer, int64_t n,
                     int64_t start, const std::vector<float>& inv_freq, float* keys,
                     float* values, float* x, LayerInputCapture* capture) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_dim = config.q_dim();
  const int64_t kv_dim = config.kv_dim();
  const int64_t ffn = config.intermediate_size;
  const int64_t d = config.head_dim;
  const float eps = static_cast<float>(config.rms_norm_eps);
  LayerInputCapture none;
  if (capture == nullptr) capture = &none;

  std::vector<float> normed(n * hidden), q(n * q_dim), attention(n * q_dim),
      projected(n * hidden), gate(n * ffn), up(n * ffn);
  k::RmsNorm(x, layer.attention_norm.data(), n, hidden, eps, normed.data());
  Append(capture->qkv_input, normed);
  layer.q_proj->Forward(normed.data(), n, q.data());
  // Keys and values go straight into the cache at their positions.
  float* new_keys = keys + start * kv_dim;
  float* new_values = values + start * kv_dim;
  layer.k_proj->Forward(normed.data(), n, new_keys);
  layer.v_proj->Forward(normed.data(), n, new_values);
  for (int64_t t = 0; t < n; ++t) {
    k::RopeRotateHalf(q.data() + t * q_dim, config.num_heads, d, start + t, inv_freq.data());
    k::RopeRotateHalf(new_keys + t * kv_dim, config.num_kv_heads, d, start + t,
                      inv_freq.data());
  }
  const k::AttentionShape shape{config.num_heads, config.num_kv_heads, d};
  k::CausalAttention(q.data(), n, start, keys, values, shape, attention.data());
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

}  // namespace nibble::engine
