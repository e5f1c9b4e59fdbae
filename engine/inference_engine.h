// The serving engine: many generation requests over one model, batched continuously on one
// scheduler thread, over a paged KV cache. Knows nothing of gRPC, YAML or Prometheus; the
// server turns its config into EngineOptions and its calls into Submit/Cancel.
//
// Threads (the contract; engine/README.md says it at length):
// - The scheduler thread, started by Start and joined by Shutdown/the destructor, is the only
//   thread that touches the backend, the KV cache, the sequences and the samplers. It runs the
//   model's kernels with the model's cpu_threads (OpenMP's thread count is per thread, so it
//   applies it itself).
// - Submit, Cancel, EndSession, Stats, Shutdown may be called from any thread.
// - The event callback of a request runs on the scheduler thread. It must not block and must
//   not call back into the engine except Cancel and EndSession (which only mark); a slow
//   consumer buffers or coalesces on its side. It may release the engine's last owner: the
//   engine is then destroyed on its own scheduler thread, which cannot join itself, so it
//   ends every request with kShutdown after the callback returns and frees the engine's
//   state itself (the thread is detached).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/sampler.h"

namespace nibble::engine {

// The settings the tutorial tunes, with its names, plus the scheduler's limits.
struct EngineOptions {
  // Fraction of the free memory given to the KV cache: of the GPU's free memory, or on the
  // CPU of `cpu_memory_budget_bytes` (minus nothing: the budget is for the cache).
  double cache_max_entry_count = 0.5;
  int32_t cache_block_seq_len = 128;  // tokens per KV block
  // Blocks by which the pool's usable part grows when it runs dry (-1: all at once). On the
  // CPU the pool is reserved whole and its pages committed as they are first written.
  int32_t cache_chunk_size = 1;
  // Longest sequence (prompt + output), at most the model's context; 0: the model's context.
  int64_t session_len = 0;
  int32_t max_batch_size = 64;        // sequences in the running batch
  // Requests that may wait for a batch slot: Submit refuses one when the requests queued
  // (this one included) exceed the batch slots free now by more than this. 0: no waiting,
  // refuse unless a slot is free. (A request with a slot may still wait for KV blocks.)
  int32_t max_queued_requests = 256;
  int32_t max_prefill_tokens_per_step = 256;  // chunked prefill: prompt tokens per step
  int64_t cpu_memory_budget_bytes = int64_t{1} << 30;
  int32_t max_sessions = 64;  // kept session caches (least recently used evicted first)
};

// Why a request ended. Extends FinishReason with the ways a served request can end early.
enum class StopCause {
  kFinished,          // see finish_reason
  kCancelled,         // Cancel was called (client cancel or disconnect)
  kDeadlineExceeded,  // the request's deadline passed
  kShutdown,          // the engine shut down before the request finished
  kError,             // see status
};

struct InferenceRequest {
  std::vector<int32_t> prompt_ids;  // non-empty; usually starts with BOS
  int32_t max_tokens = 256;
  SamplingParams sampling;
  // Tokens that end generation. Empty with `model_stop_tokens`: the model's StopTokenIds();
  // empty without it: none (generation runs to max_tokens, a stop string or session_len).
  std::vector<int32_t> stop_token_ids;
  bool model_stop_tokens = true;
  std::vector<std::string> stop_strings;
  // Non-empty: keep this conversation's KV cache after the request, and reuse the longest
  // common prefix of it on the session's next request.
  std::string session_id;
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

struct Usage {
  int32_t prompt_tokens = 0;         // tokens of the prompt
  int32_t cached_prompt_tokens = 0;  // of those, taken from the session's cache (not recomputed)
  int32_t completion_tokens = 0;     // generated tokens, a final stop token included
  int32_t preemptions = 0;           // times the request lost its cache and recomputed it
};

// One event of a request's stream. Every request gets zero or more non-final events and
// exactly one final event (`final` true), after which its callback is never called again.
struct StreamEvent {
  uint64_t request_id = 0;
  std::vector<int32_t> token_ids;  // tokens generated since the previous event
  std::string text_delta;          // text that became final (never a split UTF-8 character)
  bool final = false;
  StopCause stop_cause = StopCause::kFinished;  // final events only
  FinishReason finish_reason = FinishReason::kLength;  // final events with kFinished
  absl::Status status;                                 // final events with kError
  Usage usage;                                         // final events
  // Timings, seconds since Submit: when the request first ran (left the queue) and when its
  // first token came (0 until they happened).
  double queue_seconds = 0;
  double first_token_seconds = 0;
};

using StreamCallback = std::function<void(const StreamEvent&)>;

struct EngineStats {
  int32_t requests_running = 0;
  int32_t requests_waiting = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_used = 0;  // by running requests and kept sessions
  int32_t kv_block_seq_len = 0;
  int64_t kv_cache_bytes = 0;  // the pool's size
  int32_t sessions = 0;
  // Cumulative counters since Start.
  int64_t prompt_tokens_total = 0;      // prompt tokens computed (not those reused)
  int64_t generation_tokens_total = 0;  // tokens generated
  int64_t preemptions_total = 0;
  int64_t requests_finished_total = 0;
  int64_t steps_total = 0;  // scheduler steps (batched forwards)
};

class InferenceEngine {
 public:
  // Takes the model, sizes the KV cache (cache_max_entry_count of the backend's free memory,
  // or of cpu_memory_budget_bytes on the CPU, in blocks of cache_block_seq_len tokens) and
  // starts the scheduler thread. Errors: options out of range (InvalidArgument, naming the
  // option and its value), a budget that holds no block (ResourceExhausted).
  static absl::StatusOr<std::unique_ptr<InferenceEngine>> Start(std::unique_ptr<Model> model,
                                                                const EngineOptions& options);
  ~InferenceEngine();  // Shutdown(); inside a callback, see the threads contract above

  // Validates and queues the request; returns its id. Errors (the request is not queued and
  // its callback never called): InvalidArgument (empty prompt, bad sampling values, token
  // outside the vocabulary, max_tokens < 0, no callback), ResourceExhausted (queue full: see
  // max_queued_requests; prompt longer than session_len or than the whole KV cache),
  // FailedPrecondition (the session has a request in flight that is neither cancelled nor
  // past its deadline), Unavailable (the engine is shutting down). A request that later
  // cannot fit the cache even alone ends with kError (ResourceExhausted). max_tokens 0 ends
  // at once (kFinished, kLength, no tokens), as Generate does.
  absl::StatusOr<uint64_t> Submit(InferenceRequest request, StreamCallback on_event);

  // Ends the request soon with kCancelled and frees its KV blocks. Its session (if any) is
  // free at once: the session's next request is accepted and starts without a kept cache.
  // Unknown or finished ids are ignored. Safe from any thread, including inside a callback.
  void Cancel(uint64_t request_id);

  // Forgets a session's kept cache (no-op for unknown ids). A request of the session in
  // flight runs on and keeps nothing when it finishes.
  void EndSession(const std::string& session_id);

  EngineStats Stats() const;
  const Model& model() const;
  const EngineOptions& options() const;
  // The effective longest sequence (prompt + output): options().session_len, or the model's
  // context (max_position_embeddings) when that is 0.
  int64_t session_len() const;
  // OpenMP threads of the scheduler thread's kernels, as that thread reports them: the
  // model's cpu_threads (all cores when that is <= 0).
  int cpu_threads() const;

  // Stops admitting (Submit fails with Unavailable), ends every queued and running request
  // with kShutdown, frees kept sessions, joins the scheduler thread. Idempotent. From inside
  // a callback it only asks the scheduler to stop (it cannot join itself).
  void Shutdown();

 private:
  class Impl;
  explicit InferenceEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nibble::engine
