// Reading and writing the safetensors format (https://huggingface.co/docs/safetensors):
//   8 bytes little-endian header length N | N bytes JSON header | data bytes.
// The header maps tensor names to {dtype, shape, data_offsets [begin, end)} relative to the
// start of the data section, plus an optional "__metadata__" map of strings.
//
// Every malformed input is rejected with a status whose message starts with the file name and
// says what is wrong; nothing here throws, aborts or reads out of bounds (fuzzed: tests/fuzz).
// Codes: DataLoss when the file is too short for what it declares (shorter than the length
// field, header length past the end, a tensor ending past the data section: a truncated
// copy); InvalidArgument for everything else that is malformed.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/dtype.h"

namespace nibble::engine {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t data_begin = 0;  // offset into the data section
  uint64_t data_end = 0;

  // Product of the shape (1 for a 0-d tensor). Parsed tensors are checked to fit in int64.
  int64_t NumElements() const;
};

struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;  // sorted by data_begin
  std::map<std::string, std::string> metadata;
  uint64_t data_offset = 0;  // where the data section starts in the file (8 + N)
};

// Parses and validates a whole file image: header length within the file (and at most 100 MB,
// the reference's limit), JSON well formed with no duplicate keys at any level, every tensor
// entry an object with a known "dtype" string, a "shape" array of non-negative integers and
// "data_offsets" [begin, end] of non-negative integers, element count times dtype size
// representable and equal to end - begin, ranges inside the data section and not overlapping;
// "__metadata__", if present, an object of strings. Unknown keys inside a tensor entry are
// ignored (as the reference does). Does not require the ranges to cover the data section
// contiguously (the format says they should; real files do). Reads only the header; the data
// section is not touched. `source` names the file in error messages. Pure; thread-safe.
absl::StatusOr<SafetensorsHeader> ParseSafetensors(std::span<const uint8_t> file_bytes,
                                                    std::string_view source);

// A read-only, memory-mapped safetensors file. Thread-compatible: const methods may be called
// from any thread concurrently. The mapping is shared with the page cache: if another process
// truncates the file while it is open, touching the lost pages raises SIGBUS (as with any
// mmap reader); checkpoints are expected to be immutable while served.
class SafetensorsFile {
 public:
  // Errors: those of open/mmap (NotFound, PermissionDenied, ...), FailedPrecondition for
  // something that is not a regular file, and those of ParseSafetensors.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  // nullptr if no tensor has this name.
  const TensorInfo* Find(std::string_view name) const;
  // The raw little-endian bytes of a tensor of this file; valid while the file lives. Not
  // necessarily aligned to the element size (the format does not promise it). Empty for a
  // TensorInfo whose range does not lie within this file's data section.
  std::span<const uint8_t> Bytes(const TensorInfo& tensor) const;
  // Drops the mapping's pages from this process's resident set (madvise MADV_DONTNEED; they
  // stay in the page cache). The bytes stay readable: a page comes back when it is read.
  void ReleaseResidentPages() const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  const uint8_t* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  SafetensorsHeader header_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in header_.tensors
};

// Builds a safetensors file in memory and writes it atomically (temporary name, fsync,
// rename), so that a reader never sees a half-written file. The file has "__metadata__" first
// (if any metadata was set), then the tensors in the order added, their data contiguous in
// that order, and the header padded with spaces to a multiple of 8 bytes (as the reference
// writes). Thread-compatible.
class SafetensorsWriter {
 public:
  // Copies `bytes`; their size must match dtype and shape (InvalidArgument otherwise, also for
  // a negative dimension, an element count that overflows, a name that is not UTF-8 or is
  // "__metadata__"). Names must be unique (AlreadyExists).
  absl::Status Add(std::string name, DType dtype, std::vector<int64_t> shape,
                   std::span<const uint8_t> bytes);
  // Sets (or replaces) a metadata entry.
  void SetMetadata(std::string key, std::string value);
  // InvalidArgument if a metadata key or value is not valid UTF-8; otherwise the errors of
  // WriteFileAtomically. May be called more than once.
  absl::Status Write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::set<std::string> names_;  // of entries_, to reject duplicates quickly
  std::map<std::string, std::string> metadata_;
};

}  // namespace nibble::engine
