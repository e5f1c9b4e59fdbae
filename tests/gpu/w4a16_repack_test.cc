// CPU-only: RepackW4A16 / UnpackW4A16 round-trip (runs in CI, no GPU needed), and the layout
// contract spot-checked against the formula in w4a16_layout.h.
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/cuda/w4a16_layout.h"

namespace cu = nibble::kernels::cuda;

int main() {
  std::mt19937 rng(std::random_device{}());
  int failures = 0;
  struct Shape { int64_t n, k, group; };
  const Shape shapes[] = {{8, 33, 32},  {24, 172, 32}, {16, 64, 64},   {40, 2112, 128},
                          {8, 1, 128},  {64, 8224, 32}, {4096, 256, 64}};
  for (const Shape& s : shapes) {
    const cu::W4A16Layout l = cu::MakeW4A16Layout(s.n, s.k, s.group);
    std::vector<uint8_t> q(s.n * s.k), z(s.n * l.groups);
    std::vector<uint16_t> sc(s.n * l.groups);
    for (auto& v : q) v = rng() % 16;
    for (auto& v : z) v = rng() % 16;
    for (auto& v : sc) v = static_cast<uint16_t>(rng() & 0x7bff);  // finite fp16 bits
    std::vector<uint32_t> qw(l.qw_words()), zs(l.zs_words());
    cu::RepackW4A16(l, q.data(), z.data(), sc.data(), qw.data(), zs.data());
    std::vector<uint8_t> q2(q.size()), z2(z.size());
    std::vector<uint16_t> sc2(sc.size());
    cu::UnpackW4A16(l, qw.data(), zs.data(), q2.data(), z2.data(), sc2.data());
    bool ok = q == q2 && z == z2 && sc == sc2;
    // Spot check: W[row][kk] sits where the header says.
    for (int trial = 0; trial < 100 && ok; ++trial) {
      const int64_t row = rng() % s.n, kk = rng() % s.k;
      const int64_t r = row % 16, g = r % 8, kc = kk % 64, t = kc / 16, j = (kc % 16) / 4;
      const int64_t slot = kc % 4;
      static constexpr int kNib[2][4] = {{0, 4, 2, 6}, {1, 5, 3, 7}};
      const int nib = kNib[r >= 8][slot];
      const size_t word = ((row / 16 * (l.k_pad / 64) + kk / 64) * 32 + 4 * g + t) * 4 + j;
      ok = ((qw[word] >> (4 * nib)) & 15) == q[row * s.k + kk];
    }
    std::printf("%s repack round-trip n=%lld k=%lld group=%lld\n", ok ? "PASS" : "FAIL",
                static_cast<long long>(s.n), static_cast<long long>(s.k),
                static_cast<long long>(s.group));
    failures += !ok;
  }
  const bool shape_checks = cu::CheckW4A16Shape(12, 64, 128) != nullptr &&
                            cu::CheckW4A16Shape(16, 64, 96) != nullptr &&
                            cu::CheckW4A16Shape(16, 64, 32) == nullptr;
  std::printf("%s shape checks\n", shape_checks ? "PASS" : "FAIL");
  failures += !shape_checks;
  std::printf("%s w4a16_repack_test (%d failures)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
