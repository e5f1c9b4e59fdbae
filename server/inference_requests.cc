#include "server/inference_requests.h"

#include <cmath>
#include <random>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/chat_template.h"
#include "engine/sampler.h"

namespace nibble::server {
namespace {

grpc::Status Invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

uint64_t RandomSeed() {
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) ^ static_cast<uint64_t>(device());
}

grpc::Status ApplySampling(const nibble::v1::SamplingParams& wire, int64_t session_len,
                           engine::InferenceRequest* request) {
  engine::SamplingParams& sampling = request->sampling;
  if (wire.has_temperature()) {
    const float t = wire.temperature();
    if (!std::isfinite(t) || t < 0 || t > kMaxTemperature) {
      return Invalid(absl::StrCat("sampling.temperature must be a finite number in [0, ",
                                  kMaxTemperature, "] (0: greedy), got ", t));
    }
    sampling.temperature = t;
  }
  if (wire.has_top_p()) {
    const float p = wire.top_p();
    if (!std::isfinite(p) || !(p > 0 && p <= 1)) {
      return Invalid(absl::StrCat("sampling.top_p must be in (0, 1], got ", p));
    }
    sampling.top_p = p;
  }
  if (wire.has_top_k()) {
    if (wire.top_k() < 0) {
      return Invalid(absl::StrCat("sampling.top_k must be >= 0 (0: no limit), got ", wire.top_k()));
    }
    sampling.top_k = wire.top_k();
  }
  if (wire.has_repetition_penalty()) {
    const float r = wire.repetition_penalty();
    if (!std::isfinite(r) || !(r > 0 && r <= kMaxRepetitionPenalty)) {
      return Invalid(absl::StrCat("sampling.repetition_penalty must be in (0, ",
                                  kMaxRepetitionPenalty, "] (1: none), got ", r));
    }
    sampling.repetition_penalty = r;
  }
  // No seed: a random one (reported in the last chunk, so the reply can be replayed).
  sampling.seed = wire.has_seed() ? wire.seed() : RandomSeed();
  // The engine's own check, in case its ranges are narrower than the ones above.
  if (absl::Status valid = engine::ValidateSamplingParams(sampling); !valid.ok()) {
    return Invalid(absl::StrCat("sampling: ", valid.message()));
  }

  request->max_tokens = kDefaultMaxTokens;
  if (wire.has_max_tokens()) {
    const int32_t max_tokens = wire.max_tokens();
    if (max_tokens < 0 || max_tokens > session_len) {
      return Invalid(absl::StrCat("sampling.max_tokens must be in [0, ", session_len,
                                  "] (session_len), got ", max_tokens));
    }
    request->max_tokens = max_tokens;
  }
  if (wire.stop_size() > kMaxStopStrings) {
    return Invalid(absl::StrCat("sampling.stop has ", wire.stop_size(), " strings; at most ",
                                kMaxStopStrings, " are allowed"));
  }
  for (int i = 0; i < wire.stop_size(); ++i) {
    const std::string& stop = wire.stop(i);
    if (stop.empty() || stop.size() > kMaxStopStringBytes) {
      return Invalid(absl::StrCat("sampling.stop[", i, "] must be 1..", kMaxStopStringBytes,
                                  " bytes, got ", stop.size()));
    }
    request->stop_strings.push_back(stop);
  }
  return grpc::Status::OK;
}

// The conversation as engine messages: the count and every role checked (cheap).
grpc::Status ToEngineMessages(
    const google::protobuf::RepeatedPtrField<nibble::v1::ChatMessage>& wire,
    std::vector<engine::ChatMessage>* messages) {
  if (wire.empty()) return Invalid("messages is empty (a chat needs at least one user message)");
  if (wire.size() > kMaxMessages) {
    return Invalid(absl::StrCat("messages has ", wire.size(), " entries; at most ", kMaxMessages,
                                " are allowed"));
  }
  messages->reserve(wire.size());
  for (int i = 0; i < wire.size(); ++i) {
    auto role = engine::ParseChatRole(wire[i].role());
    if (!role) {
      return Invalid(absl::StrCat("messages[", i, "].role \"", wire[i].role().substr(0, 32),
                                  "\" is not system, user or assistant"));
    }
    messages->push_back({*role, wire[i].content()});
  }
  return grpc::Status::OK;
}

// RESOURCE_EXHAUSTED when `text` certainly has more than session_len tokens (ServedModel::
// max_prompt_weight); O(bytes), no tokenizing.
grpc::Status CheckPromptBytes(std::string_view text, const ServedModel& model) {
  const int64_t limit = model.max_prompt_weight();
  if (limit == 0 || static_cast<int64_t>(text.size()) <= limit) return grpc::Status::OK;
  const int64_t weight = PromptWeight(text);
  if (weight <= limit) return grpc::Status::OK;
  return grpc::Status(
      grpc::StatusCode::RESOURCE_EXHAUSTED,
      absl::StrCat("the prompt has ", weight, " bytes (a run of spaces counted once): more "
                   "tokens than session_len (", model.engine->session_len(),
                   ") can hold, since no token covers more than ", model.max_piece_bytes,
                   " bytes; refused without tokenizing; shorten the conversation"));
}

grpc::Status CheckPromptLength(const engine::InferenceRequest& request, int64_t session_len) {
  const int64_t length = static_cast<int64_t>(request.prompt_ids.size());
  if (length > session_len) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("the prompt has ", length, " tokens, more than session_len (",
                                     session_len, "); shorten the conversation"));
  }
  return grpc::Status::OK;
}

}  // namespace

grpc::Status CheckSessionId(const std::string& session_id, bool required) {
  if (session_id.size() > kMaxSessionIdBytes || (required && session_id.empty())) {
    return Invalid(absl::StrCat("session_id must be ", required ? "1.." : "at most ",
                                kMaxSessionIdBytes, " bytes, got ", session_id.size()));
  }
  return grpc::Status::OK;
}

PromptInput InputOf(const nibble::v1::ChatRequest& wire) {
  return {.text = {}, .messages = &wire.messages(), .add_bos = true};
}

PromptInput InputOf(const nibble::v1::GenerateRequest& wire) {
  return {.text = wire.prompt(), .messages = nullptr, .add_bos = true};
}

grpc::Status InputOf(const nibble::v1::TokenizeRequest& wire, PromptInput* input) {
  if (!wire.messages().empty() && !wire.text().empty()) {
    return Invalid("set either text or messages, not both");
  }
  *input = {.text = wire.text(),
            .messages = wire.messages().empty() ? nullptr : &wire.messages(),
            .add_bos = wire.add_bos()};
  return grpc::Status::OK;
}

grpc::Status TokenizePrompt(const PromptInput& input, const ServedModel& model,
                            std::vector<int32_t>* ids) {
  const engine::Model& engine_model = model.engine->model();
  std::string rendered;
  std::string_view text = input.text;
  if (input.messages != nullptr) {
    // Rendering only concatenates (cheap, bounded by max_request_bytes); tokenizing is not.
    std::vector<engine::ChatMessage> messages;
    if (grpc::Status s = ToEngineMessages(*input.messages, &messages); !s.ok()) return s;
    auto result = engine_model.chat_template().Render(messages);
    if (!result.ok()) return Invalid(absl::StrCat("messages: ", result.status().message()));
    rendered = std::move(result).value();
    text = rendered;
  }
  if (grpc::Status s = CheckPromptBytes(text, model); !s.ok()) return s;
  ids->clear();
  if (input.add_bos) ids->push_back(engine_model.tokenizer().BosId());
  if (!text.empty()) {
    const std::vector<int32_t> encoded = engine_model.tokenizer().Encode(text);
    ids->insert(ids->end(), encoded.begin(), encoded.end());
  }
  return grpc::Status::OK;
}

void ApplyModelStops(bool chat, bool ignore_eos, const engine::ChatTemplate& chat_template,
                     engine::InferenceRequest* request) {
  // ignore_eos: no stop token at all, nor the template's stop words (generation runs to
  // max_tokens, one of the request's own stop strings or session_len).
  request->model_stop_tokens = !ignore_eos;
  if (chat && !ignore_eos) {
    for (const std::string& word : chat_template.StopWords()) {
      request->stop_strings.push_back(word);
    }
  }
}

grpc::Status PrepareRequest(const nibble::v1::SamplingParams& sampling,
                            const std::string& session_id, const PromptInput& input,
                            const ServedModel& model, engine::InferenceRequest* request) {
  const int64_t session_len = model.engine->session_len();
  if (grpc::Status s = CheckSessionId(session_id, /*required=*/false); !s.ok()) return s;
  if (grpc::Status s = ApplySampling(sampling, session_len, request); !s.ok()) return s;
  if (grpc::Status s = TokenizePrompt(input, model, &request->prompt_ids); !s.ok()) return s;
  ApplyModelStops(/*chat=*/input.messages != nullptr, sampling.ignore_eos(),
                  model.engine->model().chat_template(), request);
  request->session_id = session_id;
  return CheckPromptLength(*request, session_len);
}

}  // namespace nibble::server
