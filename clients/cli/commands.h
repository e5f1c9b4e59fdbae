// The subcommands of `nibble`. Each Register* adds its options to the app and returns the
// function that runs it (exit code 0 on success; errors go to stderr as one clear line).
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace nibble::cli {

using CommandRunner = std::function<int()>;

CommandRunner RegisterConvert(CLI::App& app);
CommandRunner RegisterGenerate(CLI::App& app);
CommandRunner RegisterPerplexity(CLI::App& app);
CommandRunner RegisterFetch(CLI::App& app);
CommandRunner RegisterQuantize(CLI::App& app);
CommandRunner RegisterPack(CLI::App& app);
CommandRunner RegisterUnpack(CLI::App& app);

}  // namespace nibble::cli
