#include "server/job_store.h"

#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

namespace nibble::server {
namespace {

namespace fs = std::filesystem;

class JobStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("nibble-job-store-" + NewJobId());
  }
  void TearDown() override { fs::remove_all(dir_); }

  static void Write(const fs::path& path, const std::string& text) {
    fs::create_directories(path.parent_path());
    std::ofstream(path) << text;
  }

  fs::path dir_;
};

JobRecord Sample() {
  JobRecord job;
  job.id = NewJobId();
  job.spec.model_path = "llama/7b";
  job.spec.resolved_source = "/models/llama/7b";
  job.spec.method = "rtn";
  job.spec.group_size = 64;
  job.spec.calib_seed = 18446744073709551615ull;  // every bit of a uint64 survives JSON
  job.spec.eval_dataset = "none";
  job.spec.output_artifact = "llama-w4";
  job.state = JobState::kRunning;
  job.created_unix_ms = 1700000000123;
  job.started_unix_ms = 1700000000456;
  job.cancel_requested = true;
  job.runs = 2;
  return job;
}

TEST_F(JobStoreTest, SavedJobsLoadBackOldestFirst) {
  auto store = JobStore::Open(dir_.string());
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_TRUE(fs::is_directory(dir_ / "jobs"));
  EXPECT_TRUE(fs::is_directory(dir_ / "artifacts"));
  JobRecord newer = Sample();
  newer.created_unix_ms += 10;
  newer.state = JobState::kFailed;
  newer.error = "the source went away";
  const JobRecord older = Sample();
  ASSERT_TRUE(store->Save(newer).ok());
  ASSERT_TRUE(store->Save(older).ok());
  std::vector<std::string> problems;
  const std::vector<JobRecord> jobs = store->LoadAll(&problems);
  EXPECT_TRUE(problems.empty());
  ASSERT_EQ(jobs.size(), 2u);
  EXPECT_EQ(jobs[0].id, older.id);
  EXPECT_EQ(jobs[0].spec.model_path, "llama/7b");
  EXPECT_EQ(jobs[0].spec.resolved_source, "/models/llama/7b");
  EXPECT_EQ(jobs[0].spec.method, "rtn");
  EXPECT_EQ(jobs[0].spec.group_size, 64);
  EXPECT_EQ(jobs[0].spec.calib_seed, 18446744073709551615ull);
  EXPECT_EQ(jobs[0].spec.eval_dataset, "none");
  EXPECT_EQ(jobs[0].state, JobState::kRunning);
  EXPECT_EQ(jobs[0].created_unix_ms, 1700000000123);
  EXPECT_EQ(jobs[0].started_unix_ms, 1700000000456);
  EXPECT_TRUE(jobs[0].cancel_requested);
  EXPECT_EQ(jobs[0].runs, 2);
  EXPECT_EQ(jobs[1].id, newer.id);
  EXPECT_EQ(jobs[1].state, JobState::kFailed);
  EXPECT_EQ(jobs[1].error, "the source went away");
}

TEST_F(JobStoreTest, UnreadableJobsAreNamedAndKept) {
  auto store = JobStore::Open(dir_.string());
  ASSERT_TRUE(store.ok());
  const std::string id = NewJobId();
  Write(dir_ / "jobs" / id / "job.json", "{\"id\": \"" + id + "\"");  // cut short
  Write(dir_ / "jobs" / "not-a-job" / "job.json", "{}");
  std::vector<std::string> problems;
  EXPECT_TRUE(store->LoadAll(&problems).empty());
  ASSERT_EQ(problems.size(), 2u);
  EXPECT_TRUE(fs::exists(dir_ / "jobs" / id / "job.json"));  // left for a person to look at
}

TEST_F(JobStoreTest, PublishMovesTheWorkDirectoryAndNeverReplaces) {
  auto store = JobStore::Open(dir_.string());
  ASSERT_TRUE(store.ok());
  const JobRecord job = Sample();
  ASSERT_TRUE(store->Save(job).ok());
  Write(fs::path(store->WorkDir(job.id)) / "model.safetensors", "weights");
  ASSERT_TRUE(store->PublishArtifact(job.id, "made").ok());
  EXPECT_FALSE(fs::exists(store->WorkDir(job.id)));
  EXPECT_TRUE(fs::exists(dir_ / "artifacts" / "made" / "model.safetensors"));

  // An empty directory under the name is not replaced either (rename(2) alone would).
  const JobRecord other = Sample();
  Write(fs::path(store->WorkDir(other.id)) / "model.safetensors", "other weights");
  fs::create_directories(dir_ / "artifacts" / "taken");
  const absl::Status taken = store->PublishArtifact(other.id, "taken");
  EXPECT_EQ(taken.code(), absl::StatusCode::kAlreadyExists) << taken;
  EXPECT_TRUE(fs::exists(fs::path(store->WorkDir(other.id)) / "model.safetensors"));
}

TEST_F(JobStoreTest, RemovedJobsDoNotComeBack) {
  auto store = JobStore::Open(dir_.string());
  ASSERT_TRUE(store.ok());
  const JobRecord job = Sample();
  ASSERT_TRUE(store->Save(job).ok());
  Write(fs::path(store->WorkDir(job.id)) / ".nibble-job" / "progress.json", "{}");
  ASSERT_TRUE(store->RemoveJob(job.id).ok());
  EXPECT_FALSE(fs::exists(store->JobDir(job.id)));
  // A removal a crash interrupted (renamed aside, not yet deleted) is finished at load.
  Write(dir_ / "jobs" / (".deleted-" + NewJobId()) / "job.json", "{}");
  std::vector<std::string> problems;
  EXPECT_TRUE(store->LoadAll(&problems).empty());
  EXPECT_TRUE(problems.empty());
  EXPECT_TRUE(fs::is_empty(dir_ / "jobs"));
}

TEST(JobIds, AreSixteenHexDigits) {
  const std::string id = NewJobId();
  EXPECT_TRUE(IsJobId(id)) << id;
  EXPECT_NE(id, NewJobId());
  EXPECT_FALSE(IsJobId(""));
  EXPECT_FALSE(IsJobId("../../etc/passwd"));
  EXPECT_FALSE(IsJobId("0123456789ABCDEF"));
  EXPECT_FALSE(IsJobId("0123456789abcdef0"));
}

}  // namespace
}  // namespace nibble::server
