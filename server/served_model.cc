#include "server/served_model.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace nibble::server {

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
