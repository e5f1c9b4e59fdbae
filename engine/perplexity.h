// Perplexity under nibble's stated protocol (the one `nibble perplexity` prints): the ids
// (already tokenized once, BOS first) are cut into consecutive windows of `window` tokens, a
// last partial window is dropped, each window runs from an empty cache, and the loss is
// averaged over every token but the first of each window; perplexity = exp(mean loss).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace nibble::engine {

struct PerplexityResult {
  int64_t tokens = 0;     // ids given
  int64_t windows = 0;    // windows evaluated
  int64_t predicted = 0;  // tokens whose loss was averaged: windows * (window - 1)
  double mean_nll = 0;
  double perplexity = 0;
};

// `on_window(done, total)` reports progress. Errors: window < 2, fewer ids than one window.
absl::StatusOr<PerplexityResult> ComputePerplexity(
    Backend& backend, const std::vector<int32_t>& ids, int64_t window,
    const std::function<void(int64_t, int64_t)>& on_window = nullptr);

}  // namespace nibble::engine
