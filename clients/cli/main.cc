#include <cstdio>
#include <map>

#include "clients/cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"nibble: 4-bit LLMs for the edge (AWQ W4A16 quantization and serving)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "nibble 0.1.0");
  const std::map<std::string, nibble::cli::CommandRunner> runners = {
      {"convert", nibble::cli::RegisterConvert(app)},
      {"generate", nibble::cli::RegisterGenerate(app)},
      {"perplexity", nibble::cli::RegisterPerplexity(app)},
      {"fetch", nibble::cli::RegisterFetch(app)},
      {"quantize", nibble::cli::RegisterQuantize(app)},
      {"pack", nibble::cli::RegisterPack(app)},
      {"unpack", nibble::cli::RegisterUnpack(app)},
      {"chat", nibble::cli::RegisterChat(app)},
      {"models", nibble::cli::RegisterModels(app)},
      {"artifacts", nibble::cli::RegisterArtifacts(app)},
      {"jobs", nibble::cli::RegisterJobs(app)},
      {"synth", nibble::cli::RegisterSynth(app)},
  };
  CLI11_PARSE(app, argc, argv);
  for (CLI::App* sub : app.get_subcommands()) {
    auto it = runners.find(sub->get_name());
    if (it != runners.end()) return it->second();
  }
  return 2;
}
