// The seam between the engine and the hardware that runs the forward pass. The CPU backend
// (cpu_backend.h) is the reference; the CUDA backend implements the same interface.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

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

// Not thread-safe: one thread drives a backend (the engine's scheduler thread, or the CLI).
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
};

}  // namespace nibble::engine
