// The artifact manifest: written after the files, read back equal, and every kind of
// tampering (changed byte, truncation, extra, missing, symlink) refused with the file named.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "engine/atomic_file.h"
#include "engine/sha256.h"
#include "quant/manifest.h"

namespace nibble::quant {
namespace {
namespace fs = std::filesystem;

TEST(Sha256Test, KnownDigests) {
  EXPECT_EQ(engine::Sha256OfString("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(engine::Sha256OfString(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(engine::Sha256OfString("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(Sha256Test, FileMatchesStringAndNamesMissingPath) {
  const fs::path dir = fs::path(testing::TempDir()) / ("sha256_" + std::to_string(getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / "abc").string();
  ASSERT_TRUE(engine::WriteFileAtomically(path, std::string_view("abc")).ok());
  auto digest = engine::Sha256OfFile(path);
  ASSERT_TRUE(digest.ok()) << digest.status();
  EXPECT_EQ(*digest, engine::Sha256OfString("abc"));
  // Larger than one read buffer (64 KiB).
  std::string big(200000, 'x');
  ASSERT_TRUE(engine::WriteFileAtomically(path, std::string_view(big)).ok());
  digest = engine::Sha256OfFile(path);
  ASSERT_TRUE(digest.ok()) << digest.status();
  EXPECT_EQ(*digest, engine::Sha256OfString(big));
  auto missing = engine::Sha256OfFile((dir / "nope").string());
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("nope"), std::string::npos);
  fs::remove_all(dir);
}

class ManifestTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(testing::TempDir()) /
           ("manifest_" + std::to_string(getpid()) + "_" +
            testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "sub");
    Write("config.json", "{\"a\": 1}\n");
    Write("model.safetensors", std::string(1000, '\x07'));
    Write("sub/tokenizer.model", "pieces");
  }
  void TearDown() override { fs::remove_all(dir_); }

  void Write(const std::string& name, const std::string& bytes) {
    std::ofstream out(dir_ / name, std::ios::binary | std::ios::trunc);
    out << bytes;
  }

  static ArtifactManifest Sample() {
    ArtifactManifest m;
    m.architecture = "LlamaForCausalLM";
    m.quantization.method = "awq";
    m.quantization.group_size = 64;
    m.quantization.calibration_dataset = "pileval";
    m.quantization.calibration_samples = 128;
    m.quantization.calibration_seqlen = 512;
    m.engine.session_len = 2048;
    m.chat_template = "llama2";
    m.report.layers = {{"model.layers.0.mlp.down_proj.weight", 0.0123456789012345},
                       {"model.layers.0.self_attn.q_proj.weight", 1.0 / 3.0}};
    m.report.not_converted = {"model.layers.0.x (12 output features, not a multiple of 8)"};
    m.report.seconds = {{"quantize", 1.25}, {"calibrate", 0.1}};
    m.report.perplexity_before = 5.5;
    m.report.perplexity_after = 5.75;
    return m;
  }

  // The manifest's files as the test expects them.
  static std::map<std::string, ManifestFile> ExpectedFiles() {
    return {{"config.json", {9, engine::Sha256OfString("{\"a\": 1}\n")}},
            {"model.safetensors", {1000, engine::Sha256OfString(std::string(1000, '\x07'))}},
            {"sub/tokenizer.model", {6, engine::Sha256OfString("pieces")}}};
  }

  // VerifyArtifact fails, naming `file` and containing `what`.
  void ExpectRefused(const std::string& file, const std::string& what) {
    absl::Status status = VerifyArtifact(dir_.string());
    ASSERT_FALSE(status.ok()) << "tampering with " << file << " went unnoticed";
    EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
    const std::string message(status.message());
    EXPECT_NE(message.find(file), std::string::npos) << message;
    EXPECT_NE(message.find(what), std::string::npos) << message;
  }

  fs::path dir_;
};

TEST_F(ManifestTest, WrittenManifestReadsBackEqual) {
  const ArtifactManifest written = Sample();
  ASSERT_TRUE(WriteManifest(dir_.string(), written).ok());
  ASSERT_TRUE(fs::exists(dir_ / kManifestFileName));
  auto read = ReadManifest(dir_.string());
  ASSERT_TRUE(read.ok()) << read.status();
  ArtifactManifest expected = written;
  expected.files = ExpectedFiles();
  EXPECT_EQ(*read, expected);
  EXPECT_EQ(read->format_version, 1);
  EXPECT_TRUE(VerifyArtifact(dir_.string()).ok()) << VerifyArtifact(dir_.string());
  // No temporary file is left beside it.
  int entries = 0;
  for (const auto& e : fs::directory_iterator(dir_)) (void)e, ++entries;
  EXPECT_EQ(entries, 4);  // config.json, model.safetensors, sub, the manifest
}

TEST_F(ManifestTest, DefaultsAreTheTutorials) {
  ArtifactManifest m;
  m.architecture = "LlamaForCausalLM";
  m.chat_template = "plain";
  ASSERT_TRUE(WriteManifest(dir_.string(), m).ok());
  auto read = ReadManifest(dir_.string());
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->engine.cache_max_entry_count, 0.5);
  EXPECT_EQ(read->engine.cache_block_seq_len, 128);
  EXPECT_EQ(read->engine.cache_chunk_size, 1);
  EXPECT_EQ(read->engine.max_batch_size, 64);
  EXPECT_EQ(read->quantization.bits, 4);
  EXPECT_FALSE(read->quantization.calibration_dataset.has_value());
  EXPECT_FALSE(read->report.perplexity_before.has_value());
}

TEST_F(ManifestTest, BuildsFromAModelConfig) {
  engine::ModelConfig config;
  config.architecture = engine::Architecture::kLlama;
  config.vocab_size = 32000;
  config.max_position_embeddings = 4096;
  QuantizeOptions options;
  options.group_size = 32;
  QuantizeReport report;
  report.layers = {{"model.layers.0.mlp.up_proj.weight", 0.02}};
  ArtifactManifest m = BuildQuantizeManifest(config, options, report, {{"quantize", 2.0}});
  EXPECT_EQ(m.architecture, "LlamaForCausalLM");
  EXPECT_EQ(m.quantization.method, "rtn");
  EXPECT_EQ(m.quantization.group_size, 32);
  EXPECT_EQ(m.engine.session_len, 4096);
  EXPECT_EQ(m.chat_template, "llama2");
  ASSERT_EQ(m.report.layers.size(), 1u);
  EXPECT_EQ(m.report.layers[0].relative_error, 0.02);
  EXPECT_EQ(m.report.seconds.at("quantize"), 2.0);
  config.vocab_size = 512;
  EXPECT_EQ(BuildQuantizeManifest(config, options, report, {}).chat_template, "plain");
}

TEST_F(ManifestTest, ChangedByteIsRefused) {
  ASSERT_TRUE(WriteManifest(dir_.string(), Sample()).ok());
  std::string bytes(1000, '\x07');
  bytes[500] = '\x08';
  Write("model.safetensors", bytes);
  ExpectRefused("model.safetensors", "sha256");
}

TEST_F(ManifestTest, TruncatedFileIsRefused) {
  ASSERT_TRUE(WriteManifest(dir_.string(), Sample()).ok());
  fs::resize_file(dir_ / "model.safetensors", 999);
  ExpectRefused("model.safetensors", "size 999");
}

TEST_F(ManifestTest, ExtraFileIsRefused) {
  ASSERT_TRUE(WriteManifest(dir_.string(), Sample()).ok());
  Write("sub/extra.bin", "x");
  ExpectRefused("sub/extra.bin", "not listed");
}

TEST_F(ManifestTest, MissingFileIsRefused) {
  ASSERT_TRUE(WriteManifest(dir_.string(), Sample()).ok());
  fs::remove(dir_ / "sub/tokenizer.model");
  ExpectRefused("sub/tokenizer.model", "missing");
}

TEST_F(ManifestTest, SymlinkIsRefused) {
  ASSERT_TRUE(WriteManifest(dir_.string(), Sample()).ok());
  // A listed file replaced by a link to identical bytes elsewhere is still refused.
  const fs::path elsewhere = dir_.string() + "_elsewhere";
  {
    std::ofstream out(elsewhere, std::ios::binary);
    out << "pieces";
  }
  fs::remove(dir_ / "sub/tokenizer.model");
  fs::create_symlink(elsewhere, dir_ / "sub/tokenizer.model");
  ExpectRefused("sub/tokenizer.model", "symbolic link");
  fs::remove(dir_ / "sub/tokenizer.model");
  fs::create_symlink(elsewhere, dir_ / "link");
  Write("sub/tokenizer.model", "pieces");
  ExpectRefused("link", "symbolic link");
  // And WriteManifest will not list one.
  absl::Status status = WriteManifest(dir_.string(), Sample());
  ASSERT_FALSE(status.ok());
  EXPECT_NE(std::string(status.message()).find("link"), std::string::npos) << status;
  fs::remove(elsewhere);
}

TEST_F(ManifestTest, MissingManifestIsNotFound) {
  auto read = ReadManifest(dir_.string());
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(std::string(read.status().message()).find(kManifestFileName), std::string::npos);
  EXPECT_FALSE(VerifyArtifact(dir_.string()).ok());
}

TEST_F(ManifestTest, MalformedManifestNamesFileAndKey) {
  ASSERT_TRUE(WriteManifest(dir_.string(), Sample()).ok());
  const std::string path = (dir_ / kManifestFileName).string();
  auto text = engine::ReadFileToString(path);
  ASSERT_TRUE(text.ok());
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string t = *text;
    const size_t at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) t.replace(at, from.size(), to);
    ASSERT_TRUE(engine::WriteFileAtomically(path, std::string_view(t)).ok());
  };
  auto expect_error = [&](const std::string& key) {
    auto read = ReadManifest(dir_.string());
    ASSERT_FALSE(read.ok()) << key;
    const std::string message(read.status().message());
    EXPECT_NE(message.find(kManifestFileName), std::string::npos) << message;
    EXPECT_NE(message.find(key), std::string::npos) << message;
  };
  replace("\"session_len\": 2048", "\"session_len\": \"long\"");
  expect_error("engine.session_len");
  replace("\"format_version\": 1", "\"format_version\": 2");
  expect_error("format_version");
  replace("\"sub/tokenizer.model\"", "\"../escape\"");
  expect_error("files.../escape");
  replace("\"chat_template\"", "\"chat_templat\"");
  expect_error("chat_template");
  ASSERT_TRUE(engine::WriteFileAtomically(path, std::string_view("{not json")).ok());
  expect_error("not valid JSON");
}

}  // namespace
}  // namespace nibble::quant
