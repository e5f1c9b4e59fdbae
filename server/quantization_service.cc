#include "server/quantization_service.h"

#include <deque>
#include <mutex>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "server/grpc_status.h"
#include "server/raw_messages.h"

namespace nibble::server {
namespace {

nibble::v1::JobState WireState(JobState state) {
  switch (state) {
    case JobState::kQueued: return nibble::v1::JOB_STATE_QUEUED;
    case JobState::kRunning: return nibble::v1::JOB_STATE_RUNNING;
    case JobState::kSucceeded: return nibble::v1::JOB_STATE_SUCCEEDED;
    case JobState::kFailed: return nibble::v1::JOB_STATE_FAILED;
    case JobState::kCancelled: return nibble::v1::JOB_STATE_CANCELLED;
  }
  return nibble::v1::JOB_STATE_UNSPECIFIED;
}

JobSpec SpecFromWire(const nibble::v1::SubmitJobRequest& request) {
  JobSpec spec;
  if (request.source_case() == nibble::v1::SubmitJobRequest::kModelPath) {
    spec.model_path = request.model_path();
  } else if (request.source_case() == nibble::v1::SubmitJobRequest::kArtifact) {
    spec.source_artifact = request.artifact();
  }
  const nibble::v1::QuantizationOptions& o = request.options();
  spec.method = o.method();
  spec.w_bits = o.w_bits();
  spec.group_size = o.w_group_size();
  spec.calib_dataset = o.calib_dataset();
  spec.calib_samples = o.calib_samples();
  spec.calib_seqlen = o.calib_seqlen();
  spec.calib_seed = o.calib_seed();
  spec.eval_dataset = o.eval_dataset();
  spec.eval_windows = o.eval_windows();
  spec.output_artifact = request.output_artifact();
  return spec;
}

// A job id from a request: checked before the runner looks it up (ids are path components).
grpc::Status CheckId(const std::string& id) {
  if (id.empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "field id is empty (ListJobs shows the jobs)");
  }
  if (!IsJobId(id)) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        "no job \"" + id + "\" (job ids are 16 hexadecimal digits)");
  }
  return grpc::Status::OK;
}

// The reply of SubmitJob, GetJob and CancelJob: the job the runner returned, or its error.
grpc::Status ReplyJob(const absl::StatusOr<JobSnapshot>& job, nibble::v1::Job& out) {
  if (!job.ok()) return ToGrpcStatus(job.status());
  DescribeJob(*job, &out);
  return grpc::Status::OK;
}

// A unary call: parse, run `handle` (which fills `out` on success), reply.
template <class Request, class Response, class Handle>
grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* context,
                                const grpc::ByteBuffer* request, grpc::ByteBuffer* response,
                                Handle handle) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Request wire;
  grpc::Status status = ParseRequest(*request, &wire);
  Response out;
  if (status.ok()) status = handle(wire, out);
  if (status.ok()) SerializeResponse(out, response);
  reactor->Finish(status);
  return reactor;
}

// One WatchJob call: the runner's updates become JobEvents, one write in flight at a time.
// Updates that arrive meanwhile are queued, except that one that only moves within the same
// step (the next tensor of the same phase, the time) replaces the last queued one: a slow
// watcher still sees every state, phase and layer, and the queue stays as short as the job's
// list of steps. Deletes itself in OnDone, after leaving the runner's watchers.
class JobWatchStream final : public grpc::ServerWriteReactor<grpc::ByteBuffer>,
                             public JobWatcher {
 public:
  JobWatchStream(JobRunner& runner, std::string id) : runner_(runner), id_(std::move(id)) {}

  // Registers with the runner, which sends the job as it is now at once.
  void Start() {
    const absl::Status status = runner_.Watch(id_, this);
    if (!status.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      FinishLocked(ToGrpcStatus(status));
    }
  }

  void OnJobUpdate(const JobSnapshot& snapshot, bool last) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_ || end_status_) return;
    nibble::v1::JobEvent event;
    DescribeJob(snapshot, event.mutable_job());
    const JobProgress& p = snapshot.progress;
    std::string step = absl::StrCat(static_cast<int>(snapshot.record.state), "|", p.phase, "|",
                                    p.layer, "|", p.layers_done, "|",
                                    snapshot.record.cancel_requested);
    if (pending_.empty() || pending_.back().first != step) pending_.emplace_back(step, grpc::ByteBuffer());
    SerializeResponse(event, &pending_.back().second);
    if (last) end_status_ = grpc::Status::OK;
    if (!writing_) WriteLocked();
  }

  void OnJobWatchClosed(const absl::Status& why) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_ || end_status_) return;
    end_status_ = ToGrpcStatus(why);
    if (!writing_ && pending_.empty()) FinishLocked(*end_status_);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) {  // the client went away
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the watcher went away"));
      return;
    }
    if (!pending_.empty()) {
      WriteLocked();
    } else if (end_status_) {
      FinishLocked(*end_status_);
    }
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "the watch was cancelled"));
  }

  void OnDone() override {
    runner_.Unwatch(id_, this);
    delete this;
  }

 private:
  void WriteLocked() {
    if (finished_) return;
    writing_ = true;
    writing_buffer_ = std::move(pending_.front().second);
    pending_.pop_front();
    StartWrite(&writing_buffer_);
  }

  void FinishLocked(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  JobRunner& runner_;
  const std::string id_;
  std::mutex mu_;
  // Guarded by mu_: the events to write next, each with its step (see above).
  std::deque<std::pair<std::string, grpc::ByteBuffer>> pending_;
  grpc::ByteBuffer writing_buffer_;  // guarded by mu_: the event being written
  bool writing_ = false;             // guarded by mu_
  bool finished_ = false;            // guarded by mu_: Finish was called
  std::optional<grpc::Status> end_status_;  // guarded by mu_: finish after the pending write
};

}  // namespace

void DescribeJob(const JobSnapshot& snapshot, nibble::v1::Job* job) {
  const JobRecord& r = snapshot.record;
  job->set_id(r.id);
  job->set_state(WireState(r.state));
  if (!r.spec.model_path.empty()) job->set_model_path(r.spec.model_path);
  if (!r.spec.source_artifact.empty()) job->set_source_artifact(r.spec.source_artifact);
  nibble::v1::QuantizationOptions* o = job->mutable_options();
  o->set_method(r.spec.method);
  o->set_w_bits(r.spec.w_bits);
  o->set_w_group_size(r.spec.group_size);
  o->set_calib_dataset(r.spec.calib_dataset);
  o->set_calib_samples(r.spec.calib_samples);
  o->set_calib_seqlen(r.spec.calib_seqlen);
  o->set_calib_seed(r.spec.calib_seed);
  o->set_eval_dataset(r.spec.eval_dataset);
  o->set_eval_windows(r.spec.eval_windows);
  job->set_output_artifact(r.spec.output_artifact);
  job->set_created_unix_ms(r.created_unix_ms);
  job->set_started_unix_ms(r.started_unix_ms);
  job->set_finished_unix_ms(r.finished_unix_ms);
  job->set_error(r.error);
  job->set_artifact(r.artifact);
  job->set_cancel_requested(r.cancel_requested);
  job->set_runs(r.runs);
  const JobProgress& p = snapshot.progress;
  nibble::v1::JobProgress* progress = job->mutable_progress();
  progress->set_phase(p.phase);
  progress->set_layer(p.layer);
  progress->set_layers(p.layers);
  progress->set_layers_done(p.layers_done);
  progress->set_tensor(p.tensor);
  progress->set_tensors_done(p.tensors_done);
  progress->set_tensors_total(p.tensors_total);
  progress->set_elapsed_seconds(p.elapsed_seconds);
  if (p.estimated_remaining_seconds) {
    progress->set_estimated_remaining_seconds(*p.estimated_remaining_seconds);
  }
  progress->set_resumed(p.resumed);
}

grpc::ServerUnaryReactor* QuantizationService::SubmitJob(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* request,
                                                         grpc::ByteBuffer* response) {
  return Unary<nibble::v1::SubmitJobRequest, nibble::v1::Job>(
      context, request, response, [&](const auto& wire, nibble::v1::Job& out) {
        return ReplyJob(runner_.Submit(SpecFromWire(wire)), out);
      });
}

grpc::ServerUnaryReactor* QuantizationService::GetJob(grpc::CallbackServerContext* context,
                                                      const grpc::ByteBuffer* request,
                                                      grpc::ByteBuffer* response) {
  return Unary<nibble::v1::GetJobRequest, nibble::v1::Job>(
      context, request, response, [&](const auto& wire, nibble::v1::Job& out) {
        if (grpc::Status s = CheckId(wire.id()); !s.ok()) return s;
        return ReplyJob(runner_.Get(wire.id()), out);
      });
}

grpc::ServerUnaryReactor* QuantizationService::CancelJob(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* request,
                                                         grpc::ByteBuffer* response) {
  return Unary<nibble::v1::CancelJobRequest, nibble::v1::Job>(
      context, request, response, [&](const auto& wire, nibble::v1::Job& out) {
        if (grpc::Status s = CheckId(wire.id()); !s.ok()) return s;
        return ReplyJob(runner_.Cancel(wire.id()), out);
      });
}

grpc::ServerUnaryReactor* QuantizationService::ListJobs(grpc::CallbackServerContext* context,
                                                        const grpc::ByteBuffer* request,
                                                        grpc::ByteBuffer* response) {
  return Unary<nibble::v1::ListJobsRequest, nibble::v1::ListJobsResponse>(
      context, request, response, [&](const auto&, nibble::v1::ListJobsResponse& out) {
        for (const JobSnapshot& job : runner_.List()) DescribeJob(job, out.add_jobs());
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* QuantizationService::DeleteJob(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* request,
                                                         grpc::ByteBuffer* response) {
  return Unary<nibble::v1::DeleteJobRequest, nibble::v1::DeleteJobResponse>(
      context, request, response, [&](const auto& wire, nibble::v1::DeleteJobResponse&) {
        if (grpc::Status s = CheckId(wire.id()); !s.ok()) return s;
        return ToGrpcStatus(runner_.Delete(wire.id(), wire.delete_artifact()));
      });
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* QuantizationService::WatchJob(
    grpc::CallbackServerContext* /*context*/, const grpc::ByteBuffer* request) {
  nibble::v1::WatchJobRequest wire;
  grpc::Status status = ParseRequest(*request, &wire);
  if (status.ok()) status = CheckId(wire.id());
  auto* stream = new JobWatchStream(runner_, status.ok() ? wire.id() : std::string());
  if (!status.ok()) {
    stream->OnJobWatchClosed(absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                                          status.error_message()));
  } else {
    stream->Start();
  }
  return stream;
}

}  // namespace nibble::server
