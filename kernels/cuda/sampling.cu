#include "kernels/cuda/sampling.h"

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "kernels/cuda/check.h"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Candidates that fit in shared memory (as value and id): past this, passes read the row.
constexpr int kCompactCapacity = 2048;
// Fixed-point weights: exp(...) <= 1 becomes an integer of 2^-44 units, and 2^19 of them
// (kSampleRowsMaxVocab) sum to at most 2^63: inside an unsigned 64-bit sum.
constexpr double kWeightScale = 0x1p44;
// 11-bit digits: the float's sign, exponent and 2 mantissa bits first, so that even the first
// pass spreads a row over many bins; the value is known after 3 passes (33 bits), the id
// (ties only) after 3 more.
constexpr int kRadixBits = 11;
constexpr int kBins = 1 << kRadixBits;
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int kFirstShift = 64 - kRadixBits;  // then 42, 31, 20, 9, and 0 (overlapping)

// The candidates' order as one integer: descending logit, then ascending id, is descending
// key. The float's bits are mapped so that unsigned order is numeric order (-0 as +0, since
// the host's comparison finds them equal); the id goes in inverted so that the lower id is the
// larger key. Keys are distinct, so a selection by key always ends on one element.
__device__ __forceinline__ uint64_t Key(float value, int id) {
  uint32_t bits = __float_as_uint(value);
  if (bits == 0x80000000u) bits = 0;
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(id));
}

__device__ __forceinline__ int IdOfKey(uint64_t key) {
  return static_cast<int>(~static_cast<uint32_t>(key));
}

struct Shared {
  unsigned long long bin_weight[kBins];
  unsigned int bin_count[kBins];
  unsigned long long partial[kWarps];  // block reductions and prefix sums
  unsigned int partial_count[kWarps];
  double warp_weight[kWarps];          // the id-order path
  // A selection pass's outcome, written by the thread whose bins cross the threshold.
  int bin;
  unsigned long long above_weight;
  unsigned int above_count;
  unsigned long long key;
  double target;
  int chosen_warp;
  int id;
  int candidates;
  float candidate_value[kCompactCapacity];
  int candidate_id[kCompactCapacity];
};

// Loads a thread of a full-row pass issues before using them (a pass is ~vocab / kThreads
// loads a thread). Measured 7-10 % faster than one at a time (NOTES.md, sampling, run 31):
// loads were not what bound the passes; the double-precision weights and the bins' atomics
// were.
constexpr int kRowLoadsInFlight = 8;

// The elements of a row, in global memory or copied to shared memory; the order a thread sees
// them in does not matter to any caller (sums are of integers, or, in SampleInIdOrder, not
// taken through here).
struct RowElements {
  const float* row;
  int vocab;
  template <class F>
  __device__ void ForEach(F&& f) const {
    int i = threadIdx.x;
    for (; i + (kRowLoadsInFlight - 1) * kThreads < vocab; i += kRowLoadsInFlight * kThreads) {
      float v[kRowLoadsInFlight];
#pragma unroll
      for (int u = 0; u < kRowLoadsInFlight; ++u) v[u] = row[i + u * kThreads];
#pragma unroll
      for (int u = 0; u < kRowLoadsInFlight; ++u) f(v[u], i + u * kThreads);
    }
    for (; i < vocab; i += kThreads) f(row[i], i);
  }
};

// The largest key of a row (its maximum, the lowest id among equal ones): every row's first
// pass, and all of a greedy row's. One block reads the whole row, so the loads it keeps in
// flight set its speed: where the row is 16-byte aligned, 16-byte loads, four in flight per
// thread (not through the read-only path: the penalty step may have just written the row).
__device__ uint64_t RowMaxKey(const float* row, int vocab) {
  uint64_t best = 0;
  const auto take = [&](float value, int id) {
    const uint64_t key = Key(value, id);
    best = key > best ? key : best;
  };
  const auto take4 = [&](const float4& v, int i4) {
    take(v.x, 4 * i4);
    take(v.y, 4 * i4 + 1);
    take(v.z, 4 * i4 + 2);
    take(v.w, 4 * i4 + 3);
  };
  int scalar_from = 0;
  if (reinterpret_cast<uintptr_t>(row) % 16 == 0) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const int n4 = vocab / 4;
    int i = threadIdx.x;
    for (; i + 3 * kThreads < n4; i += 4 * kThreads) {
      float4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = row4[i + u * kThreads];
#pragma unroll
      for (int u = 0; u < 4; ++u) take4(v[u], i + u * kThreads);
    }
    for (; i < n4; i += kThreads) take4(row4[i], i);
    scalar_from = 4 * n4;
  }
  for (int i = scalar_from + threadIdx.x; i < vocab; i += kThreads) take(row[i], i);
  return best;
}

struct CompactElements {
  const float* values;
  const int* ids;
  int count;
  template <class F>
  __device__ void ForEach(F&& f) const {
    for (int i = threadIdx.x; i < count; i += kThreads) f(values[i], ids[i]);
  }
};

struct CountWeight {
  __device__ unsigned long long operator()(float) const { return 1; }
};

// The host's weight exp((logit - max) / temperature) in double, as an integer of 2^-44.
struct FixedWeight {
  double max_logit;
  double temperature;
  __device__ unsigned long long operator()(float value) const {
    return __double2ull_rn(exp((static_cast<double>(value) - max_logit) / temperature) *
                           kWeightScale);
  }
};

// Every thread gets op over the block's values. Shuffles in a fixed pattern, then the warps'
// results in warp order: the same answer on every run.
template <class Op>
__device__ unsigned long long BlockReduce(unsigned long long v, Op op, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  if (threadIdx.x % 32 == 0) sh.partial[threadIdx.x / 32] = v;
  __syncthreads();
  unsigned long long result = sh.partial[0];
  for (int w = 1; w < kWarps; ++w) result = op(result, sh.partial[w]);
  __syncthreads();  // partial is reused
  return result;
}

struct Sum {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a + b;
  }
};
struct Max {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a > b ? a : b;
  }
};
struct Min {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a < b ? a : b;
  }
};

// word += v for a 64-bit word in shared memory, with 32-bit atomics. A 64-bit atomicAdd on
// shared memory compiles for sm_90 to a load / add / compare-and-store loop. On the few
// crowded bins of a selection's first digit (most of a row in a few dozen bins) those loops
// retried one another: top-k 40 took 258 us a launch, now 77, and top-p 0.9 328 -> 177
// (NOTES.md, sampling, run 33). The native 32-bit add returns the low word's old value, so its
// carry into the high word is known exactly. Once every add is done (a barrier), the word
// (little-endian halves) holds the exact sum; a row's total is at most 2^63 (2^19 weights of
// at most 2^44).
__device__ __forceinline__ void SharedAdd64(unsigned long long* word, unsigned long long v) {
  unsigned int* halves = reinterpret_cast<unsigned int*>(word);
  const unsigned int lo = static_cast<unsigned int>(v);
  const unsigned int old = atomicAdd(&halves[0], lo);
  const unsigned int hi = static_cast<unsigned int>(v >> 32) + (old + lo < old ? 1u : 0u);
  if (hi != 0) atomicAdd(&halves[1], hi);
}

struct Selection {
  bool found;
  uint64_t key;
  unsigned long long through_weight;  // the weight of the elements up to and including it
  unsigned int through_count;
};

// Among the elements whose key is >= floor, taken in descending key order (the host's
// candidate order), the first at which the running sum of `weight` reaches `threshold`
// (exceeds it when `strict`). Radix descent over the key, 11 bits at a time: each pass makes a
// histogram of the elements that share the bits found so far, and a prefix sum over the bins
// finds the one where the running sum crosses; it stops once that bin holds one element. The weights are
// integers, so the sums, and the answer, do not depend on the order threads add them in.
// Not found: the weights sum short of the threshold.
template <class Elements, class Weight>
__device__ Selection Select(const Elements& elements, uint64_t floor, Weight weight,
                            double threshold, bool strict, Shared& sh) {
  uint64_t prefix = 0;
  unsigned long long above = 0;
  unsigned int above_count = 0;
  uint64_t known = 0;  // the key bits found so far
  // A count selection (top-k) weighs every element 1: its bin weights are its bin counts, so
  // it adds only the counts and copies them over before the scan.
  constexpr bool kCountsAreWeights = std::is_same_v<Weight, CountWeight>;
  for (int shift = kFirstShift;; shift = shift > kRadixBits ? shift - kRadixBits : 0) {
    for (int b = threadIdx.x; b < kBins; b += kThreads) {
      sh.bin_weight[b] = 0;
      sh.bin_count[b] = 0;
    }
    if (threadIdx.x == 0) sh.bin = -1;
    __syncthreads();
    // Runs of one bin are added at once: in the first pass much of a row falls in a few
    // dozen bins, and one shared atomic per element there would serialize on them. Elements
    // of weight 0 are left out: they rank below any element of positive weight, so no
    // threshold can stop on them, and they would only add contention.
    int run_bin = -1;
    unsigned long long run_weight = 0;
    unsigned int run_count = 0;
    elements.ForEach([&](float value, int id) {
      const uint64_t key = Key(value, id);
      if (key < floor || (key & known) != prefix) return;
      const unsigned long long w = weight(value);
      if (w == 0) return;
      const int bin = static_cast<int>((key >> shift) & (kBins - 1));
      if (bin != run_bin) {
        if (run_count > 0) {
          if constexpr (!kCountsAreWeights) SharedAdd64(&sh.bin_weight[run_bin], run_weight);
          atomicAdd(&sh.bin_count[run_bin], run_count);
        }
        run_bin = bin;
        run_weight = 0;
        run_count = 0;
      }
      run_weight += w;
      ++run_count;
    });
    if (run_count > 0) {
      if constexpr (!kCountsAreWeights) SharedAdd64(&sh.bin_weight[run_bin], run_weight);
      atomicAdd(&sh.bin_count[run_bin], run_count);
    }
    __syncthreads();
    if constexpr (kCountsAreWeights) {
      for (int b = threadIdx.x; b < kBins; b += kThreads) sh.bin_weight[b] = sh.bin_count[b];
      __syncthreads();
    }
    // The running sums in descending bin order: thread t holds bins kBins - 1 - 2t and
    // kBins - 2 - 2t; a block-wide prefix sum over the threads; the one thread whose range
    // crosses the threshold names the bin.
    {
      const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
      const int first = kBins - 1 - kBinsPerThread * threadIdx.x;
      unsigned long long mine = 0;
      unsigned int mine_count = 0;
      for (int j = 0; j < kBinsPerThread; ++j) {
        mine += sh.bin_weight[first - j];
        mine_count += sh.bin_count[first - j];
      }
      unsigned long long incl = mine;
      unsigned int incl_count = mine_count;
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long w = __shfl_up_sync(kFullMask, incl, o);
        const unsigned int c = __shfl_up_sync(kFullMask, incl_count, o);
        if (lane >= o) {
          incl += w;
          incl_count += c;
        }
      }
      if (lane == 31) {
        sh.partial[warp] = incl;
        sh.partial_count[warp] = incl_count;
      }
      __syncthreads();
      unsigned long long before = above;
      unsigned int before_count = above_count;
      for (int w = 0; w < warp; ++w) {
        before += sh.partial[w];
        before_count += sh.partial_count[w];
      }
      auto reached = [&](unsigned long long sum) {
        const double s = static_cast<double>(sum);
        return strict ? s > threshold : s >= threshold;
      };
      unsigned long long sum = before + incl - mine;
      unsigned int count = before_count + incl_count - mine_count;
      if (!reached(sum) && reached(before + incl)) {
        for (int j = 0; j < kBinsPerThread; ++j) {
          const int b = first - j;
          if (sh.bin_count[b] > 0 && reached(sum + sh.bin_weight[b])) {
            sh.bin = b;
            sh.above_weight = sum;
            sh.above_count = count;
            break;
          }
          sum += sh.bin_weight[b];
          count += sh.bin_count[b];
        }
      }
    }
    __syncthreads();
    const int bin = sh.bin;
    if (bin < 0) {
      __syncthreads();
      return {false, 0, 0, 0};
    }
    prefix |= static_cast<uint64_t>(bin) << shift;  // the last digit overlaps known bits
    known |= static_cast<uint64_t>(kBins - 1) << shift;
    above = sh.above_weight;
    above_count = sh.above_count;
    const unsigned int in_bin = sh.bin_count[bin];
    const unsigned long long bin_weight = sh.bin_weight[bin];
    __syncthreads();  // everyone has read the pass's outcome before the next pass clears it
    if (shift == 0) return {true, prefix, above + bin_weight, above_count + 1};
    if (in_bin == 1) {
      // The bin's only element is the answer: one pass finds its whole key.
      elements.ForEach([&](float value, int id) {
        const uint64_t key = Key(value, id);
        if (key >= floor && (key & known) == prefix && weight(value) != 0) sh.key = key;
      });
      __syncthreads();
      const uint64_t key = sh.key;
      __syncthreads();
      return {true, key, above + bin_weight, above_count + 1};
    }
  }
}

// Copies the elements with key >= floor (at most kCompactCapacity of them) to shared memory.
__device__ CompactElements Compact(const RowElements& all, uint64_t floor, Shared& sh) {
  if (threadIdx.x == 0) sh.candidates = 0;
  __syncthreads();
  all.ForEach([&](float value, int id) {
    if (Key(value, id) < floor) return;
    const int slot = atomicAdd(&sh.candidates, 1);
    if (slot < kCompactCapacity) {
      sh.candidate_value[slot] = value;
      sh.candidate_id[slot] = id;
    }
  });
  __syncthreads();
  const int count = min(sh.candidates, kCompactCapacity);
  return {sh.candidate_value, sh.candidate_id, count};
}

// Steps 5 and 6 of the rule over the candidates (the elements with key >= floor).
template <class Elements>
__device__ int SampleCandidates(const Elements& candidates, uint64_t floor,
                                const FixedWeight& weight, const SampleRowParams& p,
                                const RowElements& all, Shared& sh) {
  unsigned long long mine = 0;
  candidates.ForEach([&](float value, int id) {
    if (Key(value, id) >= floor) mine += weight(value);
  });
  const unsigned long long total = BlockReduce(mine, Sum{}, sh);
  uint64_t nucleus_floor = floor;
  unsigned long long nucleus_weight = total;
  if (p.top_p < 1.0f) {
    const Selection boundary = Select(candidates, floor, weight,
                                      static_cast<double>(p.top_p) * static_cast<double>(total),
                                      /*strict=*/false, sh);
    if (boundary.found) {
      nucleus_floor = boundary.key;
      nucleus_weight = boundary.through_weight;
      if constexpr (std::is_same_v<Elements, RowElements>) {
        if (boundary.through_count <= kCompactCapacity) {
          return SampleCandidates(Compact(all, nucleus_floor, sh), nucleus_floor, weight,
                                  SampleRowParams{p.u, p.temperature, p.top_k, 1.0f, 1.0f},
                                  all, sh);
        }
      }
    }
  }
  const double target = p.u * static_cast<double>(nucleus_weight);
  const Selection token = Select(candidates, nucleus_floor, weight, target, /*strict=*/true, sh);
  if (token.found) return IdOfKey(token.key);
  // Rounding left the target at the total: the host then takes the last candidate.
  unsigned long long last = ~0ull;
  candidates.ForEach([&](float value, int id) {
    const uint64_t key = Key(value, id);
    if (key >= nucleus_floor && key < last) last = key;
  });
  return IdOfKey(BlockReduce(last, Min{}, sh));
}

// Sampling with nothing cut: every id in id order, weights in double. Each warp sums a
// contiguous range of ids (lanes strided, then a fixed butterfly); thread 0 walks the warps'
// sums in order to the one where the running sum passes the target; that warp walks its range
// 32 ids at a time with a prefix sum.
__device__ int SampleInIdOrder(const float* row, int vocab, double max_logit,
                               const SampleRowParams& p, Shared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int span = (vocab + kWarps - 1) / kWarps;
  const int begin = min(warp * span, vocab), end = min(begin + span, vocab);
  const double temperature = p.temperature;
  auto weight = [&](float value) {
    return exp((static_cast<double>(value) - max_logit) / temperature);
  };
  // The range's sum in id order, as before, with kRowLoadsInFlight loads issued ahead of the
  // additions (the same additions in the same order: the same double).
  double sum = 0;
  int at = begin + lane;
  for (; at + (kRowLoadsInFlight - 1) * 32 < end; at += kRowLoadsInFlight * 32) {
    float v[kRowLoadsInFlight];
#pragma unroll
    for (int u = 0; u < kRowLoadsInFlight; ++u) v[u] = row[at + u * 32];
#pragma unroll
    for (int u = 0; u < kRowLoadsInFlight; ++u) sum += weight(v[u]);
  }
  for (; at < end; at += 32) sum += weight(row[at]);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
  if (lane == 0) sh.warp_weight[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int w = 0; w < kWarps; ++w) total += sh.warp_weight[w];
    const double target = p.u * total;
    double before = 0;
    sh.chosen_warp = -1;
    sh.id = vocab - 1;  // the host's answer when rounding leaves the target at the total
    for (int w = 0; w < kWarps; ++w) {
      if (target < before + sh.warp_weight[w]) {
        sh.chosen_warp = w;
        break;
      }
      before += sh.warp_weight[w];
    }
    sh.target = target - before;
  }
  __syncthreads();
  if (warp == sh.chosen_warp) {
    const double target = sh.target;
    double running = 0;
    int id = end - 1;  // this range's sums in another order may end just short of the target
    // Each 32 ids' logits are loaded while the previous 32 are summed: the walk is one warp.
    float next = begin + lane < end ? row[begin + lane] : 0.0f;
    for (int base = begin; base < end; base += 32) {
      const int i = base + lane;
      const float value = next;
      if (i + 32 < end) next = row[i + 32];
      double incl = i < end ? weight(value) : 0.0;
      for (int o = 1; o < 32; o <<= 1) {
        const double up = __shfl_up_sync(kFullMask, incl, o);
        if (lane >= o) incl += up;
      }
      const unsigned passed = __ballot_sync(kFullMask, i < end && target < running + incl);
      if (passed != 0) {
        id = base + __ffs(passed) - 1;
        break;
      }
      running += __shfl_sync(kFullMask, incl, 31);
    }
    if (lane == 0) sh.id = id;
  }
  __syncthreads();
  const int id = sh.id;
  __syncthreads();
  return id;
}

__global__ void __launch_bounds__(kThreads, 1)
    SampleRowsKernel(float* logits, int vocab, int64_t row_stride,
                     const SampleRowParams* __restrict__ params,
                     const int32_t* __restrict__ penalty_offsets,
                     const int32_t* __restrict__ penalty_ids, int32_t* out_ids) {
  __shared__ Shared sh;
  const int64_t r = blockIdx.x;
  float* row = logits + r * row_stride;
  const SampleRowParams p = params[r];
  if (p.repetition_penalty != 1.0f) {
    for (int i = penalty_offsets[r] + threadIdx.x; i < penalty_offsets[r + 1]; i += kThreads) {
      const int id = penalty_ids[i];
      if (id < 0 || id >= vocab) continue;
      const float v = row[id];
      row[id] = v > 0 ? v / p.repetition_penalty : v * p.repetition_penalty;
    }
    __syncthreads();  // the block's writes to global memory are visible to it after this
  }
  const RowElements all{row, vocab};
  const int argmax = IdOfKey(BlockReduce(RowMaxKey(row, vocab), Max{}, sh));
  if (p.temperature == 0.0f) {
    if (threadIdx.x == 0) out_ids[r] = argmax;
    return;
  }
  const double max_logit = row[argmax];
  int id;
  if (p.top_k <= 0 && p.top_p >= 1.0f) {
    id = SampleInIdOrder(row, vocab, max_logit, p, sh);
  } else {
    const FixedWeight weight{max_logit, static_cast<double>(p.temperature)};
    const int keep = p.top_k > 0 ? min(p.top_k, vocab) : vocab;
    uint64_t floor = 0;
    if (keep < vocab) {
      floor = Select(all, 0, CountWeight{}, static_cast<double>(keep), /*strict=*/false, sh).key;
    }
    if (keep <= kCompactCapacity) {
      id = SampleCandidates(Compact(all, floor, sh), floor, weight, p, all, sh);
    } else {
      id = SampleCandidates(all, floor, weight, p, all, sh);
    }
  }
  if (threadIdx.x == 0) out_ids[r] = id;
}

}  // namespace

cudaError_t SampleRows(float* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                       const SampleRowParams* params, const int32_t* penalty_offsets,
                       const int32_t* penalty_ids, int32_t* out_ids, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || vocab < 1 || vocab > kSampleRowsMaxVocab ||
      row_stride < vocab) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  SampleRowsKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, static_cast<int>(vocab), row_stride, params, penalty_offsets, penalty_ids,
      out_ids);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

}  // namespace nibble::kernels::cuda
