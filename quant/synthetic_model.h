// Models with real shapes and random weights: speed and memory do not depend on the weight
// values, so the benchmarks of a 1.8B or 7B model need only its config.json. (Quality is
// measured on real weights: stories260K.)
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace nibble::quant {

struct SyntheticModelOptions {
  std::string config_path;     // a real config.json (../shared/models/configs/...)
  std::string tokenizer_path;  // tokenizer.model; its vocabulary may be smaller than the config's
  uint64_t seed = 0;
  std::optional<int64_t> num_layers;  // fewer decoder layers than the config (same shapes)
  // When set, the weights are quantized (RTN, this group size) into an AWQ GEMM artifact, as
  // `nibble quantize --method rtn` writes it; otherwise a dense fp16 checkpoint.
  std::optional<int64_t> quantize_group_size;
};

struct SyntheticModelSummary {
  int64_t parameters = 0;
  int64_t bytes_written = 0;  // of the safetensors files
};

// Writes a Hugging Face directory (config.json, sharded fp16 safetensors with their index,
// tokenizer.model) at `out_dir`, which must not exist or be empty; the directory appears whole
// or not at all. Weights: uniform with the config's initializer_range as standard deviation
// (0.02 without one), norms 1, biases small; reproducible from the seed.
absl::StatusOr<SyntheticModelSummary> WriteSyntheticModel(const SyntheticModelOptions& options,
                                                          const std::string& out_dir);

}  // namespace nibble::quant
