#include "server/served_model.h"

#include <algorithm>
#include <filesystem>
#include <system_error>
#include <string>

#include "absl/strings/str_cat.h"

namespace nibble::server {

int64_t PromptWeight(std::string_view text) {
  int64_t weight = 0;
  bool after_space = false;
  for (const char c : text) {
    const bool space = c == ' ';
    if (!space || !after_space) ++weight;
    after_space = space;
  }
  return weight;
}

int64_t PromptByteBound(const engine::Tokenizer& tokenizer) {
  int64_t longest = 1;
  for (int32_t id = 0; id < tokenizer.VocabSize(); ++id) {
    longest = std::max<int64_t>(longest, static_cast<int64_t>(tokenizer.IdToPiece(id).size()));
  }
  // Texts a normalizing tokenizer would shrink beyond folding spaces: tabs and newlines,
  // control characters, full-width letters and ligatures (NFKC), characters few vocabularies
  // hold (merged into one <unk> without byte fallback).
  static const char* const kProbes[] = {
      "\t\t\t\t\t\t\t\t\n\n\n\n\n\n\n\n\r\r\r\r\x01\x01\x01\x01\x7f\x7f\x7f\x7f",
      "\xef\xbc\xa1\xef\xbc\xa2\xef\xbc\xa3\xef\xbc\xa4\xef\xac\x80\xef\xac\x81\xef\xac\x82",
      "\xe4\xb8\x80\xe4\xb8\x81\xe4\xb8\x82\xe4\xb8\x83\xea\xb0\x80\xea\xb0\x81\xf0\x9f\x98\x80"
      "\xf0\x9f\x98\x81\xf0\x9f\x98\x82\xe1\x88\x80\xe1\x88\x81\xe1\x88\x82"};
  for (const char* probe : kProbes) {
    const std::string text = std::string(probe) + probe + probe + probe;
    const int64_t tokens = static_cast<int64_t>(tokenizer.Encode(text).size());
    if (tokens * (longest + 2) + 2 < PromptWeight(text)) return 0;
  }
  return longest;
}

void ServedModels::Add(std::shared_ptr<ServedModel> model) {
  std::lock_guard<std::mutex> lock(mu_);
  model->state = ModelState::kReady;
  charged_[model->spec.name] = model->memory_bytes;
  models_[model->spec.name] = std::move(model);
}

grpc::Status ServedModels::NotFound(std::string_view name) const {
  std::string names;
  for (const auto& [served_name, served] : models_) {
    absl::StrAppend(&names, names.empty() ? "" : ", ", "\"", served_name, "\"");
  }
  std::string shown(name.substr(0, 64));
  return grpc::Status(grpc::StatusCode::NOT_FOUND,
                      absl::StrCat("no model named \"", shown, "\" (this daemon serves ",
                                   names.empty() ? "none" : names, ")"));
}

grpc::Status ServedModels::Find(std::string_view name, ModelRef* model) const {
  std::lock_guard<std::mutex> lock(mu_);
  const ServedModel* found = nullptr;
  std::shared_ptr<ServedModel> chosen;
  if (name.empty()) {
    if (models_.size() != 1) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          models_.empty()
                              ? "field model is empty and this daemon serves no model yet "
                                "(Models.Load loads one)"
                              : "field model is empty but this daemon serves several models; "
                                "name one (Models.List shows them)");
    }
    chosen = models_.begin()->second;
  } else {
    auto it = models_.find(name);
    if (it == models_.end()) return NotFound(name);
    chosen = it->second;
  }
  found = chosen.get();
  switch (found->state.load()) {
    case ModelState::kLoading:
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          absl::StrCat("model \"", found->spec.name,
                                       "\" is still loading; try again when Models.List shows "
                                       "it READY"));
    case ModelState::kDraining:
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          absl::StrCat("model \"", found->spec.name, "\" is being unloaded"));
    case ModelState::kReady: break;
  }
  // Counted under mu_, so an unload that marks it DRAINING after this sees the call.
  *model = ModelRef(std::move(chosen));
  return grpc::Status::OK;
}

std::vector<std::shared_ptr<ServedModel>> ServedModels::all() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<ServedModel>> out;
  for (const auto& [name, model] : models_) {
    if (model->engine != nullptr && model->state.load() != ModelState::kLoading) {
      out.push_back(model);
    }
  }
  return out;
}

std::vector<std::shared_ptr<ServedModel>> ServedModels::listing() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<ServedModel>> out;
  for (const auto& [name, model] : models_) out.push_back(model);
  return out;
}

grpc::Status ServedModels::Get(std::string_view name, std::shared_ptr<ServedModel>* model) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return NotFound(name);
  *model = it->second;
  return grpc::Status::OK;
}

absl::Status ServedModels::Reserve(const std::string& name, const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  if (models_.count(name)) {
    return absl::AlreadyExistsError(absl::StrCat(
        "a model named \"", name, "\" is served or loading already (Models.Unload it first, or "
        "load under another name)"));
  }
  auto placeholder = std::make_shared<ServedModel>();
  placeholder->spec.name = name;
  placeholder->spec.path = path;
  placeholder->state = ModelState::kLoading;
  models_[name] = std::move(placeholder);
  charged_[name] = 0;
  return absl::OkStatus();
}

absl::Status ServedModels::Charge(const std::string& name, int64_t memory_bytes,
                                  int64_t budget_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t others = 0;
  for (const auto& [other, bytes] : charged_) {
    if (other != name) others += bytes;
  }
  if (budget_bytes > 0 && others + memory_bytes > budget_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "model \"", name, "\" needs ", memory_bytes, " bytes (weights and KV cache) but only ",
        std::max<int64_t>(0, budget_bytes - others), " of the daemon's memory_budget (",
        budget_bytes, " bytes) are free: the models served take ", others,
        "; unload one, or lower engine.cache_max_entry_count or engine.cpu_memory_budget"));
  }
  charged_[name] = memory_bytes;
  return absl::OkStatus();
}

void ServedModels::Publish(std::shared_ptr<ServedModel> model) {
  std::lock_guard<std::mutex> lock(mu_);
  model->state = ModelState::kReady;
  charged_[model->spec.name] = model->memory_bytes;
  models_[model->spec.name] = std::move(model);
}

void ServedModels::Remove(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  models_.erase(name);
  charged_.erase(name);
}

grpc::Status ServedModels::StartUnload(std::string_view name, std::shared_ptr<ServedModel>* model) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = models_.find(name);
  if (it == models_.end()) return NotFound(name);
  ModelState expected = ModelState::kReady;
  if (!it->second->state.compare_exchange_strong(expected, ModelState::kDraining)) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        absl::StrCat("model \"", it->first, "\" is ",
                                     expected == ModelState::kLoading ? "still loading"
                                                                      : "being unloaded already"));
  }
  *model = it->second;
  return grpc::Status::OK;
}

absl::StatusOr<std::shared_ptr<ServedModel>> LoadServedModel(const ModelSpec& spec,
                                                             const engine::EngineOptions& options,
                                                             ServedModels& models,
                                                             int64_t budget_bytes) {
  if (budget_bytes > 0) {
    // The weights' files are a lower bound of their memory: a model that cannot fit is
    // refused before gigabytes are read.
    int64_t file_bytes = 0;
    std::error_code ec;
    for (std::filesystem::directory_iterator it(spec.path, ec), end; !ec && it != end;
         it.increment(ec)) {
      if (it->path().extension() == ".safetensors" && it->is_regular_file(ec)) {
        file_bytes += static_cast<int64_t>(it->file_size(ec));
      }
    }
    if (absl::Status s = models.Charge(spec.name, file_bytes, budget_bytes); !s.ok()) return s;
  }
  auto model = engine::Model::Load(spec.path, spec.load);
  if (!model.ok()) return model.status();
  // The KV cache pool Start will reserve: a fraction of the CPU budget (on a GPU, of its free
  // memory, which is not this budget's; charged after Start with the real size).
  const bool on_cpu = spec.load.device.kind == engine::Device::Kind::kCpu;
  const int64_t kv_bytes =
      on_cpu ? static_cast<int64_t>(options.cache_max_entry_count *
                                    static_cast<double>(options.cpu_memory_budget_bytes))
             : 0;
  const int64_t weight_bytes = static_cast<int64_t>((*model)->weight_bytes());
  if (absl::Status s = models.Charge(spec.name, weight_bytes + kv_bytes, budget_bytes); !s.ok()) {
    return s;
  }
  auto engine = engine::InferenceEngine::Start(*std::move(model), options);
  if (!engine.ok()) {
    return absl::Status(engine.status().code(),
                        absl::StrCat("the engine did not start: ", engine.status().message()));
  }
  auto served = std::make_shared<ServedModel>();
  served->spec = spec;
  served->engine = *std::move(engine);
  served->max_piece_bytes = PromptByteBound(served->engine->model().tokenizer());
  served->memory_bytes = weight_bytes + served->engine->Stats().kv_cache_bytes;
  if (absl::Status s = models.Charge(spec.name, served->memory_bytes, budget_bytes); !s.ok()) {
    served->engine->Shutdown();
    return s;
  }
  return served;
}

}  // namespace nibble::server
