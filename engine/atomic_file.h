// Whole-file reads and crash-safe whole-file writes.
#pragma once

#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace nibble::engine {

// Reads a whole file; NotFound / error status names the path.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, never a
// half-written one: write to a temporary name in the same directory, fsync it, rename it over
// `path`, fsync the directory.
absl::Status WriteFileAtomically(const std::string& path, std::span<const uint8_t> bytes);
absl::Status WriteFileAtomically(const std::string& path, std::string_view text);

}  // namespace nibble::engine
