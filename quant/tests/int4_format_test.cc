// The AWQ GEMM packing and RTN quantization on hand-made inputs whose expected bits follow
// from MODELS.md §5 and AutoAWQ's formula, and the W4A16 CPU linear against the dense one.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "engine/int4_weight.h"
#include "engine/linear.h"
#include "kernels/cpu/half.h"
#include "quant/rtn.h"

namespace nibble {
namespace {

using engine::Int4Weight;

TEST(AwqPackingTest, NibbleOrderFollowsTheFormat) {
  // One input row, eight outputs whose value is their column index: nibble i holds column
  // AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7], so the word reads 0x75316420.
  Int4Weight w{1, 8, 128, {0, 1, 2, 3, 4, 5, 6, 7}, {0, 0, 0, 0, 0, 0, 0, 0}, {}};
  w.scales.assign(8, kernels::cpu::FloatToHalf(1.0f));
  // q is [out, in]: column n of the single input row is output n.
  auto packed = engine::PackAwqGemm(w);
  ASSERT_TRUE(packed.ok()) << packed.status();
  ASSERT_EQ(packed->qweight.size(), 1u);
  EXPECT_EQ(static_cast<uint32_t>(packed->qweight[0]), 0x75316420u);
}

TEST(AwqPackingTest, RoundTripWithPartialGroup) {
  std::mt19937 rng(5);
  Int4Weight w{70, 24, 32, {}, {}, {}};  // 70 inputs: groups of 32, 32 and 6
  for (int i = 0; i < 70 * 24; ++i) w.q.push_back(rng() % 16);
  for (int i = 0; i < 3 * 24; ++i) {
    w.zeros.push_back(rng() % 16);
    w.scales.push_back(kernels::cpu::FloatToHalf(0.01f * (1 + rng() % 100)));
  }
  auto packed = engine::PackAwqGemm(w);
  ASSERT_TRUE(packed.ok());
  EXPECT_EQ(packed->qweight.size(), 70u * 3);
  EXPECT_EQ(packed->qzeros.size(), 3u * 3);
  EXPECT_EQ(packed->scales.size(), 3u * 24);
  auto back = engine::UnpackAwqGemm(70, 24, 32, packed->qweight, packed->qzeros, packed->scales);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->q, w.q);
  EXPECT_EQ(back->zeros, w.zeros);
  EXPECT_EQ(back->scales, w.scales);
}

TEST(AwqPackingTest, RefusesUnpackableShapes) {
  Int4Weight w{8, 12, 8, std::vector<uint8_t>(96), std::vector<uint8_t>(12), std::vector<uint16_t>(12)};
  EXPECT_EQ(engine::PackAwqGemm(w).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(engine::UnpackAwqGemm(8, 16, 8, std::vector<int32_t>(3), std::vector<int32_t>(2),
                                     std::vector<uint16_t>(16))
                   .ok());
}

TEST(RtnTest, HandComputedGroup) {
  // Group [-1, 0, 0.5, 2]: s = 3/15 = 0.2 (fp16 0.199951171875), z = round(1/s) = 5,
  // q = round(w/s) + 5 = [0, 5, 8, 15] (0.5/s = 2.5006 rounds to 3).
  const std::vector<float> w = {-1.0f, 0.0f, 0.5f, 2.0f};
  Int4Weight q = quant::QuantizeRtn(w, 4, 1, 4);
  EXPECT_EQ(kernels::cpu::HalfToFloat(q.scales[0]), 0.199951171875f);
  EXPECT_EQ(q.zeros[0], 5);
  EXPECT_EQ(q.q, (std::vector<uint8_t>{0, 5, 8, 15}));
}

TEST(RtnTest, ConstantGroupUsesTheMinimumScale) {
  const std::vector<float> w = {0.25f, 0.25f, 0.25f};
  Int4Weight q = quant::QuantizeRtn(w, 3, 1, 128);
  EXPECT_GT(kernels::cpu::HalfToFloat(q.scales[0]), 0.0f);
  for (uint8_t v : q.q) EXPECT_LE(v, 15);
}

TEST(RtnTest, ErrorIsBoundedByHalfAStep) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  const int64_t in = 100, out = 16, group = 32;
  std::vector<float> w(in * out);
  for (float& v : w) v = normal(rng);
  Int4Weight q = quant::QuantizeRtn(w, in, out, group);
  const std::vector<float> dq = q.Dequantize();
  int64_t checked = 0;
  for (int64_t n = 0; n < out; ++n) {
    for (int64_t k = 0; k < in; ++k) {
      // AutoAWQ clamps the zero point to 0..15, so a group that does not straddle 0 (here
      // only the 4-wide partial last group can miss it) is not covered by the bound.
      const int64_t begin = k / group * group, end = std::min(begin + group, in);
      const auto [lo, hi] = std::minmax_element(w.begin() + n * in + begin, w.begin() + n * in + end);
      if (!(*lo <= 0.0f && *hi >= 0.0f)) continue;
      ++checked;
      const float s = kernels::cpu::HalfToFloat(q.scales[n * q.groups() + k / group]);
      // Inside the clamped range the error is at most half a step; the fp16 rounding of the
      // scale can push the extremes out by a little more.
      EXPECT_LE(std::abs(w[n * in + k] - dq[n * in + k]), 0.5f * s * 1.01f + 1e-6f)
          << n << "," << k;
    }
  }
  EXPECT_GT(checked, in * out * 9 / 10);
}

TEST(Int4LinearTest, ForwardEqualsDenseForwardOfDequantizedWeights) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  // Partial last groups, a single group, and odd group sizes (groups that start mid-byte).
  for (auto [in, group] : {std::pair<int64_t, int64_t>{5, 32}, {64, 32}, {70, 32}, {172, 32},
                           {172, 128}, {33, 3}, {70, 7}}) {
    const int64_t out = 24;
    std::vector<float> w(in * out), bias(out), x(3 * in);
    for (float& v : w) v = normal(rng);
    for (float& v : bias) v = normal(rng);
    for (float& v : x) v = normal(rng);
    Int4Weight q = quant::QuantizeRtn(w, in, out, group);
    auto int4 = engine::MakeInt4Linear(q, bias);
    auto dense = engine::MakeDenseLinear(in, out, q.Dequantize(), bias, engine::WeightStorage::kF32);
    EXPECT_EQ(int4->DequantizedWeight(), q.Dequantize());
    std::vector<float> y4(3 * out, std::nanf("")), yd(3 * out);
    int4->Forward(x.data(), 3, y4.data());
    dense->Forward(x.data(), 3, yd.data());
    EXPECT_EQ(y4, yd) << "in " << in;  // same arithmetic, same bits
    EXPECT_EQ(int4->StorageName(), "int4-g" + std::to_string(group));
    // Resident: half a byte a weight, one byte of zero and two of scale a group.
    const int64_t groups = (in + group - 1) / group;
    EXPECT_EQ(int4->StorageBytes(),
              static_cast<size_t>(out * ((in + 1) / 2) + out * groups * 3 + out * 4));
  }
}

}  // namespace
}  // namespace nibble
