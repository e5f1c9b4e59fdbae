// nibble.v1.Quantization over the JobRunner (server/job_runner.h): the wire side only —
// requests parsed (raw, so that a bad one gets INVALID_ARGUMENT naming the field), turned into
// JobSpecs, statuses mapped (server/grpc_status.h); one ServerWriteReactor per WatchJob.
//
// Registered by the daemon only when the `quantizer` role is on.
#pragma once

#include <grpcpp/grpcpp.h>

#include "nibble/v1/quantization.grpc.pb.h"
#include "server/job_runner.h"

namespace nibble::server {

using QuantizationServiceBase = nibble::v1::Quantization::WithRawCallbackMethod_SubmitJob<
    nibble::v1::Quantization::WithRawCallbackMethod_GetJob<
        nibble::v1::Quantization::WithRawCallbackMethod_WatchJob<
            nibble::v1::Quantization::WithRawCallbackMethod_CancelJob<
                nibble::v1::Quantization::WithRawCallbackMethod_ListJobs<
                    nibble::v1::Quantization::WithRawCallbackMethod_DeleteJob<
                        nibble::v1::Quantization::Service>>>>>>;

// The job as the wire shows it.
void DescribeJob(const JobSnapshot& snapshot, nibble::v1::Job* job);

class QuantizationService final : public QuantizationServiceBase {
 public:
  // `runner` must outlive the service and every call it started (the daemon shuts the gRPC
  // server down before destroying the runner).
  explicit QuantizationService(JobRunner& runner) : runner_(runner) {}

  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const grpc::ByteBuffer* request,
                                      grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* WatchJob(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const grpc::ByteBuffer* request,
                                      grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* DeleteJob(grpc::CallbackServerContext* context,
                                      const grpc::ByteBuffer* request,
                                      grpc::ByteBuffer* response) override;

 private:
  JobRunner& runner_;
};

}  // namespace nibble::server
