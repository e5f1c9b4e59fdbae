#include "server/artifact_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "engine/atomic_file.h"
#include "server/path_policy.h"

namespace nibble::server {
namespace fs = std::filesystem;
namespace {

// What changes when anything in `dir` changes: every entry's path, type, size, mtime, inode.
std::string DirectorySignature(const fs::path& dir) {
  std::vector<std::string> lines;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    struct stat st {};
    if (::lstat(it->path().c_str(), &st) != 0) {
      lines.push_back(absl::StrCat(it->path().string(), " unreadable"));
      continue;
    }
    lines.push_back(absl::StrCat(it->path().lexically_relative(dir).string(), " ", st.st_mode,
                                 " ", st.st_size, " ", st.st_mtim.tv_sec, ".",
                                 st.st_mtim.tv_nsec, " ", st.st_ino));
  }
  if (ec) lines.push_back(absl::StrCat("error ", ec.message()));
  std::sort(lines.begin(), lines.end());
  std::string signature;
  for (const std::string& line : lines) absl::StrAppend(&signature, line, "\n");
  return signature;
}

absl::Status SyncDirectory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat(dir.string(), ": cannot open: ", std::strerror(errno)));
  }
  const int rc = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (rc != 0) {
    return absl::InternalError(absl::StrCat(dir.string(), ": fsync: ", std::strerror(error)));
  }
  return absl::OkStatus();
}

}  // namespace

void DescribeManifest(const quant::ArtifactManifest& manifest, nibble::v1::ArtifactInfo* info) {
  info->set_architecture(manifest.architecture);
  auto* quant = info->mutable_quantization();
  quant->set_method(manifest.quantization.method);
  quant->set_bits(manifest.quantization.bits);
  quant->set_group_size(manifest.quantization.group_size);
  quant->set_calibration_dataset(manifest.quantization.calibration_dataset.value_or(""));
  quant->set_calibration_samples(manifest.quantization.calibration_samples.value_or(0));
  quant->set_calibration_seqlen(manifest.quantization.calibration_seqlen.value_or(0));
  info->set_chat_template(manifest.chat_template);
  uint64_t total = 0;
  for (const auto& [path, file] : manifest.files) {
    auto* out = info->add_files();
    out->set_path(path);
    out->set_size(file.size);
    out->set_sha256(file.sha256);
    total += file.size;
  }
  info->set_total_bytes(total);
  auto* report = info->mutable_report();
  for (const quant::ManifestLayerError& layer : manifest.report.layers) {
    auto* out = report->add_layers();
    out->set_name(layer.name);
    out->set_relative_error(layer.relative_error);
  }
  for (const std::string& reason : manifest.report.not_converted) report->add_not_converted(reason);
  for (const auto& [phase, seconds] : manifest.report.seconds) {
    (*report->mutable_seconds())[phase] = seconds;
  }
  if (manifest.report.perplexity_before) {
    report->set_perplexity_before(*manifest.report.perplexity_before);
  }
  if (manifest.report.perplexity_after) {
    report->set_perplexity_after(*manifest.report.perplexity_after);
  }
}

ArtifactStore::ArtifactStore(fs::path state_dir)
    : artifacts_dir_(state_dir / "artifacts"), transfers_dir_(state_dir / "transfers") {}

absl::Status ArtifactStore::Open() {
  for (const fs::path& dir : {artifacts_dir_, transfers_dir_}) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec || !fs::is_directory(dir)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "state_dir: cannot create ", dir.string(), ": ", ec ? ec.message() : "not a directory"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<StoredArtifact> ArtifactStore::Load(const std::string& name) {
  const fs::path dir = artifacts_dir_ / name;
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    if (::lstat(dir.c_str(), &st) == 0) {
      // A link or a file where an artifact should be: never followed, never served.
      StoredArtifact odd;
      odd.name = name;
      odd.dir = dir;
      odd.status = absl::DataLossError(
          absl::StrCat("artifact \"", name, "\": ", dir.string(),
                       " is not a directory (a symbolic link or a file); not served"));
      return odd;
    }
    return absl::NotFoundError(absl::StrCat("no artifact named \"", name, "\" on this daemon"));
  }
  const std::string signature = DirectorySignature(dir);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cache_.find(name);
    if (it != cache_.end() && it->second.signature == signature) return it->second.artifact;
  }
  StoredArtifact artifact;
  artifact.name = name;
  artifact.dir = dir;
  auto manifest = quant::ReadManifest(dir.string());
  if (manifest.ok()) {
    artifact.manifest = *std::move(manifest);
    auto json = engine::ReadFileToString((dir / quant::kManifestFileName).string());
    if (json.ok()) artifact.manifest_json = *std::move(json);
    artifact.status = json.ok() ? quant::VerifyArtifact(dir.string()) : json.status();
  } else {
    artifact.status = manifest.status();
  }
  if (!artifact.status.ok()) {
    artifact.status = absl::DataLossError(
        absl::StrCat("artifact \"", name, "\" is invalid: ", artifact.status.message()));
  }
  std::lock_guard<std::mutex> lock(mu_);
  // The signature from before verifying: a change while it ran makes the next look-up verify
  // again rather than trust a result about files that have since changed.
  cache_[name] = Verified{signature, artifact};
  return artifact;
}

std::vector<StoredArtifact> ArtifactStore::List() {
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(artifacts_dir_, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (CheckArtifactName(name).ok()) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  std::vector<StoredArtifact> artifacts;
  for (const std::string& name : names) {
    auto artifact = Load(name);
    if (artifact.ok()) artifacts.push_back(*std::move(artifact));  // gone meanwhile: skipped
  }
  return artifacts;
}

absl::StatusOr<StoredArtifact> ArtifactStore::Find(std::string_view name) {
  if (absl::Status s = CheckArtifactName(name); !s.ok()) return s;
  return Load(std::string(name));
}

absl::StatusOr<StoredArtifact> ArtifactStore::FindVerified(std::string_view name) {
  auto artifact = Find(name);
  if (!artifact.ok()) return artifact.status();
  if (!artifact->status.ok()) return artifact->status;
  return artifact;
}

absl::StatusOr<fs::path> ArtifactStore::FilePath(const StoredArtifact& artifact,
                                                 const std::string& relative) {
  if (relative.empty()) return absl::InvalidArgumentError("field path is empty");
  if (relative.front() == '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("path \"", relative, "\" is absolute; name a file of the artifact"));
  }
  if (relative == quant::kManifestFileName) {
    return absl::InvalidArgumentError(absl::StrCat(
        "path \"", relative, "\": the manifest comes with Artifacts.Stat (manifest_json)"));
  }
  // ConfineToRoots refuses ".." and links out of the artifact's directory.
  auto confined = ConfineToRoots(relative, {artifact.dir});
  if (!confined.ok()) {
    return absl::InvalidArgumentError(std::string(confined.status().message()));
  }
  if (!artifact.manifest.files.count(relative)) {
    return absl::NotFoundError(absl::StrCat("artifact \"", artifact.name, "\" has no file \"",
                                            relative, "\" (Artifacts.Stat lists its files)"));
  }
  return *confined;
}

ArtifactStore::TransferLease::~TransferLease() {
  if (store_ == nullptr) return;
  std::lock_guard<std::mutex> lock(store_->mu_);
  store_->transfers_.erase(name_);
}

absl::StatusOr<ArtifactStore::TransferLease> ArtifactStore::BeginTransfer(std::string_view name) {
  if (absl::Status s = CheckArtifactName(name); !s.ok()) return s;
  std::error_code ec;
  if (fs::exists(fs::symlink_status(artifacts_dir_ / name, ec))) {
    return absl::AlreadyExistsError(
        absl::StrCat("an artifact named \"", std::string(name), "\" already exists on this daemon"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!transfers_.insert(std::string(name)).second) {
    return absl::AbortedError(absl::StrCat("artifact \"", std::string(name),
                                           "\" is being transferred already; try again later"));
  }
  return TransferLease(this, std::string(name));
}

absl::Status ArtifactStore::Commit(const TransferLease& lease) {
  const fs::path from = TransferDir(lease);
  const fs::path to = artifacts_dir_ / lease.name();
  if (absl::Status s = quant::VerifyArtifact(from.string()); !s.ok()) return s;
  if (absl::Status s = SyncDirectory(from); !s.ok()) return s;
  // RENAME_NOREPLACE: an artifact that appeared meanwhile is never replaced.
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) != 0) {
    const int error = errno;
    if (error == EEXIST) {
      return absl::AlreadyExistsError(
          absl::StrCat("an artifact named \"", lease.name(), "\" already exists on this daemon"));
    }
    return absl::InternalError(absl::StrCat("cannot move ", from.string(), " to ", to.string(),
                                            ": ", std::strerror(error)));
  }
  (void)SyncDirectory(transfers_dir_);
  return SyncDirectory(artifacts_dir_);
}

}  // namespace nibble::server
