// Activation-aware weight quantization (AWQ, Lin et al. 2024), on the CPU or a GPU
// (awq_searcher.h): layer by layer, on calibration activations that flow through the
// original model (fp32 on the CPU, fp16 on a GPU), search per-input-channel scales
// for each group of linears sharing an input (q/k/v after the attention norm, gate/up after
// the FFN norm, down after up, o after v where the shapes allow), fold them into the
// preceding norm or linear, then search per-group weight clipping (not for q/k or a fused
// wqkv). The result is the modified fp32 tensors, by checkpoint name, ready for RTN.
//
// The scale objective is the mean squared error of the group's own outputs (AutoAWQ measures
// the whole attention block's output for q/k/v; the linears' outputs are what LMDeploy's
// search and this one measure). The next layer's calibration input is the original fp32
// layer's output, as in AutoAWQ.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_config.h"
#include "engine/tensor_store.h"

namespace nibble::quant {

struct AwqOptions {
  int64_t group_size = 128;
  int n_grid = 20;            // scale ratios 0, 1/20, ..., 19/20; clip steps of 1/20
  double max_shrink = 0.5;    // clipping shrinks the range by at most this much
  int64_t clip_tokens = 512;  // calibration tokens sampled for the clip search
  // Where to checkpoint after every layer (empty: nowhere). A directory holding a checkpoint
  // of the same job resumes after its last finished layer, with the same result bytes as an
  // uninterrupted run; the caller makes sure it belongs to this job.
  std::string checkpoint_dir;
  // Polled before each layer and between a layer's steps (and its linears' clipping
  // searches); returning true ends the search with Cancelled. Layers already checkpointed
  // stay: a later run with the same checkpoint_dir resumes after them. Called on the
  // searching thread; must be cheap and thread-safe against whoever sets it.
  std::function<bool()> stop_requested;
  // -1: the search runs on the CPU in fp32 (the reference). N >= 0: on CUDA device N, in fp16
  // with fp32 statistics (awq_cuda.cc), one layer on the device at a time.
  int cuda_device = -1;
};

// Where the search is, reported at each step: `step` is "calibrate" (the original layer runs
// over the calibration samples), "search scales", "search clipping", "checkpoint" (its files
// are prepared and, on the CPU, written; only with a checkpoint_dir), "layer done" (the layer
// is finished and checkpointed: layers_done = layer + 1; on the GPU its files are written
// while the next layer is searched, so this comes during that layer's "checkpoint" step) or
// "resumed from the checkpoint" (before the first layer of a run that resumed).
struct AwqProgress {
  int64_t layer = 0;        // 0-based
  int64_t layers = 0;
  int64_t layers_done = 0;  // layers finished (checkpointed), resumed ones included
  std::string step;
};

struct AwqLayerScales {
  std::string group;        // e.g. "model.layers.0 qkv"
  double ratio = 0;         // the chosen exponent of the activation magnitude
  double loss_rtn = 0;      // output MSE of plain RTN (ratio 0)
  double loss_awq = 0;      // output MSE with the chosen scales
};

struct AwqResult {
  std::map<std::string, std::vector<float>> tensors;  // modified tensors, fp32, by name
  std::vector<AwqLayerScales> scales;
  // On a GPU: the most device memory in use during the search (all of the card's users and
  // the CUDA context included, as cudaMemGetInfo reports it).
  int64_t peak_device_bytes = 0;
};

// `samples` are token windows (see calibration.h). `progress` on the searching thread.
// Cancelled when options.stop_requested said so.
absl::StatusOr<AwqResult> SearchAwq(
    const engine::TensorStore& store, const engine::ModelConfig& config,
    const std::vector<std::vector<int32_t>>& samples, const AwqOptions& options,
    const std::function<void(const AwqProgress&)>& progress = nullptr);

}  // namespace nibble::quant
