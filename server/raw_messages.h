// Requests arrive as raw bytes (the services use gRPC's raw callback methods) so that a bad
// request gets INVALID_ARGUMENT naming the field: gRPC's own parsing would answer INTERNAL
// with an empty message when, say, a string field holds invalid UTF-8.
#pragma once

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/status.h>

#include <google/protobuf/message.h>

namespace nibble::server {

// Parses `buffer` into `message`. INVALID_ARGUMENT naming the field for invalid UTF-8 in a
// string field ("field nibble.v1.ChatMessage.content holds invalid UTF-8"), or naming the
// message type for bytes that are not one.
grpc::Status ParseRequest(const grpc::ByteBuffer& buffer, google::protobuf::Message* message);

// Serializes a response into `buffer`.
void SerializeResponse(const google::protobuf::Message& message, grpc::ByteBuffer* buffer);

}  // namespace nibble::server
