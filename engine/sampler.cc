#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

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

int32_t Sampler::Sample(std::span<float> logits, std::span<const int32_t> previous_ids) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  if (params_.repetition_penalty != 1.0f) {
    // Each distinct id once: penalizing twice would compound.
    std::vector<int32_t> seen(previous_ids.begin(), previous_ids.end());
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    for (int32_t id : seen) {
      if (id < 0 || id >= vocab) continue;
      float& logit = logits[id];
      logit = logit > 0 ? logit / params_.repetition_penalty : logit * params_.repetition_penalty;
    }
  }
  if (params_.temperature == 0.0f) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }

  // Candidates: every id in id order when nothing is cut (no sort: sorting a 100k vocabulary
  // costs milliseconds per token), else by descending logit (ties: lower id first), cut to
  // top_k.
  order_.resize(vocab);
  std::iota(order_.begin(), order_.end(), 0);
  int32_t keep = vocab;
  if (params_.top_k > 0 || params_.top_p < 1.0f) {
    auto by_logit = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    if (params_.top_k > 0) {
      keep = std::min(params_.top_k, vocab);
      std::partial_sort(order_.begin(), order_.begin() + keep, order_.end(), by_logit);
    } else {
      std::sort(order_.begin(), order_.end(), by_logit);
    }
    order_.resize(keep);
  }

  // Softmax at the temperature, in double.
  probs_.resize(keep);
  const double max_logit = *std::max_element(logits.begin(), logits.end());
  double total = 0;
  for (int32_t i = 0; i < keep; ++i) {
    probs_[i] = std::exp((logits[order_[i]] - max_logit) / params_.temperature);
    total += probs_[i];
  }
  // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
  int32_t nucleus = keep;
  if (params_.top_p < 1.0f) {
    double mass = 0;
    for (int32_t i = 0; i < keep; ++i) {
      mass += probs_[i] / total;
      if (mass >= params_.top_p) {
        nucleus = i + 1;
        break;
      }
    }
  }
  double nucleus_total = 0;
  for (int32_t i = 0; i < nucleus; ++i) nucleus_total += probs_[i];
  const double target = NextUniform() * nucleus_total;
  double cumulative = 0;
  for (int32_t i = 0; i < nucleus; ++i) {
    cumulative += probs_[i];
    if (target < cumulative) return order_[i];
  }
  return order_[nucleus - 1];
}

}  // namespace nibble::engine
