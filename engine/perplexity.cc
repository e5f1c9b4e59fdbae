#include "engine/perplexity.h"

#include <cmath>
#include <span>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace nibble::engine {

absl::StatusOr<PerplexityResult> ComputePerplexity(
    Backend& backend, const std::vector<int32_t>& ids, int64_t window,
    const std::function<void(int64_t, int64_t)>& on_window) {
  if (window < 2) {
    return absl::InvalidArgumentError(absl::StrCat("window length ", window, " must be >= 2"));
  }
  const int64_t total = static_cast<int64_t>(ids.size()) / window;
  if (total == 0) {
    return absl::InvalidArgumentError(absl::StrCat("the text has ", ids.size(),
                                                   " tokens, fewer than one window of ",
                                                   window));
  }
  const int64_t vocab = backend.vocab_size();
  PerplexityResult result;
  result.tokens = static_cast<int64_t>(ids.size());
  result.windows = total;
  double nll_sum = 0;
  std::vector<float> logits;
  for (int64_t w = 0; w < total; ++w) {
    NIBBLE_ASSIGN_OR_RETURN(auto sequence, backend.NewSequence(window));
    std::span<const int32_t> tokens(ids.data() + w * window, static_cast<size_t>(window));
    NIBBLE_RETURN_IF_ERROR(backend.Forward(*sequence, tokens, LogitsFor::kAllPositions, logits));
    for (int64_t t = 0; t + 1 < window; ++t) {
      // -log softmax(logits[t])[target], in double with the max subtracted.
      const float* row = logits.data() + t * vocab;
      double max_logit = row[0];
      for (int64_t v = 1; v < vocab; ++v) max_logit = std::max<double>(max_logit, row[v]);
      double sum = 0;
      for (int64_t v = 0; v < vocab; ++v) sum += std::exp(row[v] - max_logit);
      nll_sum += std::log(sum) + max_logit - row[tokens[t + 1]];
      ++result.predicted;
    }
    if (on_window) on_window(w + 1, total);
  }
  result.mean_nll = nll_sum / static_cast<double>(result.predicted);
  result.perplexity = std::exp(result.mean_nll);
  return result;
}

}  // namespace nibble::engine
