// Paged decode attention (attention.h): a split kernel and a combine kernel.
//
// DecodeSplitKernel<D, MAXG>: 128 threads (4 warps) per block; the block owns one sequence, one
// kv head, up to MAXG of its query heads and one split of the positions. A position's row of
// one kv head (D halves) is read by LPT = D / 8 lanes, one 16-byte load each; a warp covers
// TPW = 32 / LPT positions per load instruction and the block TPB = 4 * TPW, with U = 4 such
// steps' loads issued before their use. Three phases:
//   1. scores: each lane's 8 elements of K dotted with its slice of every query head (q held in
//      registers, pre-scaled by 1/sqrt(D)), summed over the LPT lanes by shuffles, into shared
//      memory scores[g][t] (fp32);
//   2. softmax per query head by one warp: max, exp(s - max) in place, sum (fp32);
//   3. values: each lane accumulates p[g][t] * V[t][its 8 dims] for every query head in fp32
//      registers; shuffles over the TPW positions of a warp and shared memory over the 4 warps.
// Each K and V element is read once per (sequence, kv head) when heads / kv_heads <= 8 (more:
// once per 8 query heads). Instantiated: D in {8, 64, 128} x MAXG in {4, 8} (4 when the group
// is <= 4: the 7B and 1.8B shapes, the tiny model; 8 above).
// DecodeCombineKernel: one block per (sequence, query head): the splits' (max, sum, unnormalized
// output) rescaled to the common max, divided by the total sum, rounded to fp16.
#include "kernels/cuda/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include <cuda_fp16.h>

#include "kernels/cuda/check.h"
#include "kernels/cuda/half8.h"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kSplitGranule = 64;    // split sizes are multiples of this
constexpr int kMaxSplitTokens = 512;  // scores of one split: MAXG * 512 floats of shared memory
constexpr int kMaxSplits = 4096;      // combine kernel's shared memory: one float per split
constexpr int kUnroll = 4;

template <int D, int MAXG>
__global__ void __launch_bounds__(kThreads, 4)
    DecodeSplitKernel(const __half* __restrict__ q, const __half* __restrict__ keys,
                      const __half* __restrict__ values, int64_t block_stride, int bsl,
                      const int32_t* __restrict__ tables, int64_t table_stride,
                      const int32_t* __restrict__ seq_lens, int heads, int kv_heads, int gchunks,
                      int split_tokens, int max_splits, int max_seq_len, float scale,
                      float* __restrict__ ws_acc, float2* __restrict__ ws_ml,
                      __half* __restrict__ out) {
  constexpr int LPT = D / 8;     // lanes per position row
  constexpr int TPW = 32 / LPT;  // positions per warp per load
  constexpr int TPB = kWarps * TPW;
  extern __shared__ float smem[];
  float* qs = smem;                            // [MAXG][D]
  float* scores = qs + MAXG * D;               // [MAXG][split_tokens]
  float* red = scores + MAXG * split_tokens;   // [kWarps - 1][MAXG][D]
  __shared__ float2 ml[MAXG];

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
    if (max_splits == 1) {  // no combine kernel runs: say so here
      for (int i = threadIdx.x; i < ng * D; i += kThreads) out[row0 * D + i] = __ushort_as_half(0x7e00);
    }
    return;
  }
  if (start >= len) return;  // an empty split: the combine kernel counts only the used ones
  const int n = min(len - start, split_tokens);

  for (int i = threadIdx.x; i < ng * D; i += kThreads) qs[i] = __half2float(q[row0 * D + i]) * scale;
  __syncthreads();

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
  auto load_slices = [&](const __half* __restrict__ src, int base, uint4 (&r)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + u * TPB + tw;
      r[u] = t < n ? __ldg(reinterpret_cast<const uint4*>(src + offset(t))) : make_uint4(0, 0, 0, 0);
    }
  };

  // 1. Scores.
  {
    float qr[MAXG][8];
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
#pragma unroll
      for (int j = 0; j < 8; ++j) qr[g][j] = g < ng ? qs[g * D + ds + j] : 0.0f;
    for (int base = warp * TPW; base < n; base += kUnroll * TPB) {  // warp-uniform
      uint4 kr[kUnroll];
      load_slices(keys, base, kr);
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
    }
  }
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
  for (int base = warp * TPW; base < n; base += kUnroll * TPB) {
    uint4 vr[kUnroll];
    load_slices(values, base, vr);
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
  if (warp > 0 || lane >= LPT) return;
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
    if (max_splits == 1) {
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

__global__ void DecodeCombineKernel(const float* __restrict__ ws_acc,
                                    const float2* __restrict__ ws_ml,
                                    const int32_t* __restrict__ seq_lens, int heads, int head_dim,
                                    int split_tokens, int max_splits, int max_seq_len,
                                    __half* __restrict__ out) {
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

template <int D, int MAXG>
void LaunchSplit(const DecodeAttentionPlan& p, dim3 grid, size_t smem, cudaStream_t stream,
                 const uint16_t* q, const PagedKvView& kv, const int32_t* tables,
                 int64_t table_stride, const int32_t* seq_lens, int gchunks, float* ws_acc,
                 float2* ws_ml, uint16_t* out) {
  DecodeSplitKernel<D, MAXG><<<grid, kThreads, smem, stream>>>(
      reinterpret_cast<const __half*>(q), reinterpret_cast<const __half*>(kv.keys),
      reinterpret_cast<const __half*>(kv.values), kv.block_stride, kv.block_seq_len, tables,
      table_stride, seq_lens, static_cast<int>(p.shape.heads), static_cast<int>(p.shape.kv_heads),
      gchunks, p.split_tokens, p.max_splits, static_cast<int>(p.max_seq_len),
      static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))), ws_acc, ws_ml,
      reinterpret_cast<__half*>(out));
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
  int64_t st;
  if (split_tokens > 0) {
    st = round_up(split_tokens, kSplitGranule);
  } else {
    int device = 0, sms = 0;
    NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
    NIBBLE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t splits = std::max<int64_t>(1, (4 * sms + units - 1) / units);
    st = std::clamp<int64_t>(round_up((max_seq_len + splits - 1) / splits, kSplitGranule),
                             kSplitGranule, kMaxSplitTokens);
  }
  st = std::min(st, round_up(max_seq_len, kSplitGranule));
  *plan = DecodeAttentionPlan{};
  plan->shape = shape;
  plan->num_seqs = num_seqs;
  plan->max_seq_len = max_seq_len;
  plan->split_tokens = static_cast<int32_t>(st);
  plan->max_splits = static_cast<int32_t>((max_seq_len + st - 1) / st);
  plan->workspace_bytes = plan->max_splits == 1
                              ? 0
                              : num_seqs * shape.heads * plan->max_splits *
                                    static_cast<int64_t>(shape.head_dim * sizeof(float) + sizeof(float2));
  return cudaSuccess;
}

cudaError_t PagedDecodeAttention(const DecodeAttentionPlan& plan, const uint16_t* q,
                                 const PagedKvView& kv, const int32_t* block_tables,
                                 int64_t block_table_stride, const int32_t* seq_lens,
                                 int64_t num_seqs, void* workspace, uint16_t* out,
                                 cudaStream_t stream) {
  const DecodeAttentionShape& s = plan.shape;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!ShapeOk(s) || plan.split_tokens <= 0 || plan.max_splits <= 0 || num_seqs < 0 ||
      num_seqs > plan.num_seqs || kv.block_seq_len <= 0 || kv.block_stride % 8 != 0 ||
      !aligned(kv.keys) || !aligned(kv.values) || !aligned(out) || q == nullptr ||
      block_tables == nullptr || seq_lens == nullptr || block_table_stride < 0 ||
      (plan.max_splits > 1 && (workspace == nullptr || !aligned(workspace)))) {
    std::fprintf(stderr, "%s:%d: PagedDecodeAttention: bad arguments\n", __FILE__, __LINE__);
    return cudaErrorInvalidValue;
  }
  if (num_seqs == 0) return cudaSuccess;
  const int64_t group = s.heads / s.kv_heads;
  const int maxg = MaxGroupFor(group);
  const int gchunks = static_cast<int>((group + maxg - 1) / maxg);
  const dim3 grid(static_cast<unsigned>(s.kv_heads * gchunks), static_cast<unsigned>(num_seqs),
                  static_cast<unsigned>(plan.max_splits));
  const size_t smem = static_cast<size_t>(maxg) * (4 * s.head_dim + plan.split_tokens) * sizeof(float);
  // Workspace: the partial outputs [num_seqs][heads][max_splits][head_dim] fp32, then
  // (max, sum) [num_seqs][heads][max_splits] float2.
  float* ws_acc = static_cast<float*>(workspace);
  float2* ws_ml = plan.max_splits > 1
                      ? reinterpret_cast<float2*>(ws_acc + plan.num_seqs * s.heads * plan.max_splits * s.head_dim)
                      : nullptr;
#define NIBBLE_SPLIT(D, G) \
  LaunchSplit<D, G>(plan, grid, smem, stream, q, kv, block_tables, block_table_stride, seq_lens, gchunks, ws_acc, ws_ml, out)
  if (s.head_dim == 128) {
    if (maxg == 4) NIBBLE_SPLIT(128, 4); else NIBBLE_SPLIT(128, 8);
  } else if (s.head_dim == 64) {
    if (maxg == 4) NIBBLE_SPLIT(64, 4); else NIBBLE_SPLIT(64, 8);
  } else {
    if (maxg == 4) NIBBLE_SPLIT(8, 4); else NIBBLE_SPLIT(8, 8);
  }
#undef NIBBLE_SPLIT
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (plan.max_splits > 1) {
    const int threads = static_cast<int>((s.head_dim + 31) / 32 * 32);
    DecodeCombineKernel<<<dim3(static_cast<unsigned>(s.heads), static_cast<unsigned>(num_seqs)), threads,
                          plan.max_splits * sizeof(float), stream>>>(
        ws_acc, ws_ml, seq_lens, static_cast<int>(s.heads), static_cast<int>(s.head_dim),
        plan.split_tokens, plan.max_splits, static_cast<int>(plan.max_seq_len),
        reinterpret_cast<__half*>(out));
    NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace nibble::kernels::cuda
