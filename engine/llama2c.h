// llama2.c checkpoints (Karpathy's run.c "legacy" version-0 format) and their conversion to
// a Hugging Face LLaMA directory.
//
// Format: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
// negative vocab_size means the classifier is stored separately), then fp32 arrays:
// token_embedding [vocab, dim], rms_att [L, dim], wq [L, dim, dim], wk [L, kv_dim, dim],
// wv [L, kv_dim, dim], wo [L, dim, dim], rms_ffn [L, dim], w1 [L, hidden, dim],
// w2 [L, dim, hidden], w3 [L, hidden, dim], rms_final [dim], freq_cis_real and
// freq_cis_imag [seq_len, head_size/2] (unused), then wcls [vocab, dim] if not shared.
// Its q/k rows are in Meta's interleaved-pair RoPE order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_config.h"

namespace nibble::engine {

struct Llama2cLayer {
  std::vector<float> rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3;
};

struct Llama2cCheckpoint {
  ModelConfig config;  // LlamaForCausalLM, RoPE θ 10000, RMSNorm eps 1e-5 (run.c's constants)
  std::vector<float> token_embedding;
  std::vector<Llama2cLayer> layers;
  std::vector<float> rms_final;
  std::vector<float> classifier;  // empty when shared with the embedding
};

// Errors name the file: too short for the header, non-positive or inconsistent dimensions,
// a size that is not exactly what the header implies.
absl::StatusOr<Llama2cCheckpoint> ReadLlama2cCheckpoint(const std::string& path);

// Meta's interleaved rows -> HF rotate_half rows for a [heads * head_dim, cols] matrix:
// HF[h·d + c·d/2 + i] = Meta[h·d + 2i + c] (transformers' convert_llama_weights_to_hf).
std::vector<float> PermuteMetaToHf(const std::vector<float>& rows, int64_t heads,
                                   int64_t head_dim, int64_t cols);

// Writes DIR/{model.safetensors, config.json, tokenizer.model}. `tokenizer_path` is a
// SentencePiece .model (copied) or a llama2.c tokenizer .bin (converted). The directory is
// assembled under a temporary name and renamed into place, so a crash never leaves a
// half-written model; an existing non-empty DIR is refused.
absl::Status ConvertLlama2cToHf(const std::string& checkpoint_path,
                                const std::string& tokenizer_path, const std::string& out_dir);

}  // namespace nibble::engine
