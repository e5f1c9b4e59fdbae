#include "engine/cpu_backend.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "engine/decoder_layer.h"
#include "engine/status_macros.h"
#include "kernels/cpu/ops.h"

namespace nibble::engine {
namespace {

namespace k = kernels::cpu;

// A KV block holds, for `block_seq_len` positions, every layer's keys and values:
// [layer][keys | values][block_seq_len][kv_dim]. A sequence of its own (NewSequence) is one
// such block as long as its capacity, so both paths hand the same PagedKv views to the same
// layer code.
int64_t LayerKeysOffset(int64_t layer, int64_t block_seq_len, int64_t kv_dim) {
  return 2 * layer * block_seq_len * kv_dim;
}

class CpuSequence final : public SequenceState {
 public:
  CpuSequence(int64_t layers, int64_t kv_dim, int64_t capacity)
      : capacity_(capacity), storage_(static_cast<size_t>(2 * layers * capacity * kv_dim)) {}
  int64_t length() const override { return length_; }
  int64_t capacity() const override { return capacity_; }
  void Truncate(int64_t length) override {
    if (length >= 0 && length < length_) length_ = length;
  }

  float* data() { return storage_.data(); }
  void set_length(int64_t length) { length_ = length; }

 private:
  int64_t capacity_;
  int64_t length_ = 0;
  std::vector<float> storage_;  // one block of `capacity` positions
};

// What Run needs of one sequence, whichever kind of cache it lives in.
struct SequenceView {
  std::span<const int32_t> tokens;
  int64_t start = 0;
  float* cache = nullptr;  // block 0 of this sequence's cache
  const int32_t* block_table = nullptr;
  int64_t block_seq_len = 0;
  int64_t block_stride = 0;
  enum class Logits { kNone, kLast, kAll } logits = Logits::kNone;
};

class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelConfig& config, ModelWeights weights)
      : config_(config), weights_(std::move(weights)) {}

  std::string Name() const override { return "cpu"; }
  int64_t vocab_size() const override { return config_.vocab_size; }

  absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int64_t capacity) override {
    NIBBLE_RETURN_IF_ERROR(CheckSequenceCapacity(capacity));
    return std::make_unique<CpuSequence>(config_.num_layers, config_.kv_dim(), capacity);
  }

  absl::Status Forward(SequenceState& state, std::span<const int32_t> tokens, LogitsFor which,
                       std::vector<float>& logits) override {
    auto* sequence = dynamic_cast<CpuSequence*>(&state);
    if (sequence == nullptr) {
      return absl::InvalidArgumentError("sequence was not made by the CPU backend");
    }
    NIBBLE_RETURN_IF_ERROR(CheckForward(*sequence, tokens, config_.vocab_size));
    const int64_t start = sequence->length();
    const int64_t n = static_cast<int64_t>(tokens.size());
    static constexpr int32_t kOnlyBlock = 0;
    SequenceView view;
    view.tokens = tokens;
    view.start = start;
    view.cache = sequence->data();
    view.block_table = &kOnlyBlock;
    view.block_seq_len = sequence->capacity();
    view.logits = which == LogitsFor::kAllPositions ? SequenceView::Logits::kAll
                                                    : SequenceView::Logits::kLast;
    Run(std::span<const SequenceView>(&view, 1), logits);
    sequence->set_length(start + n);
    return absl::OkStatus();
  }

  std::optional<int64_t> FreeMemoryBytes() const override { return std::nullopt; }

  int64_t KvBlockBytes(int32_t block_seq_len) const override {
    return BlockFloats(block_seq_len) * static_cast<int64_t>(sizeof(float));
  }

  absl::Status ConfigureKvCache(int64_t num_blocks, int32_t block_seq_len) override {
    NIBBLE_RETURN_IF_ERROR(CheckKvCacheShape(num_blocks, block_seq_len));
    pool_.reset();
    pool_blocks_ = usable_blocks_ = 0;
    const int64_t floats = num_blocks * BlockFloats(block_seq_len);
    // Not value-initialized: the pages are committed when blocks are first written, so the
    // pool grows in memory as the engine grows its usable part.
    pool_.reset(new (std::nothrow) float[static_cast<size_t>(floats)]);
    if (pool_ == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "cannot allocate a KV cache of ", num_blocks, " blocks (", floats * sizeof(float),
          " bytes)"));
    }
    pool_blocks_ = num_blocks;
    block_seq_len_ = block_seq_len;
    return absl::OkStatus();
  }

  absl::Status GrowKvCache(int64_t num_blocks) override {
    NIBBLE_RETURN_IF_ERROR(CheckKvCacheGrowth(num_blocks, pool_blocks_));
    usable_blocks_ = std::max(usable_blocks_, num_blocks);
    return absl::OkStatus();
  }

  absl::Status ForwardBatch(std::span<const BatchSpan> spans, std::vector<float>& logits_out,
                            std::vector<int32_t>& sampled_out) override {
    if (pool_ == nullptr) {
      return absl::FailedPreconditionError("ForwardBatch before ConfigureKvCache");
    }
    NIBBLE_RETURN_IF_ERROR(CheckBatchSpans(spans, config_.vocab_size, block_seq_len_,
                                           usable_blocks_));
    std::vector<SequenceView> views(spans.size());
    for (size_t s = 0; s < spans.size(); ++s) {
      const BatchSpan& span = spans[s];
      SequenceView& view = views[s];
      view.tokens = span.tokens;
      view.start = span.start;
      view.cache = pool_.get();
      view.block_table = span.block_table.data();
      view.block_seq_len = block_seq_len_;
      view.block_stride = BlockFloats(block_seq_len_);
      view.logits = span.logits ? SequenceView::Logits::kLast : SequenceView::Logits::kNone;
    }
    Run(views, logits_out);
    TakeSampledRows(spans, config_.vocab_size, logits_out, sampled_out);
    return absl::OkStatus();
  }

 private:
  int64_t BlockFloats(int64_t block_seq_len) const {
    return 2 * config_.num_layers * block_seq_len * config_.kv_dim();
  }

  // The forward pass of validated sequences: all their tokens in one [N, hidden] matrix.
  void Run(std::span<const SequenceView> views, std::vector<float>& logits) const {
    const int64_t hidden = config_.hidden_size;
    const int64_t kv_dim = config_.kv_dim();
    const float eps = static_cast<float>(config_.rms_norm_eps);
    int64_t n = 0;
    for (const SequenceView& view : views) n += static_cast<int64_t>(view.tokens.size());
    std::vector<float> x(n * hidden);
    std::vector<std::vector<float>> inv_freq(views.size());
    // Rows of x whose logits are wanted, in order.
    std::vector<int64_t> logit_rows;
    for (size_t s = 0, row = 0; s < views.size(); ++s) {
      const SequenceView& view = views[s];
      const int64_t tokens = static_cast<int64_t>(view.tokens.size());
      for (int64_t t = 0; t < tokens; ++t) {
        weights_.embedding.Lookup(view.tokens[t], x.data() + (row + t) * hidden);
        if (view.logits == SequenceView::Logits::kAll ||
            (view.logits == SequenceView::Logits::kLast && t == tokens - 1)) {
          logit_rows.push_back(static_cast<int64_t>(row + t));
        }
      }
      row += tokens;
      inv_freq[s] = RopeInverseFrequenciesForLength(config_, view.start + tokens);
    }
    std::vector<LayerSpan> spans(views.size());
    for (int64_t l = 0; l < config_.num_layers; ++l) {
      for (size_t s = 0; s < views.size(); ++s) {
        const SequenceView& view = views[s];
        LayerSpan& span = spans[s];
        span.tokens = static_cast<int64_t>(view.tokens.size());
        span.start = view.start;
        span.inv_freq = inv_freq[s].data();
        span.kv.keys = view.cache + LayerKeysOffset(l, view.block_seq_len, kv_dim);
        span.kv.values = span.kv.keys + view.block_seq_len * kv_dim;
        span.kv.block_table = view.block_table;
        span.kv.block_seq_len = view.block_seq_len;
        span.kv.block_stride = view.block_stride;
      }
      RunDecoderLayerBatch(config_, weights_.layers[l], spans.data(),
                           static_cast<int64_t>(spans.size()), x.data());
    }

    const int64_t rows = static_cast<int64_t>(logit_rows.size());
    std::vector<float> last(rows * hidden);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(x.data() + logit_rows[r] * hidden, hidden, last.data() + r * hidden);
    }
    k::RmsNorm(last.data(), weights_.final_norm.data(), rows, hidden, eps, last.data());
    logits.resize(static_cast<size_t>(rows * config_.vocab_size));
    if (rows > 0) weights_.lm_head->Forward(last.data(), rows, logits.data());
  }

  ModelConfig config_;
  ModelWeights weights_;
  std::unique_ptr<float[]> pool_;
  int64_t pool_blocks_ = 0;
  int64_t usable_blocks_ = 0;
  int64_t block_seq_len_ = 0;
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(const ModelConfig& config, ModelWeights weights) {
  return std::make_unique<CpuBackend>(config, std::move(weights));
}

}  // namespace nibble::engine
