#include "kernels/cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace nibble::kernels::cpu {

int32_t SampleRow(std::span<float> logits, const SampleRowParams& params,
                  std::span<const int32_t> penalty_ids, SampleScratch& scratch) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  if (params.repetition_penalty != 1.0f) {
    for (int32_t id : penalty_ids) {
      if (id < 0 || id >= vocab) continue;
      float& logit = logits[id];
      logit = logit > 0 ? logit / params.repetition_penalty : logit * params.repetition_penalty;
    }
  }
  if (params.temperature == 0.0f) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }

  // Candidates: every id in id order when nothing is cut (no sort: sorting a 100k vocabulary
  // costs milliseconds per token), else by descending logit (ties: lower id first), cut to
  // top_k.
  std::vector<int32_t>& order = scratch.order;
  order.resize(vocab);
  std::iota(order.begin(), order.end(), 0);
  int32_t keep = vocab;
  if (params.top_k > 0 || params.top_p < 1.0f) {
    auto by_logit = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    if (params.top_k > 0) {
      keep = std::min(params.top_k, vocab);
      std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_logit);
    } else {
      std::sort(order.begin(), order.end(), by_logit);
    }
    order.resize(keep);
  }

  // Softmax at the temperature, in double.
  std::vector<double>& probs = scratch.weights;
  probs.resize(keep);
  const double max_logit = *std::max_element(logits.begin(), logits.end());
  double total = 0;
  for (int32_t i = 0; i < keep; ++i) {
    probs[i] = std::exp((logits[order[i]] - max_logit) / params.temperature);
    total += probs[i];
  }
  // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
  int32_t nucleus = keep;
  if (params.top_p < 1.0f) {
    double mass = 0;
    for (int32_t i = 0; i < keep; ++i) {
      mass += probs[i] / total;
      if (mass >= params.top_p) {
        nucleus = i + 1;
        break;
      }
    }
  }
  double nucleus_total = 0;
  for (int32_t i = 0; i < nucleus; ++i) nucleus_total += probs[i];
  const double target = params.u * nucleus_total;
  double cumulative = 0;
  for (int32_t i = 0; i < nucleus; ++i) {
    cumulative += probs[i];
    if (target < cumulative) return order[i];
  }
  return order[nucleus - 1];
}

}  // namespace nibble::kernels::cpu
