#include <unistd.h>

#include <algorithm>
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
  std::string method = "rtn";
  int64_t w_bits = 4;
  int64_t group_size = 128;
};

int RunQuantize(const QuantizeCommandOptions& options) {
  quant::QuantizeOptions q;
  q.method = quant::QuantMethod::kRtn;
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
  // The flag names and defaults users type for `lmdeploy lite auto_awq`. The activation-aware
  // search (--method awq) arrives with the calibration pipeline; round-to-nearest is here.
  cmd->add_option("--method", options->method, "rtn (round to nearest)")
      ->check(CLI::IsMember({"rtn"}));
  cmd->add_option("--w-bits", options->w_bits, "weight bits (4)");
  cmd->add_option("--w-group-size", options->group_size, "input features per scale and zero");
  return [options]() { return RunQuantize(*options); };
}

}  // namespace nibble::cli
