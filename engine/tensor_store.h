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
  std::vector<std::string> Names() const;
  const std::string& dir() const { return dir_; }

 private:
  // The tensor's bytes after checking its shape and (unless nullopt) its dtype.
  absl::StatusOr<TensorRef> GetChecked(std::string_view name,
                                       const std::vector<int64_t>& expected_shape,
                                       std::optional<DType> dtype) const;

  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, TensorRef, std::less<>> tensors_;
};

std::string ShapeToString(const std::vector<int64_t>& shape);

}  // namespace nibble::engine
