#include "engine/inference_engine.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "engine/completion.h"
#include "engine/kv_cache.h"
#include "engine/status_macros.h"
#include "kernels/cpu/ops.h"

namespace nibble::engine {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

// A request inside the scheduler. Scheduler thread only (after Submit hands it over).
struct Sequence {
  uint64_t id = 0;
  InferenceRequest request;
  StreamCallback on_event;
  Clock::time_point submitted;

  std::vector<int32_t> tokens;  // the prompt, then every generated token
  int64_t prompt_length = 0;
  int64_t computed = 0;         // leading tokens whose keys and values are in `blocks`
  std::vector<int32_t> blocks;  // block table
  int64_t admitted_order = 0;   // larger: admitted later (preempted first)
  bool ever_admitted = false;

  std::unique_ptr<Sampler> sampler;
  std::vector<int32_t> penalty_ids;  // this step's (the backend reads them during the pass)
  std::unique_ptr<Completion> completion;
  Usage usage;
  double queue_seconds = 0;
  double first_token_seconds = 0;
};

// A finished conversation's cache, kept for the session's next request.
struct KeptSession {
  std::vector<int32_t> tokens;  // whose keys and values are in `blocks`
  std::vector<int32_t> blocks;
  uint64_t last_used = 0;       // LRU clock
};

// Moves the elements of `queue` that satisfy `pred` to the end of `out`, in order.
template <typename Queue, typename Pred>
void MoveOutIf(Queue& queue, Pred pred, std::vector<std::unique_ptr<Sequence>>& out) {
  for (auto it = queue.begin(); it != queue.end();) {
    if (pred(*it)) {
      out.push_back(std::move(*it));
      it = queue.erase(it);
    } else {
      ++it;
    }
  }
}

int64_t CommonPrefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  const size_t n = std::min(a.size(), b.size());
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return static_cast<int64_t>(i);
}

}  // namespace

class InferenceEngine::Impl {
 public:
  Impl(std::unique_ptr<Model> model, const EngineOptions& options, int64_t session_len,
       int64_t total_blocks, int64_t block_bytes)
      : model_(std::move(model)),
        options_(options),
        session_len_(session_len),
        default_stop_ids_(model_->StopTokenIds()),
        blocks_(total_blocks, options.cache_chunk_size,
                [backend = &model_->backend()](int64_t n) { return backend->GrowKvCache(n); }) {
    stats_.kv_blocks_total = total_blocks;
    stats_.kv_block_seq_len = options.cache_block_seq_len;
    stats_.kv_cache_bytes = total_blocks * block_bytes;
  }

  // Starts the scheduler thread and waits until it has applied the model's thread count.
  void StartThread() {
    std::unique_lock<std::mutex> lock(mu_);
    thread_ = std::thread([this] { SchedulerMain(); });
    scheduler_id_ = thread_.get_id();
    // Releases mu_ while waiting: the thread's first act is to take it, so it sees thread_
    // and scheduler_id_ assigned.
    wake_.wait(lock, [this] { return scheduler_cpu_threads_ > 0; });
  }
  // True on the scheduler thread while it runs (its id may be reused once it has ended).
  bool OnSchedulerThread() const {
    return scheduler_running_.load() && std::this_thread::get_id() == scheduler_id_;
  }
  // The last owner let go inside a callback (on the scheduler thread, which cannot join
  // itself): stop, and let the scheduler thread delete this when its loop has ended.
  void DeleteWhenStopped() {
    delete_when_stopped_ = true;
    std::lock_guard<std::mutex> lock(mu_);
    shutting_down_ = true;
  }

  absl::StatusOr<uint64_t> Submit(InferenceRequest request, StreamCallback on_event);
  void Cancel(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    cancels_.push_back(id);
    // A cancelled request no longer holds its session: the session's next request may come
    // at once (it will not see this one's cache, which a cancelled request never keeps).
    if (auto it = request_sessions_.find(id); it != request_sessions_.end()) {
      auto active = active_sessions_.find(it->second);
      if (active != active_sessions_.end() && active->second.request_id == id) {
        active_sessions_.erase(active);
      }
      request_sessions_.erase(it);
    }
    wake_.notify_one();
  }
  void EndSession(const std::string& session_id) {
    std::lock_guard<std::mutex> lock(mu_);
    ended_sessions_.push_back(session_id);
    // A request of the session in flight keeps nothing when it finishes.
    if (auto it = active_sessions_.find(session_id); it != active_sessions_.end()) {
      it->second.end_session = true;
    }
    wake_.notify_one();
  }
  EngineStats Stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    EngineStats stats = stats_;
    stats.requests_waiting += static_cast<int32_t>(inbox_.size());
    return stats;
  }
  void Shutdown();

  const Model& model() const { return *model_; }
  const EngineOptions& options() const { return options_; }
  int64_t session_len() const { return session_len_; }
  int cpu_threads() const {
    std::lock_guard<std::mutex> lock(mu_);
    return scheduler_cpu_threads_;
  }

 private:
  void SchedulerMain();
  void Loop();
  // One scheduler iteration's parts, in order.
  void TakeNewRequests(std::vector<std::unique_ptr<Sequence>> incoming);
  void ApplyCancels(const std::vector<uint64_t>& ids);
  void EndDeadlines();
  void Admit();
  void RunStep();
  void PublishStats();

  // Ends `sequence` (removed from its queue by the caller): frees or keeps its blocks, sends
  // the final event, forgets its session's activity.
  void Finish(std::unique_ptr<Sequence> sequence, StopCause cause,
              FinishReason reason = FinishReason::kLength, absl::Status status = {},
              std::vector<int32_t> last_ids = {}, std::string last_text = {});
  // Moves every sequence out of the waiting queue and the running batch.
  std::vector<std::unique_ptr<Sequence>> TakeAll();
  // Frees the least recently used kept session's blocks; false when none is kept.
  bool EvictOldestSession();
  // One block for `sequence`, evicting kept sessions and then preempting the most recently
  // admitted running sequence as needed. False when `sequence` itself was preempted (it is
  // then back in the waiting queue) or nothing could be freed.
  bool GrowBlocks(Sequence& sequence, int64_t tokens);
  void Preempt(size_t running_index);
  int64_t KeptSessionBlocks() const;

  std::unique_ptr<Model> model_;
  const EngineOptions options_;
  const int64_t session_len_;
  const std::vector<int32_t> default_stop_ids_;

  // --- Shared with the callers' threads. ---
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::vector<std::unique_ptr<Sequence>> inbox_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> cancels_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> ended_sessions_ ABSL_GUARDED_BY(mu_);
  // Sessions with a request in flight (queued or running, neither cancelled nor finished),
  // and the session of each such request.
  struct InFlight {
    uint64_t request_id = 0;
    std::optional<Clock::time_point> deadline;  // once passed, the request no longer counts
    bool end_session = false;                   // EndSession came while it ran: keep nothing
  };
  std::map<std::string, InFlight> active_sessions_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::string> request_sessions_ ABSL_GUARDED_BY(mu_);
  int64_t queued_ ABSL_GUARDED_BY(mu_) = 0;  // inbox plus waiting queue
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  EngineStats stats_ ABSL_GUARDED_BY(mu_);
  // OpenMP threads of the scheduler thread's kernels, as that thread reports them.
  int scheduler_cpu_threads_ ABSL_GUARDED_BY(mu_) = 0;
  std::mutex join_mu_;  // serializes Shutdown's join
  std::thread thread_;
  std::thread::id scheduler_id_;  // set by StartThread before anyone else sees the engine
  std::atomic<bool> scheduler_running_{false};

  // --- The scheduler thread's own. ---
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // in admission order
  std::map<std::string, KeptSession> sessions_;
  KvBlockAllocator blocks_;
  uint64_t lru_clock_ = 0;
  int64_t admitted_counter_ = 0;
  std::vector<float> logits_;     // stays empty: every span with logits samples on the backend
  std::vector<int32_t> sampled_;  // the tokens the backend picked, in span order
  EngineStats counters_;  // the cumulative fields, copied into stats_ by PublishStats
  bool delete_when_stopped_ = false;  // set by DeleteWhenStopped, on this thread
};

absl::StatusOr<uint64_t> InferenceEngine::Impl::Submit(InferenceRequest request,
                                                       StreamCallback on_event) {
  NIBBLE_RETURN_IF_ERROR(
      ValidateGenerationInputs(request.prompt_ids, request.max_tokens, request.sampling));
  const int64_t vocab = model_->config().vocab_size;
  for (size_t i = 0; i < request.prompt_ids.size(); ++i) {
    const int32_t token = request.prompt_ids[i];
    if (token < 0 || token >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt token ", i, " is ", token, ", outside the vocabulary of ", vocab));
    }
  }
  for (int32_t token : request.stop_token_ids) {
    if (token < 0 || token >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stop token id ", token, " is outside the vocabulary of ", vocab));
    }
  }
  const int64_t prompt_length = static_cast<int64_t>(request.prompt_ids.size());
  if (prompt_length > session_len_) {
    return absl::ResourceExhaustedError(absl::StrCat("the prompt has ", prompt_length,
                                                     " tokens, more than session_len ",
                                                     session_len_));
  }
  const int64_t prompt_blocks = BlocksForTokens(prompt_length, options_.cache_block_seq_len);
  if (prompt_blocks > blocks_.total()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the prompt of ", prompt_length, " tokens needs ", prompt_blocks,
        " KV blocks; the whole cache has ", blocks_.total()));
  }
  if (on_event == nullptr) return absl::InvalidArgumentError("no event callback");

  auto sequence = std::make_unique<Sequence>();
  sequence->submitted = Clock::now();
  sequence->prompt_length = prompt_length;
  sequence->tokens = request.prompt_ids;
  sequence->usage.prompt_tokens = static_cast<int32_t>(prompt_length);
  if (request.stop_token_ids.empty() && request.model_stop_tokens) {
    request.stop_token_ids = default_stop_ids_;
  }
  sequence->on_event = std::move(on_event);

  std::lock_guard<std::mutex> lock(mu_);
  if (shutting_down_) return absl::UnavailableError("the engine is shutting down");
  // The limit is on the requests that must wait: those queued (this one included) beyond
  // the batch slots free now, which they will take at the next step.
  const int64_t free_slots =
      std::max<int64_t>(0, options_.max_batch_size - stats_.requests_running);
  if (queued_ + 1 - free_slots > options_.max_queued_requests) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the queue is full: ", queued_, " requests are queued for ", free_slots,
        " free batch slots, and at most ", options_.max_queued_requests,
        " may wait (max_queued_requests)"));
  }
  const Clock::time_point now = Clock::now();
  if (!request.session_id.empty()) {
    auto active = active_sessions_.find(request.session_id);
    if (active != active_sessions_.end()) {
      const InFlight& in_flight = active->second;
      if (!in_flight.deadline.has_value() || *in_flight.deadline > now) {
        return absl::FailedPreconditionError(absl::StrCat(
            "session \"", request.session_id, "\" already has a request in flight"));
      }
      // Its deadline passed: it ends at the scheduler's next step, before this one runs,
      // and keeps nothing.
      request_sessions_.erase(in_flight.request_id);
      active_sessions_.erase(active);
    }
  }
  sequence->id = next_id_++;
  const uint64_t id = sequence->id;
  if (!request.session_id.empty()) {
    active_sessions_[request.session_id] = InFlight{id, request.deadline, false};
    request_sessions_[id] = request.session_id;
  }
  sequence->request = std::move(request);
  inbox_.push_back(std::move(sequence));
  ++queued_;
  wake_.notify_one();
  return id;
}

void InferenceEngine::Impl::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    shutting_down_ = true;
    wake_.notify_one();
  }
  // From a callback (the scheduler thread itself) the loop ends after this step; joining
  // there would wait for itself.
  if (OnSchedulerThread()) return;
  std::lock_guard<std::mutex> lock(join_mu_);
  if (thread_.joinable()) thread_.join();
}

void InferenceEngine::Impl::SchedulerMain() {
  {
    std::lock_guard<std::mutex> lock(mu_);  // StartThread has assigned thread_ once this is ours
    scheduler_running_ = true;
    kernels::cpu::SetCpuThreads(model_->cpu_threads());
    scheduler_cpu_threads_ = kernels::cpu::CpuThreads();
    wake_.notify_all();  // StartThread
  }
  Loop();
  scheduler_running_ = false;
  if (delete_when_stopped_) {
    // Nobody owns this any more (DeleteWhenStopped): nothing can join this thread.
    thread_.detach();
    delete this;
  }
}

void InferenceEngine::Impl::Loop() {
  while (true) {
    // OpenMP's thread count is per thread: the model's setting, applied on this thread (the
    // one that drives the backend), and again each step in case a callback changed it.
    kernels::cpu::SetCpuThreads(model_->cpu_threads());
    std::vector<std::unique_ptr<Sequence>> incoming;
    std::vector<uint64_t> cancels;
    std::vector<std::string> ended_sessions;
    bool shutting_down;
    {
      std::unique_lock<std::mutex> lock(mu_);
      scheduler_cpu_threads_ = kernels::cpu::CpuThreads();
      // Idle: sleep until a caller hands over something.
      wake_.wait(lock, [&] {
        return shutting_down_ || !inbox_.empty() || !cancels_.empty() ||
               !ended_sessions_.empty() || !running_.empty() || !waiting_.empty();
      });
      incoming.swap(inbox_);
      cancels.swap(cancels_);
      ended_sessions.swap(ended_sessions_);
      shutting_down = shutting_down_;
    }
    TakeNewRequests(std::move(incoming));
    if (shutting_down) {
      for (auto& sequence : TakeAll()) Finish(std::move(sequence), StopCause::kShutdown);
      for (auto& [id, session] : sessions_) blocks_.Free(session.blocks);
      sessions_.clear();
      PublishStats();
      return;
    }
    for (const std::string& id : ended_sessions) {
      auto it = sessions_.find(id);
      if (it == sessions_.end()) continue;
      blocks_.Free(it->second.blocks);
      sessions_.erase(it);
    }
    ApplyCancels(cancels);
    EndDeadlines();
    Admit();
    if (!running_.empty()) RunStep();
    PublishStats();
  }
}

void InferenceEngine::Impl::TakeNewRequests(std::vector<std::unique_ptr<Sequence>> incoming) {
  for (auto& sequence : incoming) {
    if (sequence->request.max_tokens == 0) {  // as Generate: nothing to run
      Finish(std::move(sequence), StopCause::kFinished, FinishReason::kLength);
      continue;
    }
    sequence->sampler = std::make_unique<Sampler>(sequence->request.sampling);
    sequence->completion = std::make_unique<Completion>(
        model_->tokenizer(), sequence->request.stop_token_ids,
        sequence->request.stop_strings, sequence->request.max_tokens, session_len_);
    waiting_.push_back(std::move(sequence));
  }
}

void InferenceEngine::Impl::ApplyCancels(const std::vector<uint64_t>& ids) {
  if (ids.empty()) return;
  const std::set<uint64_t> cancelled(ids.begin(), ids.end());
  auto matches = [&](const std::unique_ptr<Sequence>& s) { return cancelled.count(s->id) > 0; };
  std::vector<std::unique_ptr<Sequence>> ended;
  MoveOutIf(waiting_, matches, ended);
  MoveOutIf(running_, matches, ended);
  for (auto& sequence : ended) Finish(std::move(sequence), StopCause::kCancelled);
}

void InferenceEngine::Impl::EndDeadlines() {
  const Clock::time_point now = Clock::now();
  auto expired = [now](const std::unique_ptr<Sequence>& s) {
    return s->request.deadline.has_value() && *s->request.deadline <= now;
  };
  std::vector<std::unique_ptr<Sequence>> ended;
  MoveOutIf(waiting_, expired, ended);
  MoveOutIf(running_, expired, ended);
  for (auto& sequence : ended) Finish(std::move(sequence), StopCause::kDeadlineExceeded);
}

int64_t InferenceEngine::Impl::KeptSessionBlocks() const {
  int64_t n = 0;
  for (const auto& [id, session] : sessions_) n += static_cast<int64_t>(session.blocks.size());
  return n;
}

bool InferenceEngine::Impl::EvictOldestSession() {
  if (sessions_.empty()) return false;
  auto oldest = sessions_.begin();
  for (auto it = sessions_.begin(); it != sessions_.end(); ++it) {
    if (it->second.last_used < oldest->second.last_used) oldest = it;
  }
  blocks_.Free(oldest->second.blocks);
  sessions_.erase(oldest);
  return true;
}

void InferenceEngine::Impl::Admit() {
  const int64_t block_len = options_.cache_block_seq_len;
  while (!waiting_.empty() && static_cast<int32_t>(running_.size()) < options_.max_batch_size) {
    Sequence& next = *waiting_.front();
    // A kept session's cache, reused up to the common prefix (but never the prompt's last
    // token: its logits are needed). Only on first admission: a preempted request recomputes.
    auto session = sessions_.end();
    int64_t reuse = 0;
    if (!next.ever_admitted && !next.request.session_id.empty()) {
      session = sessions_.find(next.request.session_id);
      if (session != sessions_.end()) {
        reuse = std::min(CommonPrefix(session->second.tokens, next.tokens),
                         next.prompt_length - 1);
      }
    }
    const int64_t reused_blocks = BlocksForTokens(reuse, block_len);
    // Blocks for every token it has now (the prompt, or after a preemption prompt and output)
    // so that its prefill never waits for memory.
    const int64_t needed =
        BlocksForTokens(static_cast<int64_t>(next.tokens.size()), block_len) - reused_blocks;
    // Free blocks, and kept sessions' blocks (this one's beyond the reused part included).
    const int64_t obtainable = blocks_.available() + KeptSessionBlocks() - reused_blocks;
    if (needed > obtainable) {
      if (!running_.empty()) break;  // waits for running requests to free blocks
      // Nothing runs and the cache still cannot hold it: it never will.
      auto sequence = std::move(waiting_.front());
      waiting_.pop_front();
      const int64_t tokens = static_cast<int64_t>(sequence->tokens.size());
      Finish(std::move(sequence), StopCause::kError, FinishReason::kLength,
             absl::ResourceExhaustedError(absl::StrCat(
                 "a sequence of ", tokens, " tokens needs ",
                 BlocksForTokens(tokens, block_len), " KV blocks; the cache has ",
                 blocks_.total())));
      continue;
    }
    auto sequence = std::move(waiting_.front());
    waiting_.pop_front();
    if (session != sessions_.end()) {
      sequence->blocks = std::move(session->second.blocks);
      blocks_.FreeTail(sequence->blocks, reused_blocks);
      sessions_.erase(session);
      sequence->computed = reuse;
      sequence->usage.cached_prompt_tokens = static_cast<int32_t>(reuse);
    }
    const int64_t target = BlocksForTokens(static_cast<int64_t>(sequence->tokens.size()),
                                           block_len);
    while (static_cast<int64_t>(sequence->blocks.size()) < target) {
      std::optional<int32_t> block = blocks_.Allocate();
      if (!block && EvictOldestSession()) block = blocks_.Allocate();
      if (!block) break;  // cannot happen after the count above; RunStep copes anyway
      sequence->blocks.push_back(*block);
    }
    if (!sequence->ever_admitted) {
      sequence->ever_admitted = true;
      sequence->queue_seconds = SecondsBetween(sequence->submitted, Clock::now());
    }
    sequence->admitted_order = ++admitted_counter_;
    running_.push_back(std::move(sequence));
  }
}

void InferenceEngine::Impl::Preempt(size_t running_index) {
  auto sequence = std::move(running_[running_index]);
  running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(running_index));
  blocks_.Free(sequence->blocks);
  sequence->computed = 0;
  ++sequence->usage.preemptions;
  ++counters_.preemptions_total;
  waiting_.push_front(std::move(sequence));
}

bool InferenceEngine::Impl::GrowBlocks(Sequence& sequence, int64_t tokens) {
  const int64_t target = BlocksForTokens(tokens, options_.cache_block_seq_len);
  while (static_cast<int64_t>(sequence.blocks.size()) < target) {
    if (std::optional<int32_t> block = blocks_.Allocate()) {
      sequence.blocks.push_back(*block);
      continue;
    }
    if (EvictOldestSession()) continue;
    // Preempt the most recently admitted (the back of running_, which is in admission order).
    if (running_.empty()) return false;
    const bool self = running_.back().get() == &sequence;
    if (self && running_.size() == 1) return false;  // alone and still too long
    Preempt(running_.size() - 1);
    if (self) return false;
  }
  return true;
}

void InferenceEngine::Impl::RunStep() {
  struct Planned {
    Sequence* sequence;
    int64_t tokens;
  };
  std::vector<Planned> plan;
  int64_t prefill_budget = options_.max_prefill_tokens_per_step;
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence& sequence = *running_[i];
    const int64_t remaining = static_cast<int64_t>(sequence.tokens.size()) - sequence.computed;
    // Decode steps always run; prefill (and recompute) chunks share the step's budget.
    const int64_t n = remaining == 1 ? 1 : std::min(remaining, prefill_budget);
    if (n <= 0) continue;
    const size_t size_before = running_.size();
    if (!GrowBlocks(sequence, sequence.computed + n)) {
      if (running_.size() == size_before) {
        // Alone and out of memory: it cannot go on.
        auto self = std::move(running_[i]);
        running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(i));
        const int64_t length = self->computed + n;
        Finish(std::move(self), StopCause::kError, FinishReason::kLength,
               absl::ResourceExhaustedError(absl::StrCat(
                   "a sequence of ", length, " tokens does not fit the KV cache of ",
                   blocks_.total(), " blocks of ", options_.cache_block_seq_len, " tokens")));
      }
      break;  // it was preempted: it was the last of running_
    }
    if (remaining > 1) prefill_budget -= n;
    plan.push_back({&sequence, n});
  }
  if (plan.empty()) return;

  std::vector<BatchSpan> spans(plan.size());
  for (size_t s = 0; s < plan.size(); ++s) {
    Sequence& sequence = *plan[s].sequence;
    BatchSpan& span = spans[s];
    span.tokens = std::span<const int32_t>(sequence.tokens).subspan(
        static_cast<size_t>(sequence.computed), static_cast<size_t>(plan[s].tokens));
    span.start = sequence.computed;
    span.block_table = sequence.blocks;
    span.logits = sequence.computed + plan[s].tokens ==
                  static_cast<int64_t>(sequence.tokens.size());
    // The backend picks the token by the Sampler's rule (a GPU backend next to the logits,
    // which then never leave the device); the draw comes from the request's seeded stream
    // here, one per generated token as Sampler::Sample takes it, so a seed replays the same
    // tokens on every backend (up to rounding, kernels/cuda/sampling.h).
    if (span.logits) {
      span.sample = true;
      span.sampling = sequence.sampler->NextRow();
      sequence.sampler->PenaltyIds(sequence.tokens, model_->config().vocab_size,
                                   sequence.penalty_ids);
      span.penalty_ids = sequence.penalty_ids;
    }
    counters_.prompt_tokens_total +=
        std::max<int64_t>(0, std::min(sequence.prompt_length, sequence.computed + plan[s].tokens) -
                                 sequence.computed);
  }
  const absl::Status status = model_->backend().ForwardBatch(spans, logits_, sampled_);
  ++counters_.steps_total;
  if (!status.ok()) {
    // A backend failure ends the requests of this step; the engine goes on.
    std::set<Sequence*> failed;
    for (const Planned& p : plan) failed.insert(p.sequence);
    for (size_t i = running_.size(); i-- > 0;) {
      if (!failed.count(running_[i].get())) continue;
      auto sequence = std::move(running_[i]);
      running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(i));
      Finish(std::move(sequence), StopCause::kError, FinishReason::kLength, status);
    }
    return;
  }

  const Clock::time_point now = Clock::now();
  std::set<Sequence*> finished;
  std::vector<std::pair<Sequence*, Completion::Step>> outcomes;
  size_t sampled_row = 0;
  for (size_t s = 0; s < plan.size(); ++s) {
    Sequence& sequence = *plan[s].sequence;
    sequence.computed += plan[s].tokens;
    if (!spans[s].logits) continue;
    const int32_t token = sampled_[sampled_row++];
    sequence.tokens.push_back(token);
    ++counters_.generation_tokens_total;
    if (sequence.first_token_seconds == 0) {
      sequence.first_token_seconds = SecondsBetween(sequence.submitted, now);
    }
    Completion::Step step =
        sequence.completion->Accept(token, static_cast<int64_t>(sequence.tokens.size()) - 1);
    if (step.finish) finished.insert(&sequence);
    outcomes.emplace_back(&sequence, std::move(step));
  }
  for (auto& [sequence, step] : outcomes) {
    const int32_t token = sequence->tokens.back();
    if (!step.finish) {
      StreamEvent event;
      event.request_id = sequence->id;
      event.token_ids = {token};
      event.text_delta = std::move(step.text);
      event.queue_seconds = sequence->queue_seconds;
      event.first_token_seconds = sequence->first_token_seconds;
      sequence->on_event(event);
      continue;
    }
    auto it = std::find_if(running_.begin(), running_.end(),
                           [sequence = sequence](const auto& s) { return s.get() == sequence; });
    auto owned = std::move(*it);
    running_.erase(it);
    std::string text = std::move(step.text);
    text += owned->completion->Finish();
    Finish(std::move(owned), StopCause::kFinished, *step.finish, absl::OkStatus(), {token},
           std::move(text));
  }
}

void InferenceEngine::Impl::Finish(std::unique_ptr<Sequence> sequence, StopCause cause,
                                   FinishReason reason, absl::Status status,
                                   std::vector<int32_t> last_ids, std::string last_text) {
  const std::string& session_id = sequence->request.session_id;
  // Whether the request still holds its session: not after Cancel, a passed deadline that let
  // a newer request in, or EndSession while it ran.
  bool holds_session = false;
  if (!session_id.empty()) {
    std::lock_guard<std::mutex> lock(mu_);
    request_sessions_.erase(sequence->id);
    auto active = active_sessions_.find(session_id);
    if (active != active_sessions_.end() && active->second.request_id == sequence->id) {
      holds_session = !active->second.end_session;
      active_sessions_.erase(active);
    }
  }
  if (cause == StopCause::kFinished && holds_session && options_.max_sessions > 0 &&
      sequence->computed > 0) {
    // Keep the conversation's cache: every token but the last, which never ran.
    KeptSession kept;
    kept.tokens.assign(sequence->tokens.begin(), sequence->tokens.begin() + sequence->computed);
    kept.blocks = std::move(sequence->blocks);
    blocks_.FreeTail(kept.blocks,
                     BlocksForTokens(sequence->computed, options_.cache_block_seq_len));
    kept.last_used = ++lru_clock_;
    if (auto old = sessions_.find(session_id); old != sessions_.end()) {
      blocks_.Free(old->second.blocks);
      sessions_.erase(old);
    }
    sessions_.emplace(session_id, std::move(kept));
    while (static_cast<int32_t>(sessions_.size()) > options_.max_sessions) EvictOldestSession();
  } else {
    blocks_.Free(sequence->blocks);
  }
  if (cause == StopCause::kFinished) ++counters_.requests_finished_total;

  StreamEvent event;
  event.request_id = sequence->id;
  event.token_ids = std::move(last_ids);
  event.text_delta = std::move(last_text);
  event.final = true;
  event.stop_cause = cause;
  event.finish_reason = reason;
  event.status = std::move(status);
  event.usage = sequence->usage;
  event.usage.completion_tokens =
      static_cast<int32_t>(sequence->tokens.size()) - static_cast<int32_t>(sequence->prompt_length);
  event.queue_seconds = sequence->queue_seconds;
  event.first_token_seconds = sequence->first_token_seconds;
  sequence->on_event(event);
}

std::vector<std::unique_ptr<Sequence>> InferenceEngine::Impl::TakeAll() {
  std::vector<std::unique_ptr<Sequence>> all;
  auto any = [](const std::unique_ptr<Sequence>&) { return true; };
  MoveOutIf(waiting_, any, all);
  MoveOutIf(running_, any, all);
  return all;
}

void InferenceEngine::Impl::PublishStats() {
  std::lock_guard<std::mutex> lock(mu_);
  EngineStats& s = stats_;
  s.requests_running = static_cast<int32_t>(running_.size());
  s.requests_waiting = static_cast<int32_t>(waiting_.size());
  s.kv_blocks_used = blocks_.used();
  s.sessions = static_cast<int32_t>(sessions_.size());
  s.prompt_tokens_total = counters_.prompt_tokens_total;
  s.generation_tokens_total = counters_.generation_tokens_total;
  s.preemptions_total = counters_.preemptions_total;
  s.requests_finished_total = counters_.requests_finished_total;
  s.steps_total = counters_.steps_total;
  queued_ = static_cast<int64_t>(inbox_.size() + waiting_.size());
}

// ---------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<InferenceEngine>> InferenceEngine::Start(
    std::unique_ptr<Model> model, const EngineOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("no model");
  auto out_of_range = [](const std::string& name, auto value, const std::string& rule) {
    return absl::InvalidArgumentError(absl::StrCat(name, " is ", value, "; it must be ", rule));
  };
  if (!(options.cache_max_entry_count > 0 && options.cache_max_entry_count <= 1)) {
    return out_of_range("cache_max_entry_count", options.cache_max_entry_count, "in (0, 1]");
  }
  if (options.cache_block_seq_len <= 0) {
    return out_of_range("cache_block_seq_len", options.cache_block_seq_len, "positive");
  }
  if (options.cache_chunk_size == 0 || options.cache_chunk_size < -1) {
    return out_of_range("cache_chunk_size", options.cache_chunk_size,
                        "positive, or -1 for the whole cache at once");
  }
  if (options.max_batch_size <= 0) {
    return out_of_range("max_batch_size", options.max_batch_size, "positive");
  }
  if (options.max_queued_requests < 0) {
    return out_of_range("max_queued_requests", options.max_queued_requests, ">= 0");
  }
  if (options.max_prefill_tokens_per_step <= 0) {
    return out_of_range("max_prefill_tokens_per_step", options.max_prefill_tokens_per_step,
                        "positive");
  }
  if (options.max_sessions < 0) {
    return out_of_range("max_sessions", options.max_sessions, ">= 0");
  }
  const int64_t context = model->config().max_position_embeddings;
  if (options.session_len < 0 || options.session_len > context) {
    return out_of_range("session_len", options.session_len,
                        absl::StrCat("between 0 (the model's context) and the model's "
                                     "context of ",
                                     context));
  }
  const int64_t session_len = options.session_len == 0 ? context : options.session_len;

  Backend& backend = model->backend();
  const int64_t block_bytes = backend.KvBlockBytes(options.cache_block_seq_len);
  const std::optional<int64_t> free_bytes = backend.FreeMemoryBytes();
  if (!free_bytes && options.cpu_memory_budget_bytes <= 0) {
    return out_of_range("cpu_memory_budget_bytes", options.cpu_memory_budget_bytes,
                        "positive");
  }
  const double budget = static_cast<double>(free_bytes.value_or(options.cpu_memory_budget_bytes)) *
                        options.cache_max_entry_count;
  const int64_t total_blocks = static_cast<int64_t>(budget / static_cast<double>(block_bytes));
  if (total_blocks < 1) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the KV cache budget of ", static_cast<int64_t>(budget), " bytes (cache_max_entry_count ",
        options.cache_max_entry_count, " of ", free_bytes ? "free device memory " : "cpu_memory_budget_bytes ",
        free_bytes.value_or(options.cpu_memory_budget_bytes), ") holds no block of ",
        options.cache_block_seq_len, " tokens (", block_bytes, " bytes)"));
  }
  if (total_blocks > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("a KV cache of ", total_blocks,
                                                   " blocks has more than int32 block ids"));
  }
  NIBBLE_RETURN_IF_ERROR(backend.ConfigureKvCache(total_blocks, options.cache_block_seq_len));
  auto impl = std::make_unique<Impl>(std::move(model), options, session_len, total_blocks,
                                     block_bytes);
  impl->StartThread();
  return std::unique_ptr<InferenceEngine>(new InferenceEngine(std::move(impl)));
}

InferenceEngine::InferenceEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
InferenceEngine::~InferenceEngine() {
  if (impl_->OnSchedulerThread()) {
    // Destroyed inside a callback (its last owner let go there): the scheduler thread cannot
    // join itself, so it ends every request with kShutdown after the callback returns, and
    // then deletes the engine's state and detaches itself.
    impl_.release()->DeleteWhenStopped();
    return;
  }
  Shutdown();
}

absl::StatusOr<uint64_t> InferenceEngine::Submit(InferenceRequest request,
                                                 StreamCallback on_event) {
  return impl_->Submit(std::move(request), std::move(on_event));
}
void InferenceEngine::Cancel(uint64_t request_id) { impl_->Cancel(request_id); }
void InferenceEngine::EndSession(const std::string& session_id) {
  impl_->EndSession(session_id);
}
EngineStats InferenceEngine::Stats() const { return impl_->Stats(); }
const Model& InferenceEngine::model() const { return impl_->model(); }
const EngineOptions& InferenceEngine::options() const { return impl_->options(); }
int64_t InferenceEngine::session_len() const { return impl_->session_len(); }
int InferenceEngine::cpu_threads() const { return impl_->cpu_threads(); }
void InferenceEngine::Shutdown() { impl_->Shutdown(); }

}  // namespace nibble::engine
