// The subcommands of `nibble`. Each Register* adds its options to the app and returns the
// function that runs it (exit code 0 on success; errors go to stderr as one clear line).
#pragma once

#include <cstdio>
#include <functional>
#include <string>

#include <CLI/CLI.hpp>

#include "absl/status/status.h"

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
CommandRunner RegisterSynth(CLI::App& app);

}  // namespace nibble::cli
