#include "server/models_service.h"

#include "engine/chat_template.h"
#include "engine/model_config.h"
#include "server/raw_messages.h"

namespace nibble::server {

void ModelsService::Describe(const ServedModel& served, nibble::v1::ModelInfo* info) const {
  const engine::InferenceEngine& engine = *served.engine;
  const engine::Model& model = engine.model();
  const engine::ModelConfig& config = model.config();
  info->set_name(served.spec.name);
  info->set_path(served.spec.path);
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
  info->set_device(served.spec.device);
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
  info->set_state(state_.draining() ? nibble::v1::MODEL_STATE_DRAINING
                                    : nibble::v1::MODEL_STATE_READY);
  info->set_weight_bytes(static_cast<int64_t>(model.weight_bytes()));
}

grpc::ServerUnaryReactor* ModelsService::List(grpc::CallbackServerContext* context,
                                              const nibble::v1::ListModelsRequest* /*request*/,
                                              nibble::v1::ListModelsResponse* response) {
  for (const auto& served : models_.all()) Describe(*served, response->add_models());
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
  ServedModel* model = nullptr;
  if (status.ok()) {
    status = wire.name().empty()
                 ? grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                "field name is empty (Models.List shows the names)")
                 : models_.Find(wire.name(), &model);
  }
  if (status.ok()) {
    nibble::v1::ModelInfo info;
    Describe(*model, &info);
    SerializeResponse(info, response);
  }
  reactor->Finish(status);
  return reactor;
}

}  // namespace nibble::server
