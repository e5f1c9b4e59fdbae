// Generation of one sequence: prefill the prompt, then decode token by token, streaming text.
// (The serving issue adds a scheduler that batches many such sequences; this is the
// single-sequence path the CLI and the tests use, and the reference for batching.)
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/completion.h"  // FinishReason
#include "engine/model.h"
#include "engine/sampler.h"

namespace nibble::engine {

struct GenerateRequest {
  std::vector<int32_t> prompt_ids;  // non-empty; usually starts with BOS
  int32_t max_tokens = 256;
  SamplingParams sampling;
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop_strings;
};

struct GenerateResult {
  std::vector<int32_t> output_ids;  // generated ids, including a final stop token
  std::string text;                 // their text, without a stop token's or stop string's
  FinishReason finish_reason = FinishReason::kLength;
  double prefill_seconds = 0;
  double decode_seconds = 0;  // from the first generated token to the last
};

using TextCallback = std::function<void(std::string_view delta)>;

// The checks every generation request passes first (Generate, the serving engine):
// InvalidArgument for invalid sampling values, an empty prompt, max_tokens < 0.
absl::Status ValidateGenerationInputs(const std::vector<int32_t>& prompt_ids,
                                      int32_t max_tokens, const SamplingParams& sampling);

// Runs on the calling thread. Errors: invalid sampling values, an empty prompt, max_tokens
// < 0, a prompt longer than the model's context, a token outside the vocabulary.
absl::StatusOr<GenerateResult> Generate(Model& model, const GenerateRequest& request,
                                        const TextCallback& on_text);

}  // namespace nibble::engine
