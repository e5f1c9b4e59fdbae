#include "engine/tensor_store.h"

#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/atomic_file.h"
#include "engine/status_macros.h"
#include "kernels/cpu/half.h"

namespace nibble::engine {
namespace fs = std::filesystem;
namespace {

absl::string_view Absl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

}  // namespace

std::string ShapeToString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<std::unique_ptr<TensorStore>> TensorStore::Open(const std::string& model_dir) {
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  store->dir_ = model_dir;
  std::error_code ec;
  if (!fs::is_directory(model_dir, ec)) {
    return absl::NotFoundError(absl::StrCat(model_dir, ": not a directory"));
  }

  const fs::path dir(model_dir);
  const fs::path single = dir / "model.safetensors";
  const fs::path index_path = dir / "model.safetensors.index.json";
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> index_map;  // tensor -> shard, when there is an index
  if (fs::exists(single, ec)) {
    shard_names.push_back("model.safetensors");
  } else if (fs::exists(index_path, ec)) {
    NIBBLE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(index_path.string()));
    const auto json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    const std::string where = index_path.string();
    if (json.is_discarded() || !json.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": not a JSON object"));
    }
    auto map = json.find("weight_map");
    if (map == json.end() || !map->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": missing \"weight_map\" object"));
    }
    std::set<std::string> shards;
    for (auto it = map->begin(); it != map->end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": weight_map entry \"", it.key(), "\" is not a file name"));
      }
      const std::string shard = it.value().get<std::string>();
      // A shard is a plain file name inside the model directory, never a path out of it.
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." ||
          shard == "..") {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": shard name \"", shard, "\" is not a file in the directory"));
      }
      shards.insert(shard);
      index_map[it.key()] = shard;
    }
    shard_names.assign(shards.begin(), shards.end());
  } else {
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      if (entry.path().extension() == ".safetensors") {
        shard_names.push_back(entry.path().filename().string());
      }
    }
    std::sort(shard_names.begin(), shard_names.end());
  }
  if (shard_names.empty()) {
    return absl::NotFoundError(absl::StrCat(
        model_dir, ": no model.safetensors, model.safetensors.index.json or *.safetensors"));
  }

  for (const std::string& name : shard_names) {
    NIBBLE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((dir / name).string()));
    store->files_.push_back(std::move(file));
    const SafetensorsFile& opened = *store->files_.back();
    for (const TensorInfo& info : opened.header().tensors) {
      TensorRef ref{&info, opened.Bytes(info), &opened.path(), &opened};
      if (!store->tensors_.emplace(info.name, ref).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(model_dir, ": tensor \"", info.name, "\" appears in ",
                         *store->tensors_.at(info.name).file, " and in ", opened.path()));
      }
    }
  }
  for (const auto& [tensor, shard] : index_map) {
    auto it = store->tensors_.find(tensor);
    if (it == store->tensors_.end() || fs::path(*it->second.file).filename() != shard) {
      return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": tensor \"", tensor,
                                                     "\" is not in shard ", shard));
    }
  }
  return store;
}

bool TensorStore::Contains(std::string_view name) const {
  return tensors_.find(name) != tensors_.end();
}

absl::StatusOr<TensorRef> TensorStore::Get(std::string_view name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(
        absl::StrCat(dir_, ": missing tensor \"", Absl(name), "\""));
  }
  return it->second;
}

absl::StatusOr<TensorRef> TensorStore::GetChecked(std::string_view name,
                                                  const std::vector<int64_t>& expected_shape,
                                                  std::optional<DType> dtype) const {
  NIBBLE_ASSIGN_OR_RETURN(TensorRef ref, Get(name));
  if (ref.info->shape != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        *ref.file, ": tensor \"", Absl(name), "\" has shape ", ShapeToString(ref.info->shape),
        ", the config implies ", ShapeToString(expected_shape)));
  }
  if (dtype && ref.info->dtype != *dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(*ref.file, ": tensor \"", Absl(name), "\" has dtype ",
                     Absl(DTypeName(ref.info->dtype)), "; expected ", Absl(DTypeName(*dtype))));
  }
  return ref;
}

namespace {

template <typename T>
std::vector<T> CopyElements(const TensorRef& ref) {
  std::vector<T> out(static_cast<size_t>(ref.info->NumElements()));
  std::memcpy(out.data(), ref.bytes.data(), out.size() * sizeof(T));  // may be unaligned
  return out;
}

}  // namespace

absl::StatusOr<std::vector<int32_t>> TensorStore::ReadI32(
    std::string_view name, const std::vector<int64_t>& expected_shape) const {
  NIBBLE_ASSIGN_OR_RETURN(TensorRef ref, GetChecked(name, expected_shape, DType::kI32));
  return CopyElements<int32_t>(ref);
}

absl::StatusOr<std::vector<uint16_t>> TensorStore::ReadF16Bits(
    std::string_view name, const std::vector<int64_t>& expected_shape) const {
  NIBBLE_ASSIGN_OR_RETURN(TensorRef ref, GetChecked(name, expected_shape, DType::kF16));
  return CopyElements<uint16_t>(ref);
}

void TensorStore::ReleaseResidentPages() const {
  for (const auto& file : files_) file->ReleaseResidentPages();
}

absl::StatusOr<TensorStore::MappedF16> TensorStore::MapF16(
    std::string_view name, const std::vector<int64_t>& expected_shape) const {
  NIBBLE_ASSIGN_OR_RETURN(TensorRef ref, GetChecked(name, expected_shape, DType::kF16));
  if (reinterpret_cast<uintptr_t>(ref.bytes.data()) % alignof(uint16_t) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(*ref.file, ": tensor \"", std::string(name), "\" is not 2-byte aligned"));
  }
  for (const auto& file : files_) {
    if (file.get() == ref.shard) {
      return MappedF16{file, reinterpret_cast<const uint16_t*>(ref.bytes.data())};
    }
  }
  return absl::InternalError(absl::StrCat("tensor \"", std::string(name), "\" has no shard"));
}

absl::StatusOr<std::vector<float>> TensorStore::ReadF32(
    std::string_view name, const std::vector<int64_t>& expected_shape) const {
  NIBBLE_ASSIGN_OR_RETURN(TensorRef ref, GetChecked(name, expected_shape, std::nullopt));
  const size_t n = static_cast<size_t>(ref.info->NumElements());
  std::vector<float> out(n);
  const uint8_t* data = ref.bytes.data();
  switch (ref.info->dtype) {
    case DType::kF32:
      std::memcpy(out.data(), data, n * sizeof(float));
      break;
    case DType::kF16:
    case DType::kBF16: {
      std::vector<uint16_t> raw(n);
      std::memcpy(raw.data(), data, n * sizeof(uint16_t));  // the mapping may be unaligned
      if (ref.info->dtype == DType::kF16) {
        kernels::cpu::HalfToFloatBulk(raw.data(), n, out.data());
      } else {
        kernels::cpu::Bf16ToFloatBulk(raw.data(), n, out.data());
      }
      break;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(*ref.file, ": tensor \"", Absl(name), "\" has dtype ",
                       Absl(DTypeName(ref.info->dtype)), "; expected F32, F16 or BF16"));
  }
  return out;
}

std::vector<std::string> TensorStore::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, ref] : tensors_) names.push_back(name);
  return names;
}

}  // namespace nibble::engine
