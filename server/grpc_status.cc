#include "server/grpc_status.h"

#include <string>

namespace nibble::server {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  static_assert(static_cast<int>(absl::StatusCode::kResourceExhausted) ==
                    static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED) &&
                static_cast<int>(absl::StatusCode::kUnauthenticated) ==
                    static_cast<int>(grpc::StatusCode::UNAUTHENTICATED));
  const int code = static_cast<int>(status.code());
  const bool known = code >= 0 && code <= static_cast<int>(grpc::StatusCode::UNAUTHENTICATED);
  return grpc::Status(known ? static_cast<grpc::StatusCode>(code) : grpc::StatusCode::UNKNOWN,
                      std::string(status.message()));
}

grpc::Status FinalStatus(const engine::StreamEvent& event) {
  switch (event.stop_cause) {
    case engine::StopCause::kFinished:
      return grpc::Status::OK;
    case engine::StopCause::kCancelled:
      return grpc::Status(grpc::StatusCode::CANCELLED, "the request was cancelled");
    case engine::StopCause::kDeadlineExceeded:
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          "the request's deadline passed before it finished");
    case engine::StopCause::kShutdown:
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the daemon shut down before the request finished (its drain grace "
                          "period ran out); retry on another replica");
    case engine::StopCause::kError:
      if (event.status.ok()) {
        return grpc::Status(grpc::StatusCode::INTERNAL, "the engine ended the request with an "
                                                        "error but gave no status");
      }
      return ToGrpcStatus(event.status);
  }
  return grpc::Status(grpc::StatusCode::INTERNAL, "unknown stop cause");
}

grpc::Status DrainingStatus() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      "the daemon is draining (shutting down) and takes no new requests; retry "
                      "on another replica");
}

}  // namespace nibble::server
