// Turns validated wire requests (nibble.v1) into engine requests. Every check names the field
// and the allowed range, so a client can fix its request from the message alone.
//
// Cheap checks come first: the handlers run on gRPC's threads, so a request is refused by its
// sizes (fields, message count, prompt bytes) before its prompt is rendered or tokenized.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/support/status.h>

#include "engine/chat_template.h"
#include "engine/inference_engine.h"
#include "nibble/v1/inference.pb.h"
#include "server/served_model.h"

namespace nibble::server {

// Limits on request fields (beyond the engine's own).
inline constexpr int kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;
inline constexpr size_t kMaxSessionIdBytes = 128;
inline constexpr int kMaxMessages = 4096;
inline constexpr float kMaxTemperature = 100.0f;
inline constexpr float kMaxRepetitionPenalty = 100.0f;
inline constexpr int32_t kDefaultMaxTokens = 256;

// What a request tokenizes: a text, or a conversation rendered with the model's chat template.
struct PromptInput {
  std::string_view text;
  // Non-null: a conversation (then `text` is empty).
  const google::protobuf::RepeatedPtrField<nibble::v1::ChatMessage>* messages = nullptr;
  bool add_bos = true;
};

PromptInput InputOf(const nibble::v1::ChatRequest& wire);
PromptInput InputOf(const nibble::v1::GenerateRequest& wire);
// INVALID_ARGUMENT when the request sets both a text and messages.
grpc::Status InputOf(const nibble::v1::TokenizeRequest& wire, PromptInput* input);

// The ids of `input`: checks the messages (count, roles), renders them, refuses a prompt
// whose PromptWeight is past model.max_prompt_weight() (RESOURCE_EXHAUSTED naming
// session_len) before tokenizing it, then tokenizes.
grpc::Status TokenizePrompt(const PromptInput& input, const ServedModel& model,
                            std::vector<int32_t>* ids);

// A Chat or Generate request (its sampling, session id and prompt input) as an engine
// request. INVALID_ARGUMENT naming the field; RESOURCE_EXHAUSTED for a prompt past
// session_len (in bytes or in tokens). A request without a seed gets a random one
// (request->sampling.seed holds the seed used).
grpc::Status PrepareRequest(const nibble::v1::SamplingParams& sampling,
                            const std::string& session_id, const PromptInput& input,
                            const ServedModel& model, engine::InferenceRequest* request);

// The model's own stops: its stop tokens (EOS and the template's), and for a chat the
// template's stop words as stop strings; with ignore_eos neither.
void ApplyModelStops(bool chat, bool ignore_eos, const engine::ChatTemplate& chat_template,
                     engine::InferenceRequest* request);

// INVALID_ARGUMENT unless 1..kMaxSessionIdBytes bytes (`required`) or at most that (else).
grpc::Status CheckSessionId(const std::string& session_id, bool required);

}  // namespace nibble::server
