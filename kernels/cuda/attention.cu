// Paged decode attention (attention.h): a split kernel and a combine kernel (or, on sm_90 with
// 2-16 splits, the split kernel alone, its blocks combining inside a cluster).
//
// DecodeSplitKernel<D, MAXG, EARLY>: 128 threads (4 warps) per block; the block owns one
// sequence, one kv head, up to MAXG of its query heads and one split of the positions. A
// position's row of one kv head (D halves) is read by LPT = D / 8 lanes, one 16-byte load each;
// a warp covers TPW = 32 / LPT positions per load instruction and the block TPB = 4 * TPW, with
// U = 4 such steps' loads issued before their use (a round; EARLY, for splits of one round: the
// round's keys and values are both requested first thing, before q is staged). Three phases:
//   1. scores: each lane's 8 elements of K dotted with its slice of every query head (q held in
//      registers, pre-scaled by 1/sqrt(D)), summed over the LPT lanes by shuffles, into shared
//      memory scores[g][t] (fp32);
//   2. softmax per query head by one warp: max, exp(s - max) in place, sum (fp32);
//   3. values: each lane accumulates p[g][t] * V[t][its 8 dims] for every query head in fp32
//      registers; shuffles over the TPW positions of a warp and shared memory over the 4 warps.
// Each K and V element is read once per (sequence, kv head) when heads / kv_heads <= 8 (more:
// once per 8 query heads). Instantiated: D in {8, 64, 128} x MAXG in {4, 8} (4 when the group
// is <= 4: the 7B and 1.8B shapes, the tiny model; 8 above), and EARLY for MAXG 4.
// ROPE (PagedDecodeAttentionWithRope): the new token's q, k and v come unrotated from the q/k/v
// product; each block rotates its query heads' q itself (the cos / sin of the token's position in
// shared memory), and the block whose split holds the new position rotates its kv head's key,
// uses that key and the value from shared memory for that position (the cache is not read
// there) and, if it is its kv head's first block, writes both into the cache: one kernel where
// RoPE and the split kernel were two, with the same roundings (rope_math.h), so the same bits.
// The cache is read through const __restrict__ pointers while that block writes into it: sound
// because no block reads the row being written (positions below len - 1 are other rows, the new
// one comes from shared memory), given the engine's invariant that slots[s] is position
// len - 1's row of sequence s and no other sequence's. Each block forms head_dim / 2 angles in
// double precision (slow on the Orin, but ~64 per block against the memory round trips).
// DecodeCombineKernel: one block per (sequence, query head): the splits' (max, sum, unnormalized
// output) rescaled to the common max, divided by the total sum, rounded to fp16.
// Prefill (PrefillKernel, tensor cores): its own comment further down.
#include "kernels/cuda/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include <cooperative_groups.h>
#include <cuda_fp16.h>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cp_async.h"
#include "kernels/cuda/dependent_launch.h"
#include "kernels/cuda/half8.h"
#include "kernels/cuda/rope_math.h"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kSplitGranule = 64;    // split sizes: multiples of this, or one shorter round
constexpr int kMaxSplitTokens = 512;  // scores of one split: MAXG * 512 floats of shared memory
constexpr int kMaxSplits = 4096;      // combine kernel's shared memory: one float per split
constexpr int kUnroll = 4;
// CLUSTER: the most splits of one (sequence, kv head) combined inside a thread block cluster
// (16: the H100's largest cluster, a non-portable size; the planner's limit, attention.h).
constexpr int kMaxClusterSplits = 16;

// Positions of one round of loads (kUnroll steps of the block's TPB) at head size D.
__host__ __device__ constexpr int RoundPositions(int d) { return kUnroll * kWarps * (32 / (d / 8)); }

// EARLY (splits of at most one round, MAXG = 4): the round's keys and values are both requested
// first thing, before q is staged, so that the block waits on memory three times in a row (the
// sequence length, the block table, then K and V together) instead of once more per phase.
// Only there: holding the values through the scores costs registers (4 blocks of 128 threads
// per SM instead of 5; at MAXG = 8 ptxas spilled), which longer splits, bound by bandwidth,
// pay for (run 22).
// The new token's unrotated q, k, v and where its key and value go (DecodeRopeInput, device
// types); last among the kernel's parameters, so that the kernels without ROPE keep theirs.
struct RopeArgs {
  const __half* q;
  int64_t q_stride;
  const __half* k;
  int64_t k_stride;
  const __half* v;
  int64_t v_stride;
  const int32_t* positions;
  const float* inv_freq;
  const int32_t* freq_index;
  const int32_t* slots;
  __half* keys;
  __half* values;
};

// Distributed shared memory (sm_90): the address of the same shared variable in the cluster's
// block `rank`, and loads from it. 32-bit addresses (mapa .u32), formed where they are used:
// cooperative_groups' map_shared_rank gives 64-bit generic ones, and ptxas hoisted all sixteen
// ranks' out of the loop (ten more registers).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t ClusterSmemAddress(const void* p, int rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(remote)
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(p))), "r"(rank));
  return remote;
}
__device__ __forceinline__ float LoadClusterFloat(uint32_t address) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(address));
  return v;
}
__device__ __forceinline__ float2 LoadClusterFloat2(uint32_t address) {
  float2 v;
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(address));
  return v;
}
#endif

// CLUSTER: the splits of one (sequence, kv head, chunk of up to MAXG query heads) are one
// thread block cluster along z, of max_splits blocks (grid.z), so that a block's rank in it is
// its split index. Each block leaves its unnormalized partial output (fp32, [MAXG][D], in the q
// staging area, free by then) and its (max, sum) per query head in its own shared memory; after
// a cluster barrier the cluster's blocks, empty splits included, combine them through
// distributed shared memory, each taking every (max_splits * kThreads)-th of the ng * D
// outputs, with DecodeCombineKernel's arithmetic in its order (the same bits).
// What it saves: the combine kernel's launch, its wait for the whole split grid, and the
// partial sums' round trip through the workspace; the o product's PDL wait then ends with the
// split kernel itself. A second barrier keeps every block (and its shared memory) alive until
// the others have read it. The max and sum of every (query head, split) are gathered into
// `staged` first, one remote load each, so that the per-output loops read them locally.
// Every block of a cluster reads the same sequence length, so all of them reach both barriers
// (or, for a length out of range, return before the first).
template <int D, int MAXG>
__device__ __forceinline__ void CombineInCluster(const float* part, const float2* ml,
                                                 float2* staged, int used_splits, int ng,
                                                 __half* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every block's part and ml written (barrier.cluster: release / acquire)
  for (int i = threadIdx.x; i < ng * used_splits; i += kThreads) {
    const int g = i / used_splits, split = i % used_splits;
    staged[g * kMaxClusterSplits + split] = LoadClusterFloat2(ClusterSmemAddress(ml + g, split));
  }
  __syncthreads();
  const int stride = static_cast<int>(cluster.num_blocks()) * kThreads;
  for (int e = static_cast<int>(cluster.block_rank()) * kThreads + threadIdx.x; e < ng * D; e += stride) {
    const float2* g_ml = staged + (e / D) * kMaxClusterSplits;
    float a[kMaxClusterSplits];  // every remote load issued before the first is used
#pragma unroll
    for (int i = 0; i < kMaxClusterSplits; ++i) {
      a[i] = i < used_splits ? LoadClusterFloat(ClusterSmemAddress(part + e, i)) : 0.0f;
    }
    float m = -INFINITY;
    for (int i = 0; i < used_splits; ++i) m = fmaxf(m, g_ml[i].x);
    float l = 0.0f, acc = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxClusterSplits; ++i) {
      if (i < used_splits) {
        const float w = expf(g_ml[i].x - m);
        l = fmaf(w, g_ml[i].y, l);
        acc = fmaf(w, a[i], acc);
      }
    }
    out[e] = __float2half_rn(acc * (1.0f / l));
  }
  cluster.sync();
#else
  __trap();  // the planner combines in clusters only where the kernel has sm_90 code
#endif
}

// The pipelined variants (!EARLY, MAXG 4; kPipelined below) are bound to 5 blocks of 128
// threads per multiprocessor (93-96 registers, no spills), the others to 4.
template <int D, int MAXG, bool EARLY, bool ROPE = false, bool CLUSTER = false>
__global__ void __launch_bounds__(kThreads, (!EARLY && MAXG <= 4) ? 5 : 4)
    DecodeSplitKernel(const __half* __restrict__ q, const __half* __restrict__ keys,
                      const __half* __restrict__ values, int64_t block_stride, int bsl,
                      const int32_t* __restrict__ tables, int64_t table_stride,
                      const int32_t* __restrict__ seq_lens, int heads, int kv_heads, int gchunks,
                      int split_tokens, int max_splits, int max_seq_len, float scale,
                      float* __restrict__ ws_acc, float2* __restrict__ ws_ml,
                      __half* __restrict__ out, RopeArgs rope) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (CLUSTER) {  // never planned below sm_90 (no clusters): no code for it there
    __trap();
    return;
  }
#endif
  AllowDependentLaunch();  // the o projection after it (kernels/cuda/dependent_launch.h)
  // ROPE waits for the kernel before it (the q/k/v product) only where it first reads what that
  // kernel writes (rope.q / k / v) or writes anything itself: first it reads what no kernel of
  // the step writes before it (the lengths and block tables, copied in before the step; the
  // cache rows of positions before the new token, written by earlier steps;
  // PagedDecodeAttentionWithRope's contract) and, EARLY, requests its first round of keys and
  // values: those three dependent round trips overlap the product's tail and its
  // grid-completion handoff instead of following them.
  if constexpr (!ROPE) WaitForPriorGrid();
  constexpr int LPT = D / 8;     // lanes per position row
  constexpr int TPW = 32 / LPT;  // positions per warp per load
  constexpr int TPB = kWarps * TPW;
  extern __shared__ float smem[];
  float* qs = smem;                            // [MAXG][D]
  float* scores = qs + MAXG * D;               // [MAXG][split_tokens]
  float* red = scores + MAXG * split_tokens;   // [kWarps - 1][MAXG][D]
  __shared__ float2 ml[MAXG];
  // ROPE: cos[D / 2], sin[D / 2]; the new token's rotated key and its value, fp16 (the cache's
  // rounding), read like a cache row (16-byte slices).
  __shared__ float rope_cs[ROPE ? D : 1];
  __shared__ __align__(16) __half new_k[ROPE ? D : 8];
  __shared__ __align__(16) __half new_v[ROPE ? D : 8];
  __shared__ float2 cluster_ml[CLUSTER ? MAXG * kMaxClusterSplits : 1];  // CombineInCluster's

  const int group = heads / kv_heads;
  const int kvh = blockIdx.x / gchunks;
  const int g0 = (blockIdx.x % gchunks) * MAXG;
  const int ng = min(MAXG, group - g0);
  const int seq = blockIdx.y, split = blockIdx.z;
  const int h0 = kvh * group + g0;  // the block's first query head
  const int64_t row0 = static_cast<int64_t>(seq) * heads + h0;
  const int len = seq_lens[seq];
  const int start = split * split_tokens;
  if (len < 1 || len > max_seq_len) {
    if constexpr (ROPE) WaitForPriorGrid();  // before the writes below
    // No combine kernel runs (one split, or the cluster's: every block returns here): say so.
    if (max_splits == 1 || (CLUSTER && split == 0)) {
      for (int i = threadIdx.x; i < ng * D; i += kThreads) out[row0 * D + i] = __ushort_as_half(0x7e00);
    }
    return;
  }
  const int used_splits = (len + split_tokens - 1) / split_tokens;
  if (start >= len) {  // an empty split: the combine counts only the used ones
    if constexpr (ROPE) WaitForPriorGrid();  // the combine writes out
    if constexpr (CLUSTER) CombineInCluster<D, MAXG>(qs, ml, cluster_ml, used_splits, ng, out + row0 * D);
    return;
  }
  const int n = min(len - start, split_tokens);
  // ROPE: the new token's index in this split (position len - 1), or -1 when another split
  // holds it.
  const int new_t = ROPE && len - 1 - start < n ? len - 1 - start : -1;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tw = lane / LPT, ds = (lane % LPT) * 8;
  const int64_t kv_dim = static_cast<int64_t>(kv_heads) * D;
  const int32_t* table = tables + static_cast<int64_t>(seq) * table_stride;
  const int64_t head_off = static_cast<int64_t>(kvh) * D + ds;
  // Offset of position start + t of this lane's slice, relative to keys / values.
  auto offset = [&](int t) {
    const int p = start + t;
    return static_cast<int64_t>(table[p / bsl]) * block_stride + static_cast<int64_t>(p % bsl) * kv_dim + head_off;
  };
  // This lane's slices of src (keys or values) at positions base + u * TPB + tw, u < kUnroll
  // (zeros past n): all kUnroll loads issued before any is used.
  // ROPE: position new_t's slice from shared memory (new_row: new_k or new_v) instead.
  auto load_slices = [&](const __half* __restrict__ src, const __half* new_row, int base,
                         uint4 (&r)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * TPB + tw;
      if (ROPE && t == new_t) {
        r[u] = *reinterpret_cast<const uint4*>(new_row + ds);
      } else {
        r[u] = t < n ? __ldg(reinterpret_cast<const uint4*>(src + offset(t))) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  static_assert(!EARLY || MAXG <= 4, "EARLY holds the values in registers: MAXG <= 4 only");
  // Splits of several rounds at MAXG 4 (bound by bandwidth: batches and contexts that fill the
  // card) keep the next round's keys or values in flight while a round is used. Left to
  // itself ptxas gave that 99-106 registers (4 blocks of 128 threads per multiprocessor, not
  // 5): 10 % faster at 1024 and 4096 positions x 16 sequences but 11 % slower at 16384 x 16
  // (~8 waves) and 19-47 % in large clusters. Under the 5-block bound (93-96 registers) it keeps
  // the first two gains and gives back the losses (16384 x 16 +2 % against one round at a
  // time; tests/gpu/NOTES.md runs 28 and 29). MAXG 8 has no room (118-125 registers already).
  constexpr bool kPipelined = !EARLY && MAXG <= 4;
  static_assert(RoundPositions(D) == kUnroll * TPB, "the planner's round is the kernel's");
  const int first = warp * TPW;
  uint4 k_first[kUnroll], v_first[kUnroll];
  if constexpr (EARLY) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = first + u * TPB + tw;
      k_first[u] = v_first[u] = make_uint4(0, 0, 0, 0);
      if (t < n && !(ROPE && t == new_t)) {  // ROPE: new_t's slices come after the staging
        const int64_t o = offset(t);
        k_first[u] = __ldg(reinterpret_cast<const uint4*>(keys + o));
        v_first[u] = __ldg(reinterpret_cast<const uint4*>(values + o));
      }
    }
  }

  if constexpr (ROPE) {
    WaitForPriorGrid();  // rope.q / k / v are the product's output
    // Loads first (q's pairs, the new key's pairs, the value), then the angles, so that the
    // loads' latency hides behind the double-precision reduction.
    constexpr int HALF = D / 2;
    constexpr int QP = (MAXG * HALF + kThreads - 1) / kThreads;  // q pairs per thread
    const __half* qrow = rope.q + seq * rope.q_stride + static_cast<int64_t>(h0) * D;
    float2 qp[QP];
#pragma unroll
    for (int p = 0; p < QP; ++p) {
      const int i = threadIdx.x + p * kThreads, g = i / HALF, j = i % HALF;
      qp[p] = i < ng * HALF ? make_float2(__half2float(qrow[g * D + j]), __half2float(qrow[g * D + HALF + j]))
                            : make_float2(0.0f, 0.0f);
    }
    const bool has_new = new_t >= 0;
    const bool stores = has_new && g0 == 0;  // one block per (sequence, kv head) writes the cache
    int64_t cache_row = 0;
    float2 kp = make_float2(0.0f, 0.0f);
    if (has_new) {
      const __half* krow = rope.k + seq * rope.k_stride + static_cast<int64_t>(kvh) * D;
      const __half* vrow = rope.v + seq * rope.v_stride + static_cast<int64_t>(kvh) * D;
      if (threadIdx.x < HALF) {
        kp = make_float2(__half2float(krow[threadIdx.x]), __half2float(krow[HALF + threadIdx.x]));
      }
      if (stores) {
        const int32_t slot = rope.slots[seq];
        cache_row = static_cast<int64_t>(slot / bsl) * block_stride +
                    static_cast<int64_t>(slot % bsl) * kv_dim + static_cast<int64_t>(kvh) * D;
      }
      for (int i = threadIdx.x; i < D; i += kThreads) {
        new_v[i] = vrow[i];
        if (stores) rope.values[cache_row + i] = vrow[i];
      }
    }
    const int position = rope.positions[seq];
    const float* f = rope.inv_freq + (rope.freq_index != nullptr ? static_cast<int64_t>(rope.freq_index[seq]) * HALF : 0);
    for (int i = threadIdx.x; i < HALF; i += kThreads) RopeCosSin(position, f[i], &rope_cs[i], &rope_cs[HALF + i]);
    __syncthreads();
#pragma unroll
    for (int p = 0; p < QP; ++p) {
      const int i = threadIdx.x + p * kThreads, g = i / HALF, j = i % HALF;
      if (i < ng * HALF) {
        // Rounded to fp16 as RoPE's in-place write rounds it, then scaled as below.
        const float2 r = RotatePair(qp[p].x, qp[p].y, rope_cs[j], rope_cs[HALF + j]);
        qs[g * D + j] = __half2float(__float2half_rn(r.x)) * scale;
        qs[g * D + HALF + j] = __half2float(__float2half_rn(r.y)) * scale;
      }
    }
    if (has_new && threadIdx.x < HALF) {
      const int j = threadIdx.x;
      const float2 r = RotatePair(kp.x, kp.y, rope_cs[j], rope_cs[HALF + j]);
      new_k[j] = __float2half_rn(r.x);
      new_k[HALF + j] = __float2half_rn(r.y);
      if (stores) {
        rope.keys[cache_row + j] = new_k[j];
        rope.keys[cache_row + HALF + j] = new_k[HALF + j];
      }
    }
    __syncthreads();
    if constexpr (EARLY) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (has_new && first + u * TPB + tw == new_t) {
          k_first[u] = *reinterpret_cast<const uint4*>(new_k + ds);
          v_first[u] = *reinterpret_cast<const uint4*>(new_v + ds);
        }
      }
    }
  } else {
    for (int i = threadIdx.x; i < ng * D; i += kThreads) qs[i] = __half2float(q[row0 * D + i]) * scale;
    __syncthreads();
  }

  // A phase's first round of keys or values into r: EARLY's, requested first thing; kPipelined's,
  // requested now; otherwise the phase's loop loads each round itself.
  const auto first_round = [&](const __half* __restrict__ src, const __half* new_row,
                               const uint4 (&early)[kUnroll], uint4 (&r)[kUnroll]) {
    if constexpr (EARLY) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) r[u] = early[u];
    } else if constexpr (kPipelined) {
      if (first < n) load_slices(src, new_row, first, r);
    }
  };

  // 1. Scores.
  {
    float qr[MAXG][8];
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
#pragma unroll
      for (int j = 0; j < 8; ++j) qr[g][j] = g < ng ? qs[g * D + ds + j] : 0.0f;
    // kPipelined: the next round's keys are requested before this round's are used.
    uint4 kr[kUnroll];
    first_round(keys, new_k, k_first, kr);
    for (int base = first; base < n; base += kUnroll * TPB) {  // warp-uniform
      if (!EARLY && !kPipelined) load_slices(keys, new_k, base, kr);
      uint4 kn[kPipelined ? kUnroll : 1];
      if constexpr (kPipelined) {
        if (base + kUnroll * TPB < n) load_slices(keys, new_k, base + kUnroll * TPB, kn);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * TPB >= n) break;  // warp-uniform
        const int t = base + u * TPB + tw;
        float k[8];
        Half8ToFloat(kr[u], k);
        float dot[MAXG];
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
          dot[g] = 0.0f;
          if (g < ng) {
#pragma unroll
            for (int j = 0; j < 8; ++j) dot[g] = fmaf(qr[g][j], k[j], dot[g]);
#pragma unroll
            for (int o = LPT / 2; o > 0; o >>= 1) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
          }
        }
        if (t < n && lane % LPT == 0) {
#pragma unroll
          for (int g = 0; g < MAXG; ++g)
            if (g < ng) scores[g * split_tokens + t] = dot[g];
        }
      }
      if constexpr (kPipelined) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) kr[u] = kn[u];
      }
    }
  }
  // kPipelined: the values' first round is requested before the softmax (it does not depend on
  // the scores), as EARLY requests it before the scores.
  uint4 vr[kUnroll];
  first_round(values, new_v, v_first, vr);
  __syncthreads();

  // 2. Softmax of each query head's scores (unnormalized: exp(s - max), and the sum).
  for (int g = warp; g < ng; g += kWarps) {
    float* s = scores + g * split_tokens;
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, s[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.0f;
    for (int i = lane; i < n; i += 32) {
      const float e = expf(s[i] - m);
      s[i] = e;
      l += e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) ml[g] = make_float2(m, l);
  }
  __syncthreads();

  // 3. Values.
  float acc[MAXG][8];
#pragma unroll
  for (int g = 0; g < MAXG; ++g)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
  for (int base = first; base < n; base += kUnroll * TPB) {
    if (!EARLY && !kPipelined) load_slices(values, new_v, base, vr);
    uint4 vn[kPipelined ? kUnroll : 1];
    if constexpr (kPipelined) {
      if (base + kUnroll * TPB < n) load_slices(values, new_v, base + kUnroll * TPB, vn);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * TPB + tw;
      if (t < n) {
        float v[8];
        Half8ToFloat(vr[u], v);
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
          if (g < ng) {
            const float p = scores[g * split_tokens + t];
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(p, v[j], acc[g][j]);
          }
        }
      }
    }
    if constexpr (kPipelined) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) vr[u] = vn[u];
    }
  }
  // Sum over the warp's positions (lanes with the same ds), then over the warps.
#pragma unroll
  for (int o = LPT; o < 32; o <<= 1)
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
      if (g < ng)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] += __shfl_xor_sync(0xffffffffu, acc[g][j], o);
  if (warp > 0 && lane < LPT) {
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
      if (g < ng)
#pragma unroll
        for (int j = 0; j < 8; ++j) red[((warp - 1) * MAXG + g) * D + ds + j] = acc[g][j];
  }
  __syncthreads();
  // Warp 0's first LPT lanes hold the block's sums (each lane its 8 dimensions).
  if (warp == 0 && lane < LPT) {
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (g >= ng) break;
      float o[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        o[j] = acc[g][j];
#pragma unroll
        for (int w = 0; w < kWarps - 1; ++w) o[j] += red[(w * MAXG + g) * D + ds + j];
      }
      const int64_t row = row0 + g;
      if (CLUSTER) {
        float4* part = reinterpret_cast<float4*>(qs + g * D + ds);
        part[0] = make_float4(o[0], o[1], o[2], o[3]);
        part[1] = make_float4(o[4], o[5], o[6], o[7]);
      } else if (max_splits == 1) {
        const float inv = 1.0f / ml[g].y;
        uint4 u;
        __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
        for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(o[2 * j] * inv, o[2 * j + 1] * inv);
        *reinterpret_cast<uint4*>(out + row * D + ds) = u;
      } else {
        const int64_t slot = row * max_splits + split;
        float4* a = reinterpret_cast<float4*>(ws_acc + slot * D + ds);
        a[0] = make_float4(o[0], o[1], o[2], o[3]);
        a[1] = make_float4(o[4], o[5], o[6], o[7]);
        if (lane == 0) ws_ml[slot] = ml[g];
      }
    }
  }
  if constexpr (CLUSTER) CombineInCluster<D, MAXG>(qs, ml, cluster_ml, used_splits, ng, out + row0 * D);
}

// The splits' combine: one block per (query head, sequence). (Combining in each head group's
// last split block instead, found by an atomic count, and a one-pass online rescaling here were
// both slower: tests/gpu/NOTES.md run 20.)
__global__ void DecodeCombineKernel(const float* __restrict__ ws_acc,
                                    const float2* __restrict__ ws_ml,
                                    const int32_t* __restrict__ seq_lens, int heads, int head_dim,
                                    int split_tokens, int max_splits, int max_seq_len,
                                    __half* __restrict__ out) {
  AllowDependentLaunch();
  WaitForPriorGrid();
  extern __shared__ float weight[];  // [max_splits]
  const int h = blockIdx.x, seq = blockIdx.y;
  const int64_t row = static_cast<int64_t>(seq) * heads + h;
  __half* o = out + row * head_dim;
  const int len = seq_lens[seq];
  if (len < 1 || len > max_seq_len) {
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) o[d] = __ushort_as_half(0x7e00);
    return;
  }
  const int ns = (len + split_tokens - 1) / split_tokens;
  const float2* ml = ws_ml + row * max_splits;
  float m = -INFINITY;
  for (int i = 0; i < ns; ++i) m = fmaxf(m, ml[i].x);
  for (int i = threadIdx.x; i < ns; i += blockDim.x) weight[i] = expf(ml[i].x - m);
  __syncthreads();
  float l = 0.0f;
  for (int i = 0; i < ns; ++i) l = fmaf(weight[i], ml[i].y, l);
  const float inv = 1.0f / l;
  const float* a = ws_acc + row * max_splits * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int i = 0; i < ns; ++i) acc = fmaf(weight[i], a[static_cast<int64_t>(i) * head_dim + d], acc);
    o[d] = __float2half_rn(acc * inv);
  }
}

int MaxGroupFor(int64_t group) { return group <= 4 ? 4 : 8; }

// The split kernel's grid (kv heads x chunks of up to MAXG query heads, sequences, splits) and
// dynamic shared memory (q staged, the scores, the warps' partial sums), for the planner's
// cluster check and the launch alike.
dim3 SplitGrid(const DecodeAttentionShape& s, int64_t num_seqs, int32_t splits) {
  const int64_t group = s.heads / s.kv_heads, maxg = MaxGroupFor(group);
  return dim3(static_cast<unsigned>(s.kv_heads * ((group + maxg - 1) / maxg)),
              static_cast<unsigned>(num_seqs), static_cast<unsigned>(splits));
}
size_t SplitSmemBytes(const DecodeAttentionShape& s, int32_t split_tokens) {
  return static_cast<size_t>(MaxGroupFor(s.heads / s.kv_heads)) * (4 * s.head_dim + split_tokens) * sizeof(float);
}

// Whether the split kernel runs its EARLY variant (splits of one round, MAXG 4).
bool EarlyFor(int maxg, int32_t split_tokens, int64_t head_dim) {
  return maxg == 4 && split_tokens <= RoundPositions(static_cast<int>(head_dim));
}

// Every DecodeSplitKernel instantiation has this signature.
using SplitKernel = decltype(&DecodeSplitKernel<128, 4, false, false, false>);

// The split kernel for a head size, query-head chunk (MAXG), split length (EARLY), with or
// without the RoPE and the cluster combine: the planner's check and the launch pick the same.
template <bool ROPE, bool CLUSTER>
SplitKernel SplitKernelFor(int64_t head_dim, int maxg, bool early) {
  switch (head_dim) {
    case 128:
      return maxg == 8 ? DecodeSplitKernel<128, 8, false, ROPE, CLUSTER>
             : early   ? DecodeSplitKernel<128, 4, true, ROPE, CLUSTER>
                       : DecodeSplitKernel<128, 4, false, ROPE, CLUSTER>;
    case 64:
      return maxg == 8 ? DecodeSplitKernel<64, 8, false, ROPE, CLUSTER>
             : early   ? DecodeSplitKernel<64, 4, true, ROPE, CLUSTER>
                       : DecodeSplitKernel<64, 4, false, ROPE, CLUSTER>;
    default:
      return maxg == 8 ? DecodeSplitKernel<8, 8, false, ROPE, CLUSTER>
             : early   ? DecodeSplitKernel<8, 4, true, ROPE, CLUSTER>
                       : DecodeSplitKernel<8, 4, false, ROPE, CLUSTER>;
  }
}
SplitKernel SplitKernelFor(int64_t head_dim, int maxg, bool early, bool rope, bool cluster) {
  if (rope) {
    return cluster ? SplitKernelFor<true, true>(head_dim, maxg, early)
                   : SplitKernelFor<true, false>(head_dim, maxg, early);
  }
  return cluster ? SplitKernelFor<false, true>(head_dim, maxg, early)
                 : SplitKernelFor<false, false>(head_dim, maxg, early);
}

// Whether `kernel` (a CLUSTER variant) can run here in clusters of `splits` blocks on `grid`:
// it has sm_90 code (the JIT of its sm_8x PTX would reach CombineInCluster's trap) and at
// least one such cluster fits the device (cudaOccupancyMaxActiveClusters; past 8 blocks the
// size is non-portable: Hopper has 16, other parts or a MIG slice may not). Any error says no
// (and is cleared): the plan then combines with the combine kernel.
bool ClusterFits(SplitKernel kernel, dim3 grid, size_t smem, int splits) {
  cudaFuncAttributes attributes{};
  int clusters = 0;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 1;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = static_cast<unsigned>(splits);
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = kThreads;
  config.dynamicSmemBytes = smem;
  config.attrs = &cluster;
  config.numAttrs = 1;
  const bool fits =
      cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess && attributes.binaryVersion >= 90 &&
      (splits <= 8 ||
       cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) &&
      cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0;
  (void)cudaGetLastError();
  return fits;
}

bool ShapeOk(const DecodeAttentionShape& s) {
  return (s.head_dim == 8 || s.head_dim == 64 || s.head_dim == 128) && s.heads > 0 &&
         s.kv_heads > 0 && s.heads % s.kv_heads == 0 && s.heads <= 4096;
}

}  // namespace

cudaError_t PlanPagedDecodeAttention(const DecodeAttentionShape& shape, int64_t num_seqs,
                                     int64_t max_seq_len, DecodeAttentionPlan* plan,
                                     int32_t split_tokens) {
  if (!ShapeOk(shape) || num_seqs <= 0 || num_seqs > 65535 || max_seq_len <= 0 ||
      max_seq_len > int64_t{kMaxSplits} * kMaxSplitTokens || split_tokens > kMaxSplitTokens) {
    std::fprintf(stderr, "%s:%d: PlanPagedDecodeAttention: unsupported shape or sizes\n", __FILE__, __LINE__);
    return cudaErrorInvalidValue;
  }
  const int64_t group = shape.heads / shape.kv_heads;
  const int64_t maxg = MaxGroupFor(group);
  const int64_t units = num_seqs * shape.kv_heads * ((group + maxg - 1) / maxg);
  const auto round_up = [](int64_t v, int64_t m) { return (v + m - 1) / m * m; };
  // Split sizes: multiples of kSplitGranule, or one round of loads where that is shorter (32
  // positions at head_dim 128), for a batch too small to fill the card even with one block per
  // 64 positions (batch 1 at short contexts).
  const int64_t shortest =
      std::min<int64_t>(RoundPositions(static_cast<int>(shape.head_dim)), kSplitGranule);
  const auto granular = [&](int64_t v) {
    return v <= shortest ? shortest : round_up(v, kSplitGranule);
  };
  int device = 0, sms = 0, major = 0;
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  int64_t st;
  if (split_tokens > 0) {
    st = granular(split_tokens);
  } else {
    const int64_t splits = std::max<int64_t>(1, (4 * sms + units - 1) / units);
    st = std::min<int64_t>(granular((max_seq_len + splits - 1) / splits), kMaxSplitTokens);
  }
  st = std::min(st, granular(max_seq_len));
  if ((max_seq_len + st - 1) / st > kMaxSplits) {  // a forced split too short for this length
    std::fprintf(stderr, "%s:%d: PlanPagedDecodeAttention: more than %d splits\n", __FILE__, __LINE__,
                 kMaxSplits);
    return cudaErrorInvalidValue;
  }
  *plan = DecodeAttentionPlan{};
  plan->shape = shape;
  plan->num_seqs = num_seqs;
  plan->max_seq_len = max_seq_len;
  plan->split_tokens = static_cast<int32_t>(st);
  plan->max_splits = static_cast<int32_t>((max_seq_len + st - 1) / st);
  if (major >= 9 && plan->max_splits > 1 && plan->max_splits <= kMaxClusterSplits) {
    // Checked on the RoPE variant, the one the engine runs and the one with more registers.
    const bool early = EarlyFor(static_cast<int>(maxg), plan->split_tokens, shape.head_dim);
    plan->cluster_fits = ClusterFits(SplitKernelFor(shape.head_dim, static_cast<int>(maxg), early, true, true),
                                     SplitGrid(shape, num_seqs, plan->max_splits),
                                     SplitSmemBytes(shape, plan->split_tokens), plan->max_splits);
  }
  plan->workspace_bytes = plan->max_splits == 1
                              ? 0
                              : num_seqs * shape.heads * plan->max_splits *
                                    static_cast<int64_t>(shape.head_dim * sizeof(float) + sizeof(float2));
  // Taken where the split grid is at most one block per multiprocessor (run 27, H100, with
  // PDL: batch 1's 96 blocks gained 1.9 % a step, batch 8's 384 lost 5.6 %; alone, in
  // attention_bench, clusters were 0.9 µs faster at 96 blocks and 1-3 % slower at 1024 and
  // more: every block of a cluster is placed in one GPC at once and holds its multiprocessor
  // until the cluster's last block is done).
  plan->combine_in_cluster = plan->cluster_fits && units * plan->max_splits <= sms;
  return cudaSuccess;
}

namespace {

// PagedDecodeAttention, and with rope != nullptr PagedDecodeAttentionWithRope (q unused).
cudaError_t DecodeAttention(const DecodeAttentionPlan& plan, const uint16_t* q,
                            const DecodeRopeInput* rope, const PagedKvView& kv,
                            const int32_t* block_tables, int64_t block_table_stride,
                            const int32_t* seq_lens, int64_t num_seqs, void* workspace,
                            uint16_t* out, cudaStream_t stream) {
  const DecodeAttentionShape& s = plan.shape;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!ShapeOk(s) || plan.split_tokens <= 0 || plan.max_splits <= 0 || num_seqs < 0 ||
      num_seqs > plan.num_seqs || kv.block_seq_len <= 0 || kv.block_stride % 8 != 0 ||
      !aligned(kv.keys) || !aligned(kv.values) || !aligned(out) ||
      (rope == nullptr && q == nullptr) || block_tables == nullptr || seq_lens == nullptr ||
      block_table_stride < 0 ||
      (plan.combine_in_cluster && (!plan.cluster_fits || plan.max_splits < 2 || plan.max_splits > kMaxClusterSplits)) ||
      (plan.max_splits > 1 && !plan.combine_in_cluster && (workspace == nullptr || !aligned(workspace)))) {
    std::fprintf(stderr, "%s:%d: PagedDecodeAttention: bad arguments\n", __FILE__, __LINE__);
    return cudaErrorInvalidValue;
  }
  RopeArgs rope_args{};
  if (rope != nullptr) {
    const int64_t q_dim = s.heads * s.head_dim, kv_dim = s.kv_heads * s.head_dim;
    if (rope->q == nullptr || rope->k == nullptr || rope->v == nullptr ||
        rope->positions == nullptr || rope->inv_freq == nullptr || rope->slots == nullptr ||
        rope->keys != kv.keys || rope->values != kv.values || rope->q_stride < q_dim ||
        rope->k_stride < kv_dim || rope->v_stride < kv_dim) {
      std::fprintf(stderr, "%s:%d: PagedDecodeAttentionWithRope: bad arguments\n", __FILE__, __LINE__);
      return cudaErrorInvalidValue;
    }
    rope_args = {reinterpret_cast<const __half*>(rope->q), rope->q_stride,
                 reinterpret_cast<const __half*>(rope->k), rope->k_stride,
                 reinterpret_cast<const __half*>(rope->v), rope->v_stride,
                 rope->positions, rope->inv_freq, rope->freq_index, rope->slots,
                 reinterpret_cast<__half*>(rope->keys), reinterpret_cast<__half*>(rope->values)};
  }
  if (num_seqs == 0) return cudaSuccess;
  const int64_t group = s.heads / s.kv_heads;
  const int maxg = MaxGroupFor(group);
  const int gchunks = static_cast<int>((group + maxg - 1) / maxg);
  const dim3 grid = SplitGrid(s, num_seqs, plan.max_splits);
  const size_t smem = SplitSmemBytes(s, plan.split_tokens);
  // Workspace: the partial outputs [num_seqs][heads][max_splits][head_dim] fp32, then
  // (max, sum) [num_seqs][heads][max_splits] float2.
  float* ws_acc = static_cast<float*>(workspace);
  float2* ws_ml = plan.max_splits > 1 && !plan.combine_in_cluster
                      ? reinterpret_cast<float2*>(ws_acc + plan.num_seqs * s.heads * plan.max_splits * s.head_dim)
                      : nullptr;
  const SplitKernel kernel = SplitKernelFor(s.head_dim, maxg, EarlyFor(maxg, plan.split_tokens, s.head_dim),
                                             rope != nullptr, plan.combine_in_cluster);
  dim3 cluster(1, 1, 1);
  if (plan.combine_in_cluster) {
    cluster.z = grid.z;  // every split of a (sequence, kv head, chunk) in one cluster
    if (cluster.z > 8) {
      NIBBLE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    }
  }
  const cudaError_t launched = LaunchKernelInClusters(
      plan.dependent_launch, cluster, kernel, grid, kThreads, smem, stream,
      reinterpret_cast<const __half*>(q), reinterpret_cast<const __half*>(kv.keys),
      reinterpret_cast<const __half*>(kv.values), kv.block_stride, kv.block_seq_len, block_tables,
      block_table_stride, seq_lens, static_cast<int>(s.heads), static_cast<int>(s.kv_heads),
      gchunks, plan.split_tokens, plan.max_splits, static_cast<int>(plan.max_seq_len),
      static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim))), ws_acc, ws_ml,
      reinterpret_cast<__half*>(out), rope_args);
  NIBBLE_CUDA_RETURN_IF_ERROR(launched);
  if (plan.max_splits > 1 && !plan.combine_in_cluster) {
    const int threads = static_cast<int>((s.head_dim + 31) / 32 * 32);
    NIBBLE_CUDA_RETURN_IF_ERROR(LaunchKernel(
        plan.dependent_launch, DecodeCombineKernel,
        dim3(static_cast<unsigned>(s.heads), static_cast<unsigned>(num_seqs)), threads,
        // Rounded up to 4 floats: ptxas may read the weights' last partial group of 4 as
        // one wider shared load (compute-sanitizer memcheck flagged it past max_splits).
        (plan.max_splits + 3) / 4 * 4 * sizeof(float), stream,
        ws_acc, ws_ml, seq_lens, static_cast<int>(s.heads), static_cast<int>(s.head_dim),
        plan.split_tokens, plan.max_splits, static_cast<int>(plan.max_seq_len),
        reinterpret_cast<__half*>(out)));
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t PagedDecodeAttention(const DecodeAttentionPlan& plan, const uint16_t* q,
                                 const PagedKvView& kv, const int32_t* block_tables,
                                 int64_t block_table_stride, const int32_t* seq_lens,
                                 int64_t num_seqs, void* workspace, uint16_t* out,
                                 cudaStream_t stream) {
  return DecodeAttention(plan, q, nullptr, kv, block_tables, block_table_stride, seq_lens,
                         num_seqs, workspace, out, stream);
}

cudaError_t PagedDecodeAttentionWithRope(const DecodeAttentionPlan& plan,
                                         const DecodeRopeInput& rope, const PagedKvView& kv,
                                         const int32_t* block_tables, int64_t block_table_stride,
                                         const int32_t* seq_lens, int64_t num_seqs,
                                         void* workspace, uint16_t* out, cudaStream_t stream) {
  return DecodeAttention(plan, nullptr, &rope, kv, block_tables, block_table_stride, seq_lens,
                         num_seqs, workspace, out, stream);
}

// ---------------------------------------------------------------------------------------------
// Paged prefill attention (attention.h): PrefillKernel<D, ROWS>, one block of ROWS / 16 warps
// per (tile of ROWS (token, query head) rows of one span, kv head). Each warp owns 16 rows: its
// Q fragments stay in registers (mma A operands), its output accumulators too (16 x D fp32:
// D / 8 mma C tiles). 226 registers at D = 128: two 4-warp blocks or one 8-warp block per
// multiprocessor (a cap of 168 for three 4-warp blocks spilled and was not faster).
// Per K/V tile of 64 positions (shared memory, [64][SK] halves each, rows padded by 16 bytes so
// that ldmatrix's 8 rows of a phase fall in distinct banks):
//   S = Q K^T: mma.sync m16n8k16 over 8 key tiles x DK / 16 k-steps, K fragments by ldmatrix
//     (K rows are the B operand's columns: no transpose);
//   scaled by log2(e) / sqrt(D), causal mask (only tiles that reach past the block's first
//     position), online softmax per row (max over the quad of lanes sharing a row, exp2);
//   O += P V: P's C fragments re-packed as fp16 A fragments (the C layout of S is the A layout
//     of P), V fragments by ldmatrix.trans.
// Loads: cp.async 16 bytes per (position, 8 dims), two buffers: tile j + 1 is in flight while
// tile j is computed. Positions past the block's last query position are zero-filled, never
// read (the pool holds other sequences' rows or NaN there; 0 * NaN would poison P V).
// Q is staged through buffer 1 (K1, V1) before the loop: the shared memory stays at 4 tiles,
// 68 KB at D = 128.
namespace {

constexpr int kPrefillKeys = 64;  // positions per K / V tile

// ROWS: (token, query head) rows per block, 16 per warp (64: 4 warps, 128: 8 warps).
template <int D, int ROWS>
struct PrefillDims {
  static constexpr int kThreads = ROWS * 2;   // ROWS / 16 warps
  static constexpr int DK = D < 16 ? 16 : D;  // QK^T reduction, zero-padded to the mma's k
  static constexpr int SK = DK + 8;           // shared row stride (halves): +16 bytes
  static constexpr int kTile = kPrefillKeys * SK;
  static constexpr int kSmemBytes = 4 * kTile * 2;  // [K0][V0][K1][V1]
  static_assert(ROWS <= 2 * kPrefillKeys, "Q is staged in buffer 1 (K1, V1)");
};

__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                           uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void LdMatrixX2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                                uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void LdMatrixX2Trans(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}

// c += a b: A 16 x 16 (row), B 16 x 8 (col), fp16 in, fp32 accumulators. Fragments (g = lane
// / 4, t = lane % 4): a[0] (row g, cols 2t, 2t+1), a[1] (row g+8, same), a[2] (row g, cols
// 2t+8, 2t+9), a[3] (row g+8, same); b0 (k 2t, 2t+1, col g), b1 (k 2t+8, 2t+9, col g); c[0..1]
// (row g, cols 2t, 2t+1), c[2..3] (row g+8, same).
__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackHalf2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // lo in the low 16 bits: the lower column
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <int D, int ROWS>
__global__ void __launch_bounds__(ROWS * 2, ROWS == 64 ? 2 : 1)
    PrefillKernel(const __half* __restrict__ q, const __half* __restrict__ keys,
                  const __half* __restrict__ values, int64_t block_stride, int bsl,
                  PrefillSpanTable spans, int num_spans, int heads, int kv_heads,
                  float scale_log2, __half* __restrict__ out) {
  using Dims = PrefillDims<D, ROWS>;
  constexpr int DK = Dims::DK, SK = Dims::SK, kTile = Dims::kTile, kThreads = Dims::kThreads;
  constexpr int NT = D / 8;     // output mma tiles (8 dims each)
  constexpr int KS = DK / 16;   // k-steps of QK^T
  constexpr int CPR = D / 8;    // 16-byte chunks per K / V / Q row
  extern __shared__ uint4 prefill_smem[];
  // Buffer b: K at smem + 2 b kTile, V at smem + (2 b + 1) kTile, [kPrefillKeys][SK] each.
  __half* const smem_h = reinterpret_cast<__half*>(prefill_smem);
  __shared__ int block_span, block_tile;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = heads / kv_heads;
  const int kvh = blockIdx.x;

  // This block's (span, tile): blockIdx.y counts the tiles of span 0, then span 1, ...; warp 0
  // scans the spans' tile counts 32 at a time.
  if (warp == 0) {
    const int target = blockIdx.y;
    int base = 0, found_span = -1, found_tile = 0;
    for (int s0 = 0; s0 < num_spans; s0 += 32) {
      const int s = s0 + lane;
      int count = 0;
      if (s < num_spans) {
        const int t = spans.tokens[s];
        if (t > 0 && spans.start[s] >= 0) {
          count = static_cast<int>((static_cast<int64_t>(t) * group + ROWS - 1) / ROWS);
        }
      }
      int inclusive = count;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += v;
      }
      const int exclusive = inclusive - count;
      const unsigned mine = __ballot_sync(0xffffffffu, target >= base + exclusive && target < base + inclusive);
      if (mine != 0) {  // warp-uniform
        const int src = __ffs(mine) - 1;
        found_span = s0 + src;
        found_tile = target - base - __shfl_sync(0xffffffffu, exclusive, src);
        break;
      }
      base += __shfl_sync(0xffffffffu, inclusive, 31);
    }
    if (lane == 0) {
      block_span = found_span;
      block_tile = found_tile;
    }
  }
  __syncthreads();
  const int span = block_span;
  if (span < 0) return;  // past the last tile (the grid is an upper bound)

  const int start = spans.start[span], tokens = spans.tokens[span], first_row = spans.first_row[span];
  const int32_t* __restrict__ table = spans.block_tables + static_cast<int64_t>(span) * spans.block_table_stride;
  const int rows = tokens * group;
  const int ntiles = (rows + ROWS - 1) / ROWS;
  const int r0 = (ntiles - 1 - block_tile) * ROWS;  // the longest tiles first
  const int nr = min(ROWS, rows - r0);              // valid rows of the block
  const int pos_min = start + r0 / group;                     // the first row's position
  const int kv_end = start + (r0 + nr - 1) / group + 1;       // positions the block reads
  const int nkv = (kv_end + kPrefillKeys - 1) / kPrefillKeys;

  // Rows past nr repeat the last valid row (finite, never written).
  auto row_pos = [&](int r) { return start + (r0 + min(r, nr - 1)) / group; };
  auto row_offset = [&](int r) {  // element offset of block row r in q / out
    const int rr = r0 + min(r, nr - 1);
    return (static_cast<int64_t>(first_row + rr / group) * heads + kvh * group + rr % group) * D;
  };
  const int g = lane / 4, t4 = lane % 4;
  const int rlo = 16 * warp + g, rhi = rlo + 8;  // this thread's two rows (mma rows g, g + 8)
  const int pos_lo = row_pos(rlo), pos_hi = row_pos(rhi);

  // Q is staged in buffer 1 (K1 and V1 are contiguous: up to 128 rows).
  __half* const qs = smem_h + 2 * kTile;
  // D = 8: columns 8 .. 15 of K0, K1 (and of Q, staged there) are the zero padding of the
  // reduction, never written by the loads below.
  if constexpr (DK != D) {
    static_assert(DK - D == 8, "one 16-byte chunk of padding");
    for (int i = threadIdx.x; i < kPrefillKeys + 2 * kPrefillKeys; i += kThreads) {
      __half* row = i < kPrefillKeys ? smem_h + i * SK : qs + (i - kPrefillKeys) * SK;
      *reinterpret_cast<uint4*>(row + D) = make_uint4(0, 0, 0, 0);
    }
  }
  for (int i = threadIdx.x; i < ROWS * CPR; i += kThreads) {
    const int r = i / CPR, c = i % CPR;
    *reinterpret_cast<uint4*>(qs + r * SK + c * 8) =
        __ldg(reinterpret_cast<const uint4*>(q + row_offset(r) + c * 8));
  }

  const int64_t kv_dim = static_cast<int64_t>(kv_heads) * D;
  const int64_t head_off = static_cast<int64_t>(kvh) * D;
  auto load_tile = [&](int j, int buf) {
    for (int i = threadIdx.x; i < kPrefillKeys * CPR; i += kThreads) {
      const int r = i / CPR, c = i % CPR;
      const int p = j * kPrefillKeys + r;
      const bool valid = p < kv_end;
      const int64_t off = valid ? static_cast<int64_t>(table[p / bsl]) * block_stride +
                                      static_cast<int64_t>(p % bsl) * kv_dim + head_off + c * 8
                                : 0;
      __half* const k_dst = smem_h + 2 * buf * kTile + r * SK + c * 8;
      CpAsync16(SmemAddr(k_dst), keys + off, valid);
      CpAsync16(SmemAddr(k_dst + kTile), values + off, valid);
    }
  };
  load_tile(0, 0);
  CpAsyncCommit();
  __syncthreads();  // Q staged (and the padding zeroed)
  uint32_t qf[KS][4];
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    const __half* b = qs + rlo * SK + k * 16 + 2 * t4;
    qf[k][0] = *reinterpret_cast<const uint32_t*>(b);
    qf[k][1] = *reinterpret_cast<const uint32_t*>(b + 8 * SK);
    qf[k][2] = *reinterpret_cast<const uint32_t*>(b + 8);
    qf[k][3] = *reinterpret_cast<const uint32_t*>(b + 8 * SK + 8);
  }
  __syncthreads();  // buffer 1 is free for tile 1

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;

  for (int j = 0; j < nkv; ++j) {
    if (j + 1 < nkv) load_tile(j + 1, (j + 1) & 1);
    CpAsyncCommit();  // possibly empty: wait_group 1 then always means "tile j has landed"
    CpAsyncWait<1>();
    __syncthreads();
    const __half* kt = smem_h + 2 * (j & 1) * kTile;
    const __half* vt = kt + kTile;

    // S = Q K^T: 16 rows x 64 keys per warp.
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
      // Lane l addresses row (key) n * 8 + l % 8 of matrix l / 8: columns k0 + 8 * (l / 8).
      const __half* krow = kt + (n * 8 + (lane & 7)) * SK + (lane >> 3) * 8;
      if constexpr (KS == 1) {
        uint32_t b0, b1;
        LdMatrixX2(SmemAddr(krow), b0, b1);  // lanes 0 .. 15: columns 0 .. 7, 8 .. 15
        Mma16816(s[n], qf[0], b0, b1);
      } else {
#pragma unroll
        for (int k = 0; k < KS; k += 2) {
          uint32_t b0, b1, b2, b3;
          LdMatrixX4(SmemAddr(krow + k * 16), b0, b1, b2, b3);
          Mma16816(s[n], qf[k], b0, b1);
          Mma16816(s[n], qf[k + 1], b2, b3);
        }
      }
    }

    // Scale, causal mask, online softmax (per row; the 4 lanes of a quad share a row).
    const int key0 = j * kPrefillKeys + 2 * t4;
    const bool mask = j * kPrefillKeys + kPrefillKeys - 1 > pos_min;  // block-uniform
    float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= scale_log2;
      if (mask) {
        const int key = key0 + n * 8;
        if (key > pos_lo) s[n][0] = -INFINITY;
        if (key + 1 > pos_lo) s[n][1] = -INFINITY;
        if (key > pos_hi) s[n][2] = -INFINITY;
        if (key + 1 > pos_hi) s[n][3] = -INFINITY;
      }
      mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
      mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
    }
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, o));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, o));
    }
    // A row that has seen only masked keys so far keeps max -inf: subtract 0 instead (its
    // exp2 values are 0, and so is its rescale factor exp2(-inf)).
    const float use_lo = mx_lo == -INFINITY ? 0.0f : mx_lo;
    const float use_hi = mx_hi == -INFINITY ? 0.0f : mx_hi;
    const float alpha_lo = exp2f(m_lo - use_lo), alpha_hi = exp2f(m_hi - use_hi);
    m_lo = mx_lo;
    m_hi = mx_hi;
    float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      s[n][0] = exp2f(s[n][0] - use_lo);
      s[n][1] = exp2f(s[n][1] - use_lo);
      s[n][2] = exp2f(s[n][2] - use_hi);
      s[n][3] = exp2f(s[n][3] - use_hi);
      sum_lo += s[n][0] + s[n][1];
      sum_hi += s[n][2] + s[n][3];
    }
    l_lo = l_lo * alpha_lo + sum_lo;  // this lane's columns only; the quad is summed at the end
    l_hi = l_hi * alpha_hi + sum_hi;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      acc[n][0] *= alpha_lo;
      acc[n][1] *= alpha_lo;
      acc[n][2] *= alpha_hi;
      acc[n][3] *= alpha_hi;
    }

    // O += P V, 16 keys per step: P's A fragment is S's C fragments of key tiles 2k, 2k + 1.
#pragma unroll
    for (int k = 0; k < kPrefillKeys / 16; ++k) {
      const uint32_t a[4] = {PackHalf2(s[2 * k][0], s[2 * k][1]), PackHalf2(s[2 * k][2], s[2 * k][3]),
                             PackHalf2(s[2 * k + 1][0], s[2 * k + 1][1]),
                             PackHalf2(s[2 * k + 1][2], s[2 * k + 1][3])};
      // Lane l addresses key k * 16 + l % 16 (matrices 0, 1: keys +0, +8) at dims +8 * (l / 16)
      // (matrices 2, 3): transposed, matrices 0 / 1 are b0 / b1 of one 8-dim tile, 2 / 3 of
      // the next.
      const __half* vrow = vt + (k * 16 + (lane & 15)) * SK + (lane >> 4) * 8;
      if constexpr (NT == 1) {
        uint32_t b0, b1;
        LdMatrixX2Trans(SmemAddr(vrow), b0, b1);  // lanes 0 .. 15: keys +0 .. 15, dims 0 .. 7
        Mma16816(acc[0], a, b0, b1);
      } else {
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
          uint32_t b0, b1, b2, b3;
          LdMatrixX4Trans(SmemAddr(vrow + n * 8), b0, b1, b2, b3);
          Mma16816(acc[n], a, b0, b1);
          Mma16816(acc[n + 1], a, b2, b3);
        }
      }
    }
    __syncthreads();  // buffer j & 1 is free for tile j + 2
  }
  CpAsyncWait<0>();

#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, o);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, o);
  }
  const float inv_lo = 1.0f / l_lo, inv_hi = 1.0f / l_hi;
  if (rlo < nr) {
    __half* o = out + row_offset(rlo) + 2 * t4;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      *reinterpret_cast<__half2*>(o + n * 8) = __floats2half2_rn(acc[n][0] * inv_lo, acc[n][1] * inv_lo);
    }
  }
  if (rhi < nr) {
    __half* o = out + row_offset(rhi) + 2 * t4;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      *reinterpret_cast<__half2*>(o + n * 8) = __floats2half2_rn(acc[n][2] * inv_hi, acc[n][3] * inv_hi);
    }
  }
}

template <int D, int ROWS>
cudaError_t LaunchPrefill(const PrefillAttentionPlan& p, dim3 grid, cudaStream_t stream,
                          const uint16_t* q, const PagedKvView& kv, const PrefillSpanTable& spans,
                          int num_spans, uint16_t* out) {
  using Dims = PrefillDims<D, ROWS>;
  constexpr int smem = Dims::kSmemBytes;
  // Above 48 KB (D = 128) the dynamic limit must be raised; cheap, and per device.
  NIBBLE_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(PrefillKernel<D, ROWS>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const double log2e = 1.4426950408889634;
  PrefillKernel<D, ROWS><<<grid, Dims::kThreads, smem, stream>>>(
      reinterpret_cast<const __half*>(q), reinterpret_cast<const __half*>(kv.keys),
      reinterpret_cast<const __half*>(kv.values), kv.block_stride, kv.block_seq_len, spans,
      num_spans, static_cast<int>(p.shape.heads), static_cast<int>(p.shape.kv_heads),
      static_cast<float>(log2e / std::sqrt(static_cast<double>(D))), reinterpret_cast<__half*>(out));
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

int64_t PrefillTiles(const DecodeAttentionShape& s, int64_t max_rows, int64_t num_spans, int64_t tile_rows) {
  return (max_rows * (s.heads / s.kv_heads) + tile_rows - 1) / tile_rows + num_spans;
}

}  // namespace

cudaError_t PlanPagedPrefillAttention(const DecodeAttentionShape& shape, int64_t max_rows,
                                      int64_t max_spans, PrefillAttentionPlan* plan,
                                      int32_t tile_rows) {
  int64_t rows = tile_rows;
  if (rows <= 0 && ShapeOk(shape) && max_rows > 0) {
    // 128 rows (8 warps sharing each K / V tile: ~10% faster on the H100 at 2k tokens) when
    // that still gives a block per multiprocessor, else 64 (twice the blocks).
    int device = 0, sms = 0;
    NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
    NIBBLE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t blocks128 = (max_rows * (shape.heads / shape.kv_heads) + 127) / 128 * shape.kv_heads;
    rows = blocks128 >= sms ? 128 : 64;
  }
  if (!ShapeOk(shape) || max_rows <= 0 || max_spans <= 0 || max_rows > (int64_t{1} << 24) ||
      max_spans > 65535 || shape.kv_heads > 65535 || (rows != 64 && rows != 128) ||
      PrefillTiles(shape, max_rows, max_spans, rows) > 65535) {
    std::fprintf(stderr, "%s:%d: PlanPagedPrefillAttention: unsupported shape or sizes\n", __FILE__, __LINE__);
    return cudaErrorInvalidValue;
  }
  *plan = PrefillAttentionPlan{};
  plan->shape = shape;
  plan->max_rows = max_rows;
  plan->max_spans = max_spans;
  plan->tile_rows = static_cast<int32_t>(rows);
  plan->tile_keys = kPrefillKeys;
  // The same for either ROWS (Q is staged in the K / V buffers).
  plan->smem_bytes = shape.head_dim == 128 ? PrefillDims<128, 64>::kSmemBytes
                     : shape.head_dim == 64 ? PrefillDims<64, 64>::kSmemBytes
                                            : PrefillDims<8, 64>::kSmemBytes;
  return cudaSuccess;
}

cudaError_t PagedPrefillAttention(const PrefillAttentionPlan& plan, const uint16_t* q,
                                  const PagedKvView& kv, const PrefillSpanTable& spans,
                                  int64_t num_spans, uint16_t* out, cudaStream_t stream) {
  const DecodeAttentionShape& s = plan.shape;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!ShapeOk(s) || (plan.tile_rows != 64 && plan.tile_rows != 128) || plan.max_rows <= 0 ||
      num_spans < 0 || num_spans > plan.max_spans || kv.block_seq_len <= 0 ||
      kv.block_stride % 8 != 0 || !aligned(kv.keys) || !aligned(kv.values) || !aligned(q) ||
      !aligned(out) ||
      (num_spans > 0 && (spans.first_row == nullptr || spans.start == nullptr ||
                         spans.tokens == nullptr || spans.block_tables == nullptr)) ||
      spans.block_table_stride < 0) {
    std::fprintf(stderr, "%s:%d: PagedPrefillAttention: bad arguments\n", __FILE__, __LINE__);
    return cudaErrorInvalidValue;
  }
  if (num_spans == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(s.kv_heads),
                  static_cast<unsigned>(PrefillTiles(s, plan.max_rows, num_spans, plan.tile_rows)));
  const int ns = static_cast<int>(num_spans);
#define NIBBLE_PREFILL(D, R) LaunchPrefill<D, R>(plan, grid, stream, q, kv, spans, ns, out)
  if (plan.tile_rows == 128) {
    if (s.head_dim == 128) return NIBBLE_PREFILL(128, 128);
    if (s.head_dim == 64) return NIBBLE_PREFILL(64, 128);
    return NIBBLE_PREFILL(8, 128);
  }
  if (s.head_dim == 128) return NIBBLE_PREFILL(128, 64);
  if (s.head_dim == 64) return NIBBLE_PREFILL(64, 64);
  return NIBBLE_PREFILL(8, 64);
#undef NIBBLE_PREFILL
}

}  // namespace nibble::kernels::cuda
