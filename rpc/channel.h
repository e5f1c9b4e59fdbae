// Client side of a connection to nibbled: the channel (plain text, TLS or mutual TLS from PEM
// files) and the bearer token sent with every call. Used by the CLI, and by a daemon that pulls
// from another daemon. Depends on gRPC and absl only.
//
// Thread safety: the functions are pure or read files; a ClientSecurity is a plain value.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"

namespace nibble::rpc {

// How to reach one daemon. `tls` false: plain text (the certificate fields must be empty).
// `ca_file` empty with `tls`: the system's trust roots. `cert_file` and `key_file` (both or
// neither): the client certificate for a daemon that requires mutual TLS.
// `token`: the bearer token (empty: none); its text must never be printed.
struct ClientSecurity {
  std::string ca_file, cert_file, key_file;
  std::string token;
  bool tls = false;
};

// True for an address only this machine can reach: localhost, 127.0.0.0/8, [::1] (with a
// port) and unix: sockets. "0.0.0.0", "[::]", ":port", target URIs ("dns:///...") and every
// other host name are not (no name is resolved).
bool IsLoopbackAddress(std::string_view address);

// A channel to `address` (host:port) with `security`'s credentials. Errors: InvalidArgument
// when the settings contradict each other (a certificate without TLS, a cert without its key,
// a token to be sent in plain text to an address that is not loopback) and
// NotFound/PermissionDenied naming the file that cannot be read. The channel connects
// lazily: a daemon that is down or refuses the handshake shows up as UNAVAILABLE on the first
// call.
absl::StatusOr<std::shared_ptr<grpc::Channel>> OpenChannel(
    const std::string& address, const ClientSecurity& security,
    const grpc::ChannelArguments& arguments = {});

// Adds "authorization: Bearer <token>" to the call when `security` has a token. Call once per
// ClientContext before starting the call.
void AddCallCredentials(grpc::ClientContext* context, const ClientSecurity& security);

// "INVALID_ARGUMENT" for grpc::StatusCode::INVALID_ARGUMENT (the canonical names); "UNKNOWN"
// for a number outside them.
const char* StatusCodeName(grpc::StatusCode code);

// A call's status as every client of a daemon reports it: OK stays OK, else the same code with
// the daemon's address and the code's name before the message
// ("localhost:50051: NOT_FOUND: no artifact named ...").
absl::Status FromGrpcStatus(const std::string& address, const grpc::Status& status);

// Sets the call's deadline `seconds` from now.
void SetDeadlineAfter(grpc::ClientContext* context, double seconds);

// What the user gave on the command line; empty fields fall back to the environment.
struct ClientSecurityFlags {
  std::string token_file;  // --token-file
  std::string ca_file;     // --tls-ca
  std::string cert_file;   // --tls-cert
  std::string key_file;    // --tls-key
  bool tls = false;        // --tls (implied by any of the three files)
};

// Reads the environment variable `name`; nullptr when unset (std::getenv by default; tests
// pass their own).
using EnvironmentLookup = std::function<const char*(const char* name)>;

// Resolves flags and environment into a ClientSecurity. Flags win over the environment:
//   token:  --token-file, else NIBBLE_TOKEN (the token itself), else NIBBLE_TOKEN_FILE;
//   files:  --tls-ca/--tls-cert/--tls-key, else NIBBLE_TLS_CA/NIBBLE_TLS_CERT/NIBBLE_TLS_KEY;
//   tls:    --tls, NIBBLE_TLS=1, or any of the three files given.
// A token file holds the token on one line (surrounding whitespace and '#' comment lines are
// ignored). Errors name the flag or variable and the file, never the token.
absl::StatusOr<ClientSecurity> ClientSecurityFromFlagsAndEnv(const ClientSecurityFlags& flags,
                                                             const EnvironmentLookup& getenv = {});

// Reads a client token file (see above). Errors name the file, never its content.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

}  // namespace nibble::rpc
