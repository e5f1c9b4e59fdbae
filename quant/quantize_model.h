// Quantizing a Hugging Face model directory into a W4A16 artifact: AWQ "GEMM" safetensors
// (qweight/qzeros/scales per quantized linear, everything else fp16), config.json with
// `quantization_config`, and the tokenizer files — a directory vLLM, transformers, LMDeploy
// and nibble's own engine load alike.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "quant/awq.h"

namespace nibble::quant {

enum class QuantMethod { kRtn, kAwq };

struct QuantizeOptions {
  QuantMethod method = QuantMethod::kRtn;
  int64_t w_bits = 4;
  int64_t group_size = 128;
  // kAwq: token windows the activation-aware search calibrates on (calibration.h).
  std::vector<std::vector<int32_t>> calibration_samples;
  // Text not used for calibration, tokenized (BOS first): when given, the report carries the
  // perplexity before and after, under `nibble perplexity`'s protocol with this window.
  std::vector<int32_t> evaluation_ids;
  int64_t evaluation_window = 0;
};

struct LayerQuantizationError {
  std::string name;       // the linear's weight tensor
  double relative_error;  // ||W - dequant(quant(W))||_F / ||W||_F
};

struct QuantizeReport {
  std::vector<LayerQuantizationError> layers;  // quantized layers, in tensor-name order
  std::vector<std::string> not_converted;      // linears kept fp16, with the reason
  std::vector<AwqLayerScales> awq_scales;      // kAwq: the chosen scales' ratios and losses
  std::map<std::string, double> phase_seconds;  // "search", "quantize", "evaluate"
  std::optional<double> perplexity_before;      // with evaluation_ids
  std::optional<double> perplexity_after;
  double seconds = 0;
};

// `progress(done, total, tensor)` after each tensor. Errors: an unreadable or unsupported
// source, w_bits other than 4, a group size that is not a positive even number, an `out_dir`
// that holds a finished artifact, another job's checkpoint, or anything else.
//
// `out_dir` is the job's work directory: while the job runs it holds the checkpoint
// (.nibble-job/: the AWQ search checkpoints after every layer), so running the same job
// again after a crash or SIGKILL resumes after the last finished layer and writes the same
// bytes as an uninterrupted run. Every file is written atomically and nibble_manifest.json
// last: a directory with a manifest is complete, one without is not an artifact.
absl::StatusOr<QuantizeReport> QuantizeModelDirectory(
    const std::string& model_dir, const std::string& out_dir, const QuantizeOptions& options,
    const std::function<void(int64_t, int64_t, const std::string&)>& progress = nullptr);

}  // namespace nibble::quant
