#include "quant/synthetic_model.h"

#include <cmath>
#include <filesystem>
#include <span>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/atomic_file.h"
#include "engine/model_config.h"
#include "engine/model_weights.h"
#include "engine/safetensors.h"
#include "engine/status_macros.h"
#include "kernels/cpu/half.h"
#include "nlohmann/json.hpp"
#include "quant/quantize_model.h"

namespace nibble::quant {
namespace {

namespace fs = std::filesystem;

// Shards of about this size keep the writer's memory small (HF shards the same way).
constexpr int64_t kShardBytes = int64_t{1} << 30;

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in [-bound, bound) as fp16, reproducible: chunk c of tensor t draws from its own
// stream, so the chunks fill in parallel and the bytes do not depend on the thread count.
std::vector<uint16_t> RandomHalves(int64_t count, float bound, uint64_t seed) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  std::vector<uint16_t> out(static_cast<size_t>(count));
  const int64_t chunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    uint64_t state = seed ^ (static_cast<uint64_t>(c) * 0xd1b54a32d192ed03ull);
    const int64_t end = std::min(count, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) {
      const double unit = static_cast<double>(SplitMix64(state) >> 11) * 0x1.0p-53;  // [0, 1)
      out[i] = kernels::cpu::FloatToHalf(static_cast<float>((2 * unit - 1) * bound));
    }
  }
  return out;
}

int64_t Elements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<SyntheticModelSummary> WriteDense(const SyntheticModelOptions& options,
                                                 const std::string& out_dir) {
  NIBBLE_ASSIGN_OR_RETURN(std::string config_text,
                          engine::ReadFileToString(options.config_path));
  nlohmann::json json = nlohmann::json::parse(config_text, nullptr, false);
  if (json.is_discarded() || !json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.config_path, ": not a JSON object"));
  }
  if (options.num_layers) {
    if (*options.num_layers <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("layers must be positive, got ", *options.num_layers));
    }
    json["num_hidden_layers"] = *options.num_layers;
  }
  json["torch_dtype"] = "float16";
  config_text = json.dump(2) + "\n";
  NIBBLE_ASSIGN_OR_RETURN(engine::ModelConfig config,
                          engine::ParseModelConfig(config_text, options.config_path));
  NIBBLE_ASSIGN_OR_RETURN(std::string tokenizer,
                          engine::ReadFileToString(options.tokenizer_path));
  const float std_dev = json.value("initializer_range", 0.02f);
  const float bound = std_dev * std::sqrt(3.0f);  // uniform [-b, b) has deviation b / sqrt(3)

  NIBBLE_ASSIGN_OR_RETURN(engine::StagingDirectory staging,
                          engine::StagingDirectory::Create(out_dir));
  const std::vector<engine::CheckpointTensor> tensors = engine::CheckpointTensors(config);
  // Shard boundaries first: the file names carry the shard count.
  std::vector<int> shard_of(tensors.size());
  int shards = 1;
  int64_t in_shard = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t bytes = Elements(tensors[i].shape) * 2;
    if (in_shard > 0 && in_shard + bytes > kShardBytes) {
      ++shards;
      in_shard = 0;
    }
    in_shard += bytes;
    shard_of[i] = shards - 1;
  }
  auto shard_name = [&](int s) {
    return absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards);
  };

  SyntheticModelSummary summary;
  nlohmann::json weight_map = nlohmann::json::object();
  size_t next = 0;
  for (int s = 0; s < shards; ++s) {
    engine::SafetensorsWriter writer;
    writer.SetMetadata("format", "pt");
    for (; next < tensors.size() && shard_of[next] == s; ++next) {
      const engine::CheckpointTensor& t = tensors[next];
      const int64_t n = Elements(t.shape);
      std::vector<uint16_t> values;
      if (t.kind == engine::CheckpointTensor::kNorm) {
        values.assign(static_cast<size_t>(n), kernels::cpu::FloatToHalf(1.0f));
      } else {
        const float b = t.kind == engine::CheckpointTensor::kBias ? bound / 4 : bound;
        values = RandomHalves(n, b, options.seed * 1000003u + next);
      }
      NIBBLE_RETURN_IF_ERROR(writer.Add(
          t.name, engine::DType::kF16, t.shape,
          {reinterpret_cast<const uint8_t*>(values.data()), values.size() * 2}));
      weight_map[t.name] = shard_name(s);
      summary.parameters += n;
      summary.bytes_written += n * 2;
    }
    NIBBLE_RETURN_IF_ERROR(writer.Write(staging.File(shard_name(s))));
  }
  nlohmann::json index = {{"metadata", {{"total_size", summary.bytes_written}}},
                          {"weight_map", weight_map}};
  NIBBLE_RETURN_IF_ERROR(engine::WriteFileAtomically(
      staging.File("model.safetensors.index.json"), index.dump(2) + "\n"));
  NIBBLE_RETURN_IF_ERROR(engine::WriteFileAtomically(staging.File("config.json"), config_text));
  NIBBLE_RETURN_IF_ERROR(engine::WriteFileAtomically(staging.File("tokenizer.model"), tokenizer));
  NIBBLE_RETURN_IF_ERROR(staging.Commit());
  return summary;
}

}  // namespace

absl::StatusOr<SyntheticModelSummary> WriteSyntheticModel(const SyntheticModelOptions& options,
                                                          const std::string& out_dir) {
  if (!options.quantize_group_size) return WriteDense(options, out_dir);
  // Quantized: the dense model goes to a scratch directory beside the result, then through
  // the same RTN path as `nibble quantize --method rtn`.
  const std::string dense_dir = out_dir + ".synth-dense";
  std::error_code ec;
  fs::remove_all(dense_dir, ec);
  NIBBLE_ASSIGN_OR_RETURN(SyntheticModelSummary summary, WriteDense(options, dense_dir));
  QuantizeOptions quantize;
  quantize.method = QuantMethod::kRtn;
  quantize.group_size = *options.quantize_group_size;
  absl::StatusOr<QuantizeReport> report = QuantizeModelDirectory(dense_dir, out_dir, quantize);
  fs::remove_all(dense_dir, ec);
  if (!report.ok()) return report.status();
  summary.bytes_written = 0;
  for (const auto& entry : fs::directory_iterator(out_dir, ec)) {
    if (entry.path().extension() == ".safetensors") {
      summary.bytes_written += static_cast<int64_t>(entry.file_size());
    }
  }
  return summary;
}

}  // namespace nibble::quant
