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
  std::string device = "cpu";  // "cpu", "cuda", "cuda:N" (parsed into load.device)
  engine::ModelLoadOptions load;  // dtype -> weight_storage, cpu_threads
};

// The roles a daemon plays (`roles:`, a list of "inference" and "quantizer").
struct Roles {
  bool inference = true;  // Inference and Models: serve chat from the loaded models
  bool quantizer = true;  // Quantization: jobs that make artifacts (needs state_dir)
};

// `quantizer:` — the quantization jobs (server/job_runner.h).
struct QuantizerConfig {
  // Where the model directories a job may quantize live (absolute; relative ones are taken
  // relative to the config file). A request's path must resolve inside one of them.
  std::vector<std::string> model_roots;
  int max_concurrent_jobs = 1;  // jobs running at once (worker threads)
  int max_queued_jobs = 16;     // jobs waiting (>= 1); more are refused: RESOURCE_EXHAUSTED
  // Where a job's AWQ search and evaluation run: cpu, cuda or cuda:N (the GPU computes in
  // fp16 and holds one decoder layer at a time; a build without CUDA fails such jobs).
  std::string device = "cpu";
  // Where the named calibration sets live (ptb/, wikitext-2/, tinystories/); empty: as
  // `nibble quantize` (quant::DefaultDatasetsDir()).
  std::string datasets_dir;
};

// One daemon this one may pull artifacts from (`artifacts.peers`), and how to reach it.
struct ArtifactPeer {
  std::string address;  // host:port, as Models.Load names it
  bool tls = false;     // implied by any of the three files
  std::string tls_ca, tls_cert, tls_key;  // PEM files (cert and key: for mutual TLS)
  std::string token_file;                 // a bearer token with the inference scope
};

// `artifacts:` — artifact transfer and hot loading (Artifacts service, Models.Load).
struct ArtifactsConfig {
  int64_t max_upload_bytes = int64_t{16} << 30;  // Artifacts.Upload: the files summed
  // Where Models.Load {path} may load a model directory from (resolved like model_roots of
  // the quantizer); empty: loading by path is refused.
  std::vector<std::string> model_roots;
  // The daemons Models.Load {peer} may pull from; others are refused (PERMISSION_DENIED).
  std::vector<ArtifactPeer> peers;
  double pull_max_bytes_per_second = 0;  // 0: no limit
};

// `security:` — TLS, mutual TLS and bearer tokens on the gRPC port (server/auth.h). Relative
// paths are relative to the config file. The daemon refuses a non-loopback `listen` without
// TLS and tokens unless `insecure` is true.
struct SecurityConfig {
  std::string tls_cert_file;  // PEM certificate chain of the server; with tls_key_file
  std::string tls_key_file;   // PEM private key; with tls_cert_file
  // Set: mutual TLS. Every client must present a certificate signed by this CA (PEM).
  std::string tls_client_ca_file;
  // Set: every call needs "authorization: Bearer <token>" with a token of this file (lines
  // "<scope> <token>", scope inference or admin). Read at start, never logged.
  std::string tokens_file;
  // Serve a non-loopback address without TLS and tokens: said in so many words, and at start.
  bool insecure = false;

  bool tls() const { return !tls_cert_file.empty(); }
};

struct ServerConfig {
  std::string listen_address = "0.0.0.0:50051";   // gRPC
  std::string metrics_address = "0.0.0.0:9464";   // Prometheus /metrics; empty: off
  double drain_grace_seconds = 30;                // SIGTERM: time running streams get
  // The largest request message gRPC accepts (larger ones get RESOURCE_EXHAUSTED from gRPC
  // itself, before any of our code runs). Bounds the work a call can ask of a handler.
  int64_t max_request_bytes = int64_t{1} << 20;
  std::vector<ModelSpec> models;                  // may be empty (Models.Load adds)
  engine::EngineOptions engine;                   // shared by every model's engine
  // Default: both roles, except that without a state_dir the quantizer is off (said at
  // start); naming the quantizer role without a state_dir is an error.
  Roles roles;
  // The daemon's own files: jobs/ (quantization jobs), artifacts/ (complete artifacts only),
  // transfers/. Relative paths are relative to the config file.
  std::string state_dir;
  QuantizerConfig quantizer;
  SecurityConfig security;
  ArtifactsConfig artifacts;
  // The most memory the served models may take together (weights plus KV cache pool, as
  // each is loaded); a Models.Load past it is refused with RESOURCE_EXHAUSTED. 0: no limit.
  int64_t memory_budget_bytes = 0;
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
