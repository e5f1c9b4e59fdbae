// Who may call what on nibbled's gRPC port: TLS / mutual TLS server credentials, bearer tokens
// with two scopes, the method -> scope table, and the rule that a daemon reachable from the
// network has TLS and tokens unless its config says `insecure: true`.
//
// Scopes: `inference` — Inference/*, Models/List, Models/Get, Artifacts/List, Artifacts/Stat,
// Artifacts/Download, health and reflection. `admin` — everything (admin implies inference):
// Quantization/*, Artifacts/Upload, Models/Load, Models/Unload, and any method not listed
// (deny by default, so a new method is admin-only until someone decides otherwise).
//
// Tokens never appear in a log line or an error message: errors name the tokens file's line,
// never its text.
//
// Thread safety: a TokenTable is immutable after Parse/Load and may be read from any thread;
// BearerTokenAuthProcessor::Process runs on gRPC's threads concurrently.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/security/auth_metadata_processor.h>
#include <grpcpp/security/server_credentials.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/config.h"

namespace nibble::server {

enum class Scope { kInference, kAdmin };
std::string_view ScopeName(Scope scope);  // "inference", "admin"

// The scope a call to `method` ("/nibble.v1.Inference/Chat") needs.
Scope RequiredScope(std::string_view method);

// The tokens a daemon accepts, each with its scope. Only SHA-256 digests are kept, so a core
// dump or a debugger shows no token; lookups compare every digest in constant time.
class TokenTable {
 public:
  // Parses a tokens file: one "<scope> <token>" per line (scope `inference` or `admin`; the
  // token 16 to 4096 printable characters without spaces), blank lines and lines starting
  // with '#' ignored. InvalidArgument naming `source` and the line number (never the token)
  // for anything else, a token listed twice, or a file without tokens.
  static absl::StatusOr<TokenTable> Parse(std::string_view text, const std::string& source);
  // Reads and parses `path`. NotFound/PermissionDenied naming the path.
  static absl::StatusOr<TokenTable> Load(const std::string& path);

  // The scope of `token`; nullopt when it is not in the table. Takes the same time whichever
  // token matches or whether one does.
  std::optional<Scope> Lookup(std::string_view token) const;

  int count(Scope scope) const;

 private:
  struct Entry {
    std::string digest;  // lower-case hex SHA-256 of the token (64 characters)
    Scope scope;
  };
  std::vector<Entry> entries_;
};

// Decides one call from its method and its "authorization" metadata values (none, one, or
// several: more than one is refused). OK; Unauthenticated when the token is missing, not
// "Bearer <token>" or not in the table; PermissionDenied when the token's scope does not
// cover the method (the message names the method and both scopes).
absl::Status Authorize(const TokenTable& tokens, std::string_view method,
                       const std::vector<std::string_view>& authorization_values);

// gRPC's hook for Authorize: runs before any handler, so a refused call never reaches a
// service. Removes the authorization metadata from the call (handlers never see tokens).
class BearerTokenAuthProcessor : public grpc::AuthMetadataProcessor {
 public:
  explicit BearerTokenAuthProcessor(std::shared_ptr<const TokenTable> tokens)
      : tokens_(std::move(tokens)) {}
  bool IsBlocking() const override { return false; }  // a table lookup: never blocks
  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed_auth_metadata,
                       OutputMetadata* response_metadata) override;

 private:
  std::shared_ptr<const TokenTable> tokens_;
};

// The daemon's rule (loopback as rpc::IsLoopbackAddress): a non-loopback `listen_address` needs TLS
// and tokens unless `insecure`; tokens without TLS are loopback-only (they would cross the network
// in plain text, and gRPC's token hook needs local or TLS credentials). FailedPrecondition saying
// which setting is missing and how to proceed.
absl::Status CheckListenSecurity(const std::string& listen_address, const SecurityConfig& security);

// What the daemon serves with, ready for ServerBuilder::AddListeningPort.
struct ServerSecurity {
  std::shared_ptr<grpc::ServerCredentials> credentials;
  // One line for the start message: "mutual TLS (client certificates required), bearer
  // tokens (1 admin, 2 inference)", with a WARNING when nothing is checked on a reachable
  // address or when the tokens or key file is open to other users.
  std::string description;
};

// Checks CheckListenSecurity, reads the certificate, key, client CA and tokens files and
// builds the credentials: SslServerCredentials with TLS (requiring and verifying client
// certificates with a client CA), local-TCP credentials for tokens on loopback without TLS,
// insecure credentials otherwise; with tokens, a BearerTokenAuthProcessor. Errors name the
// setting and file.
absl::StatusOr<ServerSecurity> MakeServerSecurity(const std::string& listen_address,
                                                  const SecurityConfig& security);

}  // namespace nibble::server
