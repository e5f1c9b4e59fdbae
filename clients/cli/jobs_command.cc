// `nibble jobs submit|watch|get|list|cancel|delete`: quantization jobs on a daemon with the
// quantizer role (nibble.v1.Quantization). Every subcommand takes the connection flags
// (connection_flags.h). Output: one line a person reads, or --json (the protobuf JSON
// mapping, field names as in the .proto: int64 fields are strings there).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "clients/cli/commands.h"
#include "clients/cli/connection_flags.h"
#include "nibble/v1/quantization.grpc.pb.h"
#include "rpc/channel.h"

namespace nibble::cli {
namespace {

struct JobsOptions {
  ConnectionFlags connection;
  bool json = false;
  std::string id;
  // submit
  std::string model_path;
  std::string artifact;
  std::string output;
  std::string method = "awq";
  int64_t w_bits = 4, group_size = 128, calib_samples = 128, calib_seqlen = 2048;
  int64_t eval_windows = 32;
  uint64_t seed = 0;
  std::string calib_dataset = "ptb", eval_dataset;
  bool watch = false;
  // delete
  bool delete_artifact = false;
};

// One connection to the daemon's Quantization service.
class JobsClient {
 public:
  static absl::StatusOr<std::unique_ptr<JobsClient>> Open(const JobsOptions& options) {
    absl::StatusOr<Connection> connection = options.connection.Open();
    if (!connection.ok()) return connection.status();
    auto client = std::unique_ptr<JobsClient>(new JobsClient());
    client->connection_ = *std::move(connection);
    client->stub_ = nibble::v1::Quantization::NewStub(client->connection_.channel);
    return client;
  }

  // Sets the deadline (--timeout, else `default_seconds`; 0: none) and the token.
  void Prepare(grpc::ClientContext* context, double default_seconds) const {
    connection_.Prepare(context, default_seconds);
  }

  absl::Status ToStatus(const grpc::Status& status) const {
    return connection_.ToStatus(status);
  }

  // One unary call with the unary deadline (Connection::Call).
  template <class Request, class Response>
  absl::Status Call(grpc::Status (nibble::v1::Quantization::Stub::*method)(
                        grpc::ClientContext*, const Request&, Response*),
                    const Request& request, Response* response) const {
    return connection_.Call(*stub_, method, request, response);
  }

  nibble::v1::Quantization::Stub& stub() { return *stub_; }

 private:
  JobsClient() = default;
  Connection connection_;
  std::unique_ptr<nibble::v1::Quantization::Stub> stub_;
};

const char* StateName(nibble::v1::JobState state) {
  switch (state) {
    case nibble::v1::JOB_STATE_QUEUED: return "queued";
    case nibble::v1::JOB_STATE_RUNNING: return "running";
    case nibble::v1::JOB_STATE_SUCCEEDED: return "succeeded";
    case nibble::v1::JOB_STATE_FAILED: return "failed";
    case nibble::v1::JOB_STATE_CANCELLED: return "cancelled";
    default: return "unknown";
  }
}

bool Ended(nibble::v1::JobState state) {
  return state == nibble::v1::JOB_STATE_SUCCEEDED || state == nibble::v1::JOB_STATE_FAILED ||
         state == nibble::v1::JOB_STATE_CANCELLED;
}

std::string Seconds(double seconds) {
  char text[32];
  if (seconds < 120) {
    std::snprintf(text, sizeof text, "%.1fs", seconds);
  } else {
    std::snprintf(text, sizeof text, "%dm%02ds", static_cast<int>(seconds) / 60,
                  static_cast<int>(seconds) % 60);
  }
  return text;
}

// "search layer 3/24 (2 done)", "quantize 17/96 model.layers.2.mlp.up_proj.weight".
std::string Where(const nibble::v1::JobProgress& p) {
  if (p.phase().empty()) return "";
  if (p.phase() == "calibrate" || p.phase() == "search") {
    return absl::StrCat(p.phase(), " layer ", p.layer() + 1, "/", p.layers(), " (",
                        p.layers_done(), " done", p.resumed() ? ", resumed" : "", ")");
  }
  if (p.phase() == "quantize") {
    return absl::StrCat("quantize ", p.tensors_done(), "/", p.tensors_total(), " ", p.tensor());
  }
  return p.tensor().empty() ? p.phase() : absl::StrCat(p.phase(), " ", p.tensor());
}

// The current phase's fraction done, 0..1.
double Fraction(const nibble::v1::JobProgress& p) {
  if ((p.phase() == "calibrate" || p.phase() == "search") && p.layers() > 0) {
    return static_cast<double>(p.layers_done()) / static_cast<double>(p.layers());
  }
  if (p.phase() == "quantize" && p.tensors_total() > 0) {
    return static_cast<double>(p.tensors_done()) / static_cast<double>(p.tensors_total());
  }
  return p.phase() == "evaluate" || p.phase() == "write" ? 1.0 : 0.0;
}

std::string Line(const nibble::v1::Job& job) {
  std::string line = absl::StrCat("job ", job.id(), ": ", StateName(job.state()));
  if (job.state() == nibble::v1::JOB_STATE_RUNNING) {
    const nibble::v1::JobProgress& p = job.progress();
    if (!p.phase().empty()) absl::StrAppend(&line, " ", Where(p));
    absl::StrAppend(&line, ", elapsed ", Seconds(p.elapsed_seconds()));
    if (p.has_estimated_remaining_seconds()) {
      absl::StrAppend(&line, ", left ~", Seconds(p.estimated_remaining_seconds()));
    }
    if (job.cancel_requested()) absl::StrAppend(&line, " (cancelling)");
  } else if (job.state() == nibble::v1::JOB_STATE_SUCCEEDED) {
    absl::StrAppend(&line, " -> artifact ", job.artifact());
  } else if (job.state() == nibble::v1::JOB_STATE_FAILED) {
    absl::StrAppend(&line, ": ", job.error());
  } else if (job.state() == nibble::v1::JOB_STATE_QUEUED) {
    absl::StrAppend(&line, " -> artifact ", job.output_artifact());
  }
  return line;
}

// A progress bar on a terminal: "[#######.............] search layer 3/8 ... left ~12s".
std::string Bar(const nibble::v1::Job& job) {
  if (job.state() != nibble::v1::JOB_STATE_RUNNING) return Line(job);
  const nibble::v1::JobProgress& p = job.progress();
  constexpr int kWidth = 24;
  const int filled = std::clamp(static_cast<int>(Fraction(p) * kWidth + 0.5), 0, kWidth);
  std::string bar = "[" + std::string(filled, '#') + std::string(kWidth - filled, '.') + "] ";
  absl::StrAppend(&bar, Where(p), "  elapsed ", Seconds(p.elapsed_seconds()));
  if (p.has_estimated_remaining_seconds()) {
    absl::StrAppend(&bar, ", left ~", Seconds(p.estimated_remaining_seconds()));
  }
  if (job.cancel_requested()) absl::StrAppend(&bar, " (cancelling)");
  return bar;
}

// Exit code of a job that ended: 0 for success.
int EndCode(const nibble::v1::Job& job) {
  return job.state() == nibble::v1::JOB_STATE_SUCCEEDED ? 0 : 1;
}

int Watch(JobsClient& client, const std::string& id, bool json) {
  grpc::ClientContext context;
  client.Prepare(&context, 0);
  nibble::v1::WatchJobRequest request;
  request.set_id(id);
  auto reader = client.stub().WatchJob(&context, request);
  const bool terminal = !json && isatty(fileno(stdout));
  nibble::v1::JobEvent event;
  nibble::v1::Job last;
  bool any = false;
  while (reader->Read(&event)) {
    last = event.job();
    any = true;
    if (json) {
      std::printf("%s\n", Json(event).c_str());
    } else if (terminal) {
      std::printf("\r\033[K%s", Bar(last).c_str());
    } else {
      std::printf("%s\n", Line(last).c_str());
    }
    std::fflush(stdout);
  }
  const grpc::Status status = reader->Finish();
  if (terminal && any) std::printf("\r\033[K%s\n", Line(last).c_str());
  if (!status.ok()) return ReportError("jobs watch", client.ToStatus(status));
  if (!any || !Ended(last.state())) {
    return ReportError("jobs watch", absl::UnavailableError("the stream ended before the job"));
  }
  if (last.state() != nibble::v1::JOB_STATE_SUCCEEDED && !json) {
    std::fprintf(stderr, "nibble jobs watch: job %s %s%s%s\n", id.c_str(),
                 StateName(last.state()), last.error().empty() ? "" : ": ",
                 last.error().c_str());
  }
  return EndCode(last);
}

int RunSubmit(const JobsOptions& o) {
  auto client = JobsClient::Open(o);
  if (!client.ok()) return ReportError("jobs submit", client.status());
  nibble::v1::SubmitJobRequest request;
  if (o.model_path.empty() == o.artifact.empty()) {
    return ReportError("jobs submit", absl::InvalidArgumentError(
                                          "give a model directory (on the daemon, under its "
                                          "model roots) or --artifact NAME, not both"));
  }
  if (!o.model_path.empty()) request.set_model_path(o.model_path);
  if (!o.artifact.empty()) request.set_artifact(o.artifact);
  request.set_output_artifact(o.output);
  nibble::v1::QuantizationOptions* q = request.mutable_options();
  q->set_method(o.method);
  q->set_w_bits(o.w_bits);
  q->set_w_group_size(o.group_size);
  q->set_calib_dataset(o.calib_dataset);
  q->set_calib_samples(o.calib_samples);
  q->set_calib_seqlen(o.calib_seqlen);
  q->set_calib_seed(o.seed);
  q->set_eval_dataset(o.eval_dataset);
  q->set_eval_windows(o.eval_windows);
  nibble::v1::Job job;
  const absl::Status status =
      (*client)->Call(&nibble::v1::Quantization::Stub::SubmitJob, request, &job);
  if (!status.ok()) return ReportError("jobs submit", status);
  if (o.json) {
    std::printf("%s\n", Json(job).c_str());
  } else {
    std::printf("%s\n", job.id().c_str());  // alone on stdout: JOB=$(nibble jobs submit ...)
    std::fprintf(stderr, "%s\n", Line(job).c_str());
  }
  std::fflush(stdout);
  return o.watch ? Watch(**client, job.id(), o.json) : 0;
}

int RunWatch(const JobsOptions& o) {
  auto client = JobsClient::Open(o);
  if (!client.ok()) return ReportError("jobs watch", client.status());
  return Watch(**client, o.id, o.json);
}

int RunGet(const JobsOptions& o) {
  auto client = JobsClient::Open(o);
  if (!client.ok()) return ReportError("jobs get", client.status());
  nibble::v1::GetJobRequest request;
  request.set_id(o.id);
  nibble::v1::Job job;
  const absl::Status status =
      (*client)->Call(&nibble::v1::Quantization::Stub::GetJob, request, &job);
  if (!status.ok()) return ReportError("jobs get", status);
  std::printf("%s\n", o.json ? Json(job).c_str() : Line(job).c_str());
  return 0;
}

int RunList(const JobsOptions& o) {
  auto client = JobsClient::Open(o);
  if (!client.ok()) return ReportError("jobs list", client.status());
  nibble::v1::ListJobsResponse response;
  const absl::Status status = (*client)->Call(&nibble::v1::Quantization::Stub::ListJobs,
                                              nibble::v1::ListJobsRequest(), &response);
  if (!status.ok()) return ReportError("jobs list", status);
  if (o.json) {
    std::printf("%s\n", Json(response).c_str());
    return 0;
  }
  for (const nibble::v1::Job& job : response.jobs()) {
    const std::string source =
        job.has_model_path() ? job.model_path() : "artifact " + job.source_artifact();
    std::printf("%s  %-9s  %s %s g%lld -> %s%s%s\n", job.id().c_str(), StateName(job.state()),
                job.options().method().c_str(), source.c_str(),
                static_cast<long long>(job.options().w_group_size()),
                job.output_artifact().c_str(), job.error().empty() ? "" : "  ",
                job.error().c_str());
  }
  return 0;
}

int RunCancel(const JobsOptions& o) {
  auto client = JobsClient::Open(o);
  if (!client.ok()) return ReportError("jobs cancel", client.status());
  nibble::v1::CancelJobRequest request;
  request.set_id(o.id);
  nibble::v1::Job job;
  const absl::Status status =
      (*client)->Call(&nibble::v1::Quantization::Stub::CancelJob, request, &job);
  if (!status.ok()) return ReportError("jobs cancel", status);
  std::printf("%s\n", o.json ? Json(job).c_str() : Line(job).c_str());
  return 0;
}

int RunDelete(const JobsOptions& o) {
  auto client = JobsClient::Open(o);
  if (!client.ok()) return ReportError("jobs delete", client.status());
  nibble::v1::DeleteJobRequest request;
  request.set_id(o.id);
  request.set_delete_artifact(o.delete_artifact);
  nibble::v1::DeleteJobResponse response;
  const absl::Status status =
      (*client)->Call(&nibble::v1::Quantization::Stub::DeleteJob, request, &response);
  if (!status.ok()) return ReportError("jobs delete", status);
  std::fprintf(stderr, "deleted job %s%s\n", o.id.c_str(),
               o.delete_artifact ? " and its artifact" : "");
  return 0;
}

}  // namespace

CommandRunner RegisterJobs(CLI::App& app) {
  CLI::App* jobs = app.add_subcommand("jobs", "Quantization jobs on a nibbled (quantizer role)");
  jobs->require_subcommand(1);
  auto options = std::make_shared<JobsOptions>();
  auto common = [&](CLI::App* cmd) {
    options->connection.Register(*cmd);
    cmd->add_flag("--json", options->json, "print the protobuf JSON of the reply");
  };

  CLI::App* submit = jobs->add_subcommand(
      "submit", "Quantize a model directory on the daemon (or an artifact there) into an artifact");
  common(submit);
  submit->add_option("model", options->model_path,
                     "model directory on the daemon, under its quantizer.model_roots");
  submit->add_option("--artifact", options->artifact, "quantize this artifact of the daemon");
  submit->add_option("--output", options->output, "artifact name to make (default job-<id>)");
  submit->add_option("--method", options->method, "awq or rtn")
      ->check(CLI::IsMember({"awq", "rtn"}));
  submit->add_option("--w-bits", options->w_bits, "weight bits (4)");
  submit->add_option("--w-group-size", options->group_size, "input features per scale and zero");
  submit->add_option("--calib-dataset", options->calib_dataset,
                     "ptb, wikitext2, tinystories (the daemon's), or a text file under its "
                     "model roots");
  submit->add_option("--calib-samples", options->calib_samples, "calibration windows");
  submit->add_option("--calib-seqlen", options->calib_seqlen, "tokens per window");
  submit->add_option("--seed", options->seed, "seed of the calibration draw");
  submit->add_option("--eval-dataset", options->eval_dataset,
                     "text for the perplexity before/after (a name, a file, or none)");
  submit->add_option("--eval-windows", options->eval_windows, "evaluation windows at most");
  submit->add_flag("--watch", options->watch, "then watch it to its end");

  CLI::App* watch = jobs->add_subcommand(
      "watch", "Follow a job to its end (progress bar on a terminal; exit 0 if it succeeded)");
  common(watch);
  watch->add_option("id", options->id, "job id")->required();
  CLI::App* get = jobs->add_subcommand("get", "Show a job");
  common(get);
  get->add_option("id", options->id, "job id")->required();
  CLI::App* list = jobs->add_subcommand("list", "List the daemon's jobs, oldest first");
  common(list);
  CLI::App* cancel = jobs->add_subcommand("cancel", "Cancel a job (a running one stops at its "
                                                    "next layer or tensor)");
  common(cancel);
  cancel->add_option("id", options->id, "job id")->required();
  CLI::App* del = jobs->add_subcommand("delete", "Forget a job that is not running");
  common(del);
  del->add_option("id", options->id, "job id")->required();
  del->add_flag("--delete-artifact", options->delete_artifact, "also remove its artifact");

  return [options, submit, watch, get, list, cancel, del]() {
    if (submit->parsed()) return RunSubmit(*options);
    if (watch->parsed()) return RunWatch(*options);
    if (get->parsed()) return RunGet(*options);
    if (list->parsed()) return RunList(*options);
    if (cancel->parsed()) return RunCancel(*options);
    if (del->parsed()) return RunDelete(*options);
    return 2;
  };
}

}  // namespace nibble::cli
