// nibble.v1.Inference over the engine: one ServerWriteReactor per streamed call.
//
// Threads: the handlers run on gRPC's threads; engine events arrive on the engine's scheduler
// thread and never block there (they append to the stream's pending chunk under a short lock).
// One write is in flight per stream at a time; events that arrive meanwhile are coalesced into
// the next chunk (back-pressure: a slow reader gets fewer, larger chunks, the engine never
// waits). The client's deadline travels into InferenceRequest.deadline; its cancellation
// (OnCancel, or a failed write) into InferenceEngine::Cancel.
#pragma once

#include <grpcpp/grpcpp.h>

#include "nibble/v1/inference.grpc.pb.h"
#include "server/metrics.h"
#include "server/served_model.h"

namespace nibble::server {

using InferenceServiceBase = nibble::v1::Inference::WithRawCallbackMethod_Chat<
    nibble::v1::Inference::WithRawCallbackMethod_Generate<
        nibble::v1::Inference::WithRawCallbackMethod_Tokenize<
            nibble::v1::Inference::WithRawCallbackMethod_CountTokens<
                nibble::v1::Inference::WithRawCallbackMethod_EndSession<
                    nibble::v1::Inference::Service>>>>>;

class InferenceService final : public InferenceServiceBase {
 public:
  // All three must outlive the service (and every call it started).
  InferenceService(const ServedModels& models, const ServerMetrics* metrics,
                   ServingState& state)
      : models_(models), metrics_(metrics), state_(state) {}

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Chat(grpc::CallbackServerContext* context,
                                                   const grpc::ByteBuffer* request) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* CountTokens(grpc::CallbackServerContext* context,
                                        const grpc::ByteBuffer* request,
                                        grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* EndSession(grpc::CallbackServerContext* context,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;

 private:
  // Chat and Generate: count the call, parse, cheap checks, tokenize, submit.
  template <class WireRequest>
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Stream(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* request);
  // Tokenize and CountTokens: `respond(model, ids, &response_message)` fills the response.
  template <class Response, class Respond>
  grpc::ServerUnaryReactor* TokenizeCall(grpc::CallbackServerContext* context,
                                         const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response, Respond respond);

  const ServedModels& models_;
  const ServerMetrics* metrics_;  // null: no metrics
  ServingState& state_;
};

}  // namespace nibble::server
