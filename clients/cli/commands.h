// The subcommands of `nibble`. Each Register* adds its options to the app and returns the
// function that runs it (exit code 0 on success; errors go to stderr as one clear line).
#pragma once

#include <cstdio>
#include <functional>
#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/status/status.h"

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

// The sampling flags of `nibble generate`, for the commands that ask a daemon.
struct RemoteSamplingFlags {
  int max_tokens = 256;
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float repetition_penalty = 1.0f;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  bool ignore_eos = false;

  void Register(CLI::App& command);
  void Fill(nibble::v1::SamplingParams* out) const;
};
CommandRunner RegisterSynth(CLI::App& app);

}  // namespace nibble::cli
