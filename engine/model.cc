#include "engine/model.h"

#include <algorithm>
#include <charconv>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "engine/atomic_file.h"
#include "engine/cpu_backend.h"
#if NIBBLE_HAVE_CUDA_BACKEND
#include "engine/cuda_backend.h"
#endif
#include "engine/model_weights.h"
#include "engine/status_macros.h"
#include "engine/tensor_store.h"
#include "kernels/cpu/ops.h"

namespace nibble::engine {
namespace {

// Special tokens that live only in tokenizer_config.json's "added_tokens_decoder" (InternLM2's
// <|im_start|>, <|im_end|>, ... are "[UNUSED_TOKEN_n]" pieces in tokenizer.model itself).
// A missing file means none; a malformed one is an error naming it.
absl::StatusOr<std::vector<AddedToken>> ReadAddedTokens(const std::string& path,
                                                        int64_t vocab_size) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return std::vector<AddedToken>{};
  NIBBLE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  const auto json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  std::vector<AddedToken> tokens;
  auto decoder = json.find("added_tokens_decoder");
  if (decoder == json.end()) return tokens;
  if (!decoder->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": added_tokens_decoder is not an object"));
  }
  for (auto it = decoder->begin(); it != decoder->end(); ++it) {
    int64_t id = -1;
    const std::string& key = it.key();
    if (key.empty() || key.size() > 9 ||
        key.find_first_not_of("0123456789") != std::string::npos ||
        (id = std::stoll(key)) >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": added token id \"", key, "\" is not an id of the vocabulary"));
    }
    auto content = it.value().find("content");
    if (!it.value().is_object() || content == it.value().end() || !content->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": added token ", key, " has no \"content\" string"));
    }
    tokens.push_back({content->get<std::string>(), static_cast<int32_t>(id)});
  }
  return tokens;
}

}  // namespace

Model::Model(std::string dir, ModelConfig config, std::unique_ptr<Tokenizer> tokenizer,
             std::unique_ptr<Backend> backend, size_t weight_bytes)
    : dir_(std::move(dir)),
      config_(std::move(config)),
      tokenizer_(std::move(tokenizer)),
      chat_template_(DefaultChatTemplateFor(ArchitectureName(config_.architecture),
                                            static_cast<int>(config_.vocab_size))),
      backend_(std::move(backend)),
      weight_bytes_(weight_bytes) {}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   const ModelLoadOptions& options) {
  namespace fs = std::filesystem;
  kernels::cpu::SetCpuThreads(options.cpu_threads);
  const std::string config_path = (fs::path(dir) / "config.json").string();
  NIBBLE_ASSIGN_OR_RETURN(std::string config_text, ReadFileToString(config_path));
  NIBBLE_ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(config_text, config_path));

  const std::string tokenizer_path = (fs::path(dir) / "tokenizer.model").string();
  std::error_code ec;
  if (!fs::exists(tokenizer_path, ec)) {
    return absl::NotFoundError(absl::StrCat(tokenizer_path, ": missing tokenizer"));
  }
  NIBBLE_ASSIGN_OR_RETURN(std::vector<AddedToken> added_tokens,
                          ReadAddedTokens((fs::path(dir) / "tokenizer_config.json").string(),
                                          config.vocab_size));
  TokenizerLoadResult loaded = LoadSentencePieceTokenizer(tokenizer_path, added_tokens);
  if (!loaded.tokenizer) return absl::InvalidArgumentError(loaded.error);
  // The embedding may be padded past the tokenizer's vocabulary (InternLM's 103168), never
  // the reverse: a token the model cannot embed would crash later.
  if (loaded.tokenizer->VocabSize() > config.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(tokenizer_path, ": tokenizer has ", loaded.tokenizer->VocabSize(),
                     " pieces but ", config_path, " says vocab_size ", config.vocab_size));
  }

  NIBBLE_ASSIGN_OR_RETURN(auto store, TensorStore::Open(dir));
  // An AWQ checkpoint's dense tensors are fp16 already: keeping them as fp16 loses nothing
  // and halves what they occupy next to the int4 weights.
  // On the GPU, dense weights are fp16 whatever the option says: that is what it computes in.
  const bool on_gpu = options.device.kind == Device::Kind::kCuda;
  const WeightStorage storage =
      config.awq || on_gpu ? WeightStorage::kF16 : options.weight_storage;
#if !NIBBLE_HAVE_CUDA_BACKEND
  if (on_gpu) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device ", options.device.ToString(),
        ": this nibble was built without CUDA (no nvcc at configure time); use device cpu"));
  }
#endif
  // The GPU backend uploads each weight once: fp16 ones are read in place from the file.
  NIBBLE_ASSIGN_OR_RETURN(ModelWeights weights,
                          LoadModelWeights(*store, config, storage, /*f16_in_place=*/on_gpu));
  store->ReleaseResidentPages();  // the weights are copied or repacked, or read in place
  const size_t weight_bytes = weights.StorageBytes();
  std::unique_ptr<Backend> backend;
  if (on_gpu) {
#if NIBBLE_HAVE_CUDA_BACKEND
    NIBBLE_ASSIGN_OR_RETURN(backend, MakeCudaBackend(config, std::move(weights),
                                                     options.device.index));
#endif
  } else {
    backend = MakeCpuBackend(config, std::move(weights));
  }
  std::unique_ptr<Model> model(new Model(dir, std::move(config), std::move(loaded.tokenizer),
                                         std::move(backend), weight_bytes));
  model->cpu_threads_ = options.cpu_threads;
  return model;
}

std::string Device::ToString() const {
  return kind == Kind::kCpu ? std::string("cpu") : absl::StrCat("cuda:", index);
}

absl::StatusOr<Device> ParseDevice(std::string_view text) {
  Device device;
  if (text == "cpu") return device;
  device.kind = Device::Kind::kCuda;
  if (text == "cuda") return device;
  constexpr std::string_view kPrefix = "cuda:";
  if (text.substr(0, kPrefix.size()) == kPrefix) {
    const std::string_view number = text.substr(kPrefix.size());
    int index = -1;
    const auto [end, error] = std::from_chars(number.data(), number.data() + number.size(), index);
    if (!number.empty() && error == std::errc() && end == number.data() + number.size() &&
        index >= 0) {
      device.index = index;
      return device;
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "device \"", std::string(text), "\": expected cpu, cuda or cuda:N (N the CUDA device number)"));
}

std::vector<int32_t> Model::StopTokenIds() const {
  std::vector<int32_t> ids = config_.eos_token_ids;
  for (const std::string& word : chat_template_.StopWords()) {
    const int32_t id = tokenizer_->PieceToId(word);
    if (id >= 0) ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

}  // namespace nibble::engine
