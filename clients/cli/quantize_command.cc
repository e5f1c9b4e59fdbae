#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <cstdio>
#include <memory>
#include <string>

#include "clients/cli/commands.h"
#include "engine/atomic_file.h"
#include "engine/model_config.h"
#include "engine/status_macros.h"
#include "engine/tokenizer.h"
#include "quant/calibration.h"
#include "quant/quantize_model.h"

namespace nibble::cli {
namespace {

struct QuantizeCommandOptions {
  std::string model_dir;
  std::string work_dir;
  std::string method = "awq";
  int64_t w_bits = 4;
  int64_t group_size = 128;
  std::string calib_dataset = "ptb";
  std::string datasets_dir;
  quant::CalibrationOptions calibration;
  std::string eval_dataset;  // empty: the held-out split of the calibration set, if it has one
  int64_t eval_windows = 32;
};

std::string DatasetsDir(const QuantizeCommandOptions& options) {
  return options.datasets_dir.empty() ? quant::DefaultDatasetsDir() : options.datasets_dir;
}

absl::StatusOr<std::vector<int32_t>> TokenizeFile(const std::string& model_dir,
                                                  const std::string& file) {
  NIBBLE_ASSIGN_OR_RETURN(std::string text, engine::ReadFileToString(file));
  engine::TokenizerLoadResult tokenizer =
      engine::LoadSentencePieceTokenizer(model_dir + "/tokenizer.model");
  if (!tokenizer.tokenizer) return absl::InvalidArgumentError(tokenizer.error);
  std::vector<int32_t> ids = {tokenizer.tokenizer->BosId()};
  for (int32_t id : tokenizer.tokenizer->Encode(text)) ids.push_back(id);
  return ids;
}

// The text the report's perplexity before/after is measured on: --eval-dataset, else the
// split of the calibration set that calibration does not read (ptb: ptb.test.txt;
// tinystories: sample.txt). Empty when there is none.
absl::StatusOr<std::string> EvaluationFile(const QuantizeCommandOptions& options) {
  const std::string dir = DatasetsDir(options);
  if (!options.eval_dataset.empty()) {
    if (options.eval_dataset == "none") return std::string();
    return quant::ResolveCalibrationFile(options.eval_dataset, dir);
  }
  // The default is a convenience: where its file is absent, there is no evaluation.
  std::string held_out;
  if (options.calib_dataset == "ptb") held_out = dir + "/ptb/ptb.test.txt";
  if (options.calib_dataset == "tinystories") held_out = dir + "/tinystories/sample.txt";
  std::error_code ec;
  return std::filesystem::is_regular_file(held_out, ec) ? held_out : std::string();
}

// Tokenizes the calibration text with the model's own tokenizer (BOS first) and draws the
// samples; every adjustment is said, never made silently.
absl::StatusOr<std::vector<std::vector<int32_t>>> CalibrationSamples(
    const QuantizeCommandOptions& options) {
  NIBBLE_ASSIGN_OR_RETURN(std::string file, quant::ResolveCalibrationFile(
                                                options.calib_dataset, DatasetsDir(options)));
  const std::string model_config = options.model_dir + "/config.json";
  NIBBLE_ASSIGN_OR_RETURN(std::string config_text, engine::ReadFileToString(model_config));
  NIBBLE_ASSIGN_OR_RETURN(engine::ModelConfig config,
                          engine::ParseModelConfig(config_text, model_config));
  NIBBLE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, TokenizeFile(options.model_dir, file));
  NIBBLE_ASSIGN_OR_RETURN(quant::CalibrationSet set,
                          quant::DrawCalibrationSamples(ids, options.calibration,
                                                        config.max_position_embeddings));
  std::fprintf(stderr, "calibration: %s (%zu tokens), %zu samples of %lld tokens\n",
               file.c_str(), ids.size(), set.samples.size(),
               static_cast<long long>(options.calibration.seqlen));
  for (const std::string& note : set.adjustments) std::fprintf(stderr, "calibration: %s\n", note.c_str());
  return set.samples;
}

int RunQuantize(const QuantizeCommandOptions& options) {
  quant::QuantizeOptions q;
  q.method = options.method == "awq" ? quant::QuantMethod::kAwq : quant::QuantMethod::kRtn;
  if (q.method == quant::QuantMethod::kAwq) {
    auto samples = CalibrationSamples(options);
    if (!samples.ok()) {
      return ReportError("quantize", samples.status());
    }
    q.calibration_samples = std::move(samples).value();
  }
  auto evaluation = EvaluationFile(options);
  if (evaluation.ok() && !evaluation->empty()) {
    auto ids = TokenizeFile(options.model_dir, *evaluation);
    if (!ids.ok()) evaluation = ids.status();
    else {
      // Windows as long as the calibration's, at most --eval-windows of them.
      q.evaluation_window = options.calibration.seqlen;
      const size_t keep = static_cast<size_t>(options.eval_windows * q.evaluation_window);
      if (ids->size() > keep) ids->resize(keep);
      q.evaluation_ids = std::move(ids).value();
      std::fprintf(stderr, "evaluation: %s, %zu tokens in windows of %lld\n", evaluation->c_str(),
                   q.evaluation_ids.size(), static_cast<long long>(q.evaluation_window));
    }
  }
  if (!evaluation.ok()) {
    return ReportError("quantize", evaluation.status());
  }
  if (evaluation->empty()) {
    std::fprintf(stderr, "evaluation: none (pass --eval-dataset for perplexity before/after)\n");
  }
  q.w_bits = options.w_bits;
  q.group_size = options.group_size;
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
               static_cast<long long>(options.group_size), options.method.c_str(), worst,
               report->seconds);
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
  cmd->add_option("--calib-dataset", options->calib_dataset,
                  "ptb, wikitext2, tinystories, or a text file");
  cmd->add_option("--calib-samples", options->calibration.samples, "calibration windows");
  cmd->add_option("--calib-seqlen", options->calibration.seqlen, "tokens per window");
  cmd->add_option("--seed", options->calibration.seed, "seed of the calibration draw");
  cmd->add_option("--eval-dataset", options->eval_dataset,
                  "text for the report's perplexity before/after (a name, a file, or none; "
                  "default: ptb's test split, tinystories' sample)");
  cmd->add_option("--eval-windows", options->eval_windows, "evaluation windows at most")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--datasets-dir", options->datasets_dir,
                  "where the named datasets live (default $NIBBLE_DATASETS_DIR, else "
                  "~/.local/share/nibble/datasets)");
  cmd->add_option("--w-bits", options->w_bits, "weight bits (4)");
  cmd->add_option("--w-group-size", options->group_size, "input features per scale and zero");
  return [options]() { return RunQuantize(*options); };
}

}  // namespace nibble::cli
