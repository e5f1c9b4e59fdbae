#include "server/served_model.h"

#include <algorithm>
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

grpc::Status ServedModels::Find(std::string_view name, ServedModel** model) const {
  if (name.empty()) {
    if (models_.size() == 1) {
      *model = models_.front().get();
      return grpc::Status::OK;
    }
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "field model is empty but this daemon serves several models; name one "
                        "(Models.List shows them)");
  }
  std::string names;
  for (const auto& served : models_) {
    if (served->spec.name == name) {
      *model = served.get();
      return grpc::Status::OK;
    }
    absl::StrAppend(&names, names.empty() ? "" : ", ", "\"", served->spec.name, "\"");
  }
  std::string shown(name.substr(0, 64));
  return grpc::Status(grpc::StatusCode::NOT_FOUND,
                      absl::StrCat("no model named \"", shown, "\" (this daemon serves ", names,
                                   ")"));
}

}  // namespace nibble::server
