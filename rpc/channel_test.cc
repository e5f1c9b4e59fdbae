#include "rpc/channel.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include <gtest/gtest.h>

namespace nibble::rpc {
namespace {

namespace fs = std::filesystem;

class ChannelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "rpc_channel_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Write(const std::string& name, const std::string& text) {
    const fs::path path = dir_ / name;
    std::ofstream(path) << text;
    return path.string();
  }
  EnvironmentLookup Env() {
    return [this](const char* name) -> const char* {
      auto it = env_.find(name);
      return it == env_.end() ? nullptr : it->second.c_str();
    };
  }

  fs::path dir_;
  std::map<std::string, std::string> env_;
};

TEST_F(ChannelTest, TokenFileHoldsOneTokenWithCommentsAndWhitespace) {
  auto token = ReadTokenFile(Write("t", "# for the edge box\n\n  s3cret-Token_1  \n"));
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(*token, "s3cret-Token_1");
}

TEST_F(ChannelTest, BadTokenFilesNameTheLineNotTheToken) {
  auto two = ReadTokenFile(Write("two", "first-secret\nsecond-secret\n"));
  ASSERT_FALSE(two.ok());
  EXPECT_NE(two.status().message().find("line 2"), std::string::npos) << two.status();
  EXPECT_EQ(two.status().message().find("secret"), std::string::npos) << two.status();

  auto spaced = ReadTokenFile(Write("spaced", "admin hidden-secret\n"));
  ASSERT_FALSE(spaced.ok());
  EXPECT_NE(spaced.status().message().find("line 1"), std::string::npos);
  EXPECT_EQ(spaced.status().message().find("hidden-secret"), std::string::npos);

  auto empty = ReadTokenFile(Write("empty", "# nothing\n"));
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);

  auto missing = ReadTokenFile((dir_ / "missing").string());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("missing"), std::string::npos);
}

TEST_F(ChannelTest, FlagsWinOverEnvironment) {
  env_["NIBBLE_TOKEN"] = "from-env";
  env_["NIBBLE_TLS_CA"] = "/env/ca.pem";
  ClientSecurityFlags flags;
  flags.token_file = Write("t", "from-file\n");
  flags.ca_file = "/flag/ca.pem";
  auto security = ClientSecurityFromFlagsAndEnv(flags, Env());
  ASSERT_TRUE(security.ok()) << security.status();
  EXPECT_EQ(security->token, "from-file");
  EXPECT_EQ(security->ca_file, "/flag/ca.pem");
  EXPECT_TRUE(security->tls);
}

TEST_F(ChannelTest, EnvironmentFillsWhatFlagsLeaveOut) {
  env_["NIBBLE_TOKEN_FILE"] = Write("t", "file-token\n");
  env_["NIBBLE_TLS_CERT"] = "/env/cert.pem";
  env_["NIBBLE_TLS_KEY"] = "/env/key.pem";
  auto security = ClientSecurityFromFlagsAndEnv({}, Env());
  ASSERT_TRUE(security.ok()) << security.status();
  EXPECT_EQ(security->token, "file-token");
  EXPECT_EQ(security->cert_file, "/env/cert.pem");
  EXPECT_EQ(security->key_file, "/env/key.pem");
  EXPECT_TRUE(security->tls);
  // NIBBLE_TOKEN (the token itself) wins over NIBBLE_TOKEN_FILE.
  env_["NIBBLE_TOKEN"] = " direct \n";
  EXPECT_EQ(ClientSecurityFromFlagsAndEnv({}, Env())->token, "direct");
}

TEST_F(ChannelTest, NothingGivenMeansPlainTextWithoutToken) {
  auto security = ClientSecurityFromFlagsAndEnv({}, Env());
  ASSERT_TRUE(security.ok());
  EXPECT_FALSE(security->tls);
  EXPECT_TRUE(security->token.empty());
  env_["NIBBLE_TLS"] = "1";
  EXPECT_TRUE(ClientSecurityFromFlagsAndEnv({}, Env())->tls);
  env_["NIBBLE_TLS"] = "yes";
  EXPECT_EQ(ClientSecurityFromFlagsAndEnv({}, Env()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ChannelTest, CertificateWithoutKeyIsRefused) {
  ClientSecurityFlags flags;
  flags.cert_file = "/x/cert.pem";
  auto security = ClientSecurityFromFlagsAndEnv(flags, Env());
  EXPECT_EQ(security.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(security.status().message().find("--tls-key"), std::string::npos);
}

TEST_F(ChannelTest, TokenWithSpacesInEnvironmentIsRefusedWithoutEchoingIt) {
  env_["NIBBLE_TOKEN"] = "two words";
  auto security = ClientSecurityFromFlagsAndEnv({}, Env());
  ASSERT_FALSE(security.ok());
  EXPECT_EQ(security.status().message().find("words"), std::string::npos);
}

TEST_F(ChannelTest, OpenChannelChecksFiles) {
  ClientSecurity security;
  security.tls = true;
  security.ca_file = (dir_ / "no-such-ca.pem").string();
  auto channel = OpenChannel("localhost:1", security);
  ASSERT_FALSE(channel.ok());
  EXPECT_EQ(channel.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(channel.status().message().find("no-such-ca.pem"), std::string::npos);

  ClientSecurity plain_with_ca;
  plain_with_ca.ca_file = Write("ca.pem", "x");
  EXPECT_EQ(OpenChannel("localhost:1", plain_with_ca).status().code(),
            absl::StatusCode::kInvalidArgument);

  EXPECT_TRUE(OpenChannel("localhost:1", ClientSecurity{}).ok());
  EXPECT_EQ(OpenChannel("", ClientSecurity{}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(LoopbackAddress, IsRecognized) {
  for (const char* address : {"127.0.0.1:50051", "127.1.2.3:1", "localhost:50051", "LOCALHOST:1",
                              "[::1]:50051", "::1", "unix:/run/nibbled.sock"}) {
    EXPECT_TRUE(IsLoopbackAddress(address)) << address;
  }
  for (const char* address :
       {"0.0.0.0:50051", "[::]:50051", ":50051", "10.0.0.5:50051", "192.168.1.2:1",
        "edge.example.com:50051", "128.0.0.1:1", "[::ffff:10.0.0.1]:1", "localhost.evil.com:1",
        "dns:///localhost:1"}) {
    EXPECT_FALSE(IsLoopbackAddress(address)) << address;
  }
}

TEST_F(ChannelTest, TokenIsNeverSentInPlainTextOffLoopback) {
  ClientSecurity security;
  security.token = "abcdefghijklmnop";
  auto remote = OpenChannel("edge.example.com:50051", security);
  ASSERT_FALSE(remote.ok());
  EXPECT_EQ(remote.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(remote.status().message().find("plain text"), std::string::npos);
  EXPECT_EQ(remote.status().message().find("abcdefghijklmnop"), std::string::npos);
  EXPECT_TRUE(OpenChannel("127.0.0.1:50051", security).ok());
  security.tls = true;
  EXPECT_TRUE(OpenChannel("edge.example.com:50051", security).ok());
}

TEST(CallStatus, NamesTheDaemonAndTheCode) {
  EXPECT_STREQ(StatusCodeName(grpc::StatusCode::INVALID_ARGUMENT), "INVALID_ARGUMENT");
  EXPECT_STREQ(StatusCodeName(grpc::StatusCode::UNAUTHENTICATED), "UNAUTHENTICATED");
  EXPECT_STREQ(StatusCodeName(static_cast<grpc::StatusCode>(17)), "UNKNOWN");
  EXPECT_TRUE(FromGrpcStatus("h:1", grpc::Status::OK).ok());
  const absl::Status status =
      FromGrpcStatus("h:1", grpc::Status(grpc::StatusCode::NOT_FOUND, "no artifact"));
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(status.message(), "h:1: NOT_FOUND: no artifact");
}

}  // namespace
}  // namespace nibble::rpc
