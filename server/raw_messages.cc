#include "server/raw_messages.h"

#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#include <google/protobuf/stubs/logging.h>

namespace nibble::server {
namespace {

// Protobuf reports the field with invalid UTF-8 only through its log handler, on the parsing
// thread. While a request is parsed, the handler keeps that thread's messages; otherwise it
// prints them as protobuf's default handler does.
thread_local std::string* captured_log = nullptr;

void LogHandler(google::protobuf::LogLevel level, const char* filename, int line,
                const std::string& message) {
  if (captured_log != nullptr && level < google::protobuf::LOGLEVEL_FATAL) {
    if (captured_log->empty()) *captured_log = message;
    return;
  }
  static const char* const kLevels[] = {"INFO", "WARNING", "ERROR", "FATAL"};
  std::fprintf(stderr, "[libprotobuf %s %s:%d] %s\n", kLevels[level], filename, line,
               message.c_str());
}

// "String field 'nibble.v1.ChatMessage.content' contains invalid UTF-8 data ..." -> the name.
std::string FieldOfUtf8Error(const std::string& log) {
  if (log.find("UTF-8") == std::string::npos) return "";
  const size_t open = log.find('\'');
  const size_t close = open == std::string::npos ? open : log.find('\'', open + 1);
  if (close == std::string::npos) return "a string field";
  return log.substr(open + 1, close - open - 1);
}

}  // namespace

grpc::Status ParseRequest(const grpc::ByteBuffer& buffer, google::protobuf::Message* message) {
  static std::once_flag install_handler;
  std::call_once(install_handler, [] { google::protobuf::SetLogHandler(&LogHandler); });

  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the request could not be read");
  }
  std::string bytes;
  bytes.reserve(buffer.Length());
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  std::string log;
  captured_log = &log;
  const bool parsed = message->ParseFromString(bytes);
  captured_log = nullptr;
  if (parsed) return grpc::Status::OK;
  const std::string field = FieldOfUtf8Error(log);
  if (!field.empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "field " + field + " holds invalid UTF-8 (string fields must be UTF-8; "
                        "the request was refused)");
  }
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                      "the request is not a valid " + message->GetTypeName() + " message");
}

void SerializeResponse(const google::protobuf::Message& message, grpc::ByteBuffer* buffer) {
  const std::string bytes = message.SerializeAsString();
  grpc::Slice slice(bytes);
  grpc::ByteBuffer out(&slice, 1);
  buffer->Swap(&out);
}

}  // namespace nibble::server
