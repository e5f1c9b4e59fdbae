#include "server/job_store.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "engine/atomic_file.h"

namespace nibble::server {
namespace fs = std::filesystem;
namespace {

using Json = nlohmann::json;

constexpr const char kDeletedPrefix[] = ".deleted-";

constexpr const char* kStateNames[] = {"queued", "running", "succeeded", "failed", "cancelled"};

absl::StatusOr<JobState> ParseState(const std::string& name) {
  for (int i = 0; i < 5; ++i) {
    if (name == kStateNames[i]) return static_cast<JobState>(i);
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown state \"", name, "\""));
}

Json SpecToJson(const JobSpec& s) {
  return Json{{"model_path", s.model_path},
              {"source_artifact", s.source_artifact},
              {"resolved_source", s.resolved_source},
              {"method", s.method},
              {"w_bits", s.w_bits},
              {"group_size", s.group_size},
              {"calib_dataset", s.calib_dataset},
              {"calib_samples", s.calib_samples},
              {"calib_seqlen", s.calib_seqlen},
              {"calib_seed", s.calib_seed},
              {"eval_dataset", s.eval_dataset},
              {"eval_windows", s.eval_windows},
              {"output_artifact", s.output_artifact}};
}

Json RecordToJson(const JobRecord& r) {
  return Json{{"format_version", 1},
              {"id", r.id},
              {"spec", SpecToJson(r.spec)},
              {"state", JobStateName(r.state)},
              {"created_unix_ms", r.created_unix_ms},
              {"started_unix_ms", r.started_unix_ms},
              {"finished_unix_ms", r.finished_unix_ms},
              {"error", r.error},
              {"artifact", r.artifact},
              {"cancel_requested", r.cancel_requested},
              {"runs", r.runs}};
}

// nlohmann throws on a missing key or a wrong type: caught by the caller, which names the file.
JobRecord RecordFromJson(const Json& j) {
  JobRecord r;
  r.id = j.at("id").get<std::string>();
  const Json& s = j.at("spec");
  JobSpec& spec = r.spec;
  spec.model_path = s.at("model_path").get<std::string>();
  spec.source_artifact = s.at("source_artifact").get<std::string>();
  spec.resolved_source = s.at("resolved_source").get<std::string>();
  spec.method = s.at("method").get<std::string>();
  spec.w_bits = s.at("w_bits").get<int64_t>();
  spec.group_size = s.at("group_size").get<int64_t>();
  spec.calib_dataset = s.at("calib_dataset").get<std::string>();
  spec.calib_samples = s.at("calib_samples").get<int64_t>();
  spec.calib_seqlen = s.at("calib_seqlen").get<int64_t>();
  spec.calib_seed = s.at("calib_seed").get<uint64_t>();
  spec.eval_dataset = s.at("eval_dataset").get<std::string>();
  spec.eval_windows = s.at("eval_windows").get<int64_t>();
  spec.output_artifact = s.at("output_artifact").get<std::string>();
  auto state = ParseState(j.at("state").get<std::string>());
  if (!state.ok()) throw std::runtime_error(std::string(state.status().message()));
  r.state = *state;
  r.created_unix_ms = j.at("created_unix_ms").get<int64_t>();
  r.started_unix_ms = j.at("started_unix_ms").get<int64_t>();
  r.finished_unix_ms = j.at("finished_unix_ms").get<int64_t>();
  r.error = j.at("error").get<std::string>();
  r.artifact = j.at("artifact").get<std::string>();
  r.cancel_requested = j.at("cancel_requested").get<bool>();
  r.runs = j.at("runs").get<int32_t>();
  return r;
}

absl::Status SyncDirectory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat(dir, ": cannot open to sync: ", std::strerror(errno)));
  }
  const int rc = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  if (rc != 0) return absl::InternalError(absl::StrCat(dir, ": fsync: ", std::strerror(saved)));
  return absl::OkStatus();
}

absl::Status CreateDirectories(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dir, ": cannot create: ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

const char* JobStateName(JobState state) { return kStateNames[static_cast<int>(state)]; }

bool IsFinal(JobState state) {
  return state == JobState::kSucceeded || state == JobState::kFailed ||
         state == JobState::kCancelled;
}

bool IsJobId(const std::string& id) {
  return id.size() == 16 && id.find_first_not_of("0123456789abcdef") == std::string::npos;
}

std::string NewJobId() {
  static thread_local std::mt19937_64 generator(std::random_device{}());
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(generator()));
  return text;
}

absl::StatusOr<JobStore> JobStore::Open(const std::string& state_dir) {
  if (state_dir.empty()) return absl::InvalidArgumentError("state_dir is empty");
  JobStore store(fs::absolute(state_dir).lexically_normal().string());
  for (const char* sub : {"jobs", "artifacts"}) {
    const absl::Status status = CreateDirectories((fs::path(store.state_dir_) / sub).string());
    if (!status.ok()) {
      return absl::Status(status.code(), absl::StrCat("state_dir: ", status.message()));
    }
  }
  return store;
}

std::string JobStore::JobDir(const std::string& id) const {
  return (fs::path(state_dir_) / "jobs" / id).string();
}

std::string JobStore::WorkDir(const std::string& id) const {
  return (fs::path(JobDir(id)) / "work").string();
}

std::string JobStore::ArtifactDir(const std::string& name) const {
  return (fs::path(state_dir_) / "artifacts" / name).string();
}

std::vector<JobRecord> JobStore::LoadAll(std::vector<std::string>* problems) const {
  std::vector<JobRecord> jobs;
  std::error_code ec;
  std::vector<fs::directory_entry> entries;
  for (const fs::directory_entry& entry : fs::directory_iterator(fs::path(state_dir_) / "jobs", ec)) {
    entries.push_back(entry);
  }
  for (const fs::directory_entry& entry : entries) {
    const std::string id = entry.path().filename().string();
    const std::string file = (entry.path() / "job.json").string();
    if (id.rfind(kDeletedPrefix, 0) == 0) {  // a deletion a crash interrupted
      std::error_code ignored;
      fs::remove_all(entry.path(), ignored);
      continue;
    }
    if (!IsJobId(id)) {
      if (problems) problems->push_back(absl::StrCat(entry.path().string(), ": not a job directory"));
      continue;
    }
    auto text = engine::ReadFileToString(file);
    if (!text.ok()) {
      if (problems) problems->push_back(std::string(text.status().message()));
      continue;
    }
    try {
      JobRecord record = RecordFromJson(Json::parse(*text));
      if (record.id != id) throw std::runtime_error("its id is not its directory's name");
      jobs.push_back(std::move(record));
    } catch (const std::exception& e) {
      if (problems) problems->push_back(absl::StrCat(file, ": unreadable job: ", e.what()));
    }
  }
  if (ec && problems) problems->push_back(absl::StrCat(state_dir_, "/jobs: ", ec.message()));
  std::sort(jobs.begin(), jobs.end(), [](const JobRecord& a, const JobRecord& b) {
    return a.created_unix_ms != b.created_unix_ms ? a.created_unix_ms < b.created_unix_ms
                                                  : a.id < b.id;
  });
  return jobs;
}

absl::Status JobStore::Save(const JobRecord& job) const {
  if (!IsJobId(job.id)) return absl::InternalError(absl::StrCat("bad job id \"", job.id, "\""));
  const std::string dir = JobDir(job.id);
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    if (absl::Status s = CreateDirectories(dir); !s.ok()) return s;
    // The new directory's entry in jobs/ must survive a crash as well as the file in it.
    if (absl::Status s = SyncDirectory((fs::path(state_dir_) / "jobs").string()); !s.ok()) return s;
  }
  return engine::WriteFileAtomically((fs::path(dir) / "job.json").string(),
                                     RecordToJson(job).dump(2) + "\n");
}

absl::Status JobStore::PublishArtifact(const std::string& id, const std::string& name) const {
  const std::string from = WorkDir(id);
  const std::string to = ArtifactDir(name);
  // renameat2(RENAME_NOREPLACE): a directory that appeared under the name meanwhile (an
  // upload) is never replaced, not even an empty one.
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) != 0) {
    const int saved = errno;
    if (saved == EEXIST || saved == ENOTEMPTY) {
      return absl::AlreadyExistsError(
          absl::StrCat("artifact \"", name, "\" appeared while the job ran (", to, ")"));
    }
    return absl::InternalError(
        absl::StrCat("cannot move ", from, " to ", to, ": ", std::strerror(saved)));
  }
  return SyncDirectory((fs::path(state_dir_) / "artifacts").string());
}

absl::Status JobStore::RemoveJob(const std::string& id) const {
  if (!IsJobId(id)) return absl::InternalError(absl::StrCat("bad job id \"", id, "\""));
  // One rename takes the job out of jobs/ (a crash midway through removing its files must not
  // leave a half-deleted job to be loaded again); the files go after.
  const std::string trash = (fs::path(state_dir_) / "jobs" / (kDeletedPrefix + id)).string();
  std::error_code ec;
  fs::rename(JobDir(id), trash, ec);
  if (ec) return absl::InternalError(absl::StrCat(JobDir(id), ": cannot remove: ", ec.message()));
  fs::remove_all(trash, ec);
  if (ec) return absl::InternalError(absl::StrCat(trash, ": cannot remove: ", ec.message()));
  return absl::OkStatus();
}

absl::Status JobStore::RemoveArtifact(const std::string& name) const {
  if (name.empty() || name[0] == '.' || name.find('/') != std::string::npos) {
    return absl::InternalError(absl::StrCat("bad artifact name \"", name, "\""));
  }
  std::error_code ec;
  fs::remove_all(ArtifactDir(name), ec);
  if (ec) {
    return absl::InternalError(absl::StrCat(ArtifactDir(name), ": cannot remove: ", ec.message()));
  }
  return absl::OkStatus();
}

}  // namespace nibble::server
