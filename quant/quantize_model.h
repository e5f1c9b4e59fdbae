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
#include "quant/calibration.h"

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
  // -1: the CPU. N >= 0: the AWQ search and the evaluation run on CUDA device N (awq.h).
  int cuda_device = -1;
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
  int64_t peak_device_bytes = 0;  // on a GPU: the AWQ search's peak (AwqResult)
  std::optional<double> perplexity_before;      // with evaluation_ids
  std::optional<double> perplexity_after;
  double seconds = 0;
};

// Where a quantization is, reported as it goes. Phases, in order: "calibrate" and "search"
// (AWQ, per decoder layer: the layer runs over the calibration samples, then its scales and
// clipping are searched), "quantize" (each tensor packed, in name order), "evaluate"
// (perplexity before and after, with evaluation_ids), "write" (the files and the manifest).
struct QuantizeProgress {
  std::string phase;
  int64_t layer = 0;        // calibrate, search: the decoder layer (0-based)
  int64_t layers = 0;       // decoder layers in the model
  int64_t layers_done = 0;  // layers whose AWQ search is finished and checkpointed
  std::string step;         // calibrate/search: AwqProgress::step; quantize: the tensor
  int64_t tensors_done = 0;
  int64_t tensors_total = 0;
  bool resumed = false;     // this run resumed from a checkpoint
};

// How a caller follows and stops a quantization. Both run on the quantizing thread.
struct QuantizeControl {
  std::function<void(const QuantizeProgress&)> progress;
  // Polled between layers, a layer's steps and tensors: true ends the job with Cancelled,
  // leaving the checkpoint (the layers finished so far) for a later run to resume.
  std::function<bool()> stop_requested;
};

// Errors: an unreadable or unsupported
// source, w_bits other than 4, a group size that is not a positive even number, an `out_dir`
// that holds a finished artifact, another job's checkpoint, or anything else.
//
// `out_dir` is the job's work directory: while the job runs it holds the checkpoint
// (.nibble-job/: the AWQ search checkpoints after every layer), so running the same job
// again after a crash or SIGKILL resumes after the last finished layer and writes the same
// bytes as an uninterrupted run. Every file is written atomically and nibble_manifest.json
// last: a directory with a manifest is complete, one without is not an artifact.
absl::StatusOr<QuantizeReport> QuantizeModelDirectory(const std::string& model_dir,
                                                      const std::string& out_dir,
                                                      const QuantizeOptions& options,
                                                      const QuantizeControl& control);

// The same, reporting `progress(done, total, what)`: per AWQ step (done = the layer, what =
// "layer i: step") and after each tensor (done = tensors written, what = the tensor).
absl::StatusOr<QuantizeReport> QuantizeModelDirectory(
    const std::string& model_dir, const std::string& out_dir, const QuantizeOptions& options,
    const std::function<void(int64_t, int64_t, const std::string&)>& progress = nullptr);

// What `nibble quantize` is asked for, as a user gives it (lmdeploy lite auto_awq's flags and
// defaults): the CLI and the daemon's jobs turn it into QuantizeOptions the same way, so a
// job and a local run with the same settings write the same bytes.
struct QuantizeSettings {
  QuantMethod method = QuantMethod::kAwq;
  int64_t w_bits = 4;
  int64_t group_size = 128;
  std::string calib_dataset = "ptb";  // a name (calibration.h) or a text file
  std::string datasets_dir;           // empty: DefaultDatasetsDir()
  CalibrationOptions calibration;
  // Empty: the calibration set's held-out split (ptb: ptb.test.txt; tinystories:
  // sample.txt) where its file exists; "none": no evaluation; else a name or a file.
  std::string eval_dataset;
  int64_t eval_windows = 32;  // evaluation windows of calibration.seqlen tokens, at most
  std::string device = "cpu";  // cpu, cuda or cuda:N (engine::ParseDevice)
};

struct PreparedQuantization {
  QuantizeOptions options;
  // What was read and drawn ("calibration: FILE (N tokens), S samples of L tokens", the
  // draw's adjustments, "evaluation: ..."), for the user.
  std::vector<std::string> notes;
};

// Tokenizes the calibration and evaluation text with the model's own tokenizer (BOS first)
// and draws the calibration samples (AWQ only). Errors: a dataset that cannot be found or
// read, a tokenizer that cannot be loaded, a draw the text or the model cannot honour
// (calibration.h), each naming what is wrong. Nothing is adjusted silently.
absl::StatusOr<PreparedQuantization> PrepareQuantization(const std::string& model_dir,
                                                         const QuantizeSettings& settings);

}  // namespace nibble::quant
