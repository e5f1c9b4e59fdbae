#include "server/inference_service.h"

#include <atomic>
#include <chrono>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/grpc_status.h"
#include "server/inference_requests.h"
#include "server/raw_messages.h"
#include "server/unary_call.h"

namespace nibble::server {
namespace {

using Clock = std::chrono::steady_clock;

nibble::v1::FinishReason ToWire(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kLength: return nibble::v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kStopToken: return nibble::v1::FINISH_REASON_STOP;
    case engine::FinishReason::kStopString: return nibble::v1::FINISH_REASON_STOP_STRING;
    case engine::FinishReason::kContextFull: return nibble::v1::FINISH_REASON_CONTEXT_FULL;
  }
  return nibble::v1::FINISH_REASON_UNSPECIFIED;
}

// A reactor that only finishes (a refused call).
class RefusedStream final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  explicit RefusedStream(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

// One streamed generation. Lifetime: two references, gRPC's (dropped in OnDone) and the
// engine's (dropped after the final event has been handled); the last one deletes. Finish is
// called exactly once, and only after the engine's final event, so no engine callback can
// arrive for a deleted stream.
class GenerationStream final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  // Takes over a call counted by ServingState::TryStartCall (CallDone when deleted).
  // `arrival`: when the handler started, the origin of every timing this stream reports.
  // `model`: the stream's counted reference, held until the stream is deleted, so an Unload
  // that drains waits for it and one that cancels cannot free the engine under it.
  GenerationStream(grpc::CallbackServerContext* context, ModelRef model,
                   const RequestMetrics* metrics, ServingState& state, bool return_token_ids,
                   Clock::time_point arrival)
      : context_(context),
        model_(std::move(model)),
        metrics_(metrics),
        state_(state),
        return_token_ids_(return_token_ids),
        arrival_(arrival) {}

  // Submits `request`; on refusal finishes the call with the engine's status.
  void Start(engine::InferenceRequest request) {
    const auto deadline = context_->deadline();
    if (deadline != std::chrono::system_clock::time_point::max()) {
      // The client's deadline, moved onto the engine's clock.
      request.deadline = Clock::now() + (deadline - std::chrono::system_clock::now());
    }
    seed_ = request.sampling.seed;
    // The engine's timings count from Submit; ours from arrival.
    submit_offset_ = std::chrono::duration<double>(Clock::now() - arrival_).count();
    refs_.store(2);
    auto id = model_->engine->Submit(std::move(request),
                                    [this](const engine::StreamEvent& event) { OnEvent(event); });
    if (!id.ok()) {
      refs_.store(1);  // the engine holds no reference: it will never call back
      {
        std::lock_guard<std::mutex> lock(mu_);
        finish_called_ = true;
      }
      Finish(ToGrpcStatus(id.status()));
      return;
    }
    bool cancel = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      request_id_ = *id;
      cancel = client_gone_;
    }
    if (cancel) model_->engine->Cancel(*id);
  }

 private:
  ~GenerationStream() override { state_.CallDone(); }

  // An engine timing (seconds since Submit, 0: it did not happen) from arrival instead.
  double SinceArrival(double since_submit) const {
    return since_submit > 0 ? since_submit + submit_offset_ : 0.0;
  }

  // The engine's scheduler thread. Never blocks beyond the short lock.
  void OnEvent(const engine::StreamEvent& event) {
    const auto now = Clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (request_id_ == 0) request_id_ = event.request_id;
      pending_text_ += event.text_delta;
      if (return_token_ids_) {
        pending_ids_.insert(pending_ids_.end(), event.token_ids.begin(), event.token_ids.end());
      }
      if (!event.token_ids.empty()) ObserveTokens(event, now);
      if (event.final) {
        final_ = event;
        final_->text_delta.clear();
        final_->token_ids.clear();
        final_status_ = FinalStatus(event);
        ObserveEnd(event, now);
      }
    }
    const bool last = event.final;
    Pump();
    if (last) Unref();  // the engine's reference: it never calls again
  }

  // Time to first token and end to end share one origin: the call's arrival.
  void ObserveTokens(const engine::StreamEvent& event, Clock::time_point now) {
    if (metrics_ == nullptr) return;
    const size_t n = event.token_ids.size();
    if (!saw_token_) {
      saw_token_ = true;
      const double first = SinceArrival(event.first_token_seconds);
      metrics_->time_to_first_token->Observe(
          first > 0 ? first : std::chrono::duration<double>(now - arrival_).count());
      if (n > 1) {
        // Tokens after the first in the same event: no measurable gap.
        for (size_t i = 1; i < n; ++i) metrics_->inter_token_latency->Observe(0);
      }
    } else {
      const double gap = std::chrono::duration<double>(now - last_token_).count() / n;
      for (size_t i = 0; i < n; ++i) metrics_->inter_token_latency->Observe(gap);
    }
    last_token_ = now;
  }

  void ObserveEnd(const engine::StreamEvent& event, Clock::time_point now) {
    if (metrics_ == nullptr) return;
    metrics_->e2e_request_latency->Observe(std::chrono::duration<double>(now - arrival_).count());
    if (event.queue_seconds > 0) {
      metrics_->request_queue_time->Observe(SinceArrival(event.queue_seconds));
    }
    metrics_->prompt_tokens_cached->Increment(event.usage.cached_prompt_tokens);
  }

  // Starts the next write or the Finish, if one is due and none is in flight. Called without
  // mu_ held, from any thread; touches no member after Finish (OnDone may delete `this`).
  void Pump() {
    enum class Action { kNone, kWrite, kWriteAndFinish, kFinish } action = Action::kNone;
    grpc::Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finish_called_ || write_in_flight_) return;
      const bool has_data = !pending_text_.empty() || !pending_ids_.empty();
      if (client_gone_) {
        // Nobody reads: drop the text, wait for the engine's final event, then finish.
        if (!final_) return;
        action = Action::kFinish;
        status = final_status_.ok() ? grpc::Status(grpc::StatusCode::CANCELLED,
                                                   "the client cancelled the request")
                                    : final_status_;
      } else if (final_ && final_status_.ok()) {
        action = Action::kWriteAndFinish;
        status = grpc::Status::OK;
      } else if (final_ && !has_data) {
        action = Action::kFinish;
        status = final_status_;
      } else if (has_data) {
        // A plain write: also before an error status, which would drop a message written
        // together with it.
        action = Action::kWrite;
      } else {
        return;
      }
      if (action == Action::kWrite || action == Action::kWriteAndFinish) {
        nibble::v1::ChatChunk chunk;
        chunk.set_request_id(request_id_);
        chunk.set_text(std::move(pending_text_));
        pending_text_.clear();
        chunk.mutable_token_ids()->Add(pending_ids_.begin(), pending_ids_.end());
        pending_ids_.clear();
        if (action == Action::kWriteAndFinish) {
          chunk.set_finish_reason(ToWire(final_->finish_reason));
          auto* usage = chunk.mutable_usage();
          usage->set_prompt_tokens(final_->usage.prompt_tokens);
          usage->set_cached_prompt_tokens(final_->usage.cached_prompt_tokens);
          usage->set_completion_tokens(final_->usage.completion_tokens);
          usage->set_preemptions(final_->usage.preemptions);
          chunk.set_seed(seed_);
          auto* timing = chunk.mutable_timing();
          timing->set_queue_seconds(SinceArrival(final_->queue_seconds));
          timing->set_first_token_seconds(SinceArrival(final_->first_token_seconds));
          timing->set_total_seconds(
              std::chrono::duration<double>(Clock::now() - arrival_).count());
        }
        SerializeResponse(chunk, &write_buffer_);
      }
      if (action == Action::kWrite) {
        write_in_flight_ = true;
      } else {
        finish_called_ = true;
      }
    }
    switch (action) {
      case Action::kWrite: StartWrite(&write_buffer_); break;
      case Action::kWriteAndFinish: StartWriteAndFinish(&write_buffer_, grpc::WriteOptions(), status); break;
      case Action::kFinish: Finish(status); break;
      case Action::kNone: break;
    }
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      write_in_flight_ = false;
    }
    if (!ok) {
      ClientGone();  // the stream broke: the client went away
      return;
    }
    Pump();
  }

  void OnCancel() override { ClientGone(); }

  void ClientGone() {
    uint64_t id = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      client_gone_ = true;
      id = request_id_;
    }
    if (id != 0) model_->engine->Cancel(id);
    Pump();
  }

  void OnDone() override { Unref(); }

  void Unref() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  grpc::CallbackServerContext* const context_;
  ModelRef model_;
  const RequestMetrics* const metrics_;
  ServingState& state_;
  const bool return_token_ids_;
  const Clock::time_point arrival_;
  uint64_t seed_ = 0;           // set by Start
  double submit_offset_ = 0;    // set by Start: seconds from arrival to Submit
  std::atomic<int> refs_{1};

  std::mutex mu_;
  uint64_t request_id_ = 0;         // guarded by mu_
  std::string pending_text_;        // guarded by mu_: not yet written
  std::vector<int32_t> pending_ids_;  // guarded by mu_
  std::optional<engine::StreamEvent> final_;  // guarded by mu_
  grpc::Status final_status_;       // guarded by mu_
  bool write_in_flight_ = false;    // guarded by mu_
  bool finish_called_ = false;      // guarded by mu_
  bool client_gone_ = false;        // guarded by mu_
  grpc::ByteBuffer write_buffer_;   // owned by the write in flight
  // Scheduler thread only (histograms).
  bool saw_token_ = false;
  Clock::time_point last_token_;
};

}  // namespace

template <class WireRequest>
grpc::ServerWriteReactor<grpc::ByteBuffer>* InferenceService::Stream(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  const Clock::time_point arrival = Clock::now();
  // Counted before anything else, so a drain that starts now waits for this call.
  CallGuard call(state_);
  if (!call.counted()) return new RefusedStream(DrainingStatus());
  WireRequest wire;
  if (grpc::Status s = ParseRequest(*request, &wire); !s.ok()) return new RefusedStream(s);
  ModelRef model;
  if (grpc::Status s = models_.Find(wire.model(), &model); !s.ok()) return new RefusedStream(s);
  // A full queue refuses before the prompt is tokenized (Submit checks again).
  const int32_t max_queued = model->engine->options().max_queued_requests;
  if (const int32_t waiting = model->engine->Stats().requests_waiting; waiting >= max_queued) {
    return new RefusedStream(grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("the queue is full: ", waiting, " requests are waiting (max_queued_requests ",
                     max_queued, ")")));
  }
  engine::InferenceRequest engine_request;
  if (grpc::Status s = PrepareRequest(wire.sampling(), wire.session_id(), InputOf(wire), *model,
                                      &engine_request);
      !s.ok()) {
    return new RefusedStream(s);
  }
  const RequestMetrics* metrics = metrics_ ? metrics_->For(model->spec.name) : nullptr;
  auto* stream = new GenerationStream(context, std::move(model), metrics, state_,
                                      wire.return_token_ids(), arrival);
  call.Release();  // the stream ends the call when it is deleted
  stream->Start(std::move(engine_request));
  return stream;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* InferenceService::Chat(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  return Stream<nibble::v1::ChatRequest>(context, request);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  return Stream<nibble::v1::GenerateRequest>(context, request);
}

template <class Response, class Respond>
grpc::ServerUnaryReactor* InferenceService::TokenizeCall(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* request,
                                                         grpc::ByteBuffer* response,
                                                         Respond respond) {
  UnaryCall<nibble::v1::TokenizeRequest> call(context, state_, request);
  ModelRef model;
  PromptInput input;
  std::vector<int32_t> ids;
  if (call.ok()) call.set_status(models_.Find(call.wire().model(), &model));
  if (call.ok()) call.set_status(InputOf(call.wire(), &input));
  if (call.ok()) call.set_status(TokenizePrompt(input, *model, &ids));
  if (call.ok()) {
    Response out;
    respond(*model, ids, &out);
    SerializeResponse(out, response);
  }
  return call.Finish();
}

namespace {

void FillTokenize(const ServedModel& model, const std::vector<int32_t>& ids,
                  nibble::v1::TokenizeResponse* out) {
  out->mutable_token_ids()->Add(ids.begin(), ids.end());
  const engine::Tokenizer& tokenizer = model.engine->model().tokenizer();
  for (int32_t id : ids) out->add_pieces(tokenizer.IdToPiece(id));
}

void FillCount(const ServedModel& model, const std::vector<int32_t>& ids,
               nibble::v1::CountTokensResponse* out) {
  out->set_token_count(static_cast<int32_t>(ids.size()));
  out->set_session_len(model.engine->session_len());
  out->set_context_length(model.engine->model().config().max_position_embeddings);
}

}  // namespace

grpc::ServerUnaryReactor* InferenceService::Tokenize(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* request,
                                                     grpc::ByteBuffer* response) {
  return TokenizeCall<nibble::v1::TokenizeResponse>(context, request, response, FillTokenize);
}

grpc::ServerUnaryReactor* InferenceService::CountTokens(grpc::CallbackServerContext* context,
                                                        const grpc::ByteBuffer* request,
                                                        grpc::ByteBuffer* response) {
  return TokenizeCall<nibble::v1::CountTokensResponse>(context, request, response, FillCount);
}

grpc::ServerUnaryReactor* InferenceService::EndSession(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request,
                                                       grpc::ByteBuffer* response) {
  UnaryCall<nibble::v1::EndSessionRequest> call(context, state_, request);
  ModelRef model;
  if (call.ok()) call.set_status(CheckSessionId(call.wire().session_id(), /*required=*/true));
  if (call.ok()) call.set_status(models_.Find(call.wire().model(), &model));
  if (call.ok()) {
    model->engine->EndSession(call.wire().session_id());
    SerializeResponse(nibble::v1::EndSessionResponse(), response);
  }
  return call.Finish();
}

}  // namespace nibble::server
