// `nibble pack DIR OUT.tar.gz` and `nibble unpack OUT.tar.gz DIR`: one compressed tar for
// carrying an artifact to an edge device (quant/bundle.h).
#include <cstdio>
#include <memory>
#include <string>

#include "clients/cli/commands.h"
#include "quant/bundle.h"

namespace nibble::cli {
namespace {

struct PackCommandOptions {
  std::string dir;
  std::string out;
  quant::PackOptions pack;
};

struct UnpackCommandOptions {
  std::string archive;
  std::string dir;
};

double Megabytes(uint64_t bytes) { return static_cast<double>(bytes) / 1e6; }

int RunPack(const PackCommandOptions& options) {
  auto report = quant::PackArtifact(options.dir, options.out, options.pack);
  if (!report.ok()) {
    return ReportError("pack", report.status());
  }
  std::fprintf(stderr,
               "wrote %s: %lld files, %.1f MB -> %.1f MB in %.2f s (%.1f MB/s, %d threads, "
               "%lld gzip members)\n",
               options.out.c_str(), static_cast<long long>(report->files),
               Megabytes(report->tar_bytes), Megabytes(report->gz_bytes), report->seconds,
               report->seconds > 0 ? Megabytes(report->tar_bytes) / report->seconds : 0.0,
               report->threads, static_cast<long long>(report->members));
  return 0;
}

int RunUnpack(const UnpackCommandOptions& options) {
  auto report = quant::UnpackArtifact(options.archive, options.dir);
  if (!report.ok()) {
    return ReportError("unpack", report.status());
  }
  std::fprintf(stderr, "unpacked %s: %lld files, %.1f MB, every sha256 verified, %.2f s\n",
               options.dir.c_str(), static_cast<long long>(report->files),
               Megabytes(report->tar_bytes), report->seconds);
  return 0;
}

}  // namespace

CommandRunner RegisterPack(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand(
      "pack", "Pack a verified artifact into one .tar.gz (parallel gzip, readable by tar xzf)");
  auto options = std::make_shared<PackCommandOptions>();
  cmd->add_option("dir", options->dir, "artifact directory (with nibble_manifest.json)")
      ->required();
  cmd->add_option("out", options->out, "archive to write, e.g. model.tar.gz")->required();
  cmd->add_option("--threads", options->pack.threads,
                  "compression threads (default: every core)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--level", options->pack.level, "gzip level 1 (fastest) to 9 (smallest)")
      ->check(CLI::Range(1, 9));
  return [options]() { return RunPack(*options); };
}

CommandRunner RegisterUnpack(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand(
      "unpack", "Unpack an archive from `nibble pack`, verifying every sha256 of its manifest");
  auto options = std::make_shared<UnpackCommandOptions>();
  cmd->add_option("archive", options->archive, "archive written by `nibble pack`")->required();
  cmd->add_option("dir", options->dir, "destination (must not exist or be empty)")->required();
  return [options]() { return RunUnpack(*options); };
}

}  // namespace nibble::cli
