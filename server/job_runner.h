// The quantizer role's jobs: a bounded queue, `max_concurrent_jobs` worker threads that run
// quant::QuantizeModelDirectory, cancellation, progress for watchers and metrics, and the
// persistence of every change (server/job_store.h) so that a restarted daemon resumes.
//
// Threads and lifetimes (the contract):
// - Submit/Get/List/Cancel/Delete/Watch/Unwatch may be called from any thread (gRPC handlers).
//   They take the runner's mutex briefly; Submit's checks that touch the file system (the
//   source's config.json, the datasets) run before it is taken.
// - Each job runs on a worker thread, which reports progress under the mutex. A job's stop
//   flag is polled by the quantizer between layers and tensors (quant::QuantizeControl).
// - Watchers (JobWatcher) are called under the runner's mutex, on whichever thread changed
//   the job: they must only record the snapshot and return, never block or call the runner.
//   After a final snapshot (`last`) or Close, the runner forgets the watcher and calls it no
//   more; Unwatch makes sure of the same from the watcher's side (call it before the watcher
//   is destroyed).
// - Shutdown (also from the destructor) stops the workers: a running job stops at its next
//   check and stays queued on disk, to resume at the next start; watchers are closed with
//   Unavailable.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "quant/quantize_model.h"
#include "server/config.h"
#include "server/job_metrics.h"
#include "server/job_store.h"

namespace nibble::server {

// Where a job is (its latest quant::QuantizeProgress, with times).
struct JobProgress {
  std::string phase;  // "", "calibrate", "search", "quantize", "evaluate", "write"
  int64_t layer = 0;
  int64_t layers = 0;
  int64_t layers_done = 0;
  std::string tensor;
  int64_t tensors_done = 0;
  int64_t tensors_total = 0;
  double elapsed_seconds = 0;  // since this daemon started running it
  std::optional<double> estimated_remaining_seconds;
  bool resumed = false;
};

struct JobSnapshot {
  JobRecord record;
  JobProgress progress;
};

class JobWatcher {
 public:
  virtual ~JobWatcher() = default;
  // The job as it is now; `last` when it has ended (the runner forgets the watcher after).
  virtual void OnJobUpdate(const JobSnapshot& snapshot, bool last) = 0;
  // The runner stops watching for another reason (shutdown, the job was deleted).
  virtual void OnJobWatchClosed(const absl::Status& why) = 0;
};

class JobRunner {
 public:
  // Opens the store under `state_dir`, loads every job (queued and running ones are queued
  // again, in their original order, to resume after their last finished layer) and starts
  // the workers. `metrics` may be null. Errors: the state directory cannot be made.
  static absl::StatusOr<std::unique_ptr<JobRunner>> Start(const std::string& state_dir,
                                                          const QuantizerConfig& config,
                                                          JobMetrics* metrics);
  ~JobRunner();

  // Validates and queues a job. InvalidArgument (a field, named), PermissionDenied (a path
  // outside the model roots), NotFound (source, dataset), AlreadyExists (output name taken),
  // ResourceExhausted (queue full), Unavailable (shutting down).
  absl::StatusOr<JobSnapshot> Submit(JobSpec spec);
  absl::StatusOr<JobSnapshot> Get(const std::string& id) const;  // NotFound
  std::vector<JobSnapshot> List() const;                          // oldest first
  absl::StatusOr<JobSnapshot> Cancel(const std::string& id);
  // FailedPrecondition for a running job. Removes the job directory, and with
  // `delete_artifact` the artifact the job made.
  absl::Status Delete(const std::string& id, bool delete_artifact);

  // Registers `watcher` for the job and calls it at once with the job as it is now (under the
  // mutex, so nothing can come between). NotFound for an unknown job.
  absl::Status Watch(const std::string& id, JobWatcher* watcher);
  void Unwatch(const std::string& id, JobWatcher* watcher);

  // Stops the workers (see above). Idempotent.
  void Shutdown();

  const JobStore& store() const { return store_; }

 private:
  struct Job {
    JobRecord record;
    JobProgress progress;
    std::atomic<bool> stop{false};
    // This run's clocks, for elapsed and the estimate.
    std::chrono::steady_clock::time_point run_start;
    std::chrono::steady_clock::time_point phase_start;
    int64_t layers_done_at_run_start = 0;
    std::vector<JobWatcher*> watchers;
  };

  JobRunner(JobStore store, QuantizerConfig config, JobMetrics* metrics);
  void WorkerLoop();
  // Runs the job to its end (or a stop); returns the quantizer's status.
  absl::Status RunJob(Job& job);
  void OnProgress(Job& job, const quant::QuantizeProgress& progress);
  // Under mu_: persists, tells the watchers (forgetting them on a final state), updates the
  // gauges.
  void Changed(Job& job);
  void UpdateCountsLocked();
  JobSnapshot SnapshotLocked(const Job& job) const;
  absl::Status CheckSpec(JobSpec& spec) const;

  const JobStore store_;
  const QuantizerConfig config_;
  const std::vector<std::filesystem::path> roots_;
  JobMetrics* const metrics_;

  mutable std::mutex mu_;
  std::condition_variable work_available_;
  std::map<std::string, std::unique_ptr<Job>> jobs_;  // guarded by mu_
  std::vector<std::string> order_;                     // guarded by mu_: ids, oldest first
  std::deque<std::string> queue_;                      // guarded by mu_: queued ids
  bool shutting_down_ = false;                         // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace nibble::server
