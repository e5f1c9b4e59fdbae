// The sampling rule: which token a logits row and a uniform draw pick. This is the reference
// the device kernel (kernels/cuda/sampling.h) implements and the engine's Sampler applies.
//
// The rule, for a row of `vocab` logits and SampleRowParams p:
//  1. Repetition penalty (CTRL/HF): each id of `penalty_ids` has its logit divided by p.penalty
//     when positive, else multiplied by it (in place; the ids must be distinct: penalizing an
//     id twice would compound). Ids outside [0, vocab) are skipped.
//  2. temperature 0: the largest logit's id, the lowest on ties (std::max_element).
//  3. Candidates: every id in id order when neither top_k nor top_p cuts (top_k 0, top_p 1);
//     else the ids by descending logit (ties: lower id first), cut to min(top_k, vocab) when
//     top_k > 0.
//  4. Weights exp((logit - max logit of the row) / temperature), in double.
//  5. Nucleus (top_p < 1): the shortest prefix of the candidates whose share of their total
//     weight reaches top_p (at least one).
//  6. target = u * (the nucleus's weight); the token is the first candidate whose cumulative
//     weight exceeds target (the nucleus's last if rounding leaves none).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/sample_row.h"

namespace nibble::kernels::cpu {

// Reusable buffers of SampleRow, so that a caller sampling token after token allocates once.
struct SampleScratch {
  std::vector<int32_t> order;  // candidate ids
  std::vector<double> weights;
};

// The token the rule above picks from `logits` (the penalized ids rewritten in place).
// Single-threaded; `logits` non-empty.
int32_t SampleRow(std::span<float> logits, const SampleRowParams& params,
                  std::span<const int32_t> penalty_ids, SampleScratch& scratch);

}  // namespace nibble::kernels::cpu
