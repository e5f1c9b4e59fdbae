// 4-bit weights in groups (W4A16), unpacked, and the AWQ "GEMM" checkpoint layout they are
// stored in (MODELS.md §5 in shared/docs; AutoAWQ WQLinear_GEMM, vLLM AWQLinearMethod).
//
// Dequantization: W[n, k] = (q[n, k] - z[n, k / g]) * s[n, k / g], q and z unsigned 0..15,
// z stored as is (no GPTQ-style -1). In-features that are not a multiple of the group size
// get a last, partial group: groups = ceil(in / g). (AWQ tools assume in % g == 0; nibble
// writes ceil(in / g) group rows, which is the same wherever theirs is defined.)
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace nibble::engine {

struct Int4Weight {
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t group_size = 0;
  std::vector<uint8_t> q;        // [out, in], values 0..15
  std::vector<uint8_t> zeros;    // [out, groups], values 0..15
  std::vector<uint16_t> scales;  // [out, groups], IEEE fp16 bits

  int64_t groups() const { return (in_features + group_size - 1) / group_size; }
  // W as fp32 [out, in], exactly (q - z) * s (the product is exact in fp32).
  std::vector<float> Dequantize() const;
  // The given output rows, in that order (InternLM2's fused wqkv is split into q, k and v
  // this way). Rows must be < out_features.
  Int4Weight GatherRows(const std::vector<int64_t>& rows) const;
};

// The three AWQ GEMM tensors of one linear layer, [in, out] like the format.
struct AwqGemmTensors {
  std::vector<int32_t> qweight;  // [in, out / 8]
  std::vector<int32_t> qzeros;   // [groups, out / 8]
  std::vector<uint16_t> scales;  // [groups, out], fp16 bits
};

// Nibble i (bits 4i..4i+3) of packed word [r, c] holds output column 8c + kAwqOrder[i].
inline constexpr int kAwqOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// InvalidArgument when out_features is not a multiple of 8 (the format packs 8 outputs per
// int32) or a value is outside 0..15.
absl::StatusOr<AwqGemmTensors> PackAwqGemm(const Int4Weight& weight);

// The inverse; sizes are checked against the given shape.
absl::StatusOr<Int4Weight> UnpackAwqGemm(int64_t in_features, int64_t out_features,
                                         int64_t group_size, std::span<const int32_t> qweight,
                                         std::span<const int32_t> qzeros,
                                         std::span<const uint16_t> scales);

}  // namespace nibble::engine
