// Bad model directories get a clear error that names the file and the problem, never a
// crash. Each case starts from a copy of the real converted stories260K and breaks one thing.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>

#include "engine/atomic_file.h"
#include "engine/safetensors.h"
#include "engine/tensor_store.h"
#include "tests/integration/test_env.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class BrokenModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(testing::TestModel("broken")) /
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_.parent_path());
    fs::copy(testing::TestModel("stories260K"), dir_, fs::copy_options::recursive);
  }

  absl::Status Load() {
    auto model = engine::Model::Load(dir_.string(), engine::ModelLoadOptions{});
    return model.status();
  }

  void WriteFile(const std::string& name, const std::string& text) {
    ASSERT_TRUE(engine::WriteFileAtomically((dir_ / name).string(), text).ok());
  }

  void EditConfig(const std::function<void(nlohmann::json&)>& edit) {
    auto config = testing::ReadJson((dir_ / "config.json").string());
    edit(config);
    WriteFile("config.json", config.dump(2));
  }

  // Rewrites model.safetensors through `edit(name, dtype, shape, bytes)`, which may change
  // an entry or return false to drop it.
  using TensorEdit = std::function<bool(const std::string&, engine::DType&, std::vector<int64_t>&,
                                        std::vector<uint8_t>&)>;
  void EditTensors(const TensorEdit& edit) {
    std::vector<std::tuple<std::string, engine::DType, std::vector<int64_t>, std::vector<uint8_t>>>
        entries;
    {
      auto store = engine::TensorStore::Open(dir_.string());
      ASSERT_TRUE(store.ok()) << store.status();
      for (const std::string& name : (*store)->Names()) {
        auto ref = (*store)->Get(name);
        entries.emplace_back(name, ref->info->dtype, ref->info->shape,
                             std::vector<uint8_t>(ref->bytes.begin(), ref->bytes.end()));
      }
    }
    engine::SafetensorsWriter writer;
    for (auto& [name, dtype, shape, bytes] : entries) {
      if (!edit(name, dtype, shape, bytes)) continue;
      ASSERT_TRUE(writer.Add(name, dtype, shape, bytes).ok());
    }
    ASSERT_TRUE(writer.Write((dir_ / "model.safetensors").string()).ok());
  }

  std::string Path(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

TEST_F(BrokenModelTest, IntactCopyLoads) { EXPECT_TRUE(Load().ok()) << Load(); }

TEST_F(BrokenModelTest, MissingTokenizerIsNamed) {
  fs::remove(dir_ / "tokenizer.model");
  const absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(status.message()), HasSubstr(Path("tokenizer.model")));
}

TEST_F(BrokenModelTest, CorruptTokenizerIsNamed) {
  WriteFile("tokenizer.model", "this is not a sentencepiece model");
  const absl::Status status = Load();
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), HasSubstr(Path("tokenizer.model")));
}

TEST_F(BrokenModelTest, TokenizerLargerThanVocabularyIsRefused) {
  fs::copy_file(testing::RequiredEnv("NIBBLE_SHARED_DIR") + "/models/llama2-tokenizer/tokenizer.model",
                dir_ / "tokenizer.model", fs::copy_options::overwrite_existing);
  const absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("32000"));
}

TEST_F(BrokenModelTest, MissingConfigIsNamed) {
  fs::remove(dir_ / "config.json");
  const absl::Status status = Load();
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), HasSubstr(Path("config.json")));
}

TEST_F(BrokenModelTest, ConfigThatIsNotJsonIsNamed) {
  WriteFile("config.json", "{\"architectures\": [\"LlamaForCausalLM\"], ");
  const absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr(Path("config.json")));
  EXPECT_THAT(std::string(status.message()), HasSubstr("JSON"));
}

TEST_F(BrokenModelTest, UnknownArchitectureIsNamed) {
  EditConfig([](nlohmann::json& c) { c["architectures"] = {"MistralForCausalLM"}; });
  const absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("MistralForCausalLM"));
}

TEST_F(BrokenModelTest, InconsistentDimensionsAreNamed) {
  EditConfig([](nlohmann::json& c) { c["num_attention_heads"] = 7; });
  absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("num_attention_heads"));

  EditConfig([](nlohmann::json& c) {
    c["num_attention_heads"] = 8;
    c["num_key_value_heads"] = 3;
  });
  status = Load();
  EXPECT_THAT(std::string(status.message()), HasSubstr("num_key_value_heads"));

  EditConfig([](nlohmann::json& c) {
    c["num_key_value_heads"] = 4;
    c["hidden_size"] = -64;
  });
  status = Load();
  EXPECT_THAT(std::string(status.message()), HasSubstr("hidden_size"));

  EditConfig([](nlohmann::json& c) {
    c["hidden_size"] = "64";
  });
  status = Load();
  EXPECT_THAT(std::string(status.message()), HasSubstr("must be an integer"));
}

TEST_F(BrokenModelTest, ConfigDimensionsThatDisagreeWithTensorsNameTheTensor) {
  EditConfig([](nlohmann::json& c) { c["intermediate_size"] = 171; });
  const absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("model.layers.0.mlp.gate_proj.weight"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("[172, 64]"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("[171, 64]"));
}

TEST_F(BrokenModelTest, MissingTensorIsNamed) {
  EditTensors([](const std::string& name, auto&, auto&, auto&) {
    return name != "model.layers.3.self_attn.v_proj.weight";
  });
  const absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(status.message()), HasSubstr("model.layers.3.self_attn.v_proj.weight"));
}

TEST_F(BrokenModelTest, WrongDtypeIsNamed) {
  EditTensors([](const std::string& name, engine::DType& dtype, auto&, auto&) {
    if (name == "model.norm.weight") dtype = engine::DType::kI32;  // same size, wrong type
    return true;
  });
  const absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("model.norm.weight"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("I32"));
}

TEST_F(BrokenModelTest, TruncatedWeightsFileIsNamed) {
  const std::string path = Path("model.safetensors");
  fs::resize_file(path, fs::file_size(path) / 2);
  const absl::Status status = Load();
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), HasSubstr(path));
}

TEST_F(BrokenModelTest, NoWeightsAtAllIsNamed) {
  fs::remove(dir_ / "model.safetensors");
  const absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(status.message()), HasSubstr("safetensors"));
}

TEST_F(BrokenModelTest, ShardIndexPointingOutsideTheDirectoryIsRefused) {
  fs::rename(dir_ / "model.safetensors", dir_ / "model-00001-of-00001.safetensors");
  WriteFile("model.safetensors.index.json",
            R"({"weight_map": {"model.norm.weight": "../stories260K/model.safetensors"}})");
  const absl::Status status = Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("not a file in the directory"));
}

TEST_F(BrokenModelTest, ShardIndexNamingAMissingShardIsNamed) {
  fs::rename(dir_ / "model.safetensors", dir_ / "model-00001-of-00002.safetensors");
  WriteFile("model.safetensors.index.json",
            R"({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})");
  const absl::Status status = Load();
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), HasSubstr("model-00002-of-00002.safetensors"));
}

}  // namespace
}  // namespace nibble
