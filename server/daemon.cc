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
#include "server/inference_service.h"
#include "server/metrics.h"
#include "server/models_service.h"
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
  for (const ModelSpec& spec : config.models) {
    const auto load_start = std::chrono::steady_clock::now();
    auto model = engine::Model::Load(spec.path, spec.load);
    if (!model.ok()) {
      return Fail(absl::StrCat("model \"", spec.name, "\": ", model.status().message()));
    }
    auto engine = engine::InferenceEngine::Start(std::move(model).value(), config.engine);
    if (!engine.ok()) {
      return Fail(absl::StrCat("model \"", spec.name, "\": the engine did not start: ",
                               engine.status().message()));
    }
    auto served = std::make_unique<ServedModel>();
    served->spec = spec;
    served->engine = std::move(engine).value();
    served->max_piece_bytes = PromptByteBound(served->engine->model().tokenizer());
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
    models.Add(std::move(served));
  }

  ServerMetrics metrics(models);
  if (!config.metrics_address.empty()) {
    if (absl::Status s = metrics.Serve(config.metrics_address); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }

  ServingState state;
  InferenceService inference(models, &metrics, state);
  ModelsService models_service(models, state);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config.listen_address, grpc::InsecureServerCredentials(), &port);
  // Larger requests get RESOURCE_EXHAUSTED from gRPC before any handler runs.
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_request_bytes));
  builder.RegisterService(&inference);
  builder.RegisterService(&models_service);
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
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server->Wait();
  std::fprintf(stderr, "nibbled: stopped\n");
  return 0;
}

}  // namespace nibble::server
