// The AWQ search on a GPU (awq_searcher.h). Per layer:
//  - Calibrate: the layer's original weights go to the device as fp16 (one layer at a time,
//    so a 7B model's search needs a few GB of device memory, not the 14 GB of its weights);
//    the samples run through it in passes of up to kPassTokens tokens (fp16 compute, cuBLAS
//    products, the engine's prefill attention), and of each linear's input the device keeps
//    only what the searches need: the Gram matrix Σ_t x_t x_tᵀ (fp32, by a GEMM on tensor
//    cores), Σ_t |x_t| per channel (fp64), and the clipping search's sampled tokens.
//  - SearchScales: for each candidate, the error D = W - Q(W·s)/s of each linear (one
//    kernel), then Σ_n d_nᵀ G d_n = Σ (D·G) ⊙ D (an fp32 GEMM and a fixed-order sum), which is
//    the CPU's Σ_t ||D x_t||² without a pass over the tokens.
//  - SearchClipping: the Gram blocks of the sampled tokens (divided by s) per group, and one
//    kernel that tries every bound of every group.
// kernels/cuda/awq.h has the kernels; the CPU searcher in awq.cc is the reference.
#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"
#include "engine/cuda_device.h"
#include "engine/decoder_layer.h"
#include "engine/status_macros.h"
#include "kernels/cpu/half.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/awq.h"
#include "kernels/cuda/ops.h"
#include "quant/awq_searcher.h"

namespace nibble::quant {
namespace {

namespace kc = kernels::cuda;
using engine::CublasHandle;
using engine::CudaStream;
using engine::DeviceMemory;
using engine::GrowingDeviceBuffer;
using engine::PinnedBuffer;
using engine::ToHalf;

// Tokens per calibration pass: enough rows for the products to run at tensor-core speed,
// few enough that a 7B layer's activations stay near 1 GB.
constexpr int64_t kPassTokens = 8192;
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

// The statistics of one linear input over a layer's calibration.
struct InputStatistics {
  int64_t in = 0;
  bool search_scales = false;  // Gram matrix and magnitudes wanted
  DeviceMemory gram;           // fp32 [in, in]
  DeviceMemory abs_sums;       // fp64 [in]
  DeviceMemory sampled;        // fp32 [sampled tokens, in]
};

class CudaAwqSearcher final : public AwqSearcher {
 public:
  CudaAwqSearcher(const engine::ModelConfig& config, const engine::ModelWeights& weights,
                  const AwqOptions& options, int64_t tokens, int device)
      : config_(config), weights_(weights), options_(options), tokens_(tokens), device_(device) {}

  ~CudaAwqSearcher() override { cudaSetDevice(device_); }

  absl::Status Init() {
    NIBBLE_RETURN_IF_ERROR(CheckCudaAwqSearch(config_, options_, device_));
    NIBBLE_RETURN_IF_ERROR(SelectDevice());
    NIBBLE_RETURN_IF_ERROR(stream_.Init());
    NIBBLE_ASSIGN_OR_RETURN(cublas_workspace_,
                            DeviceMemory::Allocate(kCublasWorkspaceBytes, "cuBLAS"));
    NIBBLE_RETURN_IF_ERROR(
        cublas_.Init(stream_.get(), cublas_workspace_.as<void>(), kCublasWorkspaceBytes));
    const int64_t hidden = config_.hidden_size;
    const int64_t sizes[4] = {hidden, config_.q_dim(), hidden, config_.intermediate_size};
    const int64_t stride = ClipSampleStride(tokens_, options_.clip_tokens);
    sampled_tokens_ = std::min(options_.clip_tokens, (tokens_ + stride - 1) / stride);
    for (int i = 0; i < 4; ++i) {
      InputStatistics& st = inputs_[i];
      st.in = sizes[i];
      st.search_scales = AwqSearchesScales(config_, static_cast<LinearInput>(i));
      if (st.search_scales) {
        NIBBLE_ASSIGN_OR_RETURN(st.gram, DeviceMemory::Allocate(st.in * st.in * sizeof(float),
                                                                "a Gram matrix"));
        NIBBLE_ASSIGN_OR_RETURN(st.abs_sums,
                                DeviceMemory::Allocate(st.in * sizeof(double), "magnitudes"));
      }
      NIBBLE_ASSIGN_OR_RETURN(
          st.sampled,
          DeviceMemory::Allocate(sampled_tokens_ * st.in * sizeof(float), "sampled tokens"));
    }
    NIBBLE_ASSIGN_OR_RETURN(partials_, DeviceMemory::Allocate(
                                           kc::SumOfProductsPartials() * sizeof(double),
                                           "partial sums"));
    return NotePeak();
  }

  absl::Status Calibrate(int64_t layer, std::vector<std::vector<float>>& states) override {
    NIBBLE_RETURN_IF_ERROR(SelectDevice());
    NIBBLE_RETURN_IF_ERROR(UploadLayer(weights_.layers[layer], layer));
    for (InputStatistics& st : inputs_) {
      if (!st.search_scales) continue;
      NIBBLE_CUDA_OR_RETURN(cudaMemsetAsync(st.gram.as<void>(), 0, st.gram.bytes(), stream_.get()),
                            "clearing a Gram matrix");
      NIBBLE_CUDA_OR_RETURN(
          cudaMemsetAsync(st.abs_sums.as<void>(), 0, st.abs_sums.bytes(), stream_.get()),
          "clearing magnitudes");
    }
    const int64_t hidden = config_.hidden_size;
    int64_t first_token = 0;
    for (size_t s = 0; s < states.size();) {
      size_t end = s;
      int64_t n = 0;
      while (end < states.size() &&
             (end == s || n + static_cast<int64_t>(states[end].size()) / hidden <= kPassTokens)) {
        n += static_cast<int64_t>(states[end].size()) / hidden;
        ++end;
      }
      NIBBLE_RETURN_IF_ERROR(RunPass(states, s, end, n, first_token));
      first_token += n;
      s = end;
    }
    NIBBLE_CUDA_OR_RETURN(cudaStreamSynchronize(stream_.get()), "the calibration pass");
    return NotePeak();
  }

  absl::StatusOr<std::vector<float>> SearchScales(LinearInput input, int64_t in,
                                                  const std::vector<const std::vector<float>*>& ws,
                                                  AwqLayerScales& report) override {
    NIBBLE_RETURN_IF_ERROR(SelectDevice());
    InputStatistics& st = inputs_[static_cast<int>(input)];
    if (!st.search_scales || st.in != in) {
      return absl::InternalError("the GPU AWQ search kept no statistics for this input");
    }
    std::vector<double> magnitude(in);
    NIBBLE_CUDA_OR_RETURN(cudaMemcpy(magnitude.data(), st.abs_sums.as<double>(),
                                     in * sizeof(double), cudaMemcpyDeviceToHost),
                          "copying the magnitudes");
    const int n_grid = options_.n_grid;
    std::vector<float> candidates;
    for (int step = 0; step < n_grid; ++step) {
      const std::vector<float> s = AwqCandidateScales(magnitude, tokens_, double(step) / n_grid);
      candidates.insert(candidates.end(), s.begin(), s.end());
    }
    NIBBLE_ASSIGN_OR_RETURN(DeviceMemory scales, DeviceMemory::Upload(
                                                     candidates.data(), candidates.size() * 4,
                                                     "candidate scales"));
    const size_t linears = ws.size();
    NIBBLE_ASSIGN_OR_RETURN(DeviceMemory losses, DeviceMemory::Allocate(
                                                     n_grid * linears * sizeof(double), "losses"));
    int64_t largest = 0;
    for (const std::vector<float>* w : ws) largest = std::max<int64_t>(largest, w->size());
    NIBBLE_RETURN_IF_ERROR(error_.Reserve(largest * sizeof(float), "weight errors"));
    NIBBLE_RETURN_IF_ERROR(product_.Reserve(largest * sizeof(float), "weight errors"));
    for (size_t i = 0; i < linears; ++i) {
      const int64_t out = static_cast<int64_t>(ws[i]->size()) / in;
      NIBBLE_RETURN_IF_ERROR(weight_.Reserve(ws[i]->size() * sizeof(float), "a weight"));
      NIBBLE_CUDA_OR_RETURN(cudaMemcpyAsync(weight_.as<float>(), ws[i]->data(),
                                            ws[i]->size() * sizeof(float),
                                            cudaMemcpyHostToDevice, stream_.get()),
                            "copying a weight to the device");
      for (int step = 0; step < n_grid; ++step) {
        NIBBLE_CUDA_OR_RETURN(
            kc::AwqScaledQuantizationError(weight_.as<float>(), out, in, options_.group_size,
                                           scales.as<float>() + step * in, error_.as<float>(),
                                           stream_.get()),
            "the quantization error of a scale candidate");
        // Row-major P[out, in] = D[out, in] · G: column-major Pᵀ = G · Dᵀ (G symmetric).
        NIBBLE_RETURN_IF_ERROR(GemmF32(st.gram.as<float>(), error_.as<float>(),
                                       product_.as<float>(), in, out, in));
        NIBBLE_CUDA_OR_RETURN(
            kc::SumOfProducts(product_.as<float>(), error_.as<float>(), out * in,
                              partials_.as<double>(), losses.as<double>() + step * linears + i,
                              stream_.get()),
            "summing a candidate's error");
      }
    }
    std::vector<double> loss(n_grid * linears);
    NIBBLE_CUDA_OR_RETURN(cudaMemcpyAsync(loss.data(), losses.as<double>(),
                                          loss.size() * sizeof(double), cudaMemcpyDeviceToHost,
                                          stream_.get()),
                          "copying the losses");
    NIBBLE_CUDA_OR_RETURN(cudaStreamSynchronize(stream_.get()), "the scale search");
    NIBBLE_RETURN_IF_ERROR(NotePeak());
    double best_loss = std::numeric_limits<double>::infinity();
    int best_step = 0;
    for (int step = 0; step < n_grid; ++step) {
      double total = 0;  // Σ of each linear's mean squared output error, as the CPU's
      for (size_t i = 0; i < linears; ++i) {
        const double elements = static_cast<double>(tokens_) * (ws[i]->size() / in);
        total += loss[step * linears + i] / elements;
      }
      if (step == 0) report.loss_rtn = total;
      if (total < best_loss) {
        best_loss = total;
        best_step = step;
      }
    }
    report.ratio = static_cast<double>(best_step) / n_grid;
    report.loss_awq = best_loss;
    return std::vector<float>(candidates.begin() + best_step * in,
                              candidates.begin() + (best_step + 1) * in);
  }

  absl::Status SearchClipping(LinearInput input, std::vector<float>& w, int64_t in, int64_t out,
                              const std::vector<float>& s) override {
    NIBBLE_RETURN_IF_ERROR(SelectDevice());
    const InputStatistics& st = inputs_[static_cast<int>(input)];
    if (st.in != in) return absl::InternalError("clipping input of the wrong width");
    const int64_t group = options_.group_size;
    const int64_t groups = (in + group - 1) / group;
    NIBBLE_ASSIGN_OR_RETURN(DeviceMemory scales,
                            DeviceMemory::Upload(s.data(), s.size() * sizeof(float), "scales"));
    NIBBLE_RETURN_IF_ERROR(gram_blocks_.Reserve(groups * group * group * sizeof(float),
                                                "Gram blocks"));
    NIBBLE_RETURN_IF_ERROR(weight_.Reserve(w.size() * sizeof(float), "a weight"));
    NIBBLE_CUDA_OR_RETURN(cudaMemcpyAsync(weight_.as<float>(), w.data(), w.size() * sizeof(float),
                                          cudaMemcpyHostToDevice, stream_.get()),
                          "copying a weight to the device");
    NIBBLE_CUDA_OR_RETURN(kc::GroupGram(st.sampled.as<float>(), sampled_tokens_, in, group,
                                        scales.as<float>(), gram_blocks_.as<float>(),
                                        stream_.get()),
                          "the clipping search's Gram blocks");
    const int steps = static_cast<int>(options_.max_shrink * options_.n_grid);
    NIBBLE_CUDA_OR_RETURN(kc::AwqClipSearch(weight_.as<float>(), out, in, group,
                                            gram_blocks_.as<float>(), options_.n_grid, steps,
                                            stream_.get()),
                          "the clipping search");
    NIBBLE_CUDA_OR_RETURN(cudaMemcpyAsync(w.data(), weight_.as<float>(), w.size() * sizeof(float),
                                          cudaMemcpyDeviceToHost, stream_.get()),
                          "copying a clipped weight back");
    NIBBLE_CUDA_OR_RETURN(cudaStreamSynchronize(stream_.get()), "the clipping search");
    return NotePeak();
  }

  int64_t PeakDeviceBytes() const override { return peak_device_bytes_; }

 private:
  absl::Status SelectDevice() const {
    NIBBLE_CUDA_OR_RETURN(cudaSetDevice(device_), absl::StrCat("selecting CUDA device ", device_));
    return absl::OkStatus();
  }

  // The device memory in use (this process's and any other's, the CUDA context included):
  // what the job needs of the card at its peak.
  absl::Status NotePeak() {
    size_t free_bytes = 0, total_bytes = 0;
    NIBBLE_CUDA_OR_RETURN(cudaMemGetInfo(&free_bytes, &total_bytes), "reading device memory");
    peak_device_bytes_ = std::max<int64_t>(peak_device_bytes_, total_bytes - free_bytes);
    return absl::OkStatus();
  }

  // Column-major C[m, n] = A[m, k] · B[k, n], fp32 (no TF32: the losses compare candidates
  // whose errors differ in the third digit).
  absl::Status GemmF32(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k) {
    const float one = 1.0f, zero = 0.0f;
    NIBBLE_CUBLAS_OR_RETURN(
        cublas_.api(),
        cublas_.api().gemm_ex(cublas_.get(), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(m),
                              static_cast<int>(n), static_cast<int>(k), &one, a, CUDA_R_32F,
                              static_cast<int>(m), b, CUDA_R_32F, static_cast<int>(k), &zero, c,
                              CUDA_R_32F, static_cast<int>(m), CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT),
        "the scale search's error product");
    return absl::OkStatus();
  }

  // Row-major y[rows, out] = x[rows, in] · W[out, in]ᵀ (fp16, fp32 accumulation).
  absl::Status Linear(const DeviceMemory& w, int64_t out, int64_t in, const uint16_t* x,
                      int64_t rows, uint16_t* y, const DeviceMemory& bias) {
    const float one = 1.0f, zero = 0.0f;
    NIBBLE_CUBLAS_OR_RETURN(
        cublas_.api(),
        cublas_.api().gemm_ex(cublas_.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out),
                              static_cast<int>(rows), static_cast<int>(in), &one, w.as<void>(),
                              CUDA_R_16F, static_cast<int>(in), x, CUDA_R_16F,
                              static_cast<int>(in), &zero, y, CUDA_R_16F, static_cast<int>(out),
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "a calibration product");
    if (bias.bytes() > 0) {
      NIBBLE_CUDA_OR_RETURN(kc::AddBias(y, out, bias.as<float>(), rows, out, stream_.get()),
                            "a bias add");
    }
    return absl::OkStatus();
  }

  // The statistics of one linear input x[rows, in] (fp16) of a pass whose first row is
  // calibration token `first_token`.
  absl::Status Observe(LinearInput input, const uint16_t* x, int64_t rows,
                       const std::vector<int32_t>& sampled_rows, int64_t first_sample,
                       const int32_t* device_sampled_rows) {
    InputStatistics& st = inputs_[static_cast<int>(input)];
    if (st.search_scales) {
      // G += xᵀ x: column-major xᵀ is [in, rows] (ld in), so G = xᵀ · (xᵀ)ᵀ.
      const float one = 1.0f;
      NIBBLE_CUBLAS_OR_RETURN(
          cublas_.api(),
          cublas_.api().gemm_ex(cublas_.get(), CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(st.in),
                                static_cast<int>(st.in), static_cast<int>(rows), &one, x,
                                CUDA_R_16F, static_cast<int>(st.in), x, CUDA_R_16F,
                                static_cast<int>(st.in), &one, st.gram.as<void>(), CUDA_R_32F,
                                static_cast<int>(st.in), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "accumulating a Gram matrix");
      NIBBLE_CUDA_OR_RETURN(kc::AddColumnAbsSums(x, rows, st.in, st.abs_sums.as<double>(),
                                                 stream_.get()),
                            "accumulating magnitudes");
    }
    if (!sampled_rows.empty()) {
      const int64_t count = static_cast<int64_t>(sampled_rows.size());
      NIBBLE_RETURN_IF_ERROR(gathered_.Reserve(count * st.in * sizeof(uint16_t), "sampled rows"));
      NIBBLE_CUDA_OR_RETURN(kc::Embedding(x, rows, st.in, device_sampled_rows, count,
                                          gathered_.as<uint16_t>(), stream_.get()),
                            "gathering the sampled tokens");
      NIBBLE_CUDA_OR_RETURN(kc::HalfToFloat(gathered_.as<uint16_t>(), count * st.in,
                                            st.sampled.as<float>() + first_sample * st.in,
                                            stream_.get()),
                            "widening the sampled tokens");
    }
    return absl::OkStatus();
  }

  absl::Status UploadLayer(const engine::LayerWeights& layer, int64_t index) {
    const std::string name = absl::StrCat("layer ", index);
    auto upload_half = [&](const std::vector<float>& values, const std::string& what) {
      const std::vector<uint16_t> half = ToHalf(values);
      return DeviceMemory::Upload(half.data(), half.size() * 2, absl::StrCat(name, " ", what));
    };
    // Stacks linears by rows (same in_features) as fp16, with their biases (zeros where a
    // part has none) when any has one.
    auto stack = [&](std::vector<const engine::LinearWeight*> parts, const std::string& what,
                     DeviceMemory& weight, DeviceMemory& bias) -> absl::Status {
      std::vector<float> all, biases;
      bool any_bias = false;
      for (const engine::LinearWeight* part : parts) {
        const std::vector<float> w = part->DequantizedWeight();
        all.insert(all.end(), w.begin(), w.end());
        any_bias = any_bias || !part->bias().empty();
      }
      NIBBLE_ASSIGN_OR_RETURN(weight, upload_half(all, what));
      bias = DeviceMemory();
      if (any_bias) {
        for (const engine::LinearWeight* part : parts) {
          if (part->bias().empty()) {
            biases.insert(biases.end(), static_cast<size_t>(part->out_features()), 0.0f);
          } else {
            biases.insert(biases.end(), part->bias().begin(), part->bias().end());
          }
        }
        NIBBLE_ASSIGN_OR_RETURN(bias, DeviceMemory::Upload(biases.data(), biases.size() * 4,
                                                           absl::StrCat(name, " ", what, " bias")));
      }
      return absl::OkStatus();
    };
    // The previous layer's weights go first: the device holds one layer at a time.
    layer_ = DeviceLayer();
    NIBBLE_ASSIGN_OR_RETURN(layer_.attention_norm, upload_half(layer.attention_norm, "norm"));
    NIBBLE_ASSIGN_OR_RETURN(layer_.ffn_norm, upload_half(layer.ffn_norm, "norm"));
    NIBBLE_RETURN_IF_ERROR(stack({layer.q_proj.get(), layer.k_proj.get(), layer.v_proj.get()},
                                 "q/k/v", layer_.qkv, layer_.qkv_bias));
    NIBBLE_RETURN_IF_ERROR(stack({layer.o_proj.get()}, "o_proj", layer_.o, layer_.o_bias));
    NIBBLE_RETURN_IF_ERROR(stack({layer.gate_proj.get(), layer.up_proj.get()}, "gate/up",
                                 layer_.gate_up, layer_.no_bias));
    NIBBLE_RETURN_IF_ERROR(stack({layer.down_proj.get()}, "down_proj", layer_.down,
                                 layer_.no_bias));
    return absl::OkStatus();
  }

  // Runs samples [first, end) (n tokens, the first being calibration token first_token)
  // through the uploaded layer, in place on their states.
  absl::Status RunPass(std::vector<std::vector<float>>& states, size_t first, size_t end,
                       int64_t n, int64_t first_token) {
    const int64_t hidden = config_.hidden_size, q_dim = config_.q_dim(), kv_dim = config_.kv_dim();
    const int64_t ffn = config_.intermediate_size, d = config_.head_dim;
    const int64_t qkv_rows = q_dim + 2 * kv_dim;
    const int64_t spans = static_cast<int64_t>(end - first);
    const float eps = static_cast<float>(config_.rms_norm_eps);
    cudaStream_t stream = stream_.get();
    int64_t longest = 0;
    for (size_t s = first; s < end; ++s) {
      longest = std::max<int64_t>(longest, static_cast<int64_t>(states[s].size()) / hidden);
    }

    // Metadata: per token its position, its sample's RoPE row and its cache slot (sample s
    // has block s of `longest` positions); the sampled tokens' rows; the prefill table; the
    // samples' inverse frequencies (dynamic NTK takes its base from each sample's length).
    std::vector<int32_t> positions, freq_index, slots, first_row, start, tokens, tables;
    std::vector<float> inv_freq;
    std::vector<int32_t> sampled_rows;
    const int64_t stride = ClipSampleStride(tokens_, options_.clip_tokens);
    int64_t next_sampled = (first_token + stride - 1) / stride;  // the first index ≥ first_token
    const int64_t first_sample = next_sampled;
    for (int64_t index = next_sampled; index < sampled_tokens_ && index * stride < first_token + n;
         ++index) {
      sampled_rows.push_back(static_cast<int32_t>(index * stride - first_token));
    }
    int64_t row = 0;
    for (size_t s = first; s < end; ++s) {
      const int64_t len = static_cast<int64_t>(states[s].size()) / hidden;
      const int64_t span = static_cast<int64_t>(s - first);
      first_row.push_back(static_cast<int32_t>(row));
      start.push_back(0);
      tokens.push_back(static_cast<int32_t>(len));
      tables.push_back(static_cast<int32_t>(span));
      for (int64_t t = 0; t < len; ++t, ++row) {
        positions.push_back(static_cast<int32_t>(t));
        freq_index.push_back(static_cast<int32_t>(span));
        slots.push_back(static_cast<int32_t>(span * longest + t));
      }
      const std::vector<float> f = engine::RopeInverseFrequenciesForLength(config_, len);
      inv_freq.insert(inv_freq.end(), f.begin(), f.end());
    }
    std::vector<int32_t> meta;
    for (const std::vector<int32_t>* v :
         {&positions, &freq_index, &slots, &sampled_rows, &first_row, &start, &tokens, &tables}) {
      meta.insert(meta.end(), v->begin(), v->end());
    }
    const size_t meta_bytes = meta.size() * 4 + inv_freq.size() * 4;
    // The previous pass's copy from host_meta_ must be done before it is replaced or rewritten.
    NIBBLE_CUDA_OR_RETURN(cudaStreamSynchronize(stream), "the previous calibration pass");
    NIBBLE_RETURN_IF_ERROR(host_meta_.Reserve(meta_bytes));
    std::memcpy(host_meta_.data(), meta.data(), meta.size() * 4);
    std::memcpy(host_meta_.data() + meta.size() * 4, inv_freq.data(), inv_freq.size() * 4);
    NIBBLE_RETURN_IF_ERROR(meta_.Reserve(meta_bytes, "calibration metadata"));
    NIBBLE_CUDA_OR_RETURN(cudaMemcpyAsync(meta_.as<char>(), host_meta_.data(), meta_bytes,
                                          cudaMemcpyHostToDevice, stream),
                          "copying the calibration metadata");
    const int32_t* d_positions = meta_.as<int32_t>();
    const int32_t* d_freq_index = d_positions + n;
    const int32_t* d_slots = d_freq_index + n;
    const int32_t* d_sampled = d_slots + n;
    kc::PrefillSpanTable table;
    table.first_row = d_sampled + sampled_rows.size();
    table.start = table.first_row + spans;
    table.tokens = table.start + spans;
    table.block_tables = table.tokens + spans;
    table.block_table_stride = 1;
    const float* d_inv_freq = reinterpret_cast<const float*>(table.block_tables + spans);

    // Activations.
    const size_t h = sizeof(uint16_t);
    NIBBLE_RETURN_IF_ERROR(staging_.Reserve(n * hidden * sizeof(float), "calibration states"));
    NIBBLE_RETURN_IF_ERROR(x_.Reserve(n * hidden * h, "calibration activations"));
    NIBBLE_RETURN_IF_ERROR(normed_.Reserve(n * hidden * h, "calibration activations"));
    NIBBLE_RETURN_IF_ERROR(qkv_.Reserve(n * qkv_rows * h, "calibration activations"));
    NIBBLE_RETURN_IF_ERROR(q_.Reserve(n * q_dim * h, "calibration activations"));
    NIBBLE_RETURN_IF_ERROR(attention_.Reserve(n * q_dim * h, "calibration activations"));
    NIBBLE_RETURN_IF_ERROR(projected_.Reserve(n * hidden * h, "calibration activations"));
    NIBBLE_RETURN_IF_ERROR(gate_up_.Reserve(n * 2 * ffn * h, "calibration activations"));
    NIBBLE_RETURN_IF_ERROR(act_.Reserve(n * ffn * h, "calibration activations"));
    NIBBLE_RETURN_IF_ERROR(kv_.Reserve(spans * 2 * longest * kv_dim * h, "calibration keys"));

    float* staging = staging_.as<float>();
    uint16_t* x = x_.as<uint16_t>();
    uint16_t* normed = normed_.as<uint16_t>();
    uint16_t* projected = projected_.as<uint16_t>();
    uint16_t* qkv = qkv_.as<uint16_t>();
    for (size_t s = first, offset = 0; s < end; offset += states[s].size(), ++s) {
      NIBBLE_CUDA_OR_RETURN(cudaMemcpyAsync(staging + offset, states[s].data(),
                                            states[s].size() * sizeof(float),
                                            cudaMemcpyHostToDevice, stream),
                            "copying calibration states to the device");
    }
    NIBBLE_CUDA_OR_RETURN(kc::FloatToHalf(staging, n * hidden, x, stream), "narrowing the states");

    NIBBLE_CUDA_OR_RETURN(kc::RmsNorm(x, layer_.attention_norm.as<uint16_t>(), n, hidden, eps,
                                      normed, stream),
                          "the attention norm");
    NIBBLE_RETURN_IF_ERROR(Observe(LinearInput::kQkv, normed, n, sampled_rows, first_sample,
                                   d_sampled));
    NIBBLE_RETURN_IF_ERROR(Linear(layer_.qkv, qkv_rows, hidden, normed, n, qkv, layer_.qkv_bias));
    uint16_t* k = qkv + q_dim;
    uint16_t* v = k + kv_dim;
    // RoPE on q in place; the rotated keys and the values straight into the paged cache (one
    // block of `longest` positions per sample), as the CUDA backend does.
    uint16_t* keys = kv_.as<uint16_t>();
    uint16_t* values = keys + longest * kv_dim;
    const int64_t block_stride = 2 * longest * kv_dim;
    const kc::RopeKvStore store{v,      qkv_rows,     d_slots, keys, values,
                                block_stride, static_cast<int32_t>(longest)};
    NIBBLE_CUDA_OR_RETURN(kc::RopeRotateHalf(qkv, qkv_rows, config_.num_heads, k, qkv_rows,
                                             config_.num_kv_heads, d, n, d_positions, d_inv_freq,
                                             d_freq_index, stream, &store),
                          "RoPE and storing keys and values");
    NIBBLE_CUDA_OR_RETURN(cudaMemcpy2DAsync(q_.as<uint16_t>(), q_dim * h, qkv, qkv_rows * h,
                                            q_dim * h, n, cudaMemcpyDeviceToDevice, stream),
                          "gathering q");
    kc::PrefillAttentionPlan plan;
    NIBBLE_CUDA_OR_RETURN(kc::PlanPagedPrefillAttention(
                              {config_.num_heads, config_.num_kv_heads, d}, n, spans, &plan),
                          "planning prefill attention");
    const kc::PagedKvView view{keys, values, block_stride, static_cast<int32_t>(longest)};
    NIBBLE_CUDA_OR_RETURN(kc::PagedPrefillAttention(plan, q_.as<uint16_t>(), view, table, spans,
                                                    attention_.as<uint16_t>(), stream),
                          "prefill attention");
    NIBBLE_RETURN_IF_ERROR(Observe(LinearInput::kO, attention_.as<uint16_t>(), n, sampled_rows,
                                   first_sample, d_sampled));
    NIBBLE_RETURN_IF_ERROR(Linear(layer_.o, hidden, q_dim, attention_.as<uint16_t>(), n,
                                  projected, layer_.o_bias));
    NIBBLE_CUDA_OR_RETURN(kc::AddRmsNorm(x, projected, layer_.ffn_norm.as<uint16_t>(), n, hidden,
                                         eps, normed, stream),
                          "the residual add and FFN norm");
    NIBBLE_RETURN_IF_ERROR(Observe(LinearInput::kFfn, normed, n, sampled_rows, first_sample,
                                   d_sampled));
    uint16_t* gate_up = gate_up_.as<uint16_t>();
    NIBBLE_RETURN_IF_ERROR(Linear(layer_.gate_up, 2 * ffn, hidden, normed, n, gate_up,
                                  layer_.no_bias));
    NIBBLE_CUDA_OR_RETURN(kc::SiluMul(gate_up, 2 * ffn, gate_up + ffn, 2 * ffn, n, ffn,
                                      act_.as<uint16_t>(), ffn, stream),
                          "SiLU(gate) * up");
    NIBBLE_RETURN_IF_ERROR(Observe(LinearInput::kDown, act_.as<uint16_t>(), n, sampled_rows,
                                   first_sample, d_sampled));
    NIBBLE_RETURN_IF_ERROR(Linear(layer_.down, hidden, ffn, act_.as<uint16_t>(), n, projected,
                                  layer_.no_bias));
    // x += projected (the norm's output, into normed, is not needed: the next layer norms x
    // with its own weight).
    NIBBLE_CUDA_OR_RETURN(kc::AddRmsNorm(x, projected, layer_.ffn_norm.as<uint16_t>(), n, hidden,
                                         eps, normed, stream),
                          "the residual add");

    NIBBLE_CUDA_OR_RETURN(kc::HalfToFloat(x, n * hidden, staging, stream), "widening the states");
    for (size_t s = first, offset = 0; s < end; offset += states[s].size(), ++s) {
      NIBBLE_CUDA_OR_RETURN(cudaMemcpyAsync(states[s].data(), staging + offset,
                                            states[s].size() * sizeof(float),
                                            cudaMemcpyDeviceToHost, stream),
                            "copying calibration states back");
    }
    return absl::OkStatus();
  }

  struct DeviceLayer {
    DeviceMemory attention_norm, ffn_norm;  // fp16 [hidden]
    DeviceMemory qkv, qkv_bias;             // fp16 [q_dim + 2 kv_dim, hidden]; fp32 or none
    DeviceMemory o, o_bias;
    DeviceMemory gate_up;                   // fp16 [2 ffn, hidden]
    DeviceMemory down;
    DeviceMemory no_bias;                   // always empty
  };

  const engine::ModelConfig& config_;
  const engine::ModelWeights& weights_;
  AwqOptions options_;
  int64_t tokens_;
  int device_;
  int64_t sampled_tokens_ = 0;
  int64_t peak_device_bytes_ = 0;

  CudaStream stream_;  // declared before what runs on it: destroyed after it
  DeviceMemory cublas_workspace_;
  CublasHandle cublas_;
  DeviceLayer layer_;
  std::array<InputStatistics, 4> inputs_;  // by LinearInput
  DeviceMemory partials_;
  PinnedBuffer host_meta_;
  GrowingDeviceBuffer meta_, staging_, x_, normed_, qkv_, q_, attention_, projected_, gate_up_, act_, kv_,
      gathered_, weight_, error_, product_, gram_blocks_;
};

}  // namespace

absl::Status CheckCudaAwqSearch(const engine::ModelConfig& config, const AwqOptions& options,
                                int device) {
  int devices = 0;
  NIBBLE_CUDA_OR_RETURN(cudaGetDeviceCount(&devices), "counting CUDA devices");
  if (device < 0 || device >= devices) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", device, " does not exist (", devices, " visible)"));
  }
  if (options.group_size > kc::kMaxAwqGroup) {
    return absl::InvalidArgumentError(
        absl::StrCat("the GPU AWQ search takes group sizes up to ", kc::kMaxAwqGroup, ", not ",
                     options.group_size, " (use --device cpu)"));
  }
  if (config.head_dim != 8 && config.head_dim != 64 && config.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("the GPU AWQ search's attention supports head_dim 8, 64 and 128, not ",
                     config.head_dim, " (use --device cpu)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AwqSearcher>> MakeCudaAwqSearcher(
    const engine::ModelConfig& config, const engine::ModelWeights& weights,
    const AwqOptions& options, int64_t tokens, int device) {
  auto searcher = std::make_unique<CudaAwqSearcher>(config, weights, options, tokens, device);
  NIBBLE_RETURN_IF_ERROR(searcher->Init());
  return std::unique_ptr<AwqSearcher>(std::move(searcher));
}

}  // namespace nibble::quant
