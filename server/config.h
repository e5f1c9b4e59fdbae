// nibbled's configuration: one YAML file, parsed once here into typed option structs. No YAML
// node leaves this file; the engine sees only engine::EngineOptions and ModelLoadOptions.
//
// Every error names the file, the key (dotted path, "models[0].dtype") and the problem;
// unknown keys are errors too, so a mistyped key never silently falls back to a default.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/inference_engine.h"
#include "engine/model.h"

namespace nibble::server {

// One model to load at start (`models:` list).
struct ModelSpec {
  std::string name;    // what clients put in `model` ([A-Za-z0-9._-], 1..64 characters)
  std::string path;    // the model directory; relative paths are relative to the config file
  std::string device = "cpu";  // only "cpu" in this build
  engine::ModelLoadOptions load;  // dtype -> weight_storage, cpu_threads
};

struct ServerConfig {
  std::string listen_address = "0.0.0.0:50051";   // gRPC
  std::string metrics_address = "0.0.0.0:9464";   // Prometheus /metrics; empty: off
  double drain_grace_seconds = 30;                // SIGTERM: time running streams get
  // The largest request message gRPC accepts (larger ones get RESOURCE_EXHAUSTED from gRPC
  // itself, before any of our code runs). Bounds the work a call can ask of a handler.
  int64_t max_request_bytes = int64_t{1} << 20;
  std::vector<ModelSpec> models;                  // at least one
  engine::EngineOptions engine;                   // shared by every model's engine
};

// Parses YAML text; `source` names it in errors (usually the file's path) and `base_dir`
// resolves relative model paths. InvalidArgument naming the key on any problem.
absl::StatusOr<ServerConfig> ParseServerConfig(std::string_view yaml_text,
                                               const std::string& source,
                                               const std::string& base_dir);

// Reads and parses a file. NotFound / InvalidArgument naming the file (and the key).
absl::StatusOr<ServerConfig> LoadServerConfig(const std::string& path);

// "1GiB", "512MiB", "64MB", "1048576" -> bytes; InvalidArgument for anything else.
absl::StatusOr<int64_t> ParseByteSize(std::string_view text);

}  // namespace nibble::server
