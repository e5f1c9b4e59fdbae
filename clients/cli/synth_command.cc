// `nibble synth --config CONFIG.json --tokenizer tokenizer.model --out DIR`: a model with a
// real configuration's shapes and random weights, for speed and memory benchmarks
// (quant/synthetic_model.h).
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "clients/cli/commands.h"
#include "quant/synthetic_model.h"

namespace nibble::cli {
namespace {

struct SynthCommandOptions {
  quant::SyntheticModelOptions model;
  std::string out;
  std::string quant = "none";
  int64_t group_size = 128;
  int64_t layers = 0;
};

int RunSynth(SynthCommandOptions options) {
  if (options.quant == "awq") {
    options.model.quantize_group_size = options.group_size;
  } else if (options.quant != "none") {
    return ReportError("synth", absl::InvalidArgumentError(
                                    "--quant must be none or awq, got \"" + options.quant + "\""));
  }
  if (options.layers != 0) options.model.num_layers = options.layers;
  auto summary = quant::WriteSyntheticModel(options.model, options.out);
  if (!summary.ok()) return ReportError("synth", summary.status());
  std::fprintf(stderr, "wrote %s: %.3f B parameters, %.1f MB of safetensors%s\n",
               options.out.c_str(), static_cast<double>(summary->parameters) / 1e9,
               static_cast<double>(summary->bytes_written) / 1e6,
               options.model.quantize_group_size ? " (W4A16, RTN)" : " (fp16)");
  return 0;
}

}  // namespace

CommandRunner RegisterSynth(CLI::App& app) {
  auto options = std::make_shared<SynthCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "synth", "Write a model with a real config's shapes and random weights (for benchmarks)");
  cmd->add_option("--config", options->model.config_path, "config.json of the model to imitate")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--tokenizer", options->model.tokenizer_path,
                  "tokenizer.model to include (its vocabulary may be smaller than the config's)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--out", options->out, "output directory (must not exist or be empty)")
      ->required();
  cmd->add_option("--quant", options->quant, "none (fp16) or awq (W4A16 AWQ GEMM, RTN)")
      ->default_val("none");
  cmd->add_option("--group-size", options->group_size, "group size with --quant awq")
      ->default_val(128);
  cmd->add_option("--layers", options->layers, "decoder layers (default: the config's)");
  cmd->add_option("--seed", options->model.seed, "random seed")->default_val(0);
  return [options] { return RunSynth(*options); };
}

}  // namespace nibble::cli
