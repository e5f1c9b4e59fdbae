// nibble.v1.Models: what this daemon serves (List, Get), and hot loading (Load, Unload).
//
// Load and Unload take long (a pull, reading weights, waiting for streams to drain), so
// their handlers only check the request and reserve the name, then hand the work to a thread
// of their own that finishes the call. The service joins those threads when it is destroyed
// (after the daemon's drain), after asking running pulls to stop (they resume next time).
// A Load whose client goes away runs to its end: the model is then served all the same.
#pragma once

#include <atomic>
#include <list>
#include <mutex>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "nibble/v1/models.grpc.pb.h"
#include "server/artifact_store.h"
#include "server/config.h"
#include "server/metrics.h"
#include "server/served_model.h"

namespace nibble::server {

using ModelsServiceBase = nibble::v1::Models::WithCallbackMethod_List<
    nibble::v1::Models::WithRawCallbackMethod_Get<
        nibble::v1::Models::WithRawCallbackMethod_Load<
            nibble::v1::Models::WithRawCallbackMethod_Unload<nibble::v1::Models::Service>>>>;

class ModelsService final : public ModelsServiceBase {
 public:
  // All must outlive the service. `store`: null when the daemon has no state_dir (Load of an
  // artifact or from a peer is then refused); `metrics` may be null.
  ModelsService(ServedModels& models, ServingState& state, const ServerConfig& config,
                ArtifactStore* store, const ServerMetrics* metrics)
      : models_(models), state_(state), config_(config), store_(store), metrics_(metrics) {}
  ~ModelsService() override { Shutdown(); }

  // Stops running pulls (they resume at the next Load) and waits for every Load and Unload
  // worker to finish its call. Call after the engines shut down (an Unload that drains then
  // ends at once) and before the gRPC server shuts down (the workers finish their calls).
  void Shutdown();

  grpc::ServerUnaryReactor* List(grpc::CallbackServerContext* context,
                                 const nibble::v1::ListModelsRequest* request,
                                 nibble::v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* Get(grpc::CallbackServerContext* context,
                                const grpc::ByteBuffer* request,
                                grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Load(grpc::CallbackServerContext* context,
                                 const grpc::ByteBuffer* request,
                                 grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Unload(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;

 private:
  void Describe(const ServedModel& model, nibble::v1::ModelInfo* info) const;
  // Checks the request and reserves the name; fills what the worker needs.
  grpc::Status PrepareLoad(const nibble::v1::LoadModelRequest& request, ModelSpec* spec,
                           std::string* artifact, const ArtifactPeer** peer);
  // The worker: pull (for a peer), load, charge, start, publish.
  absl::Status RunLoad(const ModelSpec& spec, const std::string& artifact,
                       const ArtifactPeer* peer);
  absl::Status Pull(const ArtifactPeer& peer, const std::string& artifact);
  // Runs `work` on a thread the destructor joins.
  void Spawn(std::function<void()> work);

  ServedModels& models_;
  ServingState& state_;
  const ServerConfig& config_;
  ArtifactStore* const store_;
  const ServerMetrics* const metrics_;

  std::atomic<bool> stopping_{false};
  std::mutex workers_mu_;
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::list<Worker> workers_;  // guarded by workers_mu_
};

}  // namespace nibble::server
