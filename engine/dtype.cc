#include "engine/dtype.h"

namespace nibble::engine {
namespace {

struct DTypeRow {
  DType dtype;
  std::string_view name;
  size_t size;
};

// One row per enumerator, in enum order, so that DTypeSize/DTypeName index it directly.
constexpr DTypeRow kDTypes[] = {
    {DType::kF64, "F64", 8}, {DType::kF32, "F32", 4}, {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2}, {DType::kI8, "I8", 1}, {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
};

constexpr bool RowsMatchEnumOrder() {
  for (size_t i = 0; i < std::size(kDTypes); ++i) {
    if (static_cast<size_t>(kDTypes[i].dtype) != i) return false;
  }
  return true;
}
static_assert(RowsMatchEnumOrder(), "kDTypes must list DType enumerators in order");

const DTypeRow& Row(DType dtype) {
  const size_t i = static_cast<size_t>(dtype);
  // An out-of-range enum value can only come from a cast bug; fall back to the first row
  // rather than reading past the table.
  return i < std::size(kDTypes) ? kDTypes[i] : kDTypes[0];
}

}  // namespace

size_t DTypeSize(DType dtype) { return Row(dtype).size; }

std::string_view DTypeName(DType dtype) { return Row(dtype).name; }

std::optional<DType> ParseDTypeName(std::string_view name) {
  for (const DTypeRow& row : kDTypes) {
    if (row.name == name) return row.dtype;
  }
  return std::nullopt;
}

}  // namespace nibble::engine
