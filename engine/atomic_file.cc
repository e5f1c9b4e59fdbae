#include "engine/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"

namespace nibble::engine {
namespace {

// Status for the system call that just failed: the parts (joined) say what was being done,
// errno says why (absl::ErrnoToStatus appends the thread-safe strerror text). errno is read
// before any string is built, since allocation may change it.
template <typename... Parts>
absl::Status SystemError(const Parts&... parts) {
  const int error_number = errno;
  return absl::ErrnoToStatus(error_number, absl::StrCat(parts...));
}

// Closes a file descriptor on scope exit unless released.
class ScopedFd {
 public:
  explicit ScopedFd(int fd) : fd_(fd) {}
  ~ScopedFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  int get() const { return fd_; }
  // Closes now and reports the result: for a file just written, close can report a delayed
  // write error (NFS), which must not be lost.
  int Close() {
    const int fd = fd_;
    fd_ = -1;
    return ::close(fd);
  }

 private:
  int fd_;
};

// The directory part of `path` ("." for a bare file name, "/" for a file in the root).
std::string DirectoryOf(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// A name in the same directory as `path` that no other writer (thread or process) will pick:
// pid, a per-process counter and the clock. Hidden (leading dot) so that tools listing the
// directory ignore it. Creation uses O_EXCL, so a collision is detected, not clobbered.
std::string TemporaryNameFor(const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  const auto ticks = std::chrono::steady_clock::now().time_since_epoch().count();
  return absl::StrCat(dir, ".", base, ".tmp.", ::getpid(), ".",
                      counter.fetch_add(1, std::memory_order_relaxed), ".",
                      static_cast<uint64_t>(ticks) % 1000000007u);
}

absl::Status WriteAll(int fd, std::span<const uint8_t> bytes, const std::string& temp_path) {
  while (!bytes.empty()) {
    const ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return SystemError("write ", temp_path);
    }
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

// Everything between creating the temporary file and renaming it; the caller removes the
// temporary file if this fails.
absl::Status WriteAndSync(int fd, std::span<const std::span<const uint8_t>> pieces,
                          const std::string& temp_path) {
  for (std::span<const uint8_t> piece : pieces) {
    NIBBLE_RETURN_IF_ERROR(WriteAll(fd, piece, temp_path));
  }
  if (::fsync(fd) != 0) return SystemError("fsync ", temp_path);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  ScopedFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return SystemError("open ", path);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return SystemError("stat ", path);
  if (S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat("read ", path, ": is a directory"));
  }
  std::string contents;
  // The size is only a hint (the file may change, or be a pipe or /proc file reporting 0):
  // read until end of file either way.
  if (S_ISREG(st.st_mode) && st.st_size > 0) contents.reserve(static_cast<size_t>(st.st_size));
  char buffer[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd.get(), buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      return SystemError("read ", path);
    }
    if (n == 0) break;
    contents.append(buffer, static_cast<size_t>(n));
  }
  return contents;
}

absl::Status WriteFileAtomically(const std::string& path,
                                 std::span<const std::span<const uint8_t>> pieces) {
  if (path.empty() || path.back() == '/') {
    return absl::InvalidArgumentError(absl::StrCat("write '", path, "': not a file name"));
  }
  std::string temp_path;
  int raw_fd = -1;
  // O_EXCL makes a name collision an error rather than a shared file; retry with a new name.
  for (int attempt = 0; attempt < 16; ++attempt) {
    temp_path = TemporaryNameFor(path);
    raw_fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (raw_fd >= 0 || errno != EEXIST) break;
  }
  if (raw_fd < 0) {
    return SystemError("write ", path, ": create temporary file ",
                                           temp_path);
  }
  ScopedFd fd(raw_fd);
  absl::Status status = WriteAndSync(fd.get(), pieces, temp_path);
  if (fd.Close() != 0 && status.ok()) {
    status = SystemError("close ", temp_path);
  }
  if (status.ok() && ::rename(temp_path.c_str(), path.c_str()) != 0) {
    status = SystemError("rename ", temp_path, " to ", path);
  }
  if (!status.ok()) {
    ::unlink(temp_path.c_str());
    return absl::Status(status.code(), absl::StrCat("write ", path, ": ", status.message()));
  }
  // The rename is durable only once the directory entry is on disk.
  const std::string dir = DirectoryOf(path);
  ScopedFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() < 0) {
    return SystemError("write ", path, ": open directory ", dir);
  }
  if (::fsync(dir_fd.get()) != 0) {
    return SystemError("write ", path, ": fsync directory ", dir);
  }
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, std::span<const uint8_t> bytes) {
  const std::span<const uint8_t> pieces[] = {bytes};
  return WriteFileAtomically(path, std::span<const std::span<const uint8_t>>(pieces));
}

absl::Status WriteFileAtomically(const std::string& path, std::string_view text) {
  return WriteFileAtomically(
      path, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

absl::StatusOr<StagingDirectory> StagingDirectory::Create(const std::string& final_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(final_dir, ec) && !fs::is_empty(final_dir, ec)) {
    return absl::AlreadyExistsError(absl::StrCat(final_dir, ": exists and is not empty"));
  }
  fs::path final_path = fs::path(final_dir);
  if (final_path.filename().empty()) final_path = final_path.parent_path();  // "dir/"
  const fs::path staging = final_path.parent_path() /
                           absl::StrCat(".", final_path.filename().string(), ".tmp-", getpid());
  fs::remove_all(staging, ec);
  fs::create_directories(staging, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat(staging.string(), ": cannot create directory: ", ec.message()));
  }
  return StagingDirectory(staging.string(), final_path.string());
}

StagingDirectory::StagingDirectory(StagingDirectory&& other) noexcept
    : staging_(std::move(other.staging_)), final_(std::move(other.final_)) {
  other.staging_.clear();
}

StagingDirectory::~StagingDirectory() {
  if (staging_.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(staging_, ec);
}

absl::Status StagingDirectory::Commit() {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::remove(final_, ec);  // an empty directory, if any (Create refused a non-empty one)
  fs::rename(staging_, final_, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot rename ", staging_, " to ", final_, ": ", ec.message()));
  }
  staging_.clear();
  return absl::OkStatus();
}

}  // namespace nibble::engine
