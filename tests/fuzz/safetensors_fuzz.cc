// libFuzzer target for the safetensors header parser: ParseSafetensors must never crash, leak,
// read out of bounds or throw on any byte string, and whatever it accepts must satisfy the
// guarantees its callers rely on (checked here; a violation traps, which libFuzzer reports).
//
//   cmake --preset fuzz && cmake --build build-fuzz && ctest --preset fuzz
// or by hand, for longer:
//   build-fuzz/bin/safetensors_fuzz -dict=tests/fuzz/safetensors.dict \
//       build-fuzz/tests/fuzz/corpus/safetensors -max_total_time=600

#include <cstddef>
#include <cstdint>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "engine/dtype.h"
#include "engine/safetensors.h"

namespace {

void Require(bool condition) {
  if (!condition) __builtin_trap();
}

void CheckAccepted(const nibble::engine::SafetensorsHeader& header, size_t file_size) {
  Require(header.data_offset >= 8 && header.data_offset <= file_size);
  const uint64_t data_size = file_size - header.data_offset;
  std::set<std::string> names;
  uint64_t previous_end = 0;
  for (const nibble::engine::TensorInfo& tensor : header.tensors) {
    Require(names.insert(tensor.name).second);
    Require(tensor.name != "__metadata__");
    Require(tensor.data_begin <= tensor.data_end && tensor.data_end <= data_size);
    Require(tensor.data_begin >= previous_end);  // sorted, not overlapping
    previous_end = tensor.data_end;
    for (int64_t dim : tensor.shape) Require(dim >= 0);
    const int64_t elements = tensor.NumElements();
    Require(elements >= 0);
    Require(static_cast<uint64_t>(elements) * nibble::engine::DTypeSize(tensor.dtype) ==
            tensor.data_end - tensor.data_begin);
    Require(nibble::engine::ParseDTypeName(nibble::engine::DTypeName(tensor.dtype)) ==
            tensor.dtype);
  }
}

void ParseAndCheck(std::span<const uint8_t> file) {
  const auto parsed = nibble::engine::ParseSafetensors(file, "fuzz.safetensors");
  if (parsed.ok()) {
    CheckAccepted(*parsed, file.size());
  } else {
    // Every error names the source.
    Require(parsed.status().message().find("fuzz.safetensors: ") == 0);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> input(data, size);
  // The input as a file, length field and all.
  ParseAndCheck(input);

  // The same bytes with the length field rewritten to end the header at the last '}': a
  // mutation that inserts or deletes bytes in the JSON almost always breaks the declared
  // length, and without this second view most of the fuzzing time would go to the
  // "header length" check instead of the meaning of the header.
  if (size < 8) return 0;
  size_t header_size = 0;
  for (size_t i = size; i > 8; --i) {
    if (data[i - 1] == '}') {
      header_size = i - 8;
      break;
    }
  }
  uint64_t declared = 0;
  for (size_t i = 0; i < 8; ++i) declared |= static_cast<uint64_t>(data[i]) << (8 * i);
  if (header_size == 0 || declared == header_size) return 0;
  std::vector<uint8_t> fixed(input.begin(), input.end());
  for (size_t i = 0; i < 8; ++i) fixed[i] = static_cast<uint8_t>(header_size >> (8 * i));
  ParseAndCheck(fixed);
  return 0;
}
