#include "server/auth.h"

#include <sys/stat.h>

#include <cstdio>
#include <utility>

#include <grpcpp/grpcpp.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/atomic_file.h"
#include "engine/sha256.h"
#include "engine/status_macros.h"
#include "rpc/channel.h"

namespace nibble::server {
namespace {

// Debian's Abseil has its own string_view type.
absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr size_t kMinTokenLength = 16;
constexpr size_t kMaxTokenLength = 4096;

// Methods the inference scope may call; everything else needs admin.
constexpr std::string_view kInferenceServices[] = {
    "/nibble.v1.Inference/",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
};
constexpr std::string_view kInferenceMethods[] = {
    "/nibble.v1.Models/List",    "/nibble.v1.Models/Get",         "/nibble.v1.Artifacts/List",
    "/nibble.v1.Artifacts/Stat", "/nibble.v1.Artifacts/Download",
};

std::string Digest(std::string_view token) { return engine::Sha256OfString(token); }

bool IsTokenText(std::string_view token) {
  for (char c : token) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c)) ||
        !absl::ascii_isprint(static_cast<unsigned char>(c))) {
      return false;
    }
  }
  return true;
}

absl::StatusOr<std::string> ReadSecurityFile(const std::string& path, const char* key) {
  absl::StatusOr<std::string> text = engine::ReadFileToString(path);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        absl::StrCat("security.", key, ": ", text.status().message()));
  }
  if (text->empty()) {
    return absl::InvalidArgumentError(absl::StrCat("security.", key, ": ", path, " is empty"));
  }
  return text;
}

// A warning when a secret file is open to other users (group or others may read or write it):
// they could read the tokens or the key, or swap in their own.
std::optional<std::string> ExposedSecretWarning(const std::string& path, const char* key) {
  struct stat info;
  if (stat(path.c_str(), &info) != 0 || (info.st_mode & 077) == 0) return std::nullopt;
  char mode[8];
  std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(info.st_mode & 07777));
  return absl::StrCat("WARNING: security.", key, " ", path, " is open to other users (mode ", mode,
                      "); chmod 600 it");
}

}  // namespace

std::string_view ScopeName(Scope scope) { return scope == Scope::kAdmin ? "admin" : "inference"; }

Scope RequiredScope(std::string_view method) {
  for (std::string_view prefix : kInferenceServices) {
    // A method name after the service prefix, and nothing else ("/nibble.v1.Inference/" alone
    // is not a method).
    if (method.starts_with(prefix) && method.size() > prefix.size() &&
        method.find('/', prefix.size()) == std::string_view::npos) {
      return Scope::kInference;
    }
  }
  for (std::string_view exact : kInferenceMethods) {
    if (method == exact) return Scope::kInference;
  }
  return Scope::kAdmin;
}

absl::StatusOr<TokenTable> TokenTable::Parse(std::string_view text, const std::string& source) {
  TokenTable table;
  int line_number = 0;
  for (absl::string_view raw_line : absl::StrSplit(AsAbsl(text), '\n')) {
    ++line_number;
    const absl::string_view line = absl::StripAsciiWhitespace(raw_line);
    if (line.empty() || line.front() == '#') continue;
    const auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": line ", line_number, ": ", why));
    };
    std::vector<absl::string_view> words =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (words.size() != 2) {
      return bad(
          "expected \"<scope> <token>\" (scope inference or admin, the token without "
          "spaces)");
    }
    Scope scope;
    if (words[0] == "admin") {
      scope = Scope::kAdmin;
    } else if (words[0] == "inference") {
      scope = Scope::kInference;
    } else {
      // The first word is the scope's place, not the token's: naming it is safe unless
      // someone swapped the two, so it is not echoed either.
      return bad("the first word must be the scope: inference or admin");
    }
    const absl::string_view token = words[1];
    if (token.size() < kMinTokenLength || token.size() > kMaxTokenLength) {
      return bad(absl::StrCat("a token must be ", kMinTokenLength, " to ", kMaxTokenLength,
                              " characters long (e.g. `openssl rand -hex 32`)"));
    }
    if (!IsTokenText(std::string_view(token.data(), token.size()))) {
      return bad("a token is printable ASCII without spaces");
    }
    Entry entry{Digest(std::string_view(token.data(), token.size())), scope};
    for (const Entry& other : table.entries_) {
      if (other.digest == entry.digest) return bad("this token is listed twice");
    }
    table.entries_.push_back(std::move(entry));
  }
  if (table.entries_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": holds no tokens (lines \"<scope> <token>\", scope inference or admin)"));
  }
  return table;
}

absl::StatusOr<TokenTable> TokenTable::Load(const std::string& path) {
  NIBBLE_ASSIGN_OR_RETURN(std::string text, engine::ReadFileToString(path));
  return Parse(text, path);
}

std::optional<Scope> TokenTable::Lookup(std::string_view token) const {
  // Compare digests, not tokens: equal length always, and nothing about the real tokens'
  // lengths or prefixes leaks through timing. Every entry is compared, no early exit.
  const std::string digest = Digest(token);
  int matched_index = -1;
  for (size_t i = 0; i < entries_.size(); ++i) {
    unsigned difference = 0;
    for (size_t j = 0; j < digest.size(); ++j) {
      difference |= static_cast<unsigned char>(digest[j] ^ entries_[i].digest[j]);
    }
    // Branch-free select: matched_index = i when difference == 0.
    const int is_match = static_cast<int>((difference - 1u) >> 31 & 1u);
    matched_index = is_match * static_cast<int>(i) + (1 - is_match) * matched_index;
  }
  if (matched_index < 0) return std::nullopt;
  return entries_[matched_index].scope;
}

int TokenTable::count(Scope scope) const {
  int n = 0;
  for (const Entry& entry : entries_) n += entry.scope == scope;
  return n;
}

absl::Status Authorize(const TokenTable& tokens, std::string_view method,
                       const std::vector<std::string_view>& authorization_values) {
  if (authorization_values.empty()) {
    return absl::UnauthenticatedError(
        "this daemon requires a bearer token (metadata \"authorization: Bearer <token>\"; "
        "nibble: --token-file or NIBBLE_TOKEN)");
  }
  if (authorization_values.size() > 1) {
    return absl::UnauthenticatedError("more than one authorization header");
  }
  constexpr std::string_view kBearer = "Bearer ";
  const std::string_view value = authorization_values.front();
  if (value.size() <= kBearer.size() ||
      !absl::EqualsIgnoreCase(AsAbsl(value.substr(0, kBearer.size())), AsAbsl(kBearer))) {
    return absl::UnauthenticatedError("the authorization header is not \"Bearer <token>\"");
  }
  const std::optional<Scope> scope = tokens.Lookup(value.substr(kBearer.size()));
  if (!scope) return absl::UnauthenticatedError("the bearer token is not valid");
  const Scope required = RequiredScope(method);
  if (required == Scope::kAdmin && *scope != Scope::kAdmin) {
    return absl::PermissionDeniedError(
        absl::StrCat(std::string(method), " needs a token of the admin scope; this token has the ",
                     std::string(ScopeName(*scope)), " scope"));
  }
  return absl::OkStatus();
}

grpc::Status BearerTokenAuthProcessor::Process(const InputMetadata& auth_metadata,
                                               grpc::AuthContext* context,
                                               OutputMetadata* consumed_auth_metadata,
                                               OutputMetadata* response_metadata) {
  std::string_view method;
  if (auto path = auth_metadata.find(":path"); path != auth_metadata.end()) {
    method = std::string_view(path->second.data(), path->second.size());
  }
  std::vector<std::string_view> values;
  auto [begin, end] = auth_metadata.equal_range("authorization");
  for (auto it = begin; it != end; ++it) {
    values.emplace_back(it->second.data(), it->second.size());
    // Handlers never see the token (nor could a future log line of the request metadata).
    consumed_auth_metadata->emplace(std::string(it->first.data(), it->first.size()),
                                    std::string(it->second.data(), it->second.size()));
  }
  const absl::Status status = Authorize(*tokens_, method, values);
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Status CheckListenSecurity(const std::string& listen_address,
                                 const SecurityConfig& security) {
  const bool tokens = !security.tokens_file.empty();
  if (rpc::IsLoopbackAddress(listen_address)) return absl::OkStatus();
  if (tokens && !security.tls()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "refusing to listen on ", listen_address,
        " with bearer tokens but without TLS: the tokens would cross the network in plain "
        "text. Set security.tls_cert_file and security.tls_key_file, or listen on a loopback "
        "address"));
  }
  if (security.insecure) return absl::OkStatus();
  if (!security.tls() || !tokens) {
    std::vector<std::string> missing;
    if (!security.tls()) missing.push_back("TLS (security.tls_cert_file, security.tls_key_file)");
    if (!tokens) missing.push_back("bearer tokens (security.tokens_file)");
    return absl::FailedPreconditionError(absl::StrCat(
        "refusing to listen on ", listen_address, ", which is not a loopback address, without ",
        absl::StrJoin(missing, " and "),
        ". Configure them, or set `security: {insecure: true}` to serve without them on a "
        "network you trust"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ServerSecurity> MakeServerSecurity(const std::string& listen_address,
                                                  const SecurityConfig& security) {
  NIBBLE_RETURN_IF_ERROR(CheckListenSecurity(listen_address, security));
  std::shared_ptr<const TokenTable> tokens;
  if (!security.tokens_file.empty()) {
    absl::StatusOr<TokenTable> table = TokenTable::Load(security.tokens_file);
    if (!table.ok()) {
      return absl::Status(table.status().code(),
                          absl::StrCat("security.tokens_file: ", table.status().message()));
    }
    tokens = std::make_shared<const TokenTable>(*std::move(table));
  }
  ServerSecurity result;
  std::vector<std::string> parts;
  if (security.tls()) {
    grpc::SslServerCredentialsOptions options;
    grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
    NIBBLE_ASSIGN_OR_RETURN(pair.cert_chain,
                            ReadSecurityFile(security.tls_cert_file, "tls_cert_file"));
    NIBBLE_ASSIGN_OR_RETURN(pair.private_key,
                            ReadSecurityFile(security.tls_key_file, "tls_key_file"));
    options.pem_key_cert_pairs.push_back(std::move(pair));
    if (!security.tls_client_ca_file.empty()) {
      NIBBLE_ASSIGN_OR_RETURN(options.pem_root_certs,
                              ReadSecurityFile(security.tls_client_ca_file, "tls_client_ca_file"));
      options.client_certificate_request =
          GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
      parts.push_back("mutual TLS (client certificates required)");
    } else {
      options.client_certificate_request = GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
      parts.push_back("TLS");
    }
    result.credentials = grpc::SslServerCredentials(options);
  } else if (tokens) {
    // Insecure credentials cannot carry a token hook (gRPC asserts); local credentials speak
    // the same plain-text HTTP/2 and refuse peers that are not on this machine.
    result.credentials = grpc::experimental::LocalServerCredentials(
        listen_address.starts_with("unix") ? UDS : LOCAL_TCP);
    parts.push_back("plain text (loopback)");
  } else {
    result.credentials = grpc::InsecureServerCredentials();
    parts.push_back("plain text");
  }
  if (tokens) {
    result.credentials->SetAuthMetadataProcessor(
        std::make_shared<BearerTokenAuthProcessor>(tokens));
    parts.push_back(absl::StrCat("bearer tokens (", tokens->count(Scope::kAdmin), " admin, ",
                                 tokens->count(Scope::kInference), " inference)"));
  } else {
    parts.push_back("no tokens: every caller may call every method");
  }
  for (const auto& [path, key] : {std::pair{security.tokens_file, "tokens_file"},
                                  std::pair{security.tls_key_file, "tls_key_file"}}) {
    if (path.empty()) continue;
    if (std::optional<std::string> warning = ExposedSecretWarning(path, key)) {
      parts.push_back(*std::move(warning));
    }
  }
  result.description = absl::StrJoin(parts, ", ");
  if (!rpc::IsLoopbackAddress(listen_address) && (!security.tls() || !tokens)) {
    result.description = absl::StrCat("WARNING: security.insecure is true: ", result.description,
                                      ", on ", listen_address, ", which other machines can reach");
  }
  return result;
}

}  // namespace nibble::server
