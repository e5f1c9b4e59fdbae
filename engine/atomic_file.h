// Whole-file reads and crash-safe whole-file writes.
//
// Thread safety: every function may be called from any thread. Two concurrent writers of the
// same path each produce a complete file; the last rename wins.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace nibble::engine {

// Reads a whole file. Errors name the path and the system's reason: NotFound when it does not
// exist, PermissionDenied, FailedPrecondition for a directory, others per errno.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never a
// half-written one: write to a uniquely named temporary file in the same directory, fsync it,
// rename it over `path`, fsync the directory. On any failure before the rename the temporary
// file is removed and `path` is untouched. The new file gets mode 0666 minus the umask.
// Errors name the path and the system's reason (strerror).
absl::Status WriteFileAtomically(const std::string& path, std::span<const uint8_t> bytes);
absl::Status WriteFileAtomically(const std::string& path, std::string_view text);
// The same, for a file made of several pieces written one after another (saves building a
// multi-gigabyte buffer only to write it).
absl::Status WriteFileAtomically(const std::string& path,
                                 std::span<const std::span<const uint8_t>> pieces);

// A directory written whole or not at all: files go into a hidden staging directory beside
// `final_dir`, and Commit renames it into place. Destroying an uncommitted one removes it.
// Refuses (AlreadyExists) a `final_dir` that exists and is not empty.
class StagingDirectory {
 public:
  static absl::StatusOr<StagingDirectory> Create(const std::string& final_dir);
  StagingDirectory(StagingDirectory&& other) noexcept;
  StagingDirectory& operator=(StagingDirectory&&) = delete;
  ~StagingDirectory();

  const std::string& path() const { return staging_; }
  // Path of a file inside the staging directory.
  std::string File(const std::string& name) const { return staging_ + "/" + name; }
  absl::Status Commit();

 private:
  StagingDirectory(std::string staging, std::string final_dir)
      : staging_(std::move(staging)), final_(std::move(final_dir)) {}
  std::string staging_;
  std::string final_;
};

}  // namespace nibble::engine
