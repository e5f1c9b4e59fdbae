#include <cstdio>
#include <memory>
#include <string>

#include "clients/cli/commands.h"
#include "engine/llama2c.h"

namespace nibble::cli {

CommandRunner RegisterConvert(CLI::App& app) {
  CLI::App* convert = app.add_subcommand("convert", "Convert a model to a Hugging Face directory");
  convert->require_subcommand(1);
  CLI::App* llama2c =
      convert->add_subcommand("llama2c", "llama2.c checkpoint (.bin, v0) -> HF LLaMA directory");
  auto options = std::make_shared<std::tuple<std::string, std::string, std::string>>();
  llama2c->add_option("--checkpoint", std::get<0>(*options), "llama2.c checkpoint")
      ->required()
      ->check(CLI::ExistingFile);
  llama2c
      ->add_option("--tokenizer", std::get<1>(*options),
                   "tokenizer: SentencePiece .model, or llama2.c tokenizer .bin (converted)")
      ->required()
      ->check(CLI::ExistingFile);
  llama2c->add_option("--out", std::get<2>(*options), "output directory (must not exist)")
      ->required();
  return [options]() {
    const auto& [checkpoint, tokenizer, out] = *options;
    absl::Status status = engine::ConvertLlama2cToHf(checkpoint, tokenizer, out);
    if (!status.ok()) {
      return ReportError("convert", status);
    }
    std::fprintf(stderr, "wrote %s\n", out.c_str());
    return 0;
  };
}

}  // namespace nibble::cli
