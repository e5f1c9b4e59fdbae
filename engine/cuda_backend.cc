#include "engine/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"
#include "engine/cuda_device.h"
#include "engine/decoder_layer.h"
#include "engine/status_macros.h"
#include "kernels/cpu/half.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/sampling.h"
#include "kernels/cuda/w4a16.h"

namespace nibble::engine {
namespace {

namespace kc = kernels::cuda;

// An instantiated CUDA graph, destroyed with its owner.
class GraphExec {
 public:
  explicit GraphExec(cudaGraphExec_t exec) : exec_(exec) {}
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;
  ~GraphExec() { cudaGraphExecDestroy(exec_); }
  cudaGraphExec_t get() const { return exec_; }

 private:
  cudaGraphExec_t exec_;
};

// One linear on the device: a W4A16 weight in the kernels' layout or a dense fp16 one.
struct DeviceLinear {
  int64_t in = 0, out = 0;
  bool int4 = false;
  kc::W4A16Layout layout;
  DeviceMemory qw, zs;    // int4
  DeviceMemory weight;    // dense: fp16 [out, in]
  DeviceMemory bias;      // fp32 [out] or none
  size_t bytes() const { return qw.bytes() + zs.bytes() + weight.bytes() + bias.bytes(); }
};

// Stacks `parts` by rows (same in_features) into one device linear. All 4-bit with one group
// size, or all dense; a mix is the caller's to split.
absl::StatusOr<DeviceLinear> UploadStacked(const std::vector<const LinearWeight*>& parts,
                                           const std::string& name) {
  DeviceLinear linear;
  linear.in = parts[0]->in_features();
  std::vector<float> bias;
  bool any_bias = false;
  for (const LinearWeight* part : parts) {
    if (part->in_features() != linear.in) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": stacked parts differ in in_features"));
    }
    linear.out += part->out_features();
    any_bias = any_bias || !part->bias().empty();
  }
  if (any_bias) {
    for (const LinearWeight* part : parts) {
      if (part->bias().empty()) {
        bias.insert(bias.end(), static_cast<size_t>(part->out_features()), 0.0f);
      } else {
        bias.insert(bias.end(), part->bias().begin(), part->bias().end());
      }
    }
    NIBBLE_ASSIGN_OR_RETURN(linear.bias, DeviceMemory::Upload(bias.data(), bias.size() * sizeof(float),
                                                              name + " bias"));
  }
  std::optional<Int4Weight> first = parts[0]->Int4();
  if (first.has_value()) {
    Int4Weight stacked = std::move(*first);
    for (size_t p = 1; p < parts.size(); ++p) {
      std::optional<Int4Weight> next = parts[p]->Int4();
      if (!next || next->group_size != stacked.group_size) {
        return absl::InvalidArgumentError(absl::StrCat(name, ": stacked parts differ in storage"));
      }
      stacked.out_features += next->out_features;
      stacked.q.insert(stacked.q.end(), next->q.begin(), next->q.end());
      stacked.zeros.insert(stacked.zeros.end(), next->zeros.begin(), next->zeros.end());
      stacked.scales.insert(stacked.scales.end(), next->scales.begin(), next->scales.end());
    }
    if (const char* problem = kc::CheckW4A16Shape(stacked.out_features, stacked.in_features,
                                                  stacked.group_size)) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": the CUDA W4A16 kernels do not support this weight: ", problem));
    }
    linear.int4 = true;
    linear.layout = kc::MakeW4A16Layout(stacked.out_features, stacked.in_features, stacked.group_size);
    std::vector<uint32_t> qw(linear.layout.qw_words()), zs(linear.layout.zs_words());
    kc::RepackW4A16(linear.layout, stacked.q.data(), stacked.zeros.data(), stacked.scales.data(),
                    qw.data(), zs.data());
    NIBBLE_ASSIGN_OR_RETURN(linear.qw, DeviceMemory::Upload(qw.data(), qw.size() * 4, name));
    NIBBLE_ASSIGN_OR_RETURN(linear.zs, DeviceMemory::Upload(zs.data(), zs.size() * 4, name));
    return linear;
  }
  std::vector<uint16_t> weight;
  weight.reserve(static_cast<size_t>(linear.out * linear.in));
  for (const LinearWeight* part : parts) {
    if (part->Int4().has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": stacked parts differ in storage"));
    }
    const std::vector<uint16_t> half = ToHalf(part->DequantizedWeight());
    weight.insert(weight.end(), half.begin(), half.end());
  }
  NIBBLE_ASSIGN_OR_RETURN(linear.weight,
                          DeviceMemory::Upload(weight.data(), weight.size() * 2, name));
  return linear;
}

// Uploads `parts` stacked into one linear when their storage agrees, else one linear each.
absl::StatusOr<std::vector<DeviceLinear>> UploadGroup(const std::vector<const LinearWeight*>& parts,
                                                      const std::string& name) {
  auto storage = [](const LinearWeight* w) {
    std::optional<Int4Weight> q = w->Int4();
    return q ? q->group_size : int64_t{0};
  };
  bool same = true;
  for (const LinearWeight* part : parts) same = same && storage(part) == storage(parts[0]);
  std::vector<DeviceLinear> linears;
  if (same) {
    NIBBLE_ASSIGN_OR_RETURN(DeviceLinear stacked, UploadStacked(parts, name));
    linears.push_back(std::move(stacked));
    return linears;
  }
  for (size_t p = 0; p < parts.size(); ++p) {
    NIBBLE_ASSIGN_OR_RETURN(DeviceLinear one, UploadStacked({parts[p]}, absl::StrCat(name, ".", p)));
    linears.push_back(std::move(one));
  }
  return linears;
}

struct DeviceLayer {
  DeviceMemory attention_norm, ffn_norm;  // fp16 [hidden]
  // Powers of two that bring each norm weight's largest magnitude into (0.5, 1] (NormWeightFactor):
  // the decode step's folded norms (kc::W4A16Fusion) write fp16(x * w * c), finite whatever w.
  float attention_norm_c = 1.0f, ffn_norm_c = 1.0f;
  std::vector<DeviceLinear> qkv;          // stacked q;k;v, or q, k, v
  DeviceLinear o;
  std::vector<DeviceLinear> gate_up;      // stacked gate;up, or gate, up
  DeviceLinear down;
};

class CudaSequence final : public SequenceState {
 public:
  CudaSequence(DeviceMemory cache, int64_t capacity)
      : cache_(std::move(cache)), capacity_(capacity) {}
  int64_t length() const override { return length_; }
  int64_t capacity() const override { return capacity_; }
  void Truncate(int64_t length) override {
    if (length >= 0 && length < length_) length_ = length;
  }
  uint16_t* data() const { return cache_.as<uint16_t>(); }
  void set_length(int64_t length) { length_ = length; }

 private:
  DeviceMemory cache_;  // one block of `capacity` positions
  int64_t capacity_;
  int64_t length_ = 0;
};

// Where a pass's keys and values live: a pool of blocks (the serving engine's, or a
// sequence's single block) in the layout of kernels/cuda/attention.h.
struct KvTarget {
  uint16_t* base = nullptr;
  int64_t block_seq_len = 0;
  int64_t block_stride = 0;  // halves
};

// One sequence's part of a pass (validated).
struct PassSpan {
  std::span<const int32_t> tokens;
  int64_t start = 0;
  std::span<const int32_t> block_table;
  enum class Logits { kNone, kLast, kAll } logits = Logits::kNone;
  // kLast: the token picked on the device only (BatchSpan::sample, sampling, penalty_ids).
  bool sample = false;
  kernels::SampleRowParams sampling;
  std::span<const int32_t> penalty_ids;
};

class CudaBackend final : public Backend {
 public:
  static absl::StatusOr<std::unique_ptr<Backend>> Make(const ModelConfig& config,
                                                       ModelWeights weights, int device) {
    int devices = 0;
    NIBBLE_CUDA_OR_RETURN(cudaGetDeviceCount(&devices), "counting CUDA devices");
    if (device < 0 || device >= devices) {
      return absl::InvalidArgumentError(
          absl::StrCat("CUDA device ", device, " does not exist (", devices, " visible)"));
    }
    if (config.head_dim != 8 && config.head_dim != 64 && config.head_dim != 128) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the CUDA backend's attention supports head_dim 8, 64 and 128, not ", config.head_dim));
    }
    std::unique_ptr<CudaBackend> backend(new CudaBackend(config, device));
    NIBBLE_RETURN_IF_ERROR(backend->Init(std::move(weights)));
    return std::unique_ptr<Backend>(std::move(backend));
  }

  ~CudaBackend() override {
    cudaSetDevice(device_);
    graphs_.clear();
    if (cublas_ != nullptr) cublas_api_->destroy(cublas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  std::string Name() const override { return absl::StrCat("cuda:", device_); }
  int64_t vocab_size() const override { return config_.vocab_size; }

  absl::StatusOr<std::unique_ptr<SequenceState>> NewSequence(int64_t capacity) override {
    NIBBLE_RETURN_IF_ERROR(CheckSequenceCapacity(capacity));
    NIBBLE_RETURN_IF_ERROR(SelectDevice());
    NIBBLE_ASSIGN_OR_RETURN(DeviceMemory cache,
                            DeviceMemory::Allocate(static_cast<size_t>(KvBlockBytes(capacity)),
                                                   "a sequence's KV cache"));
    return std::make_unique<CudaSequence>(std::move(cache), capacity);
  }

  absl::Status Forward(SequenceState& state, std::span<const int32_t> tokens, LogitsFor which,
                       std::vector<float>& logits) override {
    auto* sequence = dynamic_cast<CudaSequence*>(&state);
    if (sequence == nullptr) {
      return absl::InvalidArgumentError("sequence was not made by the CUDA backend");
    }
    NIBBLE_RETURN_IF_ERROR(CheckForward(*sequence, tokens, config_.vocab_size));
    const int64_t start = sequence->length();
    const int64_t n = static_cast<int64_t>(tokens.size());
    static constexpr int32_t kOnlyBlock = 0;
    PassSpan span;
    span.tokens = tokens;
    span.start = start;
    span.block_table = std::span<const int32_t>(&kOnlyBlock, 1);
    span.logits = which == LogitsFor::kAllPositions ? PassSpan::Logits::kAll : PassSpan::Logits::kLast;
    const KvTarget target{sequence->data(), sequence->capacity(), BlockHalves(sequence->capacity())};
    std::vector<int32_t> none_sampled;
    NIBBLE_RETURN_IF_ERROR(Run(std::span<const PassSpan>(&span, 1), target, logits, none_sampled));
    sequence->set_length(start + n);
    return absl::OkStatus();
  }

  std::optional<int64_t> FreeMemoryBytes() const override {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaSetDevice(device_) != cudaSuccess ||
        cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
      return int64_t{0};  // nothing can be promised: the engine's sizing then fails cleanly
    }
    return static_cast<int64_t>(free_bytes);
  }

  int64_t KvBlockBytes(int32_t block_seq_len) const override {
    return BlockHalves(block_seq_len) * static_cast<int64_t>(sizeof(uint16_t));
  }

  absl::Status ConfigureKvCache(int64_t num_blocks, int32_t block_seq_len) override {
    NIBBLE_RETURN_IF_ERROR(CheckKvCacheShape(num_blocks, block_seq_len));
    NIBBLE_RETURN_IF_ERROR(SelectDevice());
    pool_ = DeviceMemory();
    pool_blocks_ = usable_blocks_ = 0;
    // Committed at once: device memory cannot be reserved and committed later with
    // cudaMalloc, and the engine sized the pool from what is free.
    NIBBLE_ASSIGN_OR_RETURN(pool_, DeviceMemory::Allocate(static_cast<size_t>(num_blocks) *
                                                              KvBlockBytes(block_seq_len),
                                                          "the KV cache"));
    pool_blocks_ = num_blocks;
    block_seq_len_ = block_seq_len;
    return absl::OkStatus();
  }

  absl::Status GrowKvCache(int64_t num_blocks) override {
    NIBBLE_RETURN_IF_ERROR(CheckKvCacheGrowth(num_blocks, pool_blocks_));
    usable_blocks_ = std::max(usable_blocks_, num_blocks);
    return absl::OkStatus();
  }

  absl::Status ForwardBatch(std::span<const BatchSpan> spans, std::vector<float>& logits_out,
                            std::vector<int32_t>& sampled_out) override {
    if (pool_blocks_ == 0) {
      return absl::FailedPreconditionError("ForwardBatch before ConfigureKvCache");
    }
    NIBBLE_RETURN_IF_ERROR(CheckBatchSpans(spans, config_.vocab_size, block_seq_len_,
                                           usable_blocks_));
    std::vector<PassSpan> pass(spans.size());
    // The spans whose token the host picks (device_sampling_ off: all but plain greedy ones),
    // seen as spans whose logits row comes back; the device's picks have no row.
    std::vector<BatchSpan> host_view;
    bool host_samples = false;
    for (size_t s = 0; s < spans.size(); ++s) {
      const kernels::SampleRowParams& p = spans[s].sampling;
      const bool plain_greedy = p.temperature == 0.0f &&
                                (p.repetition_penalty == 1.0f || spans[s].penalty_ids.empty());
      pass[s].tokens = spans[s].tokens;
      pass[s].start = spans[s].start;
      pass[s].block_table = spans[s].block_table;
      pass[s].logits = spans[s].logits ? PassSpan::Logits::kLast : PassSpan::Logits::kNone;
      pass[s].sample = spans[s].logits && spans[s].sample && (device_sampling_ || plain_greedy);
      pass[s].sampling = spans[s].sampling;
      pass[s].penalty_ids = spans[s].penalty_ids;
      host_view.push_back(spans[s]);
      host_view.back().logits = spans[s].logits && !pass[s].sample;
      host_samples = host_samples || (host_view.back().logits && spans[s].sample);
    }
    const KvTarget target{pool_.as<uint16_t>(), block_seq_len_, BlockHalves(block_seq_len_)};
    if (!host_samples) return Run(pass, target, logits_out, sampled_out);
    std::vector<int32_t> on_device, on_host;
    NIBBLE_RETURN_IF_ERROR(Run(pass, target, logits_out, on_device));
    TakeSampledRows(host_view, config_.vocab_size, logits_out, on_host);
    sampled_out.clear();
    for (size_t s = 0, device = 0, host = 0; s < spans.size(); ++s) {
      if (!spans[s].logits || !spans[s].sample) continue;
      sampled_out.push_back(pass[s].sample ? on_device[device++] : on_host[host++]);
    }
    return absl::OkStatus();
  }

 private:
  CudaBackend(const ModelConfig& config, int device) : config_(config), device_(device) {}

  int64_t BlockHalves(int64_t block_seq_len) const {
    return 2 * config_.num_layers * block_seq_len * config_.kv_dim();
  }

  absl::Status SelectDevice() const {
    NIBBLE_CUDA_OR_RETURN(cudaSetDevice(device_), absl::StrCat("selecting CUDA device ", device_));
    return absl::OkStatus();
  }

  absl::Status Init(ModelWeights weights) {
    NIBBLE_RETURN_IF_ERROR(SelectDevice());
    NIBBLE_CUDA_OR_RETURN(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                          "creating a CUDA stream");
    NIBBLE_ASSIGN_OR_RETURN(cublas_api_, LoadCublas());
    if (cublasStatus_t s = cublas_api_->create(&cublas_); s != CUBLAS_STATUS_SUCCESS) {
      cublas_ = nullptr;
      return CublasError(*cublas_api_, s, "creating the cuBLAS handle");
    }
    if (cublasStatus_t s = cublas_api_->set_stream(cublas_, stream_); s != CUBLAS_STATUS_SUCCESS) {
      return CublasError(*cublas_api_, s, "cublasSetStream");
    }
    const bool tied = weights.lm_head == weights.embedding.table();
    if (!weights.lm_head->bias().empty()) {
      return absl::UnimplementedError("the CUDA backend has no lm_head bias (no supported "
                                      "architecture has one)");
    }
    {
      const LinearWeight& table = *weights.embedding.table();
      const std::vector<uint16_t> half = ToHalf(table.DequantizedWeight());
      NIBBLE_ASSIGN_OR_RETURN(embedding_, DeviceMemory::Upload(half.data(), half.size() * 2,
                                                               "the token embeddings"));
    }
    layers_.resize(static_cast<size_t>(config_.num_layers));
    for (int64_t l = 0; l < config_.num_layers; ++l) {
      LayerWeights& host = weights.layers[l];
      DeviceLayer& layer = layers_[l];
      const std::string name = absl::StrCat("layer ", l);
      NIBBLE_ASSIGN_OR_RETURN(layer.attention_norm, UploadHalf(host.attention_norm, name));
      NIBBLE_ASSIGN_OR_RETURN(layer.ffn_norm, UploadHalf(host.ffn_norm, name));
      layer.attention_norm_c = NormWeightFactor(host.attention_norm);
      layer.ffn_norm_c = NormWeightFactor(host.ffn_norm);
      NIBBLE_ASSIGN_OR_RETURN(layer.qkv, UploadGroup({host.q_proj.get(), host.k_proj.get(),
                                                      host.v_proj.get()},
                                                     name + " q/k/v"));
      NIBBLE_ASSIGN_OR_RETURN(layer.o, UploadStacked({host.o_proj.get()}, name + " o_proj"));
      NIBBLE_ASSIGN_OR_RETURN(layer.gate_up, UploadGroup({host.gate_proj.get(), host.up_proj.get()},
                                                         name + " gate/up"));
      NIBBLE_ASSIGN_OR_RETURN(layer.down, UploadStacked({host.down_proj.get()}, name + " down_proj"));
      host = LayerWeights();  // the host copy is no longer needed
    }
    NIBBLE_ASSIGN_OR_RETURN(final_norm_, UploadHalf(weights.final_norm, "the final norm"));
    int64_t largest_int4 = 0;
    for (const DeviceLayer& layer : layers_) {
      for (const auto* group : {&layer.qkv, &layer.gate_up}) {
        for (const DeviceLinear& linear : *group) {
          if (linear.int4) largest_int4 = std::max(largest_int4, linear.in * linear.out);
        }
      }
      for (const DeviceLinear* linear : {&layer.o, &layer.down}) {
        if (linear->int4) largest_int4 = std::max(largest_int4, linear->in * linear->out);
      }
    }
    if (tied && weights.lm_head->Int4() == std::nullopt) {
      tied_lm_head_ = true;  // the embedding table is lm_head's weight: one copy
    } else {
      NIBBLE_ASSIGN_OR_RETURN(lm_head_, UploadStacked({weights.lm_head.get()}, "lm_head"));
    }
    if (lm_head_.int4) largest_int4 = std::max(largest_int4, lm_head_.in * lm_head_.out);
    NIBBLE_ASSIGN_OR_RETURN(dequantized_, DeviceMemory::Allocate(largest_int4 * sizeof(uint16_t),
                                                                 "dequantizing 4-bit weights"));
    NIBBLE_ASSIGN_OR_RETURN(cublas_workspace_,
                            DeviceMemory::Allocate(kCublasWorkspaceBytes, "cuBLAS"));
    if (cublasStatus_t s = cublas_api_->set_workspace(cublas_, cublas_workspace_.as<void>(),
                                                      kCublasWorkspaceBytes);
        s != CUBLAS_STATUS_SUCCESS) {
      return CublasError(*cublas_api_, s, "cublasSetWorkspace");
    }
    // Switches for comparisons and debugging, on unless set to 0.
    const auto switched_on = [](const char* name) {
      const char* value = std::getenv(name);
      return value == nullptr || std::string(value) != "0";
    };
    // NIBBLE_CUDA_GRAPHS=0 runs every decode step eagerly.
    use_graphs_ = switched_on("NIBBLE_CUDA_GRAPHS");
    // The kernels of a pass (after its first norm: the decode products, norms, SiLU, RoPE and
    // decode attention) launch with programmatic dependent launch where the device has it
    // (sm_90, kernels/cuda/dependent_launch.h); NIBBLE_CUDA_PDL=0 launches them plainly.
    int major = 0;
    NIBBLE_CUDA_OR_RETURN(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_),
                          "reading the compute capability");
    dependent_launch_ = switched_on("NIBBLE_CUDA_PDL") && major >= 9;
    // The decode products (m <= 8) keep their weight loads in flight in a shared-memory ring
    // (kDecode8Ring); NIBBLE_CUDA_DECODE_RING=0 keeps them in registers (kDecode8), for
    // comparison.
    decode_ring_ = switched_on("NIBBLE_CUDA_DECODE_RING");
    // A pass of one token per sequence rotates q and k inside the decode attention kernel
    // (PagedDecodeAttentionWithRope: one kernel fewer a layer, the same bits);
    // NIBBLE_CUDA_ROPE_IN_ATTENTION=0 runs RoPE as its own kernel first, for comparison.
    rope_in_attention_ = switched_on("NIBBLE_CUDA_ROPE_IN_ATTENTION");
    // Decode attention's splits combine inside a thread block cluster where the planner takes
    // it (DecodeAttentionPlan::combine_in_cluster: sm_90, 2 to 16 splits, a grid of at most one
    // block per multiprocessor; no combine kernel, the same bits); NIBBLE_CUDA_CLUSTER_COMBINE=0
    // runs the combine kernel there too, for comparison.
    cluster_combine_ = switched_on("NIBBLE_CUDA_CLUSTER_COMBINE");
    // The split-k GEMM's partial sums of the o, gate/up and down products (batches of 9 to
    // kDequantizeRows - 1 tokens) are added up by the residual-add norm and SiLU·mul kernels
    // after them as they load them (kc::SplitSums), not by a reduce kernel of their own in
    // between (the same bits); NIBBLE_CUDA_FOLD_REDUCE=0 runs the reduce kernels, for
    // comparison.
    fold_reduce_ = switched_on("NIBBLE_CUDA_FOLD_REDUCE");
    // The decode step (batch <= 8) folds the norms, the residual adds and SiLU·mul into its
    // 4-bit products (kc::W4A16Fusion, Enqueue) where the kernels launch without PDL (before
    // sm_90: the Jetson Orin, the A100): there each of those kernels is a full launch gap. With
    // PDL they cost nothing on the H100 (their time already overlaps the next product's first
    // weight loads) and the fused step measured 1-2.5 % slower (tests/gpu/NOTES.md run 25).
    // NIBBLE_CUDA_FUSE=1 / 0 forces them on / off.
    const char* fuse = std::getenv("NIBBLE_CUDA_FUSE");
    fuse_ = fuse != nullptr ? std::string(fuse) != "0" : !dependent_launch_;
    // Every `sample` span's token is picked on the device by kernels/cuda/sampling.h
    // (tests/gpu/sampling_test.cc and gpu_engine_test, tests/gpu/RESULTS.md). With
    // NIBBLE_CUDA_DEVICE_SAMPLING=0, or a vocabulary past the kernel's limit, only plain greedy
    // spans stay on the device (ArgMaxRows) and the others take the host's rule over their
    // logits row.
    device_sampling_ = switched_on("NIBBLE_CUDA_DEVICE_SAMPLING") &&
                       config_.vocab_size <= kc::kSampleRowsMaxVocab;
    NIBBLE_CUDA_OR_RETURN(cudaDeviceSynchronize(), "uploading the weights");
    return absl::OkStatus();
  }

  static absl::StatusOr<DeviceMemory> UploadHalf(const std::vector<float>& values,
                                                 const std::string& name) {
    const std::vector<uint16_t> half = ToHalf(values);
    return DeviceMemory::Upload(half.data(), half.size() * 2, name + " norm");
  }

  // The power of two c that brings the largest |fp16(w)| into (0.5, 1] (1 for an all-zero or
  // non-finite weight): |x * w * c| <= |x| stays finite, and as large as that allows, away
  // from fp16's subnormal range (kc::W4A16Fusion).
  static float NormWeightFactor(const std::vector<float>& weight) {
    float largest = 0.0f;
    for (const uint16_t h : ToHalf(weight)) {
      largest = std::max(largest, std::fabs(kernels::cpu::HalfToFloat(h)));
    }
    if (!(largest > 0.0f) || !std::isfinite(largest)) return 1.0f;
    int e = 0;
    const float f = std::frexp(largest, &e);  // largest = f * 2^e, f in [0.5, 1)
    return std::ldexp(1.0f, f == 0.5f ? 1 - e : -e);  // 2^(e-1) exactly: c = 2^(1-e), w * c = 1
  }

  // Row-major y[m, out] = x[m, in] · W[out, in]ᵀ with cuBLAS (fp16 in, fp32 accumulation, y
  // fp16 or fp32): column-major yᵀ = W · xᵀ, W read transposed from its column-major
  // [in, out] view.
  absl::Status Gemm(const uint16_t* w, int64_t out, int64_t in, const uint16_t* x, int64_t m,
                    void* y, cudaDataType_t y_type, const char* what) {
    const float one = 1.0f, zero = 0.0f;
    const cublasStatus_t s = cublas_api_->gemm_ex(
        cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(m),
        static_cast<int>(in), &one, w, CUDA_R_16F, static_cast<int>(in), x, CUDA_R_16F,
        static_cast<int>(in), &zero, y, y_type, static_cast<int>(out), CUBLAS_COMPUTE_32F,
        CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) return CublasError(*cublas_api_, s, what);
    return absl::OkStatus();
  }

  // The W4A16 kernel for m (< kDequantizeRows) tokens: kAuto's choice with the dequantize
  // scratch as the split-k workspace, and its decode8 (the ring) with programmatic dependent
  // launch: it starts, and loads its first weights, while the norm, attention or SiLU before it
  // ends (those allow it: kernels/cuda/dependent_launch.h). dependent_launch_ is off before
  // sm_90; decode_ring_ off (for comparison) keeps the chunks in flight in registers.
  kc::W4A16Kernel DecodeKernel(const DeviceLinear& linear, int64_t m) const {
    const kc::W4A16Kernel kernel =
        kc::ChooseW4A16Kernel(linear.layout, m, dequantized_.as<void>() != nullptr);
    if (kernel != kc::W4A16Kernel::kDecode8Ring) return kernel;
    if (decode_ring_) {
      return dependent_launch_ ? kc::W4A16Kernel::kDecode8RingPdl : kc::W4A16Kernel::kDecode8Ring;
    }
    return dependent_launch_ ? kc::W4A16Kernel::kDecode8Pdl : kc::W4A16Kernel::kDecode8;
  }

  // Whether `linear` at m tokens runs on the decode ring kernel, the one that takes the fusions
  // (kc::W4A16Fusion): the decode step's products at batch <= 8, where fuse_ (Init).
  bool Fusable(const DeviceLinear& linear, int64_t m) const {
    if (!fuse_ || !linear.int4 || m >= kDequantizeRows) return false;
    const kc::W4A16Kernel kernel = DecodeKernel(linear, m);
    return kernel == kc::W4A16Kernel::kDecode8Ring || kernel == kc::W4A16Kernel::kDecode8RingPdl;
  }
  bool Fusable(const std::vector<DeviceLinear>& group, int64_t m) const {
    return std::all_of(group.begin(), group.end(),
                       [&](const DeviceLinear& linear) { return Fusable(linear, m); });
  }

  // y[m, out] = x[m, in] · Wᵀ (+ bias). A 4-bit weight goes through the W4A16 kernels while
  // m is small (decode kernels, then the tensor-core GEMM reading the weight once per 16 or 32
  // tokens); from kDequantizeRows tokens on it is dequantized to fp16 scratch and multiplied by
  // cuBLAS, whose wgmma tiles outrun mma.sync there.
  // unreduced (not with fusion): where the W4A16 GEMM splits k and fold_reduce_, y is left
  // unwritten and *unreduced describes the partial sums (in dequantized_) for the caller's next
  // kernel to add up; elsewhere unreduced->splits = 0 and y is written.
  absl::Status RunLinear(const DeviceLinear& linear, const uint16_t* x, int64_t m, uint16_t* y,
                         const kc::W4A16Fusion* fusion = nullptr,
                         kc::SplitSums* unreduced = nullptr) {
    if (unreduced != nullptr) *unreduced = kc::SplitSums{};
    if (fusion != nullptr) {  // the caller checked Fusable(linear, m)
      NIBBLE_CUDA_OR_RETURN(kc::MatMulW4A16Fused(linear.layout, x, linear.qw.as<uint32_t>(),
                                                 linear.zs.as<uint32_t>(), linear.bias.as<float>(),
                                                 y, m, stream_, DecodeKernel(linear, m), *fusion),
                            "the fused W4A16 matrix multiply");
      return absl::OkStatus();
    }
    if (linear.int4 && m < kDequantizeRows) {
      // The dequantize scratch (idle on this path) is the kernels' split-k workspace.
      NIBBLE_CUDA_OR_RETURN(kc::MatMulW4A16(linear.layout, x, linear.qw.as<uint32_t>(),
                                            linear.zs.as<uint32_t>(), linear.bias.as<float>(), y,
                                            m, stream_, DecodeKernel(linear, m),
                                            dequantized_.as<void>(), dequantized_.bytes(),
                                            fold_reduce_ ? unreduced : nullptr),
                            "the W4A16 matrix multiply");
      return absl::OkStatus();
    }
    const uint16_t* weight = linear.weight.as<uint16_t>();
    if (linear.int4) {
      NIBBLE_CUDA_OR_RETURN(kc::DequantizeW4A16(linear.layout, linear.qw.as<uint32_t>(),
                                                linear.zs.as<uint32_t>(),
                                                dequantized_.as<uint16_t>(), stream_),
                            "dequantizing a 4-bit weight");
      weight = dequantized_.as<uint16_t>();
    }
    NIBBLE_RETURN_IF_ERROR(Gemm(weight, linear.out, linear.in, x, m, y, CUDA_R_16F,
                                "the fp16 matrix multiply"));
    if (linear.bias.bytes() > 0) {
      NIBBLE_CUDA_OR_RETURN(kc::AddBias(y, linear.out, linear.bias.as<float>(), m, linear.out,
                                        stream_),
                            "the bias add");
    }
    return absl::OkStatus();
  }

  // Runs `group` (stacked or separate linears) on x[m, in], writing the parts one after
  // another into y: stacked, y is [m, Σ out] with each part a column range (row stride Σ out);
  // separate, part p is its own [m, out_p] matrix at y + m * Σ_{q<p} out_q (row stride out_p).
  // Returns each part's pointer and row stride through `parts` (which has the group's parts).
  struct Part {
    uint16_t* data;
    int64_t stride;
  };
  absl::Status RunGroup(const std::vector<DeviceLinear>& group, const int64_t* part_out,
                        size_t num_parts, const uint16_t* x, int64_t m, uint16_t* y,
                        Part* parts, const kc::W4A16Fusion* fusion = nullptr) {
    if (group.size() == 1) {
      NIBBLE_RETURN_IF_ERROR(RunLinear(group[0], x, m, y, fusion));
      int64_t column = 0;
      for (size_t p = 0; p < num_parts; ++p) {
        parts[p] = {y + column, group[0].out};
        column += part_out[p];
      }
      return absl::OkStatus();
    }
    uint16_t* at = y;
    for (size_t p = 0; p < num_parts; ++p) {
      NIBBLE_RETURN_IF_ERROR(RunLinear(group[p], x, m, at, fusion));
      parts[p] = {at, group[p].out};
      at += m * group[p].out;
    }
    return absl::OkStatus();
  }

  // The folded norms' partial sums per token: one per 16 features of the hidden size (the o and
  // down products' output tiles).
  int64_t SumsqParts() const { return (config_.hidden_size + 15) / 16; }

  absl::Status ReserveScratch(int64_t n, int64_t logit_rows) {
    const int64_t hidden = config_.hidden_size, q_dim = config_.q_dim(), kv_dim = config_.kv_dim();
    const int64_t ffn = config_.intermediate_size;
    const int64_t r = std::max<int64_t>(logit_rows, 1);
    const size_t h = sizeof(uint16_t);
    uint64_t* gen = &scratch_generation_;
    NIBBLE_RETURN_IF_ERROR(x_.Reserve(n * hidden * h, "activations", gen));
    NIBBLE_RETURN_IF_ERROR(normed_.Reserve(n * hidden * h, "activations", gen));
    NIBBLE_RETURN_IF_ERROR(qkv_.Reserve(n * (q_dim + 2 * kv_dim) * h, "activations", gen));
    NIBBLE_RETURN_IF_ERROR(q_.Reserve(n * q_dim * h, "activations", gen));
    NIBBLE_RETURN_IF_ERROR(attention_.Reserve(n * q_dim * h, "activations", gen));
    NIBBLE_RETURN_IF_ERROR(projected_.Reserve(n * hidden * h, "activations", gen));
    NIBBLE_RETURN_IF_ERROR(gate_up_.Reserve(n * 2 * ffn * h, "activations", gen));
    NIBBLE_RETURN_IF_ERROR(act_.Reserve(n * ffn * h, "activations", gen));
    NIBBLE_RETURN_IF_ERROR(sumsq_.Reserve(2 * n * SumsqParts() * sizeof(float), "activations", gen));
    NIBBLE_RETURN_IF_ERROR(last_.Reserve(r * hidden * h, "activations", gen));
    NIBBLE_RETURN_IF_ERROR(logits16_.Reserve(r * config_.vocab_size * h, "logits", gen));
    NIBBLE_RETURN_IF_ERROR(logits32_.Reserve(r * config_.vocab_size * sizeof(float), "logits", gen));
    NIBBLE_RETURN_IF_ERROR(sampled_.Reserve(r * sizeof(int32_t), "sampled ids", gen));
    return absl::OkStatus();
  }

  // Where a pass's metadata lies in meta_ (device), in the order the host writes it.
  struct PassMeta {
    const int32_t* ids;
    const int32_t* positions;
    const int32_t* freq_index;
    const int32_t* slots;
    const int32_t* lengths;
    const int32_t* tables;  // [n, table_stride]
    const int32_t* logit_rows;
    kc::PrefillSpanTable prefill;  // prefill passes: the spans (tables: one per span)
    int64_t prefill_spans = 0;
    const float* inv_freq;  // [spans, head_dim / 2]
    // The sampled rows' (the last of the logit rows): parameters, and their penalty ids
    // penalty_ids[penalty_offsets[i] .. penalty_offsets[i + 1]).
    const kernels::SampleRowParams* sample_params;
    const int32_t* penalty_offsets;
    const int32_t* penalty_ids;
  };

  struct AttentionPlans {
    bool prefill = false;
    kc::DecodeAttentionPlan decode;
    kc::PrefillAttentionPlan prefill_plan;
  };

  // The forward pass of validated spans: all their tokens as one [n, hidden] activation.
  //
  // A decode pass of the serving pool (one token per span, logits for each) replays a CUDA
  // graph captured for its (batch size, block-table width) on first use: the per-token data
  // lives in device memory the graph reads, so one launch replaces the ~10 per layer whose
  // CPU cost would otherwise dominate a small batch's step. Block tables are padded to a
  // power-of-two width (and attention planned for that many blocks) so few graphs serve all
  // lengths.
  absl::Status Run(std::span<const PassSpan> spans, const KvTarget& kv, std::vector<float>& logits,
                   std::vector<int32_t>& sampled_out) {
    NIBBLE_RETURN_IF_ERROR(SelectDevice());
    const int64_t d = config_.head_dim;
    int64_t n = 0, max_len = 0, max_blocks = 1;
    bool decode_step = kv.base == pool_.as<uint16_t>();
    for (const PassSpan& span : spans) {
      n += static_cast<int64_t>(span.tokens.size());
      const int64_t end = span.start + static_cast<int64_t>(span.tokens.size());
      max_len = std::max(max_len, end);
      max_blocks = std::max(max_blocks, (end + kv.block_seq_len - 1) / kv.block_seq_len);
      decode_step = decode_step && span.tokens.size() == 1 && span.logits != PassSpan::Logits::kNone;
    }
    int64_t table_stride = max_blocks;
    if (decode_step) {
      table_stride = 4;
      while (table_stride < max_blocks) table_stride *= 2;
    }
    // A pass with any span of several tokens (a prompt or a prefill chunk) runs the prefill
    // attention kernel over all its spans (one block table per span); a pass of one token per
    // span, the split-K decode kernel (one block table per token: it takes each as its own
    // sequence).
    bool prefill = false;
    for (const PassSpan& span : spans) prefill = prefill || span.tokens.size() > 1;
    const int64_t table_rows = prefill ? static_cast<int64_t>(spans.size()) : n;

    // Per-token metadata, built on the host and copied in one transfer: ids, positions, the
    // span's RoPE row, the cache slot, the attention length (the token sees positions
    // 0 .. its own), the block table (each token its span's: attention takes one per row),
    // then the logit rows; the spans' inverse frequencies follow as floats; then, 8-byte
    // aligned, the sampled rows' parameters, their penalty offsets and ids.
    // Rows whose logits go to the host first, then those sampled on the device.
    std::vector<int32_t> logit_rows, sampled_rows;
    sample_params_.clear();
    penalty_offsets_.assign(1, 0);
    penalty_ids_.clear();
    ids_.resize(n);
    positions_.resize(n);
    freq_index_.resize(n);
    slots_.resize(n);
    lengths_.resize(n);
    tables_.assign(static_cast<size_t>(table_rows * table_stride), 0);
    span_first_row_.clear();
    span_start_.clear();
    span_tokens_.clear();
    inv_freq_.clear();
    for (size_t s = 0, row = 0; s < spans.size(); ++s) {
      const PassSpan& span = spans[s];
      const int64_t tokens = static_cast<int64_t>(span.tokens.size());
      const int64_t blocks = (span.start + tokens + kv.block_seq_len - 1) / kv.block_seq_len;
      if (prefill) {
        span_first_row_.push_back(static_cast<int32_t>(row));
        span_start_.push_back(static_cast<int32_t>(span.start));
        span_tokens_.push_back(static_cast<int32_t>(tokens));
        std::copy_n(span.block_table.data(), blocks, tables_.data() + s * table_stride);
      }
      for (int64_t t = 0; t < tokens; ++t, ++row) {
        const int64_t position = span.start + t;
        ids_[row] = span.tokens[t];
        positions_[row] = static_cast<int32_t>(position);
        freq_index_[row] = static_cast<int32_t>(s);
        slots_[row] = static_cast<int32_t>(span.block_table[position / kv.block_seq_len] *
                                               kv.block_seq_len +
                                           position % kv.block_seq_len);
        lengths_[row] = static_cast<int32_t>(position + 1);
        if (!prefill) std::copy_n(span.block_table.data(), blocks, tables_.data() + row * table_stride);
        if (span.logits == PassSpan::Logits::kAll ||
            (span.logits == PassSpan::Logits::kLast && t == tokens - 1)) {
          if (span.sample) {
            sampled_rows.push_back(static_cast<int32_t>(row));
            sample_params_.push_back(span.sampling);
            penalty_ids_.insert(penalty_ids_.end(), span.penalty_ids.begin(), span.penalty_ids.end());
            penalty_offsets_.push_back(static_cast<int32_t>(penalty_ids_.size()));
          } else {
            logit_rows.push_back(static_cast<int32_t>(row));
          }
        }
      }
      const std::vector<float> inv_freq = RopeInverseFrequenciesForLength(config_, span.start + tokens);
      inv_freq_.insert(inv_freq_.end(), inv_freq.begin(), inv_freq.end());
    }
    const int64_t sampled_count = static_cast<int64_t>(sampled_rows.size());
    logit_rows.insert(logit_rows.end(), sampled_rows.begin(), sampled_rows.end());
    const int64_t r = static_cast<int64_t>(logit_rows.size());
    NIBBLE_RETURN_IF_ERROR(ReserveScratch(n, r));

    const size_t ints = static_cast<size_t>(5 * n + table_rows * table_stride + r) +
                        3 * span_first_row_.size();
    const size_t sample_at = (ints * sizeof(int32_t) + inv_freq_.size() * sizeof(float) + 7) / 8 * 8;
    const size_t meta_bytes = sample_at + sample_params_.size() * sizeof(kernels::SampleRowParams) +
                              (penalty_offsets_.size() + penalty_ids_.size()) * sizeof(int32_t);
    NIBBLE_RETURN_IF_ERROR(host_meta_.Reserve(meta_bytes));
    NIBBLE_RETURN_IF_ERROR(meta_.Reserve(meta_bytes, "step metadata", &scratch_generation_));
    int32_t* at = reinterpret_cast<int32_t*>(host_meta_.data());
    for (const std::vector<int32_t>* v : {&ids_, &positions_, &freq_index_, &slots_, &lengths_,
                                          &tables_, &logit_rows, &span_first_row_, &span_start_,
                                          &span_tokens_}) {
      at = std::copy(v->begin(), v->end(), at);
    }
    std::copy(inv_freq_.begin(), inv_freq_.end(), reinterpret_cast<float*>(at));
    auto* params_at = reinterpret_cast<kernels::SampleRowParams*>(host_meta_.data() + sample_at);
    at = reinterpret_cast<int32_t*>(std::copy(sample_params_.begin(), sample_params_.end(), params_at));
    at = std::copy(penalty_offsets_.begin(), penalty_offsets_.end(), at);
    std::copy(penalty_ids_.begin(), penalty_ids_.end(), at);
    PassMeta meta;
    meta.ids = meta_.as<int32_t>();
    meta.positions = meta.ids + n;
    meta.freq_index = meta.positions + n;
    meta.slots = meta.freq_index + n;
    meta.lengths = meta.slots + n;
    meta.tables = meta.lengths + n;
    meta.logit_rows = meta.tables + table_rows * table_stride;
    const int64_t prefill_spans = static_cast<int64_t>(span_first_row_.size());
    meta.prefill.first_row = meta.logit_rows + r;
    meta.prefill.start = meta.prefill.first_row + prefill_spans;
    meta.prefill.tokens = meta.prefill.start + prefill_spans;
    meta.prefill.block_tables = meta.tables;
    meta.prefill.block_table_stride = table_stride;
    meta.prefill_spans = prefill_spans;
    meta.inv_freq = reinterpret_cast<const float*>(meta.prefill.tokens + prefill_spans);
    // At an offset fixed by the pass's shape (the graph key), whatever the parameters and the
    // number of penalty ids: a captured graph reads each step's values there.
    meta.sample_params = reinterpret_cast<const kernels::SampleRowParams*>(meta_.as<char>() + sample_at);
    meta.penalty_offsets = reinterpret_cast<const int32_t*>(meta.sample_params + sampled_count);
    meta.penalty_ids = meta.penalty_offsets + sampled_count + 1;

    AttentionPlans plan;
    plan.prefill = prefill;
    if (prefill) {
      NIBBLE_CUDA_OR_RETURN(
          kc::PlanPagedPrefillAttention({config_.num_heads, config_.num_kv_heads, d}, n,
                                        prefill_spans, &plan.prefill_plan),
          "planning prefill attention");
    } else {
      NIBBLE_CUDA_OR_RETURN(
          kc::PlanPagedDecodeAttention({config_.num_heads, config_.num_kv_heads, d}, n,
                                       decode_step ? table_stride * kv.block_seq_len : max_len,
                                       &plan.decode),
          "planning attention");
      plan.decode.dependent_launch = dependent_launch_;
      plan.decode.combine_in_cluster = plan.decode.combine_in_cluster && cluster_combine_;
    }
    NIBBLE_RETURN_IF_ERROR(workspace_.Reserve(std::max<int64_t>(plan.decode.workspace_bytes, 16),
                                              "the attention workspace", &scratch_generation_));
    if (scratch_generation_ != graphs_generation_) {  // some buffer moved: every graph is stale
      graphs_.clear();
      graphs_generation_ = scratch_generation_;
    }
    NIBBLE_CUDA_OR_RETURN(cudaMemcpyAsync(meta_.as<char>(), host_meta_.data(), meta_bytes,
                                          cudaMemcpyHostToDevice, stream_),
                          "copying the step's metadata");

    if (decode_step && use_graphs_) {
      const std::tuple<int64_t, int64_t, int64_t> key(n, table_stride, sampled_count);
      auto found = graphs_.find(key);
      if (found == graphs_.end()) {
        if (graphs_.size() >= kMaxGraphs) graphs_.clear();
        NIBBLE_ASSIGN_OR_RETURN(std::unique_ptr<GraphExec> exec,
                                Capture(n, r, sampled_count, table_stride, plan, kv, meta));
        found = graphs_.emplace(key, std::move(exec)).first;
      }
      NIBBLE_CUDA_OR_RETURN(cudaGraphLaunch(found->second->get(), stream_), "the decode step's graph");
    } else {
      NIBBLE_RETURN_IF_ERROR(Enqueue(n, r, sampled_count, table_stride, plan, kv, meta));
    }
    logits.resize(static_cast<size_t>((r - sampled_count) * config_.vocab_size));
    if (!logits.empty()) {
      NIBBLE_CUDA_OR_RETURN(cudaMemcpyAsync(logits.data(), logits32_.as<float>(),
                                            logits.size() * sizeof(float), cudaMemcpyDeviceToHost,
                                            stream_),
                            "copying the logits");
    }
    sampled_out.resize(static_cast<size_t>(sampled_count));
    if (sampled_count > 0) {
      NIBBLE_CUDA_OR_RETURN(cudaMemcpyAsync(sampled_out.data(), sampled_.as<int32_t>(),
                                            sampled_count * sizeof(int32_t),
                                            cudaMemcpyDeviceToHost, stream_),
                            "copying the sampled ids");
    }
    NIBBLE_CUDA_OR_RETURN(cudaStreamSynchronize(stream_), "the forward pass");
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<GraphExec>> Capture(int64_t n, int64_t r, int64_t sampled_count,
                                                     int64_t table_stride,
                                                     const AttentionPlans& plan,
                                                     const KvTarget& kv, const PassMeta& meta) {
    NIBBLE_CUDA_OR_RETURN(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
                          "capturing the decode step");
    const absl::Status enqueued = Enqueue(n, r, sampled_count, table_stride, plan, kv, meta);
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    if (!enqueued.ok()) {
      if (graph != nullptr) cudaGraphDestroy(graph);
      return enqueued;
    }
    NIBBLE_CUDA_OR_RETURN(ended, "capturing the decode step");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t instantiated = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    NIBBLE_CUDA_OR_RETURN(instantiated, "instantiating the decode step's graph");
    return std::make_unique<GraphExec>(exec);
  }

  // Every kernel of one pass, on stream_, from the token ids in `meta` to fp32 logits in
  // logits32_ (no host synchronization: capturable).
  absl::Status Enqueue(int64_t n, int64_t r, int64_t sampled_count, int64_t table_stride,
                       const AttentionPlans& plan, const KvTarget& kv, const PassMeta& meta) {
    const int64_t hidden = config_.hidden_size, q_dim = config_.q_dim(), kv_dim = config_.kv_dim();
    const int64_t ffn = config_.intermediate_size, d = config_.head_dim;
    const float eps = static_cast<float>(config_.rms_norm_eps);
    uint16_t* x = x_.as<uint16_t>();
    uint16_t* normed = normed_.as<uint16_t>();
    uint16_t* projected = projected_.as<uint16_t>();
    // x += the o or down product's output (its split sums where RunLinear left them, else
    // `projected`), then normed = RmsNorm(x) with `weight`.
    const auto add_norm = [&](const kc::SplitSums& sums, const uint16_t* weight) {
      return sums.splits > 0
                 ? kc::AddRmsNorm(x, sums, weight, n, hidden, eps, normed, stream_, dependent_launch_)
                 : kc::AddRmsNorm(x, projected, weight, n, hidden, eps, normed, stream_,
                                  dependent_launch_);
    };
    NIBBLE_CUDA_OR_RETURN(kc::Embedding(embedding_.as<uint16_t>(), config_.vocab_size, hidden,
                                        meta.ids, n, x, stream_),
                          "the embedding lookup");
    NIBBLE_CUDA_OR_RETURN(kc::RmsNorm(x, layers_[0].attention_norm.as<uint16_t>(), n, hidden,
                                      eps, normed, stream_),
                          "the attention norm");
    const int64_t qkv_out[3] = {q_dim, kv_dim, kv_dim};
    const int64_t gate_up_out[2] = {ffn, ffn};
    // The decode step's fusions (Fusable: 4-bit products on the ring kernel, batch <= 8): the
    // residual add and the next norm in the o and down products' epilogues, which leave in
    // `normed` the folded form fp16(x * w * c) and in sumsq_ its sums of squares; the q/k/v
    // and gate/up products apply the norm's per-token scale to their sums; gate/up (stacked)
    // writes silu(gate) * up. Where a product cannot take its part, that part runs as a kernel
    // of its own, as in every other pass.
    const int64_t parts = SumsqParts();
    float* ffn_sumsq = sumsq_.as<float>();           // written by o, read by gate/up
    float* attention_sumsq = ffn_sumsq + n * parts;  // written by down, read by the next q/k/v
    bool attention_folded = false;  // `normed` holds the attention norm in the folded form
    // One token per sequence: RoPE inside the decode attention kernel (rope_in_attention_).
    const bool rope_in_attention = rope_in_attention_ && !plan.prefill;
    const auto folded_input = [&](const float* sumsq, float c) {
      kc::W4A16Fusion fusion;
      fusion.x_sumsq = sumsq;
      fusion.x_sumsq_parts = parts;
      fusion.x_eps = eps;
      fusion.x_norm_c = c;
      return fusion;
    };
    const auto residual_output = [&](const DeviceMemory& norm, float c, float* sumsq) {
      kc::W4A16Fusion fusion;
      fusion.norm_weight = norm.as<uint16_t>();
      fusion.norm_c = c;
      fusion.normed = normed;
      fusion.sumsq = sumsq;
      return fusion;
    };
    for (int64_t l = 0; l < config_.num_layers; ++l) {
      const DeviceLayer& layer = layers_[l];
      Part qkv[3];
      const kc::W4A16Fusion qkv_fusion = folded_input(attention_sumsq, layer.attention_norm_c);
      NIBBLE_RETURN_IF_ERROR(RunGroup(layer.qkv, qkv_out, 3, normed, n, qkv_.as<uint16_t>(), qkv,
                                      attention_folded ? &qkv_fusion : nullptr));
      uint16_t* keys = kv.base + 2 * l * kv.block_seq_len * kv_dim;
      uint16_t* values = keys + kv.block_seq_len * kv_dim;
      const kc::PagedKvView view{keys, values, kv.block_stride,
                                 static_cast<int32_t>(kv.block_seq_len)};
      if (rope_in_attention) {
        kc::DecodeRopeInput rope;
        rope.q = qkv[0].data;
        rope.q_stride = qkv[0].stride;
        rope.k = qkv[1].data;
        rope.k_stride = qkv[1].stride;
        rope.v = qkv[2].data;
        rope.v_stride = qkv[2].stride;
        rope.positions = meta.positions;
        rope.inv_freq = meta.inv_freq;
        rope.freq_index = meta.freq_index;
        rope.slots = meta.slots;
        rope.keys = keys;
        rope.values = values;
        NIBBLE_CUDA_OR_RETURN(kc::PagedDecodeAttentionWithRope(
                                  plan.decode, rope, view, meta.tables, table_stride,
                                  meta.lengths, n, workspace_.as<void>(),
                                  attention_.as<uint16_t>(), stream_),
                              "RoPE and attention");
      } else {
        // RoPE on q in place; the rotated keys and the values straight into the paged cache.
        const kc::RopeKvStore store{qkv[2].data, qkv[2].stride,   meta.slots,
                                    keys,        values,          kv.block_stride,
                                    static_cast<int32_t>(kv.block_seq_len)};
        NIBBLE_CUDA_OR_RETURN(kc::RopeRotateHalf(qkv[0].data, qkv[0].stride, config_.num_heads,
                                                 qkv[1].data, qkv[1].stride, config_.num_kv_heads,
                                                 d, n, meta.positions, meta.inv_freq,
                                                 meta.freq_index, stream_, &store,
                                                 dependent_launch_),
                              "RoPE and storing keys and values");
        const uint16_t* q = qkv[0].data;
        // Attention reads q as [n, heads, head_dim] contiguous: the stacked q/k/v output's q
        // rows are gathered, except for one row (a batch-1 decode step), which is that already.
        if (qkv[0].stride != q_dim && n > 1) {
          NIBBLE_CUDA_OR_RETURN(cudaMemcpy2DAsync(q_.as<uint16_t>(), q_dim * 2, qkv[0].data,
                                                  qkv[0].stride * 2, q_dim * 2, n,
                                                  cudaMemcpyDeviceToDevice, stream_),
                                "gathering q");
          q = q_.as<uint16_t>();
        }
        if (plan.prefill) {
          NIBBLE_CUDA_OR_RETURN(kc::PagedPrefillAttention(plan.prefill_plan, q, view, meta.prefill,
                                                          meta.prefill_spans,
                                                          attention_.as<uint16_t>(), stream_),
                                "prefill attention");
        } else {
          NIBBLE_CUDA_OR_RETURN(kc::PagedDecodeAttention(plan.decode, q, view, meta.tables,
                                                         table_stride, meta.lengths, n,
                                                         workspace_.as<void>(),
                                                         attention_.as<uint16_t>(), stream_),
                                "attention");
        }
      }
      const bool ffn_folded = Fusable(layer.o, n) && Fusable(layer.gate_up, n);
      if (ffn_folded) {
        const kc::W4A16Fusion fusion = residual_output(layer.ffn_norm, layer.ffn_norm_c, ffn_sumsq);
        NIBBLE_RETURN_IF_ERROR(RunLinear(layer.o, attention_.as<uint16_t>(), n, x, &fusion));
      } else {
        kc::SplitSums o_sums;
        NIBBLE_RETURN_IF_ERROR(
            RunLinear(layer.o, attention_.as<uint16_t>(), n, projected, nullptr, &o_sums));
        NIBBLE_CUDA_OR_RETURN(add_norm(o_sums, layer.ffn_norm.as<uint16_t>()),
                              "the residual add and FFN norm");
      }
      kc::W4A16Fusion gate_up_fusion;
      if (ffn_folded) gate_up_fusion = folded_input(ffn_sumsq, layer.ffn_norm_c);
      // Gated (silu(gate) * up written by the product) where the stacked weight allows it, as
      // the kernels' own check says.
      kc::W4A16Fusion gated = gate_up_fusion;
      gated.gated = true;
      if (Fusable(layer.gate_up, n) && layer.gate_up.size() == 1 &&
          kc::CheckW4A16Fusion(layer.gate_up[0].layout, gated) == nullptr) {
        NIBBLE_RETURN_IF_ERROR(RunLinear(layer.gate_up[0], normed, n, act_.as<uint16_t>(), &gated));
      } else if (layer.gate_up.size() == 1 && !ffn_folded) {  // stacked [gate | up]
        kc::SplitSums sums;
        NIBBLE_RETURN_IF_ERROR(RunLinear(layer.gate_up[0], normed, n, gate_up_.as<uint16_t>(),
                                         nullptr, &sums));
        const uint16_t* gate = gate_up_.as<uint16_t>();
        NIBBLE_CUDA_OR_RETURN(
            sums.splits > 0
                ? kc::SiluMul(sums, sums.Columns(ffn), n, ffn, act_.as<uint16_t>(), ffn, stream_,
                              dependent_launch_)
                : kc::SiluMul(gate, 2 * ffn, gate + ffn, 2 * ffn, n, ffn, act_.as<uint16_t>(),
                              ffn, stream_, dependent_launch_),
            "SiLU(gate) * up");
      } else {
        Part gate_up[2];
        NIBBLE_RETURN_IF_ERROR(RunGroup(layer.gate_up, gate_up_out, 2, normed, n,
                                        gate_up_.as<uint16_t>(), gate_up,
                                        ffn_folded ? &gate_up_fusion : nullptr));
        NIBBLE_CUDA_OR_RETURN(kc::SiluMul(gate_up[0].data, gate_up[0].stride, gate_up[1].data,
                                          gate_up[1].stride, n, ffn, act_.as<uint16_t>(), ffn,
                                          stream_, dependent_launch_),
                              "SiLU(gate) * up");
      }
      // The last layer's down keeps the plain epilogue: lm_head (cuBLAS) reads the final norm.
      const bool last = l + 1 == config_.num_layers;
      attention_folded = !last && Fusable(layer.down, n) && Fusable(layers_[l + 1].qkv, n);
      if (attention_folded) {
        const DeviceLayer& next = layers_[l + 1];
        const kc::W4A16Fusion fusion =
            residual_output(next.attention_norm, next.attention_norm_c, attention_sumsq);
        NIBBLE_RETURN_IF_ERROR(RunLinear(layer.down, act_.as<uint16_t>(), n, x, &fusion));
      } else {
        kc::SplitSums down_sums;
        NIBBLE_RETURN_IF_ERROR(
            RunLinear(layer.down, act_.as<uint16_t>(), n, projected, nullptr, &down_sums));
        const uint16_t* next_norm =
            last ? final_norm_.as<uint16_t>() : layers_[l + 1].attention_norm.as<uint16_t>();
        NIBBLE_CUDA_OR_RETURN(add_norm(down_sums, next_norm), "the residual add and norm");
      }
    }
    if (r == 0) return absl::OkStatus();
    // The logit rows of the final-normed activations, gathered (an embedding lookup into
    // them), then lm_head.
    NIBBLE_CUDA_OR_RETURN(kc::Embedding(normed, n, hidden, meta.logit_rows, r,
                                        last_.as<uint16_t>(), stream_),
                          "gathering the logit rows");
    float* logits32 = logits32_.as<float>();
    if (tied_lm_head_ || !lm_head_.int4) {
      const uint16_t* w = tied_lm_head_ ? embedding_.as<uint16_t>() : lm_head_.weight.as<uint16_t>();
      NIBBLE_RETURN_IF_ERROR(Gemm(w, config_.vocab_size, hidden, last_.as<uint16_t>(), r, logits32,
                                  CUDA_R_32F, "lm_head"));
    } else {
      NIBBLE_RETURN_IF_ERROR(RunLinear(lm_head_, last_.as<uint16_t>(), r, logits16_.as<uint16_t>()));
      NIBBLE_CUDA_OR_RETURN(kc::HalfToFloat(logits16_.as<uint16_t>(), r * config_.vocab_size,
                                            logits32, stream_),
                            "widening the logits");
    }
    if (sampled_count > 0) {  // the last sampled_count rows: only their token leaves the device
      const int64_t vocab = config_.vocab_size;
      float* rows = logits32 + (r - sampled_count) * vocab;
      if (device_sampling_) {
        NIBBLE_CUDA_OR_RETURN(kc::SampleRows(rows, sampled_count, vocab, vocab, meta.sample_params,
                                             meta.penalty_offsets, meta.penalty_ids,
                                             sampled_.as<int32_t>(), stream_),
                              "sampling on the device");
      } else {  // only plain greedy spans are picked here (ForwardBatch)
        NIBBLE_CUDA_OR_RETURN(kc::ArgMaxRows(rows, sampled_count, vocab, vocab,
                                             sampled_.as<int32_t>(), stream_),
                              "greedy argmax");
      }
    }
    return absl::OkStatus();
  }

  ModelConfig config_;
  int device_;
  cudaStream_t stream_ = nullptr;
  const CublasApi* cublas_api_ = nullptr;
  cublasHandle_t cublas_ = nullptr;

  DeviceMemory embedding_;  // fp16 [vocab, hidden]
  std::vector<DeviceLayer> layers_;
  DeviceMemory final_norm_;
  DeviceLinear lm_head_;
  bool tied_lm_head_ = false;

  DeviceMemory pool_;
  int64_t pool_blocks_ = 0;
  int64_t usable_blocks_ = 0;
  int64_t block_seq_len_ = 0;

  // Up to 256 tokens the W4A16 kernels (the split tensor-core GEMM from 16-33 tokens on) beat
  // dequantize + cuBLAS on the H100 (at 256 within +-13 %, at 1024 2-3x slower: NOTES.md run 13).
  static constexpr int64_t kDequantizeRows = 257;
  static constexpr size_t kMaxGraphs = 512;
  static constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

  DeviceMemory dequantized_;        // fp16 scratch as large as the largest 4-bit weight
  DeviceMemory cublas_workspace_;   // cuBLAS's, set once: no allocation inside a graph capture

  // Per-pass scratch, grown to the largest pass seen.
  GrowingDeviceBuffer x_, normed_, qkv_, q_, attention_, projected_, gate_up_, act_, last_,
      logits16_, logits32_, sampled_, meta_, workspace_;
  // The folded norms' partial sums of squares (kc::W4A16Fusion): [2][n][SumsqParts()] fp32, one
  // half written by the o product (read by gate/up), the other by down (read by the next q/k/v).
  GrowingDeviceBuffer sumsq_;
  uint64_t scratch_generation_ = 0;  // bumped whenever a scratch buffer moves
  uint64_t graphs_generation_ = 0;   // the generation the graphs were captured in
  bool use_graphs_ = true;
  bool device_sampling_ = false;  // every `sample` span on the device (Init)
  bool dependent_launch_ = false;  // a pass's kernels with PDL (Init)
  bool decode_ring_ = true;        // the decode products' shared-memory ring (Init)
  bool fuse_ = false;              // the decode step's fusions (Init, Fusable)
  bool rope_in_attention_ = true;  // RoPE folded into decode attention (Init)
  bool cluster_combine_ = true;    // decode attention's splits combined in a cluster (Init)
  bool fold_reduce_ = true;        // split-k sums added up by the kernel after the product (Init)
  // Decode-step graphs by (batch size, block-table width, spans sampled on the device).
  std::map<std::tuple<int64_t, int64_t, int64_t>, std::unique_ptr<GraphExec>> graphs_;
  PinnedBuffer host_meta_;
  std::vector<int32_t> ids_, positions_, freq_index_, slots_, lengths_, tables_;
  std::vector<int32_t> span_first_row_, span_start_, span_tokens_;  // prefill passes
  std::vector<float> inv_freq_;
  std::vector<kernels::SampleRowParams> sample_params_;  // the sampled rows'
  std::vector<int32_t> penalty_offsets_, penalty_ids_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const ModelConfig& config,
                                                         ModelWeights weights, int device) {
  return CudaBackend::Make(config, std::move(weights), device);
}

}  // namespace nibble::engine
