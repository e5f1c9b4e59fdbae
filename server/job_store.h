// The quantization jobs' persistent state, under the daemon's state directory:
//
//   <state_dir>/jobs/<id>/job.json   the request, state, timestamps, error, result artifact
//                                    (written atomically: temporary file, fsync, rename)
//   <state_dir>/jobs/<id>/work/      the quantizer's work directory: the artifact as it is
//                                    written, and its per-layer checkpoint (.nibble-job/)
//   <state_dir>/artifacts/<name>/    complete artifacts only: a finished work directory is
//                                    moved here with one rename(2)
//
// A job.json says what was asked and how far it got; the work directory holds the progress
// itself (quant::QuantizeModelDirectory resumes from its checkpoint), so a daemon killed at
// any point loses at most the layer it was working on.
//
// Thread safety: a JobStore holds no mutable state of its own; concurrent calls for different
// jobs are safe, and the caller serializes calls for the same job.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nibble::server {

enum class JobState { kQueued, kRunning, kSucceeded, kFailed, kCancelled };

// "queued", "running", "succeeded", "failed", "cancelled" (job.json's and the metrics'
// spelling).
const char* JobStateName(JobState state);
bool IsFinal(JobState state);

// What a job was asked to do, validated at submission, with the defaults filled in.
struct JobSpec {
  // Exactly one of the two: a model directory as requested (relative to the first model root
  // or absolute inside one), or the name of an artifact on this daemon.
  std::string model_path;
  std::string source_artifact;
  // The source directory that model_path or source_artifact resolved to at submission
  // (absolute, links resolved): what the job quantizes, after a restart too.
  std::string resolved_source;
  std::string method = "awq";  // "awq", "rtn"
  int64_t w_bits = 4;
  int64_t group_size = 128;
  // A dataset name, or a text file resolved (and confined) at submission.
  std::string calib_dataset = "ptb";
  int64_t calib_samples = 128;
  int64_t calib_seqlen = 2048;
  uint64_t calib_seed = 0;
  std::string eval_dataset;  // as QuantizeSettings::eval_dataset
  int64_t eval_windows = 32;
  std::string output_artifact;
};

struct JobRecord {
  std::string id;  // 16 lower-case hex digits
  JobSpec spec;
  JobState state = JobState::kQueued;
  int64_t created_unix_ms = 0;
  int64_t started_unix_ms = 0;   // the first run's start
  int64_t finished_unix_ms = 0;
  std::string error;             // kFailed
  std::string artifact;          // kSucceeded: the artifact's name
  bool cancel_requested = false;
  int32_t runs = 0;              // times a worker started it
};

// True for a well-formed job id (what NewJobId makes): a request's id is checked with it
// before it is used in a path.
bool IsJobId(const std::string& id);
// A fresh random job id.
std::string NewJobId();

class JobStore {
 public:
  // Creates `state_dir`, its jobs/ and artifacts/ as needed. Errors name the directory.
  static absl::StatusOr<JobStore> Open(const std::string& state_dir);

  // Every job.json under jobs/, oldest first (by created_unix_ms, then id). A job directory
  // whose job.json is unreadable is skipped and named in `problems` (never deleted: a person
  // should look at it). Leftovers of a RemoveJob that a crash interrupted are removed.
  std::vector<JobRecord> LoadAll(std::vector<std::string>* problems) const;

  // Writes the job's job.json atomically (creating its directory).
  absl::Status Save(const JobRecord& job) const;

  // Moves the job's finished work directory to artifacts/<name> with one rename(2) that never
  // replaces anything: AlreadyExists when the name is taken.
  absl::Status PublishArtifact(const std::string& id, const std::string& name) const;

  // Removes the job's directory (job.json, work directory and all): renamed aside first, so
  // that a crash midway never leaves a half-removed job that would be loaded again.
  absl::Status RemoveJob(const std::string& id) const;
  // Removes artifacts/<name> (nothing when absent).
  absl::Status RemoveArtifact(const std::string& name) const;

  const std::string& state_dir() const { return state_dir_; }
  std::string JobDir(const std::string& id) const;
  std::string WorkDir(const std::string& id) const;
  std::string ArtifactDir(const std::string& name) const;

 private:
  explicit JobStore(std::string state_dir) : state_dir_(std::move(state_dir)) {}
  std::string state_dir_;
};

}  // namespace nibble::server
