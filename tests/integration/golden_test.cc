// The CPU engine against golden outputs of the independent float64 numpy reference
// (tests/reference/reference.py), on the real stories260K model converted by `nibble convert`.
#include <gtest/gtest.h>

#include "engine/atomic_file.h"
#include "engine/generator.h"
#include "engine/perplexity.h"
#include "tests/integration/test_env.h"

namespace nibble {
namespace {

using testing::AllLogits;
using testing::Golden;
using testing::LoadOrDie;
using testing::RelativeError;
using testing::TestModel;

TEST(GoldenTest, Greedy200TokensFromBosMatchReferenceTokenForToken) {
  auto model = LoadOrDie(TestModel("stories260K"));
  ASSERT_NE(model, nullptr);
  const auto golden = Golden("stories260K_greedy200.json");
  engine::GenerateRequest request;
  request.prompt_ids = {model->tokenizer().BosId()};
  request.max_tokens = 200;  // greedy by default; no stop tokens, as the reference
  auto result = engine::Generate(*model, request, nullptr);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->output_ids, golden["ids"].get<std::vector<int32_t>>());
  EXPECT_EQ(result->text, golden["text"].get<std::string>());
  EXPECT_EQ(result->text.rfind("Once upon a time, there was a little girl named Lily. She loved "
                               "to play outside in the park.",
                               0),
            0u);
}

TEST(GoldenTest, FirstLogitsMatchReference) {
  auto model = LoadOrDie(TestModel("stories260K"));
  ASSERT_NE(model, nullptr);
  const auto golden = Golden("stories260K_greedy200.json");
  const std::vector<float> logits = AllLogits(*model, {1});
  EXPECT_LT(RelativeError(logits, golden["first_logits"].get<std::vector<double>>()), 1e-5);
}

TEST(GoldenTest, TokenizerMatchesReferenceOnSampleText) {
  auto model = LoadOrDie(TestModel("stories260K"));
  ASSERT_NE(model, nullptr);
  auto text = engine::ReadFileToString(testing::RequiredEnv("NIBBLE_SHARED_DIR") +
                                       "/datasets/tinystories/sample.txt");
  ASSERT_TRUE(text.ok()) << text.status();
  std::vector<int32_t> ids = {model->tokenizer().BosId()};
  for (int32_t id : model->tokenizer().Encode(*text)) ids.push_back(id);
  EXPECT_EQ(ids, Golden("stories260K_tinystories_sample_ids.json")["ids"].get<std::vector<int32_t>>());
}

class PerplexityGoldenTest : public ::testing::TestWithParam<std::pair<int, const char*>> {};

TEST_P(PerplexityGoldenTest, MatchesReferenceWithinOneInTenThousand) {
  const auto [seqlen, golden_name] = GetParam();
  auto model = LoadOrDie(TestModel("stories260K"));
  ASSERT_NE(model, nullptr);
  const auto golden = Golden(golden_name);
  const auto ids = Golden("stories260K_tinystories_sample_ids.json")["ids"].get<std::vector<int32_t>>();
  auto result = engine::ComputePerplexity(model->backend(), ids, seqlen);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->windows, golden["windows"].get<int64_t>());
  EXPECT_EQ(result->predicted, golden["predicted_tokens"].get<int64_t>());
  const double expected = golden["perplexity"].get<double>();
  // The issue asks for 1e-3; fp32 against float64 lands near 1e-7, so hold it to 1e-4.
  EXPECT_NEAR(result->perplexity / expected, 1.0, 1e-4)
      << "nibble " << result->perplexity << " reference " << expected;
}

INSTANTIATE_TEST_SUITE_P(
    Windows, PerplexityGoldenTest,
    ::testing::Values(std::pair{128, "stories260K_tinystories_sample_ppl.json"},
                      std::pair{512, "stories260K_tinystories_sample_ppl512.json"}));

TEST(KvCacheTest, IncrementalDecodeAndChunkedPrefillEqualOneShotPrefill) {
  auto model = LoadOrDie(TestModel("stories260K"));
  ASSERT_NE(model, nullptr);
  const auto& tokens = testing::ProbeTokens();
  const std::vector<float> one_shot = AllLogits(*model, tokens);
  const int64_t vocab = model->config().vocab_size;

  // Token by token (decode) and in uneven chunks (chunked prefill), last-position logits.
  for (const std::vector<size_t>& chunks :
       {std::vector<size_t>(tokens.size(), 1), std::vector<size_t>{5, 1, 7}}) {
    auto sequence = model->backend().NewSequence(static_cast<int64_t>(tokens.size()));
    ASSERT_TRUE(sequence.ok());
    size_t done = 0;
    for (size_t chunk : chunks) {
      std::vector<float> logits;
      std::span<const int32_t> part(tokens.data() + done, chunk);
      ASSERT_TRUE(model->backend()
                      .Forward(**sequence, part, engine::LogitsFor::kLastPosition, logits)
                      .ok());
      done += chunk;
      const std::vector<float> expected(one_shot.begin() + (done - 1) * vocab,
                                        one_shot.begin() + done * vocab);
      EXPECT_LT(RelativeError(logits, expected), 1e-5) << "after " << done << " tokens";
    }
    EXPECT_EQ((*sequence)->length(), static_cast<int64_t>(tokens.size()));
  }
}

TEST(KvCacheTest, ForwardPastCapacityFailsAndLeavesSequenceUnchanged) {
  auto model = LoadOrDie(TestModel("stories260K"));
  ASSERT_NE(model, nullptr);
  auto sequence = model->backend().NewSequence(4);
  ASSERT_TRUE(sequence.ok());
  std::vector<float> logits;
  const std::vector<int32_t> five = {1, 2, 3, 4, 5};
  auto status = model->backend().Forward(**sequence, five, engine::LogitsFor::kLastPosition, logits);
  EXPECT_EQ(status.code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ((*sequence)->length(), 0);
  const std::vector<int32_t> bad = {1, 512};
  status = model->backend().Forward(**sequence, bad, engine::LogitsFor::kLastPosition, logits);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("512"), std::string::npos);
}

}  // namespace
}  // namespace nibble
