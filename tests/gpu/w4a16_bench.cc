// W4A16 benchmark on the linear shapes of internlm2-chat-7b and -1_8b: our kernel, cuBLAS fp16
// (cublasGemmEx, fp16 in/out, fp32 compute: the dense baseline) and a device-to-device copy
// (the bandwidth ceiling, bytes read + written), all in one run on one card.
// Timing, two ways, both rotating over enough weight buffers that together they are over 4x the
// L2 (50 MB), so no call finds its weight cached:
//  - graph (the headline, the same method as torch_int4_bench.py): a CUDA graph of `calls`
//    launches (one per buffer, 8 to 128), 30 replays timed with events, median / calls. This is
//    how the engine runs decode (a captured step), without the launch gaps.
//  - per launch: events around each launch, median of kReps after kWarmup (includes the gap
//    between a launch and the event: a floor of several us at small sizes).
// Random non-zero data. Prints CSV (one line per shape and m) to stdout and to argv[1], and the
// decode variants' graph times (M <= 16) to argv[2]. argv[3] == --decode: only m = 1..8;
// --gemm: only m = 16..256 (the tensor-core GEMM's range in the engine); --dequant: only
// m = 1024, with the dequantize's two store forms and a memset of its output's size (the
// write ceiling) beside it.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "kernels/cpu/half.h"
#include "kernels/cuda/w4a16.h"
#include "tests/gpu/device_buffer.h"
#include "tests/gpu/timing.h"

namespace cu = nibble::kernels::cuda;
using nibble::testing::DeviceBuffer;

#define CUBLAS_CHECK(expr)                                                               \
  do {                                                                                   \
    const cublasStatus_t s_ = (expr);                                                    \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                   \
      std::fprintf(stderr, "FAIL %s:%d: %s: cublas status %d\n", __FILE__, __LINE__, #expr, \
                   static_cast<int>(s_));                                                \
      std::exit(2);                                                                      \
    }                                                                                    \
  } while (0)

namespace {

constexpr int kWarmup = 20, kReps = 200;
constexpr size_t kRotateBytes = 200u << 20;

template <typename Fn>
double MedianUs(Fn&& launch, int buffers, cudaStream_t stream = nullptr) {
  std::vector<cudaEvent_t> ev(2 * kReps);
  for (auto& e : ev) NIBBLE_TEST_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < kWarmup; ++i) launch(i % buffers);
  for (int i = 0; i < kReps; ++i) {
    NIBBLE_TEST_CUDA_CHECK(cudaEventRecord(ev[2 * i], stream));
    launch(i % buffers);
    NIBBLE_TEST_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], stream));
  }
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ms(kReps);
  for (int i = 0; i < kReps; ++i)
    NIBBLE_TEST_CUDA_CHECK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) NIBBLE_TEST_CUDA_CHECK(cudaEventDestroy(e));
  std::nth_element(ms.begin(), ms.begin() + kReps / 2, ms.end());
  return ms[kReps / 2] * 1000.0;
}

// Median us per call of `launch(buffer)` captured `calls` times into a graph on `stream`.
template <typename Fn>
double GraphUs(Fn&& launch, int buffers, cudaStream_t stream) {
  const int calls = std::min(std::max(buffers, 8), 128);
  for (int i = 0; i < 3; ++i) launch(i % buffers);  // warm: module load, cuBLAS heuristics
  NIBBLE_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  NIBBLE_TEST_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) launch(i % buffers);
  NIBBLE_TEST_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  NIBBLE_TEST_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < 3; ++i) NIBBLE_TEST_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  constexpr int kReplays = 30;
  std::vector<cudaEvent_t> ev(2 * kReplays);
  for (auto& e : ev) NIBBLE_TEST_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < kReplays; ++i) {
    NIBBLE_TEST_CUDA_CHECK(cudaEventRecord(ev[2 * i], stream));
    NIBBLE_TEST_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    NIBBLE_TEST_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], stream));
  }
  NIBBLE_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<float> ms(kReplays);
  for (int i = 0; i < kReplays; ++i)
    NIBBLE_TEST_CUDA_CHECK(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]));
  for (auto& e : ev) NIBBLE_TEST_CUDA_CHECK(cudaEventDestroy(e));
  NIBBLE_TEST_CUDA_CHECK(cudaGraphExecDestroy(exec));
  NIBBLE_TEST_CUDA_CHECK(cudaGraphDestroy(graph));
  std::nth_element(ms.begin(), ms.begin() + kReplays / 2, ms.end());
  return ms[kReplays / 2] * 1000.0 / calls;
}

template <typename T>
void FillRandom(DeviceBuffer<T>& buf, std::mt19937& rng, T lo_mask, bool half) {
  std::vector<T> host(buf.count());
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  for (auto& v : host) {
    if (half) {
      float f = unit(rng) * 0.05f;
      v = static_cast<T>(nibble::kernels::cpu::FloatToHalf(f == 0 ? 0.01f : f));
    } else {
      v = static_cast<T>(rng()) & lo_mask;
    }
  }
  buf.CopyFrom(host.data());
}

// --profile K N M [decode8|decode8ring]: 5 launches of kAuto's unsplit choice (decode8ring for
// m <= 8, decode16 above), then 5 of the named kernel (decode8 when none is named), on one
// shape, for a profiler (ncu --launch-skip / --launch-count).
int Profile(const char* k_str, const char* n_str, const char* m_str, const char* other) {
  const int64_t k = std::atoll(k_str), n = std::atoll(n_str), m = std::atoll(m_str);
  const cu::W4A16Layout l = cu::MakeW4A16Layout(n, k, 128);
  std::mt19937 rng(1);
  DeviceBuffer<uint32_t> qw(l.qw_words()), zs(l.zs_words());
  FillRandom(qw, rng, 0xffffffffu, false);
  std::vector<uint32_t> host(l.zs_words());
  for (auto& v : host) {
    v = nibble::kernels::cpu::FloatToHalf(0.01f) |
        (uint32_t{nibble::kernels::cpu::FloatToHalf(static_cast<float>(rng() % 16))} << 16);
  }
  zs.CopyFrom(host.data());
  DeviceBuffer<uint16_t> x(m * k), y(m * n);
  FillRandom(x, rng, uint16_t{0}, true);
  const std::string name = other != nullptr ? other : "";
  const cu::W4A16Kernel second =
      name == "decode8ring" ? cu::W4A16Kernel::kDecode8Ring : cu::W4A16Kernel::kDecode8;
  for (cu::W4A16Kernel kernel : {cu::ChooseW4A16Kernel(l, m, false), second}) {
    for (int i = 0; i < 5; ++i) {
      NIBBLE_TEST_CUDA_CHECK(
          cu::MatMulW4A16(l, x.get(), qw.get(), zs.get(), nullptr, y.get(), m, nullptr, kernel));
    }
  }
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if ((argc == 5 || argc == 6) && std::string(argv[1]) == "--profile") {
    return Profile(argv[2], argv[3], argv[4], argc == 6 ? argv[5] : nullptr);
  }
  FILE* csv = argc > 1 ? std::fopen(argv[1], "w") : nullptr;
  FILE* vcsv = argc > 2 ? std::fopen(argv[2], "w") : nullptr;
  std::mt19937 rng(std::random_device{}());
  cudaDeviceProp prop;
  NIBBLE_TEST_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);

  // The ceiling: a 1 GiB device-to-device copy, bytes read + written (tests/gpu/timing.h, as
  // every benchmark here measures it).
  const double copy_gbs = nibble::testing::CopyBandwidth(nullptr);
  std::printf("copy: %.0f GB/s (read + write)\n", copy_gbs);

  cudaStream_t stream;
  NIBBLE_TEST_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t handle;
  CUBLAS_CHECK(cublasCreate(&handle));
  CUBLAS_CHECK(cublasSetStream(handle, stream));
  // A workspace of our own, so that cuBLAS allocates nothing while a graph is captured.
  DeviceBuffer<uint8_t> cublas_ws(size_t{32} << 20);
  CUBLAS_CHECK(cublasSetWorkspace(handle, cublas_ws.get(), cublas_ws.bytes()));
  struct Variant { const char* name; cu::W4A16Kernel kernel; };
  const Variant variants[] = {{"decode8", cu::W4A16Kernel::kDecode8},
                              {"decode8pdl", cu::W4A16Kernel::kDecode8Pdl},
                              {"decode8ring", cu::W4A16Kernel::kDecode8Ring},
                              {"decode8ringpdl", cu::W4A16Kernel::kDecode8RingPdl},
                              {"decode16", cu::W4A16Kernel::kDecode16}};
  // The tensor-core GEMM kernels beside decode16, at 16 <= m <= 256 (the variants table also
  // gets cuBLAS fp16, and from m = 64 on dequantize + cuBLAS and the dequantize alone).
  const Variant gemm_variants[] = {{"decode16", cu::W4A16Kernel::kDecode16},
                                   {"gemm16", cu::W4A16Kernel::kGemm16},
                                   {"gemm32", cu::W4A16Kernel::kGemm32}};
  // --decode (argv[3]): only m = 1, 2, 4, 8 (the decode kernels' range), to keep a run short.
  const bool decode_only = argc > 3 && std::string(argv[3]) == "--decode";
  const bool gemm_only = argc > 3 && std::string(argv[3]) == "--gemm";
  const bool dequant_only = argc > 3 && std::string(argv[3]) == "--dequant";
  // The programmatic-launch variant only if a graph can capture it (checked on a small weight,
  // nothing fatal): otherwise it is left out rather than ending the run.
  std::vector<Variant> decode_variants(std::begin(variants), std::end(variants));
  {
    const cu::W4A16Layout l = cu::MakeW4A16Layout(2112, 64, 128);
    DeviceBuffer<uint32_t> q(l.qw_words()), z(l.zs_words());
    DeviceBuffer<uint16_t> x(64), y(2112);
    NIBBLE_TEST_CUDA_CHECK(cudaMemset(q.get(), 0, q.bytes()));
    NIBBLE_TEST_CUDA_CHECK(cudaMemset(z.get(), 0, z.bytes()));
    NIBBLE_TEST_CUDA_CHECK(cudaMemset(x.get(), 0, x.bytes()));
    bool ok = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
    for (int i = 0; ok && i < 4; ++i) {
      ok = cu::MatMulW4A16(l, x.get(), q.get(), z.get(), nullptr, y.get(), 1, stream,
                           i < 2 ? cu::W4A16Kernel::kDecode8RingPdl
                                 : cu::W4A16Kernel::kDecode8Pdl) == cudaSuccess;
    }
    cudaGraph_t graph = nullptr;
    ok = cudaStreamEndCapture(stream, &graph) == cudaSuccess && ok;
    cudaGraphExec_t exec = nullptr;
    ok = ok && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    ok = ok && cudaGraphLaunch(exec, stream) == cudaSuccess;
    ok = cudaStreamSynchronize(stream) == cudaSuccess && ok;
    if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    (void)cudaGetLastError();
    std::printf("programmatic launch in a graph: %s\n",
                ok ? "yes" : "no (the PDL variants left out)");
    if (!ok) {
      decode_variants.erase(std::remove_if(decode_variants.begin(), decode_variants.end(),
                                           [](const Variant& v) {
                                             return v.kernel == cu::W4A16Kernel::kDecode8RingPdl ||
                                                    v.kernel == cu::W4A16Kernel::kDecode8Pdl;
                                           }),
                            decode_variants.end());
    }
    if (decode_only) {  // decode16, which kAuto never picks at m <= 8: not timed
      decode_variants.erase(
          std::remove_if(decode_variants.begin(), decode_variants.end(),
                         [](const Variant& v) { return v.kernel == cu::W4A16Kernel::kDecode16; }),
          decode_variants.end());
    }
  }
  if (vcsv) std::fprintf(vcsv, "shape,k,n,m,variant,graph_us\n");
  // The floor of a graph-replayed launch: the decode kernels on near-empty weights (one 64-k
  // chunk per 16-feature tile), one block (n = 8) and one block per SM (n = 16 x SMs).
  {
    const int64_t floor_n[] = {8, 16 * static_cast<int64_t>(prop.multiProcessorCount)};
    for (const int64_t fn : floor_n) {
      const cu::W4A16Layout l = cu::MakeW4A16Layout(fn, 64, 128);
      std::vector<DeviceBuffer<uint32_t>> fq, fz;
      for (int i = 0; i < 8; ++i) {
        fq.emplace_back(l.qw_words());
        fz.emplace_back(l.zs_words());
        NIBBLE_TEST_CUDA_CHECK(cudaMemset(fq.back().get(), 0, fq.back().bytes()));
        NIBBLE_TEST_CUDA_CHECK(cudaMemset(fz.back().get(), 0, fz.back().bytes()));
      }
      DeviceBuffer<uint16_t> x(64), y(fn);
      NIBBLE_TEST_CUDA_CHECK(cudaMemset(x.get(), 0, x.bytes()));
      for (const Variant& v : decode_variants) {
        const double us = GraphUs(
            [&](int b) {
              NIBBLE_TEST_CUDA_CHECK(cu::MatMulW4A16(l, x.get(), fq[b].get(), fz[b].get(),
                                                     nullptr, y.get(), 1, stream, v.kernel));
            },
            8, stream);
        std::printf("floor n=%lld k=64 m=1 %s: %.2f us\n", (long long)fn, v.name, us);
        if (vcsv) std::fprintf(vcsv, "floor,64,%lld,1,%s,%.2f\n", (long long)fn, v.name, us);
      }
    }
  }
  struct Shape { const char* name; int64_t k, n; };
  const Shape shapes[] = {
      {"7b.wqkv", 4096, 6144},  {"7b.wo", 4096, 4096},   {"7b.w1w3", 4096, 14336},
      {"7b.w13stacked", 4096, 28672},  // gate and up as the engine stacks them: one launch
      {"7b.w2", 14336, 4096},   {"1.8b.wqkv", 2048, 4096}, {"1.8b.wo", 2048, 2048},
      {"1.8b.w1w3", 2048, 8192}, {"1.8b.w2", 8192, 2048}};
  const int64_t all_ms[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096};
  const std::vector<int64_t> ms = decode_only    ? std::vector<int64_t>(all_ms, all_ms + 4)
                                 : gemm_only    ? std::vector<int64_t>(all_ms + 4, all_ms + 9)
                                 : dequant_only ? std::vector<int64_t>(all_ms + 9, all_ms + 10)
                                                : std::vector<int64_t>(all_ms, all_ms + 11);
  // The engine's route (engine/cuda_backend.cc RunLinear): the W4A16 kernels below this many
  // tokens, DequantizeW4A16 into fp16 scratch + cuBLAS from it on.
  const int64_t kDequantizeRows = 257;  // engine/cuda_backend.cc
  const int64_t group = 128;
  const char* header =
      "shape,k,n,m,ours_us,ours_launch_us,ours_bytes,ours_GBps,cublas_fp16_us,"
      "cublas_fp16_launch_us,copy_GBps,route_us\n";
  std::printf("%s", header);
  if (csv) std::fprintf(csv, "%s", header);
  for (const Shape& s : shapes) {
    const cu::W4A16Layout l = cu::MakeW4A16Layout(s.n, s.k, group);
    const size_t wbytes = (l.qw_words() + l.zs_words()) * 4;
    const int nbuf_q = static_cast<int>(std::max<size_t>(2, kRotateBytes / wbytes + 1));
    const int nbuf_h = static_cast<int>(std::max<size_t>(2, kRotateBytes / (s.n * s.k * 2) + 1));
    std::vector<DeviceBuffer<uint32_t>> qws, zss;
    for (int i = 0; i < nbuf_q; ++i) {
      qws.emplace_back(l.qw_words());
      zss.emplace_back(l.zs_words());
      if (i > 0) {  // the same random contents at another address: as good for the timing
        NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(qws[i].get(), qws[0].get(), qws[0].bytes(), cudaMemcpyDeviceToDevice));
        NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(zss[i].get(), zss[0].get(), zss[0].bytes(), cudaMemcpyDeviceToDevice));
        continue;
      }
      FillRandom(qws.back(), rng, 0xffffffffu, false);
      // zs: fp16 scale in [-0.05, 0.05] low, zero 0..15 as fp16 high.
      std::vector<uint32_t> host(l.zs_words());
      std::uniform_real_distribution<float> sc(0.002f, 0.02f);
      for (auto& v : host) {
        const uint16_t z = nibble::kernels::cpu::FloatToHalf(static_cast<float>(rng() % 16));
        v = nibble::kernels::cpu::FloatToHalf(sc(rng)) | (uint32_t{z} << 16);
      }
      zss.back().CopyFrom(host.data());
    }
    std::vector<DeviceBuffer<uint16_t>> whs;
    for (int i = 0; i < nbuf_h; ++i) {
      whs.emplace_back(s.n * s.k);
      if (i > 0) {
        NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(whs[i].get(), whs[0].get(), whs[0].bytes(), cudaMemcpyDeviceToDevice));
        continue;
      }
      FillRandom(whs.back(), rng, uint16_t{0}, true);
    }
    // The engine passes its dequantize scratch (fp16, as large as its largest 4-bit weight) as
    // the kernels' workspace: here one of this shape's size, the least the engine has.
    DeviceBuffer<uint16_t> workspace(s.n * s.k);
    for (int64_t m : ms) {
      DeviceBuffer<uint16_t> x(m * s.k), y(m * s.n);
      FillRandom(x, rng, uint16_t{0}, true);
      auto ours_fn = [&](cu::W4A16Kernel kernel) {
        return [&, kernel](int b) {
          NIBBLE_TEST_CUDA_CHECK(cu::MatMulW4A16(l, x.get(), qws[b].get(), zss[b].get(), nullptr,
                                                 y.get(), m, stream, kernel, workspace.get(),
                                                 workspace.bytes()));
        };
      };
      const double ours = GraphUs(ours_fn(cu::W4A16Kernel::kAuto), nbuf_q, stream);
      const double ours_launch = MedianUs(ours_fn(cu::W4A16Kernel::kAuto), nbuf_q, stream);
      const float alpha = 1.0f, beta = 0.0f;
      auto dense_fn = [&](int b) {
        CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, s.n, m, s.k, &alpha,
                                  whs[b].get(), CUDA_R_16F, s.k, x.get(), CUDA_R_16F, s.k, &beta,
                                  y.get(), CUDA_R_16F, s.n, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
      };
      const double dense = GraphUs(dense_fn, nbuf_h, stream);
      const double dense_launch = MedianUs(dense_fn, nbuf_h, stream);
      double route = ours, deq_route = 0, deq_only = 0;
      if (m >= kDequantizeRows || (m >= 64 && m <= 1024)) {
        DeviceBuffer<uint16_t> scratch(s.n * s.k);
        const auto deq_cublas = [&](bool staged) {
          return GraphUs(
              [&](int b) {
                NIBBLE_TEST_CUDA_CHECK(cu::DequantizeW4A16(l, qws[b].get(), zss[b].get(),
                                                           scratch.get(), stream, staged));
                CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, s.n, m, s.k, &alpha,
                                          scratch.get(), CUDA_R_16F, s.k, x.get(), CUDA_R_16F,
                                          s.k, &beta, y.get(), CUDA_R_16F, s.n,
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
              },
              nbuf_q, stream);
        };
        deq_route = deq_cublas(true);
        if (m >= kDequantizeRows) route = deq_route;
        if (m == 64 || dequant_only) {
          const auto dequant = [&](bool staged) {
            return GraphUs(
                [&](int b) {
                  NIBBLE_TEST_CUDA_CHECK(cu::DequantizeW4A16(l, qws[b].get(), zss[b].get(),
                                                             scratch.get(), stream, staged));
                },
                nbuf_q, stream);
          };
          const double moved = double(wbytes) + 2.0 * s.n * s.k;
          deq_only = dequant(true);
          std::printf("dequantize %s: %.2f us, %.0f GB/s (int4 + scales read, fp16 written)\n",
                      s.name, deq_only, moved / (deq_only * 1e3));
          if (dequant_only) {
            // The same bytes through the direct stores, and the write ceiling: a memset of the
            // fp16 weight's size (rotating over the fp16 buffers), bytes written.
            const double direct = dequant(false);
            const double fill = GraphUs(
                [&](int b) {
                  NIBBLE_TEST_CUDA_CHECK(cudaMemsetAsync(whs[b].get(), 0, whs[b].bytes(), stream));
                },
                nbuf_h, stream);
            std::printf("dequantize %s direct stores: %.2f us, %.0f GB/s; memset of %.1f MB: "
                        "%.2f us, %.0f GB/s; dequantize + cuBLAS m=%lld: staged %.2f us, direct "
                        "%.2f us\n",
                        s.name, direct, moved / (direct * 1e3), 2e-6 * s.n * s.k, fill,
                        2.0 * s.n * s.k / (fill * 1e3), (long long)m, deq_route,
                        deq_cublas(false));
          }
        }
      }
      if (m >= 16 && m <= 1024 && !dequant_only) {
        for (const Variant& v : gemm_variants) {
          const double us = GraphUs(ours_fn(v.kernel), nbuf_q, stream);
          std::printf("variant %s m=%lld %s: %.2f us\n", s.name, (long long)m, v.name, us);
          if (vcsv) std::fprintf(vcsv, "%s,%lld,%lld,%lld,%s,%.2f\n", s.name, (long long)s.k,
                                 (long long)s.n, (long long)m, v.name, us);
        }
        if (vcsv) {
          std::fprintf(vcsv, "%s,%lld,%lld,%lld,cublas,%.2f\n", s.name, (long long)s.k,
                       (long long)s.n, (long long)m, dense);
          if (deq_route > 0)
            std::fprintf(vcsv, "%s,%lld,%lld,%lld,deq+cublas,%.2f\n", s.name, (long long)s.k,
                         (long long)s.n, (long long)m, deq_route);
          if (deq_only > 0)
            std::fprintf(vcsv, "%s,%lld,%lld,%lld,dequant,%.2f\n", s.name, (long long)s.k,
                         (long long)s.n, (long long)m, deq_only);
        }
      }
      if (m <= 16) {
        for (const Variant& v : decode_variants) {
          const double us = GraphUs(ours_fn(v.kernel), nbuf_q, stream);
          std::printf("variant %s m=%lld %s: %.2f us\n", s.name, (long long)m, v.name, us);
          if (vcsv) std::fprintf(vcsv, "%s,%lld,%lld,%lld,%s,%.2f\n", s.name, (long long)s.k,
                                 (long long)s.n, (long long)m, v.name, us);
        }
      }
      // decode8 and its shared-memory ring (with PDL, as the engine launches them) at fixed
      // warps per block: the sweep behind the launch's own choice (ChooseDecodeWarps in
      // w4a16.cu).
      if (m == 1 || m == 8) {
        for (const Variant& v : decode_variants) {
          if (v.kernel != cu::W4A16Kernel::kDecode8Pdl &&
              v.kernel != cu::W4A16Kernel::kDecode8RingPdl) {
            continue;
          }
          for (const int warps : {2, 4, 8, 16}) {
            const double us = GraphUs(
                [&](int b) {
                  NIBBLE_TEST_CUDA_CHECK(cu::MatMulW4A16WithWarps(
                      l, x.get(), qws[b].get(), zss[b].get(), nullptr, y.get(), m, stream,
                      v.kernel, warps));
                },
                nbuf_q, stream);
            std::printf("variant %s m=%lld %s/w%d: %.2f us\n", s.name, (long long)m, v.name,
                        warps, us);
            if (vcsv) std::fprintf(vcsv, "%s,%lld,%lld,%lld,%s/w%d,%.2f\n", s.name,
                                   (long long)s.k, (long long)s.n, (long long)m, v.name, warps,
                                   us);
          }
        }
      }
      const double bytes = double(wbytes) + 2.0 * m * s.k + 2.0 * m * s.n;
      char line[256];
      std::snprintf(line, sizeof line, "%s,%lld,%lld,%lld,%.2f,%.2f,%.0f,%.1f,%.2f,%.2f,%.1f,%.2f\n",
                    s.name, (long long)s.k, (long long)s.n, (long long)m, ours, ours_launch,
                    bytes, bytes / (ours * 1e3), dense, dense_launch, copy_gbs, route);
      std::printf("%s", line);
      if (csv) std::fprintf(csv, "%s", line);
    }
  }
  CUBLAS_CHECK(cublasDestroy(handle));
  NIBBLE_TEST_CUDA_CHECK(cudaStreamDestroy(stream));
  if (csv) std::fclose(csv);
  if (vcsv) std::fclose(vcsv);
  return 0;
}
