// `nibble artifacts list|stat|pull`: the artifacts of a nibbled (nibble.v1.Artifacts). Every
// subcommand takes the connection flags (connection_flags.h). `pull` copies an artifact into
// a local directory through the same puller a daemon uses (server/artifact_puller.h):
// resumable (run it again after an interruption and it asks each file from where it
// stopped), every file's sha256 checked, the directory appearing only when whole.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "clients/cli/commands.h"
#include "clients/cli/connection_flags.h"
#include "nibble/v1/artifacts.grpc.pb.h"
#include "rpc/channel.h"
#include "server/artifact_puller.h"

namespace nibble::cli {
namespace {

struct ArtifactsOptions {
  ConnectionFlags connection;
  bool json = false;
  std::string name;
  // pull
  std::string out;
  uint32_t chunk_bytes = 0;
  double max_bytes_per_second = 0;
};

std::string Size(uint64_t bytes) {
  char text[32];
  if (bytes >= (uint64_t{1} << 30)) {
    std::snprintf(text, sizeof text, "%.2f GiB", static_cast<double>(bytes) / (1 << 30));
  } else if (bytes >= (uint64_t{1} << 20)) {
    std::snprintf(text, sizeof text, "%.2f MiB", static_cast<double>(bytes) / (1 << 20));
  } else if (bytes >= 1024) {
    std::snprintf(text, sizeof text, "%.1f KiB", static_cast<double>(bytes) / 1024);
  } else {
    std::snprintf(text, sizeof text, "%llu B", static_cast<unsigned long long>(bytes));
  }
  return text;
}

int RunList(const ArtifactsOptions& options) {
  auto connection = options.connection.Open();
  if (!connection.ok()) return ReportError("artifacts list", connection.status());
  auto stub = nibble::v1::Artifacts::NewStub(connection->channel);
  nibble::v1::ListArtifactsResponse response;
  absl::Status status = connection->Call(*stub, &nibble::v1::Artifacts::Stub::List,
                                         nibble::v1::ListArtifactsRequest(), &response);
  if (!status.ok()) return ReportError("artifacts list", status);
  if (options.json) {
    std::printf("%s\n", Json(response).c_str());
    return 0;
  }
  for (const nibble::v1::ArtifactInfo& a : response.artifacts()) {
    if (a.state() == nibble::v1::ARTIFACT_STATE_PRESENT) {
      std::printf("%-32s %-8s %s %lld-bit g%lld  %zu files  %s\n", a.name().c_str(),
                  a.quantization().method().c_str(), a.architecture().c_str(),
                  static_cast<long long>(a.quantization().bits()),
                  static_cast<long long>(a.quantization().group_size()),
                  static_cast<size_t>(a.files_size()), Size(a.total_bytes()).c_str());
    } else {
      std::printf("%-32s INVALID  %s\n", a.name().c_str(), a.problem().c_str());
    }
  }
  return 0;
}

int RunStat(const ArtifactsOptions& options) {
  auto connection = options.connection.Open();
  if (!connection.ok()) return ReportError("artifacts stat", connection.status());
  auto stub = nibble::v1::Artifacts::NewStub(connection->channel);
  nibble::v1::StatArtifactRequest request;
  request.set_name(options.name);
  nibble::v1::ArtifactInfo info;
  absl::Status status =
      connection->Call(*stub, &nibble::v1::Artifacts::Stub::Stat, request, &info);
  if (!status.ok()) return ReportError("artifacts stat", status);
  if (options.json) {
    info.clear_manifest_json();  // its content is the rest of this object
    std::printf("%s\n", Json(info).c_str());
    return 0;
  }
  const auto& q = info.quantization();
  std::printf("artifact      %s\narchitecture  %s\nquantization  %s, %lld bits, group %lld",
              info.name().c_str(), info.architecture().c_str(), q.method().c_str(),
              static_cast<long long>(q.bits()), static_cast<long long>(q.group_size()));
  if (!q.calibration_dataset().empty()) {
    std::printf(" (calibration %s, %lld x %lld tokens)", q.calibration_dataset().c_str(),
                static_cast<long long>(q.calibration_samples()),
                static_cast<long long>(q.calibration_seqlen()));
  }
  std::printf("\nchat template %s\nfiles         %s in all\n", info.chat_template().c_str(),
              Size(info.total_bytes()).c_str());
  for (const nibble::v1::ArtifactFile& file : info.files()) {
    std::printf("  %-40s %12llu  %s\n", file.path().c_str(),
                static_cast<unsigned long long>(file.size()), file.sha256().c_str());
  }
  const auto& report = info.report();
  if (report.has_perplexity_before() || report.has_perplexity_after()) {
    std::printf("perplexity    %.4f before, %.4f after\n", report.perplexity_before(),
                report.perplexity_after());
  }
  double worst = 0;
  std::string worst_name;
  for (const auto& layer : report.layers()) {
    if (layer.relative_error() > worst) {
      worst = layer.relative_error();
      worst_name = layer.name();
    }
  }
  if (!worst_name.empty()) {
    std::printf("layers        %d quantized; largest relative error %.4f (%s)\n",
                report.layers_size(), worst, worst_name.c_str());
  }
  return 0;
}

int RunPull(const ArtifactsOptions& options) {
  auto connection = options.connection.Open();
  if (!connection.ok()) return ReportError("artifacts pull", connection.status());
  const std::string out = options.out.empty() ? options.name : options.out;
  const bool terminal = !options.json && isatty(fileno(stderr));
  server::PullOptions pull;
  pull.chunk_bytes = options.chunk_bytes;
  pull.max_bytes_per_second = options.max_bytes_per_second;
  if (options.connection.timeout) pull.stat_timeout_seconds = *options.connection.timeout;
  const auto start = std::chrono::steady_clock::now();
  auto last_draw = start - std::chrono::seconds(1);
  if (terminal) {
    pull.on_progress = [&](const server::PullProgress& p) {
      const auto now = std::chrono::steady_clock::now();
      if (now - last_draw < std::chrono::milliseconds(100) && p.bytes_done != p.bytes_total) {
        return;
      }
      last_draw = now;
      const double fraction =
          p.bytes_total > 0 ? static_cast<double>(p.bytes_done) / p.bytes_total : 1.0;
      const int width = 30;
      const int filled = static_cast<int>(fraction * width);
      const double seconds = std::chrono::duration<double>(now - start).count();
      std::fprintf(stderr, "\r\033[K[%s%s] %5.1f%%  %s / %s  %s/s  %s",
                   std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                   100 * fraction, Size(p.bytes_done).c_str(), Size(p.bytes_total).c_str(),
                   Size(seconds > 0 ? static_cast<uint64_t>(p.bytes_transferred / seconds) : 0)
                       .c_str(),
                   p.file.c_str());
      std::fflush(stderr);
    };
  }
  auto result = server::PullArtifact(connection->channel, connection->address,
                                     connection->security, options.name, out + ".partial", out,
                                     pull);
  if (terminal) std::fprintf(stderr, "\n");
  if (!result.ok()) return ReportError("artifacts pull", result.status());
  if (options.json) {
    std::printf("{\"artifact\": \"%s\", \"dir\": \"%s\", \"bytes_total\": %llu, "
                "\"bytes_resumed\": %llu, \"bytes_transferred\": %llu}\n",
                options.name.c_str(), out.c_str(),
                static_cast<unsigned long long>(result->bytes_total),
                static_cast<unsigned long long>(result->bytes_resumed),
                static_cast<unsigned long long>(result->bytes_transferred));
  } else {
    std::printf("pulled %s into %s: %s, %s of it resumed from an earlier pull; every sha256 "
                "verified\n",
                options.name.c_str(), out.c_str(), Size(result->bytes_total).c_str(),
                Size(result->bytes_resumed).c_str());
  }
  return 0;
}

}  // namespace

CommandRunner RegisterArtifacts(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("artifacts", "The artifacts of a nibbled daemon");
  cmd->require_subcommand(1);
  auto options = std::make_shared<ArtifactsOptions>();

  CLI::App* list = cmd->add_subcommand("list", "List the artifacts (INVALID ones with why)");
  options->connection.Register(*list);
  list->add_flag("--json", options->json, "print JSON");

  CLI::App* stat = cmd->add_subcommand("stat", "Show an artifact's manifest");
  stat->add_option("name", options->name, "the artifact")->required();
  // Options are registered per subcommand; all write the same struct (one runs).
  ConnectionFlags* connection = &options->connection;
  connection->Register(*stat);
  stat->add_flag("--json", options->json, "print JSON");

  CLI::App* pull = cmd->add_subcommand(
      "pull", "Copy an artifact into a local directory (resumable, every sha256 verified)");
  pull->add_option("name", options->name, "the artifact")->required();
  connection->Register(*pull);
  pull->add_option("--out", options->out,
                   "the directory to create (default: the artifact's name); the transfer "
                   "stages in OUT.partial beside it");
  pull->add_option("--chunk-size", options->chunk_bytes,
                   "bytes per chunk asked of the daemon (1 KiB..1 MiB; default 1 MiB)")
      ->check(CLI::Range(1024u, 1u << 20));
  pull->add_option("--limit-rate", options->max_bytes_per_second,
                   "at most this many bytes per second (default: no limit)")
      ->check(CLI::PositiveNumber);
  pull->add_flag("--json", options->json, "print the result as JSON");

  return [options, list, stat, pull]() {
    if (list->parsed()) return RunList(*options);
    if (stat->parsed()) return RunStat(*options);
    if (pull->parsed()) return RunPull(*options);
    return 2;
  };
}

}  // namespace nibble::cli
