#include <unistd.h>

#include <algorithm>
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
};

// Tokenizes the calibration text with the model's own tokenizer (BOS first) and draws the
// samples; every adjustment is said, never made silently.
absl::StatusOr<std::vector<std::vector<int32_t>>> CalibrationSamples(
    const QuantizeCommandOptions& options) {
  const std::string dir =
      options.datasets_dir.empty() ? quant::DefaultDatasetsDir() : options.datasets_dir;
  NIBBLE_ASSIGN_OR_RETURN(std::string file,
                          quant::ResolveCalibrationFile(options.calib_dataset, dir));
  NIBBLE_ASSIGN_OR_RETURN(std::string text, engine::ReadFileToString(file));
  const std::string model_config = options.model_dir + "/config.json";
  NIBBLE_ASSIGN_OR_RETURN(std::string config_text, engine::ReadFileToString(model_config));
  NIBBLE_ASSIGN_OR_RETURN(engine::ModelConfig config,
                          engine::ParseModelConfig(config_text, model_config));
  engine::TokenizerLoadResult tokenizer =
      engine::LoadSentencePieceTokenizer(options.model_dir + "/tokenizer.model");
  if (!tokenizer.tokenizer) return absl::InvalidArgumentError(tokenizer.error);
  std::vector<int32_t> ids = {tokenizer.tokenizer->BosId()};
  for (int32_t id : tokenizer.tokenizer->Encode(text)) ids.push_back(id);
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
      std::fprintf(stderr, "nibble quantize: %s\n", std::string(samples.status().message()).c_str());
      return 1;
    }
    q.calibration_samples = std::move(samples).value();
  }
  q.w_bits = options.w_bits;
  q.group_size = options.group_size;
  const bool terminal = isatty(fileno(stderr));
  auto progress = [&](int64_t done, int64_t total, const std::string& tensor) {
    // A progress line on a terminal, plain lines otherwise.
    if (terminal) {
      std::fprintf(stderr, "\r\033[K[%lld/%lld] %s", static_cast<long long>(done),
                   static_cast<long long>(total), tensor.c_str());
    } else {
      std::fprintf(stderr, "[%lld/%lld] %s\n", static_cast<long long>(done),
                   static_cast<long long>(total), tensor.c_str());
    }
  };
  auto report = quant::QuantizeModelDirectory(options.model_dir, options.work_dir, q, progress);
  if (terminal) std::fprintf(stderr, "\n");
  if (!report.ok()) {
    std::fprintf(stderr, "nibble quantize: %s\n", std::string(report.status().message()).c_str());
    return 1;
  }
  double worst = 0;
  for (const auto& layer : report->layers) worst = std::max(worst, layer.relative_error);
  std::fprintf(stderr, "wrote %s: %zu linears to int4 (g%lld, %s), worst relative error %.4f, "
               "%.2f s\n", options.work_dir.c_str(), report->layers.size(),
               static_cast<long long>(options.group_size), options.method.c_str(), worst,
               report->seconds);
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
  cmd->add_option("--datasets-dir", options->datasets_dir,
                  "where the named datasets live (default $NIBBLE_DATASETS_DIR, else "
                  "~/.local/share/nibble/datasets)");
  cmd->add_option("--w-bits", options->w_bits, "weight bits (4)");
  cmd->add_option("--w-group-size", options->group_size, "input features per scale and zero");
  return [options]() { return RunQuantize(*options); };
}

}  // namespace nibble::cli
