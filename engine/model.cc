#include "engine/model.h"

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engine/atomic_file.h"
#include "engine/cpu_backend.h"
#include "engine/model_weights.h"
#include "engine/status_macros.h"
#include "engine/tensor_store.h"
#include "kernels/cpu/ops.h"

namespace nibble::engine {

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
  TokenizerLoadResult loaded = LoadSentencePieceTokenizer(tokenizer_path);
  if (!loaded.tokenizer) return absl::InvalidArgumentError(loaded.error);
  // The embedding may be padded past the tokenizer's vocabulary (InternLM's 103168), never
  // the reverse: a token the model cannot embed would crash later.
  if (loaded.tokenizer->VocabSize() > config.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(tokenizer_path, ": tokenizer has ", loaded.tokenizer->VocabSize(),
                     " pieces but ", config_path, " says vocab_size ", config.vocab_size));
  }

  NIBBLE_ASSIGN_OR_RETURN(auto store, TensorStore::Open(dir));
  NIBBLE_ASSIGN_OR_RETURN(ModelWeights weights,
                          LoadModelWeights(*store, config, options.weight_storage));
  const size_t weight_bytes = weights.StorageBytes();
  auto backend = MakeCpuBackend(config, std::move(weights));
  return std::unique_ptr<Model>(new Model(dir, std::move(config), std::move(loaded.tokenizer),
                                          std::move(backend), weight_bytes));
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
