#include "engine/int4_weight.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/half.h"

namespace nibble::engine {

std::vector<float> Int4Weight::Dequantize() const {
  std::vector<float> w(static_cast<size_t>(in_features * out_features));
  const int64_t g = groups();
#pragma omp parallel for schedule(static)  // rows are independent: the same bits on any count
  for (int64_t n = 0; n < out_features; ++n) {
    for (int64_t k = 0; k < in_features; ++k) {
      const int64_t group = n * g + k / group_size;
      w[n * in_features + k] =
          static_cast<float>(static_cast<int>(q[n * in_features + k]) - zeros[group]) *
          kernels::cpu::HalfToFloat(scales[group]);
    }
  }
  return w;
}

Int4Weight Int4Weight::GatherRows(const std::vector<int64_t>& rows) const {
  Int4Weight out{in_features, static_cast<int64_t>(rows.size()), group_size, {}, {}, {}};
  const int64_t g = groups();
  for (int64_t row : rows) {
    out.q.insert(out.q.end(), q.begin() + row * in_features, q.begin() + (row + 1) * in_features);
    out.zeros.insert(out.zeros.end(), zeros.begin() + row * g, zeros.begin() + (row + 1) * g);
    out.scales.insert(out.scales.end(), scales.begin() + row * g, scales.begin() + (row + 1) * g);
  }
  return out;
}

absl::StatusOr<AwqGemmTensors> PackAwqGemm(const Int4Weight& w) {
  if (w.out_features % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AWQ GEMM packs 8 output features per int32; ", w.out_features, " is not a multiple of 8"));
  }
  const int64_t words = w.out_features / 8;
  const int64_t g = w.groups();
  for (uint8_t v : w.q) {
    if (v > 15) return absl::InvalidArgumentError(absl::StrCat("int4 value ", v, " > 15"));
  }
  for (uint8_t z : w.zeros) {
    if (z > 15) return absl::InvalidArgumentError(absl::StrCat("int4 zero ", z, " > 15"));
  }
  AwqGemmTensors t;
  t.qweight.assign(static_cast<size_t>(w.in_features * words), 0);
  t.qzeros.assign(static_cast<size_t>(g * words), 0);
  t.scales.resize(static_cast<size_t>(g * w.out_features));
  // Blocks of input features in parallel (each owns its rows of qweight): within a block the
  // source reads run along k, a cache line at a time. Only bit placement: the same bytes on
  // any thread count.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (w.in_features + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * kBlock, k1 = std::min(w.in_features, k0 + kBlock);
    for (int64_t c = 0; c < words; ++c) {
      for (int i = 0; i < 8; ++i) {
        const uint8_t* row = w.q.data() + (8 * c + kAwqOrder[i]) * w.in_features;
        for (int64_t k = k0; k < k1; ++k) {
          t.qweight[k * words + c] |= static_cast<int32_t>(static_cast<uint32_t>(row[k]) << (4 * i));
        }
      }
    }
  }
  for (int64_t c = 0; c < words; ++c) {
    for (int i = 0; i < 8; ++i) {
      const int64_t n = 8 * c + kAwqOrder[i];
      for (int64_t group = 0; group < g; ++group) {
        const uint8_t z = w.zeros[n * g + group];
        t.qzeros[group * words + c] |= static_cast<int32_t>(static_cast<uint32_t>(z) << (4 * i));
        t.scales[group * w.out_features + n] = w.scales[n * g + group];
      }
    }
  }
  return t;
}

absl::StatusOr<Int4Weight> UnpackAwqGemm(int64_t in_features, int64_t out_features,
                                         int64_t group_size, std::span<const int32_t> qweight,
                                         std::span<const int32_t> qzeros,
                                         std::span<const uint16_t> scales) {
  if (out_features % 8 != 0 || group_size <= 0 || in_features <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("AWQ shape in ", in_features, " out ",
                                                   out_features, " group ", group_size,
                                                   " is not packable"));
  }
  Int4Weight w{in_features, out_features, group_size, {}, {}, {}};
  const int64_t words = out_features / 8;
  const int64_t g = w.groups();
  if (qweight.size() != static_cast<size_t>(in_features * words) ||
      qzeros.size() != static_cast<size_t>(g * words) ||
      scales.size() != static_cast<size_t>(g * out_features)) {
    return absl::InvalidArgumentError("AWQ tensor sizes do not match the layer's shape");
  }
  w.q.resize(static_cast<size_t>(in_features * out_features));
  w.zeros.resize(static_cast<size_t>(out_features * g));
  w.scales.resize(static_cast<size_t>(out_features * g));
  for (int64_t c = 0; c < words; ++c) {
    for (int i = 0; i < 8; ++i) {
      const int64_t n = 8 * c + kAwqOrder[i];
      for (int64_t k = 0; k < in_features; ++k) {
        w.q[n * in_features + k] =
            static_cast<uint8_t>((static_cast<uint32_t>(qweight[k * words + c]) >> (4 * i)) & 15u);
      }
      for (int64_t group = 0; group < g; ++group) {
        w.zeros[n * g + group] =
            static_cast<uint8_t>((static_cast<uint32_t>(qzeros[group * words + c]) >> (4 * i)) & 15u);
        w.scales[n * g + group] = scales[group * out_features + n];
      }
    }
  }
  return w;
}

}  // namespace nibble::engine
