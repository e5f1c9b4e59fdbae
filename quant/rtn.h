// Round-to-nearest W4 quantization: asymmetric int4 per group of `group_size` input
// features with a zero point, AutoAWQ's formula (MODELS.md §5): for each group,
//   s = max(max - min, 1e-5) / 15, rounded to fp16 (the stored value, used from here on),
//   z = clamp(round(-min / s), 0, 15),  q = clamp(round(w / s) + z, 0, 15),
// rounding half to even (torch.round's rule). The last group may be partial.
// This is `--method rtn`, the baseline AWQ must beat, and AWQ's final step.
#pragma once

#include <cstdint>
#include <span>

#include "engine/int4_weight.h"

namespace nibble::quant {

// `weight` is row-major [out_features, in_features].
engine::Int4Weight QuantizeRtn(std::span<const float> weight, int64_t in_features,
                               int64_t out_features, int64_t group_size);

}  // namespace nibble::quant
