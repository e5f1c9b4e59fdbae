// inference_requests.h and the prompt byte bound, over the real stories260K model.
#include "server/inference_requests.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

#include "server/served_model.h"

namespace nibble::server {
namespace {

class RequestsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto model = engine::Model::Load(std::string(NIBBLE_TEST_MODELS) + "/stories260K", {});
    ASSERT_TRUE(model.ok()) << model.status();
    engine::EngineOptions options;
    options.cpu_memory_budget_bytes = 16 << 20;
    auto engine = engine::InferenceEngine::Start(std::move(model).value(), options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    served_ = new ServedModel;
    served_->engine = std::move(engine).value();
    served_->max_piece_bytes = PromptByteBound(served_->engine->model().tokenizer());
  }
  static void TearDownTestSuite() {
    delete served_;
    served_ = nullptr;
  }

  static grpc::Status Prepare(const nibble::v1::GenerateRequest& wire,
                              engine::InferenceRequest* request) {
    return PrepareRequest(wire.sampling(), wire.session_id(), InputOf(wire), *served_, request);
  }

  static ServedModel* served_;
};

ServedModel* RequestsTest::served_ = nullptr;

TEST(PromptWeight, CountsARunOfSpacesOnce) {
  EXPECT_EQ(PromptWeight(""), 0);
  EXPECT_EQ(PromptWeight("abc"), 3);
  EXPECT_EQ(PromptWeight("a     b"), 3);
  EXPECT_EQ(PromptWeight("  a\t\tb  "), 6);
}

TEST_F(RequestsTest, ByteBoundHoldsForTheModelsTokenizer) {
  // llama2.c's tok512: no normalization beyond folding spaces, byte fallback; pieces of at
  // most 9 bytes.
  ASSERT_GT(served_->max_piece_bytes, 0);
  const engine::Tokenizer& tokenizer = served_->engine->model().tokenizer();
  for (const std::string& text :
       {std::string(2000, 'x'), std::string("Once upon a time ") + std::string(500, ' ') + "end",
        std::string("\xe4\xb8\x80\xf0\x9f\x98\x80\t\n") + "the cat sat"}) {
    const int64_t tokens = static_cast<int64_t>(tokenizer.Encode(text).size());
    EXPECT_LE(PromptWeight(text), tokens * (served_->max_piece_bytes + 2) + 2) << text;
  }
}

TEST_F(RequestsTest, PromptPastTheByteBoundIsRefusedWithoutTokenizing) {
  nibble::v1::GenerateRequest wire;
  wire.set_prompt(std::string(served_->max_prompt_weight() + 1, 'a'));
  engine::InferenceRequest request;
  const grpc::Status status = Prepare(wire, &request);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(status.error_message().find("session_len"), std::string::npos);
  EXPECT_NE(status.error_message().find("without tokenizing"), std::string::npos);
  EXPECT_TRUE(request.prompt_ids.empty());  // never tokenized
  // Spaces fold: a megabyte of them is a short prompt.
  wire.set_prompt("Once" + std::string(1 << 20, ' ') + "upon");
  EXPECT_TRUE(Prepare(wire, &request).ok());
}

TEST_F(RequestsTest, PromptUnderTheByteBoundButPastSessionLenIsRefusedByItsTokens) {
  nibble::v1::GenerateRequest wire;
  std::string prompt;
  while (static_cast<int64_t>(prompt.size()) < served_->engine->session_len() * 2) prompt += "a ";
  ASSERT_LE(PromptWeight(prompt), served_->max_prompt_weight());
  wire.set_prompt(prompt);
  engine::InferenceRequest request;
  const grpc::Status status = Prepare(wire, &request);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(status.error_message().find("tokens, more than session_len"), std::string::npos)
      << status.error_message();
}

TEST_F(RequestsTest, UnseededRequestsGetRandomSeedsAndSeededKeepTheirs) {
  nibble::v1::GenerateRequest wire;
  wire.set_prompt("Once");
  std::set<uint64_t> seeds;
  for (int i = 0; i < 4; ++i) {
    engine::InferenceRequest request;
    ASSERT_TRUE(Prepare(wire, &request).ok());
    seeds.insert(request.sampling.seed);
  }
  EXPECT_EQ(seeds.size(), 4u);
  wire.mutable_sampling()->set_seed(0);
  engine::InferenceRequest request;
  ASSERT_TRUE(Prepare(wire, &request).ok());
  EXPECT_EQ(request.sampling.seed, 0u);
}

TEST(ApplyModelStops, IgnoreEosDropsStopTokensAndTheTemplatesStopWords) {
  const engine::ChatTemplate internlm2(engine::ChatTemplateKind::kInternLM2);
  ASSERT_FALSE(internlm2.StopWords().empty());
  engine::InferenceRequest chat;
  chat.stop_strings = {"mine"};
  ApplyModelStops(/*chat=*/true, /*ignore_eos=*/false, internlm2, &chat);
  EXPECT_TRUE(chat.model_stop_tokens);
  EXPECT_EQ(chat.stop_strings.size(), 1 + internlm2.StopWords().size());

  engine::InferenceRequest ignoring;
  ignoring.stop_strings = {"mine"};
  ApplyModelStops(/*chat=*/true, /*ignore_eos=*/true, internlm2, &ignoring);
  EXPECT_FALSE(ignoring.model_stop_tokens);
  EXPECT_EQ(ignoring.stop_strings, std::vector<std::string>{"mine"});  // the request's own stay

  engine::InferenceRequest raw;
  ApplyModelStops(/*chat=*/false, /*ignore_eos=*/false, internlm2, &raw);
  EXPECT_TRUE(raw.model_stop_tokens);
  EXPECT_TRUE(raw.stop_strings.empty());  // Generate: no template, no stop words
}

}  // namespace
}  // namespace nibble::server
