// The one place where engine statuses and stop causes become gRPC statuses.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "engine/inference_engine.h"

namespace nibble::server {

// absl and gRPC share the canonical code numbering; the message travels unchanged.
// FailedPrecondition stays FAILED_PRECONDITION (a session with a request running);
// Unavailable (Submit after the engine shut down: a call caught by the end of a drain)
// becomes UNAVAILABLE. The daemon refuses new calls with UNAVAILABLE itself while draining,
// before the engine sees them.
grpc::Status ToGrpcStatus(const absl::Status& status);

// The status a stream ends with, from its final engine event: OK for kFinished, CANCELLED,
// DEADLINE_EXCEEDED, UNAVAILABLE for kShutdown (the drain grace ran out), the engine's error.
grpc::Status FinalStatus(const engine::StreamEvent& final_event);

// What draining calls get.
grpc::Status DrainingStatus();

}  // namespace nibble::server
