// A small client of a nibbled daemon (nibble.v1 over gRPC), for the CLI's remote commands.
// Depends on proto/ only. One client per command; calls block the calling thread.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "nibble/v1/inference.grpc.pb.h"
#include "nibble/v1/models.grpc.pb.h"

namespace nibble::cli {

class RemoteClient {
 public:
  // `timeout_seconds`: the deadline of every call (a stream's whole reply included); unset:
  // streams have none and unary calls 30 s.
  explicit RemoteClient(const std::string& address,
                        std::optional<double> timeout_seconds = std::nullopt);

  using ChunkCallback = std::function<void(const nibble::v1::ChatChunk&)>;
  // Streams the reply, calling `on_chunk` for each chunk as it arrives. The status names the
  // server and the gRPC code ("localhost:50051: INVALID_ARGUMENT: sampling.top_p ...").
  absl::Status Chat(const nibble::v1::ChatRequest& request, const ChunkCallback& on_chunk);
  absl::Status Generate(const nibble::v1::GenerateRequest& request, const ChunkCallback& on_chunk);
  absl::Status Tokenize(const nibble::v1::TokenizeRequest& request,
                        nibble::v1::TokenizeResponse* response);
  absl::Status ListModels(nibble::v1::ListModelsResponse* response);
  // Forgets the daemon's kept cache of a session (Inference.EndSession).
  absl::Status EndSession(const std::string& model, const std::string& session_id);

 private:
  absl::Status ToStatus(const grpc::Status& status) const;
  // Sets the deadline: the timeout, or `default_seconds` (0: none) without one.
  void SetDeadline(grpc::ClientContext* context, double default_seconds) const;
  template <class Request, class Call>
  absl::Status ReadStream(const Request& request, Call start, const ChunkCallback& on_chunk);

  std::optional<double> timeout_seconds_;

  std::string address_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<nibble::v1::Inference::Stub> inference_;
  std::unique_ptr<nibble::v1::Models::Stub> models_;
};

// "length", "stop", "stop_string", "context_full" (the names `nibble generate --json` uses).
std::string FinishReasonName(nibble::v1::FinishReason reason);

}  // namespace nibble::cli
