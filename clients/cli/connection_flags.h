// The connection flags of every `nibble` command that talks to a daemon, registered and
// resolved in one place so that all remote commands accept the same ones:
//   --server HOST:PORT   (required)
//   --timeout SECONDS    (each call's deadline; default none)
//   --tls                (TLS with the system's trust roots; implied by the three below)
//   --tls-ca FILE        (PEM trust roots for the daemon's certificate)
//   --tls-cert FILE, --tls-key FILE  (client certificate for a daemon that requires mTLS)
//   --token-file FILE    (the bearer token, one line)
// and, where a flag is not given, the environment: NIBBLE_TOKEN (the token itself),
// NIBBLE_TOKEN_FILE, NIBBLE_TLS_CA, NIBBLE_TLS_CERT, NIBBLE_TLS_KEY, NIBBLE_TLS=1.
//
// Usage in a command's Register function:
//   auto options = std::make_shared<MyOptions>();   // with a ConnectionFlags `connection`
//   options->connection.Register(*cmd);
// and when it runs:
//   absl::StatusOr<rpc::ClientSecurity> security = options.connection.Security();
//   if (!security.ok()) return ReportError("my command", security.status());
//   RemoteClient client(options.connection.server, *security, options.connection.timeout);
// or, for a command with a stub of its own:
//   absl::StatusOr<Connection> connection = options.connection.Open();
//   auto stub = nibble::v1::Foo::NewStub(connection->channel);
//   absl::Status status = connection->Call(*stub, &nibble::v1::Foo::Stub::Bar, request, &out);
// Json() prints a reply for --json the same way in every such command.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <google/protobuf/message.h>
#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "rpc/channel.h"

namespace nibble::cli {

// The deadline of a unary call to the daemon when --timeout is not given.
inline constexpr double kUnarySeconds = 30;

// A channel to one daemon with the security its calls need (ConnectionFlags::Open).
struct Connection {
  std::string address;
  rpc::ClientSecurity security;
  std::optional<double> timeout;  // --timeout
  std::shared_ptr<grpc::Channel> channel;

  // Sets the deadline (--timeout, else `default_seconds`; 0: none) and adds the token. (--timeout
  // is a positive number: with it, or a positive default, there always is a deadline.)
  void Prepare(grpc::ClientContext* context, double default_seconds) const;
  // OK, or the failed call's status naming the daemon and the code
  // ("host:port: NOT_FOUND: ..."; rpc::FromGrpcStatus).
  absl::Status ToStatus(const grpc::Status& status) const;

  // One unary call on `stub` (a stub on `channel`), e.g.
  //   connection->Call(*stub, &nibble::v1::Artifacts::Stub::Stat, request, &info)
  // with Prepare(default_seconds); returns ToStatus of its status.
  template <class Stub, class Request, class Response>
  absl::Status Call(Stub& stub,
                    grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&, Response*),
                    const Request& request, Response* response,
                    double default_seconds = kUnarySeconds) const {
    grpc::ClientContext context;
    Prepare(&context, default_seconds);
    return ToStatus((stub.*method)(&context, request, response));
  }
};

// The protobuf JSON of a reply as the remote commands print it with --json: field names as in
// the .proto, fields at their defaults included; "{}" when it cannot be printed.
std::string Json(const google::protobuf::Message& message);

// Adds --tls, --tls-ca, --tls-cert, --tls-key and --token-file to `command`, stored in
// `*flags` (which must outlive parsing).
void RegisterSecurityFlags(CLI::App& command, rpc::ClientSecurityFlags* flags);

struct ConnectionFlags {
  std::string server;
  std::optional<double> timeout;
  rpc::ClientSecurityFlags security;

  // --server (required when `server_required`), --timeout and the security flags.
  void Register(CLI::App& command, bool server_required = true);
  // The flags completed from the environment; errors name the flag or variable at fault (and
  // never the token).
  absl::StatusOr<rpc::ClientSecurity> Security() const;
  // Security() and a channel to --server (rpc::OpenChannel); their errors as they give them.
  absl::StatusOr<Connection> Open() const;
};

}  // namespace nibble::cli
