#include "clients/cli/remote_client.h"

#include "clients/cli/connection_flags.h"  // kUnarySeconds

namespace nibble::cli {

std::string FinishReasonName(nibble::v1::FinishReason reason) {
  switch (reason) {
    case nibble::v1::FINISH_REASON_LENGTH: return "length";
    case nibble::v1::FINISH_REASON_STOP: return "stop";
    case nibble::v1::FINISH_REASON_STOP_STRING: return "stop_string";
    case nibble::v1::FINISH_REASON_CONTEXT_FULL: return "context_full";
    default: return "";
  }
}

RemoteClient::RemoteClient(const std::string& address, const rpc::ClientSecurity& security,
                           std::optional<double> timeout_seconds)
    : timeout_seconds_(timeout_seconds), address_(address), security_(security) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = rpc::OpenChannel(address, security);
  if (!channel.ok()) {
    channel_status_ = channel.status();
    return;
  }
  channel_ = *std::move(channel);
  inference_ = nibble::v1::Inference::NewStub(channel_);
  models_ = nibble::v1::Models::NewStub(channel_);
}

absl::Status RemoteClient::ToStatus(const grpc::Status& status) const {
  return rpc::FromGrpcStatus(address_, status);
}

absl::Status RemoteClient::PrepareCall(grpc::ClientContext* context,
                                       double default_seconds) const {
  if (!channel_status_.ok()) return channel_status_;
  rpc::AddCallCredentials(context, security_);
  const double seconds = timeout_seconds_.value_or(default_seconds);
  if (seconds > 0) rpc::SetDeadlineAfter(context, seconds);
  return absl::OkStatus();
}

template <class Request, class Call>
absl::Status RemoteClient::ReadStream(const Request& request, Call start,
                                      const ChunkCallback& on_chunk) {
  grpc::ClientContext context;
  if (absl::Status ready = PrepareCall(&context, 0); !ready.ok()) return ready;
  auto reader = start(&context, request);
  nibble::v1::ChatChunk chunk;
  while (reader->Read(&chunk)) on_chunk(chunk);
  return ToStatus(reader->Finish());
}

absl::Status RemoteClient::Chat(const nibble::v1::ChatRequest& request,
                                const ChunkCallback& on_chunk) {
  return ReadStream(
      request, [&](grpc::ClientContext* c, const auto& r) { return inference_->Chat(c, r); },
      on_chunk);
}

absl::Status RemoteClient::Generate(const nibble::v1::GenerateRequest& request,
                                    const ChunkCallback& on_chunk) {
  return ReadStream(
      request, [&](grpc::ClientContext* c, const auto& r) { return inference_->Generate(c, r); },
      on_chunk);
}

absl::Status RemoteClient::Tokenize(const nibble::v1::TokenizeRequest& request,
                                    nibble::v1::TokenizeResponse* response) {
  grpc::ClientContext context;
  if (absl::Status ready = PrepareCall(&context, kUnarySeconds); !ready.ok()) {
    return ready;
  }
  return ToStatus(inference_->Tokenize(&context, request, response));
}

absl::Status RemoteClient::ListModels(nibble::v1::ListModelsResponse* response) {
  grpc::ClientContext context;
  if (absl::Status ready = PrepareCall(&context, kUnarySeconds); !ready.ok()) {
    return ready;
  }
  return ToStatus(models_->List(&context, nibble::v1::ListModelsRequest(), response));
}

absl::Status RemoteClient::EndSession(const std::string& model, const std::string& session_id) {
  grpc::ClientContext context;
  if (absl::Status ready = PrepareCall(&context, kUnarySeconds); !ready.ok()) {
    return ready;
  }
  nibble::v1::EndSessionRequest request;
  request.set_model(model);
  request.set_session_id(session_id);
  nibble::v1::EndSessionResponse response;
  return ToStatus(inference_->EndSession(&context, request, &response));
}

}  // namespace nibble::cli
