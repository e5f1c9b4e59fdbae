// The models a daemon serves (today loaded once at start) and the daemon's serving state.
// Shared by the services; every member is safe to use from any gRPC thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/support/status.h>

#include "engine/inference_engine.h"
#include "server/config.h"

namespace nibble::server {

struct ServedModel {
  ModelSpec spec;
  std::unique_ptr<engine::InferenceEngine> engine;  // started; owns the model
};

class ServedModels {
 public:
  void Add(std::unique_ptr<ServedModel> model) { models_.push_back(std::move(model)); }

  // The model of that name; an empty name means the only model when there is one.
  // NOT_FOUND naming the models there are, INVALID_ARGUMENT for an empty name among several.
  grpc::Status Find(std::string_view name, ServedModel** model) const;

  const std::vector<std::unique_ptr<ServedModel>>& all() const { return models_; }

 private:
  std::vector<std::unique_ptr<ServedModel>> models_;  // fixed once serving starts
};

// Draining (SIGTERM): refuse new calls, count the streams still running.
class ServingState {
 public:
  bool draining() const { return draining_.load(std::memory_order_acquire); }
  void StartDraining() { draining_.store(true, std::memory_order_release); }

  void StreamStarted() {
    std::lock_guard<std::mutex> lock(mu_);
    ++active_streams_;
  }
  void StreamDone() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--active_streams_ == 0) idle_.notify_all();
  }
  // True when no stream is running by `deadline`.
  template <class TimePoint>
  bool WaitIdleUntil(TimePoint deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    return idle_.wait_until(lock, deadline, [this] { return active_streams_ == 0; });
  }

 private:
  std::atomic<bool> draining_{false};
  std::mutex mu_;
  std::condition_variable idle_;
  int active_streams_ = 0;  // guarded by mu_
};

}  // namespace nibble::server
