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

TEST(ServerConfig, DeviceNamesACudaDevice) {
  auto config = Parse("models:\n  - name: a\n    path: /a\n    device: cuda:1\n");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->models[0].load.device.kind, engine::Device::Kind::kCuda);
  EXPECT_EQ(config->models[0].load.device.index, 1);
  EXPECT_EQ(config->models[0].load.device.ToString(), "cuda:1");
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
  ExpectError("models: 3\n", "'models'", "expected a list");
  ExpectError("models:\n  - path: /a\n", "models[0].name", "missing");
  ExpectError("models:\n  - name: a\n", "models[0].path", "missing");
  ExpectError("models:\n  - name: a\n    path: /a\n    dtype: int3\n", "models[0].dtype", "int3");
  ExpectError("models:\n  - name: a\n    path: /a\n    device: gpu\n", "models[0].device",
              "cuda:N");
  ExpectError("models:\n  - name: a\n    path: /a\n    device: cuda:x\n", "models[0].device",
              "cuda:N");
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
  for (const char* name : {"nibbled.yaml", "nibbled-edge.yaml", "nibbled-secure.yaml"}) {
    auto config = LoadServerConfig(std::string(NIBBLE_SOURCE_DIR) + "/deploy/" + name);
    ASSERT_TRUE(config.ok()) << name << ": " << config.status();
    EXPECT_EQ(config->models.size(), 1u);
  }
}

// The pipeline examples (quantizer, edge that pulls, both in one) stay valid too.
TEST(ServerConfig, PipelineDeployExamplesParse) {
  for (const char* name :
       {"nibbled-quantizer.yaml", "nibbled-edge-pull.yaml", "nibbled-all-in-one.yaml"}) {
    auto config = LoadServerConfig(std::string(NIBBLE_SOURCE_DIR) + "/deploy/" + name);
    ASSERT_TRUE(config.ok()) << name << ": " << config.status();
    EXPECT_FALSE(config->state_dir.empty()) << name;
  }
  auto edge = LoadServerConfig(std::string(NIBBLE_SOURCE_DIR) + "/deploy/nibbled-edge-pull.yaml");
  ASSERT_TRUE(edge.ok());
  EXPECT_TRUE(edge->models.empty());
  ASSERT_EQ(edge->artifacts.peers.size(), 1u);
  EXPECT_TRUE(edge->artifacts.peers[0].tls);
  EXPECT_GT(edge->memory_budget_bytes, 0);
}

TEST(ServerConfig, QuantizerSectionRolesAndStateDir) {
  auto config = Parse(std::string(kMinimal) + R"(
roles: [quantizer, inference]
state_dir: state
quantizer:
  model_roots: [/srv/models, hf]
  max_concurrent_jobs: 2
  max_queued_jobs: 3
  device: cuda:1
  datasets_dir: data
)");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->roles.quantizer);
  EXPECT_TRUE(config->roles.inference);
  EXPECT_EQ(config->state_dir, "/etc/nibble/state");
  EXPECT_EQ(config->quantizer.model_roots,
            (std::vector<std::string>{"/srv/models", "/etc/nibble/hf"}));
  EXPECT_EQ(config->quantizer.max_concurrent_jobs, 2);
  EXPECT_EQ(config->quantizer.max_queued_jobs, 3);
  EXPECT_EQ(config->quantizer.device, "cuda:1");
  EXPECT_EQ(config->quantizer.datasets_dir, "/etc/nibble/data");
}

TEST(ServerConfig, QuantizerRoleDefaultsToOnlyWithAStateDir) {
  auto without = Parse(kMinimal);
  ASSERT_TRUE(without.ok()) << without.status();
  EXPECT_TRUE(without->roles.inference);
  EXPECT_FALSE(without->roles.quantizer);
  EXPECT_EQ(without->quantizer.max_concurrent_jobs, 1);
  EXPECT_EQ(without->quantizer.max_queued_jobs, 16);
  auto with = Parse(std::string(kMinimal) + "state_dir: /var/lib/nibble\n");
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_TRUE(with->roles.quantizer);
  auto inference_only = Parse(std::string(kMinimal) + "state_dir: /s\nroles: [inference]\n");
  ASSERT_TRUE(inference_only.ok()) << inference_only.status();
  EXPECT_FALSE(inference_only->roles.quantizer);
}

TEST(ServerConfig, BadQuantizerKeysAreNamed) {
  const std::string m = kMinimal;
  ExpectError(m + "roles: [quantizer]\n", "state_dir", "quantizer role");
  ExpectError(m + "roles: [chef]\n", "roles[0]", "not a role");
  ExpectError(m + "roles: []\n", "roles", "non-empty list");
  ExpectError(m + "state_dir: ''\n", "state_dir", "empty");
  ExpectError(m + "quantizer:\n  device: gpu0\n", "quantizer.device", "cuda:N");
  ExpectError(m + "quantizer:\n  max_concurrent_jobs: 0\n", "quantizer.max_concurrent_jobs",
              "must be in");
  ExpectError(m + "quantizer:\n  max_queued_jobs: 0\n", "quantizer.max_queued_jobs",
              "must be in");
  ExpectError(m + "quantizer:\n  model_roots: /srv\n", "quantizer.model_roots", "list");
  ExpectError(m + "quantizer:\n  model_root: [/srv]\n", "quantizer.model_root", "unknown key");
}

// A daemon that loads its models later (Models.Load) needs none in its config.
TEST(ServerConfig, ArtifactsKeysAndNoModels) {
  for (const char* text : {"listen: 127.0.0.1:1\n", "models: []\n", "models:\n"}) {
    auto config = Parse(text);
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_TRUE(config->models.empty());
  }
  auto config = Parse(
      "artifacts:\n  max_upload_bytes: 2GiB\n  model_roots: [models]\n"
      "  pull_max_bytes_per_second: 1MiB\n"
      "  peers:\n    - address: q:50051\n      tls_ca: ca.pem\n      token_file: t\n"
      "memory_budget: 3GiB\n");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->artifacts.max_upload_bytes, int64_t{2} << 30);
  EXPECT_EQ(config->artifacts.model_roots, std::vector<std::string>{"/etc/nibble/models"});
  EXPECT_EQ(config->artifacts.pull_max_bytes_per_second, 1048576.0);
  ASSERT_EQ(config->artifacts.peers.size(), 1u);
  EXPECT_EQ(config->artifacts.peers[0].address, "q:50051");
  EXPECT_TRUE(config->artifacts.peers[0].tls);
  EXPECT_EQ(config->artifacts.peers[0].tls_ca, "/etc/nibble/ca.pem");
  EXPECT_EQ(config->artifacts.peers[0].token_file, "/etc/nibble/t");
  EXPECT_EQ(config->memory_budget_bytes, int64_t{3} << 30);
  ExpectError("artifacts:\n  max_upload_bytes: 0\n", "artifacts.max_upload_bytes", "more than 0");
  ExpectError("artifacts:\n  peers:\n    - tls: true\n", "artifacts.peers[0].address", "missing");
  ExpectError("artifacts:\n  peers:\n    - address: a:1\n      tls_cert: c\n",
              "artifacts.peers[0]", "tls_key");
  ExpectError("artifacts:\n  peer: []\n", "artifacts.peer", "unknown key");
  ExpectError("memory_budget: much\n", "memory_budget", "not a size");
}

TEST(ServerConfig, SecuritySection) {
  auto none = Parse(kMinimal);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->security.tls());
  EXPECT_TRUE(none->security.tokens_file.empty());
  EXPECT_FALSE(none->security.insecure);

  auto config = Parse(std::string(kMinimal) + R"(
security:
  tls_cert_file: tls/server.pem
  tls_key_file: /secrets/server.key
  tls_client_ca_file: tls/clients-ca.pem
  tokens_file: tokens
  insecure: false
)");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->security.tls());
  EXPECT_EQ(config->security.tls_cert_file, "/etc/nibble/tls/server.pem");
  EXPECT_EQ(config->security.tls_key_file, "/secrets/server.key");
  EXPECT_EQ(config->security.tls_client_ca_file, "/etc/nibble/tls/clients-ca.pem");
  EXPECT_EQ(config->security.tokens_file, "/etc/nibble/tokens");
  EXPECT_FALSE(config->security.insecure);

  auto insecure = Parse(std::string(kMinimal) + "security:\n  insecure: true\n");
  ASSERT_TRUE(insecure.ok()) << insecure.status();
  EXPECT_TRUE(insecure->security.insecure);
}

TEST(ServerConfig, BadSecurityKeysAreNamed) {
  const std::string m = kMinimal;
  ExpectError(m + "security: on\n", "security", "mapping");
  ExpectError(m + "security:\n  tls_cert: a.pem\n", "security.tls_cert", "unknown key");
  ExpectError(m + "security:\n  tls_cert_file: a.pem\n", "security.tls_key_file", "both");
  ExpectError(m + "security:\n  tls_key_file: a.key\n", "security.tls_cert_file", "both");
  ExpectError(m + "security:\n  tls_client_ca_file: ca.pem\n", "security.tls_client_ca_file",
              "needs TLS");
  ExpectError(m + "security:\n  tokens_file: ''\n", "security.tokens_file", "empty");
  // "in so many words": yes, 1 or on do not switch security off.
  for (const char* word : {"yes", "1", "on", "True?"}) {
    ExpectError(m + "security:\n  insecure: " + word + "\n", "security.insecure",
                "true or false");
  }
}

}  // namespace
}  // namespace nibble::server
