// The same weights in every supported checkpoint layout give the same logits: LLaMA-HF (as
// `nibble convert` writes it), InternLM v1 (zero and non-zero q/k/v/o biases), InternLM2
// (fused wqkv), 16-bit files, and a sharded checkpoint. The non-converted layouts are written
// by the independent reference (tests/reference), whose own logits are the expectation
// wherever the weights differ from the fp32 original.
#include <gtest/gtest.h>

#include <filesystem>

#include "engine/safetensors.h"
#include "engine/tensor_store.h"
#include "tests/integration/test_env.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using testing::AllLogits;
using testing::LoadOrDie;
using testing::ProbeTokens;
using testing::ReferenceLogits;
using testing::RelativeError;
using testing::TestModel;

std::vector<float> ProbeLogits(const std::string& dir,
                               engine::WeightStorage storage = engine::WeightStorage::kF32) {
  auto model = LoadOrDie(dir, storage);
  if (!model) return {};
  return AllLogits(*model, ProbeTokens());
}


class SameWeightsTest : public ::testing::TestWithParam<const char*> {};

TEST_P(SameWeightsTest, LogitsEqualLlamaLayoutWithinOneInAHundredThousand) {
  const std::vector<float> llama = ProbeLogits(TestModel("stories260K"));
  const std::vector<float> other = ProbeLogits(TestModel(GetParam()));
  ASSERT_FALSE(llama.empty());
  EXPECT_LT(RelativeError(other, llama), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Layouts, SameWeightsTest,
                         ::testing::Values("internlm_zero_bias", "internlm2"));

class ReferenceLogitsTest : public ::testing::TestWithParam<const char*> {};

TEST_P(ReferenceLogitsTest, LogitsMatchFloat64Reference) {
  const std::vector<float> logits = ProbeLogits(TestModel(GetParam()));
  ASSERT_FALSE(logits.empty());
  EXPECT_LT(RelativeError(logits, ReferenceLogits(GetParam())), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Layouts, ReferenceLogitsTest,
                         ::testing::Values("internlm_bias", "llama_f16", "llama_bf16",
                                           "internlm2_ntk"));

TEST(DynamicNtkTest, ScalingPastTheContextChangesTheLogits) {
  // internlm2_ntk declares a context of 8 with dynamic NTK: the 13-token probe runs past it,
  // so its logits must differ from plain RoPE's (and match the reference's, above).
  const std::vector<float> scaled = ProbeLogits(TestModel("internlm2_ntk"));
  const std::vector<float> plain = ProbeLogits(TestModel("internlm2"));
  EXPECT_GT(RelativeError(scaled, plain), 1e-3);
}

TEST(BiasTest, NonZeroBiasesChangeTheLogits) {
  // Guards the test above: biases that were silently ignored would still match a reference
  // that also ignored them only if both were wrong; this shows they matter at all.
  const std::vector<float> with_bias = ProbeLogits(TestModel("internlm_bias"));
  const std::vector<float> without = ProbeLogits(TestModel("internlm_zero_bias"));
  EXPECT_GT(RelativeError(with_bias, without), 1e-2);
}

TEST(Float16StorageTest, F16FileLoadsTheSameIntoF16OrF32Storage) {
  // Its values are fp16 already, so keeping them as fp16 must lose nothing.
  const std::vector<float> f16 = ProbeLogits(TestModel("llama_f16"), engine::WeightStorage::kF16);
  const std::vector<float> f32 = ProbeLogits(TestModel("llama_f16"), engine::WeightStorage::kF32);
  ASSERT_FALSE(f16.empty());
  EXPECT_EQ(f16, f32);
}

TEST(Float16StorageTest, Fp32ModelStoredAsF16IsRoundedButClose) {
  const std::vector<float> f16 = ProbeLogits(TestModel("stories260K"), engine::WeightStorage::kF16);
  const std::vector<float> f32 = ProbeLogits(TestModel("stories260K"));
  ASSERT_FALSE(f16.empty());
  const double error = RelativeError(f16, f32);
  EXPECT_GT(error, 0.0);  // the weights really were rounded
  EXPECT_LT(error, 1e-2);
}

TEST(ShardedTest, IndexedShardsLoadLikeOneFile) {
  const std::string source = TestModel("stories260K");
  const fs::path dir = fs::path(TestModel("sharded"));
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(fs::path(source) / "config.json", dir / "config.json");
  fs::copy_file(fs::path(source) / "tokenizer.model", dir / "tokenizer.model");

  auto store = engine::TensorStore::Open(source);
  ASSERT_TRUE(store.ok()) << store.status();
  // Three shards, tensors dealt round-robin, and the index that names them.
  engine::SafetensorsWriter shards[3];
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  int i = 0;
  for (const std::string& name : (*store)->Names()) {
    auto ref = (*store)->Get(name);
    ASSERT_TRUE(ref.ok());
    const int shard = i++ % 3;
    ASSERT_TRUE(shards[shard].Add(name, ref->info->dtype, ref->info->shape, ref->bytes).ok());
    index["weight_map"][name] = "model-0000" + std::to_string(shard + 1) + "-of-00003.safetensors";
  }
  for (int s = 0; s < 3; ++s) {
    ASSERT_TRUE(shards[s]
                    .Write((dir / ("model-0000" + std::to_string(s + 1) + "-of-00003.safetensors"))
                               .string())
                    .ok());
  }
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(2);

  EXPECT_EQ(ProbeLogits(dir.string()), ProbeLogits(source));
}

}  // namespace
}  // namespace nibble
