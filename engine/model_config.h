// The typed form of a Hugging Face config.json for the LLaMA family.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace nibble::engine {

enum class Architecture {
  kLlama,      // LlamaForCausalLM
  kInternLM,   // InternLMForCausalLM (v1): LLaMA names, q/k/v/o biases when `bias` is true
  kInternLM2,  // InternLM2ForCausalLM: fused wqkv, its own tensor names
};

std::string_view ArchitectureName(Architecture arch);  // the HF "architectures" spelling

enum class RopeScaling {
  kNone,
  kDynamicNtk,  // base grows with the sequence length past max_position_embeddings
  kLinear,      // positions divided by the factor
};

// config.json's "quantization_config" for AWQ GEMM checkpoints (MODELS.md §5).
struct AwqQuantization {
  int64_t group_size = 128;
  std::vector<std::string> modules_to_not_convert;  // name fragments kept unquantized
};

struct ModelConfig {
  Architecture architecture = Architecture::kLlama;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling = RopeScaling::kNone;
  double rope_scaling_factor = 1.0;
  bool attention_bias = false;  // InternLM v1 q/k/v/o biases
  bool tie_word_embeddings = false;
  int32_t bos_token_id = 1;
  std::vector<int32_t> eos_token_ids = {2};
  std::string torch_dtype;  // as written, informational
  std::optional<AwqQuantization> awq;  // set for W4A16 AWQ checkpoints

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  // The RoPE base used for a sequence of `length` tokens (dynamic NTK: HF's rule, with the
  // length being the number of tokens in the KV cache after this step).
  double RopeBaseForLength(int64_t length) const;
};

// Parses config.json text. Errors name `source` (the file) and the key: missing or
// mistyped keys, an unknown architecture, dimensions that do not fit together (hidden not
// divisible by heads, heads not divisible by kv heads, odd head_dim, non-positive sizes).
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text, std::string_view source);

// The config.json nibble writes for a model (used by `nibble convert`).
std::string ModelConfigToJson(const ModelConfig& config);

}  // namespace nibble::engine
