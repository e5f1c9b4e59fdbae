#include "quant/awq.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <future>
#include <memory>
#include <system_error>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/atomic_file.h"
#include "engine/safetensors.h"
#include "engine/decoder_layer.h"
#include "engine/model_weights.h"
#include "engine/status_macros.h"
#include "kernels/cpu/half.h"
#include "kernels/cpu/matmul.h"
#include "quant/awq_searcher.h"
#include "quant/rtn.h"

namespace nibble::quant {
namespace {

using Tensor = std::vector<float>;

// Checkpoint names of one layer's tensors, per architecture.
struct LayerNames {
  std::string attention_norm, ffn_norm, o, gate, up, down;
  std::vector<std::string> qkv;  // q, k, v; or InternLM2's fused wqkv
  std::string v;                 // empty when v's outputs cannot carry o's scales
  bool clip_qkv_last = false;    // clip v (not q, k); false for a fused wqkv
};

LayerNames NamesOf(const engine::ModelConfig& config, int64_t layer) {
  const std::string p = absl::StrCat("model.layers.", layer, ".");
  LayerNames n;
  if (config.architecture == engine::Architecture::kInternLM2) {
    n.attention_norm = p + "attention_norm.weight";
    n.ffn_norm = p + "ffn_norm.weight";
    n.qkv = {p + "attention.wqkv.weight"};
    n.o = p + "attention.wo.weight";
    n.gate = p + "feed_forward.w1.weight";
    n.up = p + "feed_forward.w3.weight";
    n.down = p + "feed_forward.w2.weight";
    return n;
  }
  n.attention_norm = p + "input_layernorm.weight";
  n.ffn_norm = p + "post_attention_layernorm.weight";
  n.qkv = {p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
           p + "self_attn.v_proj.weight"};
  n.o = p + "self_attn.o_proj.weight";
  n.gate = p + "mlp.gate_proj.weight";
  n.up = p + "mlp.up_proj.weight";
  n.down = p + "mlp.down_proj.weight";
  n.clip_qkv_last = true;
  if (AwqSearchesScales(config, LinearInput::kO)) n.v = p + "self_attn.v_proj.weight";
  return n;
}

// Y[tokens, out] = X · Wᵀ.
Tensor Product(const Tensor& x, int64_t tokens, const Tensor& w, int64_t in, int64_t out) {
  Tensor y(static_cast<size_t>(tokens * out));
  kernels::cpu::MatMulWeightsF32(x.data(), w.data(), nullptr, tokens, out, in, y.data());
  return y;
}

double MeanSquaredDifference(const Tensor& a, const Tensor& b) {
  double sum = 0;
  for (size_t i = 0; i < a.size(); ++i) sum += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return a.empty() ? 0.0 : sum / static_cast<double>(a.size());
}

Tensor FakeQuantize(const Tensor& w, int64_t in, int64_t out, int64_t group) {
  return QuantizeRtn(w, in, out, group).Dequantize();
}

// Clamps each group of each row of w [out, in] to the symmetric range that minimizes the
// group's contribution error on `x` (sampled tokens, already divided by the scales).
void ClipGroups(Tensor& w, int64_t in, int64_t out, const Tensor& x, int64_t tokens,
                const AwqOptions& options) {
  const int64_t g = options.group_size;
  const int steps = static_cast<int>(options.max_shrink * options.n_grid);
  std::vector<float> group_w, clipped;
  for (int64_t n = 0; n < out; ++n) {
    for (int64_t begin = 0; begin < in; begin += g) {
      const int64_t len = std::min(g, in - begin);
      float* row = w.data() + n * in + begin;
      group_w.assign(row, row + len);
      float max_abs = 0;
      for (float v : group_w) max_abs = std::max(max_abs, std::abs(v));
      std::vector<double> original(tokens);
      for (int64_t t = 0; t < tokens; ++t) {
        original[t] = kernels::cpu::Dot(x.data() + t * in + begin, group_w.data(), len);
      }
      double best_error = std::numeric_limits<double>::infinity();
      float best_max = max_abs;
      for (int i = 0; i <= steps; ++i) {
        const float bound = max_abs * (1.0f - static_cast<float>(i) / options.n_grid);
        clipped = group_w;
        for (float& v : clipped) v = std::clamp(v, -bound, bound);
        const Tensor q = FakeQuantize(clipped, len, 1, len);
        double error = 0;
        for (int64_t t = 0; t < tokens; ++t) {
          const double d = kernels::cpu::Dot(x.data() + t * in + begin, q.data(), len) - original[t];
          error += d * d;
        }
        if (error < best_error) {
          best_error = error;
          best_max = bound;
        }
      }
      for (int64_t k = 0; k < len; ++k) row[k] = std::clamp(row[k], -best_max, best_max);
    }
  }
}

// Every `stride`-th token of x [tokens, in], at most `limit` of them, divided by s.
Tensor SampleAndUnscale(const Tensor& x, int64_t tokens, int64_t in, const std::vector<float>& s,
                        int64_t limit, int64_t& sampled) {
  const int64_t stride = ClipSampleStride(tokens, limit);
  Tensor out;
  sampled = 0;
  for (int64_t t = 0; t < tokens && sampled < limit; t += stride, ++sampled) {
    for (int64_t k = 0; k < in; ++k) out.push_back(x[t * in + k] / s[k]);
  }
  return out;
}

// The CPU searcher: the layer in fp32 (engine/decoder_layer.h), its linears' inputs kept
// whole, and every candidate evaluated on every calibration token.
class CpuAwqSearcher final : public AwqSearcher {
 public:
  CpuAwqSearcher(const engine::ModelConfig& config, const engine::ModelWeights& weights,
                 const AwqOptions& options, int64_t tokens)
      : config_(config), weights_(weights), options_(options), tokens_(tokens) {}

  absl::Status Calibrate(int64_t layer, std::vector<Tensor>& states) override {
    for (Tensor& input : inputs_) input.clear();
    engine::LayerInputCapture capture{&inputs_[0], &inputs_[1], &inputs_[2], &inputs_[3]};
    const int64_t hidden = config_.hidden_size;
    for (Tensor& x : states) {
      const int64_t n = static_cast<int64_t>(x.size()) / hidden;
      Tensor keys(n * config_.kv_dim()), values(n * config_.kv_dim());
      engine::RunDecoderLayer(config_, weights_.layers[layer], n, 0,
                              engine::RopeInverseFrequenciesForLength(config_, n), keys.data(),
                              values.data(), x.data(), &capture);
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<float>> SearchScales(LinearInput input, int64_t in,
                                                  const std::vector<const Tensor*>& ws,
                                                  AwqLayerScales& report) override {
    const Tensor& x = Input(input);
    std::vector<double> magnitude(in, 0.0);
    for (int64_t t = 0; t < tokens_; ++t) {
      for (int64_t k = 0; k < in; ++k) magnitude[k] += std::abs(x[t * in + k]);
    }
    std::vector<Tensor> reference;
    for (const Tensor* w : ws) {
      reference.push_back(Product(x, tokens_, *w, in, static_cast<int64_t>(w->size()) / in));
    }
    std::vector<float> best(in, 1.0f);
    double best_loss = std::numeric_limits<double>::infinity();
    for (int step = 0; step < options_.n_grid; ++step) {
      const double ratio = static_cast<double>(step) / options_.n_grid;
      const std::vector<float> s = AwqCandidateScales(magnitude, tokens_, ratio);
      double loss = 0;
      for (size_t i = 0; i < ws.size(); ++i) {
        const int64_t out = static_cast<int64_t>(ws[i]->size()) / in;
        Tensor scaled = *ws[i];
        for (int64_t n = 0; n < out; ++n) {
          for (int64_t k = 0; k < in; ++k) scaled[n * in + k] *= s[k];
        }
        Tensor q = FakeQuantize(scaled, in, out, options_.group_size);
        for (int64_t n = 0; n < out; ++n) {
          for (int64_t k = 0; k < in; ++k) q[n * in + k] /= s[k];
        }
        loss += MeanSquaredDifference(Product(x, tokens_, q, in, out), reference[i]);
      }
      if (step == 0) report.loss_rtn = loss;
      if (loss < best_loss) {
        best_loss = loss;
        best = s;
        report.ratio = ratio;
      }
    }
    report.loss_awq = best_loss;
    return best;
  }

  absl::Status SearchClipping(LinearInput input, Tensor& w, int64_t in, int64_t out,
                              const std::vector<float>& s) override {
    int64_t sampled = 0;
    const Tensor x = SampleAndUnscale(Input(input), tokens_, in, s, options_.clip_tokens, sampled);
    ClipGroups(w, in, out, x, sampled, options_);
    return absl::OkStatus();
  }

 private:
  const Tensor& Input(LinearInput input) const { return inputs_[static_cast<int>(input)]; }

  const engine::ModelConfig& config_;
  const engine::ModelWeights& weights_;
  AwqOptions options_;
  int64_t tokens_;
  Tensor inputs_[4];  // by LinearInput: [tokens, in] each
};

// Checkpoint files: layer-NNN.safetensors (the tensors the layer's search changed, and its
// scale reports as metadata), states.safetensors (the hidden states entering the next
// layer), progress.json (how many layers are done) — each written atomically, progress last.
// The GPU's states are fp16 values (its layers compute in fp16): they are saved as F16, half
// the bytes of the largest file (4.3 GB a layer at 7B with 128 x 2048 tokens), exactly.
std::string LayerFile(const std::string& dir, int64_t layer) {
  char name[32];
  std::snprintf(name, sizeof name, "layer-%03lld.safetensors", static_cast<long long>(layer));
  return dir + "/" + name;
}

absl::Status AddF32(engine::SafetensorsWriter& writer, const std::string& name, const Tensor& t) {
  return writer.Add(name, engine::DType::kF32, {static_cast<int64_t>(t.size())},
                    {reinterpret_cast<const uint8_t*>(t.data()), t.size() * sizeof(float)});
}

// One layer's checkpoint, made on the searching thread and written by Write (on any thread):
// the writers hold copies of the layer's tensors and of the states (F32, or F16 for the GPU),
// so the search may go on while it is written. The states file names the layers it follows
// (metadata "completed_layers"): a crash between its rename and progress.json's is detected,
// and resumed from, on load.
constexpr char kStatesLayersKey[] = "completed_layers";

class LayerCheckpoint {
 public:
  static absl::StatusOr<std::unique_ptr<LayerCheckpoint>> Make(
      const std::string& dir, int64_t layer, const AwqResult& result, size_t first_scale,
      const std::vector<Tensor>& states, bool states_as_f16) {
    auto c = std::unique_ptr<LayerCheckpoint>(new LayerCheckpoint(dir, layer));
    const std::string prefix = absl::StrCat("model.layers.", layer, ".");
    for (const auto& [name, values] : result.tensors) {
      if (absl::StartsWith(name, prefix)) {
        NIBBLE_RETURN_IF_ERROR(AddF32(c->layer_writer_, name, values));
      }
    }
    nlohmann::json scales = nlohmann::json::array();
    for (size_t i = first_scale; i < result.scales.size(); ++i) {
      const AwqLayerScales& s = result.scales[i];
      scales.push_back({{"group", s.group}, {"ratio", s.ratio}, {"loss_rtn", s.loss_rtn},
                        {"loss_awq", s.loss_awq}});
    }
    c->layer_writer_.SetMetadata("scales", scales.dump());
    c->states_writer_.SetMetadata(kStatesLayersKey, absl::StrCat(layer + 1));
    std::vector<uint16_t> half;
    for (size_t i = 0; i < states.size(); ++i) {
      const std::string name = absl::StrCat("state.", i);
      if (!states_as_f16) {
        NIBBLE_RETURN_IF_ERROR(AddF32(c->states_writer_, name, states[i]));
        continue;
      }
      half.resize(states[i].size());
      kernels::cpu::FloatToHalfBulk(states[i].data(), states[i].size(), half.data());
      NIBBLE_RETURN_IF_ERROR(c->states_writer_.Add(
          name, engine::DType::kF16, {static_cast<int64_t>(half.size())},
          {reinterpret_cast<const uint8_t*>(half.data()), half.size() * sizeof(uint16_t)}));
    }
    return c;
  }

  // The layer's file, the states, then the progress that makes them count.
  absl::Status Write() const {
    NIBBLE_RETURN_IF_ERROR(layer_writer_.Write(LayerFile(dir_, layer_)));
    NIBBLE_RETURN_IF_ERROR(states_writer_.Write(dir_ + "/states.safetensors"));
    return engine::WriteFileAtomically(dir_ + "/progress.json",
                                       nlohmann::json({{"completed_layers", layer_ + 1}}).dump());
  }

 private:
  LayerCheckpoint(std::string dir, int64_t layer) : dir_(std::move(dir)), layer_(layer) {}

  std::string dir_;
  int64_t layer_;
  engine::SafetensorsWriter layer_writer_, states_writer_;
};

// Reads a checkpoint into `result` and `states`; returns the number of finished layers
// (0 when there is none).
absl::StatusOr<int64_t> LoadCheckpoint(const std::string& dir, int64_t layers, AwqResult& result,
                                       std::vector<Tensor>& states) {
  std::error_code ec;
  const std::string progress_path = dir + "/progress.json";
  const std::string states_path = dir + "/states.safetensors";
  int64_t done = 0;
  if (std::filesystem::exists(progress_path, ec)) {
    NIBBLE_ASSIGN_OR_RETURN(std::string text, engine::ReadFileToString(progress_path));
    const auto progress = nlohmann::json::parse(text, nullptr, false);
    if (progress.is_discarded() || !progress.contains("completed_layers") ||
        !progress["completed_layers"].is_number_integer()) {
      return absl::DataLossError(absl::StrCat(progress_path, ": unreadable checkpoint progress"));
    }
    done = progress["completed_layers"].get<int64_t>();
  }
  // The states name the layers they follow. One more than the progress: the run stopped
  // between the two renames, after the layer's own file: that layer is done too.
  std::unique_ptr<engine::SafetensorsFile> states_file;
  if (std::filesystem::exists(states_path, ec)) {
    NIBBLE_ASSIGN_OR_RETURN(states_file, engine::SafetensorsFile::Open(states_path));
    const auto& metadata = states_file->header().metadata;
    if (auto it = metadata.find(kStatesLayersKey); it != metadata.end()) {
      const int64_t follows = std::atoll(it->second.c_str());
      if (follows == done + 1) {
        done = follows;
      } else if (follows != done) {
        return absl::DataLossError(absl::StrCat(states_path, ": states after ", follows,
                                                " layers, but ", progress_path, " says ", done));
      }
    }
  }
  if (done < 0 || done > layers) {
    return absl::DataLossError(absl::StrCat(progress_path, ": ", done, " layers done of ", layers));
  }
  // F32 tensors; with `f16_too` also F16 ones (the GPU's states), widened exactly.
  auto read_all = [](const engine::SafetensorsFile& file, bool f16_too,
                     auto&& take) -> absl::Status {
    for (const engine::TensorInfo& info : file.header().tensors) {
      const auto bytes = file.Bytes(info);
      Tensor values;
      if (info.dtype == engine::DType::kF32) {
        values.resize(bytes.size() / sizeof(float));
        std::memcpy(values.data(), bytes.data(), bytes.size());
      } else if (info.dtype == engine::DType::kF16 && f16_too) {
        std::vector<uint16_t> halves(bytes.size() / sizeof(uint16_t));
        std::memcpy(halves.data(), bytes.data(), bytes.size());
        values.resize(halves.size());
        kernels::cpu::HalfToFloatBulk(halves.data(), halves.size(), values.data());
      } else {
        return absl::DataLossError(absl::StrCat(file.path(), ": ", info.name, " is not F32"));
      }
      NIBBLE_RETURN_IF_ERROR(take(info.name, std::move(values)));
    }
    return absl::OkStatus();
  };
  for (int64_t l = 0; l < done; ++l) {
    NIBBLE_ASSIGN_OR_RETURN(auto file, engine::SafetensorsFile::Open(LayerFile(dir, l)));
    NIBBLE_RETURN_IF_ERROR(read_all(*file, false, [&](const std::string& name, Tensor values) {
      result.tensors[name] = std::move(values);
      return absl::OkStatus();
    }));
    auto scales = file->header().metadata.find("scales");
    const auto json = scales == file->header().metadata.end()
                          ? nlohmann::json()
                          : nlohmann::json::parse(scales->second, nullptr, false);
    if (!json.is_array()) {
      return absl::DataLossError(absl::StrCat(file->path(), ": no scale reports"));
    }
    for (const auto& s : json) {
      result.scales.push_back({s.value("group", ""), s.value("ratio", 0.0),
                               s.value("loss_rtn", 0.0), s.value("loss_awq", 0.0)});
    }
  }
  if (done > 0) {
    if (!states_file) return absl::DataLossError(absl::StrCat(states_path, ": missing"));
    const engine::SafetensorsFile* file = states_file.get();
    NIBBLE_RETURN_IF_ERROR(read_all(*file, true, [&](const std::string& name, Tensor values) {
      const size_t i = static_cast<size_t>(std::atoll(name.c_str() + 6));  // "state.<i>"
      if (i >= states.size() || states[i].size() != values.size()) {
        return absl::DataLossError(absl::StrCat(file->path(), ": ", name,
                                                " does not fit this job's calibration"));
      }
      states[i] = std::move(values);
      return absl::OkStatus();
    }));
  }
  return done;
}

}  // namespace

std::vector<float> AwqCandidateScales(const std::vector<double>& magnitude_sum, int64_t tokens,
                                      double ratio) {
  const size_t in = magnitude_sum.size();
  std::vector<float> s(in);
  double lo = std::numeric_limits<double>::infinity(), hi = 0;
  for (size_t k = 0; k < in; ++k) {
    s[k] = static_cast<float>(std::max(std::pow(magnitude_sum[k] / tokens, ratio), 1e-4));
    lo = std::min<double>(lo, s[k]);
    hi = std::max<double>(hi, s[k]);
  }
  const double norm = std::sqrt(lo * hi);
  for (float& v : s) v = static_cast<float>(v / norm);
  return s;
}

bool AwqSearchesScales(const engine::ModelConfig& config, LinearInput input) {
  // o's input channels are v's output channels only without GQA; a fused wqkv is never split.
  return input != LinearInput::kO || (config.architecture != engine::Architecture::kInternLM2 &&
                                       config.num_kv_heads == config.num_heads);
}

int64_t ClipSampleStride(int64_t tokens, int64_t limit) {
  return std::max<int64_t>(1, tokens / std::max<int64_t>(limit, 1));
}

std::unique_ptr<AwqSearcher> MakeCpuAwqSearcher(const engine::ModelConfig& config,
                                                const engine::ModelWeights& weights,
                                                const AwqOptions& options, int64_t tokens) {
  return std::make_unique<CpuAwqSearcher>(config, weights, options, tokens);
}

#if !NIBBLE_HAVE_CUDA_AWQ
absl::Status CheckCudaAwqSearch(const engine::ModelConfig&, const AwqOptions&, int) {
  return absl::FailedPreconditionError(
      "quantizing on the GPU needs a nibble built with CUDA (no nvcc at configure time); use "
      "--device cpu");
}

absl::StatusOr<std::unique_ptr<AwqSearcher>> MakeCudaAwqSearcher(
    const engine::ModelConfig& config, const engine::ModelWeights&, const AwqOptions& options,
    int64_t, int device) {
  return CheckCudaAwqSearch(config, options, device);
}
#endif

absl::StatusOr<AwqResult> SearchAwq(
    const engine::TensorStore& store, const engine::ModelConfig& config,
    const std::vector<std::vector<int32_t>>& samples, const AwqOptions& options,
    const std::function<void(const AwqProgress&)>& progress) {
  if (samples.empty()) return absl::InvalidArgumentError("AWQ needs calibration samples");
  const bool on_gpu = options.cuda_device >= 0;
  // The GPU computes in fp16 and uploads one layer at a time: the host keeps fp16 weights.
  NIBBLE_ASSIGN_OR_RETURN(
      engine::ModelWeights weights,
      engine::LoadModelWeights(store, config,
                               on_gpu ? engine::WeightStorage::kF16 : engine::WeightStorage::kF32,
                               /*f16_in_place=*/on_gpu));
  const int64_t hidden = config.hidden_size;
  const int64_t ffn = config.intermediate_size;
  const int64_t q_dim = config.q_dim();

  // The hidden states entering the current layer, one buffer per sample.
  std::vector<Tensor> states;
  int64_t tokens = 0;
  for (const auto& sample : samples) {
    Tensor x(sample.size() * hidden);
    for (size_t t = 0; t < sample.size(); ++t) {
      if (sample[t] < 0 || sample[t] >= config.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("calibration token ", sample[t],
                                                       " is outside the vocabulary"));
      }
      weights.embedding.Lookup(sample[t], x.data() + t * hidden);
    }
    tokens += static_cast<int64_t>(sample.size());
    states.push_back(std::move(x));
  }

  std::unique_ptr<AwqSearcher> searcher;
  if (on_gpu) {
    NIBBLE_ASSIGN_OR_RETURN(searcher, MakeCudaAwqSearcher(config, weights, options, tokens,
                                                          options.cuda_device));
  } else {
    searcher = MakeCpuAwqSearcher(config, weights, options, tokens);
  }

  AwqResult result;
  auto tensor = [&](const std::string& name,
                    const std::vector<int64_t>& shape) -> absl::StatusOr<Tensor*> {
    auto it = result.tensors.find(name);
    if (it == result.tensors.end()) {
      NIBBLE_ASSIGN_OR_RETURN(Tensor values, store.ReadF32(name, shape));
      it = result.tensors.emplace(name, std::move(values)).first;
    }
    return &it->second;
  };

  int64_t first_layer = 0;
  if (!options.checkpoint_dir.empty()) {
    NIBBLE_ASSIGN_OR_RETURN(first_layer, LoadCheckpoint(options.checkpoint_dir, config.num_layers,
                                                        result, states));
  }
  int64_t layers_done = first_layer;
  auto report = [&](int64_t layer, const char* step) {
    if (progress) progress({layer, config.num_layers, layers_done, step});
  };
  // On the GPU a layer's checkpoint is written while the next layer is searched (the files
  // take longer than the search: 6.9 s against 5.3 s a layer at 7B on the H100's disk,
  // tests/gpu/RESULTS.md), one at a time, in order. The layer counts as done, and is reported
  // so, once its files are written. On an early return a write still in flight is waited for
  // (std::async's future) before the function's locals go.
  std::future<absl::Status> writing;
  int64_t writing_layer = -1;
  auto finish_writing = [&]() -> absl::Status {
    if (writing_layer < 0) return absl::OkStatus();
    const int64_t l = writing_layer;
    writing_layer = -1;
    NIBBLE_RETURN_IF_ERROR(writing.get());
    layers_done = l + 1;
    report(l, "layer done");
    return absl::OkStatus();
  };
  // Between steps: a stop leaves the layers checkpointed so far for a later run.
  auto stopped = [&](int64_t layer) -> absl::Status {
    if (options.stop_requested && options.stop_requested()) {
      NIBBLE_RETURN_IF_ERROR(finish_writing());
      return absl::CancelledError(absl::StrCat("stopped with ", layer, " of ", config.num_layers,
                                               " layers searched"));
    }
    return absl::OkStatus();
  };
  if (first_layer > 0) report(first_layer, "resumed from the checkpoint");

  for (int64_t l = first_layer; l < config.num_layers; ++l) {
    const size_t first_scale = result.scales.size();
    NIBBLE_RETURN_IF_ERROR(stopped(l));
    report(l, "calibrate");
    // 1. Run the original layer over every sample, keeping what the searches need of its
    // linears' inputs.
    NIBBLE_RETURN_IF_ERROR(searcher->Calibrate(l, states));

    // 2. Scales for each group sharing an input, folded into what precedes it.
    NIBBLE_RETURN_IF_ERROR(stopped(l));
    report(l, "search scales");
    const LayerNames names = NamesOf(config, l);
    const int64_t qkv_rows = q_dim + 2 * config.kv_dim();
    struct Group {
      std::string label, previous;  // previous: a norm, or a linear whose rows are divided
      bool previous_is_norm;
      std::vector<std::pair<std::string, int64_t>> linears;  // name, out features
      LinearInput input;
      int64_t in;
    };
    std::vector<Group> groups;
    std::vector<std::pair<std::string, int64_t>> qkv;
    if (names.qkv.size() == 1) {
      qkv = {{names.qkv[0], qkv_rows}};
    } else {
      qkv = {{names.qkv[0], q_dim}, {names.qkv[1], config.kv_dim()}, {names.qkv[2], config.kv_dim()}};
    }
    groups.push_back({"qkv", names.attention_norm, true, qkv, LinearInput::kQkv, hidden});
    if (!names.v.empty()) {
      groups.push_back({"o", names.v, false, {{names.o, hidden}}, LinearInput::kO, q_dim});
    }
    groups.push_back({"gate_up", names.ffn_norm, true, {{names.gate, ffn}, {names.up, ffn}},
                      LinearInput::kFfn, hidden});
    groups.push_back({"down", names.up, false, {{names.down, hidden}}, LinearInput::kDown, ffn});

    std::map<std::string, std::vector<float>> input_scales;  // linear name -> its s
    for (const Group& group : groups) {
      // Linears the AWQ GEMM format cannot pack (out % 8 != 0) stay fp16: nothing to search.
      if (std::none_of(group.linears.begin(), group.linears.end(),
                       [](const auto& linear) { return linear.second % 8 == 0; })) {
        continue;
      }
      std::vector<const Tensor*> ws;
      for (const auto& [name, out] : group.linears) {
        NIBBLE_ASSIGN_OR_RETURN(Tensor* w, tensor(name, {out, group.in}));
        ws.push_back(w);
      }
      AwqLayerScales report{absl::StrCat("model.layers.", l, " ", group.label)};
      NIBBLE_ASSIGN_OR_RETURN(const std::vector<float> s,
                              searcher->SearchScales(group.input, group.in, ws, report));
      result.scales.push_back(report);
      for (const auto& [name, out] : group.linears) {
        Tensor& w = result.tensors.at(name);
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < out; ++n) {
          for (int64_t k = 0; k < group.in; ++k) w[n * group.in + k] *= s[k];
        }
        input_scales[name] = s;
      }
      if (group.previous_is_norm) {
        NIBBLE_ASSIGN_OR_RETURN(Tensor* norm, tensor(group.previous, {group.in}));
        for (int64_t k = 0; k < group.in; ++k) (*norm)[k] /= s[k];
      } else {
        // The previous linear's output rows are this group's input channels.
        const int64_t prev_in = hidden;  // v is [kv_dim, hidden], up [ffn, hidden]
        NIBBLE_ASSIGN_OR_RETURN(Tensor* prev, tensor(group.previous, {group.in, prev_in}));
#pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < group.in; ++k) {
          for (int64_t j = 0; j < prev_in; ++j) (*prev)[k * prev_in + j] /= s[k];
        }
        const std::string bias = group.previous.substr(0, group.previous.size() - 6) + "bias";
        if (store.Contains(bias)) {
          NIBBLE_ASSIGN_OR_RETURN(Tensor* b, tensor(bias, {group.in}));
          for (int64_t k = 0; k < group.in; ++k) (*b)[k] /= s[k];
        }
      }
    }

    // 3. Clipping, on the inputs as the scaled weights see them (x / s); not q, k, wqkv.
    NIBBLE_RETURN_IF_ERROR(stopped(l));
    report(l, "search clipping");
    std::vector<std::tuple<std::string, int64_t, LinearInput, int64_t>> clip = {
        {names.o, hidden, LinearInput::kO, q_dim},
        {names.gate, ffn, LinearInput::kFfn, hidden},
        {names.up, ffn, LinearInput::kFfn, hidden},
        {names.down, hidden, LinearInput::kDown, ffn}};
    if (names.clip_qkv_last) {
      clip.push_back({names.qkv[2], config.kv_dim(), LinearInput::kQkv, hidden});
    }
    for (const auto& [name, out, input, in] : clip) {
      if (out % 8 != 0) continue;  // stays fp16: clipping would only lose precision
      NIBBLE_RETURN_IF_ERROR(stopped(l));
      NIBBLE_ASSIGN_OR_RETURN(Tensor* w, tensor(name, {out, in}));
      auto it = input_scales.find(name);
      const std::vector<float> s = it != input_scales.end() ? it->second : std::vector<float>(in, 1.0f);
      NIBBLE_RETURN_IF_ERROR(searcher->SearchClipping(input, *w, in, out, s));
    }
    if (!options.checkpoint_dir.empty()) {
      report(l, "checkpoint");
      // The previous layer's write first: one checkpoint's copies in memory at a time.
      NIBBLE_RETURN_IF_ERROR(finish_writing());
      NIBBLE_ASSIGN_OR_RETURN(std::unique_ptr<LayerCheckpoint> checkpoint,
                              LayerCheckpoint::Make(options.checkpoint_dir, l, result,
                                                    first_scale, states, on_gpu));
      if (on_gpu) {  // the writers hold copies: the next layer may change the states meanwhile
        try {
          writing = std::async(std::launch::async, [c = std::move(checkpoint)] { return c->Write(); });
        } catch (const std::system_error& e) {
          return absl::ResourceExhaustedError(
              absl::StrCat("no thread to write the checkpoint of layer ", l, ": ", e.what()));
        }
        writing_layer = l;
        continue;
      }
      NIBBLE_RETURN_IF_ERROR(checkpoint->Write());
    }
    layers_done = l + 1;
    report(l, "layer done");
  }
  NIBBLE_RETURN_IF_ERROR(finish_writing());
  result.peak_device_bytes = searcher->PeakDeviceBytes();
  return result;
}

}  // namespace nibble::quant
