#include "server/job_metrics.h"

namespace nibble::server {
namespace {

// A job takes seconds on a tiny model and hours on a large one on the CPU.
const prometheus::Histogram::BucketBoundaries kJobSeconds = {
    1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400};

}  // namespace

JobMetrics::JobMetrics(prometheus::Registry& registry)
    : jobs_(prometheus::BuildGauge()
                .Name("nibble_quantization_jobs")
                .Help("Quantization jobs by state (queued: waiting for a worker; running).")
                .Register(registry)),
      queued_(jobs_.Add({{"state", "queued"}})),
      running_(jobs_.Add({{"state", "running"}})),
      finished_(prometheus::BuildCounter()
                    .Name("nibble_quantization_jobs_finished_total")
                    .Help("Quantization jobs that succeeded (their artifact is in place).")
                    .Register(registry)
                    .Add({})),
      failed_(prometheus::BuildCounter()
                  .Name("nibble_quantization_jobs_failed_total")
                  .Help("Quantization jobs that failed.")
                  .Register(registry)
                  .Add({})),
      cancelled_(prometheus::BuildCounter()
                     .Name("nibble_quantization_jobs_cancelled_total")
                     .Help("Quantization jobs cancelled, queued or running.")
                     .Register(registry)
                     .Add({})),
      layers_(prometheus::BuildGauge()
                  .Name("nibble_quantization_job_layers")
                  .Help("A running job's decoder layers, by state (done: searched and "
                        "checkpointed; total).")
                  .Register(registry)),
      duration_(prometheus::BuildHistogram()
                    .Name("nibble_quantization_job_duration_seconds")
                    .Help("Seconds from a job's first start to its end, by result "
                          "(succeeded, failed, cancelled).")
                    .Register(registry)) {}

void JobMetrics::SetCounts(int64_t queued, int64_t running) {
  queued_.Set(static_cast<double>(queued));
  running_.Set(static_cast<double>(running));
}

void JobMetrics::Ended(JobState state, double seconds) {
  if (state == JobState::kSucceeded) finished_.Increment();
  if (state == JobState::kFailed) failed_.Increment();
  if (state == JobState::kCancelled) cancelled_.Increment();
  duration_.Add({{"result", JobStateName(state)}}, kJobSeconds).Observe(seconds);
}

void JobMetrics::SetLayerProgress(const std::string& job_id, int64_t done, int64_t total) {
  layers_.Add({{"job_id", job_id}, {"state", "done"}}).Set(static_cast<double>(done));
  layers_.Add({{"job_id", job_id}, {"state", "total"}}).Set(static_cast<double>(total));
}

void JobMetrics::ForgetJob(const std::string& job_id) {
  for (const char* state : {"done", "total"}) {
    prometheus::Gauge& gauge = layers_.Add({{"job_id", job_id}, {"state", state}});
    layers_.Remove(&gauge);
  }
}

}  // namespace nibble::server
