// The models a daemon serves (those of the config, loaded at start, and those loaded and
// unloaded by Models.Load/Unload while it runs) and the daemon's serving state.
// Shared by the services; every member is safe to use from any gRPC thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "engine/inference_engine.h"
#include "server/config.h"

namespace nibble::server {

enum class ModelState { kLoading, kReady, kDraining };

// One model. Lifetime: shared (ServedModels and every call using it hold a reference), so an
// unloaded model stays alive until the last stream that used it has ended.
struct ServedModel {
  ModelSpec spec;
  std::unique_ptr<engine::InferenceEngine> engine;  // started; owns the model (null: loading)
  // The longest piece of the vocabulary in bytes (PromptByteBound, computed once at load),
  // or 0 when the tokenizer allows no byte bound.
  int64_t max_piece_bytes = 0;
  std::string artifact;      // the local artifact it was loaded from (empty: a directory)
  int64_t memory_bytes = 0;  // weights + KV cache: what it takes of the daemon's memory_budget
  std::atomic<ModelState> state{ModelState::kReady};

  // The prompt weight (PromptWeight) past which a prompt certainly has more than session_len
  // tokens, so it is refused without tokenizing; 0: no such limit. See PromptByteBound.
  int64_t max_prompt_weight() const {
    return max_piece_bytes > 0 ? engine->session_len() * (max_piece_bytes + 2) + 2 : 0;
  }

  // Calls using the model now (ModelRef counts them; Unload's drain waits for none).
  int active_calls() const {
    std::lock_guard<std::mutex> lock(calls_mu_);
    return active_calls_;
  }
  // True when no call uses the model by `deadline`.
  template <class TimePoint>
  bool WaitIdleUntil(TimePoint deadline) const {
    std::unique_lock<std::mutex> lock(calls_mu_);
    return calls_idle_.wait_until(lock, deadline, [this] { return active_calls_ == 0; });
  }

 private:
  friend class ModelRef;
  friend class ServedModels;
  mutable std::mutex calls_mu_;
  mutable std::condition_variable calls_idle_;
  int active_calls_ = 0;  // guarded by calls_mu_
};

// A counted use of a served model by one call: keeps it alive, and makes an Unload with
// drain wait for the call. Movable; the count drops when it is destroyed.
class ModelRef {
 public:
  ModelRef() = default;
  ModelRef(ModelRef&& other) noexcept : model_(std::move(other.model_)) {}
  ModelRef& operator=(ModelRef&& other) noexcept {
    Reset();
    model_ = std::move(other.model_);
    return *this;
  }
  ModelRef(const ModelRef&) = delete;
  ModelRef& operator=(const ModelRef&) = delete;
  ~ModelRef() { Reset(); }

  ServedModel* get() const { return model_.get(); }
  ServedModel* operator->() const { return model_.get(); }
  ServedModel& operator*() const { return *model_; }
  explicit operator bool() const { return model_ != nullptr; }

 private:
  friend class ServedModels;
  explicit ModelRef(std::shared_ptr<ServedModel> model) : model_(std::move(model)) {
    std::lock_guard<std::mutex> lock(model_->calls_mu_);
    ++model_->active_calls_;
  }
  void Reset() {
    if (!model_) return;
    {
      std::lock_guard<std::mutex> lock(model_->calls_mu_);
      if (--model_->active_calls_ == 0) model_->calls_idle_.notify_all();
    }
    model_.reset();
  }
  std::shared_ptr<ServedModel> model_;
};

// The bytes of `text`, a run of spaces counted as one byte: what SentencePiece's
// remove_extra_whitespaces normalization can leave of it.
int64_t PromptWeight(std::string_view text);

// The longest piece of `tokenizer`'s vocabulary in bytes (L), or 0 when no bound holds.
//
// The bound: a token covers at most L bytes of normalized text (a space becomes the 3-byte
// "▁", a byte fallback piece "<0x0A>" stands for one byte, a special token's piece is its
// text). Normalization may fold runs of spaces and drop them at either end of each span
// between special tokens, which PromptWeight and 2 bytes per token allow for:
// PromptWeight(text) <= tokens x (L + 2) + 2. So a prompt of weight past
// session_len x (L + 2) + 2 has more than session_len tokens.
// That holds for tokenizers that normalize no further and encode unknown characters byte by
// byte (Llama's, InternLM's, llama2.c's); a few probe texts check it at load, and when one
// encodes to fewer tokens than it allows (NFKC, control characters dropped, tabs folded,
// unknown characters merged into one <unk>) the result is 0: no byte bound for this tokenizer.
int64_t PromptByteBound(const engine::Tokenizer& tokenizer);

class ServedModels {
 public:
  // A model loaded at start (READY).
  void Add(std::shared_ptr<ServedModel> model);

  // A counted reference to the READY model of that name; an empty name means the only model
  // when there is one. NOT_FOUND naming the models there are, INVALID_ARGUMENT for an empty
  // name among several, UNAVAILABLE for a model being loaded or unloaded.
  grpc::Status Find(std::string_view name, ModelRef* model) const;

  // The models with a started engine (READY or DRAINING): metrics, shutdown.
  std::vector<std::shared_ptr<ServedModel>> all() const;
  // Every model, those LOADING included, sorted by name (Models.List).
  std::vector<std::shared_ptr<ServedModel>> listing() const;
  // One model in any state (Models.Get); NOT_FOUND like Find.
  grpc::Status Get(std::string_view name, std::shared_ptr<ServedModel>* model) const;

  // Hot loading: takes the name for a model about to load (listed as LOADING).
  // AlreadyExists when a model of that name exists or is loading.
  absl::Status Reserve(const std::string& name, const std::string& path);
  // Gives a reserved name its loaded model (engine not started yet: `memory_bytes` known)
  // and charges its memory: ResourceExhausted, naming what is in use, when the models
  // together would take more than `budget_bytes` (0: no budget). On success the model is
  // READY once `engine` is set by Publish.
  absl::Status Charge(const std::string& name, int64_t memory_bytes, int64_t budget_bytes);
  // The reserved name's model serves from now on.
  void Publish(std::shared_ptr<ServedModel> model);
  // Drops a name (a failed load, the end of an unload).
  void Remove(const std::string& name);

  // Unload's first step: marks the READY model DRAINING (Find refuses it from now on) and
  // returns it. NOT_FOUND; FAILED_PRECONDITION for one loading or already unloading.
  grpc::Status StartUnload(std::string_view name, std::shared_ptr<ServedModel>* model);

 private:
  grpc::Status NotFound(std::string_view name) const;  // mu_ held

  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<ServedModel>, std::less<>> models_;  // guarded by mu_
  std::map<std::string, int64_t, std::less<>> charged_;  // guarded by mu_: memory per name
};

// Loads `spec`'s model and starts its engine with `options`: what start-up and Models.Load
// both do. The name must be reserved in `models` (ServedModels::Reserve); the model's memory
// (weights, then weights plus the KV cache pool) is charged there against `budget_bytes`
// (0: no budget) before the engine starts: ResourceExhausted when it does not fit, with the
// running models untouched. A model whose safetensors files alone exceed what is free is
// refused before its weights are read. The caller Publishes the result.
absl::StatusOr<std::shared_ptr<ServedModel>> LoadServedModel(const ModelSpec& spec,
                                                             const engine::EngineOptions& options,
                                                             ServedModels& models,
                                                             int64_t budget_bytes);

// Draining (SIGTERM): refuse new calls, count the calls still running.
//
// A call is counted from the moment its handler starts (TryStartCall, before any parsing or
// tokenizing) to its end (CallDone; for a stream, when the stream is deleted). The draining
// flag and the count share one mutex, so after StartDraining every call is either refused or
// counted, and WaitIdleUntil cannot report idle while a call is still being prepared.
class ServingState {
 public:
  bool draining() const {
    std::lock_guard<std::mutex> lock(mu_);
    return draining_;
  }
  void StartDraining() {
    std::lock_guard<std::mutex> lock(mu_);
    draining_ = true;
  }

  // Counts a new call and returns true, or returns false (counting nothing) when draining.
  [[nodiscard]] bool TryStartCall() {
    std::lock_guard<std::mutex> lock(mu_);
    if (draining_) return false;
    ++active_calls_;
    return true;
  }
  void CallDone() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--active_calls_ == 0) idle_.notify_all();
  }
  // True when no call is running by `deadline`.
  template <class TimePoint>
  bool WaitIdleUntil(TimePoint deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    return idle_.wait_until(lock, deadline, [this] { return active_calls_ == 0; });
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable idle_;
  bool draining_ = false;  // guarded by mu_
  int active_calls_ = 0;   // guarded by mu_
};

// One counted call (ServingState::TryStartCall); CallDone when destroyed, unless released
// to an owner that calls it later (a stream).
class CallGuard {
 public:
  explicit CallGuard(ServingState& state) : state_(state), counted_(state.TryStartCall()) {}
  ~CallGuard() {
    if (counted_) state_.CallDone();
  }
  CallGuard(const CallGuard&) = delete;
  CallGuard& operator=(const CallGuard&) = delete;

  // False when the daemon is draining (the call must be refused with DrainingStatus()).
  bool counted() const { return counted_; }
  // The owner now calls ServingState::CallDone.
  void Release() { counted_ = false; }

 private:
  ServingState& state_;
  bool counted_;
};

}  // namespace nibble::server
