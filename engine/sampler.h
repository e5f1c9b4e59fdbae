// Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p and
// a repetition penalty. Seeded and reproducible across platforms: the random stream is
// std::mt19937_64 (fully specified by the standard) turned into doubles by nibble itself.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cpu/sampling.h"
#include "kernels/sample_row.h"

namespace nibble::engine {

struct SamplingParams {
  float temperature = 0.0f;         // 0: greedy (argmax, lowest id on ties)
  int32_t top_k = 0;                // 0: no limit
  float top_p = 1.0f;               // nucleus mass in (0, 1]
  float repetition_penalty = 1.0f;  // > 0; 1 = none (CTRL/HF rule on prompt + output ids)
  uint64_t seed = 0;
};

// InvalidArgument naming the field for values outside the ranges above (NaN included).
absl::Status ValidateSamplingParams(const SamplingParams& params);

// One per generated sequence; not thread-safe.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // Picks a token from `logits` (modified in place), given the ids seen so far (prompt and
  // output) for the repetition penalty: NextRow, PenaltyIds, then kernels::cpu::SampleRow.
  int32_t Sample(std::span<float> logits, std::span<const int32_t> previous_ids);

  // The two halves of Sample, for a backend that applies the rule itself (on a GPU, next to
  // the logits): the next token's row parameters, with the next uniform draw of the seeded
  // stream when the request samples (temperature > 0; greedy draws nothing), exactly the
  // draw Sample would take; ...
  kernels::SampleRowParams NextRow();
  // ... and the ids the repetition penalty applies to: the distinct ids of `previous_ids`
  // within [0, vocab), ascending, into `ids` (emptied without a penalty).
  void PenaltyIds(std::span<const int32_t> previous_ids, int64_t vocab,
                  std::vector<int32_t>& ids) const;

 private:
  double NextUniform();  // in [0, 1)

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<int32_t> penalty_ids_;     // scratch
  kernels::cpu::SampleScratch scratch_;
};

}  // namespace nibble::engine
