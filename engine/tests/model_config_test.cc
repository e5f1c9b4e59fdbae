// ModelConfig parsing on the real configs of the InternLM family (../shared/models/configs)
// and on broken ones. Expected values are the published facts of MODELS.md §1, §4.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "engine/atomic_file.h"
#include "engine/model_config.h"
#include "tests/testing/test_support.h"

namespace nibble::engine {
namespace {

using ::testing::HasSubstr;

std::string SharedConfig(const std::string& name) {
  return ::nibble::testing::RequiredEnv("NIBBLE_SHARED_DIR") + "/models/configs/" + name;
}

ModelConfig ParseShared(const std::string& name) {
  auto text = ReadFileToString(SharedConfig(name));
  EXPECT_TRUE(text.ok()) << text.status();
  auto config = ParseModelConfig(text.ok() ? *text : "", name);
  EXPECT_TRUE(config.ok()) << config.status();
  return config.ok() ? *config : ModelConfig{};
}

TEST(ModelConfigTest, InternLMChat7bHasBiasesAndCodeDefaultRope) {
  const ModelConfig c = ParseShared("internlm-chat-7b.json");
  EXPECT_EQ(c.architecture, Architecture::kInternLM);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 32);  // absent from the file: MHA
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.intermediate_size, 11008);
  EXPECT_EQ(c.vocab_size, 103168);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);  // no rope keys: the code default
  EXPECT_EQ(c.rope_scaling, RopeScaling::kNone);
}

TEST(ModelConfigTest, InternLMChat20bHasNoBiases) {
  const ModelConfig c = ParseShared("internlm-chat-20b.json");
  EXPECT_EQ(c.architecture, Architecture::kInternLM);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.num_layers, 60);
  EXPECT_EQ(c.hidden_size, 5120);
  EXPECT_EQ(c.num_heads, 40);
}

TEST(ModelConfigTest, InternLM2ConfigsUseGqaAndDynamicNtk) {
  struct Expected {
    const char* file;
    int64_t hidden, layers, heads, kv, ffn;
  };
  for (const Expected& e : {Expected{"internlm2-chat-1_8b.json", 2048, 24, 16, 8, 8192},
                            Expected{"internlm2-chat-7b.json", 4096, 32, 32, 8, 14336}}) {
    SCOPED_TRACE(e.file);
    const ModelConfig c = ParseShared(e.file);
    EXPECT_EQ(c.architecture, Architecture::kInternLM2);
    EXPECT_EQ(c.hidden_size, e.hidden);
    EXPECT_EQ(c.num_layers, e.layers);
    EXPECT_EQ(c.num_heads, e.heads);
    EXPECT_EQ(c.num_kv_heads, e.kv);
    EXPECT_EQ(c.intermediate_size, e.ffn);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.vocab_size, 92544);
    EXPECT_EQ(c.max_position_embeddings, 32768);
    EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
    EXPECT_EQ(c.rope_scaling, RopeScaling::kDynamicNtk);
    EXPECT_DOUBLE_EQ(c.rope_scaling_factor, 2.0);
    EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
    EXPECT_FALSE(c.tie_word_embeddings);
  }
}

TEST(ModelConfigTest, InternLM2Chat20bWithNullScalingRunsPlainRope) {
  const ModelConfig c = ParseShared("internlm2-chat-20b.json");
  EXPECT_EQ(c.num_heads, 48);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.rope_scaling, RopeScaling::kNone);
  EXPECT_DOUBLE_EQ(c.RopeBaseForLength(100000), 1e6);
}

TEST(ModelConfigTest, Llama2ReferenceConfigParses) {
  const ModelConfig c = ParseShared("llama-2-7b-chat-hf.reference.json");
  EXPECT_EQ(c.architecture, Architecture::kLlama);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.num_kv_heads, 32);
}

TEST(ModelConfigTest, DynamicNtkBaseFollowsHfFormula) {
  const ModelConfig c = ParseShared("internlm2-chat-7b.json");
  EXPECT_DOUBLE_EQ(c.RopeBaseForLength(32768), 1e6);  // unchanged up to the context
  for (int64_t length : {32769, 40000, 65536, 100000}) {
    // base' = base * ((factor * L / M) - (factor - 1)) ^ (d / (d - 2)), MODELS.md §4.
    const double expected = 1e6 * std::pow(2.0 * length / 32768.0 - 1.0, 128.0 / 126.0);
    EXPECT_NEAR(c.RopeBaseForLength(length) / expected, 1.0, 1e-12) << length;
  }
  EXPECT_GT(c.RopeBaseForLength(65536), 3e6);
}

absl::Status ParseError(const std::string& json) {
  return ParseModelConfig(json, "/models/x/config.json").status();
}

TEST(ModelConfigTest, ErrorsNameTheFileAndTheKey) {
  const std::string base =
      R"("hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5,
         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512)";
  EXPECT_TRUE(ParseModelConfig("{\"architectures\": [\"LlamaForCausalLM\"], " + base + "}", "c")
                  .ok());
  struct Case {
    std::string json;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"not json", "not valid JSON"},
      {"[1, 2]", "not a JSON object"},
      {"{" + base + "}", "architectures"},
      {R"({"architectures": ["GPT2LMHeadModel"], )" + base + "}", "GPT2LMHeadModel"},
      {R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})", "intermediate_size"},
      {R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64.5, "intermediate_size": 1,
          "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 2})",
       "\"hidden_size\" must be an integer"},
      {R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 1,
          "num_hidden_layers": 0, "num_attention_heads": 1, "vocab_size": 2})",
       "\"num_hidden_layers\" must be positive"},
      {R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 1,
          "num_hidden_layers": 1, "num_attention_heads": 6, "vocab_size": 2})",
       "not divisible by num_attention_heads"},
      {R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 1,
          "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 3,
          "vocab_size": 2})",
       "not divisible by num_key_value_heads"},
      {R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 24, "intermediate_size": 1,
          "num_hidden_layers": 1, "num_attention_heads": 8, "vocab_size": 2})",
       "must be even"},
      {R"({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"type": "yarn", "factor": 4},
          )" + base + "}",
       "yarn"},
      {R"({"architectures": ["LlamaForCausalLM"], "rms_norm_eps": -1, )" + base + "}",
       "rms_norm_eps"},
      {R"({"architectures": ["LlamaForCausalLM"], "bos_token_id": 9999, )" + base + "}",
       "bos_token_id"},
      {R"({"architectures": ["InternLMForCausalLM"], "bias": "yes", )" + base + "}",
       "\"bias\" must be true or false"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.json);
    const absl::Status status = ParseError(c.json);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr("/models/x/config.json"));
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.message));
  }
}

TEST(ModelConfigTest, WrittenConfigParsesBackToTheSameValues) {
  ModelConfig c = ParseShared("internlm2-chat-1_8b.json");
  auto again = ParseModelConfig(ModelConfigToJson(c), "written");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->architecture, c.architecture);
  EXPECT_EQ(again->num_kv_heads, c.num_kv_heads);
  EXPECT_EQ(again->rope_scaling, c.rope_scaling);
  EXPECT_DOUBLE_EQ(again->rope_scaling_factor, c.rope_scaling_factor);
  EXPECT_DOUBLE_EQ(again->rope_theta, c.rope_theta);
  EXPECT_EQ(again->eos_token_ids, c.eos_token_ids);
}

}  // namespace
}  // namespace nibble::engine
