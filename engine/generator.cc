#include "engine/generator.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "engine/text_stream.h"

namespace nibble::engine {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStopToken: return "stop";
    case FinishReason::kStopString: return "stop_string";
    case FinishReason::kContextFull: return "context_full";
  }
  return "unknown";
}

absl::StatusOr<GenerateResult> Generate(Model& model, const GenerateRequest& request,
                                        const TextCallback& on_text) {
  NIBBLE_RETURN_IF_ERROR(ValidateSamplingParams(request.sampling));
  if (request.prompt_ids.empty()) {
    return absl::InvalidArgumentError("the prompt has no tokens (not even BOS)");
  }
  if (request.max_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 0, got ", request.max_tokens));
  }
  const int64_t context = model.config().max_position_embeddings;
  const int64_t prompt_length = static_cast<int64_t>(request.prompt_ids.size());
  if (prompt_length > context) {
    return absl::OutOfRangeError(absl::StrCat("the prompt has ", prompt_length,
                                              " tokens, more than the model's context of ",
                                              context));
  }

  Backend& backend = model.backend();
  const int64_t capacity = std::min<int64_t>(context, prompt_length + request.max_tokens);
  NIBBLE_ASSIGN_OR_RETURN(auto sequence, backend.NewSequence(capacity));
  GenerateResult result;
  if (request.max_tokens == 0) return result;

  std::vector<float> logits;
  const auto prefill_start = std::chrono::steady_clock::now();
  NIBBLE_RETURN_IF_ERROR(
      backend.Forward(*sequence, request.prompt_ids, LogitsFor::kLastPosition, logits));
  result.prefill_seconds = SecondsSince(prefill_start);

  Sampler sampler(request.sampling);
  TextStream stream(model.tokenizer(), request.stop_strings);
  std::vector<int32_t> all_ids = request.prompt_ids;
  const auto decode_start = std::chrono::steady_clock::now();
  auto emit = [&](const std::string& delta) {
    if (delta.empty()) return;
    result.text += delta;
    if (on_text) on_text(delta);
  };
  while (true) {
    const int32_t token = sampler.Sample(logits, all_ids);
    result.output_ids.push_back(token);
    all_ids.push_back(token);
    if (std::find(request.stop_token_ids.begin(), request.stop_token_ids.end(), token) !=
        request.stop_token_ids.end()) {
      result.finish_reason = FinishReason::kStopToken;
      break;
    }
    emit(stream.Push(token));
    if (stream.stopped()) {
      result.finish_reason = FinishReason::kStopString;
      break;
    }
    if (static_cast<int32_t>(result.output_ids.size()) >= request.max_tokens) {
      result.finish_reason = FinishReason::kLength;
      break;
    }
    if (sequence->length() >= context) {
      result.finish_reason = FinishReason::kContextFull;
      break;
    }
    const int32_t next[1] = {token};
    NIBBLE_RETURN_IF_ERROR(backend.Forward(*sequence, next, LogitsFor::kLastPosition, logits));
  }
  emit(stream.Finish());
  result.decode_seconds = SecondsSince(decode_start);
  return result;
}

}  // namespace nibble::engine
