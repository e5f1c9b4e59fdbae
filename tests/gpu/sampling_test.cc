// kernels/cuda/sampling.h against the host rule kernels/cpu/sampling.h (SampleRow), then its
// speed. Plain executable: PASS or FAIL lines, exit status 1 on any failure. Fresh random rows
// every run (the seed is printed; sampling_test SEED replays it).
//
// Each launch mixes rows of every parameter combination (temperature 0 / 0.6 / 1 / 1.7, top_k
// 0 / 1 / 3 / 40 / 2048 / 2049 (either side of the kernel's shared-memory capacity) / vocab /
// vocab + 7, top_p 1 / 0.95 / 0.5 / 0.05, penalty 1 / 1.3 with distinct previous ids, some
// outside the vocabulary), each row with its own draw u;
// vocabularies 1, 7, 33, 1000, 4097 and 92544 (InternLM2), two row strides; outputs filled
// with -1 first. Logits: uniform in [-8, 8] (distinct), or on a grid of 0.5 (many planted
// ties, where only the id order separates candidates).
//
// Expected: the penalized logits bit-exact; greedy rows exact; sampled rows the host's token,
// except where the host's own answer changes when u moves by 1e-9 relative or top_p by one
// float step ("near ties": the target or the nucleus boundary within rounding of a cumulative
// sum, where the device's other summation order may fall on the other side). Those are
// counted and printed apart; any other difference fails.
//
// Also: the kernel captured in a CUDA graph and replayed with new parameters in the same
// device memory; argument checks; and the time per launch at 64 rows x 92544 for the usual
// settings, on flat (uniform) and peaked (normal, sd 3: LLM-like) logits.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/sampling.h"
#include "kernels/cuda/sampling.h"
#include "tests/gpu/compare.h"
#include "tests/gpu/device_buffer.h"

namespace cu = nibble::kernels::cuda;
namespace cpu = nibble::kernels::cpu;
using nibble::kernels::SampleRowParams;
using nibble::testing::DeviceBuffer;

namespace {

struct Batch {
  int64_t vocab = 0, stride = 0;
  std::vector<float> logits;  // [rows, stride]
  std::vector<SampleRowParams> params;
  std::vector<int32_t> penalty_offsets{0};
  std::vector<int32_t> penalty_ids;
  int64_t rows() const { return static_cast<int64_t>(params.size()); }
};

float Uniform(std::mt19937& rng, float lo, float hi) {
  return lo + (hi - lo) * static_cast<float>(rng() >> 8) * 0x1.0p-24f;
}

void AddRow(Batch& b, std::mt19937& rng, const SampleRowParams& p, bool ties) {
  const size_t at = b.logits.size();
  b.logits.resize(at + b.stride, NAN);  // the padding past vocab must never be read
  for (int64_t i = 0; i < b.vocab; ++i) {
    float v = Uniform(rng, -8.0f, 8.0f);
    if (ties) v = std::round(v * 2) / 2;
    b.logits[at + i] = v;
  }
  b.params.push_back(p);
  if (p.repetition_penalty != 1.0f) {
    const int n = static_cast<int>(rng() % 40);
    std::vector<int32_t> ids;
    for (int i = 0; i < n; ++i) ids.push_back(static_cast<int32_t>(rng() % b.vocab));
    ids.push_back(-1);  // skipped, as on the host
    ids.push_back(static_cast<int32_t>(b.vocab));
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    b.penalty_ids.insert(b.penalty_ids.end(), ids.begin(), ids.end());
  }
  b.penalty_offsets.push_back(static_cast<int32_t>(b.penalty_ids.size()));
}

template <typename T>
DeviceBuffer<T> Upload(const std::vector<T>& h) {
  DeviceBuffer<T> d(std::max<size_t>(h.size(), 1));
  if (!h.empty()) NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(d.get(), h.data(), h.size() * sizeof(T),
                                                    cudaMemcpyHostToDevice));
  return d;
}

int32_t HostPick(const Batch& b, int64_t r, const SampleRowParams& p, cpu::SampleScratch& s,
                 std::vector<float>* penalized = nullptr) {
  std::vector<float> row(b.logits.begin() + r * b.stride, b.logits.begin() + r * b.stride + b.vocab);
  const std::span<const int32_t> ids(b.penalty_ids.data() + b.penalty_offsets[r],
                                     b.penalty_ids.data() + b.penalty_offsets[r + 1]);
  const int32_t id = cpu::SampleRow(row, p, ids, s);
  if (penalized != nullptr) *penalized = std::move(row);
  return id;
}

// Whether the host's answer moves to `got` when u or top_p moves by a rounding step.
bool NearTie(const Batch& b, int64_t r, int32_t got, cpu::SampleScratch& s) {
  const SampleRowParams p = b.params[r];
  for (double factor : {1 - 1e-9, 1 + 1e-9}) {
    SampleRowParams q = p;
    q.u = std::min(p.u * factor, std::nextafter(1.0, 0.0));
    if (p.u == 0) q.u = factor > 1 ? 1e-12 : 0;
    if (HostPick(b, r, q, s) == got) return true;
  }
  if (p.top_p < 1.0f) {
    for (float to : {0.0f, 2.0f}) {
      SampleRowParams q = p;
      q.top_p = std::min(1.0f, std::nextafter(p.top_p, to));
      if (HostPick(b, r, q, s) == got) return true;
    }
  }
  return false;
}

struct Outcome {
  int64_t rows = 0, wrong = 0, near_ties = 0, bad_logits = 0;
};

Outcome RunAndCompare(const Batch& b) {
  Outcome o;
  o.rows = b.rows();
  auto d_logits = Upload(b.logits);
  auto d_params = Upload(b.params);
  auto d_offsets = Upload(b.penalty_offsets);
  auto d_ids = Upload(b.penalty_ids);
  DeviceBuffer<int32_t> d_out(b.rows());
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(d_out.get(), 0xff, d_out.bytes()));
  NIBBLE_TEST_CUDA_CHECK(cu::SampleRows(d_logits.get(), b.rows(), b.vocab, b.stride,
                                        d_params.get(), d_offsets.get(), d_ids.get(),
                                        d_out.get(), nullptr));
  NIBBLE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<int32_t> got(b.rows());
  d_out.CopyTo(got.data());
  std::vector<float> after(b.logits.size());
  NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(after.data(), d_logits.get(), after.size() * sizeof(float),
                                    cudaMemcpyDeviceToHost));
  cpu::SampleScratch scratch;
  std::vector<float> penalized;
  for (int64_t r = 0; r < b.rows(); ++r) {
    const SampleRowParams& p = b.params[r];
    const int32_t want = HostPick(b, r, p, scratch, &penalized);
    if (!std::equal(penalized.begin(), penalized.end(), after.begin() + r * b.stride)) {
      ++o.bad_logits;
    }
    if (got[r] == want) continue;
    if (p.temperature != 0.0f && got[r] >= 0 && got[r] < b.vocab && NearTie(b, r, got[r], scratch)) {
      ++o.near_ties;
      std::printf("  near tie: vocab %lld row %lld t %g k %d p %g u %.17g: host %d device %d\n",
                  (long long)b.vocab, (long long)r, p.temperature, p.top_k, p.top_p, p.u, want,
                  got[r]);
      continue;
    }
    ++o.wrong;
    if (o.wrong <= 10) {
      std::printf("  WRONG vocab %lld row %lld t %g k %d p %g pen %g u %.17g: host %d device %d\n",
                  (long long)b.vocab, (long long)r, p.temperature, p.top_k, p.top_p,
                  p.repetition_penalty, p.u, want, got[r]);
    }
  }
  return o;
}

double Draw(std::mt19937& rng) {
  const uint64_t bits = (static_cast<uint64_t>(rng()) << 32) | rng();
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

int TestAgainstHost(std::mt19937& rng, int64_t vocab, int64_t stride, int reps, bool ties) {
  Batch b;
  b.vocab = vocab;
  b.stride = stride;
  for (float t : {0.0f, 0.6f, 1.0f, 1.7f}) {
    for (int32_t k : {0, 1, 3, 40, 2048, 2049, static_cast<int32_t>(vocab),
                      static_cast<int32_t>(vocab + 7)}) {
      for (float top_p : {1.0f, 0.95f, 0.5f, 0.05f}) {
        for (float penalty : {1.0f, 1.3f}) {
          for (int i = 0; i < reps; ++i) {
            SampleRowParams p;
            p.temperature = t;
            p.top_k = k;
            p.top_p = top_p;
            p.repetition_penalty = penalty;
            p.u = t == 0.0f ? 0.0 : Draw(rng);
            AddRow(b, rng, p, ties);
          }
        }
      }
    }
  }
  const Outcome o = RunAndCompare(b);
  const bool ok = o.wrong == 0 && o.bad_logits == 0;
  std::printf("%s sample vocab=%lld stride=%lld %s rows=%lld wrong=%lld near_ties=%lld "
              "penalized_logits_wrong=%lld\n",
              ok ? "PASS" : "FAIL", (long long)vocab, (long long)stride, ties ? "ties" : "distinct",
              (long long)o.rows, (long long)o.wrong, (long long)o.near_ties,
              (long long)o.bad_logits);
  return ok ? 0 : 1;
}

// Edge rows: u at 0 and just under 1, a row of equal logits, -inf entries, tiny temperature.
int TestEdges(std::mt19937& rng) {
  Batch b;
  b.vocab = 1000;
  b.stride = 1000;
  const double us[] = {0.0, std::nextafter(1.0, 0.0), 0.5};
  for (double u : us) {
    for (int32_t k : {0, 7, 1000}) {
      for (float top_p : {1.0f, 0.3f}) {
        SampleRowParams p{u, 0.8f, k, top_p, 1.0f};
        AddRow(b, rng, p, false);
        AddRow(b, rng, p, false);
        std::fill_n(b.logits.end() - b.stride, b.vocab, 1.25f);  // all equal
        AddRow(b, rng, p, false);
        for (int i = 0; i < 900; ++i) b.logits[b.logits.size() - b.stride + i] = -INFINITY;
        SampleRowParams cold = p;
        cold.temperature = 1e-4f;
        AddRow(b, rng, cold, true);
      }
    }
  }
  const Outcome o = RunAndCompare(b);
  const bool ok = o.wrong == 0 && o.bad_logits == 0;
  std::printf("%s sample edges rows=%lld wrong=%lld near_ties=%lld\n", ok ? "PASS" : "FAIL",
              (long long)o.rows, (long long)o.wrong, (long long)o.near_ties);
  return ok ? 0 : 1;
}

// Captured once, replayed with other parameters written into the same device memory.
int TestGraphReplay(std::mt19937& rng) {
  Batch b;
  b.vocab = 4097;
  b.stride = 4097;
  for (int i = 0; i < 8; ++i) AddRow(b, rng, SampleRowParams{Draw(rng), 1.0f, 0, 0.9f, 1.0f}, false);
  auto d_logits = Upload(b.logits);
  auto d_params = Upload(b.params);
  auto d_offsets = Upload(b.penalty_offsets);
  DeviceBuffer<int32_t> d_ids(64), d_out(b.rows());
  cudaStream_t stream;
  NIBBLE_TEST_CUDA_CHECK(cudaStreamCreate(&stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  NIBBLE_TEST_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  NIBBLE_TEST_CUDA_CHECK(cu::SampleRows(d_logits.get(), b.rows(), b.vocab, b.stride,
                                        d_params.get(), d_offsets.get(), d_ids.get(),
                                        d_out.get(), stream));
  NIBBLE_TEST_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  NIBBLE_TEST_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  int64_t wrong = 0;
  cpu::SampleScratch scratch;
  for (int replay = 0; replay < 3; ++replay) {
    // New parameters and penalty ids in the same memory, as the engine writes each step's.
    b.penalty_ids.clear();
    b.penalty_offsets = {0};
    for (int64_t r = 0; r < b.rows(); ++r) {
      const float temps[] = {0.0f, 0.7f, 1.2f};
      b.params[r] = SampleRowParams{Draw(rng), temps[(r + replay) % 3],
                                    static_cast<int32_t>((r * 37 + replay) % 60),
                                    r % 2 ? 0.8f : 1.0f, r % 3 ? 1.2f : 1.0f};
      for (int i = 0; i < 3; ++i) b.penalty_ids.push_back(static_cast<int32_t>(r * 3 + i + replay));
      b.penalty_offsets.push_back(static_cast<int32_t>(b.penalty_ids.size()));
    }
    NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(d_logits.get(), b.logits.data(), b.logits.size() * 4,
                                      cudaMemcpyHostToDevice));
    NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(d_params.get(), b.params.data(),
                                      b.params.size() * sizeof(SampleRowParams),
                                      cudaMemcpyHostToDevice));
    NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(d_offsets.get(), b.penalty_offsets.data(),
                                      b.penalty_offsets.size() * 4, cudaMemcpyHostToDevice));
    NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(d_ids.get(), b.penalty_ids.data(),
                                      b.penalty_ids.size() * 4, cudaMemcpyHostToDevice));
    NIBBLE_TEST_CUDA_CHECK(cudaMemset(d_out.get(), 0xff, d_out.bytes()));
    NIBBLE_TEST_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    NIBBLE_TEST_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<int32_t> got(b.rows());
    d_out.CopyTo(got.data());
    for (int64_t r = 0; r < b.rows(); ++r) {
      const int32_t want = HostPick(b, r, b.params[r], scratch);
      if (got[r] != want && !NearTie(b, r, got[r], scratch)) ++wrong;
    }
  }
  NIBBLE_TEST_CUDA_CHECK(cudaGraphExecDestroy(exec));
  NIBBLE_TEST_CUDA_CHECK(cudaGraphDestroy(graph));
  NIBBLE_TEST_CUDA_CHECK(cudaStreamDestroy(stream));
  std::printf("%s sample graph replays=3 rows=%lld wrong=%lld\n", wrong ? "FAIL" : "PASS",
              (long long)b.rows(), (long long)wrong);
  return wrong != 0;
}

int TestArguments() {
  DeviceBuffer<float> logits(16);
  int fails = 0;
  auto expect_invalid = [&](int64_t rows, int64_t vocab, int64_t stride) {
    const cudaError_t e = cu::SampleRows(logits.get(), rows, vocab, stride, nullptr, nullptr,
                                         nullptr, nullptr, nullptr);
    if (e != cudaErrorInvalidValue) {
      std::printf("FAIL sample args rows=%lld vocab=%lld stride=%lld: %s\n", (long long)rows,
                  (long long)vocab, (long long)stride, cudaGetErrorString(e));
      ++fails;
    }
  };
  expect_invalid(-1, 8, 8);
  expect_invalid(1, 0, 8);
  expect_invalid(1, 8, 7);
  expect_invalid(1, cu::kSampleRowsMaxVocab + 1, cu::kSampleRowsMaxVocab + 1);
  if (cu::SampleRows(logits.get(), 0, 8, 8, nullptr, nullptr, nullptr, nullptr, nullptr) !=
      cudaSuccess) {
    std::printf("FAIL sample args: zero rows must do nothing\n");
    ++fails;
  }
  if (fails == 0) std::printf("PASS sample args\n");
  return fails;
}

// Time per launch, 64 rows of 92544 (the logits rewritten before each launch: the penalty
// works in place; the copy is timed apart and subtracted).
void Bench(std::mt19937& rng) {
  const int64_t rows = 64, vocab = 92544;
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (bool peaked : {true, false}) {
    std::vector<float> logits(rows * vocab);
    for (float& v : logits) v = peaked ? normal(rng) : Uniform(rng, -8.0f, 8.0f);
    auto d_source = Upload(logits);
    DeviceBuffer<float> d_logits(logits.size());
    DeviceBuffer<int32_t> d_out(rows);
    struct Setting {
      const char* name;
      SampleRowParams p;
    };
    const Setting settings[] = {
        {"greedy", {0.0, 0.0f, 0, 1.0f, 1.0f}},
        {"t=0.8", {0.0, 0.8f, 0, 1.0f, 1.0f}},
        {"t=0.8 k=40", {0.0, 0.8f, 40, 1.0f, 1.0f}},
        {"t=0.8 p=0.9", {0.0, 0.8f, 0, 0.9f, 1.0f}},
        {"t=0.8 k=40 p=0.9 pen=1.1", {0.0, 0.8f, 40, 0.9f, 1.1f}},
        {"t=0.8 p=0.99", {0.0, 0.8f, 0, 0.99f, 1.0f}},
        {"t=0.8 k=vocab", {0.0, 0.8f, static_cast<int32_t>(vocab), 1.0f, 1.0f}},
    };
    std::vector<int32_t> offsets(rows + 1), ids(rows * 64);
    for (int64_t r = 0; r <= rows; ++r) offsets[r] = static_cast<int32_t>(r * 64);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 1447) % vocab);
    for (int64_t r = 0; r < rows; ++r) std::sort(ids.begin() + r * 64, ids.begin() + r * 64 + 64);
    auto d_offsets = Upload(offsets);
    auto d_ids = Upload(ids);
    cudaEvent_t start, stop;
    NIBBLE_TEST_CUDA_CHECK(cudaEventCreate(&start));
    NIBBLE_TEST_CUDA_CHECK(cudaEventCreate(&stop));
    auto time_ms = [&](const SampleRowParams* params, int reps) {
      NIBBLE_TEST_CUDA_CHECK(cudaEventRecord(start));
      for (int i = 0; i < reps; ++i) {
        NIBBLE_TEST_CUDA_CHECK(cudaMemcpyAsync(d_logits.get(), d_source.get(), d_source.bytes(),
                                               cudaMemcpyDeviceToDevice));
        if (params != nullptr) {
          NIBBLE_TEST_CUDA_CHECK(cu::SampleRows(d_logits.get(), rows, vocab, vocab, params,
                                                d_offsets.get(), d_ids.get(), d_out.get(),
                                                nullptr));
        }
      }
      NIBBLE_TEST_CUDA_CHECK(cudaEventRecord(stop));
      NIBBLE_TEST_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0;
      NIBBLE_TEST_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      return ms / reps;
    };
    const int reps = 20;
    time_ms(nullptr, 3);
    const float copy_ms = time_ms(nullptr, reps);
    for (const Setting& s : settings) {
      std::vector<SampleRowParams> params(rows, s.p);
      for (auto& p : params) p.u = Draw(rng);
      auto d_params = Upload(params);
      time_ms(d_params.get(), 2);
      const float ms = time_ms(d_params.get(), reps) - copy_ms;
      std::printf("bench sample %s logits, 64 x 92544, %-26s %8.1f us/launch\n",
                  peaked ? "peaked" : "flat  ", s.name, ms * 1000);
    }
    NIBBLE_TEST_CUDA_CHECK(cudaEventDestroy(start));
    NIBBLE_TEST_CUDA_CHECK(cudaEventDestroy(stop));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const unsigned seed = nibble::testing::TestSeed(argc, argv, "sampling_test");
  std::mt19937 rng(seed);
  int fails = TestArguments();
  for (bool ties : {false, true}) {
    fails += TestAgainstHost(rng, 1, 1, 1, ties);
    fails += TestAgainstHost(rng, 7, 9, 2, ties);
    fails += TestAgainstHost(rng, 33, 33, 2, ties);
    fails += TestAgainstHost(rng, 1000, 1003, 2, ties);
    fails += TestAgainstHost(rng, 4097, 4097, 2, ties);
    fails += TestAgainstHost(rng, 92544, 92544, 1, ties);
  }
  fails += TestEdges(rng);
  fails += TestGraphReplay(rng);
  std::printf("sampling_test: %s, %d failure(s), seed %u\n", fails == 0 ? "PASS" : "FAIL", fails,
              seed);
  if (argc <= 2) Bench(rng);
  return fails == 0 ? 0 : 1;
}
