// nibble.v1.Models: what this daemon serves (one model per daemon today, loaded at start).
#pragma once

#include <grpcpp/grpcpp.h>

#include "nibble/v1/models.grpc.pb.h"
#include "server/served_model.h"

namespace nibble::server {

class ModelsService final
    : public nibble::v1::Models::WithCallbackMethod_List<
          nibble::v1::Models::WithRawCallbackMethod_Get<nibble::v1::Models::Service>> {
 public:
  ModelsService(const ServedModels& models, const ServingState& state)
      : models_(models), state_(state) {}

  grpc::ServerUnaryReactor* List(grpc::CallbackServerContext* context,
                                 const nibble::v1::ListModelsRequest* request,
                                 nibble::v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* Get(grpc::CallbackServerContext* context,
                                const grpc::ByteBuffer* request,
                                grpc::ByteBuffer* response) override;

 private:
  void Describe(const ServedModel& model, nibble::v1::ModelInfo* info) const;

  const ServedModels& models_;
  const ServingState& state_;
};

}  // namespace nibble::server
