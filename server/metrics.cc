#include "server/metrics.h"

#include <exception>

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/metric_family.h>

#include "absl/strings/str_cat.h"

#ifndef NIBBLE_VERSION
#define NIBBLE_VERSION "unknown"
#endif
#ifndef NIBBLE_GIT_COMMIT
#define NIBBLE_GIT_COMMIT "unknown"
#endif

namespace nibble::server {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily Family(const std::string& name, const std::string& help, MetricType type) {
  MetricFamily family;
  family.name = name;
  family.help = help;
  family.type = type;
  return family;
}

void AddSample(MetricFamily& family, std::vector<ClientMetric::Label> labels, double value) {
  ClientMetric metric;
  metric.label = std::move(labels);
  if (family.type == MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  family.metric.push_back(std::move(metric));
}

// vLLM's buckets, extended downwards: a tiny model on a CPU answers in milliseconds.
const prometheus::Histogram::BucketBoundaries kFirstTokenBuckets = {
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0};
const prometheus::Histogram::BucketBoundaries kInterTokenBuckets = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0};
const prometheus::Histogram::BucketBoundaries kRequestBuckets = {
    0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0,
    10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0};

}  // namespace

// Reads every engine's Stats() when Prometheus scrapes (on the exposer's HTTP thread).
class ServerMetrics::EngineStatsCollector : public prometheus::Collectable {
 public:
  explicit EngineStatsCollector(const ServedModels& models) : models_(models) {}

  std::vector<MetricFamily> Collect() const override {
    MetricFamily running = Family("nibble_num_requests_running",
                                  "Requests in the running batch.", MetricType::Gauge);
    MetricFamily waiting = Family("nibble_num_requests_waiting",
                                  "Requests queued, waiting to run.", MetricType::Gauge);
    MetricFamily usage = Family("nibble_kv_cache_usage_perc",
                                "Fraction of KV cache blocks in use (running requests and kept "
                                "sessions), 0..1.",
                                MetricType::Gauge);
    MetricFamily prompt = Family("nibble_prompt_tokens_total",
                                 "Prompt tokens computed: excludes those reused from a "
                                 "session's cache (nibble_prompt_tokens_cached_total), includes "
                                 "prompt tokens computed again after a preemption.",
                                 MetricType::Counter);
    MetricFamily generation = Family("nibble_generation_tokens_total", "Tokens generated.",
                                     MetricType::Counter);
    MetricFamily preemptions = Family("nibble_num_preemptions_total",
                                      "Times a request lost its KV cache and recomputed it.",
                                      MetricType::Counter);
    MetricFamily finished = Family("nibble_requests_finished_total",
                                   "Requests that finished with a finish reason (length, stop, "
                                   "stop string, context full); not those cancelled, past their "
                                   "deadline, ended by shutdown or failed.",
                                   MetricType::Counter);
    MetricFamily sessions = Family("nibble_sessions", "Conversations whose KV cache is kept.",
                                   MetricType::Gauge);
    MetricFamily blocks = Family("nibble_kv_cache_blocks",
                                 "KV cache blocks, by state (used, total).", MetricType::Gauge);
    MetricFamily memory = Family("nibble_device_memory_used_bytes",
                                 "Memory in use on the model's device, by use (kv_cache: the "
                                 "KV blocks in use; weights).",
                                 MetricType::Gauge);
    MetricFamily capacity = Family("nibble_kv_cache_capacity_bytes",
                                   "Bytes of the KV cache pool (all blocks, used or free).",
                                   MetricType::Gauge);
    for (const auto& served : models_.all()) {
      const engine::EngineStats stats = served->engine->Stats();
      const std::string& name = served->spec.name;
      const std::string& device = served->spec.device;
      AddSample(running, {{"model_name", name}}, stats.requests_running);
      AddSample(waiting, {{"model_name", name}}, stats.requests_waiting);
      AddSample(usage, {{"model_name", name}},
                stats.kv_blocks_total > 0
                    ? static_cast<double>(stats.kv_blocks_used) / stats.kv_blocks_total
                    : 0.0);
      AddSample(prompt, {{"model_name", name}}, static_cast<double>(stats.prompt_tokens_total));
      AddSample(generation, {{"model_name", name}},
                static_cast<double>(stats.generation_tokens_total));
      AddSample(preemptions, {{"model_name", name}},
                static_cast<double>(stats.preemptions_total));
      AddSample(finished, {{"model_name", name}},
                static_cast<double>(stats.requests_finished_total));
      AddSample(sessions, {{"model_name", name}}, stats.sessions);
      AddSample(blocks, {{"model_name", name}, {"state", "used"}},
                static_cast<double>(stats.kv_blocks_used));
      AddSample(blocks, {{"model_name", name}, {"state", "total"}},
                static_cast<double>(stats.kv_blocks_total));
      const double block_bytes =
          stats.kv_blocks_total > 0
              ? static_cast<double>(stats.kv_cache_bytes) / static_cast<double>(stats.kv_blocks_total)
              : 0.0;
      AddSample(memory, {{"device", device}, {"model_name", name}, {"use", "kv_cache"}},
                block_bytes * static_cast<double>(stats.kv_blocks_used));
      AddSample(capacity, {{"device", device}, {"model_name", name}},
                static_cast<double>(stats.kv_cache_bytes));
      AddSample(memory, {{"device", device}, {"model_name", name}, {"use", "weights"}},
                static_cast<double>(served->engine->model().weight_bytes()));
    }
    return {running, waiting, usage,  prompt,   generation, preemptions,
            finished, sessions, blocks, memory, capacity};
  }

 private:
  const ServedModels& models_;
};

ServerMetrics::ServerMetrics(const ServedModels& models)
    : registry_(std::make_shared<prometheus::Registry>()),
      engine_stats_(std::make_shared<EngineStatsCollector>(models)) {
  prometheus::BuildGauge()
      .Name("nibble_build_info")
      .Help("nibble's version and git commit (always 1).")
      .Register(*registry_)
      .Add({{"version", NIBBLE_VERSION}, {"git_commit", NIBBLE_GIT_COMMIT}})
      .Set(1);
  first_token_ = &prometheus::BuildHistogram()
                          .Name("nibble_time_to_first_token_seconds")
                          .Help("Seconds from a request's arrival at the daemon to its first "
                                "generated token.")
                          .Register(*registry_);
  inter_token_ = &prometheus::BuildHistogram()
                          .Name("nibble_inter_token_latency_seconds")
                          .Help("Seconds between consecutive generated tokens of a request.")
                          .Register(*registry_);
  e2e_ = &prometheus::BuildHistogram()
                  .Name("nibble_e2e_request_latency_seconds")
                  .Help("Seconds from a request's arrival at the daemon to its end.")
                  .Register(*registry_);
  queue_ = &prometheus::BuildHistogram()
                    .Name("nibble_request_queue_time_seconds")
                    .Help("Seconds from a request's arrival at the daemon to the first "
                          "scheduler step that ran it (tokenizing and waiting in the queue).")
                    .Register(*registry_);
  cached_ = &prometheus::BuildCounter()
                    .Name("nibble_prompt_tokens_cached_total")
                    .Help("Prompt tokens reused from a session's KV cache (not computed).")
                    .Register(*registry_);
  transfer_bytes_ = &prometheus::BuildCounter()
                        .Name("nibble_artifact_transfer_bytes_total")
                        .Help("Bytes of artifact files transferred, by direction (sent: "
                              "Artifacts.Download served; received: uploads and pulls from "
                              "another daemon).")
                        .Register(*registry_);
  transfer_failures_ = &prometheus::BuildCounter()
                           .Name("nibble_artifact_transfer_failures_total")
                           .Help("Artifact transfers that failed or were refused midway, by "
                                 "direction.")
                           .Register(*registry_);
  for (const char* direction : {"sent", "received"}) {
    transfer_bytes_->Add({{"direction", direction}});
    transfer_failures_->Add({{"direction", direction}});
  }
  for (const auto& served : models.all()) For(served->spec.name);
}

void ServerMetrics::AddTransferBytes(const std::string& direction, uint64_t bytes) const {
  transfer_bytes_->Add({{"direction", direction}}).Increment(static_cast<double>(bytes));
}

void ServerMetrics::CountTransferFailure(const std::string& direction) const {
  transfer_failures_->Add({{"direction", direction}}).Increment();
}

ServerMetrics::~ServerMetrics() = default;

absl::Status ServerMetrics::Serve(const std::string& address) {
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("metrics_listen ", address, ": cannot serve metrics there (", e.what(), ")"));
  }
  exposer_->RegisterCollectable(registry_);
  exposer_->RegisterCollectable(engine_stats_);
  return absl::OkStatus();
}

const RequestMetrics* ServerMetrics::For(const std::string& model_name) const {
  std::lock_guard<std::mutex> lock(histograms_mu_);
  auto it = histograms_.find(model_name);
  if (it != histograms_.end()) return &it->second;
  // Family::Add returns the existing series for labels seen before.
  const prometheus::Labels labels = {{"model_name", model_name}};
  RequestMetrics h;
  h.time_to_first_token = &first_token_->Add(labels, kFirstTokenBuckets);
  h.inter_token_latency = &inter_token_->Add(labels, kInterTokenBuckets);
  h.e2e_request_latency = &e2e_->Add(labels, kRequestBuckets);
  h.request_queue_time = &queue_->Add(labels, kRequestBuckets);
  h.prompt_tokens_cached = &cached_->Add(labels);
  return &histograms_.emplace(model_name, h).first->second;
}

}  // namespace nibble::server
