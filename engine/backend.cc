#include "engine/backend.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/sampling.h"

namespace nibble::engine {

absl::Status CheckTokenIds(std::span<const int32_t> tokens, int64_t vocab) {
  for (int32_t token : tokens) {
    if (token < 0 || token >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", token, " is outside the vocabulary of ", vocab));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckBatchSpans(std::span<const BatchSpan> spans, int64_t vocab,
                             int64_t block_seq_len, int64_t usable_blocks) {
  if (spans.empty()) return absl::InvalidArgumentError("ForwardBatch with no spans");
  for (size_t s = 0; s < spans.size(); ++s) {
    const BatchSpan& span = spans[s];
    if (span.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("span ", s, " has no tokens"));
    }
    if (auto status = CheckTokenIds(span.tokens, vocab); !status.ok()) return status;
    if (span.start < 0) {
      return absl::InvalidArgumentError(absl::StrCat("span ", s, " starts at ", span.start));
    }
    const int64_t end = span.start + static_cast<int64_t>(span.tokens.size());
    const int64_t blocks = (end + block_seq_len - 1) / block_seq_len;
    if (static_cast<int64_t>(span.block_table.size()) < blocks) {
      return absl::InvalidArgumentError(absl::StrCat(
          "span ", s, " reaches position ", end - 1, " but its block table has ",
          span.block_table.size(), " blocks of ", block_seq_len, " tokens"));
    }
    for (int64_t b = 0; b < blocks; ++b) {
      if (span.block_table[b] < 0 || span.block_table[b] >= usable_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("span ", s, " names block ",
                                                       span.block_table[b],
                                                       " outside the usable pool of ",
                                                       usable_blocks));
      }
    }
    const kernels::SampleRowParams& p = span.sampling;
    // The Sampler's own ranges (ValidateSamplingParams), and a draw in [0, 1).
    if (span.sample && !(p.u >= 0.0 && p.u < 1.0 && p.temperature >= 0.0f &&
                         std::isfinite(p.temperature) && p.top_k >= 0 && p.top_p > 0.0f &&
                         p.top_p <= 1.0f && p.repetition_penalty > 0.0f &&
                         std::isfinite(p.repetition_penalty))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "span ", s, " samples with temperature ", p.temperature, ", top_k ", p.top_k,
          ", top_p ", p.top_p, ", repetition_penalty ", p.repetition_penalty, ", u ", p.u));
    }
  }
  return absl::OkStatus();
}

void TakeSampledRows(std::span<const BatchSpan> spans, int64_t vocab, std::vector<float>& logits,
                     std::vector<int32_t>& sampled_out) {
  sampled_out.clear();
  kernels::cpu::SampleScratch scratch;
  size_t kept = 0, row = 0;
  for (const BatchSpan& span : spans) {
    if (!span.logits) continue;
    float* begin = logits.data() + row * vocab;
    if (span.sample) {
      sampled_out.push_back(kernels::cpu::SampleRow(std::span<float>(begin, vocab), span.sampling,
                                                    span.penalty_ids, scratch));
    } else {
      if (kept != row) std::copy_n(begin, vocab, logits.data() + kept * vocab);
      ++kept;
    }
    ++row;
  }
  logits.resize(kept * vocab);
}

absl::Status CheckSequenceCapacity(int64_t capacity) {
  if (capacity <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("sequence capacity ", capacity,
                                                   " must be positive"));
  }
  return absl::OkStatus();
}

absl::Status CheckForward(const SequenceState& sequence, std::span<const int32_t> tokens,
                          int64_t vocab) {
  if (tokens.empty()) return absl::InvalidArgumentError("no tokens to run");
  if (auto status = CheckTokenIds(tokens, vocab); !status.ok()) return status;
  const int64_t end = sequence.length() + static_cast<int64_t>(tokens.size());
  if (end > sequence.capacity()) {
    return absl::OutOfRangeError(absl::StrCat("sequence of ", end,
                                              " tokens exceeds its capacity of ",
                                              sequence.capacity()));
  }
  return absl::OkStatus();
}

absl::Status CheckKvCacheShape(int64_t num_blocks, int32_t block_seq_len) {
  if (num_blocks <= 0 || block_seq_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV cache of ", num_blocks, " blocks of ",
                                                   block_seq_len,
                                                   " tokens: both must be positive"));
  }
  return absl::OkStatus();
}

absl::Status CheckKvCacheGrowth(int64_t num_blocks, int64_t pool_blocks) {
  if (num_blocks > pool_blocks) {
    return absl::OutOfRangeError(absl::StrCat("cannot grow the KV cache to ", num_blocks,
                                              " blocks: the pool has ", pool_blocks));
  }
  return absl::OkStatus();
}

}  // namespace nibble::engine
