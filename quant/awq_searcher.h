// The arithmetic of the AWQ search, behind one seam: the CPU searcher (awq.cc, the
// reference) and the GPU searcher (awq_cuda.cc) do the same three things for a layer, and
// SearchAwq (awq.cc) owns everything around them: the layer loop, which linears share an
// input, folding the scales into what precedes them, checkpoints, progress and stops.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_config.h"
#include "engine/model_weights.h"
#include "quant/awq.h"

namespace nibble::quant {

// The inputs of a layer's linears the calibration keeps (engine::LayerInputCapture's four).
enum class LinearInput { kQkv, kO, kFfn, kDown };

class AwqSearcher {
 public:
  virtual ~AwqSearcher() = default;

  // Runs layer `layer` with its original weights over every sample, in place (states: one
  // row-major [tokens, hidden] buffer per sample: the layer's input, then its output), and
  // keeps what this layer's searches need of its linears' inputs.
  virtual absl::Status Calibrate(int64_t layer, std::vector<std::vector<float>>& states) = 0;

  // The per-input-channel scales, among AwqCandidateScales' n_grid candidates, that minimize
  // the summed output error (mean squared, per linear) of linears `ws` (each [out_i, in],
  // fp32) reading `input`, when each is quantized with its inputs scaled. Fills `report`'s
  // ratio and losses.
  virtual absl::StatusOr<std::vector<float>> SearchScales(
      LinearInput input, int64_t in, const std::vector<const std::vector<float>*>& ws,
      AwqLayerScales& report) = 0;

  // Clamps each group of each row of w [out, in] (its input channels already multiplied by
  // s) to the bound that minimizes the group's output error on the sampled calibration
  // tokens of `input` divided by s (ClipSampleStride's tokens).
  virtual absl::Status SearchClipping(LinearInput input, std::vector<float>& w, int64_t in,
                                      int64_t out, const std::vector<float>& s) = 0;

  // The most device memory in use so far (0 on the CPU).
  virtual int64_t PeakDeviceBytes() const { return 0; }
};

// Whether SearchAwq searches scales for the linears reading `input`: always, but for o, whose
// scales must fold into v's output rows: only with separate q/k/v and no GQA (AutoAWQ's shape
// rule). A searcher keeps scale statistics for these inputs only.
bool AwqSearchesScales(const engine::ModelConfig& config, LinearInput input);

// The scales of candidate `ratio`: s_k = max(mean_t |x_tk| ^ ratio, 1e-4), divided by
// sqrt(min s * max s). `magnitude_sum` holds Σ_t |x_tk| over `tokens` tokens.
std::vector<float> AwqCandidateScales(const std::vector<double>& magnitude_sum, int64_t tokens,
                                      double ratio);

// The clipping search's tokens: every stride-th of `tokens` (the samples one after another),
// at most `limit` of them.
int64_t ClipSampleStride(int64_t tokens, int64_t limit);

// The CPU searcher over `weights` (fp32; kept by reference).
std::unique_ptr<AwqSearcher> MakeCpuAwqSearcher(const engine::ModelConfig& config,
                                                const engine::ModelWeights& weights,
                                                const AwqOptions& options, int64_t tokens);

// Whether the GPU searcher can take this job on CUDA device `device`, before any work: the
// errors MakeCudaAwqSearcher would give for the build, the device, the group size or the
// model's shapes.
absl::Status CheckCudaAwqSearch(const engine::ModelConfig& config, const AwqOptions& options,
                                int device);

// The GPU searcher on CUDA device `device` over `weights` (any storage; each layer is
// uploaded as fp16 when it is calibrated, so the device holds one layer at a time).
// FailedPrecondition in a build without CUDA; InvalidArgument for a group size above
// kernels/cuda/awq.h's kMaxAwqGroup or a model the GPU kernels cannot run.
absl::StatusOr<std::unique_ptr<AwqSearcher>> MakeCudaAwqSearcher(
    const engine::ModelConfig& config, const engine::ModelWeights& weights,
    const AwqOptions& options, int64_t tokens, int device);

}  // namespace nibble::quant
