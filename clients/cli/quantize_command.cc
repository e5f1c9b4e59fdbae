#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "clients/cli/commands.h"
#include "quant/quantize_model.h"

namespace nibble::cli {
namespace {

struct QuantizeCommandOptions {
  std::string model_dir;
  std::string work_dir;
  std::string method = "awq";
  quant::QuantizeSettings settings;  // calibration, evaluation, group size, bits
};

int RunQuantize(QuantizeCommandOptions options) {
  options.settings.method =
      options.method == "awq" ? quant::QuantMethod::kAwq : quant::QuantMethod::kRtn;
  auto prepared = quant::PrepareQuantization(options.model_dir, options.settings);
  if (!prepared.ok()) {
    return ReportError("quantize", prepared.status());
  }
  for (const std::string& note : prepared->notes) std::fprintf(stderr, "%s\n", note.c_str());
  const quant::QuantizeOptions& q = prepared->options;
  const bool terminal = isatty(fileno(stderr));
  // Two stages report progress: the AWQ search per layer ("layer i: phase"), then packing
  // per tensor. The estimate of what is left extrapolates the current stage's pace.
  const auto start = std::chrono::steady_clock::now();
  auto stage_start = start;
  int64_t stage_total = -1;
  auto progress = [&](int64_t done, int64_t total, const std::string& what) {
    const auto now = std::chrono::steady_clock::now();
    if (total != stage_total) {
      stage_total = total;
      stage_start = now;
    }
    const double elapsed = std::chrono::duration<double>(now - start).count();
    const double in_stage = std::chrono::duration<double>(now - stage_start).count();
    char eta[32] = "?";
    if (done > 0) {
      std::snprintf(eta, sizeof eta, "%.1fs", in_stage / done * static_cast<double>(total - done));
    }
    std::fprintf(stderr, terminal ? "\r\033[K[%lld/%lld] %s  elapsed %.1fs, left ~%s"
                                  : "[%lld/%lld] %s  elapsed %.1fs, left ~%s\n",
                 static_cast<long long>(done), static_cast<long long>(total), what.c_str(),
                 elapsed, eta);
  };
  auto report = quant::QuantizeModelDirectory(options.model_dir, options.work_dir, q, progress);
  if (terminal) std::fprintf(stderr, "\n");
  if (!report.ok()) {
    return ReportError("quantize", report.status());
  }
  double worst = 0;
  for (const auto& layer : report->layers) worst = std::max(worst, layer.relative_error);
  std::fprintf(stderr, "wrote %s: %zu linears to int4 (g%lld, %s), worst relative error %.4f, "
               "%.2f s\n", options.work_dir.c_str(), report->layers.size(),
               static_cast<long long>(options.settings.group_size), options.method.c_str(), worst,
               report->seconds);
  if (report->peak_device_bytes > 0) {  // the AWQ search ran on a GPU
    std::fprintf(stderr, "search: %.1f s, peak device memory %.2f GiB (cudaMemGetInfo, the CUDA "
                 "context included)\n", report->phase_seconds.at("search"),
                 static_cast<double>(report->peak_device_bytes) / (1 << 30));
  }
  if (report->perplexity_before && report->perplexity_after) {
    std::fprintf(stderr, "perplexity before %.4f, after %.4f\n", *report->perplexity_before,
                 *report->perplexity_after);
  }
  for (const auto& scales : report->awq_scales) {
    std::fprintf(stderr, "awq %s: ratio %.2f, output error %.3g (rtn %.3g)\n",
                 scales.group.c_str(), scales.ratio, scales.loss_awq, scales.loss_rtn);
  }
  for (const std::string& skipped : report->not_converted) {
    std::fprintf(stderr, "kept fp16: %s\n", skipped.c_str());
  }
  return 0;
}

}  // namespace

CommandRunner RegisterQuantize(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand(
      "quantize", "Quantize a Hugging Face model to W4A16 (AWQ GEMM artifact)");
  auto options = std::make_shared<QuantizeCommandOptions>();
  cmd->add_option("model", options->model_dir, "Hugging Face model directory")->required();
  cmd->add_option("--work-dir", options->work_dir, "output directory (must not exist)")
      ->required();
  // The flag names and defaults users type for `lmdeploy lite auto_awq`.
  cmd->add_option("--method", options->method, "awq (activation-aware) or rtn (round to nearest)")
      ->check(CLI::IsMember({"awq", "rtn"}));
  cmd->add_option("--calib-dataset", options->settings.calib_dataset,
                  "ptb, wikitext2, tinystories, or a text file");
  cmd->add_option("--calib-samples", options->settings.calibration.samples, "calibration windows");
  cmd->add_option("--calib-seqlen", options->settings.calibration.seqlen, "tokens per window");
  cmd->add_option("--seed", options->settings.calibration.seed, "seed of the calibration draw");
  cmd->add_option("--eval-dataset", options->settings.eval_dataset,
                  "text for the report's perplexity before/after (a name, a file, or none; "
                  "default: ptb's test split, tinystories' sample)");
  cmd->add_option("--eval-windows", options->settings.eval_windows, "evaluation windows at most")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--datasets-dir", options->settings.datasets_dir,
                  "where the named datasets live (default $NIBBLE_DATASETS_DIR, else "
                  "~/.local/share/nibble/datasets)");
  cmd->add_option("--w-bits", options->settings.w_bits, "weight bits (4)");
  cmd->add_option("--w-group-size", options->settings.group_size, "input features per scale and zero");
  cmd->add_option("--device", options->settings.device,
                  "where the AWQ search and the evaluation run: cpu, cuda or cuda:N (the GPU "
                  "computes in fp16 and holds one layer at a time)");
  return [options]() { return RunQuantize(*options); };
}

}  // namespace nibble::cli
