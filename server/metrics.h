// Prometheus metrics on their own HTTP port (prometheus-cpp's Exposer). Names follow vLLM's
// (which LMDeploy copies) under the prefix nibble_, label model_name.
//
// Gauges and counters are read from InferenceEngine::Stats() on each scrape (a Collectable),
// so counters are the engine's cumulative ones and monotonic by construction. Histograms (and
// nibble_prompt_tokens_cached_total) are observed by the streams as their events arrive
// (thread-safe; called on the engine's scheduler thread, cheap: one short lock each).
#pragma once

#include <memory>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/status/statusor.h"
#include "server/served_model.h"

namespace prometheus {
class Exposer;
}

namespace nibble::server {

// One model's metrics observed by the streams (times in seconds since the call's arrival at
// the daemon, the origin of the Timing message too).
struct RequestMetrics {
  prometheus::Histogram* time_to_first_token = nullptr;
  prometheus::Histogram* inter_token_latency = nullptr;
  prometheus::Histogram* e2e_request_latency = nullptr;
  prometheus::Histogram* request_queue_time = nullptr;
  prometheus::Counter* prompt_tokens_cached = nullptr;  // usage.cached_prompt_tokens, summed
};

class ServerMetrics {
 public:
  // Registers the metrics of every model in `models` (which must outlive this object).
  explicit ServerMetrics(const ServedModels& models);
  ~ServerMetrics();

  // Serves /metrics on `address` (host:port). Error naming the address when it cannot bind.
  absl::Status Serve(const std::string& address);

  // The stream-observed metrics of a model (null for an unknown one).
  const RequestMetrics* For(const std::string& model_name) const;

 private:
  class EngineStatsCollector;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<EngineStatsCollector> engine_stats_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::vector<std::pair<std::string, RequestMetrics>> histograms_;
};

}  // namespace nibble::server
