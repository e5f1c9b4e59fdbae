// nibbled: the nibble daemon. `nibbled --config FILE [--listen ADDR] [--metrics-listen ADDR]`.
#include <cstdio>
#include <cstdlib>
#include <string>

#include <CLI/CLI.hpp>

#include "server/config.h"
#include "server/daemon.h"

int main(int argc, char** argv) {
  nibble::server::BlockShutdownSignals();  // before any thread starts

  CLI::App app{"nibbled: the nibble daemon (streaming chat over gRPC, Prometheus metrics)"};
  app.set_version_flag("--version", "nibbled 0.1.0");
  std::string config_path;
  std::string listen;
  std::string metrics_listen;
  bool metrics_listen_set = false;
  app.add_option("--config", config_path, "YAML configuration file (deploy/nibbled.yaml)")
      ->required();
  app.add_option("--listen", listen, "gRPC address host:port (overrides `listen`)");
  app.add_option("--metrics-listen", metrics_listen,
                 "Prometheus address host:port, or \"\" for none (overrides `metrics_listen`)")
      ->each([&](const std::string&) { metrics_listen_set = true; });
  CLI11_PARSE(app, argc, argv);

  auto config = nibble::server::LoadServerConfig(config_path);
  if (!config.ok()) {
    std::fprintf(stderr, "nibbled: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  // libgomp reads its wait policy when it loads, before main: only the environment can set
  // it. Spinning idle workers halve throughput on a shared machine (tests/bench/SERVING.md).
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    std::fprintf(stderr,
                 "nibbled: note: OMP_WAIT_POLICY is not set; idle OpenMP threads spin. On a "
                 "machine shared with other work, set OMP_WAIT_POLICY=passive.\n");
  }
  if (!listen.empty()) config->listen_address = listen;
  if (metrics_listen_set) config->metrics_address = metrics_listen;
  return nibble::server::RunDaemon(*config);
}
