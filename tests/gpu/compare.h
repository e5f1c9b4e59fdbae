// Test helpers for the fp16 kernels against fp32 CPU references: the seed of a run, random
// non-zero fp16 data, NaN poisoning, and the tolerance check with its PASS / FAIL line.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/half.h"

namespace nibble::testing {

constexpr uint16_t kHalfNaN = 0xffff;  // the poison: any element left unwritten reads NaN

// The seed of a test's random inputs: argv[1] when given (`test SEED` replays a run), else a
// fresh one. Printed as the line "<test> seed <seed>".
inline unsigned TestSeed(int argc, char** argv, const char* test) {
  const unsigned seed = argc > 1 ? static_cast<unsigned>(std::strtoul(argv[1], nullptr, 10))
                                 : std::random_device{}();
  std::printf("%s seed %u\n", test, seed);
  return seed;
}

// n fp16 values uniform in [lo, hi], none exactly zero (re-drawn).
inline std::vector<uint16_t> RandomHalf(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<uint16_t> v(n);
  for (auto& h : v) {
    do {
      h = kernels::cpu::FloatToHalf(dist(rng));
    } while ((h & 0x7fff) == 0);
  }
  return v;
}

inline std::vector<float> ToFloat(const std::vector<uint16_t>& h) {
  std::vector<float> f(h.size());
  kernels::cpu::HalfToFloat(h.data(), h.size(), f.data());
  return f;
}

// Per element |got - ref| <= rel |ref| + abs_rms * rms(ref), every element finite, and
// ||got - ref|| / ||ref|| <= norm_bound. Prints one PASS or FAIL line; returns 1 on failure.
inline int CheckClose(const std::string& name, const std::vector<uint16_t>& got,
                      const std::vector<float>& ref, double rel, double abs_rms,
                      double norm_bound = 1e-3) {
  double ss_ref = 0, ss_err = 0, worst = 0;
  for (float r : ref) ss_ref += static_cast<double>(r) * r;
  const double rms = std::sqrt(ss_ref / std::max<size_t>(1, ref.size()));
  size_t bad = 0, first_bad = ref.size();
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = kernels::cpu::HalfToFloat(got[i]);
    const double e = std::fabs(g - ref[i]);
    const double bound = rel * std::fabs(ref[i]) + abs_rms * rms;
    if (!std::isfinite(g) || !(e <= bound)) {
      if (bad++ == 0) first_bad = i;
    }
    if (std::isfinite(g)) {
      ss_err += e * e;
      worst = std::max(worst, e / bound);
    }
  }
  const double norm_rel = ss_ref > 0 ? std::sqrt(ss_err / ss_ref) : std::sqrt(ss_err);
  const bool ok = bad == 0 && norm_rel <= norm_bound;
  std::printf("%s %s n=%zu rel=%.2e worst/bound=%.2f", ok ? "PASS" : "FAIL", name.c_str(),
              ref.size(), norm_rel, worst);
  if (bad > 0) {
    std::printf(" bad=%zu first=[%zu] got %g ref %g", bad, first_bad,
                kernels::cpu::HalfToFloat(got[first_bad]), ref[first_bad]);
  }
  std::printf("\n");
  return ok ? 0 : 1;
}

}  // namespace nibble::testing
