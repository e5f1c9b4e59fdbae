#include "server/artifact_puller.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/atomic_file.h"
#include "engine/sha256.h"
#include "nibble/v1/artifacts.grpc.pb.h"
#include "quant/manifest.h"

namespace nibble::server {
namespace fs = std::filesystem;
namespace {

absl::Status Errno(const std::string& what, const fs::path& path) {
  return absl::InternalError(absl::StrCat(what, " ", path.string(), ": ", std::strerror(errno)));
}

absl::Status SyncPath(const fs::path& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open", path);
  const int rc = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (rc != 0) {
    errno = error;
    return Errno("fsync", path);
  }
  return absl::OkStatus();
}

// The lock of one destination: flock'ed while a pull writes there.
class PullLock {
 public:
  static absl::StatusOr<std::unique_ptr<PullLock>> Acquire(const fs::path& path) {
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) return Errno("cannot open the lock file", path);
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd);
      return absl::FailedPreconditionError(
          absl::StrCat("another pull is writing there (", path.string(), " is locked)"));
    }
    return std::unique_ptr<PullLock>(new PullLock(path, fd));
  }
  ~PullLock() { ::close(fd_); }
  // After a finished pull: nothing is left beside the destination.
  void Remove() { ::unlink(path_.c_str()); }

 private:
  PullLock(fs::path path, int fd) : path_(std::move(path)), fd_(fd) {}
  fs::path path_;
  int fd_;
};

// The size of a regular file at `path` (not following a link), or 0 when there is none.
uint64_t SizeOnDisk(const fs::path& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return 0;
  return static_cast<uint64_t>(st.st_size);
}

// Removes from `dir` whatever the manifest does not list as a file, and files longer than
// listed (a source that changed, or junk): what is left is a prefix of each listed file.
absl::Status Prune(const fs::path& dir, const quant::ArtifactManifest& manifest) {
  std::vector<fs::path> doomed;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const fs::file_status status = it->symlink_status(ec);
    if (ec) break;
    if (fs::is_directory(status)) continue;
    const std::string relative = it->path().lexically_relative(dir).generic_string();
    auto listed = manifest.files.find(relative);
    if (!fs::is_regular_file(status) || listed == manifest.files.end() ||
        SizeOnDisk(it->path()) > listed->second.size) {
      doomed.push_back(it->path());
    }
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot list ", dir.string(), ": ", ec.message()));
  for (const fs::path& path : doomed) {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("cannot remove", path);
  }
  return absl::OkStatus();
}

class Puller {
 public:
  Puller(const std::shared_ptr<grpc::Channel>& channel, const std::string& address,
         const rpc::ClientSecurity& security, const std::string& artifact,
         const PullOptions& options)
      : stub_(nibble::v1::Artifacts::NewStub(channel)),
        address_(address),
        security_(security),
        artifact_(artifact),
        options_(options),
        start_(std::chrono::steady_clock::now()) {}

  absl::StatusOr<nibble::v1::ArtifactInfo> Stat() {
    grpc::ClientContext context;
    rpc::AddCallCredentials(&context, security_);
    rpc::SetDeadlineAfter(&context, options_.stat_timeout_seconds);
    nibble::v1::StatArtifactRequest request;
    request.set_name(artifact_);
    nibble::v1::ArtifactInfo info;
    grpc::Status status = stub_->Stat(&context, request, &info);
    if (!status.ok()) return rpc::FromGrpcStatus(address_, status);
    if (info.manifest_json().empty()) {
      return absl::DataLossError(
          absl::StrCat(address_, ": artifact \"", artifact_, "\": Stat sent no manifest"));
    }
    return info;
  }

  // Appends `relative` (of `size` bytes) to `local` from what is there until it is whole.
  absl::Status Fetch(const std::string& relative, uint64_t size, const fs::path& local) {
    const int fd = ::open(local.c_str(), O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) return Errno("cannot open", local);
    absl::Status status = FetchInto(fd, relative, size, local);
    if (status.ok() && ::fsync(fd) != 0) status = Errno("fsync", local);
    ::close(fd);
    return status;
  }

  PullProgress progress;

 private:
  absl::Status FetchInto(int fd, const std::string& relative, uint64_t size,
                         const fs::path& local) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) return Errno("cannot stat", local);
    uint64_t offset = static_cast<uint64_t>(st.st_size);
    if (offset >= size) return absl::OkStatus();
    grpc::ClientContext context;
    rpc::AddCallCredentials(&context, security_);
    nibble::v1::DownloadRequest request;
    request.set_artifact(artifact_);
    request.set_path(relative);
    request.set_offset(offset);
    uint32_t chunk_bytes = options_.chunk_bytes;
    if (chunk_bytes == 0 && options_.max_bytes_per_second > 0) {
      // About a tenth of a second's worth per chunk, so that the limit is kept smoothly
      // rather than by a burst of a whole default-sized chunk and a long pause.
      chunk_bytes = static_cast<uint32_t>(
          std::clamp(options_.max_bytes_per_second / 10, 4096.0, 1048576.0));
    }
    request.set_max_chunk_bytes(chunk_bytes);
    auto reader = stub_->Download(&context, request);
    nibble::v1::DownloadChunk chunk;
    absl::Status problem;
    while (problem.ok() && reader->Read(&chunk)) {
      const std::string& data = chunk.data();
      if (chunk.path() != relative || chunk.offset() != offset || data.size() > size - offset) {
        problem = absl::DataLossError(absl::StrCat(
            address_, ": artifact \"", artifact_, "\" file \"", relative, "\": the source sent ",
            data.size(), " bytes of \"", chunk.path(), "\" at offset ", chunk.offset(),
            " where ", size - offset, " bytes at offset ", offset, " were due"));
        break;
      }
      for (size_t written = 0; written < data.size();) {
        const ssize_t n = ::pwrite(fd, data.data() + written, data.size() - written,
                                   static_cast<off_t>(offset + written));
        if (n < 0) {
          if (errno == EINTR) continue;
          problem = Errno("cannot write", local);
          break;
        }
        written += static_cast<size_t>(n);
      }
      if (!problem.ok()) break;
      offset += data.size();
      progress.bytes_done += data.size();
      progress.bytes_transferred += data.size();
      if (options_.on_bytes) options_.on_bytes(data.size());
      if (options_.on_progress) options_.on_progress(progress);
      if (options_.should_stop && options_.should_stop()) {
        problem = absl::CancelledError(absl::StrCat("the pull of \"", artifact_,
                                                    "\" was stopped; pull again to resume"));
        break;
      }
      Throttle();
    }
    if (!problem.ok()) {
      context.TryCancel();
      reader->Finish();
      return problem;
    }
    grpc::Status status = reader->Finish();
    if (!status.ok()) return rpc::FromGrpcStatus(address_, status);
    if (offset != size) {
      return absl::DataLossError(absl::StrCat(address_, ": artifact \"", artifact_, "\" file \"",
                                              relative, "\": the stream ended at ", offset,
                                              " of ", size, " bytes"));
    }
    return absl::OkStatus();
  }

  // Sleeps while this pull is ahead of max_bytes_per_second.
  void Throttle() const {
    if (options_.max_bytes_per_second <= 0) return;
    const auto due = start_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                  std::chrono::duration<double>(
                                      static_cast<double>(progress.bytes_transferred) /
                                      options_.max_bytes_per_second));
    std::this_thread::sleep_until(due);
  }

  std::unique_ptr<nibble::v1::Artifacts::Stub> stub_;
  const std::string address_;
  const rpc::ClientSecurity security_;
  const std::string artifact_;
  const PullOptions options_;
  const std::chrono::steady_clock::time_point start_;
};

}  // namespace

absl::StatusOr<PullResult> PullArtifact(const std::shared_ptr<grpc::Channel>& channel,
                                        const std::string& address,
                                        const rpc::ClientSecurity& security,
                                        const std::string& artifact,
                                        const std::string& partial_dir,
                                        const std::string& final_dir, const PullOptions& options) {
  const fs::path partial(partial_dir);
  const fs::path destination(final_dir);
  const fs::path manifest_dir(partial_dir + ".manifest");
  std::error_code ec;
  if (fs::exists(fs::symlink_status(destination, ec))) {
    return absl::AlreadyExistsError(absl::StrCat(final_dir, " exists already"));
  }
  fs::create_directories(partial.parent_path(), ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create ", partial.parent_path().string(), ": ", ec.message()));
  }
  auto lock = PullLock::Acquire(partial_dir + ".lock");
  if (!lock.ok()) return lock.status();

  Puller puller(channel, address, security, artifact, options);
  auto info = puller.Stat();
  if (!info.ok()) return info.status();

  // The manifest this pull works from. A different one from the last (broken) pull means the
  // source's artifact changed: what is on disk belongs to the old one, start over.
  const fs::path saved = manifest_dir / quant::kManifestFileName;
  auto previous = engine::ReadFileToString(saved.string());
  if (!previous.ok() || *previous != info->manifest_json()) {
    fs::remove_all(partial, ec);
    fs::remove_all(manifest_dir, ec);
    fs::create_directories(manifest_dir, ec);
    if (ec) {
      return absl::InternalError(
          absl::StrCat("cannot create ", manifest_dir.string(), ": ", ec.message()));
    }
    if (absl::Status s = engine::WriteFileAtomically(saved.string(), info->manifest_json());
        !s.ok()) {
      return s;
    }
  }
  auto manifest = quant::ReadManifest(manifest_dir.string());
  if (!manifest.ok()) {
    fs::remove_all(manifest_dir, ec);
    return absl::DataLossError(absl::StrCat(address, ": artifact \"", artifact,
                                            "\": its manifest is not valid: ",
                                            manifest.status().message()));
  }
  fs::create_directories(partial, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", partial_dir, ": ", ec.message()));
  if (absl::Status s = Prune(partial, *manifest); !s.ok()) return s;

  PullResult result;
  for (const auto& [relative, file] : manifest->files) {
    result.bytes_total += file.size;
    result.bytes_resumed += std::min(SizeOnDisk(partial / relative), file.size);
  }
  puller.progress.bytes_total = result.bytes_total;
  puller.progress.bytes_done = result.bytes_resumed;
  for (const auto& [relative, file] : manifest->files) {
    const fs::path local = partial / relative;
    fs::create_directories(local.parent_path(), ec);
    if (ec) {
      return absl::InternalError(
          absl::StrCat("cannot create ", local.parent_path().string(), ": ", ec.message()));
    }
    puller.progress.file = relative;
    if (options.on_progress) options.on_progress(puller.progress);
    if (absl::Status s = puller.Fetch(relative, file.size, local); !s.ok()) return s;
    auto sha256 = engine::Sha256OfFile(local.string());
    if (!sha256.ok()) return sha256.status();
    if (*sha256 != file.sha256) {
      // Deleted, so that the next pull fetches it whole rather than trusting its prefix.
      ::unlink(local.c_str());
      return absl::DataLossError(absl::StrCat(
          address, ": artifact \"", artifact, "\" file \"", relative, "\": sha256 ", *sha256,
          " but the manifest says ", file.sha256, " (deleted; pull again to fetch it afresh)"));
    }
  }
  result.bytes_transferred = puller.progress.bytes_transferred;

  // The manifest last: a directory with a manifest is complete.
  if (absl::Status s = engine::WriteFileAtomically(
          (partial / quant::kManifestFileName).string(), info->manifest_json());
      !s.ok()) {
    return s;
  }
  if (absl::Status s = quant::VerifyArtifact(partial_dir); !s.ok()) {
    return absl::DataLossError(absl::StrCat("the pulled copy of \"", artifact,
                                            "\" does not verify: ", s.message()));
  }
  if (absl::Status s = SyncPath(partial, O_RDONLY | O_DIRECTORY); !s.ok()) return s;
  if (::renameat2(AT_FDCWD, partial.c_str(), AT_FDCWD, destination.c_str(), RENAME_NOREPLACE) !=
      0) {
    if (errno == EEXIST) return absl::AlreadyExistsError(absl::StrCat(final_dir, " exists already"));
    return Errno(absl::StrCat("cannot rename ", partial_dir, " to"), destination);
  }
  const fs::path parent = destination.parent_path().empty() ? fs::path(".") : destination.parent_path();
  if (absl::Status s = SyncPath(parent, O_RDONLY | O_DIRECTORY); !s.ok()) return s;
  fs::remove_all(manifest_dir, ec);
  (*lock)->Remove();
  return result;
}

}  // namespace nibble::server
