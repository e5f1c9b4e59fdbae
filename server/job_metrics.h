// The quantization jobs' Prometheus metrics (on the daemon's /metrics, beside the engine's):
//   nibble_quantization_jobs{state="queued"|"running"}        gauge
//   nibble_quantization_jobs_finished_total                    counter (succeeded)
//   nibble_quantization_jobs_failed_total                      counter
//   nibble_quantization_jobs_cancelled_total                   counter
//   nibble_quantization_job_layers{job_id, state="done"|"total"}  gauge, running jobs only
//   nibble_quantization_job_duration_seconds{result}           histogram: first start to end
// Counters count this process's jobs (from 0 at start, as Prometheus expects).
//
// Thread safety: every member may be called from any thread (prometheus-cpp's metrics are).
#pragma once

#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "server/job_store.h"

namespace nibble::server {

class JobMetrics {
 public:
  // Registers the families in `registry` (which must outlive this object).
  explicit JobMetrics(prometheus::Registry& registry);

  void SetCounts(int64_t queued, int64_t running);
  // A job reached a final state after `seconds` (since its first start; 0 if it never ran).
  void Ended(JobState state, double seconds);
  void SetLayerProgress(const std::string& job_id, int64_t done, int64_t total);
  void ForgetJob(const std::string& job_id);  // drops its layer progress

 private:
  prometheus::Family<prometheus::Gauge>& jobs_;
  prometheus::Gauge& queued_;
  prometheus::Gauge& running_;
  prometheus::Counter& finished_;
  prometheus::Counter& failed_;
  prometheus::Counter& cancelled_;
  prometheus::Family<prometheus::Gauge>& layers_;
  prometheus::Family<prometheus::Histogram>& duration_;
};

}  // namespace nibble::server
