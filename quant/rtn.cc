#include "quant/rtn.h"

#include <algorithm>
#include <cmath>

#include "kernels/cpu/half.h"

namespace nibble::quant {

engine::Int4Weight QuantizeRtn(std::span<const float> weight, int64_t in_features,
                               int64_t out_features, int64_t group_size) {
  engine::Int4Weight out{in_features, out_features, group_size, {}, {}, {}};
  const int64_t groups = out.groups();
  out.q.resize(static_cast<size_t>(in_features * out_features));
  out.zeros.resize(static_cast<size_t>(out_features * groups));
  out.scales.resize(static_cast<size_t>(out_features * groups));
  // Rows are independent: a 7B model's packing is seconds on many cores, not a minute on one.
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < out_features; ++n) {
    const float* row = weight.data() + n * in_features;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t begin = g * group_size;
      const int64_t end = std::min(begin + group_size, in_features);
      const auto [lo, hi] = std::minmax_element(row + begin, row + end);
      const uint16_t scale_bits = kernels::cpu::FloatToHalf(std::max(*hi - *lo, 1e-5f) / 15.0f);
      const float scale = kernels::cpu::HalfToFloat(scale_bits);
      // std::nearbyint rounds half to even in the default rounding mode.
      const float zero = std::clamp(std::nearbyint(-*lo / scale), 0.0f, 15.0f);
      out.scales[n * groups + g] = scale_bits;
      out.zeros[n * groups + g] = static_cast<uint8_t>(zero);
      for (int64_t k = begin; k < end; ++k) {
        const float level = std::clamp(std::nearbyint(row[k] / scale) + zero, 0.0f, 15.0f);
        out.q[n * in_features + k] = static_cast<uint8_t>(level);
      }
    }
  }
  return out;
}

}  // namespace nibble::quant
