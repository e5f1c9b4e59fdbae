// One logits row's sampling parameters: the contract shared by the host rule
// (kernels/cpu/sampling.h, the reference) and the device kernel (kernels/cuda/sampling.h).
// Plain data with the same layout on host and device, so that a backend can copy an array of
// them into device memory as they are.
#pragma once

#include <cstdint>

namespace nibble::kernels {

struct SampleRowParams {
  // The uniform draw in [0, 1) that picks the token; taken on the host from the request's
  // seeded stream, so that the device needs no random state and a seed replays exactly.
  // Ignored when temperature is 0.
  double u = 0.0;
  float temperature = 0.0f;         // 0: the argmax (lowest id on ties)
  int32_t top_k = 0;                // 0: no limit
  float top_p = 1.0f;               // nucleus mass in (0, 1]
  float repetition_penalty = 1.0f;  // 1: none; applied to the row's penalty ids
};

}  // namespace nibble::kernels
