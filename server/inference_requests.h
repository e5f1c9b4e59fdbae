// Turns validated wire requests (nibble.v1) into engine requests. Every check names the field
// and the allowed range, so a client can fix its request from the message alone.
#pragma once

#include <cstdint>
#include <vector>

#include <grpcpp/support/status.h>

#include "engine/inference_engine.h"
#include "nibble/v1/inference.pb.h"

namespace nibble::server {

// Limits on request fields (beyond the engine's own).
inline constexpr int kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;
inline constexpr size_t kMaxSessionIdBytes = 128;
inline constexpr int kMaxMessages = 4096;
inline constexpr float kMaxTemperature = 100.0f;
inline constexpr float kMaxRepetitionPenalty = 100.0f;
inline constexpr int32_t kDefaultMaxTokens = 256;

// The prompt length a request may have: session_len, or the model's context when it is 0.
int64_t EffectiveSessionLen(const engine::InferenceEngine& engine);

// INVALID_ARGUMENT naming the field; RESOURCE_EXHAUSTED for a prompt past session_len.
grpc::Status PrepareChat(const nibble::v1::ChatRequest& wire, const engine::InferenceEngine& engine,
                         engine::InferenceRequest* request);
grpc::Status PrepareGenerate(const nibble::v1::GenerateRequest& wire,
                             const engine::InferenceEngine& engine,
                             engine::InferenceRequest* request);

// The ids Tokenize and CountTokens report: the text, or the rendered conversation.
grpc::Status TokenizeInput(const nibble::v1::TokenizeRequest& wire, const engine::Model& model,
                           std::vector<int32_t>* ids);

}  // namespace nibble::server
