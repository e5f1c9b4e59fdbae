#include "clients/cli/connection_flags.h"

#include <google/protobuf/util/json_util.h>

#include "clients/cli/commands.h"

namespace nibble::cli {

std::string Json(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(message, &out, options).ok()) return "{}";
  return out;
}

void RegisterSecurityFlags(CLI::App& command, rpc::ClientSecurityFlags* flags) {
  command.add_flag("--tls", flags->tls,
                   "connect with TLS (implied by --tls-ca/--tls-cert; env NIBBLE_TLS=1)");
  command.add_option("--tls-ca", flags->ca_file,
                     "PEM file of the CA that signed the daemon's certificate (default: the "
                     "system's; env NIBBLE_TLS_CA)");
  command.add_option("--tls-cert", flags->cert_file,
                     "PEM client certificate, for a daemon that requires mutual TLS (env "
                     "NIBBLE_TLS_CERT)");
  command.add_option("--tls-key", flags->key_file,
                     "PEM private key of --tls-cert (env NIBBLE_TLS_KEY)");
  command.add_option("--token-file", flags->token_file,
                     "file holding the bearer token (env NIBBLE_TOKEN_FILE, or the token itself "
                     "in NIBBLE_TOKEN)");
}

void ConnectionFlags::Register(CLI::App& command, bool server_required) {
  CLI::Option* option = command.add_option("--server", server, "nibbled address host:port");
  if (server_required) option->required();
  RegisterTimeout(command, &timeout);
  RegisterSecurityFlags(command, &security);
}

absl::StatusOr<rpc::ClientSecurity> ConnectionFlags::Security() const {
  return rpc::ClientSecurityFromFlagsAndEnv(security);
}

absl::StatusOr<Connection> ConnectionFlags::Open() const {
  Connection c;
  auto security = Security();
  if (!security.ok()) return security.status();
  c.security = *security;
  auto channel = rpc::OpenChannel(server, c.security);
  if (!channel.ok()) return channel.status();
  c.channel = *channel;
  c.address = server;
  c.timeout = timeout;
  return c;
}

void Connection::Prepare(grpc::ClientContext* context, double default_seconds) const {
  const double seconds = timeout.value_or(default_seconds);
  if (seconds > 0) rpc::SetDeadlineAfter(context, seconds);
  rpc::AddCallCredentials(context, security);
}

absl::Status Connection::ToStatus(const grpc::Status& status) const {
  return rpc::FromGrpcStatus(address, status);
}

}  // namespace nibble::cli
