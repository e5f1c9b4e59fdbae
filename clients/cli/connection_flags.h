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
#pragma once

#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "absl/status/statusor.h"
#include "rpc/channel.h"

namespace nibble::cli {

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
};

}  // namespace nibble::cli
