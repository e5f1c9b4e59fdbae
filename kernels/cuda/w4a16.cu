// W4A16 kernels; the layout they read is drawn in w4a16_layout.h.
//
// The decode kernel (W4A16DecodeKernel, small m, described at its definition; its chunks in
// flight in registers or, since run 24, in a per-thread shared-memory ring), the tensor-core
// GEMM (W4A16GemmKernel, 16..256 tokens, split-k with a workspace; described at its definition),
// DequantizeW4A16 (the engine's route from 257 tokens on) and the first version's mma kernel,
// whose one instantiation is tiled64 (its decode instantiations, the v0 decode kernels, were the
// benchmarks' baseline until run 22; only what the dispatcher can pick is instantiated, to keep
// the multi-architecture build short). The mma kernel:
//   TT: tiles of 8 tokens per block (the mma's n dimension); 1 and 2 for decode, 8 for batches.
//   WN: warps along the output features, each owning a 16-feature tile (the mma's m dimension).
//   WK: warps along k, each taking every WK-th 64-k chunk; partial sums meet in shared memory.
// Each thread: one 16-byte load of weights = 4 mma A fragments (64 k x 16 features), dequantized
// with lop3 + the 0x6400 magic (no I2F/F2F), one hsub2/hfma2 for the zero and one hmul2 for the
// scale (the weight rounded once to fp16, as every fp16 kernel does), then per token tile two
// 16-byte activation loads (the thread's 16 contiguous k) and 4 mma.sync m16n8k16 with fp32
// accumulators.
#include "kernels/cuda/w4a16.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>

#include <cuda_fp16.h>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cp_async.h"
#include "kernels/cuda/dependent_launch.h"
#include "kernels/cuda/weight_load.h"

namespace nibble::kernels::cuda {
namespace {

__device__ __forceinline__ uint32_t Lop3AndOr(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;  // (a & b) | c
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

__device__ __forceinline__ uint32_t H2U(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 U2H(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

__device__ __forceinline__ uint4 LoadWeightsNoHint(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void PrefetchL1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

__device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Per-thread constants of one group for its two feature rows (g and g + 8).
struct GroupConsts {
  half2 zlo;    // 1024 + z0: (1024 + q) - (1024 + z0) = q - z0, exact
  half2 nzhi;   // -(64 + z1): (1024 + 16 q) / 16 - (64 + z1) = q - z1, exact in one fma
  half2 s0, s1;
};

__device__ __forceinline__ GroupConsts MakeGroupConsts(uint32_t zs0, uint32_t zs1) {
  GroupConsts gc;
  const __half z0 = __ushort_as_half(static_cast<unsigned short>(zs0 >> 16));
  const __half z1 = __ushort_as_half(static_cast<unsigned short>(zs1 >> 16));
  gc.zlo = __half2half2(__hadd(z0, __float2half(1024.0f)));
  gc.nzhi = __half2half2(__hneg(__hadd(z1, __float2half(64.0f))));
  gc.s0 = __half2half2(__ushort_as_half(static_cast<unsigned short>(zs0 & 0xffff)));
  gc.s1 = __half2half2(__ushort_as_half(static_cast<unsigned short>(zs1 & 0xffff)));
  return gc;
}

// One word (8 nibbles, w4a16_layout.h) -> the 4 registers of an mma A fragment.
__device__ __forceinline__ void Dequant(uint32_t w, const GroupConsts& gc, uint32_t* a) {
  constexpr uint32_t kLo = 0x000f000f, kHi = 0x00f000f0, kMagic = 0x64006400;  // 1024.0 x2
  const half2 kSixteenth = __half2half2(__float2half(1.0f / 16.0f));
  const uint32_t lo0 = Lop3AndOr(w, kLo, kMagic), hi0 = Lop3AndOr(w, kHi, kMagic);
  w >>= 8;
  const uint32_t lo1 = Lop3AndOr(w, kLo, kMagic), hi1 = Lop3AndOr(w, kHi, kMagic);
  a[0] = H2U(__hmul2(__hsub2(U2H(lo0), gc.zlo), gc.s0));
  a[1] = H2U(__hmul2(__hfma2(U2H(hi0), kSixteenth, gc.nzhi), gc.s1));
  a[2] = H2U(__hmul2(__hsub2(U2H(lo1), gc.zlo), gc.s0));
  a[3] = H2U(__hmul2(__hfma2(U2H(hi1), kSixteenth, gc.nzhi), gc.s1));
}

// As Dequant, without the scale: (q - z) exact in fp16, for kernels that apply the scale to the
// fp32 mma result (a 64-k chunk within one group: group >= 64).
__device__ __forceinline__ void DequantNoScale(uint32_t w, const GroupConsts& gc, uint32_t* a) {
  constexpr uint32_t kLo = 0x000f000f, kHi = 0x00f000f0, kMagic = 0x64006400;
  const half2 kSixteenth = __half2half2(__float2half(1.0f / 16.0f));
  const uint32_t lo0 = Lop3AndOr(w, kLo, kMagic), hi0 = Lop3AndOr(w, kHi, kMagic);
  w >>= 8;
  const uint32_t lo1 = Lop3AndOr(w, kLo, kMagic), hi1 = Lop3AndOr(w, kHi, kMagic);
  a[0] = H2U(__hsub2(U2H(lo0), gc.zlo));
  a[1] = H2U(__hfma2(U2H(hi0), kSixteenth, gc.nzhi));
  a[2] = H2U(__hsub2(U2H(lo1), gc.zlo));
  a[3] = H2U(__hfma2(U2H(hi1), kSixteenth, gc.nzhi));
}

// A thread's 16-byte weight piece (4 words: 64 k of its two rows) -> its 4 mma A fragments.
__device__ __forceinline__ void DequantPiece(const uint4& w, const GroupConsts& gc,
                                             uint32_t (&a)[4][4]) {
  Dequant(w.x, gc, a[0]);
  Dequant(w.y, gc, a[1]);
  Dequant(w.z, gc, a[2]);
  Dequant(w.w, gc, a[3]);
}

// The 4 mma of a 64-k piece for one token group: xa / xb are the thread's 16 activations.
__device__ __forceinline__ void MmaPiece(float* c, const uint32_t (&a)[4][4], const uint4& xa,
                                         const uint4& xb) {
  Mma(c, a[0], xa.x, xa.y);
  Mma(c, a[1], xa.z, xa.w);
  Mma(c, a[2], xb.x, xb.y);
  Mma(c, a[3], xb.z, xb.w);
}

// The 16 activations x[tok][kb .. kb + 15], zero outside [0, m) x [0, k). `vec`: rows are
// 16-byte aligned (k % 8 == 0), so whole 8-element pieces are in or out.
__device__ __forceinline__ void LoadX16(const __half* x, int tok, int kb, int m, int k, bool vec,
                                        uint4& xa, uint4& xb) {
  xa = make_uint4(0, 0, 0, 0);
  xb = xa;
  if (tok >= m || kb >= k) return;
  const __half* row = x + static_cast<size_t>(tok) * k;
  if (vec) {
    xa = __ldg(reinterpret_cast<const uint4*>(row + kb));
    if (kb + 8 < k) xb = __ldg(reinterpret_cast<const uint4*>(row + kb + 8));
    return;
  }
  unsigned short v[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) v[i] = kb + i < k ? __ldg(reinterpret_cast<const unsigned short*>(row) + kb + i) : 0;
  xa = make_uint4(v[0] | (v[1] << 16), v[2] | (v[3] << 16), v[4] | (v[5] << 16), v[6] | (v[7] << 16));
  xb = make_uint4(v[8] | (v[9] << 16), v[10] | (v[11] << 16), v[12] | (v[13] << 16),
                  v[14] | (v[15] << 16));
}

// The mma C fragment of a 16-feature tile: c0, c1 = feature g, tokens 2t, 2t + 1; c2, c3 =
// feature g + 8, the same tokens. Calls f(tt, r, token, feature) for this thread's outputs
// acc[tt][r] that lie inside [0, m) x [0, n).
template <int TT, typename F>
__device__ __forceinline__ void ForEachTileOutput(int m, int n, int tile, int tok0, int g, int t,
                                                  F&& f) {
  const int row0 = tile * 16 + g;
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int tk = tok0 + tt * 8 + 2 * t + (r & 1);
      const int row = row0 + (r < 2 ? 0 : 8);
      if (tk < m && row < n) f(tt, r, tk, row);
    }
  }
}

// Writes a 16-feature tile's accumulators (+ bias) to y as fp16. (Its own loop rather than
// ForEachTileOutput's: this form, with the bias read once per row, is the one the GEMM and
// decode kernels were measured with; the lambda form reads it per output and changed their
// code, tests/gpu/NOTES.md run 25.)
template <int TT>
__device__ __forceinline__ void StoreTile(const float (&acc)[TT][4], const float* bias, __half* y,
                                          int m, int n, int tile, int tok0, int g, int t) {
  const int row0 = tile * 16 + g, row1 = row0 + 8;
  const float b0 = bias != nullptr && row0 < n ? bias[row0] : 0.0f;
  const float b1 = bias != nullptr && row1 < n ? bias[row1] : 0.0f;
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) {
    const int tok = tok0 + tt * 8 + 2 * t;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int tk = tok + (r & 1);
      const int row = r < 2 ? row0 : row1;
      if (tk < m && row < n) {
        y[static_cast<size_t>(tk) * n + row] = __float2half_rn(acc[tt][r] + (r < 2 ? b0 : b1));
      }
    }
  }
}

// The decode kernel's fusions (W4A16Fusion in w4a16.h, as the kernel reads it): x_sumsq null
// = no folded norm; norm_weight null = no residual epilogue.
struct DecodeFusionArgs {
  const float* x_sumsq;  // [m][x_parts]
  int x_parts;
  float x_eps, x_inv_c;
  const __half* norm_weight;  // [n]
  float norm_c;
  __half* normed;   // [m][n]
  float* sumsq;     // [m][n_pad / 16]
};

// Gated (the stacked [gate | up] product, n = 2 * half): the gate tile's accumulators (+ bias)
// and the up tile's (tile + up_tiles) are each rounded to fp16, as the product's output would
// be, and y[tok][row] = silu(gate) * up is formed as SiluMulKernel forms it (ops.cu). (Not bit
// for bit the product then SiLU·mul: the gated launch may split k over another number of
// warps, so its fp32 sums may round differently.) y is [m][half].
template <int TT>
__device__ __forceinline__ void StoreGatedTile(const float (&gate)[TT][4], const float (&up)[TT][4],
                                               const float* bias, __half* y, int m, int n,
                                               int tile, int up_tiles, int tok0, int g, int t) {
  const int half = n / 2;
  ForEachTileOutput<TT>(m, half, tile, tok0, g, t, [&](int tt, int r, int tk, int row) {
    const int up_row = row + 16 * up_tiles;
    const float gb = bias != nullptr ? bias[row] : 0.0f, ub = bias != nullptr ? bias[up_row] : 0.0f;
    const float gv = __half2float(__float2half_rn(gate[tt][r] + gb));
    const float uv = __half2float(__float2half_rn(up[tt][r] + ub));
    y[static_cast<size_t>(tk) * half + row] = __float2half_rn(gv / (1.0f + expf(-gv)) * uv);
  });
}

// The residual epilogue: y is the residual stream [m][n]; y += the product (+ bias) rounded to
// fp16, the sum rounded to fp16 (AddRmsNorm's x, bit for bit); then the next norm's inputs:
// normed = fp16(y * (norm_weight * norm_c)) and this tile's sum of y^2 over its 16 features per
// token into sumsq[tok][tile] (rows >= n count zero), reduced over the 8 lanes that hold a
// token's features in a fixed order (deterministic).
template <int TT>
__device__ __forceinline__ void StoreResidualTile(const float (&acc)[TT][4], const float* bias,
                                                  __half* y, int m, int n, int tile, int tok0,
                                                  int g, int t, const DecodeFusionArgs& f) {
  float sq[TT][2] = {};
  ForEachTileOutput<TT>(m, n, tile, tok0, g, t, [&](int tt, int r, int tk, int row) {
    const size_t at = static_cast<size_t>(tk) * n + row;
    const float b = bias != nullptr ? bias[row] : 0.0f;
    const float v = __half2float(__float2half_rn(acc[tt][r] + b));
    const float sum = __half2float(__float2half_rn(__half2float(y[at]) + v));
    y[at] = __float2half_rn(sum);
    f.normed[at] = __float2half_rn(sum * (__half2float(f.norm_weight[row]) * f.norm_c));
    sq[tt][r & 1] = fmaf(sum, sum, sq[tt][r & 1]);
  });
  const int parts = static_cast<int>(gridDim.x);
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      sq[tt][0] += __shfl_xor_sync(0xffffffffu, sq[tt][0], o);
      sq[tt][1] += __shfl_xor_sync(0xffffffffu, sq[tt][1], o);
    }
    const int tok = tok0 + tt * 8 + 2 * t;
    if (g == 0) {
      if (tok < m) f.sumsq[static_cast<size_t>(tok) * parts + tile] = sq[tt][0];
      if (tok + 1 < m) f.sumsq[static_cast<size_t>(tok + 1) * parts + tile] = sq[tt][1];
    }
  }
}

template <int TT, int WN, int WK>
__global__ void __launch_bounds__(32 * WN * WK)
    W4A16MmaKernel(const __half* __restrict__ x, const uint4* __restrict__ qw,
                   const uint32_t* __restrict__ zs, const float* __restrict__ bias,
                   __half* __restrict__ y, int m, int n, int k, int n_pad, int k_chunks,
                   int group_shift, bool x_vec) {
  // Loads in flight per thread: 64 bytes for decode (a warp keeps 2 KB of weights in flight;
  // 8 loads, 86 registers, ran 1.4x slower at m = 1 on the H100: NOTES.md),
  // 32 for the batched variant, whose accumulators need the registers.
  constexpr int kPf = TT <= 2 ? 4 : 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wn = warp % WN, wk = warp / WN;
  const int g = lane / 4, t = lane % 4;
  const int tile = blockIdx.x * WN + wn;
  const int tok0 = blockIdx.y * 8 * TT;
  const bool tile_ok = tile < n_pad / 16;
  const int my_chunks = tile_ok && wk < k_chunks ? (k_chunks - wk + WK - 1) / WK : 0;

  const uint64_t policy = EvictFirstPolicy();

  float acc[TT][4];
#pragma unroll
  for (int i = 0; i < TT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

  const uint4* wp = qw + static_cast<size_t>(tile) * k_chunks * 32 + lane;
  const int groups_pad = (k_chunks * 64 + (1 << group_shift) - 1) >> group_shift;
  const uint32_t* zs_row = zs + static_cast<size_t>(tile) * groups_pad * 16 + g;

  uint4 ring[kPf];
#pragma unroll
  for (int s = 0; s < kPf; ++s) {
    if (s < my_chunks) ring[s] = LoadWeights(wp + static_cast<size_t>(wk + s * WK) * 32, policy);
  }
  for (int i0 = 0; i0 < my_chunks; i0 += kPf) {
#pragma unroll
    for (int s = 0; s < kPf; ++s) {
      const int i = i0 + s;
      if (i < my_chunks) {
        const uint4 w = ring[s];
        if (i + kPf < my_chunks) {
          ring[s] = LoadWeights(wp + static_cast<size_t>(wk + (i + kPf) * WK) * 32, policy);
        }
        const int kb = (wk + i * WK) * 64 + 16 * t;
        const uint32_t* zg = zs_row + (kb >> group_shift) * 16;
        const GroupConsts gc = MakeGroupConsts(__ldg(zg), __ldg(zg + 8));
        uint32_t a[4][4];
        DequantPiece(w, gc, a);
#pragma unroll
        for (int tt = 0; tt < TT; ++tt) {
          uint4 xa, xb;
          LoadX16(x, tok0 + tt * 8 + g, kb, m, k, x_vec, xa, xb);
          MmaPiece(acc[tt], a, xa, xb);
        }
      }
    }
  }

  if constexpr (WK > 1) {
    // Split-k partial sums: warps wk > 0 hand theirs to warp wk == 0 of the same tile.
    __shared__ float partial[WK - 1][WN][TT * 4][32];
    if (wk > 0) {
#pragma unroll
      for (int tt = 0; tt < TT; ++tt)
#pragma unroll
        for (int r = 0; r < 4; ++r) partial[wk - 1][wn][tt * 4 + r][lane] = acc[tt][r];
    }
    __syncthreads();
    if (wk == 0) {
#pragma unroll
      for (int w = 0; w < WK - 1; ++w)
#pragma unroll
        for (int tt = 0; tt < TT; ++tt)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[tt][r] += partial[w][wn][tt * 4 + r][lane];
    }
  }
  if (wk != 0 || !tile_ok) return;
  StoreTile<TT>(acc, bias, y, m, n, tile, tok0, g, t);
}

// The decode kernel (m <= 64): one 16-feature tile per block (grid.x; the gated kernel: a gate
// tile and its up tile), 8 * TT tokens per block
// row (grid.y), the k chunks split into contiguous runs over the block's `warps` warps (chosen at
// run time so that all blocks are resident at once where possible: LaunchDecode). Each warp keeps
// KPF chunks in flight: the 16-byte weight load *and* the two scale/zero words of that chunk's
// group (v0 loaded scale/zero inside the loop, one dependent memory latency per chunk: NOTES.md
// run 4), in registers, or (FLAGS & 8, the ring) in a ring of KPF slots in shared memory private
// to each thread, filled by cp.async: there the depth costs shared memory instead of registers
// (decode8 in registers is 64 registers with 4 in flight; 8 in flight took 86-90 registers and
// as many fewer warps per SM: NOTES.md runs 2 and 4). A thread reads only the slots it filled,
// so cp.async.wait_group alone orders them: no barrier, no lockstep between warps (which held
// back run 16's bulk-copy ring, since removed). Measured (run 24, H100): with PDL the ring is
// 7-29 % faster than the registers on every 7B and 1.8B shape, since it has twice the weight on
// its way before griddepcontrol.wait; plain launches are within -7 .. +4 %. Partial sums of the
// warps meet in shared memory; warp 0 writes y.
// (A 64-register cap, __launch_bounds__(512, 2), spilled 68-196 bytes: not used.)
template <int TT, int KPF, int FLAGS>
__global__ void __launch_bounds__(512)
    W4A16DecodeKernel(const __half* __restrict__ x, const uint4* __restrict__ qw,
                      const uint32_t* __restrict__ zs, const float* __restrict__ bias,
                      __half* __restrict__ y, int m, int n, int k, int n_pad, int k_chunks,
                      int chunks_per_warp, int group_shift, bool x_vec, bool fold_scale,
                      DecodeFusionArgs fusion) {
  // [warps - 1][tiles * TT * 4][32] partial sums and (the ring) [KPF][threads] weight pieces and
  // [KPF][threads] scale/zero pairs (DecodeSmemBytes): the partial sums first, except in the
  // gated kernel. There ptxas (CUDA 13.0, sm_90) addressed the first cp.async from a uniform
  // register it never set (compute-sanitizer: shared writes at -1 KB; tests/gpu/NOTES.md run
  // 25; see also the gated fill below), so its ring comes first, at a constant address.
  // The two declarations (the same memory) and the two stores below keep each kernel's machine
  // code as it was measured and tested: the plain kernels' as before the fusions (run 24),
  // the fused kernels' as in run 25f (sm_90 cubins compared instruction for instruction).
  extern __shared__ float decode_smem[];
  extern __shared__ uint4 fused_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int tile = blockIdx.x;
  const int tok0 = blockIdx.y * 8 * TT;
  // Chunks c0 + cs * i, i < nch: a contiguous run per warp, or (flags & 2) interleaved.
  // FLAGS (0, 4, 8, 12, 28, 40 and 44 are instantiated): 1 = weight loads without the
  // evict-first hint, 2 = chunks interleaved over the block's warps (both measured no faster on
  // the H100, NOTES.md run 6), 8 = the shared-memory ring, 16 = gated (with the ring only):
  // the block multiplies two tiles, gate tile blockIdx.x and up tile blockIdx.x + gridDim.x of
  // the stacked [gate | up] weight, with the same activations, and writes silu(gate) * up
  // (StoreGatedTile).
  constexpr bool interleave = (FLAGS & 2) != 0, no_hint = (FLAGS & 1) != 0;
  constexpr bool ring = (FLAGS & 8) != 0;
  constexpr bool gated = (FLAGS & 16) != 0;
  // FLAGS & 32 (and gated): the fusions (DecodeFusionArgs) are read; without it the kernel
  // compiles to the code measured before them (run 24) and ignores `fusion`.
  constexpr bool fused = (FLAGS & 32) != 0 || gated;
  static_assert(!fused || ring, "the fusions run on the ring");
  constexpr int kTiles = gated ? 2 : 1;
  // FLAGS & 4 (kDecode8Pdl, kDecode8RingPdl: the engine's): programmatic dependent launch
  // (dependent_launch.h). The next kernel may launch at once; this one issues its first KPF
  // weight and scale/zero loads (constant data) before waiting for the previous kernel, then
  // reads x and writes y.
  if constexpr ((FLAGS & 4) != 0) AllowDependentLaunch();
  const int c0 = interleave ? warp : warp * chunks_per_warp;
  const int cs = interleave ? warps : 1;
  const int nch = interleave ? max(0, (k_chunks - warp + warps - 1) / warps)
                             : max(0, min(chunks_per_warp, k_chunks - c0));

  const uint64_t policy = EvictFirstPolicy();

  float acc[kTiles][TT][4];
#pragma unroll
  for (int h = 0; h < kTiles; ++h)
#pragma unroll
    for (int i = 0; i < TT; ++i) acc[h][i][0] = acc[h][i][1] = acc[h][i][2] = acc[h][i][3] = 0.0f;

  const uint4* wp = qw + (static_cast<size_t>(tile) * k_chunks + c0) * 32 + lane;
  const int groups_pad = (k_chunks * 64 + (1 << group_shift) - 1) >> group_shift;
  const uint32_t* zs_row = zs + static_cast<size_t>(tile) * groups_pad * 16 + g;
  // Gated: the up tile's weight and scale/zero words lie gridDim.x tiles further on.
  const size_t up_w = static_cast<size_t>(gridDim.x) * k_chunks * 32;
  const size_t up_z = static_cast<size_t>(gridDim.x) * groups_pad * 16;
  const int kt = c0 * 64 + 16 * t;  // this thread's first k in the warp's first chunk
  // Whole 16-byte activation loads with no bounds checks when k is a multiple of 64.
  const bool x_whole = x_vec && k % 64 == 0;
  const __half* xrow[TT];
#pragma unroll
  for (int tt = 0; tt < TT; ++tt) {
    const int tok = tok0 + tt * 8 + g;
    xrow[tt] = tok < m ? x + static_cast<size_t>(tok) * k + kt : nullptr;
  }

  // Chunk i's activations (the thread's 16 k of each token group).
  const auto load_x = [&](int i, uint4 (&xa)[TT], uint4 (&xb)[TT]) {
#pragma unroll
    for (int tt = 0; tt < TT; ++tt) {
      if (x_whole) {
        xa[tt] = xb[tt] = make_uint4(0, 0, 0, 0);
        if (xrow[tt] != nullptr) {
          xa[tt] = __ldg(reinterpret_cast<const uint4*>(xrow[tt] + 64 * cs * i));
          xb[tt] = __ldg(reinterpret_cast<const uint4*>(xrow[tt] + 64 * cs * i + 8));
        }
      } else {
        LoadX16(x, tok0 + tt * 8 + g, kt + 64 * cs * i, m, k, x_vec, xa[tt], xb[tt]);
      }
    }
  };
  // Chunk i's weight piece dequantized into `a` (the scale folded in unless fold_scale).
  const auto dequant = [&](const uint4& w, const GroupConsts& gc, uint32_t (&a)[4][4]) {
    if (fold_scale) {
      DequantNoScale(w.x, gc, a[0]);
      DequantNoScale(w.y, gc, a[1]);
      DequantNoScale(w.z, gc, a[2]);
      DequantNoScale(w.w, gc, a[3]);
    } else {
      DequantPiece(w, gc, a);
    }
  };
  // The chunk's products added to acc (one tile's accumulators).
  const auto multiply = [&](const uint32_t (&a)[4][4], const GroupConsts& gc,
                            const uint4 (&xa)[TT], const uint4 (&xb)[TT], float (&acc)[TT][4]) {
    if (fold_scale) {
      // group >= 64: the whole chunk is one group; (q - z) exact, the scale applied in fp32.
      const float s0 = __half2float(__low2half(gc.s0)), s1 = __half2float(__low2half(gc.s1));
#pragma unroll
      for (int tt = 0; tt < TT; ++tt) {
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        MmaPiece(c, a, xa[tt], xb[tt]);
        acc[tt][0] = fmaf(s0, c[0], acc[tt][0]);
        acc[tt][1] = fmaf(s0, c[1], acc[tt][1]);
        acc[tt][2] = fmaf(s1, c[2], acc[tt][2]);
        acc[tt][3] = fmaf(s1, c[3], acc[tt][3]);
      }
    } else {
#pragma unroll
      for (int tt = 0; tt < TT; ++tt) MmaPiece(acc[tt], a, xa[tt], xb[tt]);
    }
  };

  constexpr int kAcc = kTiles * TT * 4;  // accumulators per thread
  // After WaitForPriorGrid (the fused kernels): the epilogue's inputs written by the kernels
  // before (the folded norm's partial sums, the residual rows of this tile) asked into L1, so
  // that the block's tail finds them there instead of waiting on L2 round trips.
  const auto prefetch_epilogue = [&]() {
    if (fusion.x_sumsq != nullptr) {
      for (int j = warp; j < 8 * TT && tok0 + j < m; j += warps) {
        const float* parts = fusion.x_sumsq + static_cast<size_t>(tok0 + j) * fusion.x_parts;
        for (int p = lane * 32; p < fusion.x_parts; p += 32 * 32) PrefetchL1(parts + p);
      }
    }
    if (fusion.norm_weight != nullptr && warp == 0 && lane < 8 * TT && tok0 + lane < m) {
      PrefetchL1(y + static_cast<size_t>(tok0 + lane) * n + tile * 16);
    }
  };
  constexpr bool ring_first = gated;
  float* partial =
      !fused ? decode_smem
             : reinterpret_cast<float*>(ring_first ? fused_smem + KPF * blockDim.x * 3 / 2
                                                   : fused_smem);
  if constexpr (ring) {
    uint4* ring_w =
        ring_first ? fused_smem : reinterpret_cast<uint4*>(partial + (warps - 1) * kAcc * 32);
    uint2* ring_z = reinterpret_cast<uint2*>(ring_w + KPF * blockDim.x);
    // Item j = tile j % kTiles of chunk j / kTiles (if any) into slot j % KPF; one commit group
    // per item, empty past the end, so that "at most KPF - 1 groups in flight" always means
    // "item j has landed".
    const auto fill = [&](int j) {
      if (j < nch * kTiles) {
        const int i = j / kTiles, h = j % kTiles;
        const int slot = (j % KPF) * blockDim.x + threadIdx.x;
        if constexpr (gated) {
          // Without the evict-first hint: with it, ptxas (CUDA 13.0, sm_90) gave this kernel's
          // first cp.async an odd uniform register pair as its cache-policy descriptor (an
          // illegal instruction; tests/gpu/NOTES.md run 25). The hint was measured worth
          // nothing on the decode kernel (FLAGS & 1, run 6).
          CpAsync16(SmemAddr(ring_w + slot), wp + h * up_w + i * cs * 32, true);
        } else {
          CpAsync16Hint(SmemAddr(ring_w + slot), wp + h * up_w + i * cs * 32, true, policy);
        }
        const uint32_t* zg = zs_row + h * up_z + ((kt + 64 * cs * i) >> group_shift) * 16;
        CpAsync4(SmemAddr(&ring_z[slot].x), zg);
        CpAsync4(SmemAddr(&ring_z[slot].y), zg + 8);
      }
      CpAsyncCommit();
    };
#pragma unroll
    for (int s = 0; s < KPF; ++s) fill(s);
    if constexpr ((FLAGS & 4) != 0) WaitForPriorGrid();
    if constexpr (fused) prefetch_epilogue();
    for (int i = 0; i < nch; ++i) {
      uint4 xa[TT], xb[TT];
      load_x(i, xa, xb);  // issued before the wait: its latency hides behind the weight's
#pragma unroll
      for (int h = 0; h < kTiles; ++h) {
        const int j = i * kTiles + h;
        CpAsyncWait<KPF - 1>();
        const int slot = (j % KPF) * blockDim.x + threadIdx.x;
        const uint4 w = ring_w[slot];
        const uint2 z = ring_z[slot];
        const GroupConsts gc = MakeGroupConsts(z.x, z.y);
        uint32_t a[4][4];
        dequant(w, gc, a);
        // The slot's refill, after the reads above have been consumed (in-order issue: the
        // thread's shared reads of the slot are complete before its next copy into it starts).
        fill(j + KPF);
        multiply(a, gc, xa, xb, acc[h]);
      }
    }
    CpAsyncWait<0>();  // no copy outlives the block (all of them are empty groups by now)
  } else {
    uint4 rw[KPF];
    uint32_t rz0[KPF], rz1[KPF];
#pragma unroll
    for (int s = 0; s < KPF; ++s) {
      if (s < nch) {
        rw[s] = no_hint ? LoadWeightsNoHint(wp + s * cs * 32)
                        : LoadWeights(wp + s * cs * 32, policy);
        const uint32_t* zg = zs_row + ((kt + 64 * cs * s) >> group_shift) * 16;
        rz0[s] = __ldg(zg);
        rz1[s] = __ldg(zg + 8);
      }
    }
    if constexpr ((FLAGS & 4) != 0) WaitForPriorGrid();
    for (int i0 = 0; i0 < nch; i0 += KPF) {
#pragma unroll
      for (int s = 0; s < KPF; ++s) {
        const int i = i0 + s;
        if (i < nch) {
          uint4 xa[TT], xb[TT];
          load_x(i, xa, xb);
          const uint4 w = rw[s];
          const GroupConsts gc = MakeGroupConsts(rz0[s], rz1[s]);
          if (i + KPF < nch) {
            const uint4* next = wp + (i + KPF) * cs * 32;
            rw[s] = no_hint ? LoadWeightsNoHint(next) : LoadWeights(next, policy);
            const uint32_t* zg = zs_row + ((kt + 64 * cs * (i + KPF)) >> group_shift) * 16;
            rz0[s] = __ldg(zg);
            rz1[s] = __ldg(zg + 8);
          }
          uint32_t a[4][4];
          dequant(w, gc, a);
          multiply(a, gc, xa, xb, acc[0]);
        }
      }
    }
  }

  if constexpr (!fused) {
    // Partial sums of the warps meet in shared memory; warp 0 writes y.
    if (warps > 1) {
      if (warp > 0) {
        float* p = partial + (warp - 1) * TT * 4 * 32 + lane;
#pragma unroll
        for (int tt = 0; tt < TT; ++tt)
#pragma unroll
          for (int r = 0; r < 4; ++r) p[(tt * 4 + r) * 32] = acc[0][tt][r];
      }
      __syncthreads();
      if (warp > 0) return;
      for (int w = 0; w < warps - 1; ++w) {
        const float* p = partial + w * TT * 4 * 32 + lane;
#pragma unroll
        for (int tt = 0; tt < TT; ++tt)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[0][tt][r] += p[(tt * 4 + r) * 32];
      }
    }
    StoreTile<TT>(acc[0], bias, y, m, n, tile, tok0, g, t);
  } else {
    if (warps > 1 && warp > 0) {
      float* p = partial + (warp - 1) * kAcc * 32 + lane;
#pragma unroll
      for (int h = 0; h < kTiles; ++h)
#pragma unroll
        for (int tt = 0; tt < TT; ++tt)
#pragma unroll
          for (int r = 0; r < 4; ++r) p[((h * TT + tt) * 4 + r) * 32] = acc[h][tt][r];
    }
    // The folded RMSNorm's per-token scale (DecodeFusionArgs), by every warp, after the main
    // loop: the partial sums were written by the kernel before this one, so they are read after
    // WaitForPriorGrid (asked into L1 then: prefetch_epilogue), and reading them here keeps
    // their latency off the weight stream.
    __shared__ float row_scale[8 * TT];
    const bool scaled = fusion.x_sumsq != nullptr;
    if (scaled) {
      for (int j = warp; j < 8 * TT; j += warps) {
        const int tok = tok0 + j;
        float s = 0.0f;
        if (tok < m) {
          // Eight independent loads in flight per lane (256 partials a token at hidden 4096).
          const float* parts = fusion.x_sumsq + static_cast<size_t>(tok) * fusion.x_parts;
#pragma unroll 8
          for (int p = lane; p < fusion.x_parts; p += 32) s += parts[p];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) {
          row_scale[j] = fusion.x_inv_c / sqrtf(s / static_cast<float>(k) + fusion.x_eps);
        }
      }
    }
    if (warps > 1 || scaled) __syncthreads();
    if (warp > 0) return;
    for (int w = 0; w < warps - 1; ++w) {
      const float* p = partial + w * kAcc * 32 + lane;
#pragma unroll
      for (int h = 0; h < kTiles; ++h)
#pragma unroll
        for (int tt = 0; tt < TT; ++tt)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[h][tt][r] += p[((h * TT + tt) * 4 + r) * 32];
    }
    if (scaled) {
#pragma unroll
      for (int h = 0; h < kTiles; ++h)
#pragma unroll
        for (int tt = 0; tt < TT; ++tt)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[h][tt][r] *= row_scale[tt * 8 + 2 * t + (r & 1)];
    }
    if constexpr (gated) {
      StoreGatedTile<TT>(acc[0], acc[1], bias, y, m, n, tile, gridDim.x, tok0, g, t);
    } else if (fusion.norm_weight != nullptr) {
      StoreResidualTile<TT>(acc[0], bias, y, m, n, tile, tok0, g, t, fusion);
    } else {
      ForEachTileOutput<TT>(m, n, tile, tok0, g, t, [&](int tt, int r, int tk, int row) {
        const float b = bias != nullptr ? bias[row] : 0.0f;
        y[static_cast<size_t>(tk) * n + row] = __float2half_rn(acc[0][tt][r] + b);
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The tensor-core GEMM for medium m (W4A16GemmKernel): a block owns WN * TN 16-feature tiles and
// WM * TM * 8 tokens over its k range (all of k, or one split of it: blockIdx.z), so each weight
// tile is read once per block of tokens (decode16 re-reads it per 16 tokens). Instantiated:
// 8 tiles x 16 tokens (6 stages) and 8 tiles x 32 tokens (5 stages), 4 warps each; 64- and
// 128-token blocks (256 threads) were slower at every m (tests/gpu/NOTES.md run 13). Per 64-k chunk, one pipeline stage in shared
// memory holds the block's weight pieces (the device layout's 512-byte tile-chunks, copied as
// they are: each lane later reads its own 16 bytes = 4 A fragments), the tiles' scale/zero words
// (two groups' worth, for group 32) and the activations [tokens][64 k] (16-byte units, unit
// index xor (row & 1): the two 16-byte reads per thread of rows g and g + 1 fall in other banks).
// STAGES stages filled by cp.async (zero-filled outside m, k and n), STAGES - 1 chunks in flight
// while one is computed: the depth costs shared memory, not registers. Each warp owns TN tiles x
// TM token groups: per chunk it dequantizes its TN weight pieces once (lop3 + 0x6400, fp16 scale
// per weight, as Dequant) and issues 4 * TN * TM mma.sync m16n8k16 with fp32 accumulators.
// Needs x rows 16-byte aligned (k % 8 == 0, x aligned): MatMulW4A16 falls back to decode16.

template <int WN, int WM, int TN, int TM>
struct GemmShape {
  static constexpr int kTiles = WN * TN;      // 16-feature tiles per block
  static constexpr int kRows = WM * TM * 8;   // tokens per block
  static constexpr int kThreads = 32 * WN * WM;
  static constexpr int kWBytes = kTiles * 512, kZBytes = kTiles * 128, kXBytes = kRows * 128;
  static constexpr int kStageBytes = kWBytes + kZBytes + kXBytes;
};

template <int WN, int WM, int TN, int TM, int STAGES>
__global__ void __launch_bounds__(32 * WN * WM)
    W4A16GemmKernel(const __half* __restrict__ x, const uint4* __restrict__ qw,
                    const uint32_t* __restrict__ zs, const float* __restrict__ bias,
                    __half* __restrict__ y, float* __restrict__ partial, int m, int n, int k,
                    int n_tiles, int k_chunks, int chunks_per_split, int groups_pad,
                    int group_shift) {
  using S = GemmShape<WN, WM, TN, TM>;
  extern __shared__ uint4 gemm_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wn = warp % WN, wm = warp / WN;
  const int g = lane / 4, t = lane % 4;
  const int tile0 = blockIdx.x * S::kTiles;
  const int tok0 = blockIdx.y * S::kRows;

  // One block row of tokens: the weight is read once, evict it first; several: the other rows'
  // blocks read the same tiles, keep them.
  uint64_t policy;
  if (gridDim.y == 1) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(policy));
  }

  const uint32_t smem0 = SmemAddr(gemm_smem);
  auto load_stage = [&](int stage, int c) {
    const uint32_t sw = smem0 + stage * S::kStageBytes, sz = sw + S::kWBytes,
                   sx = sz + S::kZBytes;
    constexpr int kWPieces = S::kTiles * 32, kZPieces = S::kTiles * 8, kXPieces = S::kRows * 8;
#pragma unroll
    for (int i = 0; i < (kWPieces + S::kThreads - 1) / S::kThreads; ++i) {
      const int p = threadIdx.x + i * S::kThreads;
      if (kWPieces % S::kThreads == 0 || p < kWPieces) {
        const int tile = tile0 + p / 32;
        const bool ok = tile < n_tiles;
        const uint4* src = qw + (static_cast<size_t>(ok ? tile : 0) * k_chunks + c) * 32 + p % 32;
        CpAsync16Hint(sw + p * 16, src, ok, policy);
      }
    }
    const int gi0 = (c * 64) >> group_shift;
#pragma unroll
    for (int i = 0; i < (kZPieces + S::kThreads - 1) / S::kThreads; ++i) {
      const int p = threadIdx.x + i * S::kThreads;
      if (kZPieces % S::kThreads == 0 || p < kZPieces) {
        const int tile = tile0 + p / 8, gi = gi0 + (p % 8) / 4;
        const bool ok = tile < n_tiles && gi < groups_pad;
        const uint32_t* src =
            zs + (static_cast<size_t>(ok ? tile : 0) * groups_pad + (ok ? gi : 0)) * 16 + (p % 4) * 4;
        CpAsync16(sz + p * 16, src, ok);
      }
    }
#pragma unroll
    for (int i = 0; i < (kXPieces + S::kThreads - 1) / S::kThreads; ++i) {
      const int p = threadIdx.x + i * S::kThreads;
      if (kXPieces % S::kThreads == 0 || p < kXPieces) {
        const int row = p / 8, u = p % 8;
        const int tok = tok0 + row, kk = c * 64 + u * 8;
        const bool ok = tok < m && kk < k;
        const __half* src = ok ? x + static_cast<size_t>(tok) * k + kk : x;
        CpAsync16(sx + row * 128 + ((u ^ (row & 1)) * 16), src, ok);
      }
    }
  };

  float acc[TN][TM][4];
#pragma unroll
  for (int i = 0; i < TN; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

  // Split-k (gridDim.z > 1): this block's chunks [c_begin, c_end), its fp32 sums to
  // partial[blockIdx.z][m][n]; W4A16SplitReduceKernel adds the splits (and the bias).
  const int c_begin = blockIdx.z * chunks_per_split;
  const int c_end = min(k_chunks, c_begin + chunks_per_split);
  const int nc = max(0, c_end - c_begin);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nc) load_stage(s, c_begin + s);
    CpAsyncCommit();
  }
  const int gsub = group_shift == 5 ? (t >> 1) : 0;  // group 32: the chunk's second group for t >= 2
  int stage = 0;
  for (int i = 0; i < nc; ++i) {
    CpAsyncWait<STAGES - 2>();  // chunk i has landed (this thread's copies) ...
    __syncthreads();            // ... everyone's; and stage (i - 1) % STAGES is free again
    {
      const int in = i + STAGES - 1;
      if (in < nc) load_stage(in % STAGES, c_begin + in);
      CpAsyncCommit();
    }
    const unsigned char* base = reinterpret_cast<const unsigned char*>(gemm_smem) + stage * S::kStageBytes;
    const uint4* ws = reinterpret_cast<const uint4*>(base);
    const uint32_t* zsm = reinterpret_cast<const uint32_t*>(base + S::kWBytes);
    const uint4* xs = reinterpret_cast<const uint4*>(base + S::kWBytes + S::kZBytes);
    uint4 xa[TM], xb[TM];
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int row = (wm * TM + j) * 8 + g;
      xa[j] = xs[row * 8 + ((2 * t) ^ (row & 1))];
      xb[j] = xs[row * 8 + ((2 * t + 1) ^ (row & 1))];
    }
#pragma unroll
    for (int i = 0; i < TN; ++i) {
      const int tb = wn * TN + i;
      const uint4 w = ws[tb * 32 + lane];
      const uint32_t* zt = zsm + tb * 32 + gsub * 16 + g;
      const GroupConsts gc = MakeGroupConsts(zt[0], zt[8]);
      uint32_t a[4][4];
      DequantPiece(w, gc, a);
#pragma unroll
      for (int j = 0; j < TM; ++j) {
        MmaPiece(acc[i][j], a, xa[j], xb[j]);
      }
    }
    stage = stage + 1 == STAGES ? 0 : stage + 1;
  }
  CpAsyncWait<0>();
  if (partial == nullptr) {
#pragma unroll
    for (int i = 0; i < TN; ++i) {
      const int tile = tile0 + wn * TN + i;
      if (tile < n_tiles) StoreTile<TM>(acc[i], bias, y, m, n, tile, tok0 + wm * TM * 8, g, t);
    }
    return;
  }
  // Every (token < m, feature < n) of this split is written, also by a block with no chunks.
  float* ps = partial + static_cast<size_t>(blockIdx.z) * m * n;
#pragma unroll
  for (int i = 0; i < TN; ++i) {
    const int row0 = (tile0 + wn * TN + i) * 16 + g;
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int tok = tok0 + (wm * TM + j) * 8 + 2 * t;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int tk = tok + (r & 1), row = row0 + (r < 2 ? 0 : 8);
        if (tk < m && row < n) ps[static_cast<size_t>(tk) * n + row] = acc[i][j][r];
      }
    }
  }
}

// y[tok][row] = sum over splits of partial[s][tok][row] (+ bias[row]), 4 features per thread
// (n % 8 == 0).
__global__ void W4A16SplitReduceKernel(const float4* __restrict__ partial,
                                       const float* __restrict__ bias, __half* __restrict__ y,
                                       int m, int n, int splits) {
  const int quads = n / 4;
  const int64_t count = static_cast<int64_t>(m) * quads;
  const int64_t stride = static_cast<int64_t>(m) * quads;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < count;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float4 sum = __ldg(partial + q);
    for (int s = 1; s < splits; ++s) {
      const float4 v = __ldg(partial + s * stride + q);
      sum.x += v.x;
      sum.y += v.y;
      sum.z += v.z;
      sum.w += v.w;
    }
    const int row = static_cast<int>(q % quads) * 4;
    if (bias != nullptr) {
      sum.x += bias[row];
      sum.y += bias[row + 1];
      sum.z += bias[row + 2];
      sum.w += bias[row + 3];
    }
    const half2 lo = __floats2half2_rn(sum.x, sum.y), hi = __floats2half2_rn(sum.z, sum.w);
    reinterpret_cast<uint2*>(y)[q] = make_uint2(H2U(lo), H2U(hi));
  }
}

template <int WN, int WM, int TN, int TM, int STAGES>
cudaError_t LaunchGemm(const W4A16Layout& l, const uint16_t* x, const uint32_t* qw,
                       const uint32_t* zs, const float* bias, uint16_t* y, int64_t m,
                       cudaStream_t stream, void* workspace, size_t workspace_bytes,
                       SplitSums* unreduced) {
  using S = GemmShape<WN, WM, TN, TM>;
  constexpr int kSmem = S::kStageBytes * STAGES;
  auto* kernel = &W4A16GemmKernel<WN, WM, TN, TM, STAGES>;
  int device = 0;
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if constexpr (kSmem > 48 * 1024) {
    // Once per device ordinal (< 8; others every call): shared memory above the 48 KB default.
    static std::atomic<bool> done[8];
    if (device < 0 || device >= 8 || !done[device].load(std::memory_order_relaxed)) {
      NIBBLE_CUDA_RETURN_IF_ERROR(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
      if (device >= 0 && device < 8) done[device].store(true, std::memory_order_relaxed);
    }
  }
  const int n_tiles = static_cast<int>(l.n_pad / 16);
  const int k_chunks = static_cast<int>(l.k_pad / 64);
  const int group_shift = l.group == 32 ? 5 : l.group == 64 ? 6 : 7;
  const int n_blocks = (n_tiles + S::kTiles - 1) / S::kTiles;
  const int64_t m_blocks = (m + S::kRows - 1) / S::kRows;
  // Split-k when the blocks would not fill the card twice over (each split keeps >= 4 chunks)
  // and the workspace holds the fp32 partial sums.
  int splits = 1;
  if (workspace != nullptr && reinterpret_cast<uintptr_t>(workspace) % 16 == 0) {
    int sms = 0;
    NIBBLE_CUDA_RETURN_IF_ERROR(
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t blocks = n_blocks * m_blocks;
    const int64_t want = (2 * static_cast<int64_t>(sms) + blocks - 1) / blocks;
    const int64_t fit = static_cast<int64_t>(workspace_bytes / (sizeof(float) * m * l.n));
    splits = static_cast<int>(std::max<int64_t>(1, std::min({want, fit, int64_t{k_chunks / 4}, int64_t{32}})));
  }
  // grid.y is at most 65535 block rows: larger m in several launches (never split then).
  constexpr int64_t kMaxRows = int64_t{65535} * S::kRows;
  if (m > kMaxRows) splits = 1;
  const int per = (k_chunks + splits - 1) / splits;
  splits = (k_chunks + per - 1) / per;
  float* partial = splits > 1 ? static_cast<float*>(workspace) : nullptr;
  for (int64_t t0 = 0; t0 < m; t0 += kMaxRows) {
    const int64_t mm = std::min(m - t0, kMaxRows);
    const dim3 grid(n_blocks, static_cast<unsigned>((mm + S::kRows - 1) / S::kRows), splits);
    kernel<<<grid, S::kThreads, kSmem, stream>>>(
        reinterpret_cast<const __half*>(x) + t0 * l.k, reinterpret_cast<const uint4*>(qw), zs,
        bias, reinterpret_cast<__half*>(y) + t0 * l.n, partial, static_cast<int>(mm),
        static_cast<int>(l.n), static_cast<int>(l.k), n_tiles, k_chunks, per,
        static_cast<int>(l.groups_pad), group_shift);
    NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (partial != nullptr && unreduced != nullptr) {  // the caller's next kernel adds them up
    unreduced->sums = partial;
    unreduced->row_stride = l.n;
    unreduced->split_stride = m * l.n;
    unreduced->splits = splits;
    unreduced->bias = bias;
    return cudaSuccess;
  }
  if (partial != nullptr) {
    const int64_t quads = m * l.n / 4;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((quads + 255) / 256, 4096));
    W4A16SplitReduceKernel<<<blocks, 256, 0, stream>>>(
        reinterpret_cast<const float4*>(partial), bias, reinterpret_cast<__half*>(y),
        static_cast<int>(m), static_cast<int>(l.n), splits);
    NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

template <int TT, int WN, int WK>
cudaError_t Launch(const W4A16Layout& l, const uint16_t* x, const uint32_t* qw,
                   const uint32_t* zs, const float* bias, uint16_t* y, int64_t m,
                   cudaStream_t stream) {
  const int n_tiles = static_cast<int>(l.n_pad / 16);
  const dim3 grid((n_tiles + WN - 1) / WN, static_cast<unsigned>((m + 8 * TT - 1) / (8 * TT)));
  const int group_shift = l.group == 32 ? 5 : l.group == 64 ? 6 : 7;
  const bool x_vec = l.k % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  W4A16MmaKernel<TT, WN, WK><<<grid, 32 * WN * WK, 0, stream>>>(
      reinterpret_cast<const __half*>(x), reinterpret_cast<const uint4*>(qw), zs, bias,
      reinterpret_cast<__half*>(y), static_cast<int>(m), static_cast<int>(l.n),
      static_cast<int>(l.k), static_cast<int>(l.n_pad), static_cast<int>(l.k_pad / 64),
      group_shift, x_vec);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

// Compute capability major of `device` (< 8; others asked every call), cached.
int DeviceMajor(int device) {
  static std::atomic<int> cache[8];  // value + 1; 0 = not yet known
  if (device >= 0 && device < 8) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v - 1;
  }
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  if (device >= 0 && device < 8) cache[device].store(major + 1, std::memory_order_relaxed);
  return major;
}

// The decode kernel's dynamic shared memory at `warps` warps per block: the warps' partial sums
// and, for the ring (FLAGS & 8), KPF slots of 16 + 8 bytes per thread.
template <int TT, int KPF, int FLAGS>
constexpr size_t DecodeSmemBytes(int warps) {
  constexpr int kTiles = (FLAGS & 16) != 0 ? 2 : 1;
  return static_cast<size_t>(warps - 1) * kTiles * TT * 4 * 32 * 4 +
         ((FLAGS & 8) != 0 ? static_cast<size_t>(KPF) * 32 * warps * (16 + 8) : 0);
}

// The most warps per block the decode kernel may launch with on `device` (16, or for the ring
// as many as its shared memory fits: 16 need ~104 KB (the gated kernel ~111 KB), more than the
// 99 KB per block of sm_86 / sm_89 / sm_120 parts). For the ring it also raises the kernel's
// dynamic shared-memory limit to that size (above the 48 KB default) and asks for the largest
// shared-memory carveout. Cached per device ordinal (< 8; others every call). Returns 0 (the error cleared) if an attribute call
// failed.
template <int TT, int KPF, int FLAGS>
int PrepareDecodeKernel(int device) {
  if constexpr ((FLAGS & 8) == 0) {
    return 16;
  } else {
    static std::atomic<int> cache[8];  // value + 1; 0 = not yet known
    if (device >= 0 && device < 8) {
      const int v = cache[device].load(std::memory_order_relaxed);
      if (v > 0) return v - 1;
    }
    int optin = 0;
    auto* kernel = &W4A16DecodeKernel<TT, KPF, FLAGS>;
    int warps = 16;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
        cudaSuccess) {
      warps = 0;
    }
    while (warps > 0 && DecodeSmemBytes<TT, KPF, FLAGS>(warps) > static_cast<size_t>(optin)) {
      --warps;
    }
    if (warps > 0 &&
        (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(DecodeSmemBytes<TT, KPF, FLAGS>(warps))) !=
             cudaSuccess ||
         cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                              cudaSharedmemCarveoutMaxShared) != cudaSuccess)) {
      warps = 0;
    }
    if (warps == 0) (void)cudaGetLastError();
    if (device >= 0 && device < 8) cache[device].store(warps + 1, std::memory_order_relaxed);
    return warps;
  }
}

// Resident blocks per SM of the decode kernel at `warps` warps per block, from the occupancy
// calculator, cached per device ordinal (< 8) and block size (each entry computed once; a race
// computes the same value twice). PrepareDecodeKernel has run for the device.
template <int TT, int KPF, int FLAGS>
int DecodeBlocksPerSm(int device, int warps) {
  static std::atomic<int> cache[8][17];  // value + 1; 0 = not yet known
  std::atomic<int>* slot = device >= 0 && device < 8 ? &cache[device][warps] : nullptr;
  if (slot != nullptr) {
    const int v = slot->load(std::memory_order_relaxed);
    if (v > 0) return v - 1;
  }
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, W4A16DecodeKernel<TT, KPF, FLAGS>,
                                                    32 * warps,
                                                    DecodeSmemBytes<TT, KPF, FLAGS>(warps)) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    blocks = 1;
  }
  if (slot != nullptr) slot->store(blocks + 1, std::memory_order_relaxed);
  return blocks;
}

// Warps per block for the decode kernel: the most (up to 16, at least 2 chunks each) for which
// every block of the grid is resident at once, so that no SM waits on a second wave, but not
// fewer than kMinDecodeWarps (where k allows: the k range is split evenly, so fewer than 8
// chunks, or 9, give fewer); if even one warp per block gives more than a wave, 8 (long streams
// per warp, many waves). run 22's sweep (tests/gpu/NOTES.md: 2, 4, 8 and 16 warps on every 7B
// and 1.8B shape) found this choice the fastest or within 4 % of it everywhere except the
// stacked gate+up (1792 tiles: 2 warps, 30.6 us; 4 warps 29.4 us): hence the floor. Always 16
// (the most loads in flight per SM, which a read-only kernel of the same pattern preferred:
// read_probe) lost 4-36 % on 7b.wqkv, 7b.w1w3 and 1.8b.wqkv / wo.
constexpr int kMinDecodeWarps = 4;

template <int TT, int KPF, int FLAGS>
int ChooseDecodeWarps(int device, int64_t blocks, int k_chunks, int warp_limit) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    sms = 1;
  }
  const int max_warps = std::max(1, std::min(warp_limit, k_chunks / 2));
  for (int w = max_warps; w >= 1; --w) {
    const int per = (k_chunks + w - 1) / w;
    const int used = (k_chunks + per - 1) / per;
    if (used != w) continue;  // the same split as a smaller count: try that one
    if (static_cast<int64_t>(DecodeBlocksPerSm<TT, KPF, FLAGS>(device, w)) * sms >= blocks) {
      if (w >= kMinDecodeWarps || max_warps < kMinDecodeWarps) return w;
      const int floor_per = (k_chunks + kMinDecodeWarps - 1) / kMinDecodeWarps;
      return (k_chunks + floor_per - 1) / floor_per;
    }
  }
  const int per = (k_chunks + std::min(8, max_warps) - 1) / std::min(8, max_warps);
  return (k_chunks + per - 1) / per;
}

// Chunks in flight per thread in the decode kernel's shared-memory ring (kDecode8Ring): 8 x 24
// bytes per thread, twice decode8's depth in registers at the same 32 warps per SM.
constexpr int kRingDepth = 8;

template <int TT, int KPF, int FLAGS = 0>
cudaError_t LaunchDecode(const W4A16Layout& l, const uint16_t* x, const uint32_t* qw,
                         const uint32_t* zs, const float* bias, uint16_t* y, int64_t m,
                         cudaStream_t stream, int warps = 0, const W4A16Fusion* fusion = nullptr,
                         bool allow_pdl = true) {
  // Gated: one block per (gate tile, up tile) pair (the caller checked n % 32 == 0).
  const int n_tiles = static_cast<int>(l.n_pad / ((FLAGS & 16) != 0 ? 32 : 16));
  const int k_chunks = static_cast<int>(l.k_pad / 64);
  const int64_t tok_blocks = (m + 8 * TT - 1) / (8 * TT);
  int device = 0;
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  const int warp_limit = PrepareDecodeKernel<TT, KPF, FLAGS>(device);
  if (warp_limit == 0) return cudaErrorInvalidConfiguration;  // the ring fits no block here
  warps = warps > 0 ? std::min(warps, std::min(warp_limit, k_chunks))
                    : ChooseDecodeWarps<TT, KPF, FLAGS>(device, n_tiles * tok_blocks, k_chunks,
                                                        warp_limit);
  const int per = (k_chunks + warps - 1) / warps;
  const dim3 grid(n_tiles, static_cast<unsigned>(tok_blocks));
  const int group_shift = l.group == 32 ? 5 : l.group == 64 ? 6 : 7;
  const bool x_vec = l.k % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const size_t smem = DecodeSmemBytes<TT, KPF, FLAGS>(warps);
  // FLAGS & 4: the programmatic launch, on sm_90 and a stream of the caller's own (LaunchKernel).
  const bool dependent = (FLAGS & 4) != 0 && allow_pdl && DeviceMajor(device) >= 9;
  DecodeFusionArgs args = {};
  args.x_inv_c = args.norm_c = 1.0f;
  if (fusion != nullptr) {
    args.x_sumsq = fusion->x_sumsq;
    args.x_parts = static_cast<int>(fusion->x_sumsq_parts);
    args.x_eps = fusion->x_eps;
    args.x_inv_c = 1.0f / fusion->x_norm_c;
    args.norm_weight = reinterpret_cast<const __half*>(fusion->norm_weight);
    args.norm_c = fusion->norm_c;
    args.normed = reinterpret_cast<__half*>(fusion->normed);
    args.sumsq = fusion->sumsq;
  }
  NIBBLE_CUDA_RETURN_IF_ERROR(LaunchKernel(
      dependent, W4A16DecodeKernel<TT, KPF, FLAGS>, grid, 32 * warps, smem, stream,
      reinterpret_cast<const __half*>(x), reinterpret_cast<const uint4*>(qw), zs, bias,
      reinterpret_cast<__half*>(y), static_cast<int>(m), static_cast<int>(l.n),
      static_cast<int>(l.k), static_cast<int>(l.n_pad), k_chunks, per, group_shift, x_vec,
      l.group >= 64, args));
  return cudaSuccess;
}

// The decode kernels' launches by W4A16Kernel (warps 0: the launch's own choice); another
// kernel gives cudaErrorInvalidValue.
cudaError_t LaunchDecodeKernel(W4A16Kernel kernel, const W4A16Layout& l, const uint16_t* x,
                               const uint32_t* qw, const uint32_t* zs, const float* bias,
                               uint16_t* y, int64_t m, cudaStream_t stream, int warps,
                               const W4A16Fusion* fusion = nullptr) {
  if (fusion != nullptr) {
    // The ring kernels only. The gated kernel is instantiated once, with the PDL wait (a no-op
    // when launched plainly: dependent_launch.h), and launched as `kernel` asks.
    if (kernel != W4A16Kernel::kDecode8Ring && kernel != W4A16Kernel::kDecode8RingPdl) {
      return cudaErrorInvalidValue;
    }
    if (fusion->gated) {
      return LaunchDecode<1, kRingDepth, 12 | 16>(l, x, qw, zs, bias, y, m, stream, warps, fusion,
                                                  kernel == W4A16Kernel::kDecode8RingPdl);
    }
    return kernel == W4A16Kernel::kDecode8Ring
               ? LaunchDecode<1, kRingDepth, 8 | 32>(l, x, qw, zs, bias, y, m, stream, warps, fusion)
               : LaunchDecode<1, kRingDepth, 12 | 32>(l, x, qw, zs, bias, y, m, stream, warps,
                                                       fusion);
  }
  switch (kernel) {
    case W4A16Kernel::kDecode8:
      return LaunchDecode<1, 4>(l, x, qw, zs, bias, y, m, stream, warps);
    case W4A16Kernel::kDecode8Pdl:
      return LaunchDecode<1, 4, 4>(l, x, qw, zs, bias, y, m, stream, warps);
    case W4A16Kernel::kDecode8Ring:
      return LaunchDecode<1, kRingDepth, 8>(l, x, qw, zs, bias, y, m, stream, warps);
    case W4A16Kernel::kDecode8RingPdl:
      return LaunchDecode<1, kRingDepth, 12>(l, x, qw, zs, bias, y, m, stream, warps);
    case W4A16Kernel::kDecode16:
      return LaunchDecode<2, 4>(l, x, qw, zs, bias, y, m, stream, warps);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

W4A16Kernel ChooseW4A16Kernel(const W4A16Layout& layout, int64_t m, bool workspace) {
  // From the H100's runs 12-13 (tests/gpu/NOTES.md): the split GEMM in 16- or 32-token blocks
  // beats decode16 from 16 tokens on for weights of >= 2^24 values (7b.wo and larger), from 33
  // tokens on for >= 2^23 (1.8b.wqkv); the 64/128-token blocks were never the fastest (removed).
  // Unsplit (no workspace) the GEMM loses to decode16 up to 64 tokens.
  const int64_t values = layout.n * layout.k;
  // m <= 8: decode8 with its chunks in the shared-memory ring. Launched with PDL (as the engine
  // does) it is 7-29 % faster than decode8 in registers on every 7B and 1.8B shape at m = 1
  // and 8, and as fast as run 16's bulk-copy ring (removed) on 1.8b.w2, the one shape where
  // that had won; launched plainly, within -7 .. +4 % of decode8 (run 24, H100).
  if (m <= 8) return W4A16Kernel::kDecode8Ring;
  if (!workspace) return m <= 64 ? W4A16Kernel::kDecode16 : W4A16Kernel::kGemm32;
  if (m <= 32 && values < (int64_t{1} << 24)) return W4A16Kernel::kDecode16;
  if (m <= 64 && values <= (int64_t{1} << 22)) return W4A16Kernel::kDecode16;
  return m <= 16 ? W4A16Kernel::kGemm16 : W4A16Kernel::kGemm32;
}

cudaError_t MatMulW4A16(const W4A16Layout& layout, const uint16_t* x, const uint32_t* qw,
                        const uint32_t* zs, const float* bias, uint16_t* y, int64_t m,
                        cudaStream_t stream, W4A16Kernel kernel, void* workspace,
                        size_t workspace_bytes, SplitSums* unreduced) {
  if (unreduced != nullptr) *unreduced = SplitSums{};
  if (const char* why = CheckW4A16Shape(layout.n, layout.k, layout.group)) {
    std::fprintf(stderr, "%s:%d: MatMulW4A16: %s\n", __FILE__, __LINE__, why);
    return cudaErrorInvalidValue;
  }
  if (m < 0 || m > (int64_t{1} << 30) || layout.k_pad * layout.n_pad > (int64_t{1} << 40)) {
    return cudaErrorInvalidValue;
  }
  if (m == 0) return cudaSuccess;
  // The GEMM kernels copy activation rows in 16-byte pieces: k % 8 == 0 and x 16-byte aligned.
  const bool x_vec = layout.k % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (kernel == W4A16Kernel::kAuto) kernel = ChooseW4A16Kernel(layout, m, workspace != nullptr);
  if (!x_vec && (kernel == W4A16Kernel::kGemm16 || kernel == W4A16Kernel::kGemm32)) {
    kernel = m <= 64 ? W4A16Kernel::kDecode16 : W4A16Kernel::kTiled64;
  }
  switch (kernel) {
    case W4A16Kernel::kDecode8:
    case W4A16Kernel::kDecode16:
    case W4A16Kernel::kDecode8Pdl:
    case W4A16Kernel::kDecode8Ring:
    case W4A16Kernel::kDecode8RingPdl:
      return LaunchDecodeKernel(kernel, layout, x, qw, zs, bias, y, m, stream, 0);
    case W4A16Kernel::kGemm16:
      return LaunchGemm<4, 1, 2, 2, 6>(layout, x, qw, zs, bias, y, m, stream, workspace,
                                       workspace_bytes, unreduced);
    case W4A16Kernel::kGemm32:
      return LaunchGemm<4, 1, 2, 4, 5>(layout, x, qw, zs, bias, y, m, stream, workspace,
                                       workspace_bytes, unreduced);
    case W4A16Kernel::kTiled64:
    default:
      return Launch<8, 4, 2>(layout, x, qw, zs, bias, y, m, stream);
  }
}

cudaError_t MatMulW4A16Fused(const W4A16Layout& layout, const uint16_t* x, const uint32_t* qw,
                             const uint32_t* zs, const float* bias, uint16_t* y, int64_t m,
                             cudaStream_t stream, W4A16Kernel kernel, const W4A16Fusion& fusion) {
  const char* why = CheckW4A16Fusion(layout, fusion);
  if (why == nullptr && kernel != W4A16Kernel::kDecode8Ring &&
      kernel != W4A16Kernel::kDecode8RingPdl) {
    why = "the fusions run on kDecode8Ring or kDecode8RingPdl only";
  }
  if (why == nullptr &&
      (m < 0 || m > (int64_t{1} << 30) || layout.k_pad * layout.n_pad > (int64_t{1} << 40))) {
    why = "m or the weight's size out of range";
  }
  if (why != nullptr) {
    std::fprintf(stderr, "%s:%d: MatMulW4A16Fused: %s\n", __FILE__, __LINE__, why);
    return cudaErrorInvalidValue;
  }
  if (m == 0) return cudaSuccess;
  return LaunchDecodeKernel(kernel, layout, x, qw, zs, bias, y, m, stream, 0, &fusion);
}

const char* CheckW4A16Fusion(const W4A16Layout& layout, const W4A16Fusion& fusion) {
  if (const char* why = CheckW4A16Shape(layout.n, layout.k, layout.group)) return why;
  if (fusion.gated && layout.n % 32 != 0) {
    return "the gated product needs out-features (gate and up stacked) a multiple of 32";
  }
  if (fusion.gated && fusion.norm_weight != nullptr) {
    return "the gated product has no residual epilogue";
  }
  if (fusion.norm_weight != nullptr && (fusion.normed == nullptr || fusion.sumsq == nullptr)) {
    return "the residual epilogue needs normed and sumsq";
  }
  if (fusion.x_sumsq != nullptr && fusion.x_sumsq_parts != (layout.k + 15) / 16) {
    return "x_sumsq_parts must be ceil(k / 16): one partial sum per 16 in-features";
  }
  const auto power_of_two = [](float c) {
    int e = 0;
    return c > 0.0f && std::isfinite(c) && std::frexp(c, &e) == 0.5f;
  };
  if (!power_of_two(fusion.x_norm_c) || !power_of_two(fusion.norm_c)) {
    return "the norm weight factors must be powers of two";
  }
  return nullptr;
}

cudaError_t MatMulW4A16WithWarps(const W4A16Layout& layout, const uint16_t* x,
                                 const uint32_t* qw, const uint32_t* zs, const float* bias,
                                 uint16_t* y, int64_t m, cudaStream_t stream, W4A16Kernel kernel,
                                 int warps) {
  if (const char* why = CheckW4A16Shape(layout.n, layout.k, layout.group)) {
    std::fprintf(stderr, "%s:%d: MatMulW4A16WithWarps: %s\n", __FILE__, __LINE__, why);
    return cudaErrorInvalidValue;
  }
  if (m < 0 || m > (int64_t{1} << 30) || layout.k_pad * layout.n_pad > (int64_t{1} << 40) ||
      warps < 1) {
    return cudaErrorInvalidValue;
  }
  if (m == 0) return cudaSuccess;
  return LaunchDecodeKernel(kernel, layout, x, qw, zs, bias, y, m, stream, warps);
}

namespace {

// One warp per (16-feature tile, 64-k chunk) = one 512-byte piece of qw (blockIdx.x: tile,
// blockIdx.y * kDequantWarps + warp: chunk); lane (g, t) holds rows r0 = 16 tile + g and
// r1 = r0 + 8 at k0 = 64 chunk + 16 t .. + 15 (w4a16_layout.h), all in one group (groups are
// multiples of 16). Dequant as the GEMM kernels do ((q - z) exact, times the scale rounded once
// to fp16: the same bits as (q - z) * s in fp32 rounded to fp16). 32-bit index math (v1 divided
// 64-bit indices per piece and wrote at ~1/3 of copy bandwidth: tests/gpu/NOTES.md run 11).
// STAGED: the block's 16 rows x 512 k go through shared memory, so that each warp's store
// instruction writes 512 contiguous bytes of one row; otherwise (v2) each lane writes its own
// 32 bytes of each of its two rows straight from registers (a store instruction covers 8 rows,
// 16 bytes every 32).
constexpr int kDequantWarps = 8;
constexpr int kDequantSpan = 64 * kDequantWarps;  // k per block
// A staged row's halves: 16 bytes of padding, so that a quarter-warp's 16-byte shared stores
// (2 rows x 4 lanes, 32 bytes apart) fall in 8 different 16-byte bank groups (a row stride of
// 1040 bytes is 16 mod 128; without the padding two rows would collide).
constexpr int kDequantRowHalves = kDequantSpan + 8;

template <bool STAGED>
__global__ void DequantizeW4A16Kernel(const uint4* __restrict__ qw, const uint32_t* __restrict__ zs,
                                      __half* __restrict__ w, int n, int k, int k_chunks,
                                      int groups_pad, int group_shift) {
  const int tile = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunk = blockIdx.y * kDequantWarps + warp;
  const int g = lane / 4, t = lane % 4;
  const int k0 = chunk * 64 + 16 * t;
  if constexpr (STAGED) {
    __shared__ uint4 staged[16 * kDequantRowHalves / 8];
    if (chunk < k_chunks) {  // a block's last chunks may lie past k_pad; the barrier is for all
      const uint4 v = __ldg(qw + (static_cast<size_t>(tile) * k_chunks + chunk) * 32 + lane);
      const uint32_t* zg = zs + (static_cast<size_t>(tile) * groups_pad + (k0 >> group_shift)) * 16 + g;
      const GroupConsts gc = MakeGroupConsts(__ldg(zg), __ldg(zg + 8));
      uint32_t a[4][4];
      DequantPiece(v, gc, a);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint4* s = staged + ((g + 8 * half) * kDequantRowHalves + warp * 64 + 16 * t) / 8;
        s[0] = make_uint4(a[0][half], a[0][half + 2], a[1][half], a[1][half + 2]);
        s[1] = make_uint4(a[2][half], a[2][half + 2], a[3][half], a[3][half + 2]);
      }
    }
    __syncthreads();
    const int kb = blockIdx.y * kDequantSpan;
    constexpr int kRowVectors = kDequantSpan / 8;  // 16-byte pieces of a staged row
    for (int i = threadIdx.x; i < 16 * kRowVectors; i += 32 * kDequantWarps) {
      const int r = i / kRowVectors, c = i % kRowVectors;
      const int row = 16 * tile + r, kc = kb + 8 * c;
      if (row >= n || kc >= k) continue;
      const uint4 v = staged[r * (kDequantRowHalves / 8) + c];
      __half* out = w + static_cast<size_t>(row) * k + kc;
      if (k % 8 == 0 && kc + 8 <= k) {
        *reinterpret_cast<uint4*>(out) = v;
      } else {
        const uint32_t u[4] = {v.x, v.y, v.z, v.w};
        const int count = k - kc < 8 ? k - kc : 8;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (j < count) out[j] = __ushort_as_half(static_cast<unsigned short>(u[j / 2] >> (16 * (j & 1))));
        }
      }
    }
  } else {
    if (chunk >= k_chunks || k0 >= k) return;
    const uint4 v = __ldg(qw + (static_cast<size_t>(tile) * k_chunks + chunk) * 32 + lane);
    const uint32_t* zg = zs + (static_cast<size_t>(tile) * groups_pad + (k0 >> group_shift)) * 16 + g;
    const GroupConsts gc = MakeGroupConsts(__ldg(zg), __ldg(zg + 8));
    uint32_t a[4][4];
    DequantPiece(v, gc, a);
    // a[j][0] / a[j][2]: row r0 at k0 + 4j + 0..1 / + 2..3; a[j][1] / a[j][3]: row r1, the same k.
    const bool whole = k0 + 16 <= k && k % 8 == 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = 16 * tile + g + 8 * half;
      if (row >= n) continue;
      const uint32_t u[8] = {a[0][half], a[0][half + 2], a[1][half], a[1][half + 2],
                             a[2][half], a[2][half + 2], a[3][half], a[3][half + 2]};
      __half* out = w + static_cast<size_t>(row) * k + k0;
      if (whole) {
        reinterpret_cast<uint4*>(out)[0] = make_uint4(u[0], u[1], u[2], u[3]);
        reinterpret_cast<uint4*>(out)[1] = make_uint4(u[4], u[5], u[6], u[7]);
      } else {
        const int count = k - k0 < 16 ? k - k0 : 16;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          if (i < count) {
            out[i] = __ushort_as_half(static_cast<unsigned short>(u[i / 2] >> (16 * (i & 1))));
          }
        }
      }
    }
  }
}

}  // namespace

cudaError_t DequantizeW4A16(const W4A16Layout& layout, const uint32_t* qw, const uint32_t* zs,
                            uint16_t* w, cudaStream_t stream, bool staged) {
  if (CheckW4A16Shape(layout.n, layout.k, layout.group) != nullptr) return cudaErrorInvalidValue;
  if (layout.n_pad / 16 > (int64_t{1} << 31) - 1 || layout.k_pad > (int64_t{1} << 30)) {
    return cudaErrorInvalidValue;
  }
  const int k_chunks = static_cast<int>(layout.k_pad / 64);
  const dim3 grid(static_cast<unsigned>(layout.n_pad / 16), (k_chunks + kDequantWarps - 1) / kDequantWarps);
  const int group_shift = layout.group == 32 ? 5 : layout.group == 64 ? 6 : 7;
  const auto kernel = staged ? DequantizeW4A16Kernel<true> : DequantizeW4A16Kernel<false>;
  kernel<<<grid, 32 * kDequantWarps, 0, stream>>>(
      reinterpret_cast<const uint4*>(qw), zs, reinterpret_cast<__half*>(w),
      static_cast<int>(layout.n), static_cast<int>(layout.k), k_chunks,
      static_cast<int>(layout.groups_pad), group_shift);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

}  // namespace nibble::kernels::cuda
