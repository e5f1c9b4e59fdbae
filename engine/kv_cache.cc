#include "engine/kv_cache.h"

#include <algorithm>
#include <utility>

namespace nibble::engine {

KvBlockAllocator::KvBlockAllocator(int64_t total_blocks, int64_t chunk_blocks,
                                   std::function<absl::Status(int64_t)> grow)
    : total_(total_blocks),
      chunk_(chunk_blocks <= 0 ? total_blocks : chunk_blocks),
      grow_(std::move(grow)) {}

std::optional<int32_t> KvBlockAllocator::Allocate() {
  if (free_.empty()) {
    if (grown_ >= total_) return std::nullopt;
    const int64_t target = std::min(total_, grown_ + chunk_);
    if (!grow_(target).ok()) return std::nullopt;
    // Pushed in reverse so that the lowest new id comes out first.
    for (int64_t id = target - 1; id >= grown_; --id) free_.push_back(static_cast<int32_t>(id));
    grown_ = target;
  }
  const int32_t id = free_.back();
  free_.pop_back();
  return id;
}

void KvBlockAllocator::Free(std::vector<int32_t>& blocks) { FreeTail(blocks, 0); }

void KvBlockAllocator::FreeTail(std::vector<int32_t>& blocks, int64_t keep) {
  while (static_cast<int64_t>(blocks.size()) > keep) {
    free_.push_back(blocks.back());
    blocks.pop_back();
  }
}

}  // namespace nibble::engine
