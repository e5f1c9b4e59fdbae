#include "server/models_service.h"

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engine/chat_template.h"
#include "engine/model_config.h"
#include "rpc/channel.h"
#include "server/artifact_puller.h"
#include "server/grpc_status.h"
#include "server/path_policy.h"
#include "server/raw_messages.h"
#include "server/unary_call.h"

namespace nibble::server {
namespace {

grpc::Status Invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

}  // namespace

void ModelsService::Shutdown() {
  stopping_ = true;
  std::list<Worker> workers;
  {
    std::lock_guard<std::mutex> lock(workers_mu_);
    workers.swap(workers_);
  }
  for (Worker& worker : workers) worker.thread.join();
}

void ModelsService::Spawn(std::function<void()> work) {
  std::lock_guard<std::mutex> lock(workers_mu_);
  // Reap the finished ones, so a long-running daemon does not collect thread handles.
  for (auto it = workers_.begin(); it != workers_.end();) {
    if (it->done->load()) {
      it->thread.join();
      it = workers_.erase(it);
    } else {
      ++it;
    }
  }
  auto done = std::make_shared<std::atomic<bool>>(false);
  workers_.push_back(Worker{std::thread([work = std::move(work), done] {
                              work();
                              done->store(true);
                            }),
                            done});
}

void ModelsService::Describe(const ServedModel& served, nibble::v1::ModelInfo* info) const {
  info->set_name(served.spec.name);
  info->set_path(served.spec.path);
  info->set_device(served.spec.device);
  const ModelState model_state = served.state.load();
  if (model_state == ModelState::kLoading || served.engine == nullptr) {
    info->set_state(nibble::v1::MODEL_STATE_LOADING);
    return;
  }
  const engine::InferenceEngine& engine = *served.engine;
  const engine::Model& model = engine.model();
  const engine::ModelConfig& config = model.config();
  info->set_architecture(std::string(engine::ArchitectureName(config.architecture)));
  auto* quant = info->mutable_quantization();
  const bool f16 = served.spec.load.weight_storage == engine::WeightStorage::kF16;
  if (config.awq) {
    quant->set_method("awq");
    quant->set_bits(4);
    quant->set_group_size(config.awq->group_size);
  } else {
    quant->set_method("none");
    quant->set_bits(f16 ? 16 : 32);
  }
  quant->set_weight_dtype(f16 ? "float16" : "float32");
  info->set_context_length(config.max_position_embeddings);
  info->set_vocab_size(config.vocab_size);
  info->set_chat_template(std::string(engine::ChatTemplateName(model.chat_template().kind())));
  const engine::EngineOptions& options = engine.options();
  const engine::EngineStats stats = engine.Stats();
  auto* cache = info->mutable_cache();
  cache->set_cache_max_entry_count(options.cache_max_entry_count);
  cache->set_cache_block_seq_len(options.cache_block_seq_len);
  cache->set_cache_chunk_size(options.cache_chunk_size);
  cache->set_session_len(engine.session_len());
  cache->set_max_batch_size(options.max_batch_size);
  cache->set_max_queued_requests(options.max_queued_requests);
  cache->set_kv_blocks_total(stats.kv_blocks_total);
  cache->set_kv_cache_bytes(stats.kv_cache_bytes);
  info->set_state(state_.draining() || model_state == ModelState::kDraining
                      ? nibble::v1::MODEL_STATE_DRAINING
                      : nibble::v1::MODEL_STATE_READY);
  info->set_weight_bytes(static_cast<int64_t>(model.weight_bytes()));
}

grpc::ServerUnaryReactor* ModelsService::List(grpc::CallbackServerContext* context,
                                              const nibble::v1::ListModelsRequest* /*request*/,
                                              nibble::v1::ListModelsResponse* response) {
  for (const auto& served : models_.listing()) Describe(*served, response->add_models());
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* ModelsService::Get(grpc::CallbackServerContext* context,
                                             const grpc::ByteBuffer* request,
                                             grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  nibble::v1::GetModelRequest wire;
  grpc::Status status = ParseRequest(*request, &wire);
  std::shared_ptr<ServedModel> model;
  if (status.ok()) {
    status = wire.name().empty() ? Invalid("field name is empty (Models.List shows the names)")
                                 : models_.Get(wire.name(), &model);
  }
  if (status.ok()) {
    nibble::v1::ModelInfo info;
    Describe(*model, &info);
    SerializeResponse(info, response);
  }
  reactor->Finish(status);
  return reactor;
}

grpc::Status ModelsService::PrepareLoad(const nibble::v1::LoadModelRequest& request,
                                        ModelSpec* spec, std::string* artifact,
                                        const ArtifactPeer** peer) {
  std::string default_name;
  switch (request.source_case()) {
    case nibble::v1::LoadModelRequest::kArtifact: {
      if (store_ == nullptr) {
        return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                            "this daemon has no state_dir, so no artifacts to load");
      }
      // Only named and present here: verifying hashes every file, which the worker does
      // (RunLoad), not this gRPC thread.
      if (absl::Status s = CheckArtifactName(request.artifact()); !s.ok()) {
        return Invalid(absl::StrCat("field artifact: ", s.message()));
      }
      const std::filesystem::path dir = store_->artifacts_dir() / request.artifact();
      std::error_code ec;
      if (!std::filesystem::exists(std::filesystem::symlink_status(dir, ec))) {
        return grpc::Status(grpc::StatusCode::NOT_FOUND,
                            absl::StrCat("no artifact named \"", request.artifact(),
                                         "\" on this daemon (Artifacts.List shows them)"));
      }
      spec->path = dir.string();
      *artifact = request.artifact();
      default_name = request.artifact();
      break;
    }
    case nibble::v1::LoadModelRequest::kPath: {
      std::vector<std::filesystem::path> roots(config_.artifacts.model_roots.begin(),
                                               config_.artifacts.model_roots.end());
      if (roots.empty()) {
        return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                            "loading a model directory by path is off on this daemon (the "
                            "config names no artifacts.model_roots)");
      }
      auto confined = ConfineToRoots(request.path(), roots);
      if (!confined.ok()) return ToGrpcStatus(confined.status());
      std::error_code ec;
      if (!std::filesystem::is_directory(*confined, ec)) {
        return grpc::Status(grpc::StatusCode::NOT_FOUND,
                            absl::StrCat("path \"", request.path(), "\" is not a model directory"));
      }
      spec->path = confined->string();
      default_name = confined->filename().string();
      break;
    }
    case nibble::v1::LoadModelRequest::kPeer: {
      if (store_ == nullptr) {
        return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                            "this daemon has no state_dir to pull artifacts into");
      }
      if (absl::Status s = CheckArtifactName(request.peer().artifact()); !s.ok()) {
        return Invalid(absl::StrCat("field peer.artifact: ", s.message()));
      }
      std::string known;
      for (const ArtifactPeer& candidate : config_.artifacts.peers) {
        if (candidate.address == request.peer().address()) *peer = &candidate;
        absl::StrAppend(&known, known.empty() ? "" : ", ", candidate.address);
      }
      if (*peer == nullptr) {
        return grpc::Status(
            grpc::StatusCode::PERMISSION_DENIED,
            absl::StrCat("peer \"", request.peer().address().substr(0, 256),
                         "\" is not one of this daemon's artifacts.peers (",
                         known.empty() ? "none configured" : known, ")"));
      }
      *artifact = request.peer().artifact();
      spec->path = (store_->artifacts_dir() / *artifact).string();
      default_name = *artifact;
      break;
    }
    case nibble::v1::LoadModelRequest::SOURCE_NOT_SET:
      return Invalid("name the model to load: one of artifact, path or peer");
  }
  spec->name = request.name().empty() ? default_name : request.name();
  if (absl::Status s = CheckArtifactName(spec->name); !s.ok()) {
    return Invalid(absl::StrCat("field name: ", s.message()));
  }
  if (request.dtype() == "float16") {
    spec->load.weight_storage = engine::WeightStorage::kF16;
  } else if (!request.dtype().empty() && request.dtype() != "float32") {
    return Invalid(absl::StrCat("field dtype: \"", request.dtype().substr(0, 64),
                                "\" is not float32 or float16"));
  }
  if (request.cpu_threads() < 0 || request.cpu_threads() > 1024) {
    return Invalid(absl::StrCat("field cpu_threads: must be in [0, 1024], got ",
                                request.cpu_threads()));
  }
  spec->load.cpu_threads = request.cpu_threads();
  return ToGrpcStatus(models_.Reserve(spec->name, spec->path));
}

absl::Status ModelsService::Pull(const ArtifactPeer& peer, const std::string& artifact) {
  rpc::ClientSecurity security;
  security.tls = peer.tls;
  security.ca_file = peer.tls_ca;
  security.cert_file = peer.tls_cert;
  security.key_file = peer.tls_key;
  if (!peer.token_file.empty()) {
    auto token = rpc::ReadTokenFile(peer.token_file);
    if (!token.ok()) return token.status();
    security.token = *std::move(token);
  }
  auto channel = rpc::OpenChannel(peer.address, security);
  if (!channel.ok()) return channel.status();
  auto lease = store_->BeginTransfer(artifact);
  if (!lease.ok()) return lease.status();
  PullOptions options;
  options.max_bytes_per_second = config_.artifacts.pull_max_bytes_per_second;
  options.on_bytes = [this](uint64_t bytes) {
    if (metrics_ != nullptr) metrics_->AddTransferBytes("received", bytes);
  };
  options.should_stop = [this] { return stopping_.load(); };
  const auto start = std::chrono::steady_clock::now();
  auto result = PullArtifact(*channel, peer.address, security, artifact,
                             store_->TransferDir(*lease).string(),
                             (store_->artifacts_dir() / artifact).string(), options);
  if (!result.ok()) {
    if (metrics_ != nullptr) metrics_->CountTransferFailure("received");
    const absl::StatusCode code = result.status().code();
    if (code == absl::StatusCode::kUnauthenticated || code == absl::StatusCode::kPermissionDenied) {
      // The peer refused this daemon's credentials, not the caller's: not the caller's code.
      return absl::FailedPreconditionError(absl::StrCat(
          "the peer refused this daemon (check its artifacts.peers entry for ", peer.address,
          ": tls files, token_file): ", result.status().message()));
    }
    return result.status();
  }
  std::fprintf(stderr,
               "nibbled: artifact \"%s\" pulled from %s in %.2f s (%llu bytes, %llu of them "
               "resumed from an earlier pull)\n",
               artifact.c_str(), peer.address.c_str(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
               static_cast<unsigned long long>(result->bytes_total),
               static_cast<unsigned long long>(result->bytes_resumed));
  return absl::OkStatus();
}

absl::Status ModelsService::RunLoad(const ModelSpec& spec, const std::string& artifact,
                                    const ArtifactPeer* peer) {
  if (peer != nullptr) {
    // An artifact of that name here already: load it rather than pull (a copy that does not
    // verify is refused, never overwritten behind the operator's back).
    auto local = store_->Find(artifact);
    if (local.ok()) {
      if (!local->status.ok()) return local->status;
    } else if (absl::IsNotFound(local.status())) {
      if (absl::Status s = Pull(*peer, artifact); !s.ok()) return s;
    } else {
      return local.status();
    }
  }
  if (!artifact.empty()) {
    // Checked again now: the files the engine is about to read match the manifest.
    auto verified = store_->FindVerified(artifact);
    if (!verified.ok()) return verified.status();
  }
  const auto start = std::chrono::steady_clock::now();
  auto served =
      LoadServedModel(spec, config_.engine, models_, config_.memory_budget_bytes);
  if (!served.ok()) return served.status();
  (*served)->artifact = artifact;
  const engine::EngineStats stats = (*served)->engine->Stats();
  std::fprintf(stderr,
               "nibbled: model \"%s\" loaded from %s in %.2f s (Models.Load; KV cache %lld "
               "bytes, %lld bytes in all)\n",
               spec.name.c_str(), spec.path.c_str(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
               static_cast<long long>(stats.kv_cache_bytes),
               static_cast<long long>((*served)->memory_bytes));
  if (metrics_ != nullptr) metrics_->For(spec.name);
  models_.Publish(*std::move(served));
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* ModelsService::Load(grpc::CallbackServerContext* context,
                                              const grpc::ByteBuffer* request,
                                              grpc::ByteBuffer* response) {
  UnaryCall<nibble::v1::LoadModelRequest> call(context, state_, request);
  ModelSpec spec;
  std::string artifact;
  const ArtifactPeer* peer = nullptr;
  if (call.ok()) call.set_status(PrepareLoad(call.wire(), &spec, &artifact, &peer));
  if (!call.ok()) return call.Finish();
  grpc::ServerUnaryReactor* reactor = call.Release();  // the worker ends the call
  Spawn([this, reactor, response, spec, artifact, peer] {
    absl::Status loaded = RunLoad(spec, artifact, peer);
    grpc::Status result = ToGrpcStatus(loaded);
    if (loaded.ok()) {
      std::shared_ptr<ServedModel> model;
      result = models_.Get(spec.name, &model);
      if (result.ok()) {
        nibble::v1::ModelInfo info;
        Describe(*model, &info);
        SerializeResponse(info, response);
      }
    } else {
      models_.Remove(spec.name);
      std::fprintf(stderr, "nibbled: Models.Load of \"%s\" failed: %s\n", spec.name.c_str(),
                   std::string(loaded.message()).c_str());
    }
    reactor->Finish(result);
    state_.CallDone();
  });
  return reactor;
}

grpc::ServerUnaryReactor* ModelsService::Unload(grpc::CallbackServerContext* context,
                                                const grpc::ByteBuffer* request,
                                                grpc::ByteBuffer* response) {
  UnaryCall<nibble::v1::UnloadModelRequest> call(context, state_, request);
  const nibble::v1::UnloadModelRequest& wire = call.wire();
  if (call.ok() && wire.name().empty()) {
    call.set_status(Invalid("field name is empty (Models.List shows the names)"));
  }
  if (call.ok() && !(wire.timeout_seconds() >= 0 && wire.timeout_seconds() <= 86400)) {
    call.set_status(Invalid(absl::StrCat("field timeout_seconds: must be in [0, 86400], got ",
                                         wire.timeout_seconds())));
  }
  std::shared_ptr<ServedModel> model;
  if (call.ok()) call.set_status(models_.StartUnload(wire.name(), &model));
  if (!call.ok()) return call.Finish();
  grpc::ServerUnaryReactor* reactor = call.Release();  // the worker ends the call
  const bool cancel = wire.mode() == nibble::v1::UNLOAD_MODE_CANCEL;
  const double grace =
      wire.timeout_seconds() > 0 ? wire.timeout_seconds() : config_.drain_grace_seconds;
  Spawn([this, reactor, response, model, cancel, grace] {
    if (!cancel) {
      model->WaitIdleUntil(std::chrono::steady_clock::now() +
                           std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                               std::chrono::duration<double>(grace)));
    }
    // The calls that still hold the model (ModelRef): what the shutdown below ends. (The
    // engine's published stats lag its scheduler by up to a step: a stream whose first token
    // the client has seen could still count as not running there.)
    const int ended = model->active_calls();
    models_.Remove(model->spec.name);
    // Ends what still runs (UNAVAILABLE); the streams keep the model alive until they end.
    model->engine->Shutdown();
    std::fprintf(stderr, "nibbled: model \"%s\" unloaded (%s; %d requests ended)\n",
                 model->spec.name.c_str(), cancel ? "cancel" : "drain", ended);
    nibble::v1::UnloadModelResponse out;
    out.set_requests_ended(ended);
    SerializeResponse(out, response);
    reactor->Finish(grpc::Status::OK);
    state_.CallDone();
  });
  return reactor;
}

}  // namespace nibble::server
