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
#include "rpc/channel.h"

namespace nibble::cli {

class RemoteClient {
 public:
  // `timeout_seconds`: the deadline of every call (a stream's whole reply included); unset:
  // streams have none and unary calls 30 s. `security`: TLS settings and the bearer token sent
  // with every call (ConnectionFlags::Resolve in connection_flags.h builds it from the flags
  // and environment). Settings that cannot work (a certificate file that cannot be read) make
  // every call fail with that error.
  RemoteClient(const std::string& address, const rpc::ClientSecurity& security,
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
  // Every call starts here: fails when the channel could not be opened (then the stubs are
  // null), else sets the deadline (the timeout, or `default_seconds` (0: none) without one) and
  // adds the bearer token.
  [[nodiscard]] absl::Status PrepareCall(grpc::ClientContext* context,
                                         double default_seconds) const;
  template <class Request, class Call>
  absl::Status ReadStream(const Request& request, Call start, const ChunkCallback& on_chunk);

  std::optional<double> timeout_seconds_;

  std::string address_;
  rpc::ClientSecurity security_;
  absl::Status channel_status_;  // why there is no channel, when there is none
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<nibble::v1::Inference::Stub> inference_;
  std::unique_ptr<nibble::v1::Models::Stub> models_;
};

// "length", "stop", "stop_string", "context_full" (the names `nibble generate --json` uses).
std::string FinishReasonName(nibble::v1::FinishReason reason);

}  // namespace nibble::cli
