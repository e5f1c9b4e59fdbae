#include "server/auth.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace nibble::server {
namespace {

constexpr char kAdminToken[] = "admin-token-0123456789abcdef";
constexpr char kInferenceToken[] = "inference-token-0123456789";

TokenTable Tokens() {
  auto table = TokenTable::Parse(std::string("# nibbled tokens\n\nadmin ") + kAdminToken +
                                     "\n  inference\t" + kInferenceToken + "  \n",
                                 "tokens.txt");
  EXPECT_TRUE(table.ok()) << table.status();
  return *std::move(table);
}

TEST(RequiredScope, FollowsTheAgreedTable) {
  for (const char* method :
       {"/nibble.v1.Inference/Chat", "/nibble.v1.Inference/Generate",
        "/nibble.v1.Inference/Tokenize", "/nibble.v1.Inference/EndSession",
        "/nibble.v1.Models/List", "/nibble.v1.Models/Get", "/nibble.v1.Artifacts/List",
        "/nibble.v1.Artifacts/Stat", "/nibble.v1.Artifacts/Download",
        "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}) {
    EXPECT_EQ(RequiredScope(method), Scope::kInference) << method;
  }
  for (const char* method :
       {"/nibble.v1.Quantization/SubmitJob", "/nibble.v1.Quantization/CancelJob",
        "/nibble.v1.Quantization/ListJobs", "/nibble.v1.Quantization/DeleteJob",
        "/nibble.v1.Artifacts/Upload", "/nibble.v1.Models/Load", "/nibble.v1.Models/Unload",
        // Unknown methods, near misses and malformed paths: admin (deny by default).
        "/nibble.v1.Models/ListX", "/nibble.v1.Models/List/", "/nibble.v1.Inference/",
        "/nibble.v1.Inference/Chat/x", "/nibble.v2.Inference/Chat", "/nibble.v1.Secret/Run", "",
        "nibble.v1.Models/List"}) {
    EXPECT_EQ(RequiredScope(method), Scope::kAdmin) << method;
  }
}

TEST(TokenTable, ParsesScopesCommentsAndWhitespace) {
  const TokenTable tokens = Tokens();
  EXPECT_EQ(tokens.count(Scope::kAdmin), 1);
  EXPECT_EQ(tokens.count(Scope::kInference), 1);
  EXPECT_EQ(tokens.Lookup(kAdminToken), Scope::kAdmin);
  EXPECT_EQ(tokens.Lookup(kInferenceToken), Scope::kInference);
  EXPECT_EQ(tokens.Lookup("admin-token-0123456789abcdeF"), std::nullopt);
  EXPECT_EQ(tokens.Lookup("admin-token-0123456789abcde"), std::nullopt);  // a prefix
  EXPECT_EQ(tokens.Lookup(""), std::nullopt);
}

void ExpectBadFile(const std::string& text, const std::string& line, const std::string& secret) {
  auto table = TokenTable::Parse(text, "tokens.txt");
  ASSERT_FALSE(table.ok()) << text;
  EXPECT_EQ(table.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(table.status().message());
  EXPECT_NE(message.find("tokens.txt"), std::string::npos) << message;
  EXPECT_NE(message.find(line), std::string::npos) << message;
  if (!secret.empty()) {
    EXPECT_EQ(message.find(secret), std::string::npos) << message;
  }
}

TEST(TokenTable, BadLinesNameTheLineAndNeverTheToken) {
  ExpectBadFile("admin only-one-word-secret-xyz extra\n", "line 1", "only-one-word-secret-xyz");
  ExpectBadFile("# c\nroot secret-token-abcdefghij\n", "line 2", "secret-token-abcdefghij");
  // Scope and token swapped: the token sits where the scope should be; not echoed.
  ExpectBadFile("\n\nsecret-token-abcdefghij admin\n", "line 3", "secret-token-abcdefghij");
  ExpectBadFile("admin short-secret\n", "line 1", "short-secret");
  ExpectBadFile("inference\n", "line 1", "");
  ExpectBadFile("admin tok\x01secret-abcdefghijkl\n", "line 1", "secret-abcdefghijkl");
  ExpectBadFile("admin dup-secret-abcdefghijkl\ninference dup-secret-abcdefghijkl\n", "line 2",
                "dup-secret-abcdefghijkl");
  ExpectBadFile("# nothing here\n\n", "no tokens", "");
}

TEST(TokenTable, LoadNamesAMissingFile) {
  auto table = TokenTable::Load("/nonexistent/nibble-tokens");
  ASSERT_FALSE(table.ok());
  EXPECT_EQ(table.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(table.status().message().find("/nonexistent/nibble-tokens"), std::string::npos);
}

absl::Status Call(const TokenTable& tokens, const char* method,
                  std::vector<std::string_view> authorization) {
  return Authorize(tokens, method, authorization);
}

TEST(Authorize, MissingOrWrongTokenIsUnauthenticated) {
  const TokenTable tokens = Tokens();
  const std::string wrong = "Bearer not-a-token-0123456789";
  const std::string raw_token = kAdminToken;  // without "Bearer "
  for (const auto& values : std::vector<std::vector<std::string_view>>{
           {}, {wrong}, {raw_token}, {"Bearer "}, {"Basic abc"}, {"Bearer"}}) {
    absl::Status status = Call(tokens, "/nibble.v1.Inference/Chat", values);
    EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << status;
    EXPECT_EQ(status.message().find("not-a-token"), std::string::npos) << status;
    EXPECT_EQ(status.message().find(kAdminToken), std::string::npos) << status;
  }
  const std::string good = std::string("Bearer ") + kAdminToken;
  EXPECT_EQ(Call(tokens, "/nibble.v1.Inference/Chat", {good, good}).code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(Authorize, InferenceTokenCallsInferenceMethodsOnly) {
  const TokenTable tokens = Tokens();
  const std::string inference = std::string("Bearer ") + kInferenceToken;
  EXPECT_TRUE(Call(tokens, "/nibble.v1.Inference/Chat", {inference}).ok());
  EXPECT_TRUE(Call(tokens, "/nibble.v1.Models/List", {inference}).ok());
  EXPECT_TRUE(Call(tokens, "/nibble.v1.Artifacts/Download", {inference}).ok());
  absl::Status denied = Call(tokens, "/nibble.v1.Models/Load", {inference});
  EXPECT_EQ(denied.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(denied.message().find("/nibble.v1.Models/Load"), std::string::npos) << denied;
  EXPECT_NE(denied.message().find("admin"), std::string::npos) << denied;
  EXPECT_EQ(denied.message().find(kInferenceToken), std::string::npos) << denied;
  EXPECT_EQ(Call(tokens, "/nibble.v1.Quantization/SubmitJob", {inference}).code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Call(tokens, "/nibble.v1.Unknown/Method", {inference}).code(),
            absl::StatusCode::kPermissionDenied);
}

TEST(Authorize, AdminTokenCallsEverything) {
  const TokenTable tokens = Tokens();
  const std::string admin = std::string("Bearer ") + kAdminToken;
  for (const char* method :
       {"/nibble.v1.Inference/Chat", "/nibble.v1.Models/Load", "/nibble.v1.Quantization/SubmitJob",
        "/nibble.v1.Artifacts/Upload", "/nibble.v1.Unknown/Method"}) {
    EXPECT_TRUE(Call(tokens, method, {admin}).ok()) << method;
  }
  // The scheme is case-insensitive (RFC 7235); the token is not.
  const std::string lower = std::string("bearer ") + kAdminToken;
  EXPECT_TRUE(Call(tokens, "/nibble.v1.Models/Load", {lower}).ok());
}

TEST(ListenAddress, NonLoopbackNeedsTlsAndTokensOrInsecure) {
  SecurityConfig none;
  EXPECT_TRUE(CheckListenSecurity("127.0.0.1:50051", none).ok());
  absl::Status refused = CheckListenSecurity("0.0.0.0:50051", none);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.message().find("insecure: true"), std::string::npos) << refused;
  EXPECT_NE(refused.message().find("TLS"), std::string::npos) << refused;
  EXPECT_NE(refused.message().find("tokens_file"), std::string::npos) << refused;

  SecurityConfig tls_only;
  tls_only.tls_cert_file = "c.pem";
  tls_only.tls_key_file = "k.pem";
  absl::Status no_tokens = CheckListenSecurity("0.0.0.0:50051", tls_only);
  EXPECT_EQ(no_tokens.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(no_tokens.message().find("tokens_file"), std::string::npos) << no_tokens;
  EXPECT_EQ(no_tokens.message().find("tls_cert_file"), std::string::npos) << no_tokens;

  SecurityConfig both = tls_only;
  both.tokens_file = "tokens";
  EXPECT_TRUE(CheckListenSecurity("0.0.0.0:50051", both).ok());

  SecurityConfig insecure;
  insecure.insecure = true;
  EXPECT_TRUE(CheckListenSecurity("0.0.0.0:50051", insecure).ok());

  // Tokens in plain text across the network: refused even with insecure: true.
  SecurityConfig tokens_plain;
  tokens_plain.tokens_file = "tokens";
  tokens_plain.insecure = true;
  EXPECT_TRUE(CheckListenSecurity("127.0.0.1:1", tokens_plain).ok());
  absl::Status plain = CheckListenSecurity("0.0.0.0:1", tokens_plain);
  EXPECT_EQ(plain.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(plain.message().find("plain text"), std::string::npos) << plain;
}

TEST(ServerSecurity, MissingFilesAreNamed) {
  SecurityConfig tls;
  tls.tls_cert_file = "/nonexistent/server.pem";
  tls.tls_key_file = "/nonexistent/server.key";
  auto security = MakeServerSecurity("127.0.0.1:1", tls);
  ASSERT_FALSE(security.ok());
  EXPECT_NE(security.status().message().find("security.tls_cert_file"), std::string::npos);
  EXPECT_NE(security.status().message().find("/nonexistent/server.pem"), std::string::npos);

  SecurityConfig tokens;
  tokens.tokens_file = "/nonexistent/tokens";
  auto without = MakeServerSecurity("127.0.0.1:1", tokens);
  ASSERT_FALSE(without.ok());
  EXPECT_NE(without.status().message().find("security.tokens_file"), std::string::npos);
}

TEST(ServerSecurity, TokensFileOpenToOthersIsWarnedAbout) {
  char path[] = "/tmp/nibble_auth_test_tokens.XXXXXX";
  const int fd = mkstemp(path);  // mode 0600
  ASSERT_GE(fd, 0);
  const std::string text = std::string("admin ") + kAdminToken + "\n";
  ASSERT_EQ(write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  close(fd);
  SecurityConfig config;
  config.tokens_file = path;
  auto private_file = MakeServerSecurity("127.0.0.1:1", config);
  ASSERT_TRUE(private_file.ok()) << private_file.status();
  EXPECT_NE(private_file->description.find("bearer tokens (1 admin, 0 inference)"),
            std::string::npos)
      << private_file->description;
  EXPECT_EQ(private_file->description.find("WARNING"), std::string::npos);
  ASSERT_EQ(chmod(path, 0644), 0);
  auto shared_file = MakeServerSecurity("127.0.0.1:1", config);
  ASSERT_TRUE(shared_file.ok()) << shared_file.status();
  EXPECT_NE(shared_file->description.find("WARNING: security.tokens_file"), std::string::npos)
      << shared_file->description;
  EXPECT_NE(shared_file->description.find("0644"), std::string::npos);
  EXPECT_EQ(shared_file->description.find(kAdminToken), std::string::npos);
  unlink(path);
}

TEST(ServerSecurity, PlainLoopbackSaysNothingIsChecked) {
  auto security = MakeServerSecurity("127.0.0.1:1", SecurityConfig{});
  ASSERT_TRUE(security.ok()) << security.status();
  EXPECT_NE(security->credentials, nullptr);
  EXPECT_NE(security->description.find("no tokens"), std::string::npos);
  SecurityConfig insecure;
  insecure.insecure = true;
  auto open = MakeServerSecurity("0.0.0.0:1", insecure);
  ASSERT_TRUE(open.ok()) << open.status();
  EXPECT_NE(open->description.find("WARNING"), std::string::npos) << open->description;
}

}  // namespace
}  // namespace nibble::server
