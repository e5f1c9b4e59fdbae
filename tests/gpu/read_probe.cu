// Where the W4A16 decode kernel's bandwidth goes: the read patterns alone, without the math.
// decode8 streams each weight once at 46-71 % of the copy bandwidth (tests/gpu/RESULTS.md); this
// probe reads buffers of the 7B shapes' sizes with no arithmetic but an xor, three ways, so that
// one run tells whether the order of the reads (the device layout, tile-major: a 16-feature
// tile's 64-k chunks of 512 bytes are contiguous) or the kernel's work holds it back:
//   linear:  a grid-stride sweep, consecutive threads on consecutive 16 bytes (what a copy does);
//   tile:    decode8's order: one block per tile, its k chunks split into contiguous runs over
//            `warps` warps, each lane 16 bytes of a 512-byte chunk, `depth` loads in flight;
//   chunk:   the same blocks and warps over a chunk-major layout (chunk c of tile t at
//            (c * tiles + t) * 512): at any moment the warps of neighbouring tiles read
//            neighbouring pieces, as a copy does.
// Every load is decode8's own (kernels/cuda/weight_load.h: ld.global.nc, L1 no-allocate, L2
// evict-first). Each shape rotates over enough buffers to exceed 4x the L2; a CUDA graph of one
// call per buffer, replayed, median. Prints one line per (pattern, warps, depth) with GB/s and %
// of a device-to-device copy measured in the same run (bytes read + written, timed as the other
// benchmarks time it: tests/gpu/timing.h; results/run21_read_probe.log's copy ran inside a graph
// and read 2448 GB/s, below the ~3000 measured this way).
//   read_probe   (no arguments)
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include <cuda_runtime.h>

#include "kernels/cuda/weight_load.h"
#include "tests/gpu/device_buffer.h"
#include "tests/gpu/timing.h"

using nibble::kernels::cuda::EvictFirstPolicy;
using nibble::kernels::cuda::LoadWeights;
using nibble::testing::CopyBandwidth;
using nibble::testing::DeviceBuffer;
using nibble::testing::TimeUs;

namespace {

// The xor of everything read goes out only if it equals a value it practically never has, so
// that the loads cannot be dropped and nothing but the reads costs bandwidth.
__device__ __forceinline__ void Sink(uint32_t v, uint32_t* out) {
  if (v == 0x9e3779b9u) out[threadIdx.x] = v;
}

template <int DEPTH>
__global__ void LinearRead(const uint4* __restrict__ p, int64_t n16, uint32_t* out) {
  const uint64_t policy = EvictFirstPolicy();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint32_t x = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n16;
       i += DEPTH * stride) {
    uint4 r[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      r[d] = i + d * stride < n16 ? LoadWeights(p + i + d * stride, policy) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) x ^= r[d].x ^ r[d].y ^ r[d].z ^ r[d].w;
  }
  Sink(x, out);
}

// kChunkMajor: piece (tile, chunk) at (chunk * tiles + tile) * 512 bytes, else at
// (tile * chunks + chunk) * 512 (the device layout).
template <int DEPTH, bool kChunkMajor>
__global__ void TileRead(const uint4* __restrict__ p, int tiles, int chunks, int per_warp,
                         uint32_t* out) {
  const uint64_t policy = EvictFirstPolicy();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tile = blockIdx.x;
  const int c0 = warp * per_warp, nch = max(0, min(per_warp, chunks - c0));
  const auto at = [&](int c) {
    const int64_t piece = kChunkMajor ? static_cast<int64_t>(c) * tiles + tile
                                      : static_cast<int64_t>(tile) * chunks + c;
    return p + piece * 32 + lane;
  };
  uint4 ring[DEPTH];
#pragma unroll
  for (int s = 0; s < DEPTH; ++s) ring[s] = s < nch ? LoadWeights(at(c0 + s), policy) : make_uint4(0, 0, 0, 0);
  uint32_t x = 0;
  for (int i0 = 0; i0 < nch; i0 += DEPTH) {
#pragma unroll
    for (int s = 0; s < DEPTH; ++s) {
      const int i = i0 + s;
      if (i < nch) {
        const uint4 w = ring[s];
        if (i + DEPTH < nch) ring[s] = LoadWeights(at(c0 + i + DEPTH), policy);
        x ^= w.x ^ w.y ^ w.z ^ w.w;
      }
    }
  }
  Sink(x, out);
}

// Median µs per call of `launch(buffer)`, over a graph of one call per buffer.
template <typename Fn>
double GraphUs(cudaStream_t stream, int buffers, Fn&& launch) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  NIBBLE_TEST_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int b = 0; b < buffers; ++b) launch(b);
  NIBBLE_TEST_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  NIBBLE_TEST_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const double us =
      TimeUs(stream, 20, [&] { NIBBLE_TEST_CUDA_CHECK(cudaGraphLaunch(exec, stream)); }) / buffers;
  NIBBLE_TEST_CUDA_CHECK(cudaGraphExecDestroy(exec));
  NIBBLE_TEST_CUDA_CHECK(cudaGraphDestroy(graph));
  return us;
}

struct Shape {
  const char* name;
  int n, k;  // out and in features: tiles = n / 16, chunks = k / 64
};

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  cudaDeviceProp prop;
  NIBBLE_TEST_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  NIBBLE_TEST_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffer<uint32_t> sink(1024);
  const double copy_gbs = CopyBandwidth(stream);
  std::printf("read_probe: %s, %d SMs; copy %.0f GB/s (read + write)\n", prop.name,
              prop.multiProcessorCount, copy_gbs);
  std::printf("| shape | MB | pattern | warps | depth | us | GB/s | %% copy |\n|---|---|---|---|---|---|---|---|\n");
  const Shape shapes[] = {{"7b.wqkv", 6144, 4096}, {"7b.w1w3", 14336, 4096}, {"7b.w2", 4096, 14336}};
  for (const Shape& s : shapes) {
    const int tiles = s.n / 16, chunks = s.k / 64;
    const size_t bytes = static_cast<size_t>(tiles) * chunks * 512;
    const int buffers = static_cast<int>(std::max<size_t>(4, (size_t{220} << 20) / bytes + 1));
    std::vector<DeviceBuffer<uint4>> bufs;
    for (int b = 0; b < buffers; ++b) {
      bufs.emplace_back(bytes / 16);
      NIBBLE_TEST_CUDA_CHECK(cudaMemset(bufs.back().get(), 0x5a + b, bytes));
    }
    const auto report = [&](const char* pattern, int warps, int depth, double us) {
      const double gbs = bytes / (us * 1e3);
      std::printf("| %s | %.1f | %s | %d | %d | %.2f | %.0f | %.0f%% |\n", s.name, bytes / 1e6,
                  pattern, warps, depth, us, gbs, 100.0 * gbs / copy_gbs);
    };
    const int64_t n16 = static_cast<int64_t>(bytes / 16);
    const int grid = prop.multiProcessorCount * 4;
    report("linear", 16, 4, GraphUs(stream, buffers, [&](int b) {
             LinearRead<4><<<grid, 512, 0, stream>>>(bufs[b].get(), n16, sink.get());
           }));
    report("linear", 16, 8, GraphUs(stream, buffers, [&](int b) {
             LinearRead<8><<<grid, 512, 0, stream>>>(bufs[b].get(), n16, sink.get());
           }));
    for (int warps : {2, 4, 8, 16}) {
      const int per = (chunks + warps - 1) / warps;
      report("tile", warps, 4, GraphUs(stream, buffers, [&](int b) {
               TileRead<4, false><<<tiles, 32 * warps, 0, stream>>>(bufs[b].get(), tiles, chunks, per, sink.get());
             }));
      report("tile", warps, 8, GraphUs(stream, buffers, [&](int b) {
               TileRead<8, false><<<tiles, 32 * warps, 0, stream>>>(bufs[b].get(), tiles, chunks, per, sink.get());
             }));
      report("chunk", warps, 4, GraphUs(stream, buffers, [&](int b) {
               TileRead<4, true><<<tiles, 32 * warps, 0, stream>>>(bufs[b].get(), tiles, chunks, per, sink.get());
             }));
    }
    NIBBLE_TEST_CUDA_CHECK(cudaGetLastError());
  }
  NIBBLE_TEST_CUDA_CHECK(cudaStreamDestroy(stream));
  return 0;
}
