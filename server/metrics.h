// Prometheus metrics on their own HTTP port (prometheus-cpp's Exposer). Names follow vLLM's
// (which LMDeploy copies) under the prefix nibble_, label model_name.
//
// Gauges and counters are read from InferenceEngine::Stats() on each scrape (a Collectable),
// so counters are the engine's cumulative ones and monotonic by construction. Histograms (and
// nibble_prompt_tokens_cached_total) are observed by the streams as their events arrive
// (thread-safe; called on the engine's scheduler thread, cheap: one short lock each).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
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

  // The stream-observed metrics of a model (registered on first use: models come and go with
  // Models.Load/Unload; a model loaded again under the same name continues its series).
  const RequestMetrics* For(const std::string& model_name) const;

  // Artifact transfers: bytes by direction ("sent": Artifacts.Download served; "received":
  // Artifacts.Upload, and pulls from another daemon), and transfers that failed.
  void AddTransferBytes(const std::string& direction, uint64_t bytes) const;
  void CountTransferFailure(const std::string& direction) const;

  // The registry /metrics serves, for metrics another part of the daemon owns and updates
  // itself (the quantization jobs': server/job_metrics.h).
  prometheus::Registry& registry() { return *registry_; }

 private:
  class EngineStatsCollector;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<EngineStatsCollector> engine_stats_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  prometheus::Family<prometheus::Histogram>* first_token_ = nullptr;
  prometheus::Family<prometheus::Histogram>* inter_token_ = nullptr;
  prometheus::Family<prometheus::Histogram>* e2e_ = nullptr;
  prometheus::Family<prometheus::Histogram>* queue_ = nullptr;
  prometheus::Family<prometheus::Counter>* cached_ = nullptr;
  prometheus::Family<prometheus::Counter>* transfer_bytes_ = nullptr;
  prometheus::Family<prometheus::Counter>* transfer_failures_ = nullptr;
  mutable std::mutex histograms_mu_;
  // Guarded by histograms_mu_; a std::map: the pointers For returns stay valid.
  mutable std::map<std::string, RequestMetrics> histograms_;
};

}  // namespace nibble::server
