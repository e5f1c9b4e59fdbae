#include "rpc/channel.h"

#include <arpa/inet.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace nibble::rpc {
namespace {

// The whole of a PEM file; `what` names it in errors ("--tls-ca /etc/ca.pem").
absl::StatusOr<std::string> ReadPemFile(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int error = errno;
    const std::string message =
        absl::StrCat(what, ": cannot read ", path, ": ", std::strerror(error));
    return error == EACCES ? absl::PermissionDeniedError(message) : absl::NotFoundError(message);
  }
  std::stringstream content;
  content << in.rdbuf();
  if (content.str().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", path, " is empty"));
  }
  return content.str();
}

// Tokens are one word of printable ASCII: they travel in an HTTP/2 header.
bool IsOneWordToken(absl::string_view token) {
  if (token.empty()) return false;
  for (char c : token) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c)) ||
        !absl::ascii_isprint(static_cast<unsigned char>(c))) {
      return false;
    }
  }
  return true;
}

// The host part of "host:port", "[v6]:port" or "host" (no port).
std::string_view HostOf(std::string_view address) {
  if (address.starts_with('[')) {
    const size_t close = address.find(']');
    return close == std::string_view::npos ? address : address.substr(1, close - 1);
  }
  // A bare IPv6 address has several colons and no port.
  if (address.find(':') != address.rfind(':')) return address;
  const size_t colon = address.rfind(':');
  return colon == std::string_view::npos ? address : address.substr(0, colon);
}

}  // namespace

bool IsLoopbackAddress(std::string_view address) {
  if (address.starts_with("unix:") || address.starts_with("unix-abstract:")) return true;
  const std::string host(HostOf(address));
  if (absl::AsciiStrToLower(host) == "localhost") return true;
  in_addr v4;
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6;
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int error = errno;
    const std::string message =
        absl::StrCat("token file ", path, ": cannot read: ", std::strerror(error));
    return error == EACCES ? absl::PermissionDeniedError(message) : absl::NotFoundError(message);
  }
  std::string token;
  std::string line;
  int line_number = 0;
  while (std::getline(in, line)) {
    ++line_number;
    const absl::string_view stripped = absl::StripAsciiWhitespace(line);
    if (stripped.empty() || stripped.front() == '#') continue;
    // The message names the line, not its text: the text is (part of) a secret.
    if (!token.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("token file ", path, ": line ", line_number,
                                                     ": expected one token in the file"));
    }
    if (!IsOneWordToken(stripped)) {
      return absl::InvalidArgumentError(
          absl::StrCat("token file ", path, ": line ", line_number,
                       ": a token is one word of printable characters (no spaces)"));
    }
    token = std::string(stripped);
  }
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("token file ", path, ": holds no token"));
  }
  return token;
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> OpenChannel(
    const std::string& address, const ClientSecurity& security,
    const grpc::ChannelArguments& arguments) {
  if (address.empty()) return absl::InvalidArgumentError("no server address given");
  if (security.cert_file.empty() != security.key_file.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate needs both --tls-cert and --tls-key (NIBBLE_TLS_CERT, "
        "NIBBLE_TLS_KEY)");
  }
  if (!security.tls) {
    if (!security.ca_file.empty() || !security.cert_file.empty()) {
      return absl::InvalidArgumentError("TLS certificate files given without TLS");
    }
    // Anyone on the path could read it; a daemon that checks tokens off loopback has TLS.
    if (!security.token.empty() && !IsLoopbackAddress(address)) {
      return absl::InvalidArgumentError(
          absl::StrCat("refusing to send a bearer token in plain text to ", address,
                       ", which is not a loopback address: connect with TLS (--tls or --tls-ca, "
                       "NIBBLE_TLS_CA)"));
    }
    return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), arguments);
  }
  grpc::SslCredentialsOptions options;
  if (!security.ca_file.empty()) {
    absl::StatusOr<std::string> roots = ReadPemFile(security.ca_file, "--tls-ca");
    if (!roots.ok()) return roots.status();
    options.pem_root_certs = *std::move(roots);
  }
  if (!security.cert_file.empty()) {
    absl::StatusOr<std::string> chain = ReadPemFile(security.cert_file, "--tls-cert");
    if (!chain.ok()) return chain.status();
    absl::StatusOr<std::string> key = ReadPemFile(security.key_file, "--tls-key");
    if (!key.ok()) return key.status();
    options.pem_cert_chain = *std::move(chain);
    options.pem_private_key = *std::move(key);
  }
  return grpc::CreateCustomChannel(address, grpc::SslCredentials(options), arguments);
}

void AddCallCredentials(grpc::ClientContext* context, const ClientSecurity& security) {
  // Plain metadata rather than grpc::AccessTokenCredentials: those refuse plain-text channels,
  // and a daemon on loopback may check tokens without TLS.
  if (!security.token.empty()) {
    context->AddMetadata("authorization", absl::StrCat("Bearer ", security.token));
  }
}

const char* StatusCodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
      "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i <= 16 ? kNames[i] : "UNKNOWN";
}

absl::Status FromGrpcStatus(const std::string& address, const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(address, ": ", StatusCodeName(status.error_code()), ": ",
                                   status.error_message()));
}

void SetDeadlineAfter(grpc::ClientContext* context, double seconds) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::duration_cast<std::chrono::system_clock::duration>(
                            std::chrono::duration<double>(seconds)));
}

absl::StatusOr<ClientSecurity> ClientSecurityFromFlagsAndEnv(const ClientSecurityFlags& flags,
                                                             const EnvironmentLookup& getenv) {
  const auto lookup = [&](const char* name) -> std::string {
    const char* value = getenv ? getenv(name) : std::getenv(name);
    return value ? std::string(value) : std::string();
  };
  ClientSecurity security;
  security.ca_file = flags.ca_file.empty() ? lookup("NIBBLE_TLS_CA") : flags.ca_file;
  security.cert_file = flags.cert_file.empty() ? lookup("NIBBLE_TLS_CERT") : flags.cert_file;
  security.key_file = flags.key_file.empty() ? lookup("NIBBLE_TLS_KEY") : flags.key_file;
  const std::string tls_variable = lookup("NIBBLE_TLS");
  if (!tls_variable.empty() && tls_variable != "0" && tls_variable != "1") {
    return absl::InvalidArgumentError("NIBBLE_TLS must be 0 or 1");
  }
  security.tls = flags.tls || tls_variable == "1" || !security.ca_file.empty() ||
                 !security.cert_file.empty() || !security.key_file.empty();
  if (security.cert_file.empty() != security.key_file.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate needs both --tls-cert and --tls-key (NIBBLE_TLS_CERT, "
        "NIBBLE_TLS_KEY)");
  }
  if (!flags.token_file.empty()) {
    absl::StatusOr<std::string> token = ReadTokenFile(flags.token_file);
    if (!token.ok()) return token.status();
    security.token = *std::move(token);
  } else if (std::string token = lookup("NIBBLE_TOKEN"); !token.empty()) {
    const absl::string_view stripped = absl::StripAsciiWhitespace(token);
    if (!IsOneWordToken(stripped)) {
      return absl::InvalidArgumentError(
          "NIBBLE_TOKEN: a token is one word of printable characters (no spaces)");
    }
    security.token = std::string(stripped);
  } else if (std::string path = lookup("NIBBLE_TOKEN_FILE"); !path.empty()) {
    absl::StatusOr<std::string> token = ReadTokenFile(path);
    if (!token.ok()) return token.status();
    security.token = *std::move(token);
  }
  return security;
}

}  // namespace nibble::rpc
