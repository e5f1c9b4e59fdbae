// All tensors of a Hugging Face model directory: `model.safetensors`, or the shards named by
// `model.safetensors.index.json`, or else every `*.safetensors` file in the directory.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/safetensors.h"

namespace nibble::engine {

struct TensorRef {
  const TensorInfo* info = nullptr;
  std::span<const uint8_t> bytes;
  const std::string* file = nullptr;  // the shard it lives in, for error messages
  const SafetensorsFile* shard = nullptr;
};

// Thread-compatible; the files stay mapped for the store's lifetime.
class TensorStore {
 public:
  // Errors: no safetensors file, a bad index (not JSON, no weight_map, a shard outside the
  // directory, a shard missing, a tensor absent from the shard the index names), any shard
  // that fails to parse, a tensor name found in two files.
  static absl::StatusOr<std::unique_ptr<TensorStore>> Open(const std::string& model_dir);

  bool Contains(std::string_view name) const;
  // NotFound naming the tensor and the directory.
  absl::StatusOr<TensorRef> Get(std::string_view name) const;
  // The tensor converted to fp32 (from F32, F16 or BF16), after checking that its shape is
  // `expected_shape`; errors name the tensor, its file, and both shapes or the dtype.
  absl::StatusOr<std::vector<float>> ReadF32(std::string_view name,
                                             const std::vector<int64_t>& expected_shape) const;
  // Raw element access with the same checks, for tensors that must have exactly this dtype
  // (AWQ's int32 qweight/qzeros and fp16 scales).
  absl::StatusOr<std::vector<int32_t>> ReadI32(std::string_view name,
                                               const std::vector<int64_t>& expected_shape) const;
  absl::StatusOr<std::vector<uint16_t>> ReadF16Bits(
      std::string_view name, const std::vector<int64_t>& expected_shape) const;
  // An F16 tensor in place, without a copy: its elements in the file's mapping, which
  // `mapping` keeps alive. Pages come into memory as they are read (an embedding table is
  // read a row per token). FailedPrecondition where the tensor is not F16 or its bytes are not
  // 2-byte aligned in the file (the format does not promise alignment): read it instead.
  struct MappedF16 {
    std::shared_ptr<const void> mapping;
    const uint16_t* data = nullptr;
  };
  absl::StatusOr<MappedF16> MapF16(std::string_view name,
                                   const std::vector<int64_t>& expected_shape) const;
  std::vector<std::string> Names() const;
  // After loading: what was read through the mappings leaves the resident set; tensors used
  // in place (MapF16) page back in as they are read.
  void ReleaseResidentPages() const;
  const std::string& dir() const { return dir_; }

 private:
  // The tensor's bytes after checking its shape and (unless nullopt) its dtype.
  absl::StatusOr<TensorRef> GetChecked(std::string_view name,
                                       const std::vector<int64_t>& expected_shape,
                                       std::optional<DType> dtype) const;

  std::string dir_;
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::map<std::string, TensorRef, std::less<>> tensors_;
};

std::string ShapeToString(const std::vector<int64_t>& shape);

}  // namespace nibble::engine
