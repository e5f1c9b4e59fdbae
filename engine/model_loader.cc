#include "engine/model_weights.h"

#include <cstring>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/int4_weight.h"
#include "engine/status_macros.h"
#include "kernels/cpu/half.h"

namespace nibble::engine {
namespace {

// Where each architecture keeps a layer's tensors.
struct LayerTensorNames {
  std::string attention_norm, q, k, v, o, wqkv, ffn_norm, gate, up, down;
};

LayerTensorNames NamesForLayer(Architecture arch, int64_t layer) {
  LayerTensorNames n;
  if (arch == Architecture::kInternLM2) {
    const std::string p = absl::StrCat("model.layers.", layer, ".");
    n.attention_norm = p + "attention_norm.weight";
    n.wqkv = p + "attention.wqkv.weight";
    n.o = p + "attention.wo.weight";
    n.ffn_norm = p + "ffn_norm.weight";
    n.gate = p + "feed_forward.w1.weight";
    n.up = p + "feed_forward.w3.weight";
    n.down = p + "feed_forward.w2.weight";
    return n;
  }
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  n.attention_norm = p + "input_layernorm.weight";
  n.q = p + "self_attn.q_proj.weight";
  n.k = p + "self_attn.k_proj.weight";
  n.v = p + "self_attn.v_proj.weight";
  n.o = p + "self_attn.o_proj.weight";
  n.ffn_norm = p + "post_attention_layernorm.weight";
  n.gate = p + "mlp.gate_proj.weight";
  n.up = p + "mlp.up_proj.weight";
  n.down = p + "mlp.down_proj.weight";
  return n;
}

std::string EmbeddingName(Architecture arch) {
  return arch == Architecture::kInternLM2 ? "model.tok_embeddings.weight"
                                          : "model.embed_tokens.weight";
}

std::string LmHeadName(Architecture arch) {
  return arch == Architecture::kInternLM2 ? "output.weight" : "lm_head.weight";
}

std::string BiasName(const std::string& weight_name) {
  return weight_name.substr(0, weight_name.size() - std::string("weight").size()) + "bias";
}

class WeightReader {
 public:
  WeightReader(const TensorStore& store, const ModelConfig& config, WeightStorage storage,
               bool f16_in_place)
      : store_(store), config_(config), storage_(storage), f16_in_place_(f16_in_place) {}

  absl::StatusOr<std::vector<float>> Vector(const std::string& name, int64_t size) {
    return store_.ReadF32(name, {size});
  }

  // A linear weight [out, in] and, when `with_bias`, its bias [out]: AWQ int4 where the
  // checkpoint is AWQ and has this layer's qweight, dense otherwise.
  absl::StatusOr<std::unique_ptr<LinearWeight>> Linear(const std::string& name, int64_t in,
                                                       int64_t out, bool with_bias) {
    std::vector<float> bias;
    if (with_bias) {
      NIBBLE_ASSIGN_OR_RETURN(bias, store_.ReadF32(BiasName(name), {out}));
    }
    NIBBLE_ASSIGN_OR_RETURN(std::optional<Int4Weight> int4, ReadInt4(name, in, out));
    if (int4) return MakeInt4Linear(*int4, std::move(bias));
    if (storage_ == WeightStorage::kF16 && f16_in_place_ && !with_bias) {
      // fp16 in the file and in memory: used in place in the file's mapping, as the embedding
      // is (no copy: widening and narrowing a 7B model's weights took most of a minute).
      // Another dtype, or a misaligned tensor, is read and converted below.
      absl::StatusOr<TensorStore::MappedF16> mapped = store_.MapF16(name, {out, in});
      if (mapped.ok()) return MakeMappedF16Linear(in, out, mapped->mapping, mapped->data);
    }
    NIBBLE_ASSIGN_OR_RETURN(std::vector<float> weight, store_.ReadF32(name, {out, in}));
    return MakeDenseLinear(in, out, std::move(weight), std::move(bias), storage_);
  }

  // InternLM2's fused wqkv: output rows grouped per KV head as [q_0 .. q_{G-1}, k, v], each
  // head_dim rows (MODELS.md §2); split into separate q, k, v projections.
  absl::Status FusedQkv(const std::string& name, LayerWeights& layer) {
    const int64_t hidden = config_.hidden_size;
    const int64_t d = config_.head_dim;
    const int64_t kv_heads = config_.num_kv_heads;
    const int64_t group = config_.num_heads / kv_heads;
    const int64_t rows = (config_.num_heads + 2 * kv_heads) * d;
    std::vector<int64_t> q_rows, k_rows, v_rows;
    for (int64_t g = 0; g < kv_heads; ++g) {
      for (int64_t slot = 0; slot < group + 2; ++slot) {
        auto& target = slot < group ? q_rows : slot == group ? k_rows : v_rows;
        for (int64_t t = 0; t < d; ++t) target.push_back((g * (group + 2) + slot) * d + t);
      }
    }
    NIBBLE_ASSIGN_OR_RETURN(std::optional<Int4Weight> int4, ReadInt4(name, hidden, rows));
    if (int4) {
      layer.q_proj = MakeInt4Linear(int4->GatherRows(q_rows), {});
      layer.k_proj = MakeInt4Linear(int4->GatherRows(k_rows), {});
      layer.v_proj = MakeInt4Linear(int4->GatherRows(v_rows), {});
      return absl::OkStatus();
    }
    NIBBLE_ASSIGN_OR_RETURN(std::vector<float> fused, store_.ReadF32(name, {rows, hidden}));
    auto gather = [&](const std::vector<int64_t>& picked) {
      std::vector<float> out(picked.size() * hidden);
      for (size_t r = 0; r < picked.size(); ++r) {
        std::memcpy(out.data() + r * hidden, fused.data() + picked[r] * hidden,
                    static_cast<size_t>(hidden) * sizeof(float));
      }
      return MakeDenseLinear(hidden, static_cast<int64_t>(picked.size()), std::move(out), {},
                             storage_);
    };
    layer.q_proj = gather(q_rows);
    layer.k_proj = gather(k_rows);
    layer.v_proj = gather(v_rows);
    return absl::OkStatus();
  }

 private:
  // The AWQ GEMM tensors of `weight_name`'s layer, unpacked; nullopt when the model is not
  // AWQ or this layer was left unquantized.
  absl::StatusOr<std::optional<Int4Weight>> ReadInt4(const std::string& weight_name, int64_t in,
                                                     int64_t out) {
    const std::string base = weight_name.substr(0, weight_name.size() - 6);  // drop "weight"
    if (!config_.awq || !store_.Contains(base + "qweight")) return std::optional<Int4Weight>();
    const int64_t group_size = config_.awq->group_size;
    if (out % 8 != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          store_.dir(), ": AWQ layer ", base, "qweight has ", out,
          " output features, not a multiple of 8"));
    }
    const int64_t groups = (in + group_size - 1) / group_size;
    NIBBLE_ASSIGN_OR_RETURN(auto qweight, store_.ReadI32(base + "qweight", {in, out / 8}));
    NIBBLE_ASSIGN_OR_RETURN(auto qzeros, store_.ReadI32(base + "qzeros", {groups, out / 8}));
    NIBBLE_ASSIGN_OR_RETURN(auto scales, store_.ReadF16Bits(base + "scales", {groups, out}));
    NIBBLE_ASSIGN_OR_RETURN(Int4Weight weight,
                            UnpackAwqGemm(in, out, group_size, qweight, qzeros, scales));
    return std::optional<Int4Weight>(std::move(weight));
  }

  const TensorStore& store_;
  const ModelConfig& config_;
  WeightStorage storage_;
  bool f16_in_place_;
};

}  // namespace

std::vector<CheckpointTensor> CheckpointTensors(const ModelConfig& config) {
  const int64_t hidden = config.hidden_size;
  const int64_t ffn = config.intermediate_size;
  const bool internlm2 = config.architecture == Architecture::kInternLM2;
  std::vector<CheckpointTensor> tensors;
  auto linear = [&](const std::string& name, int64_t out, int64_t in, bool bias) {
    tensors.push_back({name, {out, in}, CheckpointTensor::kLinear});
    if (bias) tensors.push_back({BiasName(name), {out}, CheckpointTensor::kBias});
  };
  tensors.push_back({EmbeddingName(config.architecture), {config.vocab_size, hidden},
                     CheckpointTensor::kEmbedding});
  for (int64_t i = 0; i < config.num_layers; ++i) {
    const LayerTensorNames names = NamesForLayer(config.architecture, i);
    tensors.push_back({names.attention_norm, {hidden}, CheckpointTensor::kNorm});
    if (internlm2) {
      linear(names.wqkv, config.q_dim() + 2 * config.kv_dim(), hidden, false);
    } else {
      linear(names.q, config.q_dim(), hidden, config.attention_bias);
      linear(names.k, config.kv_dim(), hidden, config.attention_bias);
      linear(names.v, config.kv_dim(), hidden, config.attention_bias);
    }
    linear(names.o, hidden, config.q_dim(), config.attention_bias && !internlm2);
    tensors.push_back({names.ffn_norm, {hidden}, CheckpointTensor::kNorm});
    linear(names.gate, ffn, hidden, false);
    linear(names.up, ffn, hidden, false);
    linear(names.down, hidden, ffn, false);
  }
  tensors.push_back({"model.norm.weight", {hidden}, CheckpointTensor::kNorm});
  if (!config.tie_word_embeddings) {
    linear(LmHeadName(config.architecture), config.vocab_size, hidden, false);
  }
  return tensors;
}

size_t ModelWeights::StorageBytes() const {
  size_t bytes = final_norm.size() * sizeof(float);
  if (embedding.table()) bytes += embedding.table()->StorageBytes();
  if (lm_head && lm_head != embedding.table()) bytes += lm_head->StorageBytes();
  for (const LayerWeights& layer : layers) {
    bytes += (layer.attention_norm.size() + layer.ffn_norm.size()) * sizeof(float);
    for (const auto* linear : {&layer.q_proj, &layer.k_proj, &layer.v_proj, &layer.o_proj,
                               &layer.gate_proj, &layer.up_proj, &layer.down_proj}) {
      bytes += (*linear)->StorageBytes();
    }
  }
  return bytes;
}

absl::StatusOr<ModelWeights> LoadModelWeights(const TensorStore& store,
                                              const ModelConfig& config,
                                              WeightStorage storage, bool f16_in_place) {
  const int64_t hidden = config.hidden_size;
  const int64_t ffn = config.intermediate_size;
  const bool internlm2 = config.architecture == Architecture::kInternLM2;
  WeightReader reader(store, config, storage, f16_in_place);
  ModelWeights weights;

  const std::string embed_name = EmbeddingName(config.architecture);
  // fp16 in the file and in memory: the table stays in the file's mapping, so only the rows
  // of tokens actually seen become resident (most of a 92544-token vocabulary never is).
  absl::StatusOr<TensorStore::MappedF16> mapped =
      storage == WeightStorage::kF16 ? store.MapF16(embed_name, {config.vocab_size, hidden})
                                     : absl::FailedPreconditionError("fp32 storage");
  if (mapped.ok()) {
    weights.embedding = EmbeddingTable(
        MakeMappedF16Linear(hidden, config.vocab_size, mapped->mapping, mapped->data));
  } else {
    NIBBLE_ASSIGN_OR_RETURN(std::vector<float> embedding,
                            store.ReadF32(embed_name, {config.vocab_size, hidden}));
    weights.embedding = EmbeddingTable(
        MakeDenseLinear(hidden, config.vocab_size, std::move(embedding), {}, storage));
  }

  for (int64_t i = 0; i < config.num_layers; ++i) {
    const LayerTensorNames names = NamesForLayer(config.architecture, i);
    LayerWeights layer;
    NIBBLE_ASSIGN_OR_RETURN(layer.attention_norm, reader.Vector(names.attention_norm, hidden));
    if (internlm2) {
      NIBBLE_RETURN_IF_ERROR(reader.FusedQkv(names.wqkv, layer));
    } else {
      const bool bias = config.attention_bias;
      NIBBLE_ASSIGN_OR_RETURN(layer.q_proj, reader.Linear(names.q, hidden, config.q_dim(), bias));
      NIBBLE_ASSIGN_OR_RETURN(layer.k_proj,
                              reader.Linear(names.k, hidden, config.kv_dim(), bias));
      NIBBLE_ASSIGN_OR_RETURN(layer.v_proj,
                              reader.Linear(names.v, hidden, config.kv_dim(), bias));
    }
    NIBBLE_ASSIGN_OR_RETURN(layer.o_proj, reader.Linear(names.o, config.q_dim(), hidden,
                                                        config.attention_bias && !internlm2));
    NIBBLE_ASSIGN_OR_RETURN(layer.ffn_norm, reader.Vector(names.ffn_norm, hidden));
    NIBBLE_ASSIGN_OR_RETURN(layer.gate_proj, reader.Linear(names.gate, hidden, ffn, false));
    NIBBLE_ASSIGN_OR_RETURN(layer.up_proj, reader.Linear(names.up, hidden, ffn, false));
    NIBBLE_ASSIGN_OR_RETURN(layer.down_proj, reader.Linear(names.down, ffn, hidden, false));
    weights.layers.push_back(std::move(layer));
  }
  NIBBLE_ASSIGN_OR_RETURN(weights.final_norm, reader.Vector("model.norm.weight", hidden));

  const std::string head_name = LmHeadName(config.architecture);
  if (store.Contains(head_name) || !config.tie_word_embeddings) {
    NIBBLE_ASSIGN_OR_RETURN(weights.lm_head,
                            reader.Linear(head_name, hidden, config.vocab_size, false));
  } else {
    weights.lm_head = weights.embedding.table();
  }
  return weights;
}

}  // namespace nibble::engine
