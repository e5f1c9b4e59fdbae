#include "engine/sampler.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace nibble::engine {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", p.temperature));
  }
  if (p.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  }
  if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "repetition_penalty must be a finite number > 0, got ", p.repetition_penalty));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

double Sampler::NextUniform() {
  // The top 53 bits of one draw, scaled: the same doubles on every platform (unlike
  // std::uniform_real_distribution, whose algorithm the standard leaves open).
  return static_cast<double>(rng_() >> 11) * 0x1.0p-53;
}

kernels::SampleRowParams Sampler::NextRow() {
  kernels::SampleRowParams row;
  row.temperature = params_.temperature;
  row.top_k = params_.top_k;
  row.top_p = params_.top_p;
  row.repetition_penalty = params_.repetition_penalty;
  if (params_.temperature != 0.0f) row.u = NextUniform();
  return row;
}

void Sampler::PenaltyIds(std::span<const int32_t> previous_ids, int64_t vocab,
                         std::vector<int32_t>& ids) const {
  ids.clear();
  if (params_.repetition_penalty == 1.0f) return;
  // Each distinct id once: penalizing twice would compound.
  for (int32_t id : previous_ids) {
    if (id >= 0 && id < vocab) ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
}

int32_t Sampler::Sample(std::span<float> logits, std::span<const int32_t> previous_ids) {
  const kernels::SampleRowParams row = NextRow();
  PenaltyIds(previous_ids, static_cast<int64_t>(logits.size()), penalty_ids_);
  return kernels::cpu::SampleRow(logits, row, penalty_ids_, scratch_);
}

}  // namespace nibble::engine
