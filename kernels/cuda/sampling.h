// Sampling on the GPU: one token per logits row by the rule of kernels/cpu/sampling.h
// (repetition penalty, temperature, top-k, top-p, the host's uniform draw), so that a sampled
// request's logits never leave the device; only the token ids do.
//
// Ownership: the kernel owns nothing and allocates nothing (each row's state lives in shared
// memory: no workspace); every pointer is device memory the caller keeps alive until the
// stream has run the work. No host synchronization: a launch can be captured in a CUDA graph,
// with the parameters read from device memory at replay.
// Thread safety: none needed; the launch goes on `stream` and returns at once.
// Errors: cudaErrorInvalidValue for bad sizes (below); else the launch's error, printed with
// file:line (kernels/cuda/check.h).
//
// Agreement with the host rule, given the same fp32 logits and the same u:
//  - greedy rows (temperature 0): always the same id;
//  - sampled rows: the same id unless the host's cumulative weight and the device's straddle
//    the target (or the nucleus boundary) within rounding. The device sums weights in another
//    order than the host: in double in id order when nothing is cut; as integers of 2^-44
//    (exp(...) * 2^44 rounded, exactly summed, so the result does not depend on the order
//    the threads add in) when top-k or top-p cut. Each weight is within 2^-45 of the host's
//    double, so a disagreement needs the target within about vocab * 2^-45 of a boundary of
//    total weight >= 1 (the row's maximum weighs 1). tests/gpu/sampling_test.cc counts them.
//  - rows must be free of NaN, and not all -inf (the host's answer is then arbitrary too).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/sample_row.h"

namespace nibble::kernels::cuda {

// The largest vocabulary SampleRows takes (the integer weights of a row, each at most 2^44,
// must fit an unsigned 64-bit sum).
inline constexpr int64_t kSampleRowsMaxVocab = int64_t{1} << 19;

// out_ids[r] = the token kernels/cpu/sampling.h's SampleRow picks from row r of `logits`
// (`rows` rows of `vocab` floats, row stride `row_stride` floats) with params[r] and the
// penalty ids penalty_ids[penalty_offsets[r] .. penalty_offsets[r + 1]) (distinct ids; ids
// outside [0, vocab) are skipped). The penalized logits are rewritten in place, as on the host.
// One block per row. Sizes: rows >= 0, 1 <= vocab <= kSampleRowsMaxVocab, row_stride >= vocab;
// penalty_offsets holds rows + 1 non-decreasing entries.
//
// Cost per row: one pass over the row for the maximum; greedy stops there. Sampling with
// nothing cut: two more passes (weights summed per warp in id order, then one warp walks the
// chosen warp's range). With top-k or top-p: a radix selection over the 64-bit key (logit,
// then id) finds the top_k-th candidate, the nucleus boundary and the sampled token, a few
// passes each; once the candidates number at most 2048 (top_k <= 2048, or a nucleus that
// small) they are copied to shared memory and the remaining passes run there. Large top_k
// (up to the vocabulary) and nuclei of thousands of tokens take the slower full-row passes.
// Where the time goes (tests/gpu/NOTES.md, sampling, runs 31 and 33; 92,544 logits on an
// H100): one multiprocessor per row. Each pass that needs weights recomputes them as
// double-precision exps (~50 us such a pass, far longer where FP64 is slow, as on a Jetson's
// GPU). The selections' bins take 32-bit shared atomics only (64-bit ones are
// compare-and-store loops that crowded bins made retry). Per launch: greedy 12 us,
// temperature 74, top-k 40 77-84, top-p 0.9 177-300, at any batch up to the card's
// multiprocessors.
cudaError_t SampleRows(float* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                       const SampleRowParams* params, const int32_t* penalty_offsets,
                       const int32_t* penalty_ids, int32_t* out_ids, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
