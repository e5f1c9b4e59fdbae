// The AWQ search on the GPU (quant/awq_cuda.cc, kernels/cuda/awq.h) against the CPU's
// (quant/awq.cc, the reference), on the real stories260K model and its InternLM2 layout with
// the ctest fixtures' calibration (TinyStories, 32 x 256 tokens). Needs a GPU and the
// fixtures of the ctest suite (tests/gpu/run.sh --full runs it after ctest):
//   NIBBLE_TEST_MODELS=build/test-models NIBBLE_SHARED_DIR=../shared
//     NIBBLE_GOLDEN_DIR=tests/golden gpu_awq_test
//
// What must agree, and how closely (the GPU calibrates in fp16, the CPU in fp32, and the GPU
// sums the error through the Gram matrix instead of token by token):
//  - the scale candidates' quantization error: bit for bit (the same round-to-nearest);
//  - the clipping search on the same inputs: another bound than a plain token loop's only
//    where two bounds' errors are within 1e-3 of each other;
//  - each group's output error: within 3 % of the CPU's at ratio 0 (plain RTN), within 5 % at
//    the chosen ratio; the chosen ratio the same in >= 75 % of the groups;
//  - the artifacts: perplexity on text neither calibrated on within 1 % of each other, and the
//    GPU's closes >= 25 % of RTN's gap to fp32 (the CPU's own bar, quantized_test.cc);
//  - the GPU search is deterministic: run twice, and stopped after two layers then resumed, it
//    writes the same bytes.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "engine/model.h"
#include "engine/perplexity.h"
#include "kernels/cuda/awq.h"
#include "quant/quantize_model.h"
#include "quant/rtn.h"
#include "tests/gpu/device_buffer.h"
#include "tests/integration/test_env.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
namespace kc = kernels::cuda;

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// A device copy of `host`.
template <typename T>
testing::DeviceBuffer<T> OnDevice(const std::vector<T>& host) {
  testing::DeviceBuffer<T> buffer(host.size());
  buffer.CopyFrom(host.data());
  return buffer;
}

template <typename T>
std::vector<T> OnHost(const testing::DeviceBuffer<T>& buffer) {
  std::vector<T> host(buffer.count());
  buffer.CopyTo(host.data());
  return host;
}

std::vector<float> RandomVector(size_t n, std::mt19937& rng, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

struct Shape {
  int64_t out, in, group;
};
const Shape kShapes[] = {{8, 64, 32}, {24, 200, 64}, {40, 384, 128}, {16, 172, 128}, {96, 1000, 32}};

// The scale search's error D = W - Q(W·s)/s equals quant/rtn.h's, bit for bit.
TEST(AwqKernels, ScaledQuantizationErrorIsTheCpuRoundToNearest) {
  std::mt19937 rng(1234);
  for (const Shape& shape : kShapes) {
    const std::vector<float> w = RandomVector(shape.out * shape.in, rng, -0.2f, 0.2f);
    const std::vector<float> s = RandomVector(shape.in, rng, 0.25f, 4.0f);
    std::vector<float> scaled = w;
    for (int64_t n = 0; n < shape.out; ++n) {
      for (int64_t k = 0; k < shape.in; ++k) scaled[n * shape.in + k] *= s[k];
    }
    std::vector<float> expected =
        quant::QuantizeRtn(scaled, shape.in, shape.out, shape.group).Dequantize();
    for (int64_t n = 0; n < shape.out; ++n) {
      for (int64_t k = 0; k < shape.in; ++k) {
        float& e = expected[n * shape.in + k];
        e = w[n * shape.in + k] - e / s[k];
      }
    }
    const auto dw = OnDevice(w);
    const auto ds = OnDevice(s);
    const auto dd = OnDevice(std::vector<float>(w.size(), NAN));
    ASSERT_CUDA(kc::AwqScaledQuantizationError(dw.get(), shape.out, shape.in, shape.group,
                                               ds.get(), dd.get(), 0));
    const std::vector<float> got = OnHost(dd);
    int64_t mismatches = 0;
    for (size_t i = 0; i < got.size(); ++i) mismatches += !(got[i] == expected[i]);
    EXPECT_EQ(mismatches, 0) << shape.out << "x" << shape.in << " g" << shape.group;
  }
}

// The clipping search against a plain loop over the tokens (the CPU searcher's method): the
// same bound for (nearly) every group; where not, an error within 1e-3 of the best.
TEST(AwqKernels, ClipSearchMatchesABruteForceSearch) {
  std::mt19937 rng(99);
  constexpr int kGrid = 20, kSteps = 10;
  constexpr int64_t kTokens = 96;
  for (const Shape& shape : kShapes) {
    std::vector<float> w = RandomVector(shape.out * shape.in, rng, -0.2f, 0.2f);
    // A few outliers per row: clipping matters where a group's range is set by one weight.
    for (int64_t n = 0; n < shape.out; ++n) w[n * shape.in + rng() % shape.in] *= 6.0f;
    const std::vector<float> x = RandomVector(kTokens * shape.in, rng, -1.0f, 1.0f);
    const std::vector<float> s = RandomVector(shape.in, rng, 0.5f, 2.0f);
    const int64_t groups = (shape.in + shape.group - 1) / shape.group;
    // Reference: per row and group, each bound's error Σ_t (x_t/s · (q - w))² in double.
    std::vector<float> expected = w;
    int64_t close_calls = 0;
    for (int64_t n = 0; n < shape.out; ++n) {
      for (int64_t j = 0; j < groups; ++j) {
        const int64_t begin = j * shape.group, len = std::min(shape.group, shape.in - begin);
        const float* row = w.data() + n * shape.in + begin;
        float max_abs = 0;
        for (int64_t k = 0; k < len; ++k) max_abs = std::max(max_abs, std::abs(row[k]));
        std::vector<double> errors;
        for (int i = 0; i <= kSteps; ++i) {
          const float bound = max_abs * (1.0f - static_cast<float>(i) / kGrid);
          std::vector<float> clipped(row, row + len);
          for (float& v : clipped) v = std::clamp(v, -bound, bound);
          const std::vector<float> q = quant::QuantizeRtn(clipped, len, 1, len).Dequantize();
          double error = 0;
          for (int64_t t = 0; t < kTokens; ++t) {
            double dot = 0;
            for (int64_t k = 0; k < len; ++k) {
              dot += static_cast<double>(x[t * shape.in + begin + k] / s[begin + k]) *
                     (static_cast<double>(q[k]) - row[k]);
            }
            error += dot * dot;
          }
          errors.push_back(error);
        }
        const int best = static_cast<int>(std::min_element(errors.begin(), errors.end()) -
                                          errors.begin());
        const float bound = max_abs * (1.0f - static_cast<float>(best) / kGrid);
        for (int64_t k = 0; k < len; ++k) {
          expected[n * shape.in + begin + k] = std::clamp(row[k], -bound, bound);
        }
        std::vector<double> sorted = errors;
        std::sort(sorted.begin(), sorted.end());
        close_calls += sorted[1] - sorted[0] <= 1e-3 * sorted[0];
      }
    }
    const auto dw = OnDevice(w);
    const auto dx = OnDevice(x);
    const auto ds = OnDevice(s);
    const auto dg = OnDevice(std::vector<float>(groups * shape.group * shape.group, NAN));
    ASSERT_CUDA(kc::GroupGram(dx.get(), kTokens, shape.in, shape.group, ds.get(), dg.get(), 0));
    ASSERT_CUDA(kc::AwqClipSearch(dw.get(), shape.out, shape.in, shape.group, dg.get(), kGrid,
                                  kSteps, 0));
    const std::vector<float> got = OnHost(dw);
    int64_t differing_groups = 0;
    for (int64_t n = 0; n < shape.out; ++n) {
      for (int64_t j = 0; j < groups; ++j) {
        const int64_t begin = j * shape.group, len = std::min(shape.group, shape.in - begin);
        bool same = true;
        for (int64_t k = 0; k < len; ++k) {
          same = same && got[n * shape.in + begin + k] == expected[n * shape.in + begin + k];
        }
        differing_groups += !same;
      }
    }
    std::printf("clip %lldx%lld g%lld: %lld of %lld groups differ (%lld near-ties)\n",
                static_cast<long long>(shape.out), static_cast<long long>(shape.in),
                static_cast<long long>(shape.group), static_cast<long long>(differing_groups),
                static_cast<long long>(shape.out * groups), static_cast<long long>(close_calls));
    EXPECT_LE(differing_groups, close_calls) << "a group chose another bound without a near-tie";
  }
}

struct Case {
  const char* source;       // a ctest fixture
  const char* rtn_fixture;  // the same group's RTN artifact
  int64_t group;
};

class GpuAwq : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    tmp_ = fs::temp_directory_path() / ("nibble-gpu-awq-" + std::to_string(::getpid()));
    fs::create_directories(tmp_);
  }
  void TearDown() override { fs::remove_all(tmp_); }

  quant::QuantizeOptions Prepare(const std::string& device) {
    quant::QuantizeSettings settings;
    settings.method = quant::QuantMethod::kAwq;
    settings.group_size = GetParam().group;
    settings.calib_dataset = "tinystories";
    settings.datasets_dir = testing::RequiredEnv("NIBBLE_SHARED_DIR") + "/datasets";
    settings.calibration.samples = 32;
    settings.calibration.seqlen = 256;
    settings.eval_dataset = "none";
    settings.device = device;
    auto prepared = quant::PrepareQuantization(testing::TestModel(GetParam().source), settings);
    EXPECT_TRUE(prepared.ok()) << prepared.status();
    return prepared.ok() ? prepared->options : quant::QuantizeOptions{};
  }

  double Perplexity(const std::string& dir) {
    const auto ids = testing::Golden("stories260K_tinystories_sample_ids.json")["ids"]
                         .get<std::vector<int32_t>>();
    auto model = testing::LoadOrDie(dir);
    if (!model) return 0;
    auto result = engine::ComputePerplexity(model->backend(), ids, 256);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? result->perplexity : 0.0;
  }

  fs::path tmp_;
};

TEST_P(GpuAwq, AgreesWithTheCpuSearch) {
  const std::string source = testing::TestModel(GetParam().source);
  const quant::QuantizeOptions cpu_options = Prepare("cpu");
  const quant::QuantizeOptions gpu_options = Prepare("cuda");
  ASSERT_EQ(gpu_options.cuda_device, 0);
  auto cpu = quant::QuantizeModelDirectory(source, (tmp_ / "cpu").string(), cpu_options);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = quant::QuantizeModelDirectory(source, (tmp_ / "gpu").string(), gpu_options);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  std::printf("%s g%lld: search cpu %.2f s, gpu %.2f s; gpu peak device memory %.1f MiB\n",
              GetParam().source, static_cast<long long>(GetParam().group),
              cpu->phase_seconds.at("search"), gpu->phase_seconds.at("search"),
              gpu->peak_device_bytes / 1048576.0);
  EXPECT_GT(gpu->peak_device_bytes, 0);

  ASSERT_EQ(cpu->awq_scales.size(), gpu->awq_scales.size());
  int64_t same_ratio = 0;
  for (size_t i = 0; i < cpu->awq_scales.size(); ++i) {
    const quant::AwqLayerScales& c = cpu->awq_scales[i];
    const quant::AwqLayerScales& g = gpu->awq_scales[i];
    ASSERT_EQ(c.group, g.group);
    std::printf("  %s: ratio cpu %.2f gpu %.2f; rtn loss cpu %.4g gpu %.4g; awq loss cpu %.4g "
                "gpu %.4g\n",
                c.group.c_str(), c.ratio, g.ratio, c.loss_rtn, g.loss_rtn, c.loss_awq, g.loss_awq);
    same_ratio += c.ratio == g.ratio;
    // The same quantity (RTN's output error) measured two ways: on fp32 activations token by
    // token, and on fp16 ones through the Gram matrix.
    EXPECT_NEAR(g.loss_rtn / c.loss_rtn, 1.0, 0.03) << c.group;
    EXPECT_NEAR(g.loss_awq / c.loss_awq, 1.0, 0.05) << c.group;
    EXPECT_LE(g.loss_awq, g.loss_rtn) << c.group;
  }
  const double agreement = static_cast<double>(same_ratio) / cpu->awq_scales.size();
  std::printf("%s g%lld: the same ratio in %lld of %zu groups\n", GetParam().source,
              static_cast<long long>(GetParam().group), static_cast<long long>(same_ratio),
              cpu->awq_scales.size());
  EXPECT_GE(agreement, 0.75);

  const double fp32 = Perplexity(source);
  const double rtn = Perplexity(testing::TestModel(GetParam().rtn_fixture));
  const double on_cpu = Perplexity((tmp_ / "cpu").string());
  const double on_gpu = Perplexity((tmp_ / "gpu").string());
  std::printf("%s g%lld: perplexity fp32 %.4f rtn %.4f awq(cpu) %.4f awq(gpu) %.4f\n",
              GetParam().source, static_cast<long long>(GetParam().group), fp32, rtn, on_cpu,
              on_gpu);
  EXPECT_NEAR(on_gpu / on_cpu, 1.0, 0.01);
  EXPECT_LT(on_gpu, rtn);
  EXPECT_GE((rtn - on_gpu) / (rtn - fp32), 0.25);
}

TEST_P(GpuAwq, IsDeterministicAndResumesToTheSameBytes) {
  const std::string source = testing::TestModel(GetParam().source);
  const quant::QuantizeOptions options = Prepare("cuda");
  auto first = quant::QuantizeModelDirectory(source, (tmp_ / "a").string(), options);
  ASSERT_TRUE(first.ok()) << first.status();
  auto again = quant::QuantizeModelDirectory(source, (tmp_ / "b").string(), options);
  ASSERT_TRUE(again.ok()) << again.status();
  const std::string bytes = testing::ReadFile((tmp_ / "a" / "model.safetensors").string());
  EXPECT_EQ(bytes, testing::ReadFile((tmp_ / "b" / "model.safetensors").string()));

  int layers_done = 0;
  quant::QuantizeControl stop_after_two;
  stop_after_two.progress = [&](const quant::QuantizeProgress& p) {
    if (p.step == "layer done") layers_done = static_cast<int>(p.layers_done);
  };
  stop_after_two.stop_requested = [&] { return layers_done >= 2; };
  auto stopped = quant::QuantizeModelDirectory(source, (tmp_ / "c").string(), options,
                                               stop_after_two);
  ASSERT_FALSE(stopped.ok());
  EXPECT_EQ(stopped.status().code(), absl::StatusCode::kCancelled) << stopped.status();
  bool resumed = false;
  quant::QuantizeControl watch;
  watch.progress = [&](const quant::QuantizeProgress& p) { resumed = resumed || p.resumed; };
  auto finished = quant::QuantizeModelDirectory(source, (tmp_ / "c").string(), options, watch);
  ASSERT_TRUE(finished.ok()) << finished.status();
  EXPECT_TRUE(resumed);
  EXPECT_EQ(bytes, testing::ReadFile((tmp_ / "c" / "model.safetensors").string()));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GpuAwq,
                         ::testing::Values(Case{"stories260K", "rtn_g32", 32},
                                           Case{"stories260K", "rtn_g64", 64},
                                           Case{"internlm2", "internlm2_rtn_g32", 32}),
                         [](const auto& info) {
                           return std::string(info.param.source) + "_g" +
                                  std::to_string(info.param.group);
                         });

// A job the GPU kernels cannot take is refused before any work, naming what is wrong.
TEST(GpuAwqErrors, GroupsAboveTheKernelsLimitAreRefused) {
  quant::QuantizeSettings settings;
  settings.group_size = 256;
  settings.calib_dataset = "tinystories";
  settings.datasets_dir = testing::RequiredEnv("NIBBLE_SHARED_DIR") + "/datasets";
  settings.calibration.samples = 2;
  settings.calibration.seqlen = 64;
  settings.eval_dataset = "none";
  settings.device = "cuda";
  const std::string source = testing::TestModel("stories260K");
  auto prepared = quant::PrepareQuantization(source, settings);
  ASSERT_TRUE(prepared.ok()) << prepared.status();
  const fs::path out = fs::temp_directory_path() / ("nibble-gpu-awq-g256-" + std::to_string(::getpid()));
  auto report = quant::QuantizeModelDirectory(source, out.string(), prepared->options);
  EXPECT_FALSE(fs::exists(out)) << "a refused job left its work directory";
  fs::remove_all(out);
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(report.status().message().find("up to 128"), std::string::npos) << report.status();
}

}  // namespace
}  // namespace nibble
