// The subcommands of `nibble`. Each Register* adds its options to the app and returns the
// function that runs it (exit code 0 on success; errors go to stderr as one clear line).
#pragma once

#include <cstdio>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/status/status.h"
#include "engine/sampler.h"

namespace nibble::v1 {
class SamplingParams;
}

namespace nibble::cli {

using CommandRunner = std::function<int()>;

// Prints "nibble COMMAND: MESSAGE" to stderr and returns the failing exit code (1).
inline int ReportError(const char* command, const absl::Status& status) {
  std::fprintf(stderr, "nibble %s: %s\n", command, std::string(status.message()).c_str());
  return 1;
}

CommandRunner RegisterConvert(CLI::App& app);
CommandRunner RegisterGenerate(CLI::App& app);
CommandRunner RegisterPerplexity(CLI::App& app);
CommandRunner RegisterFetch(CLI::App& app);
CommandRunner RegisterQuantize(CLI::App& app);
CommandRunner RegisterPack(CLI::App& app);
CommandRunner RegisterUnpack(CLI::App& app);
// Clients of a nibbled daemon (chat_command.cc).
CommandRunner RegisterChat(CLI::App& app);
CommandRunner RegisterModels(CLI::App& app);
// `models load|unload` under the `models` command (models_command.cc).
CommandRunner RegisterModelsHotLoading(CLI::App& models);
// Artifacts on a daemon: list, stat, pull (artifacts_command.cc).
CommandRunner RegisterArtifacts(CLI::App& app);
// Quantization jobs on a daemon (jobs_command.cc).
CommandRunner RegisterJobs(CLI::App& app);

// The sampling flags of `nibble generate` and `nibble chat` (--max-tokens, --temperature,
// --top-k, --top-p, --repetition-penalty, --seed, --stop, --ignore-eos), registered and
// mapped in one place (chat_command.cc).
struct SamplingFlags {
  int max_tokens = 256;
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float repetition_penalty = 1.0f;
  // Unset: a daemon picks a random seed (and reports it); a local run uses 0.
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool ignore_eos = false;

  void Register(CLI::App& command);
  // For a daemon: every flag, the seed only when given.
  void Fill(nibble::v1::SamplingParams* out) const;
  // For a local run.
  engine::SamplingParams Local() const;
};

// Adds `--timeout SECONDS` (the deadline of each call to the daemon; default none).
void RegisterTimeout(CLI::App& command, std::optional<double>* timeout);
CommandRunner RegisterSynth(CLI::App& app);

}  // namespace nibble::cli
