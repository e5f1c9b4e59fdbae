#include "engine/generator.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace nibble::engine {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

absl::Status ValidateGenerationInputs(const std::vector<int32_t>& prompt_ids,
                                      int32_t max_tokens, const SamplingParams& sampling) {
  NIBBLE_RETURN_IF_ERROR(ValidateSamplingParams(sampling));
  if (prompt_ids.empty()) {
    return absl::InvalidArgumentError("the prompt has no tokens (not even BOS)");
  }
  if (max_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 0, got ", max_tokens));
  }
  return absl::OkStatus();
}

absl::StatusOr<GenerateResult> Generate(Model& model, const GenerateRequest& request,
                                        const TextCallback& on_text) {
  NIBBLE_RETURN_IF_ERROR(
      ValidateGenerationInputs(request.prompt_ids, request.max_tokens, request.sampling));
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
  Completion completion(model.tokenizer(), request.stop_token_ids, request.stop_strings,
                        request.max_tokens, context);
  std::vector<int32_t> all_ids = request.prompt_ids;
  const auto decode_start = std::chrono::steady_clock::now();
  auto emit = [&](const std::string& delta) {
    if (delta.empty()) return;
    result.text += delta;
    if (on_text) on_text(delta);
  };
  while (true) {
    const int32_t token = sampler.Sample(logits, all_ids);
    all_ids.push_back(token);
    Completion::Step step = completion.Accept(token, sequence->length());
    emit(step.text);
    if (step.finish) {
      result.finish_reason = *step.finish;
      break;
    }
    const int32_t next[1] = {token};
    NIBBLE_RETURN_IF_ERROR(backend.Forward(*sequence, next, LogitsFor::kLastPosition, logits));
  }
  emit(completion.Finish());
  result.output_ids = completion.output_ids();
  result.decode_seconds = SecondsSince(decode_start);
  return result;
}

}  // namespace nibble::engine
