#include "server/job_runner.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "engine/atomic_file.h"
#include "engine/model_config.h"
#include "quant/calibration.h"
#include "quant/manifest.h"
#include "server/path_policy.h"

namespace nibble::server {
namespace fs = std::filesystem;
namespace {

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

bool IsDatasetName(const std::string& name) {
  return name == "ptb" || name == "wikitext2" || name == "tinystories";
}

absl::Status Invalid(const std::string& field, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat("options.", field, ": ", problem));
}

}  // namespace

JobRunner::JobRunner(JobStore store, QuantizerConfig config, JobMetrics* metrics)
    : store_(std::move(store)),
      config_(std::move(config)),
      roots_(config_.model_roots.begin(), config_.model_roots.end()),
      metrics_(metrics) {}

absl::StatusOr<std::unique_ptr<JobRunner>> JobRunner::Start(const std::string& state_dir,
                                                            const QuantizerConfig& config,
                                                            JobMetrics* metrics) {
  absl::StatusOr<JobStore> store = JobStore::Open(state_dir);
  if (!store.ok()) return store.status();
  std::unique_ptr<JobRunner> runner(new JobRunner(std::move(store).value(), config, metrics));
  std::vector<std::string> problems;
  std::vector<JobRecord> records = runner->store_.LoadAll(&problems);
  for (const std::string& problem : problems) {
    std::fprintf(stderr, "nibbled: quantizer: skipped %s\n", problem.c_str());
  }
  int resumed = 0;
  {
    std::lock_guard<std::mutex> lock(runner->mu_);
    for (JobRecord& record : records) {
      auto job = std::make_unique<Job>();
      const bool unfinished = !IsFinal(record.state);
      if (unfinished && record.cancel_requested) {
        // Cancelled while running, and the daemon died before the job stopped.
        record.state = JobState::kCancelled;
        record.finished_unix_ms = NowUnixMs();
      } else if (unfinished) {
        record.state = JobState::kQueued;  // a running one resumes from its checkpoint
        runner->queue_.push_back(record.id);
        ++resumed;
      }
      job->record = std::move(record);
      if (unfinished) {
        if (absl::Status s = runner->store_.Save(job->record); !s.ok()) {
          std::fprintf(stderr, "nibbled: quantizer: %s\n", std::string(s.message()).c_str());
        }
      }
      runner->order_.push_back(job->record.id);
      runner->jobs_.emplace(job->record.id, std::move(job));
    }
    runner->UpdateCountsLocked();
  }
  std::fprintf(stderr, "nibbled: quantizer: %zu jobs in %s/jobs, %d to run or resume; %d "
               "workers on %s\n",
               records.size(), runner->store_.state_dir().c_str(), resumed,
               config.max_concurrent_jobs, config.device.c_str());
  for (int i = 0; i < config.max_concurrent_jobs; ++i) {
    runner->workers_.emplace_back([r = runner.get()] { r->WorkerLoop(); });
  }
  return runner;
}

JobRunner::~JobRunner() { Shutdown(); }

void JobRunner::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shutting_down_) return;
    shutting_down_ = true;
    for (auto& [id, job] : jobs_) job->stop = true;
  }
  work_available_.notify_all();
  for (std::thread& worker : workers_) worker.join();
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [id, job] : jobs_) {
    for (JobWatcher* watcher : job->watchers) {
      watcher->OnJobWatchClosed(absl::UnavailableError(
          "the daemon is shutting down; the job resumes when it starts again"));
    }
    job->watchers.clear();
  }
}

absl::Status JobRunner::CheckSpec(JobSpec& spec) const {
  if (!spec.output_artifact.empty()) {
    if (absl::Status s = CheckArtifactName(spec.output_artifact); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("output_artifact: ", s.message()));
    }
  }
  // The source: a directory under the model roots, or an artifact on this daemon.
  if (spec.model_path.empty() == spec.source_artifact.empty()) {
    return absl::InvalidArgumentError(
        "a job needs exactly one source: model_path (a model directory under the quantizer's "
        "model_roots) or artifact (an artifact on this daemon)");
  }
  fs::path source;
  if (!spec.model_path.empty()) {
    absl::StatusOr<fs::path> confined = ConfineToRoots(spec.model_path, roots_);
    if (!confined.ok()) return confined.status();
    std::error_code ec;
    if (!fs::is_directory(*confined, ec)) {
      return absl::NotFoundError(
          absl::StrCat("model_path \"", spec.model_path, "\": no such model directory"));
    }
    source = *confined;
  } else {
    if (absl::Status s = CheckArtifactName(spec.source_artifact); !s.ok()) return s;
    const std::string dir = store_.ArtifactDir(spec.source_artifact);
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) {
      return absl::NotFoundError(
          absl::StrCat("artifact \"", spec.source_artifact, "\": not on this daemon"));
    }
    if (absl::Status s = quant::VerifyArtifact(dir); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "artifact \"", spec.source_artifact, "\" does not match its manifest: ", s.message()));
    }
    source = fs::canonical(dir, ec);
    if (ec) return absl::NotFoundError(absl::StrCat("artifact \"", spec.source_artifact, "\": ", ec.message()));
  }
  spec.resolved_source = source.string();
  const std::string config_path = (source / "config.json").string();
  absl::StatusOr<std::string> config_text = engine::ReadFileToString(config_path);
  if (!config_text.ok()) {
    return absl::NotFoundError(absl::StrCat(
        spec.model_path.empty() ? spec.source_artifact : spec.model_path,
        ": not a Hugging Face model directory (no readable config.json)"));
  }
  absl::StatusOr<engine::ModelConfig> model = engine::ParseModelConfig(*config_text, config_path);
  if (!model.ok()) return absl::InvalidArgumentError(model.status().message());
  if (model->awq) {
    return absl::InvalidArgumentError(
        absl::StrCat(spec.model_path.empty() ? spec.source_artifact : spec.model_path,
                     ": the model is already AWQ-quantized"));
  }

  // The options, with `nibble quantize`'s defaults for zero values.
  if (spec.method.empty()) spec.method = "awq";
  if (spec.method != "awq" && spec.method != "rtn") {
    return Invalid("method", absl::StrCat("\"", spec.method, "\" is not awq or rtn"));
  }
  if (spec.w_bits == 0) spec.w_bits = 4;
  if (spec.w_bits != 4) {
    return Invalid("w_bits", absl::StrCat(spec.w_bits, " is unsupported: nibble quantizes to "
                                          "4 bits (W4A16)"));
  }
  if (spec.group_size == 0) spec.group_size = 128;
  if (spec.group_size < 2 || spec.group_size % 2 != 0) {
    return Invalid("w_group_size",
                   absl::StrCat("must be a positive even number, got ", spec.group_size));
  }
  if (spec.calib_samples == 0) spec.calib_samples = 128;
  if (spec.calib_samples < 1 || spec.calib_samples > (1 << 20)) {
    return Invalid("calib_samples", absl::StrCat("must be in [1, 1048576], got ", spec.calib_samples));
  }
  if (spec.calib_seqlen == 0) spec.calib_seqlen = 2048;
  if (spec.calib_seqlen < 2 || spec.calib_seqlen > model->max_position_embeddings) {
    return Invalid("calib_seqlen",
                   absl::StrCat(spec.calib_seqlen, " tokens per sample: must be in [2, ",
                                model->max_position_embeddings, "] (the model's context)"));
  }
  if (spec.eval_windows == 0) spec.eval_windows = 32;
  if (spec.eval_windows < 1 || spec.eval_windows > (1 << 20)) {
    return Invalid("eval_windows", absl::StrCat("must be in [1, 1048576], got ", spec.eval_windows));
  }
  const std::string datasets_dir =
      config_.datasets_dir.empty() ? quant::DefaultDatasetsDir() : config_.datasets_dir;
  // A dataset is a name (looked up in the datasets directory) or a file under the model roots.
  auto check_dataset = [&](std::string& dataset, const char* field) -> absl::Status {
    if (IsDatasetName(dataset)) {
      absl::StatusOr<std::string> file = quant::ResolveCalibrationFile(dataset, datasets_dir);
      if (!file.ok()) {
        return absl::NotFoundError(absl::StrCat("options.", field, ": ", file.status().message()));
      }
      return absl::OkStatus();
    }
    absl::StatusOr<fs::path> confined = ConfineToRoots(dataset, roots_);
    if (!confined.ok()) {
      return absl::Status(confined.status().code(),
                          absl::StrCat("options.", field, ": ", confined.status().message()));
    }
    std::error_code ec;
    if (!fs::is_regular_file(*confined, ec)) {
      return absl::NotFoundError(absl::StrCat("options.", field, " \"", dataset,
                                              "\": not a dataset name (ptb, wikitext2, "
                                              "tinystories) nor a text file"));
    }
    dataset = confined->string();
    return absl::OkStatus();
  };
  if (spec.calib_dataset.empty()) spec.calib_dataset = "ptb";
  if (spec.method == "awq") {
    if (absl::Status s = check_dataset(spec.calib_dataset, "calib_dataset"); !s.ok()) return s;
    std::error_code ec;
    if (!fs::is_regular_file(source / "tokenizer.model", ec)) {
      return absl::InvalidArgumentError(absl::StrCat(
          spec.model_path.empty() ? spec.source_artifact : spec.model_path,
          ": has no tokenizer.model (AWQ tokenizes the calibration text with it)"));
    }
  }
  if (!spec.eval_dataset.empty() && spec.eval_dataset != "none") {
    if (absl::Status s = check_dataset(spec.eval_dataset, "eval_dataset"); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<JobSnapshot> JobRunner::Submit(JobSpec spec) {
  auto refused = [this]() -> absl::Status {
    if (shutting_down_) return absl::UnavailableError("the daemon is shutting down");
    if (static_cast<int64_t>(queue_.size()) >= config_.max_queued_jobs) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the job queue is full (", queue_.size(), " jobs waiting, "
                       "quantizer.max_queued_jobs ", config_.max_queued_jobs,
                       "); try again when one has started"));
    }
    return absl::OkStatus();
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (absl::Status s = refused(); !s.ok()) return s;  // before the file system is read
  }
  if (absl::Status s = CheckSpec(spec); !s.ok()) return s;

  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = refused(); !s.ok()) return s;
  auto job = std::make_unique<Job>();
  JobRecord& record = job->record;
  do {
    record.id = NewJobId();
  } while (jobs_.count(record.id));
  if (spec.output_artifact.empty()) spec.output_artifact = "job-" + record.id;
  // The name is taken by an artifact, or promised to a job that has not ended.
  std::error_code ec;
  if (fs::exists(store_.ArtifactDir(spec.output_artifact), ec)) {
    return absl::AlreadyExistsError(
        absl::StrCat("output_artifact \"", spec.output_artifact, "\": an artifact of that name "
                     "exists on this daemon"));
  }
  for (const auto& [id, other] : jobs_) {
    if (!IsFinal(other->record.state) &&
        other->record.spec.output_artifact == spec.output_artifact) {
      return absl::AlreadyExistsError(absl::StrCat("output_artifact \"", spec.output_artifact,
                                                   "\": job ", id, " will make it"));
    }
  }
  record.spec = std::move(spec);
  record.state = JobState::kQueued;
  record.created_unix_ms = NowUnixMs();
  if (absl::Status s = store_.Save(record); !s.ok()) {
    return absl::InternalError(absl::StrCat("cannot record the job: ", s.message()));
  }
  const std::string id = record.id;
  order_.push_back(id);
  queue_.push_back(id);
  Job& added = *jobs_.emplace(id, std::move(job)).first->second;
  UpdateCountsLocked();
  work_available_.notify_one();
  return SnapshotLocked(added);
}

absl::StatusOr<JobSnapshot> JobRunner::Get(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job \"", id, "\""));
  return SnapshotLocked(*it->second);
}

std::vector<JobSnapshot> JobRunner::List() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<JobSnapshot> out;
  for (const std::string& id : order_) out.push_back(SnapshotLocked(*jobs_.at(id)));
  return out;
}

absl::StatusOr<JobSnapshot> JobRunner::Cancel(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job \"", id, "\""));
  Job& job = *it->second;
  if (job.record.state == JobState::kQueued) {
    queue_.erase(std::remove(queue_.begin(), queue_.end(), id), queue_.end());
    job.record.cancel_requested = true;
    job.record.state = JobState::kCancelled;
    job.record.finished_unix_ms = NowUnixMs();
    Changed(job);
  } else if (job.record.state == JobState::kRunning && !job.record.cancel_requested) {
    job.record.cancel_requested = true;
    job.stop = true;  // the worker finds it at its next check
    Changed(job);
  }
  return SnapshotLocked(job);
}

absl::Status JobRunner::Delete(const std::string& id, bool delete_artifact) {
  std::string artifact;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job \"", id, "\""));
    Job& job = *it->second;
    if (job.record.state == JobState::kRunning) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", id, " is running: cancel it (CancelJob) and delete it once it "
                       "has stopped"));
    }
    // Gone from disk first: a daemon that dies now does not bring it back.
    if (absl::Status s = store_.RemoveJob(id); !s.ok()) return s;
    queue_.erase(std::remove(queue_.begin(), queue_.end(), id), queue_.end());
    for (JobWatcher* watcher : job.watchers) {
      watcher->OnJobWatchClosed(absl::NotFoundError(absl::StrCat("job ", id, " was deleted")));
    }
    if (job.record.state == JobState::kSucceeded) artifact = job.record.artifact;
    if (metrics_) metrics_->ForgetJob(id);
    order_.erase(std::remove(order_.begin(), order_.end(), id), order_.end());
    jobs_.erase(it);
    UpdateCountsLocked();
  }
  if (delete_artifact && !artifact.empty()) return store_.RemoveArtifact(artifact);
  return absl::OkStatus();
}

absl::Status JobRunner::Watch(const std::string& id, JobWatcher* watcher) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job \"", id, "\""));
  Job& job = *it->second;
  const bool last = IsFinal(job.record.state);
  watcher->OnJobUpdate(SnapshotLocked(job), last);
  if (!last && shutting_down_) {
    watcher->OnJobWatchClosed(absl::UnavailableError("the daemon is shutting down"));
  } else if (!last) {
    job.watchers.push_back(watcher);
  }
  return absl::OkStatus();
}

void JobRunner::Unwatch(const std::string& id, JobWatcher* watcher) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return;
  auto& watchers = it->second->watchers;
  watchers.erase(std::remove(watchers.begin(), watchers.end(), watcher), watchers.end());
}

JobSnapshot JobRunner::SnapshotLocked(const Job& job) const { return {job.record, job.progress}; }

void JobRunner::UpdateCountsLocked() {
  if (!metrics_) return;
  int64_t running = 0;
  for (const auto& [id, job] : jobs_) running += job->record.state == JobState::kRunning;
  metrics_->SetCounts(static_cast<int64_t>(queue_.size()), running);
}

void JobRunner::Changed(Job& job) {
  if (absl::Status s = store_.Save(job.record); !s.ok()) {
    // The job goes on in memory; after a restart it would be seen as it was last saved.
    std::fprintf(stderr, "nibbled: quantizer: job %s: %s\n", job.record.id.c_str(),
                 std::string(s.message()).c_str());
  }
  const bool last = IsFinal(job.record.state);
  const JobSnapshot snapshot = SnapshotLocked(job);
  for (JobWatcher* watcher : job.watchers) watcher->OnJobUpdate(snapshot, last);
  if (last) {
    job.watchers.clear();
    if (metrics_) {
      const double seconds =
          job.record.started_unix_ms > 0
              ? static_cast<double>(job.record.finished_unix_ms - job.record.started_unix_ms) / 1000
              : 0.0;
      metrics_->Ended(job.record.state, seconds);
      metrics_->ForgetJob(job.record.id);
    }
  }
  UpdateCountsLocked();
}

void JobRunner::OnProgress(Job& job, const quant::QuantizeProgress& p) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  JobProgress& progress = job.progress;
  if (p.phase != progress.phase) job.phase_start = now;
  if (p.resumed && !progress.resumed) job.layers_done_at_run_start = p.layers_done;
  progress.phase = p.phase;
  progress.layer = p.layer;
  progress.layers = p.layers;
  progress.layers_done = p.layers_done;
  progress.tensor = p.phase == "quantize" || p.phase == "write" ? p.step : "";
  progress.tensors_done = p.tensors_done;
  progress.tensors_total = p.tensors_total;
  progress.resumed = p.resumed;
  progress.elapsed_seconds = std::chrono::duration<double>(now - job.run_start).count();
  // The estimate extrapolates the pace of what is being done: layers searched in this run
  // (AWQ's search dominates a job), or tensors packed; nothing to go by in the short phases.
  progress.estimated_remaining_seconds.reset();
  const int64_t layers_this_run = p.layers_done - job.layers_done_at_run_start;
  if ((p.phase == "calibrate" || p.phase == "search") && layers_this_run > 0) {
    progress.estimated_remaining_seconds =
        progress.elapsed_seconds / static_cast<double>(layers_this_run) *
        static_cast<double>(p.layers - p.layers_done);
  } else if (p.phase == "quantize" && p.tensors_done > 0) {
    progress.estimated_remaining_seconds =
        std::chrono::duration<double>(now - job.phase_start).count() /
        static_cast<double>(p.tensors_done) * static_cast<double>(p.tensors_total - p.tensors_done);
  }
  const JobSnapshot snapshot = SnapshotLocked(job);
  for (JobWatcher* watcher : job.watchers) watcher->OnJobUpdate(snapshot, false);
  if (metrics_) metrics_->SetLayerProgress(job.record.id, p.layers_done, p.layers);
}

absl::Status JobRunner::RunJob(Job& job) {
  const JobSpec& spec = job.record.spec;
  const std::string work = store_.WorkDir(job.record.id);
  const std::string artifact = store_.ArtifactDir(spec.output_artifact);
  std::error_code ec;
  // A daemon that died between the rename and job.json's update: the artifact is in place.
  if (job.record.runs > 1 && !fs::exists(work, ec) &&
      fs::exists(fs::path(artifact) / quant::kManifestFileName, ec) &&
      quant::VerifyArtifact(artifact).ok()) {
    return absl::OkStatus();
  }
  // One that died between the manifest (written last) and the rename: only the rename is left.
  if (!fs::exists(fs::path(work) / quant::kManifestFileName, ec)) {
    quant::QuantizeSettings settings;
    settings.method = spec.method == "awq" ? quant::QuantMethod::kAwq : quant::QuantMethod::kRtn;
    settings.w_bits = spec.w_bits;
    settings.group_size = spec.group_size;
    settings.calib_dataset = spec.calib_dataset;
    settings.datasets_dir =
        config_.datasets_dir.empty() ? quant::DefaultDatasetsDir() : config_.datasets_dir;
    settings.calibration.samples = spec.calib_samples;
    settings.calibration.seqlen = spec.calib_seqlen;
    settings.calibration.seed = spec.calib_seed;
    settings.eval_dataset = spec.eval_dataset;
    settings.eval_windows = spec.eval_windows;
    settings.device = config_.device;
    absl::StatusOr<quant::PreparedQuantization> prepared =
        quant::PrepareQuantization(spec.resolved_source, settings);
    if (!prepared.ok()) return prepared.status();
    for (const std::string& note : prepared->notes) {
      std::fprintf(stderr, "nibbled: job %s: %s\n", job.record.id.c_str(), note.c_str());
    }
    quant::QuantizeControl control;
    control.progress = [this, &job](const quant::QuantizeProgress& p) { OnProgress(job, p); };
    control.stop_requested = [&job] { return job.stop.load(); };
    absl::StatusOr<quant::QuantizeReport> report =
        quant::QuantizeModelDirectory(spec.resolved_source, work, prepared->options, control);
    if (!report.ok()) return report.status();
  }
  if (absl::Status s = quant::VerifyArtifact(work); !s.ok()) return s;
  return store_.PublishArtifact(job.record.id, spec.output_artifact);
}

void JobRunner::WorkerLoop() {
  while (true) {
    Job* job = nullptr;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_available_.wait(lock, [this] { return shutting_down_ || !queue_.empty(); });
      if (shutting_down_) return;
      const std::string id = queue_.front();
      queue_.pop_front();
      job = jobs_.at(id).get();
      job->record.state = JobState::kRunning;
      ++job->record.runs;
      if (job->record.started_unix_ms == 0) job->record.started_unix_ms = NowUnixMs();
      job->progress = JobProgress{};
      job->run_start = job->phase_start = std::chrono::steady_clock::now();
      job->layers_done_at_run_start = 0;
      Changed(*job);
    }
    std::fprintf(stderr, "nibbled: job %s: %s %s -> artifact %s (run %d)\n",
                 job->record.id.c_str(), job->record.spec.method.c_str(),
                 job->record.spec.resolved_source.c_str(),
                 job->record.spec.output_artifact.c_str(), job->record.runs);
    const absl::Status status = RunJob(*job);

    std::lock_guard<std::mutex> lock(mu_);
    job->progress.estimated_remaining_seconds.reset();
    if (status.ok()) {
      job->record.state = JobState::kSucceeded;
      job->record.artifact = job->record.spec.output_artifact;
      job->progress.estimated_remaining_seconds = 0.0;
    } else if (job->stop && (absl::IsCancelled(status) || job->record.cancel_requested)) {
      if (job->record.cancel_requested) {
        job->record.state = JobState::kCancelled;
      } else {
        // The daemon is stopping: the job stays queued on disk and resumes at the next start.
        job->record.state = JobState::kQueued;
      }
    } else {
      job->record.state = JobState::kFailed;
      job->record.error = std::string(status.message());
    }
    if (IsFinal(job->record.state)) job->record.finished_unix_ms = NowUnixMs();
    std::fprintf(stderr, "nibbled: job %s: %s%s%s\n", job->record.id.c_str(),
                 job->record.state == JobState::kQueued ? "queued again, to resume at the next start"
                                                        : JobStateName(job->record.state),
                 status.ok() ? "" : ": ",
                 status.ok() ? "" : std::string(status.message()).c_str());
    Changed(*job);
  }
}

}  // namespace nibble::server
