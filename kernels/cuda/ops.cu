// Element-wise and per-row kernels (ops.h). All memory-bound: one pass over the data (RMSNorm
// re-reads its row, which its own block has just touched, from L1/L2), 16-byte accesses when
// the shapes and pointers allow (V = 8 halves per access), fp32 arithmetic.
#include "kernels/cuda/ops.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include <cuda_fp16.h>

#include "kernels/cuda/check.h"
#include "kernels/cuda/dependent_launch.h"
#include "kernels/cuda/half8.h"
#include "kernels/cuda/rope_math.h"
#include "kernels/cuda/split_sums.h"

namespace nibble::kernels::cuda {
namespace {

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// V consecutive halves <-> V floats. V = 8: one 16-byte access; V = 1: one 2-byte access.
template <int V>
__device__ __forceinline__ void LoadF(const __half* p, float* f) {
  if constexpr (V == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);  // one 16-byte load
    Half8ToFloat(u, f);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] = __half2float(p[j]);
  }
}

template <int V>
__device__ __forceinline__ void StoreF(__half* p, const float* f) {
  if constexpr (V == 8) {
    uint4 u;
    __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(f[2 * j], f[2 * j + 1]);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = __float2half_rn(f[j]);
  }
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float BlockSum(float v) {
  __shared__ float partial[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One block per row (grid-stride over rows). kAdd: x += residual first (rounded to fp16 and
// stored), and the norm is of the stored value. kSums: the residual is a product's split-k
// partial sums (split_sums.h), added up as they are loaded.
template <bool kAdd, int V, bool kSums = false>
__global__ void RmsNormKernel(__half* x, const __half* __restrict__ residual,
                              const __half* __restrict__ weight, int64_t rows, int dim,
                              float eps, __half* y, SplitSums sums) {
  AllowDependentLaunch();  // the products after the norms (kernels/cuda/dependent_launch.h)
  WaitForPriorGrid();
  const int nv = dim / V;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    __half* xr = x + row * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
      float f[V];
      LoadF<V>(xr + i * V, f);
      if constexpr (kAdd) {
        float r[V];
        if constexpr (kSums) {
          LoadSplitSums<V>(sums, row, static_cast<int64_t>(i) * V, r);
        } else {
          LoadF<V>(residual + row * dim + i * V, r);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) f[j] = __half2float(__float2half_rn(f[j] + r[j]));
        StoreF<V>(xr + i * V, f);  // exact: f[j] is already an fp16 value
      }
#pragma unroll
      for (int j = 0; j < V; ++j) ss = fmaf(f[j], f[j], ss);
    }
    ss = BlockSum(ss);
    const float scale = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
    // The same thread reads back what it wrote above (or what the row held): no barrier needed.
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
      float f[V], w[V];
      LoadF<V>(xr + i * V, f);
      LoadF<V>(weight + i * V, w);
#pragma unroll
      for (int j = 0; j < V; ++j) f[j] = f[j] * scale * w[j];
      StoreF<V>(y + row * dim + i * V, f);
    }
    __syncthreads();  // BlockSum's shared memory is reused by the next row
  }
}

// Split sums of `rows` x `cols` that a kernel may read: at least one split, strides that keep
// the rows and splits apart.
bool SumsOk(const SplitSums& s, int64_t rows, int64_t cols) {
  return s.sums != nullptr && s.splits >= 1 && s.row_stride >= cols &&
         s.split_stride >= s.row_stride * rows;
}

// Whether split sums can be read 8 floats at a time (two 16-byte loads per split).
bool SumsVec(const SplitSums& s) {
  return Aligned16(s.sums) && s.row_stride % 4 == 0 && s.split_stride % 4 == 0;
}

template <bool kAdd, bool kSums = false>
cudaError_t LaunchRmsNorm(uint16_t* x, const uint16_t* residual, const uint16_t* weight,
                          int64_t rows, int64_t dim, float eps, uint16_t* y,
                          cudaStream_t stream, bool dependent, const SplitSums& sums = {}) {
  if (rows < 0 || dim <= 0 || dim > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const bool vec = dim % 8 == 0 && Aligned16(x) && Aligned16(weight) && Aligned16(y) &&
                   (!kAdd || (kSums ? SumsVec(sums) : Aligned16(residual)));
  const int64_t items = vec ? dim / 8 : dim;
  const int threads = static_cast<int>(std::clamp<int64_t>((items + 31) / 32 * 32, 32, 1024));
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, 1 << 30));
  auto* xh = reinterpret_cast<__half*>(x);
  auto* rh = reinterpret_cast<const __half*>(residual);
  auto* wh = reinterpret_cast<const __half*>(weight);
  auto* yh = reinterpret_cast<__half*>(y);
  NIBBLE_CUDA_RETURN_IF_ERROR(LaunchKernel(dependent,
                                           vec ? RmsNormKernel<kAdd, 8, kSums> : RmsNormKernel<kAdd, 1, kSums>,
                                           grid, threads, 0, stream, xh, rh, wh, rows,
                                           static_cast<int>(dim), eps, yh, sums));
  return cudaSuccess;
}

// kSums: gate and up are a product's split-k partial sums (split_sums.h), added up as they are
// loaded.
template <int V, bool kSums = false>
__global__ void SiluMulKernel(const __half* gate, int64_t gate_stride, const __half* up,
                              int64_t up_stride, int64_t rows, int cols, __half* out,
                              int64_t out_stride, SplitSums gate_sums, SplitSums up_sums) {
  AllowDependentLaunch();  // the down projection after it
  WaitForPriorGrid();
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (i >= cols) return;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    float g[V], u[V];
    if constexpr (kSums) {
      LoadSplitSums<V>(gate_sums, row, i, g);
      LoadSplitSums<V>(up_sums, row, i, u);
    } else {
      LoadF<V>(gate + row * gate_stride + i, g);
      LoadF<V>(up + row * up_stride + i, u);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    StoreF<V>(out + row * out_stride + i, g);
  }
}

template <bool kSums>
cudaError_t LaunchSiluMul(const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                          int64_t up_stride, const SplitSums& gate_sums, const SplitSums& up_sums,
                          int64_t rows, int64_t cols, uint16_t* out, int64_t out_stride,
                          cudaStream_t stream, bool dependent) {
  if (rows < 0 || cols <= 0 || cols > (int64_t{1} << 30) || out_stride < cols ||
      (kSums ? !SumsOk(gate_sums, rows, cols) || !SumsOk(up_sums, rows, cols)
             : gate_stride < cols || up_stride < cols)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const bool vec = cols % 8 == 0 && out_stride % 8 == 0 && Aligned16(out) &&
                   (kSums ? SumsVec(gate_sums) && SumsVec(up_sums)
                          : gate_stride % 8 == 0 && up_stride % 8 == 0 && Aligned16(gate) &&
                                Aligned16(up));
  const int v = vec ? 8 : 1;
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>((cols / v + threads - 1) / threads),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  auto* g = reinterpret_cast<const __half*>(gate);
  auto* u = reinterpret_cast<const __half*>(up);
  auto* o = reinterpret_cast<__half*>(out);
  NIBBLE_CUDA_RETURN_IF_ERROR(LaunchKernel(dependent,
                                           vec ? SiluMulKernel<8, kSums> : SiluMulKernel<1, kSums>,
                                           grid, threads, 0, stream, g, gate_stride, u, up_stride,
                                           rows, static_cast<int>(cols), o, out_stride, gate_sums,
                                           up_sums));
  return cudaSuccess;
}

// Where RopeKernel<kStore = true> writes a token's keys and values (ops.h RopeKvStore).
struct KvTarget {
  const __half* v;
  int64_t v_stride;
  const int32_t* slots;
  __half* keys;
  __half* values;
  int64_t block_stride;
  int block_seq_len;
};

// Up to this many tokens, RopeKernel splits a token's items over blocks.
constexpr int64_t kRopeSlicedTokens = 64;

// Blocks (token, slice): grid.x walks the tokens (grid-stride), grid.y splits a token's
// (head, pair) items into slices of blockDim.x, so that one decode token's 1,280 items (7B) are
// one round of loads and stores over five blocks instead of five rounds in one. A thread loads
// its first item before the block forms the half = head_dim / 2 cos/sin pairs in shared memory,
// so the load's latency hides behind that arithmetic. kPair: two adjacent i per thread (half2
// accesses). kStore: k's rotated pairs go to the token's row of the paged keys instead of back
// into k, and the v row is copied to the values (RopeRotateHalf with a RopeKvStore), each slice
// a share of it.
template <bool kPair, bool kStore>
__global__ void RopeKernel(__half* q, int64_t q_stride, int heads, __half* k, int64_t k_stride,
                           int kv_heads, int head_dim, int64_t tokens,
                           const int32_t* __restrict__ positions,
                           const float* __restrict__ inv_freq,
                           const int32_t* __restrict__ freq_index, KvTarget store) {
  AllowDependentLaunch();  // the attention after it
  WaitForPriorGrid();
  extern __shared__ float cs[];  // cos[half], sin[half]
  const int half = head_dim / 2;
  constexpr int P = kPair ? 2 : 1;
  const int per_head = half / P;
  const int total = (heads + kv_heads) * per_head;
  const int kv_dim = kv_heads * head_dim;
  const int first = blockIdx.y * blockDim.x + threadIdx.x;  // this thread's first item
  const int step = gridDim.y * blockDim.x;
  // Item p: `half` values at h + i and h + half + i (P of each); the rotated pair goes to out.
  struct Item {
    __half* h;
    __half* out;
    int i;
  };
  const auto item = [&](int64_t t, int p, int64_t row) {
    const int head = p / per_head, i = (p % per_head) * P;
    const bool is_q = head < heads;
    __half* h = is_q ? q + t * q_stride + static_cast<int64_t>(head) * head_dim
                     : k + t * k_stride + static_cast<int64_t>(head - heads) * head_dim;
    __half* out = h;
    if constexpr (kStore) {
      if (!is_q) out = store.keys + row + static_cast<int64_t>(head - heads) * head_dim;
    }
    return Item{h, out, i};
  };
  const auto load = [&](const Item& it, float2& a, float2& b) {
    if constexpr (kPair) {
      a = __half22float2(*reinterpret_cast<const __half2*>(it.h + it.i));
      b = __half22float2(*reinterpret_cast<const __half2*>(it.h + half + it.i));
    } else {
      a.x = __half2float(it.h[it.i]);
      b.x = __half2float(it.h[half + it.i]);
    }
  };
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    int64_t row = 0;  // the token's row in the paged keys / values (kStore)
    if constexpr (kStore) {
      const int32_t slot = store.slots[t];
      row = static_cast<int64_t>(slot / store.block_seq_len) * store.block_stride +
            static_cast<int64_t>(slot % store.block_seq_len) * kv_dim;
    }
    float2 a0 = make_float2(0.0f, 0.0f), b0 = a0;
    if (first < total) load(item(t, first, row), a0, b0);
    const int position = positions[t];
    const float* f = inv_freq + (freq_index != nullptr ? static_cast<int64_t>(freq_index[t]) * half : 0);
    for (int i = threadIdx.x; i < half; i += blockDim.x) RopeCosSin(position, f[i], &cs[i], &cs[half + i]);
    if constexpr (kStore) {
      const __half* v = store.v + t * store.v_stride;
      for (int i = first * P; i < kv_dim; i += step * P) {
        if constexpr (kPair) {
          *reinterpret_cast<__half2*>(store.values + row + i) =
              *reinterpret_cast<const __half2*>(v + i);
        } else {
          store.values[row + i] = v[i];
        }
      }
    }
    __syncthreads();
    for (int p = first; p < total; p += step) {
      const Item it = item(t, p, row);
      float2 a = a0, b = b0;
      if (p != first) load(it, a, b);
      const int i = it.i;
      if constexpr (kPair) {
        const float2 r0 = RotatePair(a.x, b.x, cs[i], cs[half + i]);
        const float2 r1 = RotatePair(a.y, b.y, cs[i + 1], cs[half + i + 1]);
        *reinterpret_cast<__half2*>(it.out + i) = __floats2half2_rn(r0.x, r1.x);
        *reinterpret_cast<__half2*>(it.out + half + i) = __floats2half2_rn(r0.y, r1.y);
      } else {
        const float2 r = RotatePair(a.x, b.x, cs[i], cs[half + i]);
        it.out[i] = __float2half_rn(r.x);
        it.out[half + i] = __float2half_rn(r.y);
      }
    }
    __syncthreads();  // cs is rewritten for the next token
  }
}

template <int V>
__global__ void EmbeddingKernel(const __half* __restrict__ table, int64_t vocab, int hidden,
                                const int32_t* __restrict__ ids, int64_t n, __half* out) {
  const int nv = hidden / V;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const int32_t id = ids[r];
    __half* o = out + r * hidden;
    if (id < 0 || id >= vocab) {  // never reached after the host check: a visible NaN row
      for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = __ushort_as_half(0x7e00);
      continue;
    }
    const __half* src = table + static_cast<int64_t>(id) * hidden;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
      if constexpr (V == 8) {
        reinterpret_cast<uint4*>(o)[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
      } else {
        o[i] = src[i];
      }
    }
  }
}

}  // namespace

cudaError_t RmsNorm(const uint16_t* x, const uint16_t* weight, int64_t rows, int64_t dim,
                    float eps, uint16_t* y, cudaStream_t stream, bool dependent) {
  // The kAdd = false kernel never writes x.
  return LaunchRmsNorm<false>(const_cast<uint16_t*>(x), nullptr, weight, rows, dim, eps, y, stream,
                              dependent);
}

cudaError_t AddRmsNorm(uint16_t* x, const uint16_t* residual, const uint16_t* weight,
                       int64_t rows, int64_t dim, float eps, uint16_t* y, cudaStream_t stream,
                       bool dependent) {
  if (y == x || y == residual) return cudaErrorInvalidValue;
  return LaunchRmsNorm<true>(x, residual, weight, rows, dim, eps, y, stream, dependent);
}

cudaError_t AddRmsNorm(uint16_t* x, const SplitSums& residual, const uint16_t* weight,
                       int64_t rows, int64_t dim, float eps, uint16_t* y, cudaStream_t stream,
                       bool dependent) {
  if (y == x || !SumsOk(residual, rows, dim)) return cudaErrorInvalidValue;
  return LaunchRmsNorm<true, true>(x, nullptr, weight, rows, dim, eps, y, stream, dependent,
                                   residual);
}

cudaError_t SiluMul(const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                    int64_t up_stride, int64_t rows, int64_t cols, uint16_t* out,
                    int64_t out_stride, cudaStream_t stream, bool dependent) {
  return LaunchSiluMul<false>(gate, gate_stride, up, up_stride, {}, {}, rows, cols, out,
                              out_stride, stream, dependent);
}

cudaError_t SiluMul(const SplitSums& gate, const SplitSums& up, int64_t rows, int64_t cols,
                    uint16_t* out, int64_t out_stride, cudaStream_t stream, bool dependent) {
  return LaunchSiluMul<true>(nullptr, 0, nullptr, 0, gate, up, rows, cols, out, out_stride, stream,
                             dependent);
}

cudaError_t RopeRotateHalf(uint16_t* q, int64_t q_stride, int64_t heads, uint16_t* k,
                           int64_t k_stride, int64_t kv_heads, int64_t head_dim, int64_t tokens,
                           const int32_t* positions, const float* inv_freq,
                           const int32_t* freq_index, cudaStream_t stream,
                           const RopeKvStore* store, bool dependent) {
  if (k == nullptr) kv_heads = 0;
  if (tokens < 0 || heads < 0 || kv_heads < 0 || head_dim <= 0 || head_dim % 2 != 0 ||
      head_dim > 1024 || q_stride < heads * head_dim || (kv_heads > 0 && k_stride < kv_heads * head_dim) ||
      (heads + kv_heads) * head_dim > (int64_t{1} << 30)) {
    return cudaErrorInvalidValue;
  }
  const int64_t kv_dim = kv_heads * head_dim;
  if (store != nullptr &&
      (kv_heads == 0 || store->v == nullptr || store->v_stride < kv_dim || store->slots == nullptr ||
       store->keys == nullptr || store->values == nullptr || store->block_seq_len <= 0 ||
       store->block_stride < 2 * static_cast<int64_t>(store->block_seq_len) * kv_dim)) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0 || heads + kv_heads == 0) return cudaSuccess;
  const auto even = [](int64_t v) { return v % 2 == 0; };
  const auto aligned4 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 4 == 0; };
  const bool pair = head_dim % 4 == 0 && even(q_stride) && aligned4(q) &&
                    (kv_heads == 0 || (even(k_stride) && aligned4(k))) &&
                    (store == nullptr || (even(store->v_stride) && even(store->block_stride) &&
                                          aligned4(store->v) && aligned4(store->keys) &&
                                          aligned4(store->values)));
  const int64_t items = (heads + kv_heads) * head_dim / (pair ? 4 : 2);
  const int threads = static_cast<int>(std::clamp<int64_t>((items + 31) / 32 * 32, 32, 256));
  // A decode step's few tokens split their items over blocks (grid.y); a prefill pass has
  // blocks enough in its tokens, and one block per token forms each token's angles once.
  const int64_t slices = tokens > kRopeSlicedTokens ? 1 : (items + threads - 1) / threads;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(tokens, 1 << 30)),
                  static_cast<unsigned>(std::min<int64_t>(slices, 65535)));
  const size_t smem = static_cast<size_t>(head_dim) * sizeof(float);
  auto* qh = reinterpret_cast<__half*>(q);
  auto* kh = reinterpret_cast<__half*>(k);
  KvTarget target{};
  if (store != nullptr) {
    target = {reinterpret_cast<const __half*>(store->v), store->v_stride, store->slots,
              reinterpret_cast<__half*>(store->keys), reinterpret_cast<__half*>(store->values),
              store->block_stride, store->block_seq_len};
  }
  const int h = static_cast<int>(heads), kvh = static_cast<int>(kv_heads), d = static_cast<int>(head_dim);
  const auto kernel = pair ? (store != nullptr ? RopeKernel<true, true> : RopeKernel<true, false>)
                            : (store != nullptr ? RopeKernel<false, true> : RopeKernel<false, false>);
  NIBBLE_CUDA_RETURN_IF_ERROR(LaunchKernel(dependent, kernel, grid, threads, smem, stream, qh,
                                           q_stride, h, kh, k_stride, kvh, d, tokens, positions,
                                           inv_freq, freq_index, target));
  return cudaSuccess;
}

cudaError_t CheckTokenIds(const int32_t* host_ids, int64_t n, int64_t vocab) {
  for (int64_t i = 0; i < n; ++i) {
    if (host_ids[i] < 0 || host_ids[i] >= vocab) {
      std::fprintf(stderr, "%s:%d: Embedding: token %lld (id %d) outside the vocabulary of %lld\n",
                   __FILE__, __LINE__, static_cast<long long>(i), host_ids[i],
                   static_cast<long long>(vocab));
      return cudaErrorInvalidValue;
    }
  }
  return cudaSuccess;
}

cudaError_t Embedding(const uint16_t* table, int64_t vocab, int64_t hidden, const int32_t* ids,
                      int64_t n, uint16_t* out, cudaStream_t stream, const int32_t* host_ids) {
  if (n < 0 || vocab <= 0 || hidden <= 0 || hidden > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  if (host_ids != nullptr) NIBBLE_CUDA_RETURN_IF_ERROR(CheckTokenIds(host_ids, n, vocab));
  if (n == 0) return cudaSuccess;
  const bool vec = hidden % 8 == 0 && Aligned16(table) && Aligned16(out);
  const int64_t items = vec ? hidden / 8 : hidden;
  const int threads = static_cast<int>(std::clamp<int64_t>((items + 31) / 32 * 32, 32, 512));
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(n, 1 << 30));
  auto* t = reinterpret_cast<const __half*>(table);
  auto* o = reinterpret_cast<__half*>(out);
  if (vec) {
    EmbeddingKernel<8><<<grid, threads, 0, stream>>>(t, vocab, static_cast<int>(hidden), ids, n, o);
  } else {
    EmbeddingKernel<1><<<grid, threads, 0, stream>>>(t, vocab, static_cast<int>(hidden), ids, n, o);
  }
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

namespace {

__global__ void AddBiasKernel(__half* y, int64_t y_stride, const float* __restrict__ bias,
                              int64_t rows, int cols) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
      __half* p = y + r * y_stride + c;
      *p = __float2half_rn(__half2float(*p) + bias[c]);
    }
  }
}

// (value, index) pairs: the larger value wins, the lower index on equal values.
__device__ __forceinline__ void ArgMaxMerge(float& value, int& index, float other_value,
                                            int other_index) {
  if (other_value > value || (other_value == value && other_index < index)) {
    value = other_value;
    index = other_index;
  }
}

__global__ void ArgMaxRowsKernel(const float* __restrict__ x, int64_t rows, int cols,
                                 int64_t stride, int32_t* out) {
  __shared__ float values[32];
  __shared__ int indices[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = x + r * stride;
    float best = -INFINITY;
    int best_index = cols;  // loses to any real index
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ArgMaxMerge(best, best_index, row[c], c);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float v = __shfl_xor_sync(0xffffffffu, best, o);
      const int i = __shfl_xor_sync(0xffffffffu, best_index, o);
      ArgMaxMerge(best, best_index, v, i);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) {
      values[warp] = best;
      indices[warp] = best_index;
    }
    __syncthreads();
    if (warp == 0) {
      best = lane < warps ? values[lane] : -INFINITY;
      best_index = lane < warps ? indices[lane] : cols;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, o);
        const int i = __shfl_xor_sync(0xffffffffu, best_index, o);
        ArgMaxMerge(best, best_index, v, i);
      }
      // A row of -inf only (or NaN) has no winner above: index 0, as max_element.
      if (lane == 0) out[r] = best_index < cols ? best_index : 0;
    }
    __syncthreads();  // values/indices are reused by the next row
  }
}

__global__ void HalfToFloatKernel(const __half* __restrict__ in, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __half2float(in[i]);
  }
}

__global__ void FloatToHalfKernel(const float* __restrict__ in, int64_t n, __half* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2half_rn(in[i]);
  }
}

}  // namespace

cudaError_t AddBias(uint16_t* y, int64_t y_stride, const float* bias, int64_t rows, int64_t cols,
                    cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || cols > (int64_t{1} << 30) || y_stride < cols) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((cols + threads - 1) / threads, 1024)),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  AddBiasKernel<<<grid, threads, 0, stream>>>(reinterpret_cast<__half*>(y), y_stride, bias, rows,
                                             static_cast<int>(cols));
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

cudaError_t ArgMaxRows(const float* x, int64_t rows, int64_t cols, int64_t stride, int32_t* out,
                       cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || cols > (int64_t{1} << 30) || stride < cols) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, 1 << 30));
  ArgMaxRowsKernel<<<grid, 1024, 0, stream>>>(x, rows, static_cast<int>(cols), stride, out);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

cudaError_t HalfToFloat(const uint16_t* in, int64_t n, float* out, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 4096));
  HalfToFloatKernel<<<grid, threads, 0, stream>>>(reinterpret_cast<const __half*>(in), n, out);
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

cudaError_t FloatToHalf(const float* in, int64_t n, uint16_t* out, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 4096));
  FloatToHalfKernel<<<grid, threads, 0, stream>>>(in, n, reinterpret_cast<__half*>(out));
  NIBBLE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return cudaSuccess;
}

}  // namespace nibble::kernels::cuda
