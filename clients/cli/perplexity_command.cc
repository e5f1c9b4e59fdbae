#include <cstdio>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "clients/cli/commands.h"
#include "clients/cli/model_options.h"
#include "engine/atomic_file.h"
#include "engine/perplexity.h"

namespace nibble::cli {
namespace {

struct PerplexityOptions {
  ModelOptions model;
  std::string dataset;
  int64_t seqlen = 2048;
  bool json = false;
};

int RunPerplexity(const PerplexityOptions& options) {
  auto text = engine::ReadFileToString(options.dataset);
  if (!text.ok()) {
    return ReportError("perplexity", text.status());
  }
  auto model = options.model.Load("perplexity");
  if (!model) return 1;
  if (options.seqlen > model->config().max_position_embeddings) {
    std::fprintf(stderr, "nibble perplexity: --seqlen %lld is longer than the model's context "
                 "of %lld tokens\n", static_cast<long long>(options.seqlen),
                 static_cast<long long>(model->config().max_position_embeddings));
    return 1;
  }
  // The protocol: the whole file tokenized once, BOS first.
  std::vector<int32_t> ids = {model->tokenizer().BosId()};
  const std::vector<int32_t> body = model->tokenizer().Encode(*text);
  ids.insert(ids.end(), body.begin(), body.end());

  auto progress = [&](int64_t done, int64_t total) {
    if (!options.json) std::fprintf(stderr, "\rwindow %lld/%lld", static_cast<long long>(done),
                                    static_cast<long long>(total));
  };
  auto result = engine::ComputePerplexity(model->backend(), ids, options.seqlen, progress);
  if (!options.json) std::fprintf(stderr, "\n");
  if (!result.ok()) {
    std::fprintf(stderr, "nibble perplexity: %s: %s\n", options.dataset.c_str(),
                 std::string(result.status().message()).c_str());
    return 1;
  }
  if (options.json) {
    nlohmann::json out;
    out["dataset"] = options.dataset;
    out["seqlen"] = options.seqlen;
    out["tokens"] = result->tokens;
    out["windows"] = result->windows;
    out["predicted_tokens"] = result->predicted;
    out["mean_nll"] = result->mean_nll;
    out["perplexity"] = result->perplexity;
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("perplexity %.6f (mean NLL %.6f over %lld tokens in %lld windows of %lld)\n",
                result->perplexity, result->mean_nll, static_cast<long long>(result->predicted),
                static_cast<long long>(result->windows), static_cast<long long>(options.seqlen));
  }
  return 0;
}

}  // namespace

CommandRunner RegisterPerplexity(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("perplexity", "Perplexity of a model on a text file");
  auto options = std::make_shared<PerplexityOptions>();
  options->model.Register(*cmd);
  cmd->add_option("--dataset", options->dataset, "text file, read whole")->required();
  cmd->add_option("--seqlen", options->seqlen, "window length in tokens")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 20));
  cmd->add_flag("--json", options->json, "print tokens, mean NLL and perplexity as JSON");
  return [options]() { return RunPerplexity(*options); };
}

}  // namespace nibble::cli
