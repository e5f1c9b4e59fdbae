// nibble.v1.Artifacts over the ArtifactStore: List, Stat, Download (one ServerWriteReactor per
// stream, one chunk read and written at a time: back-pressure is the client's reading pace),
// Upload (one ServerReadReactor per stream, chunks appended as they arrive, the whole
// directory verified and renamed into place at the end on a thread of its own, since hashing
// every file is too slow for a gRPC callback thread).
//
// Every call is counted in ServingState like an inference call, so a drain waits for running
// transfers (up to the grace period).
#pragma once

#include <cstdint>

#include <grpcpp/grpcpp.h>

#include "nibble/v1/artifacts.grpc.pb.h"
#include "server/artifact_store.h"
#include "server/metrics.h"
#include "server/served_model.h"

namespace nibble::server {

using ArtifactsServiceBase = nibble::v1::Artifacts::WithRawCallbackMethod_List<
    nibble::v1::Artifacts::WithRawCallbackMethod_Stat<
        nibble::v1::Artifacts::WithRawCallbackMethod_Download<
            nibble::v1::Artifacts::WithRawCallbackMethod_Upload<
                nibble::v1::Artifacts::Service>>>>;

class ArtifactsService final : public ArtifactsServiceBase {
 public:
  // All must outlive the service and its calls. `max_upload_bytes`: the most an upload may
  // carry (its files summed).
  ArtifactsService(ArtifactStore& store, const ServerMetrics* metrics, ServingState& state,
                   int64_t max_upload_bytes)
      : store_(store), metrics_(metrics), state_(state), max_upload_bytes_(max_upload_bytes) {}

  grpc::ServerUnaryReactor* List(grpc::CallbackServerContext* context,
                                 const grpc::ByteBuffer* request,
                                 grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Stat(grpc::CallbackServerContext* context,
                                 const grpc::ByteBuffer* request,
                                 grpc::ByteBuffer* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Download(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* Upload(grpc::CallbackServerContext* context,
                                                    grpc::ByteBuffer* response) override;

 private:
  ArtifactStore& store_;
  const ServerMetrics* metrics_;  // null: no metrics
  ServingState& state_;
  const int64_t max_upload_bytes_;
};

}  // namespace nibble::server
