// Element types of tensors in checkpoint files and in memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace nibble::engine {

enum class DType : uint8_t { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

// Size of one element in bytes.
size_t DTypeSize(DType dtype);
// The safetensors spelling ("F32", "BF16", ...).
std::string_view DTypeName(DType dtype);
// Parses a safetensors dtype name; nullopt for names nibble does not know.
std::optional<DType> ParseDTypeName(std::string_view name);

}  // namespace nibble::engine
