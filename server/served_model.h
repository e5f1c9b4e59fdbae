// The models a daemon serves (today loaded once at start) and the daemon's serving state.
// Shared by the services; every member is safe to use from any gRPC thread.
#pragma once

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
  // The longest piece of the vocabulary in bytes (PromptByteBound, computed once at load),
  // or 0 when the tokenizer allows no byte bound.
  int64_t max_piece_bytes = 0;

  // The prompt weight (PromptWeight) past which a prompt certainly has more than session_len
  // tokens, so it is refused without tokenizing; 0: no such limit. See PromptByteBound.
  int64_t max_prompt_weight() const {
    return max_piece_bytes > 0 ? engine->session_len() * (max_piece_bytes + 2) + 2 : 0;
  }
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
  void Add(std::unique_ptr<ServedModel> model) { models_.push_back(std::move(model)); }

  // The model of that name; an empty name means the only model when there is one.
  // NOT_FOUND naming the models there are, INVALID_ARGUMENT for an empty name among several.
  grpc::Status Find(std::string_view name, ServedModel** model) const;

  const std::vector<std::unique_ptr<ServedModel>>& all() const { return models_; }

 private:
  std::vector<std::unique_ptr<ServedModel>> models_;  // fixed once serving starts
};

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
