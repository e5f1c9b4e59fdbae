// The engine's bookkeeping of the backend's KV block pool: which block ids are free, and how
// far the pool has been grown. The memory itself belongs to the backend
// (Backend::ConfigureKvCache); this hands out ids. Scheduler thread only; not thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "absl/status/status.h"

namespace nibble::engine {

// Blocks needed for `tokens` tokens in blocks of `block_seq_len`.
inline int64_t BlocksForTokens(int64_t tokens, int64_t block_seq_len) {
  return (tokens + block_seq_len - 1) / block_seq_len;
}

class KvBlockAllocator {
 public:
  // `grow(n)` makes blocks 0 .. n - 1 usable (the backend's GrowKvCache); it is called with
  // `chunk_blocks` more each time the free list runs dry (chunk_blocks <= 0: all at once).
  KvBlockAllocator(int64_t total_blocks, int64_t chunk_blocks,
                   std::function<absl::Status(int64_t)> grow);

  // A free block id, or nullopt when every block of the pool is in use (or growing failed).
  std::optional<int32_t> Allocate();
  // Returns `blocks` to the free list and clears it.
  void Free(std::vector<int32_t>& blocks);
  // Keeps the first `keep` blocks of `blocks` and frees the rest.
  void FreeTail(std::vector<int32_t>& blocks, int64_t keep);

  int64_t total() const { return total_; }
  int64_t used() const { return grown_ - static_cast<int64_t>(free_.size()); }
  int64_t available() const { return total_ - used(); }  // free or not yet grown
  int64_t grown() const { return grown_; }

 private:
  int64_t total_;
  int64_t chunk_;
  std::function<absl::Status(int64_t)> grow_;
  int64_t grown_ = 0;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
};

}  // namespace nibble::engine
