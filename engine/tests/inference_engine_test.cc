// The serving engine on the real stories260K model (converted from shared/ by the test
// itself): every batched, chunked, preempted, session-reusing or sampled request must give
// exactly the tokens that the single-sequence Generate gives for it alone. No mocks.
#include "engine/inference_engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/cpu_backend.h"
#include "engine/generator.h"
#include "engine/llama2c.h"
#include "engine/model.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/sampling.h"
#include "tests/testing/test_support.h"

namespace nibble::engine {
namespace {

using ::nibble::testing::SharedDir;
using ::nibble::testing::TempDir;
using namespace std::chrono_literals;

// stories260K as a Hugging Face directory, converted once per process.
const std::string& ModelDir() {
  static TempDir* dir = new TempDir("nibble_engine_test");
  static const std::string path = [] {
    const std::string out = dir->path() + "/stories260K";
    const std::string shared = SharedDir();
    const absl::Status status =
        ConvertLlama2cToHf(shared + "/models/stories260K/stories260K.bin",
                           shared + "/models/stories260K/tok512.model", out);
    EXPECT_TRUE(status.ok()) << status;
    return out;
  }();
  return path;
}

std::unique_ptr<Model> LoadModel() {
  auto model = Model::Load(ModelDir(), ModelLoadOptions{});
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(model).value() : nullptr;
}

// The single-sequence reference, one model for the whole process.
Model& ReferenceModel() {
  static Model* model = LoadModel().release();
  return *model;
}

// `count` different real prompts: BOS and the text of a story opening.
std::vector<std::vector<int32_t>> Prompts(int count, int repeat_clause = 1) {
  const std::vector<std::string> names = {"Lily", "Tom", "Sue", "Ben", "Max", "Mia", "Sam",
                                          "Anna"};
  const std::vector<std::string> things = {"a red ball", "the big tree", "a little dog",
                                           "her mom",    "the park",     "a shiny car",
                                           "cake",       "the sea"};
  std::vector<std::vector<int32_t>> prompts;
  const Tokenizer& tokenizer = ReferenceModel().tokenizer();
  for (int i = 0; i < count; ++i) {
    std::string text = "Once upon a time, " + names[i % names.size()] + " liked " +
                       things[(i / names.size()) % things.size()] + ".";
    for (int r = 1; r < repeat_clause; ++r) text += " " + names[(i + r) % names.size()] + " was happy.";
    std::vector<int32_t> ids = {tokenizer.BosId()};
    for (int32_t id : tokenizer.Encode(text)) ids.push_back(id);
    prompts.push_back(ids);
  }
  return prompts;
}

GenerateResult Reference(const InferenceRequest& request) {
  GenerateRequest g;
  g.prompt_ids = request.prompt_ids;
  g.max_tokens = request.max_tokens;
  g.sampling = request.sampling;
  g.stop_token_ids = request.stop_token_ids.empty() && request.model_stop_tokens
                         ? ReferenceModel().StopTokenIds()
                         : request.stop_token_ids;
  g.stop_strings = request.stop_strings;
  auto result = Generate(ReferenceModel(), g, nullptr);
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *result : GenerateResult{};
}

// Collects every request's events; waits for final ones. Declare it (and whatever an `also`
// callback touches) before the engine, so that the engine, destroyed first, ends its requests
// while they still exist; the callbacks share the collector's state besides, so a collector
// that goes first (a helper's, on an early ASSERT) is not called after its death.
class Collector {
 public:
  struct Stream {
    std::vector<int32_t> ids;
    std::string text;
    int events = 0;
    bool done = false;
    StreamEvent final_event;
  };

  StreamCallback Callback(int key, std::function<void(const StreamEvent&)> also = nullptr) {
    return [state = state_, key, also](const StreamEvent& event) {
      // `also` first: once the final event is recorded, a waiter may go on and end the test.
      if (also) also(event);
      std::lock_guard<std::mutex> lock(state->mu);
      Stream& s = state->streams[key];
      EXPECT_FALSE(s.done) << "event after the final one for " << key;
      s.ids.insert(s.ids.end(), event.token_ids.begin(), event.token_ids.end());
      s.text += event.text_delta;
      ++s.events;
      if (event.final) {
        s.done = true;
        s.final_event = event;
      }
      // Under the lock: a waiter cannot wake, return and destroy the collector mid-notify.
      state->done.notify_all();
    };
  }

  // Waits until `count` streams are final (at most 60 s).
  bool WaitFinal(int count) {
    std::unique_lock<std::mutex> lock(state_->mu);
    return state_->done.wait_for(lock, 60s, [&] {
      int n = 0;
      for (auto& [key, s] : state_->streams) n += s.done;
      return n >= count;
    });
  }

  Stream Get(int key) {
    std::lock_guard<std::mutex> lock(state_->mu);
    return state_->streams[key];
  }

 private:
  struct State {
    std::mutex mu;
    std::condition_variable done;
    std::map<int, Stream> streams;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

// Holds the scheduler thread inside a callback until opened, so that a test can act while a
// request is certainly in flight and nothing else progresses (tests only: callbacks must
// not block). It opens by itself after 20 s, so a failed test cannot hang on it. Declare it
// before the engine.
class Gate {
 public:
  // An `also` callback for Collector: blocks on the first event it sees, whatever it is.
  std::function<void(const StreamEvent&)> HoldFirstEvent() {
    auto first = std::make_shared<std::atomic<bool>>(true);
    return [this, first](const StreamEvent&) {
      if (first->exchange(false)) Hold();
    };
  }
  void Hold() {
    std::unique_lock<std::mutex> lock(mu_);
    held_ = true;
    cv_.notify_all();
    cv_.wait_for(lock, 20s, [&] { return open_; });
  }
  // Waits until a callback is held (at most 20 s).
  bool WaitHeld() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, 20s, [&] { return held_; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool held_ = false;
  bool open_ = false;
};

std::unique_ptr<InferenceEngine> StartEngine(const EngineOptions& options) {
  auto engine = InferenceEngine::Start(LoadModel(), options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(engine).value() : nullptr;
}

// Stats settle after the step that sent the final events.
EngineStats WaitIdle(InferenceEngine& engine) {
  const auto until = std::chrono::steady_clock::now() + 10s;
  EngineStats stats;
  while (std::chrono::steady_clock::now() < until) {
    stats = engine.Stats();
    if (stats.requests_running == 0 && stats.requests_waiting == 0) break;
    std::this_thread::sleep_for(1ms);
  }
  // One more iteration may be publishing; a final read after a short pause.
  std::this_thread::sleep_for(5ms);
  return engine.Stats();
}

// Submits every request, waits for all, and checks each against Generate alone.
void ExpectSameAsGenerate(InferenceEngine& engine, const std::vector<InferenceRequest>& requests) {
  Collector collector;
  for (size_t i = 0; i < requests.size(); ++i) {
    auto id = engine.Submit(requests[i], collector.Callback(static_cast<int>(i)));
    ASSERT_TRUE(id.ok()) << id.status();
  }
  ASSERT_TRUE(collector.WaitFinal(static_cast<int>(requests.size())));
  for (size_t i = 0; i < requests.size(); ++i) {
    const GenerateResult expected = Reference(requests[i]);
    const Collector::Stream got = collector.Get(static_cast<int>(i));
    ASSERT_FALSE(expected.output_ids.empty());
    EXPECT_EQ(got.final_event.stop_cause, StopCause::kFinished) << got.final_event.status;
    EXPECT_EQ(got.ids, expected.output_ids) << "request " << i;
    EXPECT_EQ(got.text, expected.text) << "request " << i;
    EXPECT_EQ(got.final_event.finish_reason, expected.finish_reason) << "request " << i;
    EXPECT_EQ(got.final_event.usage.completion_tokens,
              static_cast<int32_t>(expected.output_ids.size()));
    EXPECT_EQ(got.final_event.usage.prompt_tokens,
              static_cast<int32_t>(requests[i].prompt_ids.size()));
  }
}

std::vector<InferenceRequest> GreedyRequests(int count, int max_tokens, int repeat_clause = 1) {
  std::vector<InferenceRequest> requests;
  for (auto& prompt : Prompts(count, repeat_clause)) {
    InferenceRequest r;
    r.prompt_ids = prompt;
    r.max_tokens = max_tokens;
    requests.push_back(r);
  }
  return requests;
}

EngineOptions SmallOptions() {
  EngineOptions options;
  options.cache_block_seq_len = 16;
  options.cpu_memory_budget_bytes = 64 << 20;
  return options;
}

// ---------------------------------------------------------------------------------------

TEST(CpuBackendTest, ForwardBatchEqualsForwardBitForBit) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  Backend& backend = model->backend();
  const int32_t block = 5;
  ASSERT_TRUE(backend.ConfigureKvCache(40, block).ok());
  ASSERT_TRUE(backend.GrowKvCache(40).ok());
  const auto prompts = Prompts(3, 3);
  // Three sequences over shuffled block ids; sequence 0 in chunks of 7, others whole.
  std::vector<std::vector<int32_t>> tables = {{3, 17, 9, 30, 1, 22, 5, 11},
                                              {0, 39, 2, 14, 27, 8, 6, 19},
                                              {12, 4, 33, 21, 16, 7, 25, 10}};
  std::vector<std::vector<float>> expected(3);
  for (int s = 0; s < 3; ++s) {
    auto seq = backend.NewSequence(static_cast<int64_t>(prompts[s].size()));
    ASSERT_TRUE(seq.ok());
    ASSERT_TRUE(backend.Forward(**seq, prompts[s], LogitsFor::kLastPosition, expected[s]).ok());
  }
  std::vector<int64_t> done(3, 0);
  std::vector<std::vector<float>> got(3);
  while (done[0] < static_cast<int64_t>(prompts[0].size())) {
    std::vector<BatchSpan> spans;
    std::vector<int> which;
    for (int s = 0; s < 3; ++s) {
      const int64_t left = static_cast<int64_t>(prompts[s].size()) - done[s];
      if (left == 0) continue;
      const int64_t n = s == 0 ? std::min<int64_t>(7, left) : left;
      BatchSpan span;
      span.tokens = std::span<const int32_t>(prompts[s]).subspan(done[s], n);
      span.start = done[s];
      span.block_table = tables[s];
      span.logits = done[s] + n == static_cast<int64_t>(prompts[s].size());
      spans.push_back(span);
      which.push_back(s);
      done[s] += n;
    }
    std::vector<float> logits;
    ASSERT_TRUE(backend.ForwardBatch(spans, logits).ok());
    const int64_t vocab = backend.vocab_size();
    int64_t row = 0;
    for (size_t i = 0; i < spans.size(); ++i) {
      if (!spans[i].logits) continue;
      got[which[i]].assign(logits.begin() + row * vocab, logits.begin() + (row + 1) * vocab);
      ++row;
    }
  }
  for (int s = 0; s < 3; ++s) {
    ASSERT_EQ(got[s].size(), expected[s].size());
    EXPECT_EQ(0, std::memcmp(got[s].data(), expected[s].data(), got[s].size() * sizeof(float)))
        << "sequence " << s;
  }
  // Errors name the problem and write nothing.
  std::vector<float> logits;
  const std::vector<int32_t> bad = {1, 600};
  const std::vector<int32_t> table = {0};
  BatchSpan span{bad, 0, table, true};
  EXPECT_EQ(backend.ForwardBatch(std::span<const BatchSpan>(&span, 1), logits).code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> long_tokens(6, 1);
  span = BatchSpan{long_tokens, 0, table, true};  // 6 tokens, one block of 5
  EXPECT_EQ(backend.ForwardBatch(std::span<const BatchSpan>(&span, 1), logits).code(),
            absl::StatusCode::kInvalidArgument);
}

// Spans marked `sample` get the token kernels::cpu::SampleRow picks from the row the same pass
// gives unmarked (greedy, sampled, with a penalty), and no row; a draw outside [0, 1) is
// refused.
TEST(CpuBackendTest, SampledSpansGetTheRuleOfTheirLogits) {
  auto model = LoadModel();
  ASSERT_NE(model, nullptr);
  Backend& backend = model->backend();
  const int64_t vocab = backend.vocab_size();
  ASSERT_TRUE(backend.ConfigureKvCache(8, 16).ok());
  ASSERT_TRUE(backend.GrowKvCache(8).ok());
  const auto prompts = Prompts(2, 3);
  const std::vector<int32_t> tables[2] = {{0, 1, 2, 3}, {4, 5, 6, 7}};
  const std::vector<int32_t> penalty_ids = {1, 5, 9, 200};
  // {u, temperature, top_k, top_p, repetition_penalty}
  for (const kernels::SampleRowParams& setting :
       {kernels::SampleRowParams{0.0, 0.0f, 0, 1.0f, 1.3f}, {0.42, 0.8f, 0, 1.0f, 1.0f},
        {0.77, 1.1f, 20, 0.9f, 1.2f}}) {
    std::vector<BatchSpan> spans(2);
    for (int s = 0; s < 2; ++s) {
      spans[s].tokens = prompts[s];
      spans[s].block_table = tables[s];
      spans[s].logits = true;
    }
    std::vector<float> logits, rest;
    std::vector<int32_t> none, sampled;
    ASSERT_TRUE(backend.ForwardBatch(spans, logits, none).ok());
    EXPECT_TRUE(none.empty());
    spans[0].sample = true;
    spans[0].sampling = setting;
    spans[0].penalty_ids = penalty_ids;
    ASSERT_TRUE(backend.ForwardBatch(spans, rest, sampled).ok());
    ASSERT_EQ(sampled.size(), 1u);
    ASSERT_EQ(rest.size(), static_cast<size_t>(vocab));
    EXPECT_TRUE(std::equal(rest.begin(), rest.end(), logits.begin() + vocab));
    kernels::cpu::SampleScratch scratch;
    EXPECT_EQ(sampled[0], kernels::cpu::SampleRow(std::span<float>(logits.data(), vocab),
                                                  setting, penalty_ids, scratch));
  }
  std::vector<float> logits;
  std::vector<int32_t> sampled;
  BatchSpan span;
  span.tokens = prompts[0];
  span.block_table = tables[0];
  span.logits = true;
  span.sample = true;
  span.sampling.u = 1.0;
  EXPECT_EQ(backend.ForwardBatch(std::span<const BatchSpan>(&span, 1), logits, sampled).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(InferenceEngineTest, SixtyFourConcurrentGreedyRequestsEqualGenerateAlone) {
  EngineOptions options = SmallOptions();
  auto engine = StartEngine(options);
  ASSERT_NE(engine, nullptr);
  ExpectSameAsGenerate(*engine, GreedyRequests(64, 48));
  const EngineStats stats = WaitIdle(*engine);
  EXPECT_EQ(stats.kv_blocks_used, 0);
  EXPECT_EQ(stats.requests_finished_total, 64);
  EXPECT_EQ(stats.preemptions_total, 0);
  // Batching happened: far fewer steps than tokens.
  EXPECT_LT(stats.steps_total, stats.generation_tokens_total / 4);
}

TEST(InferenceEngineTest, TinyCachePreemptsAndStillEqualsGenerate) {
  EngineOptions options;
  options.cache_block_seq_len = 8;
  options.cache_max_entry_count = 1.0;
  auto probe = LoadModel();
  ASSERT_NE(probe, nullptr);
  options.cpu_memory_budget_bytes = 24 * probe->backend().KvBlockBytes(8);  // 24 blocks
  options.cache_chunk_size = 4;
  auto engine = StartEngine(options);
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->Stats().kv_blocks_total, 24);
  ExpectSameAsGenerate(*engine, GreedyRequests(64, 48));
  const EngineStats stats = WaitIdle(*engine);
  EXPECT_GT(stats.preemptions_total, 0);
  EXPECT_EQ(stats.kv_blocks_used, 0);
}

TEST(InferenceEngineTest, WithoutModelStopTokensRunsPastEndOfStory) {
  // Sampled stories end with EOS; without stop tokens the same seeded request goes on through
  // EOS to max_tokens, exactly as Generate does with an empty stop list.
  std::vector<InferenceRequest> requests = GreedyRequests(4, 450);
  for (size_t i = 0; i < requests.size(); ++i) {
    requests[i].sampling.temperature = 1.0f;
    requests[i].sampling.seed = 100 + i;
    requests[i].model_stop_tokens = false;
  }
  auto engine = StartEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  ExpectSameAsGenerate(*engine, requests);
  int ended_by_eos = 0;
  for (InferenceRequest request : requests) {
    const GenerateResult endless = Reference(request);
    EXPECT_EQ(endless.finish_reason, FinishReason::kLength);
    request.model_stop_tokens = true;
    const GenerateResult stopped = Reference(request);
    if (stopped.finish_reason != FinishReason::kStopToken) continue;
    ++ended_by_eos;
    // Same random stream: identical up to and including the EOS, then more.
    ASSERT_LT(stopped.output_ids.size(), endless.output_ids.size());
    EXPECT_TRUE(std::equal(stopped.output_ids.begin(), stopped.output_ids.end(),
                           endless.output_ids.begin()));
  }
  EXPECT_GT(ended_by_eos, 0) << "the premise: some sampled story ends with EOS";
}

TEST(InferenceEngineTest, ChunkedPrefillEqualsGenerate) {
  EngineOptions options = SmallOptions();
  options.max_prefill_tokens_per_step = 3;
  options.cache_block_seq_len = 7;
  auto engine = StartEngine(options);
  ASSERT_NE(engine, nullptr);
  auto requests = GreedyRequests(16, 24, /*repeat_clause=*/6);
  ASSERT_GT(requests[0].prompt_ids.size(), 30u);
  ExpectSameAsGenerate(*engine, requests);
  EXPECT_EQ(WaitIdle(*engine).kv_blocks_used, 0);
}

TEST(InferenceEngineTest, SeededSamplingEqualsGenerateAloneAndBatched) {
  auto engine = StartEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  auto requests = GreedyRequests(24, 40);
  for (size_t i = 0; i < requests.size(); ++i) {
    requests[i].sampling.temperature = 0.9f;
    requests[i].sampling.top_p = 0.9f;
    requests[i].sampling.top_k = i % 2 ? 20 : 0;
    requests[i].sampling.repetition_penalty = i % 3 ? 1.0f : 1.2f;
    requests[i].sampling.seed = 1000 + i;
  }
  ExpectSameAsGenerate(*engine, requests);                                    // batched
  ExpectSameAsGenerate(*engine, std::vector<InferenceRequest>{requests[5]});  // alone
}

// A request that runs until stopped: no stop token it could produce (0 is <unk>).
InferenceRequest Endless(int prompt_index = 0) {
  InferenceRequest r;
  r.prompt_ids = Prompts(prompt_index + 1)[prompt_index];
  r.max_tokens = 400;
  r.stop_token_ids = {0};
  return r;
}

TEST(InferenceEngineTest, CancelAndDeadlineEndTheStreamAndFreeTheCache) {
  Collector collector;
  Collector queued;
  uint64_t cancel_id = 0;
  std::mutex id_mu;
  int seen = 0;
  auto engine = StartEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  // Cancelled from inside its own callback after 5 tokens.
  auto cancelled = engine->Submit(Endless(0), collector.Callback(0, [&](const StreamEvent& e) {
    if (++seen == 5) {
      std::lock_guard<std::mutex> lock(id_mu);
      engine->Cancel(e.request_id);
      cancel_id = e.request_id;
    }
  }));
  ASSERT_TRUE(cancelled.ok());
  // A deadline that passes mid-stream (the callback slows the stream down).
  InferenceRequest late = Endless(1);
  late.deadline = std::chrono::steady_clock::now() + 60ms;
  ASSERT_TRUE(engine
                  ->Submit(late, collector.Callback(
                                     1, [](const StreamEvent&) { std::this_thread::sleep_for(2ms); }))
                  .ok());
  // One left waiting behind a full batch, cancelled from this thread.
  ASSERT_TRUE(collector.WaitFinal(2));
  const Collector::Stream c = collector.Get(0);
  EXPECT_EQ(c.final_event.stop_cause, StopCause::kCancelled);
  EXPECT_GE(c.ids.size(), 5u);
  EXPECT_LT(c.ids.size(), 20u);
  const Collector::Stream d = collector.Get(1);
  EXPECT_EQ(d.final_event.stop_cause, StopCause::kDeadlineExceeded);
  EXPECT_GT(d.ids.size(), 0u);
  EXPECT_LT(d.ids.size(), 400u);
  EXPECT_EQ(d.final_event.usage.completion_tokens, static_cast<int32_t>(d.ids.size()));
  EngineStats stats = WaitIdle(*engine);
  EXPECT_EQ(stats.kv_blocks_used, 0);
  EXPECT_EQ(stats.requests_running, 0);

  // Cancel of a queued request, and of unknown ids.
  EngineOptions one = SmallOptions();
  one.max_batch_size = 1;
  auto single = StartEngine(one);
  ASSERT_NE(single, nullptr);
  auto first = single->Submit(Endless(0), queued.Callback(0));
  auto second = single->Submit(Endless(1), queued.Callback(1));
  ASSERT_TRUE(first.ok() && second.ok());
  single->Cancel(*second);
  single->Cancel(999999);
  single->Cancel(*first);
  ASSERT_TRUE(queued.WaitFinal(2));
  EXPECT_EQ(queued.Get(1).final_event.stop_cause, StopCause::kCancelled);
  EXPECT_EQ(queued.Get(0).final_event.stop_cause, StopCause::kCancelled);
  EXPECT_EQ(WaitIdle(*single).kv_blocks_used, 0);

  // The engine keeps serving, with the same results.
  ExpectSameAsGenerate(*engine, GreedyRequests(3, 20));
  EXPECT_EQ(WaitIdle(*engine).kv_blocks_used, 0);
}

TEST(InferenceEngineTest, SessionReusesItsCacheAndEqualsAFreshRequest) {
  Collector c1;
  Collector c2;
  auto engine = StartEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  const Tokenizer& tokenizer = ReferenceModel().tokenizer();
  InferenceRequest turn1;
  turn1.prompt_ids = Prompts(1, 4)[0];
  turn1.max_tokens = 30;
  turn1.stop_token_ids = {0};
  turn1.session_id = "conversation-1";
  ASSERT_TRUE(engine->Submit(turn1, c1.Callback(0)).ok());
  // The same session while its request is in flight is refused (or it already finished).
  auto busy = engine->Submit(turn1, c1.Callback(1));
  if (!busy.ok()) {
    EXPECT_EQ(busy.status().code(), absl::StatusCode::kFailedPrecondition);
  }
  ASSERT_TRUE(c1.WaitFinal(busy.ok() ? 2 : 1));
  const auto first = c1.Get(0);
  EXPECT_EQ(first.final_event.stop_cause, StopCause::kFinished);
  EngineStats stats = WaitIdle(*engine);
  EXPECT_EQ(stats.sessions, 1);
  EXPECT_GT(stats.kv_blocks_used, 0);

  InferenceRequest turn2;
  turn2.prompt_ids = turn1.prompt_ids;
  turn2.prompt_ids.insert(turn2.prompt_ids.end(), first.ids.begin(), first.ids.end());
  for (int32_t id : tokenizer.Encode(" Then they went home.")) turn2.prompt_ids.push_back(id);
  turn2.max_tokens = 30;
  turn2.session_id = "conversation-1";
  const int64_t conversation = static_cast<int64_t>(turn2.prompt_ids.size());
  const int64_t before = stats.prompt_tokens_total;
  ASSERT_TRUE(engine->Submit(turn2, c2.Callback(0)).ok());
  ASSERT_TRUE(c2.WaitFinal(1));
  const auto second = c2.Get(0);
  stats = WaitIdle(*engine);
  // Every token of turn 1 but its last (which never ran) came from the cache.
  const int64_t kept = static_cast<int64_t>(turn1.prompt_ids.size() + first.ids.size()) - 1;
  EXPECT_EQ(second.final_event.usage.cached_prompt_tokens, kept);
  EXPECT_EQ(stats.prompt_tokens_total - before, conversation - kept);
  EXPECT_LT(conversation - kept, conversation / 4);
  // The same tokens as the whole prompt from scratch (Generate alone, and the engine).
  const GenerateResult fresh = Reference(turn2);
  EXPECT_EQ(second.ids, fresh.output_ids);
  InferenceRequest no_session = turn2;
  no_session.session_id.clear();
  ExpectSameAsGenerate(*engine, {no_session});

  engine->EndSession("conversation-1");
  engine->EndSession("unknown");
  std::this_thread::sleep_for(20ms);
  stats = WaitIdle(*engine);
  EXPECT_EQ(stats.sessions, 0);
  EXPECT_EQ(stats.kv_blocks_used, 0);
}

TEST(InferenceEngineTest, SessionsBeyondMaxSessionsAreEvictedLeastRecentlyUsedFirst) {
  EngineOptions options = SmallOptions();
  options.max_sessions = 2;
  Collector c;
  auto engine = StartEngine(options);
  ASSERT_NE(engine, nullptr);
  auto requests = GreedyRequests(3, 10);
  for (int i = 0; i < 3; ++i) {
    requests[i].session_id = "s" + std::to_string(i);
    ASSERT_TRUE(engine->Submit(requests[i], c.Callback(i)).ok());
    ASSERT_TRUE(c.WaitFinal(i + 1));
  }
  EXPECT_EQ(WaitIdle(*engine).sessions, 2);
  // s0 was evicted: its next turn computes everything again.
  ASSERT_TRUE(engine->Submit(requests[0], c.Callback(3)).ok());
  ASSERT_TRUE(c.WaitFinal(4));
  EXPECT_EQ(c.Get(3).final_event.usage.cached_prompt_tokens, 0);
}

TEST(InferenceEngineTest, SubmitErrors) {
  EngineOptions options = SmallOptions();
  options.session_len = 64;
  options.max_batch_size = 1;
  options.max_queued_requests = 2;
  Collector collector;
  Collector c;
  Gate gate;
  auto engine = StartEngine(options);
  ASSERT_NE(engine, nullptr);
  auto code = [&](InferenceRequest r) {
    return engine->Submit(std::move(r), collector.Callback(-1)).status().code();
  };
  InferenceRequest empty;
  EXPECT_EQ(code(empty), absl::StatusCode::kInvalidArgument);
  InferenceRequest bad_sampling = Endless();
  bad_sampling.sampling.top_p = 0;
  EXPECT_EQ(code(bad_sampling), absl::StatusCode::kInvalidArgument);
  InferenceRequest bad_token = Endless();
  bad_token.prompt_ids.push_back(512);
  EXPECT_EQ(code(bad_token), absl::StatusCode::kInvalidArgument);
  InferenceRequest negative = Endless();
  negative.max_tokens = -1;
  EXPECT_EQ(code(negative), absl::StatusCode::kInvalidArgument);
  InferenceRequest too_long = Endless();
  too_long.prompt_ids.assign(65, 300);
  auto status = engine->Submit(too_long, collector.Callback(-1)).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(status.message().find("session_len 64"), std::string::npos) << status;

  // Queue full: one runs (held in its first callback, so nothing finishes meanwhile), two
  // wait, the rest are refused.
  int accepted = 0, refused = 0;
  for (int i = 0; i < 8; ++i) {
    auto id = engine->Submit(Endless(), collector.Callback(i, gate.HoldFirstEvent()));
    if (id.ok()) {
      ++accepted;
    } else {
      EXPECT_EQ(id.status().code(), absl::StatusCode::kResourceExhausted) << id.status();
      EXPECT_NE(id.status().message().find("max_queued_requests"), std::string::npos);
      ++refused;
    }
  }
  EXPECT_EQ(accepted, 3);
  EXPECT_EQ(refused, 5);
  gate.Open();
  engine->Shutdown();
  InferenceRequest ok = Endless();
  EXPECT_EQ(code(ok), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(collector.WaitFinal(accepted));
  // Context full at session_len: as Generate at the model's context. max_tokens 0 is valid
  // and ends at once, as Generate does.
  auto short_engine = StartEngine(options);
  ASSERT_NE(short_engine, nullptr);
  EXPECT_EQ(short_engine->session_len(), 64);
  InferenceRequest fill = Endless();
  ASSERT_TRUE(short_engine->Submit(fill, c.Callback(0)).ok());
  InferenceRequest zero = Endless(1);
  zero.max_tokens = 0;
  ASSERT_TRUE(short_engine->Submit(zero, c.Callback(1)).ok());
  ASSERT_TRUE(c.WaitFinal(2));
  EXPECT_EQ(c.Get(0).final_event.finish_reason, FinishReason::kContextFull);
  EXPECT_EQ(static_cast<int64_t>(fill.prompt_ids.size() + c.Get(0).ids.size()), 65);
  EXPECT_EQ(c.Get(1).final_event.stop_cause, StopCause::kFinished);
  EXPECT_TRUE(c.Get(1).ids.empty());
}

TEST(InferenceEngineTest, StartRejectsBadOptions) {
  EngineOptions options = SmallOptions();
  options.cache_block_seq_len = 0;
  auto engine = InferenceEngine::Start(LoadModel(), options);
  ASSERT_FALSE(engine.ok());
  EXPECT_NE(engine.status().message().find("cache_block_seq_len"), std::string::npos);
  options = SmallOptions();
  options.cpu_memory_budget_bytes = 100;
  engine = InferenceEngine::Start(LoadModel(), options);
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kResourceExhausted);
  options = SmallOptions();
  options.session_len = 100000;
  EXPECT_EQ(InferenceEngine::Start(LoadModel(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(InferenceEngineTest, ShutdownEndsRunningRequests) {
  Collector collector;
  std::mutex mu;
  std::condition_variable started_cv;
  int started = 0;
  auto engine = StartEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(engine
                    ->Submit(Endless(i), collector.Callback(i,
                                                            [&](const StreamEvent&) {
                                                              std::lock_guard<std::mutex> l(mu);
                                                              ++started;
                                                              started_cv.notify_all();
                                                            }))
                    .ok());
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(started_cv.wait_for(lock, 10s, [&] { return started >= 8; }));
  }
  engine->Shutdown();
  engine->Shutdown();  // idempotent
  ASSERT_TRUE(collector.WaitFinal(4));
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(collector.Get(i).final_event.stop_cause, StopCause::kShutdown) << i;
  }
  const absl::Status after = engine->Submit(Endless(), collector.Callback(9)).status();
  EXPECT_EQ(after.code(), absl::StatusCode::kUnavailable) << after;
  EXPECT_NE(after.message().find("shutting down"), std::string::npos) << after;
  EXPECT_EQ(engine->Stats().kv_blocks_used, 0);
}

TEST(InferenceEngineTest, SubmitAndCancelFromManyThreads) {
  EngineOptions options = SmallOptions();
  options.max_batch_size = 8;
  Collector collector;
  std::atomic<int> accepted{0};
  auto engine = StartEngine(options);
  ASSERT_NE(engine, nullptr);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 12; ++i) {
        InferenceRequest r = Endless(i % 5);
        r.max_tokens = 20 + i;
        auto id = engine->Submit(r, collector.Callback(t * 100 + i));
        if (!id.ok()) continue;
        ++accepted;
        if (i % 3 == 0) engine->Cancel(*id);
        if (i % 4 == 1) std::this_thread::sleep_for(1ms);
        (void)engine->Stats();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  ASSERT_TRUE(collector.WaitFinal(accepted.load()));
  const EngineStats stats = WaitIdle(*engine);
  EXPECT_EQ(stats.kv_blocks_used, 0);
  EXPECT_EQ(stats.requests_running, 0);
  EXPECT_EQ(stats.requests_waiting, 0);
}

TEST(InferenceEngineTest, SchedulerThreadRunsTheModelsCpuThreads) {
  // OpenMP's thread count is per thread: a thread started now gets the default, whatever
  // this thread set. The model asks for one more than that default.
  int fresh_default = 0;
  std::thread([&] { fresh_default = kernels::cpu::CpuThreads(); }).join();
  const int saved = kernels::cpu::CpuThreads();
  ModelLoadOptions load;
  load.cpu_threads = fresh_default + 1;
  auto model = Model::Load(ModelDir(), load);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->cpu_threads(), fresh_default + 1);
  auto engine = InferenceEngine::Start(std::move(*model), SmallOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->cpu_threads(), fresh_default + 1);
  // Results do not depend on the thread count.
  ExpectSameAsGenerate(**engine, GreedyRequests(4, 16));
  EXPECT_EQ((*engine)->cpu_threads(), fresh_default + 1);
  (*engine)->Shutdown();
  // 0: all cores.
  load.cpu_threads = 0;
  model = Model::Load(ModelDir(), load);
  ASSERT_TRUE(model.ok()) << model.status();
  int all_cores = 0;
  std::thread([&] {
    kernels::cpu::SetCpuThreads(0);
    all_cores = kernels::cpu::CpuThreads();
  }).join();
  engine = InferenceEngine::Start(std::move(*model), SmallOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->cpu_threads(), all_cores);
  kernels::cpu::SetCpuThreads(saved);  // Load set this thread's count
}

TEST(InferenceEngineTest, SessionLenIsTheOptionOrTheModelsContext) {
  EngineOptions options = SmallOptions();
  auto engine = StartEngine(options);
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->session_len(), ReferenceModel().config().max_position_embeddings);
  options.session_len = 100;
  engine = StartEngine(options);
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->session_len(), 100);
}

// Submits short requests while the scheduler is held inside the first one's callback (so
// nothing runs, finishes or is admitted meanwhile) until one is refused: the batch's free
// slots and `max_queued` more must be accepted. Then, once all have run, slots are free again.
void ExpectQueueLimit(int32_t max_batch_size, int32_t max_queued) {
  Collector collector;
  Gate gate;
  EngineOptions options = SmallOptions();
  options.max_batch_size = max_batch_size;
  options.max_queued_requests = max_queued;
  auto engine = StartEngine(options);
  ASSERT_NE(engine, nullptr);
  int accepted = 0;
  for (int i = 0; i < max_batch_size + max_queued + 10; ++i) {
    InferenceRequest r = Endless(i % 8);
    r.max_tokens = 4;
    auto id = engine->Submit(r, collector.Callback(i, i == 0 ? gate.HoldFirstEvent() : nullptr));
    if (!id.ok()) {
      EXPECT_EQ(id.status().code(), absl::StatusCode::kResourceExhausted) << id.status();
      break;
    }
    ++accepted;
    if (i == 0) {
      ASSERT_TRUE(gate.WaitHeld());
    }
  }
  EXPECT_EQ(accepted, max_batch_size + max_queued);
  gate.Open();
  ASSERT_TRUE(collector.WaitFinal(accepted));
  for (int i = 0; i < accepted; ++i) {
    EXPECT_EQ(collector.Get(i).final_event.stop_cause, StopCause::kFinished) << i;
  }
  WaitIdle(*engine);
  ASSERT_TRUE(engine->Submit(Endless(), collector.Callback(-1)).ok());
  ASSERT_TRUE(collector.WaitFinal(accepted + 1));
}

TEST(InferenceEngineTest, QueueLimitCountsOnlyRequestsBeyondFreeBatchSlots) {
  // A burst within one step fills the 64 slots and 4 more wait.
  ExpectQueueLimit(64, 4);
}

TEST(InferenceEngineTest, QueueLimitZeroRefusesUnlessABatchSlotIsFree) {
  ExpectQueueLimit(2, 0);
}

// A session's request is held running in its first callback, then cancelled or left to
// pass its deadline: a new request on the session is accepted at once, before the scheduler
// has seen either, and runs alone, without the ended request's cache (which it never keeps).
void ExpectSessionFreeOnceItsRequestEnds(StopCause ended_by) {
  Collector c;
  Gate gate;
  auto engine = StartEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  InferenceRequest first = Endless(0);
  first.session_id = "s";
  const auto deadline = std::chrono::steady_clock::now() + 300ms;
  if (ended_by == StopCause::kDeadlineExceeded) first.deadline = deadline;
  auto id = engine->Submit(first, c.Callback(0, gate.HoldFirstEvent()));
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(gate.WaitHeld());  // the scheduler is inside its callback
  InferenceRequest retry = first;
  retry.deadline.reset();
  retry.max_tokens = 12;
  if (std::chrono::steady_clock::now() < deadline) {  // genuinely in flight: refused
    EXPECT_EQ(engine->Submit(retry, c.Callback(1)).status().code(),
              absl::StatusCode::kFailedPrecondition);
  }
  if (ended_by == StopCause::kCancelled) {
    engine->Cancel(*id);
  } else {
    std::this_thread::sleep_until(deadline + 1ms);
  }
  auto retried = engine->Submit(retry, c.Callback(2));
  EXPECT_TRUE(retried.ok()) << retried.status();
  gate.Open();
  ASSERT_TRUE(c.WaitFinal(retried.ok() ? 2 : 1));
  EXPECT_EQ(c.Get(0).final_event.stop_cause, ended_by);
  const Collector::Stream got = c.Get(2);
  EXPECT_EQ(got.final_event.stop_cause, StopCause::kFinished);
  EXPECT_EQ(got.final_event.usage.cached_prompt_tokens, 0);
  EXPECT_EQ(got.ids, Reference(retry).output_ids);
  EXPECT_EQ(WaitIdle(*engine).sessions, 1);  // the retry's
}

TEST(InferenceEngineTest, SessionIsFreeForANewRequestOnceItsRequestIsCancelled) {
  ExpectSessionFreeOnceItsRequestEnds(StopCause::kCancelled);
}

TEST(InferenceEngineTest, SessionIsFreeForANewRequestOnceItsRequestsDeadlinePassed) {
  ExpectSessionFreeOnceItsRequestEnds(StopCause::kDeadlineExceeded);
}

TEST(InferenceEngineTest, EndSessionWhileItsRequestRunsKeepsNothing) {
  Collector c;
  Gate gate;
  auto engine = StartEngine(SmallOptions());
  ASSERT_NE(engine, nullptr);
  InferenceRequest turn = Endless(2);
  turn.max_tokens = 20;
  turn.session_id = "e";
  ASSERT_TRUE(engine->Submit(turn, c.Callback(0, gate.HoldFirstEvent())).ok());
  ASSERT_TRUE(gate.WaitHeld());  // running
  engine->EndSession("e");
  gate.Open();
  ASSERT_TRUE(c.WaitFinal(1));
  EXPECT_EQ(c.Get(0).final_event.stop_cause, StopCause::kFinished);
  EngineStats stats = WaitIdle(*engine);
  EXPECT_EQ(stats.sessions, 0);
  EXPECT_EQ(stats.kv_blocks_used, 0);
  // The session's next request starts from nothing; it is kept as usual.
  ASSERT_TRUE(engine->Submit(turn, c.Callback(1)).ok());
  ASSERT_TRUE(c.WaitFinal(2));
  EXPECT_EQ(c.Get(1).final_event.usage.cached_prompt_tokens, 0);
  EXPECT_EQ(c.Get(1).ids, c.Get(0).ids);
  EXPECT_EQ(WaitIdle(*engine).sessions, 1);
}

TEST(InferenceEngineTest, EngineDestroyedInsideItsOwnCallbackShutsDownSafely) {
  // The last owner is released inside a callback, on the scheduler thread: the engine cannot
  // join that thread, which ends the requests with kShutdown and frees the engine itself.
  Collector c;
  std::mutex mu;
  std::shared_ptr<InferenceEngine> owner;
  std::atomic<bool> destroyed{false};
  {
    std::lock_guard<std::mutex> lock(mu);  // the callback takes `owner` only after Submit
    owner = StartEngine(SmallOptions());
    ASSERT_NE(owner, nullptr);
    for (int i = 0; i < 3; ++i) {
      auto id = owner->Submit(Endless(i), c.Callback(i, [&](const StreamEvent& event) {
        std::lock_guard<std::mutex> l(mu);
        if (!event.final && owner != nullptr) {
          owner.reset();  // ~InferenceEngine, here on the scheduler thread
          destroyed = true;
        }
      }));
      ASSERT_TRUE(id.ok()) << id.status();
    }
  }
  ASSERT_TRUE(c.WaitFinal(3));
  EXPECT_TRUE(destroyed);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(c.Get(i).final_event.stop_cause, StopCause::kShutdown) << i;
  }
}

}  // namespace
}  // namespace nibble::engine
