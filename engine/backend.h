// The seam between the engine and the hardware that runs the forward pass. The CPU backend
// (cpu_backend.h) is the reference; the CUDA backend implements the same interface.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/sample_row.h"

namespace nibble::engine {

// The KV cache and position of one token sequence. Owned by the caller; used with the
// backend that made it.
class SequenceState {
 public:
  virtual ~SequenceState() = default;
  virtual int64_t length() const = 0;    // tokens in the cache
  virtual int64_t capacity() const = 0;  // tokens it can hold
  // Forgets the tokens past `length` (for reuse of a common prefix); length <= length().
  virtual void Truncate(int64_t length) = 0;
};

enum class LogitsFor { kLastPosition, kAllPositions };

// One sequence's part of a batched forward over the paged KV cache (ForwardBatch).
struct BatchSpan {
  std::span<const int32_t> tokens;  // non-empty: 1 for a decode step, k for a prefill chunk
  int64_t start = 0;                // tokens already in the cache (their positions follow)
  // Ids of the pool blocks holding positions 0 .. start + tokens.size() - 1, in order
  // (at least ceil((start + tokens.size()) / block_seq_len) of them; extra ones are unused).
  std::span<const int32_t> block_table;
  bool logits = false;  // compute the logits of the span's last token
  // With `logits`: the backend picks the next token itself, by the rule of
  // kernels/cpu/sampling.h with `sampling` (greedy, or sampled with the caller's uniform draw
  // inside) and `penalty_ids`; its id goes to sampled_out instead of a row to logits_out, so
  // that a GPU backend keeps the logits on the device.
  bool sample = false;
  kernels::SampleRowParams sampling = {};
  // With `sample`: the distinct ids the repetition penalty applies to (Sampler::PenaltyIds);
  // read during ForwardBatch only.
  std::span<const int32_t> penalty_ids = {};
};

// Not thread-safe: one thread drives a backend (the engine's scheduler thread, or the CLI).
//
// Two ways to keep a KV cache: a SequenceState (one sequence, its own memory; the CLI,
// perplexity, quantization, tests), or the backend's block pool (ConfigureKvCache), shared by
// the serving engine's sequences through block tables, which the engine allocates. Both run
// the same layer and attention code.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string Name() const = 0;
  virtual int64_t vocab_size() const = 0;

  // An empty sequence able to hold `capacity` tokens.
  virtual absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int64_t capacity) = 0;

  // Appends `tokens` to `sequence` and computes their logits: [tokens.size(), vocab] for
  // kAllPositions, [vocab] for kLastPosition, written to `logits` (resized).
  // Errors: an empty token list, a token outside the vocabulary (InvalidArgument), a
  // sequence that would exceed its capacity (OutOfRange). On error the sequence is unchanged.
  virtual absl::Status Forward(SequenceState& sequence, std::span<const int32_t> tokens,
                               LogitsFor which, std::vector<float>& logits) = 0;

  // --- The paged KV cache of the serving engine. ---

  // Free device memory in bytes, for sizing the pool; nullopt where the engine must use a
  // configured budget instead (the CPU).
  virtual std::optional<int64_t> FreeMemoryBytes() const = 0;
  // Bytes one block of `block_seq_len` tokens takes (keys and values of every layer).
  virtual int64_t KvBlockBytes(int32_t block_seq_len) const = 0;
  // Makes a pool of `num_blocks` blocks (ids 0 .. num_blocks - 1), replacing any earlier one.
  // Memory may be committed lazily as blocks are first written (GrowKvCache says how far).
  // Errors: non-positive values, memory that cannot be had (ResourceExhausted).
  virtual absl::Status ConfigureKvCache(int64_t num_blocks, int32_t block_seq_len) = 0;
  // Makes blocks 0 .. num_blocks - 1 usable (the engine grows the pool cache_chunk_size
  // blocks at a time, as it needs them). Errors: more than the configured pool.
  virtual absl::Status GrowKvCache(int64_t num_blocks) = 0;

  // Runs every span in one pass (the tokens of all spans form one activation matrix for the
  // linears; RoPE and attention per span, over its own blocks; dynamic NTK RoPE takes its
  // base from each span's own length start + tokens). Writes the spans' keys and values into
  // their blocks and the logits of each span with `logits` set to `logits_out`,
  // [spans with logits, vocab] in span order. A span's results are bit-identical whatever
  // the other spans are. Errors (nothing is written): no pool, no spans, an empty span, a
  // token outside the vocabulary, a block table too short or naming a block outside the
  // usable pool.
  // `sampled_out` gets, in span order, the token each span with `logits` and `sample` picks
  // (kernels/cpu/sampling.h's SampleRow on its logits: the same token on every backend
  // given the same logits and draw, up to rounding where a cumulative sum meets the draw's
  // target, kernels/cuda/sampling.h); those spans have no row in `logits_out`.
  virtual absl::Status ForwardBatch(std::span<const BatchSpan> spans,
                                    std::vector<float>& logits_out,
                                    std::vector<int32_t>& sampled_out) = 0;
  // For callers without `sample` spans.
  absl::Status ForwardBatch(std::span<const BatchSpan> spans, std::vector<float>& logits_out) {
    std::vector<int32_t> sampled_out;
    return ForwardBatch(spans, logits_out, sampled_out);
  }
};

// The argument checks every backend makes, with the same messages: InvalidArgument naming
// the token and its index when an id is outside [0, vocab).
absl::Status CheckTokenIds(std::span<const int32_t> tokens, int64_t vocab);
// ForwardBatch's checks of its spans against a pool whose blocks 0 .. usable_blocks - 1 of
// `block_seq_len` tokens are usable (the errors ForwardBatch documents, naming the span).
absl::Status CheckBatchSpans(std::span<const BatchSpan> spans, int64_t vocab,
                             int64_t block_seq_len, int64_t usable_blocks);
// For a backend that computes every logits row on the host: `logits` holds one row of `vocab`
// per span with `logits` set, in span order; the rows of `sample` spans are replaced by the
// token kernels::cpu::SampleRow picks from them, in `sampled_out`, and removed from `logits`.
void TakeSampledRows(std::span<const BatchSpan> spans, int64_t vocab, std::vector<float>& logits,
                     std::vector<int32_t>& sampled_out);
// NewSequence's check: InvalidArgument unless capacity > 0.
absl::Status CheckSequenceCapacity(int64_t capacity);
// Forward's checks (the errors it documents) of `tokens` appended to `sequence`.
absl::Status CheckForward(const SequenceState& sequence, std::span<const int32_t> tokens,
                          int64_t vocab);
// ConfigureKvCache's and GrowKvCache's checks.
absl::Status CheckKvCacheShape(int64_t num_blocks, int32_t block_seq_len);
absl::Status CheckKvCacheGrowth(int64_t num_blocks, int64_t pool_blocks);

}  // namespace nibble::engine
