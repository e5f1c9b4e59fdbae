#include "server/inference_requests.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/chat_template.h"
#include "engine/sampler.h"

namespace nibble::server {
namespace {

grpc::Status Invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

grpc::Status ApplySampling(const nibble::v1::SamplingParams& wire, const engine::Model& model,
                           int64_t session_len, engine::InferenceRequest* request) {
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
  if (wire.has_seed()) sampling.seed = wire.seed();
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
  // ignore_eos: no stop token at all (generation runs to max_tokens or a stop string).
  request->model_stop_tokens = !wire.ignore_eos();
  return grpc::Status::OK;
}

grpc::Status CheckSessionId(const std::string& session_id) {
  if (session_id.size() > kMaxSessionIdBytes) {
    return Invalid(absl::StrCat("session_id must be at most ", kMaxSessionIdBytes,
                                " bytes, got ", session_id.size()));
  }
  return grpc::Status::OK;
}

grpc::Status RenderMessages(const google::protobuf::RepeatedPtrField<nibble::v1::ChatMessage>& wire,
                            const engine::ChatTemplate& chat_template, std::string* prompt) {
  if (wire.empty()) return Invalid("messages is empty (a chat needs at least one user message)");
  if (wire.size() > kMaxMessages) {
    return Invalid(absl::StrCat("messages has ", wire.size(), " entries; at most ", kMaxMessages,
                                " are allowed"));
  }
  std::vector<engine::ChatMessage> messages;
  messages.reserve(wire.size());
  for (int i = 0; i < wire.size(); ++i) {
    auto role = engine::ParseChatRole(wire[i].role());
    if (!role) {
      return Invalid(absl::StrCat("messages[", i, "].role \"", wire[i].role().substr(0, 32),
                                  "\" is not system, user or assistant"));
    }
    messages.push_back({*role, wire[i].content()});
  }
  auto rendered = chat_template.Render(messages);
  if (!rendered.ok()) return Invalid(absl::StrCat("messages: ", rendered.status().message()));
  *prompt = std::move(rendered).value();
  return grpc::Status::OK;
}

std::vector<int32_t> PromptIds(const engine::Tokenizer& tokenizer, const std::string& text) {
  std::vector<int32_t> ids = {tokenizer.BosId()};
  if (!text.empty()) {
    const std::vector<int32_t> encoded = tokenizer.Encode(text);
    ids.insert(ids.end(), encoded.begin(), encoded.end());
  }
  return ids;
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

int64_t EffectiveSessionLen(const engine::InferenceEngine& engine) {
  const int64_t context = engine.model().config().max_position_embeddings;
  const int64_t session_len = engine.options().session_len;
  return session_len > 0 && session_len < context ? session_len : context;
}

grpc::Status PrepareChat(const nibble::v1::ChatRequest& wire, const engine::InferenceEngine& engine,
                         engine::InferenceRequest* request) {
  const engine::Model& model = engine.model();
  const int64_t session_len = EffectiveSessionLen(engine);
  if (grpc::Status s = CheckSessionId(wire.session_id()); !s.ok()) return s;
  if (grpc::Status s = ApplySampling(wire.sampling(), model, session_len, request); !s.ok()) {
    return s;
  }
  std::string prompt;
  if (grpc::Status s = RenderMessages(wire.messages(), model.chat_template(), &prompt); !s.ok()) {
    return s;
  }
  for (const std::string& word : model.chat_template().StopWords()) {
    request->stop_strings.push_back(word);
  }
  request->prompt_ids = PromptIds(model.tokenizer(), prompt);
  request->session_id = wire.session_id();
  return CheckPromptLength(*request, session_len);
}

grpc::Status PrepareGenerate(const nibble::v1::GenerateRequest& wire,
                             const engine::InferenceEngine& engine,
                             engine::InferenceRequest* request) {
  const engine::Model& model = engine.model();
  const int64_t session_len = EffectiveSessionLen(engine);
  if (grpc::Status s = CheckSessionId(wire.session_id()); !s.ok()) return s;
  if (grpc::Status s = ApplySampling(wire.sampling(), model, session_len, request); !s.ok()) {
    return s;
  }
  request->prompt_ids = PromptIds(model.tokenizer(), wire.prompt());
  request->session_id = wire.session_id();
  return CheckPromptLength(*request, session_len);
}

grpc::Status TokenizeInput(const nibble::v1::TokenizeRequest& wire, const engine::Model& model,
                           std::vector<int32_t>* ids) {
  std::string text = wire.text();
  if (!wire.messages().empty()) {
    if (!text.empty()) return Invalid("set either text or messages, not both");
    if (grpc::Status s = RenderMessages(wire.messages(), model.chat_template(), &text); !s.ok()) {
      return s;
    }
  }
  ids->clear();
  if (wire.add_bos()) ids->push_back(model.tokenizer().BosId());
  if (!text.empty()) {
    const std::vector<int32_t> encoded = model.tokenizer().Encode(text);
    ids->insert(ids->end(), encoded.begin(), encoded.end());
  }
  return grpc::Status::OK;
}

}  // namespace nibble::server
