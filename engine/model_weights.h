// The weights of a LLaMA-family model in one canonical form, whatever the checkpoint's
// layout: separate q/k/v projections with q/k rows in HF "rotate_half" order (as all
// supported HF checkpoints store them), optional q/k/v/o biases, SwiGLU FFN.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/linear.h"
#include "engine/model_config.h"
#include "engine/tensor_store.h"

namespace nibble::engine {

// Token embeddings [vocab, hidden]: rows of a weight stored like the linear weights, shared
// with lm_head when the model ties them (one copy in memory, not two).
class EmbeddingTable {
 public:
  EmbeddingTable() = default;
  explicit EmbeddingTable(std::shared_ptr<const LinearWeight> table)
      : table_(std::move(table)) {}
  // Writes row `token` (0 <= token < vocab, checked by the caller) to `out[hidden]`.
  void Lookup(int32_t token, float* out) const { table_->Row(token, out); }
  int64_t vocab() const { return table_ ? table_->out_features() : 0; }
  const std::shared_ptr<const LinearWeight>& table() const { return table_; }

 private:
  std::shared_ptr<const LinearWeight> table_;  // [out = vocab, in = hidden]
};

struct LayerWeights {
  std::vector<float> attention_norm;  // [hidden]
  std::unique_ptr<LinearWeight> q_proj, k_proj, v_proj, o_proj;
  std::vector<float> ffn_norm;  // [hidden]
  std::unique_ptr<LinearWeight> gate_proj, up_proj, down_proj;
};

struct ModelWeights {
  EmbeddingTable embedding;
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;  // [hidden]
  std::shared_ptr<const LinearWeight> lm_head;  // the embedding's table when tied

  // Resident bytes, a tied embedding counted once.
  size_t StorageBytes() const;
};

// One tensor of a Hugging Face checkpoint of some config (dense, unquantized).
struct CheckpointTensor {
  std::string name;
  std::vector<int64_t> shape;
  enum Kind { kEmbedding, kNorm, kLinear, kBias } kind;
};

// Every tensor a dense checkpoint of `config` holds, with the names and shapes its
// architecture uses (InternLM2's fused wqkv; InternLM's biases; lm_head unless tied).
std::vector<CheckpointTensor> CheckpointTensors(const ModelConfig& config);

// Reads every tensor the architecture needs from `store`, checking each shape against
// `config`. Errors name the tensor, the file and what is wrong (missing, shape, dtype).
// `f16_in_place` (with kF16 storage): dense fp16 weights without a bias are used in the file's
// mapping instead of copied — for a caller that reads each once (the GPU backend's upload, the
// GPU's AWQ search: no copy, no conversion). A CPU engine serving from them keeps copies:
// file pages could be evicted and read back from disk mid-request.
absl::StatusOr<ModelWeights> LoadModelWeights(const TensorStore& store,
                                              const ModelConfig& config,
                                              WeightStorage storage, bool f16_in_place = false);

}  // namespace nibble::engine
