// The CPU kernels against independent references: fp16/bf16 rounding against exact
// arithmetic on the value lattice (and against the compiler's _Float16 where it has one),
// matrix products and attention against naive double-precision loops, rotary embedding
// against complex multiplication. Inputs are random and non-zero, sizes odd, outputs
// poisoned with NaN first so that an element left unwritten fails.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/half.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/ops.h"

namespace nibble::kernels::cpu {
namespace {

constexpr double kUnitRoundoff = 0x1.0p-24;  // fp32: half an ulp of 1
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// ---------------------------------------------------------------------------------------
// Independent fp16 / bf16 references, written from the IEEE 754 definitions.

// The value of a binary16 bit pattern, from its fields: (-1)^s · 2^(e-15) · (1 + m/1024), or
// (-1)^s · 2^-14 · m/1024 for e == 0. Exact in double.
double HalfValue(uint16_t h) {
  const int sign = (h >> 15) & 1;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  double magnitude;
  if (exponent == 0x1f) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                              : std::numeric_limits<double>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), -24);
  } else {
    magnitude = std::ldexp(static_cast<double>(1024 + mantissa), exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

bool IsHalfNaN(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }

// Magnitudes of the non-negative halves indexed by bit pattern (monotonic in the pattern),
// with 0x7c00 standing for 2^16: the value the overflow rule rounds towards (IEEE 754 §4.3:
// a result is rounded as if the exponent range were unbounded, then overflows to inf).
const std::vector<double>& HalfLattice() {
  static const std::vector<double> lattice = [] {
    std::vector<double> v(0x7c01);
    for (uint32_t h = 0; h < 0x7c00; ++h) v[h] = HalfValue(static_cast<uint16_t>(h));
    v[0x7c00] = 65536.0;
    return v;
  }();
  return lattice;
}

// Nearest half to `f`, ties to the even bit pattern, found by search on the lattice with the
// comparison against the exact midpoint done in double (midpoints of adjacent halves need 12
// significant bits: exact).
uint16_t ReferenceFloatToHalf(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return sign | 0x7e00;
  const double magnitude = std::fabs(static_cast<double>(f));
  const std::vector<double>& lattice = HalfLattice();
  if (magnitude >= 65536.0) return sign | 0x7c00;
  // Largest pattern whose value is <= magnitude.
  const size_t lower =
      static_cast<size_t>(std::upper_bound(lattice.begin(), lattice.end(), magnitude) -
                          lattice.begin()) - 1;
  if (lattice[lower] == magnitude) return sign | static_cast<uint16_t>(lower);
  const double midpoint = (lattice[lower] + lattice[lower + 1]) / 2;
  size_t chosen;
  if (magnitude < midpoint) {
    chosen = lower;
  } else if (magnitude > midpoint) {
    chosen = lower + 1;
  } else {
    chosen = (lower % 2 == 0) ? lower : lower + 1;
  }
  return sign | static_cast<uint16_t>(chosen);
}

// bfloat16 is the top half of a float: value of pattern b is the float with bits b << 16,
// which we compute from the fields rather than by shifting.
double Bf16Value(uint16_t b) {
  const int sign = (b >> 15) & 1;
  const int exponent = (b >> 7) & 0xff;
  const int mantissa = b & 0x7f;
  double magnitude;
  if (exponent == 0xff) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                              : std::numeric_limits<double>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), -133);
  } else {
    magnitude = std::ldexp(static_cast<double>(128 + mantissa), exponent - 134);
  }
  return sign ? -magnitude : magnitude;
}

bool IsBf16NaN(uint16_t b) { return (b & 0x7f80) == 0x7f80 && (b & 0x7f) != 0; }

// Nearest bf16 by value, ties to even, overflow to inf past the midpoint between the largest
// finite bf16 and 2^128.
uint16_t ReferenceFloatToBf16(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return sign | 0x7fc0;
  const double magnitude = std::fabs(static_cast<double>(f));
  if (std::isinf(magnitude)) return sign | 0x7f80;
  // Bracket by value with a binary search over the 0x7f80 finite non-negative patterns.
  uint32_t lo = 0, hi = 0x7f80;  // value(lo) <= magnitude < value(hi), value(0x7f80) := 2^128
  auto value = [](uint32_t b) {
    return b == 0x7f80 ? std::ldexp(1.0, 128) : Bf16Value(static_cast<uint16_t>(b));
  };
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (value(mid) <= magnitude) lo = mid; else hi = mid;
  }
  if (value(lo) == magnitude) return sign | static_cast<uint16_t>(lo);
  const double midpoint = (value(lo) + value(hi)) / 2;  // 9 significant bits: exact
  uint32_t chosen;
  if (magnitude < midpoint) chosen = lo;
  else if (magnitude > midpoint) chosen = hi;
  else chosen = (lo % 2 == 0) ? lo : hi;
  return sign | static_cast<uint16_t>(chosen);
}

// Test floats for rounding: every boundary of the half (or bf16) lattice, exactly at the
// midpoint and one float ulp either side, each lattice point and its neighbours, the
// specials, and random floats (uniform over bit patterns, and uniform over the half range).
std::vector<float> RoundingProbes(const std::vector<double>& lattice, uint64_t seed) {
  std::vector<float> probes;
  const float inf = std::numeric_limits<float>::infinity();
  for (size_t i = 0; i + 1 < lattice.size(); ++i) {
    const float point = static_cast<float>(lattice[i]);
    const float midpoint = static_cast<float>((lattice[i] + lattice[i + 1]) / 2);
    EXPECT_EQ(static_cast<double>(midpoint), (lattice[i] + lattice[i + 1]) / 2) << i;
    for (float v : {point, std::nextafter(point, inf), std::nextafter(point, -inf), midpoint,
                    std::nextafter(midpoint, inf), std::nextafter(midpoint, -inf)}) {
      probes.push_back(v);
      probes.push_back(-v);
    }
  }
  for (float v : {0.0f, -0.0f, inf, -inf, kNaN, -kNaN, std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min(),
                  65504.0f, 65519.99f, 65520.0f, 65536.0f, 1e6f, 1e-8f, 2.98e-8f, 2.99e-8f,
                  0x1.0p-25f, 0x1.000002p-25f, 0x1.fffffep-26f, 0x1.0p-24f, 0x1.8p-24f,
                  0x1.ffcp-15f, 0x1.ffep-15f, 0x1.0p-14f}) {
    probes.push_back(v);
    probes.push_back(-v);
  }
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 1'000'000; ++i) probes.push_back(FromBits(static_cast<uint32_t>(rng())));
  std::uniform_real_distribution<float> in_range(-70000.0f, 70000.0f);
  for (int i = 0; i < 500'000; ++i) probes.push_back(in_range(rng));
  std::uniform_real_distribution<float> exponent(-30.0f, 17.0f);
  for (int i = 0; i < 1'000'000; ++i) {
    const float v = std::exp2(exponent(rng));
    probes.push_back((i & 1) ? v : -v);
  }
  return probes;
}

std::string Hex(uint32_t v) {
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "0x%x", v);
  return buffer;
}

// ---------------------------------------------------------------------------------------
// fp16

TEST(HalfTest, HalfToFloatDecodesEveryPatternExactly) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    const double expected = HalfValue(static_cast<uint16_t>(h));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(f)) << Hex(h);
    } else {
      ASSERT_EQ(static_cast<double>(f), expected) << Hex(h);
    }
    EXPECT_EQ(std::signbit(f), (h & 0x8000) != 0) << Hex(h);  // -0 stays -0
  }
}

TEST(HalfTest, EveryHalfPatternRoundTripsThroughFloat) {
  int nan_patterns = 0;
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const uint16_t back = FloatToHalf(HalfToFloat(static_cast<uint16_t>(h)));
    if (IsHalfNaN(static_cast<uint16_t>(h))) {
      ++nan_patterns;
      EXPECT_TRUE(IsHalfNaN(back)) << Hex(h) << " -> " << Hex(back);
      EXPECT_EQ(back & 0x8000, h & 0x8000) << Hex(h);
    } else {
      ASSERT_EQ(back, h) << Hex(h);
    }
  }
  EXPECT_EQ(nan_patterns, 2 * 1023);
}

TEST(HalfTest, FloatToHalfRoundsToNearestEvenLikeExactArithmetic) {
  const std::vector<float> probes = RoundingProbes(HalfLattice(), 1);
  int failures = 0;
  for (float f : probes) {
    const uint16_t expected = ReferenceFloatToHalf(f);
    const uint16_t got = FloatToHalf(f);
    const bool ok = std::isnan(f) ? IsHalfNaN(got) && (got & 0x8000) == (expected & 0x8000)
                                  : got == expected;
    if (!ok && ++failures <= 10) {
      ADD_FAILURE() << "FloatToHalf(" << std::hexfloat << f << " = " << Hex(Bits(f))
                    << ") = " << Hex(got) << ", nearest-even is " << Hex(expected);
    }
  }
  EXPECT_EQ(failures, 0) << "of " << probes.size();
}

TEST(HalfTest, FloatToHalfKnownCases) {
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65519.996f), 0x7bff);     // just below the overflow midpoint
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);       // the midpoint ties to even: inf
  EXPECT_EQ(FloatToHalf(-65520.0f), 0xfc00);
  EXPECT_EQ(FloatToHalf(1.0f + 0x1.0p-11f), 0x3c00);  // tie between 1 and 1+2^-10: even
  EXPECT_EQ(FloatToHalf(1.0f + 3 * 0x1.0p-11f), 0x3c02);  // tie, odd below: round up
  EXPECT_EQ(FloatToHalf(0x1.0p-24f), 0x0001);     // smallest subnormal
  EXPECT_EQ(FloatToHalf(0x1.0p-25f), 0x0000);     // tie with zero: even (zero)
  EXPECT_EQ(FloatToHalf(0x1.000002p-25f), 0x0001);  // just above the tie
  EXPECT_EQ(FloatToHalf(0x1.8p-24f), 0x0002);     // 1.5 units: tie, round to even 2
  EXPECT_EQ(FloatToHalf(0x1.ff8p-15f), 0x03ff);   // largest subnormal, 1023·2^-24
  EXPECT_EQ(FloatToHalf(0x1.ffcp-15f), 0x0400);   // tie with 2^-14, 1023 odd: up to normal
  EXPECT_EQ(FloatToHalf(0x1.ff4p-15f), 0x03fe);   // tie between 1022 and 1023: even
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_TRUE(IsHalfNaN(FloatToHalf(kNaN)));
  EXPECT_TRUE(IsHalfNaN(FloatToHalf(FromBits(0x7f800001u))));  // signalling NaN stays NaN
}

#ifdef __FLT16_MAX__
// A second, unrelated reference: the compiler's own conversion (libgcc's __truncsfhf2 or
// the F16C/FP16 instruction), on the same probes.
TEST(HalfTest, FloatToHalfMatchesCompilerFloat16) {
  const std::vector<float> probes = RoundingProbes(HalfLattice(), 2);
  int failures = 0;
  for (float f : probes) {
    const volatile float input = f;
    const _Float16 h = static_cast<_Float16>(input);
    uint16_t expected;
    std::memcpy(&expected, &h, sizeof expected);
    const uint16_t got = FloatToHalf(f);
    const bool ok = std::isnan(f) ? IsHalfNaN(got) : got == expected;
    if (!ok && ++failures <= 10) {
      ADD_FAILURE() << "FloatToHalf(" << std::hexfloat << f << ") = " << Hex(got)
                    << ", _Float16 gives " << Hex(expected);
    }
  }
  EXPECT_EQ(failures, 0) << "of " << probes.size();
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    _Float16 value;
    std::memcpy(&value, &bits, sizeof value);
    const float expected = static_cast<float>(value);
    const float got = HalfToFloat(bits);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got));
    } else {
      ASSERT_EQ(Bits(got), Bits(expected)) << Hex(h);
    }
  }
}
#endif

TEST(HalfTest, ArrayConversionsMatchScalar) {
  std::mt19937 rng(3);
  std::vector<float> floats(1001);
  std::uniform_real_distribution<float> dist(-1000.0f, 1000.0f);
  for (float& f : floats) f = dist(rng);
  std::vector<uint16_t> halves(floats.size(), 0xffff);
  FloatToHalf(floats.data(), floats.size(), halves.data());
  for (size_t i = 0; i < floats.size(); ++i) ASSERT_EQ(halves[i], FloatToHalf(floats[i])) << i;
  std::vector<float> back(halves.size(), kNaN);
  HalfToFloat(halves.data(), halves.size(), back.data());
  for (size_t i = 0; i < halves.size(); ++i) ASSERT_EQ(back[i], HalfToFloat(halves[i])) << i;
  std::vector<uint16_t> bf16(floats.size());
  for (size_t i = 0; i < floats.size(); ++i) bf16[i] = FloatToBf16(floats[i]);
  std::vector<float> bf_back(bf16.size(), kNaN);
  Bf16ToFloat(bf16.data(), bf16.size(), bf_back.data());
  for (size_t i = 0; i < bf16.size(); ++i) ASSERT_EQ(bf_back[i], Bf16ToFloat(bf16[i])) << i;
}

// ---------------------------------------------------------------------------------------
// bf16

TEST(Bf16Test, EveryBf16PatternDecodesAndRoundTrips) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const float f = Bf16ToFloat(bits);
    const double expected = Bf16Value(bits);
    if (IsBf16NaN(bits)) {
      EXPECT_TRUE(std::isnan(f)) << Hex(b);
      const uint16_t back = FloatToBf16(f);
      EXPECT_TRUE(IsBf16NaN(back)) << Hex(b) << " -> " << Hex(back);
      EXPECT_EQ(back & 0x8000, b & 0x8000);
    } else {
      ASSERT_EQ(static_cast<double>(f), expected) << Hex(b);
      EXPECT_EQ(std::signbit(f), (b & 0x8000) != 0) << Hex(b);
      ASSERT_EQ(FloatToBf16(f), bits) << Hex(b);
    }
  }
}

TEST(Bf16Test, FloatToBf16RoundsToNearestEvenLikeExactArithmetic) {
  // Every bf16 interval, probed at both ends, at the midpoint and next to it, and inside.
  std::vector<float> probes;
  std::mt19937 rng(4);
  for (uint32_t high = 0; high <= 0xffff; ++high) {
    for (uint32_t low : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu,
                         static_cast<uint32_t>(rng() & 0xffff)}) {
      probes.push_back(FromBits((high << 16) | low));
    }
  }
  int failures = 0;
  for (float f : probes) {
    const uint16_t expected = ReferenceFloatToBf16(f);
    const uint16_t got = FloatToBf16(f);
    const bool ok = std::isnan(f) ? IsBf16NaN(got) && (got & 0x8000) == (expected & 0x8000)
                                  : got == expected;
    if (!ok && ++failures <= 10) {
      ADD_FAILURE() << "FloatToBf16(" << Hex(Bits(f)) << ") = " << Hex(got)
                    << ", nearest-even is " << Hex(expected);
    }
  }
  EXPECT_EQ(failures, 0) << "of " << probes.size();
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808000u)), 0x3f80);  // tie, even below
  EXPECT_EQ(FloatToBf16(FromBits(0x3f818000u)), 0x3f82);  // tie, odd below: up
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds to inf
  EXPECT_EQ(FloatToBf16(FromBits(0x7f7f7fffu)), 0x7f7f);
  EXPECT_TRUE(IsBf16NaN(FloatToBf16(FromBits(0x7f800001u))));  // low-bit NaN stays NaN
  EXPECT_TRUE(IsBf16NaN(FloatToBf16(FromBits(0xffffffffu))));
}

// ---------------------------------------------------------------------------------------
// Matrix products

// Uniform in [-1, -0.1] ∪ [0.1, 1]: random and never zero.
std::vector<float> RandomNonZero(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> magnitude(0.1f, 1.0f);
  std::bernoulli_distribution negative(0.5);
  std::vector<float> v(n);
  for (float& x : v) x = negative(rng) ? -magnitude(rng) : magnitude(rng);
  return v;
}

// Restores the thread count the process started with.
class ThreadCountGuard {
 public:
  ThreadCountGuard() : saved_(CpuThreads()) {}
  ~ThreadCountGuard() { SetCpuThreads(saved_); }

 private:
  int saved_;
};

struct MatMulCase {
  int64_t m, n, k;
  bool bias;
};

std::vector<MatMulCase> MatMulCases() {
  std::vector<MatMulCase> cases;
  for (int64_t m : {1, 3, 17}) {
    for (int64_t n : {1, 7, 172, 513}) {
      for (int64_t k : {1, 5, 64, 172, 1000}) {
        for (bool bias : {false, true}) cases.push_back({m, n, k, bias});
      }
    }
  }
  return cases;
}

// y = x·Wᵀ + b in double, with the error bound of the fp32 kernel alongside: eight partial
// sums of ceil(k/8) products each, three pairwise levels, then the bias, so at most
// ceil(k/8) + 5 roundings each of relative size u on the magnitudes Σ|x||w| + |b|
// (Higham, Accuracy and Stability, §3.1).
void CheckAgainstReference(const MatMulCase& c, const std::vector<float>& x,
                           const std::vector<double>& w_exact, const std::vector<float>& bias,
                           const std::vector<float>& y, const std::string& label) {
  const double roundings = static_cast<double>((c.k + 7) / 8 + 5);
  int reported = 0;
  for (int64_t row = 0; row < c.m; ++row) {
    for (int64_t col = 0; col < c.n; ++col) {
      double sum = 0, magnitude = 0;
      for (int64_t i = 0; i < c.k; ++i) {
        sum += static_cast<double>(x[row * c.k + i]) * w_exact[col * c.k + i];
        magnitude += std::fabs(static_cast<double>(x[row * c.k + i]) * w_exact[col * c.k + i]);
      }
      if (c.bias) {
        sum += bias[col];
        magnitude += std::fabs(bias[col]);
      }
      const double tolerance = roundings * kUnitRoundoff * magnitude;
      const float got = y[row * c.n + col];
      if (!(std::fabs(got - sum) <= tolerance) && ++reported <= 5) {
        ADD_FAILURE() << label << " m=" << c.m << " n=" << c.n << " k=" << c.k
                      << " bias=" << c.bias << " y[" << row << "," << col << "] = " << got
                      << ", reference " << sum << ", tolerance " << tolerance;
      }
    }
  }
}

TEST(MatMulTest, F32MatchesDoubleReferenceOnOddShapes) {
  std::mt19937 rng(10);
  for (const MatMulCase& c : MatMulCases()) {
    const std::vector<float> x = RandomNonZero(c.m * c.k, rng);
    const std::vector<float> w = RandomNonZero(c.n * c.k, rng);
    const std::vector<float> bias = RandomNonZero(c.n, rng);
    std::vector<float> y(c.m * c.n, kNaN);
    MatMulWeightsF32(x.data(), w.data(), c.bias ? bias.data() : nullptr, c.m, c.n, c.k,
                     y.data());
    const std::vector<double> w_exact(w.begin(), w.end());
    CheckAgainstReference(c, x, w_exact, bias, y, "F32");
  }
}

TEST(MatMulTest, F16MatchesDoubleReferenceOnOddShapes) {
  std::mt19937 rng(11);
  for (const MatMulCase& c : MatMulCases()) {
    const std::vector<float> x = RandomNonZero(c.m * c.k, rng);
    const std::vector<float> w_float = RandomNonZero(c.n * c.k, rng);
    std::vector<uint16_t> w(w_float.size());
    std::vector<double> w_exact(w_float.size());
    for (size_t i = 0; i < w.size(); ++i) {
      w[i] = ReferenceFloatToHalf(w_float[i]);
      w_exact[i] = HalfValue(w[i]);  // the weight the kernel must use, decoded independently
    }
    const std::vector<float> bias = RandomNonZero(c.n, rng);
    std::vector<float> y(c.m * c.n, kNaN);
    MatMulWeightsF16(x.data(), w.data(), c.bias ? bias.data() : nullptr, c.m, c.n, c.k,
                     y.data());
    CheckAgainstReference(c, x, w_exact, bias, y, "F16");
  }
}

TEST(MatMulTest, SmallIntegersGiveExactResults) {
  // Products and sums of small integers are exact in fp32: any indexing slip shows exactly.
  std::mt19937 rng(12);
  std::uniform_int_distribution<int> small(-8, 8);
  const int64_t m = 3, n = 13, k = 37;
  std::vector<float> x(m * k), w(n * k), bias(n);
  for (float& v : x) v = static_cast<float>(small(rng) | 1);  // odd: never zero
  for (float& v : w) v = static_cast<float>(small(rng) | 1);
  for (float& v : bias) v = static_cast<float>(small(rng));
  std::vector<uint16_t> w16(w.size());
  for (size_t i = 0; i < w.size(); ++i) w16[i] = ReferenceFloatToHalf(w[i]);
  std::vector<float> y32(m * n, kNaN), y16(m * n, kNaN);
  MatMulWeightsF32(x.data(), w.data(), bias.data(), m, n, k, y32.data());
  MatMulWeightsF16(x.data(), w16.data(), bias.data(), m, n, k, y16.data());
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      int64_t expected = static_cast<int64_t>(bias[c]);
      for (int64_t i = 0; i < k; ++i) {
        expected += static_cast<int64_t>(x[r * k + i]) * static_cast<int64_t>(w[c * k + i]);
      }
      EXPECT_EQ(y32[r * n + c], static_cast<float>(expected)) << r << "," << c;
      EXPECT_EQ(y16[r * n + c], static_cast<float>(expected)) << r << "," << c;
    }
  }
}

TEST(MatMulTest, ResultsDoNotDependOnThreadCount) {
  ThreadCountGuard guard;
  std::mt19937 rng(13);
  // Large enough for the parallel path (m·n·k >= 2^15), with n not a multiple of 4.
  for (const MatMulCase& c : {MatMulCase{17, 513, 1000, true}, MatMulCase{1, 513, 172, false},
                              MatMulCase{3, 172, 1000, true}}) {
    const std::vector<float> x = RandomNonZero(c.m * c.k, rng);
    const std::vector<float> w = RandomNonZero(c.n * c.k, rng);
    std::vector<uint16_t> w16(w.size());
    for (size_t i = 0; i < w.size(); ++i) w16[i] = ReferenceFloatToHalf(w[i]);
    const std::vector<float> bias = RandomNonZero(c.n, rng);
    const float* b = c.bias ? bias.data() : nullptr;
    std::vector<float> y1(c.m * c.n, kNaN), y4(c.m * c.n, kNaN);
    std::vector<float> h1(c.m * c.n, kNaN), h4(c.m * c.n, kNaN);
    SetCpuThreads(1);
    ASSERT_EQ(CpuThreads(), 1);
    MatMulWeightsF32(x.data(), w.data(), b, c.m, c.n, c.k, y1.data());
    MatMulWeightsF16(x.data(), w16.data(), b, c.m, c.n, c.k, h1.data());
    SetCpuThreads(4);
    ASSERT_EQ(CpuThreads(), 4);
    MatMulWeightsF32(x.data(), w.data(), b, c.m, c.n, c.k, y4.data());
    MatMulWeightsF16(x.data(), w16.data(), b, c.m, c.n, c.k, h4.data());
    for (size_t i = 0; i < y1.size(); ++i) {
      ASSERT_FALSE(std::isnan(y1[i])) << i;
      ASSERT_EQ(Bits(y1[i]), Bits(y4[i])) << "F32 element " << i;
      ASSERT_FALSE(std::isnan(h1[i])) << i;
      ASSERT_EQ(Bits(h1[i]), Bits(h4[i])) << "F16 element " << i;
    }
  }
}

TEST(MatMulTest, DotMatchesDoubleReference) {
  std::mt19937 rng(14);
  for (int64_t k : {0, 1, 7, 8, 9, 15, 16, 17, 1000, 4097}) {
    const std::vector<float> a = RandomNonZero(k, rng);
    const std::vector<float> b = RandomNonZero(k, rng);
    double sum = 0, magnitude = 0;
    for (int64_t i = 0; i < k; ++i) {
      sum += static_cast<double>(a[i]) * b[i];
      magnitude += std::fabs(static_cast<double>(a[i]) * b[i]);
    }
    const float got = Dot(a.data(), b.data(), k);
    EXPECT_LE(std::fabs(got - sum), ((k + 7) / 8 + 4) * kUnitRoundoff * magnitude) << k;
  }
}

// ---------------------------------------------------------------------------------------
// Element-wise and per-row operations

TEST(OpsTest, RmsNormMatchesDoubleReferenceAndMayAlias) {
  std::mt19937 rng(20);
  for (int64_t dim : {1, 7, 64, 513}) {
    const int64_t rows = 5;
    for (float eps : {1e-5f, 1e-6f}) {
      std::vector<float> x = RandomNonZero(rows * dim, rng);
      for (int64_t i = 0; i < dim; ++i) x[2 * dim + i] *= 1000.0f;  // rows of unequal scale
      for (int64_t i = 0; i < dim; ++i) x[3 * dim + i] *= 1e-3f;
      const std::vector<float> weight = RandomNonZero(dim, rng);
      std::vector<float> out(rows * dim, kNaN);
      RmsNorm(x.data(), weight.data(), rows, dim, eps, out.data());
      for (int64_t r = 0; r < rows; ++r) {
        double mean_square = 0;
        for (int64_t i = 0; i < dim; ++i) {
          mean_square += static_cast<double>(x[r * dim + i]) * x[r * dim + i];
        }
        mean_square /= static_cast<double>(dim);
        const double inv_rms = 1.0 / std::sqrt(mean_square + static_cast<double>(eps));
        for (int64_t i = 0; i < dim; ++i) {
          const double expected = x[r * dim + i] * inv_rms * weight[i];
          // Three fp32 roundings (scale, ·x, ·weight) plus the float eps: 4u relative.
          EXPECT_NEAR(out[r * dim + i], expected, 4 * kUnitRoundoff * std::fabs(expected))
              << "dim " << dim << " row " << r << " i " << i;
        }
      }
      std::vector<float> aliased = x;
      RmsNorm(aliased.data(), weight.data(), rows, dim, eps, aliased.data());
      for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(Bits(aliased[i]), Bits(out[i])) << i;
    }
  }
  // Zero input: eps keeps it finite.
  std::vector<float> zeros(9, 0.0f), weight(9, 1.0f), out(9, kNaN);
  RmsNorm(zeros.data(), weight.data(), 1, 9, 1e-5f, out.data());
  for (float v : out) EXPECT_EQ(v, 0.0f);
}

TEST(OpsTest, SiluMulMatchesDoubleReference) {
  std::mt19937 rng(21);
  std::vector<float> gate = RandomNonZero(1001, rng);
  for (size_t i = 0; i < gate.size(); i += 7) gate[i] *= 30.0f;  // reach the saturated tails
  gate.push_back(-100.0f);
  gate.push_back(100.0f);
  gate.push_back(-88.0f);
  gate.push_back(0.0f);
  std::vector<float> up = RandomNonZero(gate.size(), rng);
  std::vector<float> result = gate;
  SiluMulInPlace(result.data(), up.data(), static_cast<int64_t>(result.size()));
  for (size_t i = 0; i < gate.size(); ++i) {
    const double g = gate[i];
    const double expected = g / (1.0 + std::exp(-g)) * up[i];
    // exp, add, divide, multiply in fp32: a few u; the absolute floor covers results that
    // underflow fp32 (silu(-100) ≈ -3.7e-42).
    EXPECT_NEAR(result[i], expected, 8 * kUnitRoundoff * std::fabs(expected) + 1e-37)
        << "gate " << g << " up " << up[i];
    EXPECT_TRUE(std::isfinite(result[i])) << g;
  }
}

TEST(OpsTest, AddInPlaceAddsElementwise) {
  std::mt19937 rng(22);
  std::vector<float> x = RandomNonZero(37, rng), y = RandomNonZero(37, rng);
  std::vector<float> sum = x;
  AddInPlace(sum.data(), y.data(), 37);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(sum[i], x[i] + y[i]);
}

TEST(OpsTest, SoftmaxMatchesReferenceSumsToOneAndSurvivesLargeLogits) {
  std::mt19937 rng(23);
  std::vector<std::vector<float>> rows;
  rows.push_back({0.0f});
  rows.push_back({3.0f, 3.0f, 3.0f, 3.0f});
  rows.push_back({1e4f, 1e4f - 1.0f, 1e4f - 2.0f, -1e4f});      // exp(1e4) overflows float
  rows.push_back({-1e4f, -1e4f + 0.5f, -1e4f - 3.0f});            // exp(-1e4) underflows
  rows.push_back({88.0f, 89.0f, 90.0f, 1000.0f, 999.0f});
  rows.push_back({1.0f, -std::numeric_limits<float>::infinity(), 2.0f});  // masked entry
  std::uniform_real_distribution<float> logit(-20.0f, 20.0f);
  for (int64_t n : {2, 17, 513, 32000}) {
    std::vector<float> row(n);
    for (float& v : row) v = logit(rng);
    rows.push_back(row);
  }
  for (const std::vector<float>& logits : rows) {
    std::vector<float> p = logits;
    Softmax(p.data(), static_cast<int64_t>(p.size()));
    const double max_logit = *std::max_element(logits.begin(), logits.end());
    double denominator = 0;
    for (float v : logits) denominator += std::exp(static_cast<double>(v) - max_logit);
    // fp32 computes x - max with an absolute error up to u·|x - max|, which exp turns into
    // that much relative error; the sum inherits the p-weighted mean of it.
    double mean_gap = 0;
    for (float v : logits) {
      if (std::isinf(v)) continue;
      const double gap = max_logit - v;
      mean_gap += std::exp(-gap) / denominator * gap;
    }
    double total = 0;
    for (size_t i = 0; i < p.size(); ++i) {
      const double gap = max_logit - logits[i];
      const double expected = std::exp(-gap) / denominator;
      ASSERT_TRUE(std::isfinite(p[i])) << "n " << p.size() << " i " << i;
      // Plus fp32 exp (a few ulp) and the product with the rounded 1/sum: 8u relative; the
      // absolute floor covers probabilities below fp32's normal range.
      const double relative = kUnitRoundoff * ((std::isinf(gap) ? 0 : gap) + mean_gap + 8);
      EXPECT_NEAR(p[i], expected, relative * expected + 1e-38)
          << "n " << p.size() << " logit " << logits[i];
      total += p[i];
    }
    EXPECT_NEAR(total, 1.0, 1e-5) << "n " << p.size();
  }
}

// Interleaved (Meta / GPT-J) rotation, written with complex numbers: the pair
// (x[2i], x[2i+1]) is the complex number x[2i] + i·x[2i+1], multiplied by e^{i·pos·θ_i}.
std::vector<double> InterleavedRopeReference(const std::vector<float>& x, int64_t heads,
                                             int64_t d, int64_t position,
                                             const std::vector<float>& inv_freq) {
  std::vector<double> out(x.size());
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < d / 2; ++i) {
      const std::complex<double> z(x[h * d + 2 * i], x[h * d + 2 * i + 1]);
      const std::complex<double> r =
          z * std::polar(1.0, static_cast<double>(position) * inv_freq[i]);
      out[h * d + 2 * i] = r.real();
      out[h * d + 2 * i + 1] = r.imag();
    }
  }
  return out;
}

std::vector<float> InverseFrequenciesReference(double base, int64_t d) {
  std::vector<float> inv(d / 2);
  for (int64_t i = 0; i < d / 2; ++i) {
    inv[i] = static_cast<float>(std::exp(-std::log(base) * (2.0 * i) / static_cast<double>(d)));
  }
  return inv;
}

TEST(OpsTest, RopeRotateHalfMatchesComplexRotation) {
  std::mt19937 rng(24);
  for (int64_t d : {2, 8, 64, 128}) {
    const int64_t heads = 3;
    const std::vector<float> inv_freq = InverseFrequenciesReference(10000.0, d);
    for (int64_t position : {0, 1, 7, 1000, 32767, 100000, 1000003}) {
      const std::vector<float> x = RandomNonZero(heads * d, rng);
      std::vector<float> rotated = x;
      RopeRotateHalf(rotated.data(), heads, d, position, inv_freq.data());
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t i = 0; i < d / 2; ++i) {
          // rotate_half pairs element i with i + d/2.
          const std::complex<double> z(x[h * d + i], x[h * d + i + d / 2]);
          const std::complex<double> r =
              z * std::polar(1.0, static_cast<double>(position) * inv_freq[i]);
          // cos/sin rounded to fp32, two products and a sum: 4u of |z|.
          const double tolerance = 4 * kUnitRoundoff * std::abs(z);
          EXPECT_NEAR(rotated[h * d + i], r.real(), tolerance)
              << "d " << d << " pos " << position << " head " << h << " i " << i;
          EXPECT_NEAR(rotated[h * d + i + d / 2], r.imag(), tolerance)
              << "d " << d << " pos " << position << " head " << h << " i " << i;
        }
      }
    }
  }
}

TEST(OpsTest, RotateHalfOnHfPermutedRowsEqualsInterleavedOnMetaRows) {
  // HF's conversion script permutes the rows of wq/wk so that rotate_half on the HF layout
  // computes what Meta's interleaved rotation computes on the original rows:
  // HF[h·d + c·d/2 + i] = Meta[h·d + 2i + c]. Checked end to end through the projection.
  std::mt19937 rng(25);
  const int64_t heads = 4, d = 16, dim = 37;
  const std::vector<float> inv_freq = InverseFrequenciesReference(10000.0, d);
  const std::vector<float> w_meta = RandomNonZero(heads * d * dim, rng);
  std::vector<float> w_hf(w_meta.size());
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t c = 0; c < 2; ++c) {
      for (int64_t i = 0; i < d / 2; ++i) {
        const int64_t hf_row = h * d + c * d / 2 + i, meta_row = h * d + 2 * i + c;
        std::copy_n(&w_meta[meta_row * dim], dim, &w_hf[hf_row * dim]);
      }
    }
  }
  const std::vector<float> x = RandomNonZero(dim, rng);
  std::vector<float> q_meta(heads * d, kNaN), q_hf(heads * d, kNaN);
  MatMulWeightsF32(x.data(), w_meta.data(), nullptr, 1, heads * d, dim, q_meta.data());
  MatMulWeightsF32(x.data(), w_hf.data(), nullptr, 1, heads * d, dim, q_hf.data());
  for (int64_t position : {0, 3, 511, 4096}) {
    const std::vector<double> meta_rotated =
        InterleavedRopeReference(q_meta, heads, d, position, inv_freq);
    std::vector<float> hf_rotated = q_hf;
    RopeRotateHalf(hf_rotated.data(), heads, d, position, inv_freq.data());
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t c = 0; c < 2; ++c) {
        for (int64_t i = 0; i < d / 2; ++i) {
          const double expected = meta_rotated[h * d + 2 * i + c];
          const double scale = std::hypot(q_meta[h * d + 2 * i], q_meta[h * d + 2 * i + 1]);
          EXPECT_NEAR(hf_rotated[h * d + c * d / 2 + i], expected, 4 * kUnitRoundoff * scale)
              << "pos " << position << " head " << h << " c " << c << " i " << i;
        }
      }
    }
  }
}

TEST(OpsTest, RopeInverseFrequenciesMatchPow) {
  for (double base : {10000.0, 500000.0, 1000000.0}) {
    for (int64_t d : {2, 64, 80, 128}) {
      std::vector<float> inv(d / 2 + 1, kNaN);
      RopeInverseFrequencies(base, d, inv.data());
      for (int64_t i = 0; i < d / 2; ++i) {
        const long double expected =
            std::pow(static_cast<long double>(base), -2.0L * i / static_cast<long double>(d));
        // Correctly rounded would be within half an ulp; allow one ulp (double pow, then
        // the rounding to float).
        EXPECT_NEAR(inv[i], static_cast<double>(expected),
                    2 * kUnitRoundoff * static_cast<double>(expected))
            << "base " << base << " d " << d << " i " << i;
      }
      EXPECT_EQ(inv[0], 1.0f);
      EXPECT_TRUE(std::isnan(inv[d / 2])) << "wrote past head_dim/2";
    }
  }
}

// ---------------------------------------------------------------------------------------
// Attention

// Naive causal GQA attention in double. Returns, besides the output, Σ_p softmax_p·|v_p| per
// output element: the scale the fp32 result's error is measured against.
void ReferenceAttention(const std::vector<float>& q, int64_t tokens, int64_t start,
                        const std::vector<float>& keys, const std::vector<float>& values,
                        const AttentionShape& s, std::vector<double>* out,
                        std::vector<double>* scale) {
  out->assign(tokens * s.heads * s.head_dim, 0.0);
  scale->assign(out->size(), 0.0);
  const int64_t group = s.heads / s.kv_heads;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < s.heads; ++h) {
      const int64_t kv = h / group;
      const int64_t visible = start + t + 1;
      std::vector<double> score(visible);
      for (int64_t p = 0; p < visible; ++p) {
        double dot = 0;
        for (int64_t i = 0; i < s.head_dim; ++i) {
          dot += static_cast<double>(q[(t * s.heads + h) * s.head_dim + i]) *
                 keys[(p * s.kv_heads + kv) * s.head_dim + i];
        }
        score[p] = dot / std::sqrt(static_cast<double>(s.head_dim));
      }
      const double max_score = *std::max_element(score.begin(), score.end());
      double total = 0;
      for (double& v : score) total += (v = std::exp(v - max_score));
      for (int64_t p = 0; p < visible; ++p) {
        const double weight = score[p] / total;
        for (int64_t i = 0; i < s.head_dim; ++i) {
          const double v = values[(p * s.kv_heads + kv) * s.head_dim + i];
          (*out)[(t * s.heads + h) * s.head_dim + i] += weight * v;
          (*scale)[(t * s.heads + h) * s.head_dim + i] += weight * std::fabs(v);
        }
      }
    }
  }
}

struct AttentionCase {
  AttentionShape shape;
  int64_t start;
  int64_t tokens;
};

TEST(AttentionTest, CausalAttentionMatchesDoubleReference) {
  std::mt19937 rng(30);
  std::vector<AttentionCase> cases;
  for (AttentionShape shape : {AttentionShape{8, 4, 8}, AttentionShape{4, 4, 64},
                               AttentionShape{6, 2, 128}, AttentionShape{3, 1, 5}}) {
    for (int64_t start : {0, 1, 6, 37}) {
      for (int64_t tokens : {1, 5}) cases.push_back({shape, start, tokens});
    }
  }
  for (const AttentionCase& c : cases) {
    const AttentionShape& s = c.shape;
    const int64_t positions = c.start + c.tokens;
    std::vector<float> q = RandomNonZero(c.tokens * s.heads * s.head_dim, rng);
    for (float& v : q) v *= 3.0f;  // sharper softmax: mistakes in the mask or scale show
    const std::vector<float> keys = RandomNonZero(positions * s.kv_heads * s.head_dim, rng);
    const std::vector<float> values = RandomNonZero(positions * s.kv_heads * s.head_dim, rng);
    std::vector<float> out(q.size(), kNaN);
    CausalAttention(q.data(), c.tokens, c.start, keys.data(), values.data(), s, out.data());
    std::vector<double> expected, scale;
    ReferenceAttention(q, c.tokens, c.start, keys, values, s, &expected, &scale);
    int reported = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      // The scores carry ≈ (d/8 + 4)u of Σ|q||k|/√d of error, which becomes a relative error
      // of the softmax weights; with |q| ≤ 3, |k| ≤ 1 that is below 2e-5 for d ≤ 128, plus
      // the weighted sum's roundings: 3e-5 of Σ p|v|.
      const double tolerance = 3e-5 * scale[i];
      if (!(std::fabs(out[i] - expected[i]) <= tolerance) && ++reported <= 5) {
        ADD_FAILURE() << "heads " << s.heads << " kv " << s.kv_heads << " d " << s.head_dim
                      << " start " << c.start << " tokens " << c.tokens << " out[" << i
                      << "] = " << out[i] << ", reference " << expected[i];
      }
    }
  }
}

TEST(AttentionTest, ChunkedPrefillEqualsOneShotAndThreadCountDoesNotMatter) {
  ThreadCountGuard guard;
  std::mt19937 rng(31);
  const AttentionShape s{6, 2, 128};
  const int64_t positions = 40;
  const std::vector<float> q = RandomNonZero(positions * s.heads * s.head_dim, rng);
  const std::vector<float> keys = RandomNonZero(positions * s.kv_heads * s.head_dim, rng);
  const std::vector<float> values = RandomNonZero(positions * s.kv_heads * s.head_dim, rng);
  const int64_t token_size = s.heads * s.head_dim;
  std::vector<float> one_shot(q.size(), kNaN);
  SetCpuThreads(4);
  CausalAttention(q.data(), positions, 0, keys.data(), values.data(), s, one_shot.data());
  // Chunks of 1, 5, 7, then single tokens: each chunk sees the cache up to its own end only
  // (a shorter key/value buffer), which is how a decode step calls it.
  std::vector<float> chunked(q.size(), kNaN);
  SetCpuThreads(1);
  int64_t start = 0;
  for (int64_t chunk : {1, 5, 7, 1, 1, 25}) {
    const std::vector<float> k_prefix(keys.begin(), keys.begin() + (start + chunk) *
                                                                  s.kv_heads * s.head_dim);
    const std::vector<float> v_prefix(values.begin(), values.begin() + (start + chunk) *
                                                                    s.kv_heads * s.head_dim);
    CausalAttention(q.data() + start * token_size, chunk, start, k_prefix.data(),
                    v_prefix.data(), s, chunked.data() + start * token_size);
    start += chunk;
  }
  ASSERT_EQ(start, positions);
  // Each (token, head) is computed the same way whichever chunk or thread holds it.
  for (size_t i = 0; i < q.size(); ++i) {
    ASSERT_FALSE(std::isnan(one_shot[i])) << i;
    ASSERT_EQ(Bits(chunked[i]), Bits(one_shot[i])) << i;
  }
}

TEST(AttentionTest, SingleVisiblePositionReturnsItsValue) {
  // Token 0 of a prefill sees only position 0: the output is exactly v_0 of its kv head.
  const AttentionShape s{8, 4, 8};
  std::mt19937 rng(32);
  const std::vector<float> q = RandomNonZero(s.heads * s.head_dim, rng);
  const std::vector<float> keys = RandomNonZero(s.kv_heads * s.head_dim, rng);
  const std::vector<float> values = RandomNonZero(s.kv_heads * s.head_dim, rng);
  std::vector<float> out(q.size(), kNaN);
  CausalAttention(q.data(), 1, 0, keys.data(), values.data(), s, out.data());
  for (int64_t h = 0; h < s.heads; ++h) {
    for (int64_t i = 0; i < s.head_dim; ++i) {
      EXPECT_EQ(out[h * s.head_dim + i], values[(h / 2) * s.head_dim + i]) << h << " " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Paged attention against the contiguous CausalAttention (checked against the double
// reference above): the same cache laid out in shuffled blocks of odd sizes, several
// sequences in one call, must give the same bits, row by row.

// One sequence: its contiguous cache and queries, and the same cache scattered into a pool.
struct Sequence {
  int64_t start, tokens;
  std::vector<float> q, keys, values;  // keys/values contiguous [start + tokens, kv_dim]
  std::vector<int32_t> table;
};

void ExpectBitsEqual(const std::vector<float>& a, const std::vector<float>& b,
                     const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_FALSE(std::isnan(a[i])) << what << " " << i;
    ASSERT_EQ(0, std::memcmp(&a[i], &b[i], sizeof(float)))
        << what << " element " << i << ": " << a[i] << " vs " << b[i];
  }
}

TEST(PagedAttentionTest, ShuffledBlocksAndBatchesEqualContiguousBitForBit) {
  std::mt19937 rng(41);
  for (AttentionShape shape : {AttentionShape{8, 4, 8}, AttentionShape{3, 1, 5},
                               AttentionShape{6, 2, 18}, AttentionShape{4, 4, 64}}) {
    for (int64_t block_seq_len : {1, 3, 7, 16}) {
      const int64_t kv_dim = shape.kv_heads * shape.head_dim;
      // Sequences of odd lengths: prefill from empty, chunks after a cached prefix, decode.
      std::vector<Sequence> sequences;
      for (auto [start, tokens] : {std::pair<int64_t, int64_t>{0, 13}, {9, 5}, {37, 1},
                                   {0, 1}, {22, 11}}) {
        Sequence s;
        s.start = start;
        s.tokens = tokens;
        s.q = RandomNonZero(tokens * shape.heads * shape.head_dim, rng);
        for (float& v : s.q) v *= 3.0f;  // sharper softmax
        s.keys = RandomNonZero((start + tokens) * kv_dim, rng);
        s.values = RandomNonZero((start + tokens) * kv_dim, rng);
        sequences.push_back(std::move(s));
      }
      // A pool with every block id shuffled among the sequences, plus unused blocks.
      int64_t blocks = 3;
      for (const Sequence& s : sequences) blocks += (s.start + s.tokens + block_seq_len - 1) / block_seq_len;
      std::vector<int32_t> ids(blocks);
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      const int64_t block_stride = block_seq_len * kv_dim + 3;  // padding between blocks
      std::vector<float> key_pool = RandomNonZero(blocks * block_stride, rng);
      std::vector<float> value_pool = RandomNonZero(blocks * block_stride, rng);
      size_t next = 0;
      std::vector<AttentionSpan> spans;
      for (Sequence& s : sequences) {
        const int64_t length = s.start + s.tokens;
        for (int64_t b = 0; b * block_seq_len < length; ++b) s.table.push_back(ids[next++]);
        AttentionSpan span;
        span.tokens = s.tokens;
        span.start = s.start;
        span.kv = PagedKv{key_pool.data(), value_pool.data(), s.table.data(), block_seq_len,
                          block_stride};
        for (int64_t p = 0; p < length; ++p) {
          std::copy_n(s.keys.data() + p * kv_dim, kv_dim,
                      key_pool.data() + span.kv.RowOffset(p, kv_dim));
          std::copy_n(s.values.data() + p * kv_dim, kv_dim,
                      value_pool.data() + span.kv.RowOffset(p, kv_dim));
        }
        spans.push_back(span);
      }
      std::vector<float> q, expected;
      for (const Sequence& s : sequences) {
        std::vector<float> out(s.q.size(), kNaN);
        CausalAttention(s.q.data(), s.tokens, s.start, s.keys.data(), s.values.data(), shape,
                        out.data());
        q.insert(q.end(), s.q.begin(), s.q.end());
        expected.insert(expected.end(), out.begin(), out.end());
      }
      // All sequences in one call, on one thread and on several.
      ThreadCountGuard guard;
      for (int threads : {1, 3}) {
        SetCpuThreads(threads);
        std::vector<float> batched(q.size(), kNaN);
        PagedCausalAttention(q.data(), spans.data(), static_cast<int64_t>(spans.size()), shape,
                             batched.data());
        ExpectBitsEqual(batched, expected, "batched");
      }
      // Each sequence alone.
      size_t offset = 0;
      for (size_t i = 0; i < spans.size(); ++i) {
        std::vector<float> alone(sequences[i].q.size(), kNaN);
        PagedCausalAttention(sequences[i].q.data(), &spans[i], 1, shape, alone.data());
        ExpectBitsEqual(alone,
                        std::vector<float>(expected.begin() + offset,
                                           expected.begin() + offset + alone.size()),
                        "alone");
        offset += alone.size();
      }
    }
  }
}

TEST(PagedAttentionTest, ChunkedQueriesEqualOneShot) {
  // A prompt of 29 tokens attended in one call, then in chunks of 4, 1, 11, 13 against the
  // cache up to each chunk's end: every row equal bit for bit (the property chunked prefill
  // and preemption's recompute rely on).
  std::mt19937 rng(42);
  const AttentionShape shape{6, 2, 18};
  const int64_t kv_dim = shape.kv_heads * shape.head_dim, row = shape.heads * shape.head_dim;
  const int64_t block_seq_len = 5, length = 29;
  std::vector<int32_t> table = {4, 0, 5, 2, 1, 3};
  std::vector<float> keys = RandomNonZero(6 * block_seq_len * kv_dim, rng);
  std::vector<float> values = RandomNonZero(6 * block_seq_len * kv_dim, rng);
  const std::vector<float> q = RandomNonZero(length * row, rng);
  const PagedKv kv{keys.data(), values.data(), table.data(), block_seq_len,
                   block_seq_len * kv_dim};
  AttentionSpan whole{length, 0, kv};
  std::vector<float> one_shot(q.size(), kNaN);
  PagedCausalAttention(q.data(), &whole, 1, shape, one_shot.data());
  std::vector<float> chunked(q.size(), kNaN);
  int64_t start = 0;
  for (int64_t n : {4, 1, 11, 13}) {
    AttentionSpan chunk{n, start, kv};
    PagedCausalAttention(q.data() + start * row, &chunk, 1, shape, chunked.data() + start * row);
    start += n;
  }
  ASSERT_EQ(start, length);
  ExpectBitsEqual(chunked, one_shot, "chunked");
}

}  // namespace
}  // namespace nibble::kernels::cpu
