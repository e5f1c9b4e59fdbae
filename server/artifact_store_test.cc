// ArtifactStore over real directories (a temporary state_dir), and ServedModels' bookkeeping
// for hot loading (names reserved while loading, the memory budget, counted references).
#include "server/artifact_store.h"

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "server/served_model.h"

namespace nibble::server {
namespace {
namespace fs = std::filesystem;

class ArtifactStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/artifact-store-test-XXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    root_ = pattern;
    store_ = std::make_unique<ArtifactStore>(root_);
    ASSERT_TRUE(store_->Open().ok());
  }
  void TearDown() override { fs::remove_all(root_); }

  static void Write(const fs::path& path, const std::string& text) {
    fs::create_directories(path.parent_path());
    std::ofstream(path, std::ios::binary) << text;
  }
  // A small artifact: two files and a manifest written by quant::WriteManifest.
  fs::path Make(const fs::path& dir) {
    Write(dir / "config.json", "{\"a\": 1}");
    Write(dir / "sub/weights.bin", std::string(5000, 'w'));
    quant::ArtifactManifest manifest;
    manifest.architecture = "LlamaForCausalLM";
    manifest.chat_template = "plain";
    EXPECT_TRUE(quant::WriteManifest(dir.string(), manifest).ok());
    return dir;
  }

  fs::path root_;
  std::unique_ptr<ArtifactStore> store_;
};

TEST_F(ArtifactStoreTest, ListsVerifiedArtifactsAndSeesLaterChanges) {
  Make(store_->artifacts_dir() / "good");
  auto found = store_->FindVerified("good");
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->manifest.files.size(), 2u);
  EXPECT_EQ(found->manifest.files.at("sub/weights.bin").size, 5000u);

  // The same size, other bytes: seen at the next look-up (the directory's signature changed).
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  Write(store_->artifacts_dir() / "good/sub/weights.bin", std::string(5000, 'x'));
  auto changed = store_->FindVerified("good");
  ASSERT_FALSE(changed.ok());
  EXPECT_EQ(changed.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(changed.status().message().find("sub/weights.bin"), std::string::npos);
  auto listed = store_->List();
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_FALSE(listed[0].status.ok());

  EXPECT_EQ(store_->Find("absent").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Find("../x").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->Find(".hidden").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ArtifactStoreTest, LinkInPlaceOfAnArtifactIsNeverServed) {
  const fs::path outside = Make(root_ / "outside");
  fs::create_directory_symlink(outside, store_->artifacts_dir() / "linked");
  auto found = store_->Find("linked");
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->status.code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(store_->FindVerified("linked").ok());
}

TEST_F(ArtifactStoreTest, FilePathOnlyServesListedFilesInsideTheArtifact) {
  Make(store_->artifacts_dir() / "good");
  auto artifact = store_->FindVerified("good");
  ASSERT_TRUE(artifact.ok());
  auto path = store_->FilePath(*artifact, "sub/weights.bin");
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, fs::canonical(store_->artifacts_dir() / "good/sub/weights.bin"));
  EXPECT_EQ(store_->FilePath(*artifact, "../good/config.json").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->FilePath(*artifact, "/etc/passwd").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->FilePath(*artifact, "nibble_manifest.json").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->FilePath(*artifact, "other.bin").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(ArtifactStoreTest, TransfersAreExclusiveAndCommitOnlyWhatVerifies) {
  {
    auto lease = store_->BeginTransfer("new");
    ASSERT_TRUE(lease.ok());
    EXPECT_EQ(store_->BeginTransfer("new").status().code(), absl::StatusCode::kAborted);
    const fs::path dir = store_->TransferDir(*lease);
    Make(dir);
    Write(dir / "config.json", "{\"a\": 2}");  // now differs from the manifest
    EXPECT_EQ(store_->Commit(*lease).code(), absl::StatusCode::kDataLoss);
    EXPECT_FALSE(fs::exists(store_->artifacts_dir() / "new"));
    Write(dir / "config.json", "{\"a\": 1}");
    ASSERT_TRUE(store_->Commit(*lease).ok());
    EXPECT_FALSE(fs::exists(dir));
  }
  EXPECT_TRUE(store_->FindVerified("new").ok());
  EXPECT_EQ(store_->BeginTransfer("new").status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store_->BeginTransfer("a/b").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ServedModels, ReservedNamesLoadingStateAndTheMemoryBudget) {
  ServedModels models;
  ASSERT_TRUE(models.Reserve("a", "/a").ok());
  EXPECT_EQ(models.Reserve("a", "/a").code(), absl::StatusCode::kAlreadyExists);
  ModelRef ref;
  EXPECT_EQ(models.Find("a", &ref).error_code(), grpc::StatusCode::UNAVAILABLE);  // loading
  EXPECT_EQ(models.Find("", &ref).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(models.listing().size(), 1u);
  EXPECT_TRUE(models.all().empty());  // no engine yet: nothing for metrics or shutdown

  ASSERT_TRUE(models.Charge("a", 600, 1000).ok());
  ASSERT_TRUE(models.Reserve("b", "/b").ok());
  const absl::Status over = models.Charge("b", 500, 1000);
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(over.message().find("400"), std::string::npos) << over;  // what is free
  EXPECT_TRUE(models.Charge("b", 400, 1000).ok());
  EXPECT_TRUE(models.Charge("b", 5000, 0).ok());  // no budget
  models.Remove("b");
  EXPECT_TRUE(models.Reserve("b", "/b").ok());
  EXPECT_TRUE(models.Charge("b", 400, 1000).ok());  // "b"'s old charge went with it

  EXPECT_EQ(models.Find("zzz", &ref).error_code(), grpc::StatusCode::NOT_FOUND);
  std::shared_ptr<ServedModel> unloading;
  EXPECT_EQ(models.StartUnload("a", &unloading).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);  // still loading
}

TEST(ServedModels, ReferencesKeepAnUnloadedModelAliveAndDrainWaitsForThem) {
  ServedModels models;
  auto model = std::make_shared<ServedModel>();
  model->spec.name = "m";
  models.Add(model);
  ModelRef ref;
  ASSERT_TRUE(models.Find("", &ref).ok());
  EXPECT_EQ(model->active_calls(), 1);

  std::shared_ptr<ServedModel> unloading;
  ASSERT_TRUE(models.StartUnload("m", &unloading).ok());
  EXPECT_EQ(models.StartUnload("m", &unloading).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  ModelRef refused;
  EXPECT_EQ(models.Find("m", &refused).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_FALSE(unloading->WaitIdleUntil(std::chrono::steady_clock::now() +
                                        std::chrono::milliseconds(20)));
  std::thread release([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    ref = ModelRef();
  });
  EXPECT_TRUE(unloading->WaitIdleUntil(std::chrono::steady_clock::now() + std::chrono::seconds(10)));
  release.join();
  models.Remove("m");
  EXPECT_EQ(models.Find("m", &refused).error_code(), grpc::StatusCode::NOT_FOUND);
  model.reset();
  EXPECT_EQ(unloading.use_count(), 1);  // the last holder
}

}  // namespace
}  // namespace nibble::server
