#include "engine/llama2c.h"

#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/atomic_file.h"
#include "engine/llama2c_tokenizer.h"
#include "engine/safetensors.h"
#include "engine/status_macros.h"
#include "engine/tokenizer.h"

namespace nibble::engine {
namespace fs = std::filesystem;
namespace {

// Reads consecutive fp32 arrays out of the checkpoint image.
class FloatCursor {
 public:
  FloatCursor(const std::string& bytes, size_t offset) : bytes_(bytes), offset_(offset) {}
  std::vector<float> Take(int64_t count) {
    std::vector<float> out(static_cast<size_t>(count));
    std::memcpy(out.data(), bytes_.data() + offset_, out.size() * sizeof(float));
    offset_ += out.size() * sizeof(float);
    return out;
  }
  void Skip(int64_t count) { offset_ += static_cast<size_t>(count) * sizeof(float); }

 private:
  const std::string& bytes_;
  size_t offset_;
};

absl::Status AddF32(SafetensorsWriter& writer, const std::string& name,
                    std::vector<int64_t> shape, const std::vector<float>& data) {
  return writer.Add(name, DType::kF32, std::move(shape),
                    std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()),
                                             data.size() * sizeof(float)));
}

absl::Status WriteTokenizerModel(const std::string& tokenizer_path, int64_t vocab_size,
                                 const std::string& out_path) {
  std::string model_bytes;
  if (fs::path(tokenizer_path).extension() == ".bin") {
    NIBBLE_ASSIGN_OR_RETURN(Llama2cTokenizer tok,
                            ReadLlama2cTokenizer(tokenizer_path, static_cast<int32_t>(vocab_size)));
    NIBBLE_ASSIGN_OR_RETURN(model_bytes, Llama2cTokenizerToSentencePieceModel(tok));
  } else {
    NIBBLE_ASSIGN_OR_RETURN(model_bytes, ReadFileToString(tokenizer_path));
  }
  NIBBLE_RETURN_IF_ERROR(WriteFileAtomically(out_path, model_bytes));
  // Check what was written loads and fits the model, so a bad tokenizer fails the
  // conversion rather than the first generate.
  TokenizerLoadResult loaded = LoadSentencePieceTokenizer(out_path);
  if (!loaded.tokenizer) {
    return absl::InvalidArgumentError(absl::StrCat(tokenizer_path, ": ", loaded.error));
  }
  if (loaded.tokenizer->VocabSize() != vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        tokenizer_path, ": tokenizer has ", loaded.tokenizer->VocabSize(),
        " pieces, the checkpoint's vocabulary has ", vocab_size));
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<float> PermuteMetaToHf(const std::vector<float>& rows, int64_t heads,
                                   int64_t head_dim, int64_t cols) {
  std::vector<float> out(rows.size());
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t c = 0; c < 2; ++c) {
      for (int64_t i = 0; i < half; ++i) {
        const float* src = rows.data() + (h * head_dim + 2 * i + c) * cols;
        float* dst = out.data() + (h * head_dim + c * half + i) * cols;
        std::memcpy(dst, src, static_cast<size_t>(cols) * sizeof(float));
      }
    }
  }
  return out;
}

absl::StatusOr<Llama2cCheckpoint> ReadLlama2cCheckpoint(const std::string& path) {
  NIBBLE_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  constexpr size_t kHeaderBytes = 7 * sizeof(int32_t);
  if (bytes.size() < kHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", bytes.size(),
                                                   " bytes, too short for a llama2.c header"));
  }
  int32_t header[7];
  std::memcpy(header, bytes.data(), kHeaderBytes);
  const auto [dim, hidden, layers, heads, kv_heads, signed_vocab, seq_len] =
      std::tuple(header[0], header[1], header[2], header[3], header[4], header[5], header[6]);
  const bool shared_classifier = signed_vocab > 0;
  const int64_t vocab = signed_vocab < 0 ? -static_cast<int64_t>(signed_vocab) : signed_vocab;
  // Bounds keep the size arithmetic below far from overflow.
  constexpr int32_t kLimit = 1 << 20;
  for (auto [name, value] : {std::pair{"dim", dim}, {"hidden_dim", hidden}, {"n_layers", layers},
                             {"n_heads", heads}, {"n_kv_heads", kv_heads}, {"seq_len", seq_len}}) {
    if (value <= 0 || value > kLimit) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: header field %s = %d is out of range; not a llama2.c v0 checkpoint?", path, name,
          value));
    }
  }
  if (vocab <= 0 || vocab > kLimit) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": vocab_size ", signed_vocab,
                                                   " is out of range"));
  }
  if (dim % heads != 0 || heads % kv_heads != 0 || (dim / heads) % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: dim %d, n_heads %d and n_kv_heads %d do not fit together", path, dim, heads,
        kv_heads));
  }
  const int64_t head_dim = dim / heads;
  const int64_t kv_dim = head_dim * kv_heads;
  const int64_t per_layer =
      2 * int64_t{dim} + 2 * int64_t{dim} * dim + 2 * kv_dim * dim + 3 * int64_t{hidden} * dim;
  const int64_t floats = vocab * dim + layers * per_layer + dim + int64_t{seq_len} * head_dim +
                         (shared_classifier ? 0 : vocab * dim);
  const uint64_t expected = kHeaderBytes + static_cast<uint64_t>(floats) * sizeof(float);
  if (bytes.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": ", bytes.size(), " bytes, but its header implies ", expected,
        " (truncated, or not a llama2.c v0 checkpoint)"));
  }

  Llama2cCheckpoint ckpt;
  ModelConfig& c = ckpt.config;
  c.architecture = Architecture::kLlama;
  c.hidden_size = dim;
  c.intermediate_size = hidden;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.vocab_size = vocab;
  c.max_position_embeddings = seq_len;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = shared_classifier;
  c.bos_token_id = 1;
  // llama2.c's models end a story with BOS, not EOS (its run.c stops there): both end
  // generation, or a story runs on into the next.
  c.eos_token_ids = {2, 1};
  c.torch_dtype = "float32";

  FloatCursor cursor(bytes, kHeaderBytes);
  ckpt.token_embedding = cursor.Take(vocab * dim);
  ckpt.layers.resize(layers);
  // llama2.c stores each kind of tensor for all layers together.
  for (auto& l : ckpt.layers) l.rms_att = cursor.Take(dim);
  for (auto& l : ckpt.layers) l.wq = cursor.Take(int64_t{dim} * dim);
  for (auto& l : ckpt.layers) l.wk = cursor.Take(kv_dim * dim);
  for (auto& l : ckpt.layers) l.wv = cursor.Take(kv_dim * dim);
  for (auto& l : ckpt.layers) l.wo = cursor.Take(int64_t{dim} * dim);
  for (auto& l : ckpt.layers) l.rms_ffn = cursor.Take(dim);
  for (auto& l : ckpt.layers) l.w1 = cursor.Take(int64_t{hidden} * dim);
  for (auto& l : ckpt.layers) l.w2 = cursor.Take(int64_t{dim} * hidden);
  for (auto& l : ckpt.layers) l.w3 = cursor.Take(int64_t{hidden} * dim);
  ckpt.rms_final = cursor.Take(dim);
  cursor.Skip(int64_t{seq_len} * head_dim);  // freq_cis_real and _imag: recomputed, not stored
  if (!shared_classifier) ckpt.classifier = cursor.Take(vocab * dim);
  return ckpt;
}

absl::Status ConvertLlama2cToHf(const std::string& checkpoint_path,
                                const std::string& tokenizer_path, const std::string& out_dir) {
  NIBBLE_ASSIGN_OR_RETURN(StagingDirectory staging, StagingDirectory::Create(out_dir));
  NIBBLE_ASSIGN_OR_RETURN(Llama2cCheckpoint ckpt, ReadLlama2cCheckpoint(checkpoint_path));
  const ModelConfig& c = ckpt.config;

  SafetensorsWriter writer;
  writer.SetMetadata("format", "pt");
  NIBBLE_RETURN_IF_ERROR(AddF32(writer, "model.embed_tokens.weight", {c.vocab_size, c.hidden_size},
                                ckpt.token_embedding));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const Llama2cLayer& l = ckpt.layers[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    const int64_t h = c.hidden_size, f = c.intermediate_size;
    NIBBLE_RETURN_IF_ERROR(AddF32(writer, p + "input_layernorm.weight", {h}, l.rms_att));
    NIBBLE_RETURN_IF_ERROR(AddF32(writer, p + "self_attn.q_proj.weight", {c.q_dim(), h},
                                  PermuteMetaToHf(l.wq, c.num_heads, c.head_dim, h)));
    NIBBLE_RETURN_IF_ERROR(AddF32(writer, p + "self_attn.k_proj.weight", {c.kv_dim(), h},
                                  PermuteMetaToHf(l.wk, c.num_kv_heads, c.head_dim, h)));
    NIBBLE_RETURN_IF_ERROR(AddF32(writer, p + "self_attn.v_proj.weight", {c.kv_dim(), h}, l.wv));
    NIBBLE_RETURN_IF_ERROR(AddF32(writer, p + "self_attn.o_proj.weight", {h, c.q_dim()}, l.wo));
    NIBBLE_RETURN_IF_ERROR(AddF32(writer, p + "post_attention_layernorm.weight", {h}, l.rms_ffn));
    NIBBLE_RETURN_IF_ERROR(AddF32(writer, p + "mlp.gate_proj.weight", {f, h}, l.w1));
    NIBBLE_RETURN_IF_ERROR(AddF32(writer, p + "mlp.down_proj.weight", {h, f}, l.w2));
    NIBBLE_RETURN_IF_ERROR(AddF32(writer, p + "mlp.up_proj.weight", {f, h}, l.w3));
  }
  NIBBLE_RETURN_IF_ERROR(AddF32(writer, "model.norm.weight", {c.hidden_size}, ckpt.rms_final));
  if (!ckpt.classifier.empty()) {
    NIBBLE_RETURN_IF_ERROR(
        AddF32(writer, "lm_head.weight", {c.vocab_size, c.hidden_size}, ckpt.classifier));
  }

  // Assembled beside the destination, then renamed: the model appears whole or not at all.
  NIBBLE_RETURN_IF_ERROR(writer.Write(staging.File("model.safetensors")));
  NIBBLE_RETURN_IF_ERROR(WriteFileAtomically(staging.File("config.json"), ModelConfigToJson(c)));
  NIBBLE_RETURN_IF_ERROR(
      WriteTokenizerModel(tokenizer_path, c.vocab_size, staging.File("tokenizer.model")));
  return staging.Commit();
}

}  // namespace nibble::engine
