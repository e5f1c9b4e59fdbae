#include "engine/cpu_backend.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/decoder_layer.h"
#include "kernels/cpu/ops.h"

namespace nibble::engine {
namespace {

namespace k = kernels::cpu;

class CpuSequence final : public SequenceState {
 public:
  CpuSequence(int64_t layers, int64_t kv_dim, int64_t capacity)
      : capacity_(capacity), kv_dim_(kv_dim) {
    keys_.resize(layers, std::vector<float>(static_cast<size_t>(capacity * kv_dim)));
    values_.resize(layers, std::vector<float>(static_cast<size_t>(capacity * kv_dim)));
  }
  int64_t length() const override { return length_; }
  int64_t capacity() const override { return capacity_; }
  void Truncate(int64_t length) override {
    if (length >= 0 && length < length_) length_ = length;
  }

  float* keys(int64_t layer, int64_t position) { return keys_[layer].data() + position * kv_dim_; }
  float* values(int64_t layer, int64_t position) {
    return values_[layer].data() + position * kv_dim_;
  }
  void set_length(int64_t length) { length_ = length; }

 private:
  int64_t capacity_;
  int64_t kv_dim_;
  int64_t length_ = 0;
  std::vector<std::vector<float>> keys_;  // [layer][position * kv_dim]
  std::vector<std::vector<float>> values_;
};

class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelConfig& config, ModelWeights weights)
      : config_(config), weights_(std::move(weights)) {}

  std::string Name() const override { return "cpu"; }
  int64_t vocab_size() const override { return config_.vocab_size; }

  absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int64_t capacity) override {
    if (capacity <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("sequence capacity ", capacity,
                                                     " must be positive"));
    }
    return std::make_unique<CpuSequence>(config_.num_layers, config_.kv_dim(), capacity);
  }

  absl::Status Forward(SequenceState& state, std::span<const int32_t> tokens, LogitsFor which,
                       std::vector<float>& logits) override {
    auto* sequence = dynamic_cast<CpuSequence*>(&state);
    if (sequence == nullptr) {
      return absl::InvalidArgumentError("sequence was not made by the CPU backend");
    }
    if (tokens.empty()) return absl::InvalidArgumentError("no tokens to run");
    for (int32_t token : tokens) {
      if (token < 0 || token >= config_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", token,
                                                       " is outside the vocabulary of ",
                                                       config_.vocab_size));
      }
    }
    const int64_t start = sequence->length();
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (start + n > sequence->capacity()) {
      return absl::OutOfRangeError(absl::StrCat("sequence of ", start + n,
                                                " tokens exceeds its capacity of ",
                                                sequence->capacity()));
    }
    Run(*sequence, tokens, which, logits);
    sequence->set_length(start + n);
    return absl::OkStatus();
  }

 private:
  void Run(CpuSequence& sequence, std::span<const int32_t> tokens, LogitsFor which,
           std::vector<float>& logits) const {
    const int64_t hidden = config_.hidden_size;
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int64_t start = sequence.length();
    const float eps = static_cast<float>(config_.rms_norm_eps);
    std::vector<float> x(n * hidden), normed(n * hidden);
    for (int64_t t = 0; t < n; ++t) weights_.embedding.Lookup(tokens[t], x.data() + t * hidden);
    const std::vector<float> inv_freq = RopeInverseFrequenciesForLength(config_, start + n);
    for (int64_t l = 0; l < config_.num_layers; ++l) {
      RunDecoderLayer(config_, weights_.layers[l], n, start, inv_freq, sequence.keys(l, 0),
                      sequence.values(l, 0), x.data());
    }

    const int64_t first = which == LogitsFor::kAllPositions ? 0 : n - 1;
    const int64_t rows = n - first;
    k::RmsNorm(x.data() + first * hidden, weights_.final_norm.data(), rows, hidden, eps,
               normed.data());
    logits.resize(static_cast<size_t>(rows * config_.vocab_size));
    weights_.lm_head->Forward(normed.data(), rows, logits.data());
  }

  ModelConfig config_;
  ModelWeights weights_;
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(const ModelConfig& config, ModelWeights weights) {
  return std::make_unique<CpuBackend>(config, std::move(weights));
}

}  // namespace nibble::engine
