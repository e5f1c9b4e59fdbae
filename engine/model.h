// A loaded model: its config, tokenizer, chat template and the backend that runs it.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/chat_template.h"
#include "engine/linear.h"
#include "engine/model_config.h"
#include "engine/tokenizer.h"

namespace nibble::engine {

// Where a model runs: "cpu", "cuda" (device 0) or "cuda:N".
struct Device {
  enum class Kind { kCpu, kCuda } kind = Kind::kCpu;
  int index = 0;  // the CUDA device
  std::string ToString() const;
  bool operator==(const Device&) const = default;
};
// InvalidArgument naming the text for anything but cpu, cuda, cuda:N (N >= 0).
absl::StatusOr<Device> ParseDevice(std::string_view text);

struct ModelLoadOptions {
  WeightStorage weight_storage = WeightStorage::kF32;  // --dtype float32|float16 (CPU)
  int cpu_threads = 0;                                 // <= 0: all cores
  // cuda: the weights go to the device (dense ones as fp16, whatever weight_storage says:
  // the GPU computes in fp16). Unavailable (FailedPrecondition) in a build without CUDA.
  Device device;
};

// Immutable after Load except through backend(); see Backend for its threading rules.
class Model {
 public:
  // Loads a Hugging Face model directory: config.json, *.safetensors, tokenizer.model.
  // Every error names the file and the problem (missing file, bad config, missing tensor,
  // wrong shape, a tokenizer whose vocabulary does not match the config).
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     const ModelLoadOptions& options);

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const ChatTemplate& chat_template() const { return chat_template_; }
  Backend& backend() { return *backend_; }
  size_t weight_bytes() const { return weight_bytes_; }
  // OpenMP threads for this model's CPU kernels (ModelLoadOptions::cpu_threads; <= 0: all
  // cores). OpenMP's thread count is a per-thread setting: Load applies it to the loading
  // thread, and any other thread that drives the backend (the serving engine's scheduler)
  // applies it itself with kernels::cpu::SetCpuThreads.
  int cpu_threads() const { return cpu_threads_; }

  // Token ids that end generation: the config's EOS ids and the template's stop words that
  // are single pieces of this vocabulary.
  std::vector<int32_t> StopTokenIds() const;

 private:
  Model(std::string dir, ModelConfig config, std::unique_ptr<Tokenizer> tokenizer,
        std::unique_ptr<Backend> backend, size_t weight_bytes);

  std::string dir_;
  ModelConfig config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ChatTemplate chat_template_;
  std::unique_ptr<Backend> backend_;
  size_t weight_bytes_;
  int cpu_threads_ = 0;
};

}  // namespace nibble::engine
