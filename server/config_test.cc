#include "server/config.h"

#include <gtest/gtest.h>

namespace nibble::server {
namespace {

constexpr char kMinimal[] = "models:\n  - name: tiny\n    path: models/tiny\n";

absl::StatusOr<ServerConfig> Parse(const std::string& text) {
  return ParseServerConfig(text, "test.yaml", "/etc/nibble");
}

void ExpectError(const std::string& text, const std::string& key, const std::string& words) {
  auto config = Parse(text);
  ASSERT_FALSE(config.ok()) << text;
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(config.status().message());
  EXPECT_NE(message.find("test.yaml"), std::string::npos) << message;
  EXPECT_NE(message.find(key), std::string::npos) << message;
  EXPECT_NE(message.find(words), std::string::npos) << message;
}

TEST(ServerConfig, MinimalFileTakesDefaultsAndResolvesRelativePaths) {
  auto config = Parse(kMinimal);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->listen_address, "0.0.0.0:50051");
  EXPECT_EQ(config->metrics_address, "0.0.0.0:9464");
  ASSERT_EQ(config->models.size(), 1u);
  EXPECT_EQ(config->models[0].path, "/etc/nibble/models/tiny");
  EXPECT_EQ(config->models[0].device, "cpu");
  EXPECT_EQ(config->engine.cache_block_seq_len, engine::EngineOptions{}.cache_block_seq_len);
  EXPECT_EQ(config->max_request_bytes, 1 << 20);
}

TEST(ServerConfig, EveryKeyIsRead) {
  auto config = Parse(R"(
listen: 127.0.0.1:7000
metrics_listen: 127.0.0.1:7001
drain_grace_seconds: 2.5
max_request_bytes: 64KiB
models:
  - name: a
    path: /m/a
    device: cpu
    dtype: float16
    cpu_threads: 3
engine:
  cache_max_entry_count: 0.25
  cache_block_seq_len: 16
  cache_chunk_size: 2
  session_len: 300
  max_batch_size: 8
  max_queued_requests: 9
  max_prefill_tokens_per_step: 64
  max_sessions: 5
  cpu_memory_budget: 64MiB
)");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->listen_address, "127.0.0.1:7000");
  EXPECT_EQ(config->metrics_address, "127.0.0.1:7001");
  EXPECT_DOUBLE_EQ(config->drain_grace_seconds, 2.5);
  EXPECT_EQ(config->max_request_bytes, 64 << 10);
  EXPECT_EQ(config->models[0].load.weight_storage, engine::WeightStorage::kF16);
  EXPECT_EQ(config->models[0].load.cpu_threads, 3);
  EXPECT_DOUBLE_EQ(config->engine.cache_max_entry_count, 0.25);
  EXPECT_EQ(config->engine.cache_block_seq_len, 16);
  EXPECT_EQ(config->engine.cache_chunk_size, 2);
  EXPECT_EQ(config->engine.session_len, 300);
  EXPECT_EQ(config->engine.max_batch_size, 8);
  EXPECT_EQ(config->engine.max_queued_requests, 9);
  EXPECT_EQ(config->engine.max_prefill_tokens_per_step, 64);
  EXPECT_EQ(config->engine.max_sessions, 5);
  EXPECT_EQ(config->engine.cpu_memory_budget_bytes, 64 << 20);
}

TEST(ServerConfig, ErrorsNameTheKey) {
  ExpectError(std::string(kMinimal) + "lisen: x\n", "'lisen'", "unknown key");
  ExpectError(std::string(kMinimal) + "engine:\n  cache_block_seq_len: abc\n",
              "engine.cache_block_seq_len", "expected an integer");
  ExpectError(std::string(kMinimal) + "engine:\n  cache_block_seq_len: 0\n",
              "engine.cache_block_seq_len", "must be in");
  ExpectError(std::string(kMinimal) + "engine:\n  cache_max_entry_count: 1.5\n",
              "engine.cache_max_entry_count", "(0, 1]");
  ExpectError(std::string(kMinimal) + "engine:\n  cpu_memory_budget: 1 potato\n",
              "engine.cpu_memory_budget", "unknown unit");
  ExpectError(std::string(kMinimal) + "engine:\n  batch: 3\n", "engine.batch", "unknown key");
  ExpectError(std::string(kMinimal) + "engine:\n  cache_chunk_size: 0\n",
              "engine.cache_chunk_size", "-1");
  ExpectError(std::string(kMinimal) + "engine:\n  cache_chunk_size: -2\n",
              "engine.cache_chunk_size", "must be in");
  ExpectError(std::string(kMinimal) + "drain_grace_seconds: -1\n", "drain_grace_seconds",
              "must be in");
  ExpectError(std::string(kMinimal) + "max_request_bytes: 10\n", "max_request_bytes",
              "must be in");
  ExpectError(std::string(kMinimal) + "max_request_bytes: 3GiB\n", "max_request_bytes",
              "must be in");
  ExpectError(std::string(kMinimal) + "max_request_bytes: lots\n", "max_request_bytes",
              "not a size");
  ExpectError("models: []\n", "'models'", "non-empty list");
  ExpectError("listen: x\n", "'models'", "missing");
  ExpectError("models:\n  - path: /a\n", "models[0].name", "missing");
  ExpectError("models:\n  - name: a\n", "models[0].path", "missing");
  ExpectError("models:\n  - name: a\n    path: /a\n    dtype: int3\n", "models[0].dtype", "int3");
  ExpectError("models:\n  - name: a\n    path: /a\n    device: cuda\n", "models[0].device",
              "cpu");
  ExpectError("models:\n  - name: a\n    path: /a\n    colour: red\n", "models[0].colour",
              "unknown key");
  ExpectError("models:\n  - name: a\n    path: /a\n  - name: a\n    path: /b\n",
              "models[1].name", "twice");
  ExpectError("models:\n  - name: 'a b'\n    path: /a\n", "models[0].name", "A-Za-z0-9");
}

TEST(ServerConfig, BadYamlNamesTheLine) {
  auto config = Parse("models:\n  - name: [unclosed\n");
  ASSERT_FALSE(config.ok());
  EXPECT_NE(std::string(config.status().message()).find("test.yaml:"), std::string::npos);
  EXPECT_NE(std::string(config.status().message()).find("not valid YAML"), std::string::npos);
}

TEST(ServerConfig, ByteSizes) {
  EXPECT_EQ(*ParseByteSize("1GiB"), int64_t{1} << 30);
  EXPECT_EQ(*ParseByteSize("512 MiB"), int64_t{512} << 20);
  EXPECT_EQ(*ParseByteSize("2GB"), 2000000000);
  EXPECT_EQ(*ParseByteSize("1048576"), 1048576);
  EXPECT_EQ(*ParseByteSize("1.5KiB"), 1536);
  EXPECT_FALSE(ParseByteSize("").ok());
  EXPECT_FALSE(ParseByteSize("GiB").ok());
  EXPECT_FALSE(ParseByteSize("-1GiB").ok());
  EXPECT_FALSE(ParseByteSize("1 XB").ok());
}

}  // namespace
}  // namespace nibble::server

namespace nibble::server {
namespace {

// The documented examples stay valid.
TEST(ServerConfig, DeployExamplesParse) {
  for (const char* name : {"nibbled.yaml", "nibbled-edge.yaml"}) {
    auto config = LoadServerConfig(std::string(NIBBLE_SOURCE_DIR) + "/deploy/" + name);
    ASSERT_TRUE(config.ok()) << name << ": " << config.status();
    EXPECT_EQ(config->models.size(), 1u);
  }
}

}  // namespace
}  // namespace nibble::server
