// Reading and writing the safetensors format (https://huggingface.co/docs/safetensors):
//   8 bytes little-endian header length N | N bytes JSON header | data bytes.
// The header maps tensor names to {dtype, shape, data_offsets [begin, end)} relative to the
// start of the data section, plus an optional "__metadata__" map of strings.
//
// Every malformed input is rejected with an InvalidArgument/DataLoss status naming the file
// and the problem; nothing here aborts or reads out of bounds (fuzzed: tests/fuzz).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
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

  int64_t NumElements() const;
};

struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;  // sorted by data_begin
  std::map<std::string, std::string> metadata;
  uint64_t data_offset = 0;  // where the data section starts in the file (8 + N)
};

// Parses and validates a whole file image: header length within the file, JSON well formed,
// known dtypes, non-negative shapes whose element count times dtype size equals the byte
// range, ranges inside the data section and not overlapping. Does not require the ranges to
// cover the data section contiguously (the format says they should; real files do).
// `source` names the file in error messages.
absl::StatusOr<SafetensorsHeader> ParseSafetensors(std::span<const uint8_t> file_bytes,
                                                    std::string_view source);

// A read-only, memory-mapped safetensors file. Thread-compatible: const methods may be called
// from any thread concurrently.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  // nullptr if no tensor has this name.
  const TensorInfo* Find(std::string_view name) const;
  // The raw little-endian bytes of a tensor of this file; valid while the file lives.
  std::span<const uint8_t> Bytes(const TensorInfo& tensor) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  const uint8_t* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  SafetensorsHeader header_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in header_.tensors
};

// Builds a safetensors file in memory and writes it atomically (temporary name, fsync,
// rename), so that a reader never sees a half-written file.
class SafetensorsWriter {
 public:
  // Copies `bytes`; their size must match dtype and shape. Names must be unique.
  absl::Status Add(std::string name, DType dtype, std::vector<int64_t> shape,
                   std::span<const uint8_t> bytes);
  void SetMetadata(std::string key, std::string value);
  absl::Status Write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace nibble::engine
