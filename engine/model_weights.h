// The weights of a LLaMA-family model in one canonical form, whatever the checkpoint's
// layout: separate q/k/v projections with q/k rows in HF "rotate_half" order (as all
// supported HF checkpoints store them), optional q/k/v/o biases, SwiGLU FFN.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/linear.h"
#include "engine/model_config.h"
#include "engine/tensor_store.h"

namespace nibble::engine {

// Token embeddings [vocab, hidden], stored like the linear weights.
class EmbeddingTable {
 public:
  EmbeddingTable() = default;
  EmbeddingTable(int64_t vocab, int64_t hidden, const std::vector<float>& table,
                 WeightStorage storage);
  // Writes row `token` (0 <= token < vocab, checked by the caller) to `out[hidden]`.
  void Lookup(int32_t token, float* out) const;
  size_t StorageBytes() const;
  int64_t vocab() const { return vocab_; }

 private:
  int64_t vocab_ = 0;
  int64_t hidden_ = 0;
  std::vector<float> f32_;
  std::vector<uint16_t> f16_;
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
  std::unique_ptr<LinearWeight> lm_head;

  size_t StorageBytes() const;
};

// Reads every tensor the architecture needs from `store`, checking each shape against
// `config`. Errors name the tensor, the file and what is wrong (missing, shape, dtype).
absl::StatusOr<ModelWeights> LoadModelWeights(const TensorStore& store,
                                              const ModelConfig& config,
                                              WeightStorage storage);

}  // namespace nibble::engine
