#include "engine/completion.h"

#include <algorithm>
#include <utility>

namespace nibble::engine {

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStopToken: return "stop";
    case FinishReason::kStopString: return "stop_string";
    case FinishReason::kContextFull: return "context_full";
  }
  return "unknown";
}

Completion::Completion(const Tokenizer& tokenizer, std::vector<int32_t> stop_token_ids,
                       std::vector<std::string> stop_strings, int32_t max_tokens,
                       int64_t context)
    : stop_token_ids_(std::move(stop_token_ids)),
      max_tokens_(max_tokens),
      context_(context),
      stream_(tokenizer, std::move(stop_strings)) {}

Completion::Step Completion::Accept(int32_t token, int64_t cache_length) {
  Step step;
  output_ids_.push_back(token);
  // A stop token ends the generation and shows no text.
  if (std::find(stop_token_ids_.begin(), stop_token_ids_.end(), token) !=
      stop_token_ids_.end()) {
    step.finish = FinishReason::kStopToken;
    return step;
  }
  step.text = stream_.Push(token);
  if (stream_.stopped()) {
    step.finish = FinishReason::kStopString;
  } else if (static_cast<int32_t>(output_ids_.size()) >= max_tokens_) {
    step.finish = FinishReason::kLength;
  } else if (cache_length >= context_) {
    // The next step would run this token at position `context`, past the end.
    step.finish = FinishReason::kContextFull;
  }
  return step;
}

std::string Completion::Finish() { return stream_.Finish(); }

}  // namespace nibble::engine
