#include "server/daemon.h"

#include <signal.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/str_cat.h"
#include "server/artifact_store.h"
#include "server/auth.h"
#include "server/artifacts_service.h"
#include "server/inference_service.h"
#include "server/job_metrics.h"
#include "server/job_runner.h"
#include "server/metrics.h"
#include "server/models_service.h"
#include "server/quantization_service.h"
#include "server/served_model.h"

namespace nibble::server {
namespace {

sigset_t ShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  return set;
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "nibbled: %s\n", message.c_str());
  return 1;
}

}  // namespace

void BlockShutdownSignals() {
  const sigset_t set = ShutdownSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int RunDaemon(const ServerConfig& config) {
  ServedModels models;
  // The metrics endpoint starts before any model loads (it lists models as they come): a
  // model on the GPU loads cuBLAS, whose static TLS leaves too little of civetweb's small
  // worker-thread stacks for glibc to start them (engine/cuda_backend.cc, LoadCublas).
  ServerMetrics metrics(models);
  if (!config.metrics_address.empty()) {
    if (absl::Status s = metrics.Serve(config.metrics_address); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }
  for (const ModelSpec& spec : config.models) {
    const auto load_start = std::chrono::steady_clock::now();
    // Charged against memory_budget like a Models.Load (ServedModels::Charge).
    if (absl::Status s = models.Reserve(spec.name, spec.path); !s.ok()) {
      return Fail(std::string(s.message()));
    }
    auto loaded = LoadServedModel(spec, config.engine, models, config.memory_budget_bytes);
    if (!loaded.ok()) {
      return Fail(absl::StrCat("model \"", spec.name, "\": ", loaded.status().message()));
    }
    std::shared_ptr<ServedModel> served = *std::move(loaded);
    const engine::EngineStats stats = served->engine->Stats();
    std::fprintf(stderr,
                 "nibbled: model \"%s\" loaded from %s in %.2f s (KV cache: %lld blocks of %d "
                 "tokens, %lld bytes; session_len %lld; %s)\n",
                 spec.name.c_str(), spec.path.c_str(),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start)
                     .count(),
                 static_cast<long long>(stats.kv_blocks_total), stats.kv_block_seq_len,
                 static_cast<long long>(stats.kv_cache_bytes),
                 static_cast<long long>(served->engine->session_len()),
                 served->max_piece_bytes > 0
                     ? absl::StrCat("prompts over ", served->max_prompt_weight(),
                                    " bytes refused untokenized")
                           .c_str()
                     : "no prompt byte bound: the tokenizer normalizes text");
    models.Publish(std::move(served));
    metrics.For(spec.name);  // its request series exist (at zero) before the first request
  }
  if (config.models.empty()) {
    std::fprintf(stderr, "nibbled: no models in the config; Models.Load loads them\n");
  }

  // After the models (whose errors come first, as in any config) and before anything that
  // acts (jobs resuming, ports opening): a daemon that would serve the network unprotected
  // does not start.
  absl::StatusOr<ServerSecurity> security =
      MakeServerSecurity(config.listen_address, config.security);
  if (!security.ok()) return Fail(std::string(security.status().message()));
  std::fprintf(stderr, "nibbled: security: %s\n", security->description.c_str());

  // Artifacts (complete ones only) and transfers live in the state directory.
  std::unique_ptr<ArtifactStore> artifact_store;
  if (!config.state_dir.empty()) {
    artifact_store = std::make_unique<ArtifactStore>(config.state_dir);
    if (absl::Status s = artifact_store->Open(); !s.ok()) return Fail(std::string(s.message()));
  }

  // The quantizer role: jobs resume (after a crash too) as soon as the runner starts.
  std::unique_ptr<JobMetrics> job_metrics;
  std::unique_ptr<JobRunner> jobs;
  std::unique_ptr<QuantizationService> quantization;
  if (config.roles.quantizer) {
    job_metrics = std::make_unique<JobMetrics>(metrics.registry());
    auto runner = JobRunner::Start(config.state_dir, config.quantizer, job_metrics.get());
    if (!runner.ok()) return Fail(std::string(runner.status().message()));
    jobs = std::move(runner).value();
    quantization = std::make_unique<QuantizationService>(*jobs);
  } else if (config.state_dir.empty()) {
    std::fprintf(stderr, "nibbled: quantizer role off (no state_dir in the config)\n");
  }

  ServingState state;
  InferenceService inference(models, &metrics, state);
  ModelsService models_service(models, state, config, artifact_store.get(), &metrics);
  std::unique_ptr<ArtifactsService> artifacts;
  if (artifact_store) {
    artifacts = std::make_unique<ArtifactsService>(*artifact_store, &metrics, state,
                                                   config.artifacts.max_upload_bytes);
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config.listen_address, security->credentials, &port);
  // Larger requests get RESOURCE_EXHAUSTED from gRPC before any handler runs.
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_request_bytes));
  builder.RegisterService(&inference);
  builder.RegisterService(&models_service);
  if (artifacts) builder.RegisterService(artifacts.get());
  if (quantization) builder.RegisterService(quantization.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return Fail(absl::StrCat("listen ", config.listen_address,
                             ": cannot serve gRPC there (address in use or not valid?)"));
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(true);
  std::fprintf(stderr, "nibbled: serving on %s (port %d)%s\n", config.listen_address.c_str(),
               port,
               config.metrics_address.empty()
                   ? ""
                   : absl::StrCat(", metrics on http://", config.metrics_address, "/metrics")
                         .c_str());

  const sigset_t signals = ShutdownSignals();
  int signal_number = 0;
  while (sigwait(&signals, &signal_number) != 0) {
  }
  std::fprintf(stderr, "nibbled: %s: draining (grace %.1f s)\n",
               signal_number == SIGTERM ? "SIGTERM" : "SIGINT", config.drain_grace_seconds);

  // 1. Refuse new work and tell the load balancer.
  state.StartDraining();
  health->SetServingStatus(false);
  // 2. Let running calls finish within the grace period (calls being prepared when the drain
  //    began are counted too: ServingState).
  const auto grace_end = std::chrono::steady_clock::now() +
                         std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                             std::chrono::duration<double>(config.drain_grace_seconds));
  const bool drained = state.WaitIdleUntil(grace_end);
  // 3. End the rest (their streams finish with UNAVAILABLE) and stop the engines.
  for (const auto& served : models.all()) served->engine->Shutdown();
  if (!drained) {
    std::fprintf(stderr, "nibbled: grace period over; remaining streams end with UNAVAILABLE\n");
    state.WaitIdleUntil(std::chrono::steady_clock::now() + std::chrono::seconds(5));
  }
  // Running jobs stop at their next check and stay queued on disk; watchers get UNAVAILABLE.
  if (jobs) jobs->Shutdown();
  models_service.Shutdown();  // Load/Unload workers finish their calls
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server->Wait();
  std::fprintf(stderr, "nibbled: stopped\n");
  return 0;
}

}  // namespace nibble::server
