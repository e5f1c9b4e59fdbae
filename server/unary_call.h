// The start and end that every counted unary call of the services shares (Artifacts.List and
// Stat, Models.Load and Unload, Inference.Tokenize, CountTokens and EndSession), written once:
// the call is counted (CallGuard), a draining daemon refuses it with DrainingStatus() before
// the request is even parsed, else the raw request is parsed (server/raw_messages.h).
#pragma once

#include <utility>

#include <grpcpp/grpcpp.h>

#include "server/grpc_status.h"
#include "server/raw_messages.h"
#include "server/served_model.h"

namespace nibble::server {

// One counted unary call with its request of type `Request`. Usage:
//
//   UnaryCall<nibble::v1::FooRequest> call(context, state_, request);
//   if (call.ok()) { ... call.wire() ...; on failure call.set_status(s); }
//   return call.Finish();
//
// Finish() answers with status() and the call stays counted until the UnaryCall goes out of
// scope, after Finish (as a CallGuard declared first in the handler would). A handler that
// answers later from another thread calls Release() instead: its worker must then Finish the
// reactor and call ServingState::CallDone itself.
template <class Request>
class UnaryCall {
 public:
  UnaryCall(grpc::CallbackServerContext* context, ServingState& state,
            const grpc::ByteBuffer* request)
      : reactor_(context->DefaultReactor()), guard_(state) {
    status_ = guard_.counted() ? ParseRequest(*request, &wire_) : DrainingStatus();
  }
  UnaryCall(const UnaryCall&) = delete;
  UnaryCall& operator=(const UnaryCall&) = delete;

  // Counted and parsed, and no handler step has failed yet (set_status).
  bool ok() const { return status_.ok(); }
  const grpc::Status& status() const { return status_; }
  void set_status(grpc::Status status) { status_ = std::move(status); }
  const Request& wire() const { return wire_; }
  grpc::ServerUnaryReactor* reactor() const { return reactor_; }

  // Answers with status(); returns the reactor for the handler to return.
  grpc::ServerUnaryReactor* Finish() {
    reactor_->Finish(status_);
    return reactor_;
  }

  // The caller's worker now finishes the reactor and calls ServingState::CallDone.
  grpc::ServerUnaryReactor* Release() {
    guard_.Release();
    return reactor_;
  }

 private:
  grpc::ServerUnaryReactor* const reactor_;
  CallGuard guard_;
  Request wire_;
  grpc::Status status_;
};

}  // namespace nibble::server
