#include "kernels/cuda/w4a16_layout.h"

#include <cstring>

namespace nibble::kernels::cuda {
namespace {

// Small integers 0..15 as fp16 bits (exact): 1.xxxx * 2^e.
uint16_t SmallIntToHalf(unsigned v) {
  if (v == 0) return 0;
  int e = 31 - __builtin_clz(v);                      // v in [2^e, 2^(e+1))
  const unsigned mant = (v << (10 - e)) & 0x3ff;      // exact: v < 2^11
  return static_cast<uint16_t>(((e + 15) << 10) | mant);
}
unsigned HalfToSmallInt(uint16_t h) {
  if (h == 0) return 0;
  const int e = ((h >> 10) & 31) - 15;
  return ((h & 0x3ff) | 0x400) >> (10 - e);
}

// Position of W[row][kk] in the device layout: word index and nibble.
struct NibbleSlot {
  size_t word;
  int shift;
};
NibbleSlot Slot(const W4A16Layout& l, int64_t row, int64_t kk) {
  const int64_t tile = row / 16, r = row % 16;
  const int64_t chunk = kk / 64, kc = kk % 64;
  const int64_t t = kc / 16, j = (kc % 16) / 4, s = kc % 4;  // slot s of 4
  const int64_t g = r % 8;
  const bool hi_row = r >= 8;
  // slot 0,1 -> nibbles (0,4) / (1,5); slot 2,3 -> (2,6) / (3,7).
  static constexpr int kNibble[2][4] = {{0, 4, 2, 6}, {1, 5, 3, 7}};
  const int nib = kNibble[hi_row][s];
  const int64_t lane = 4 * g + t;
  const size_t word = static_cast<size_t>(((tile * (l.k_pad / 64) + chunk) * 32 + lane) * 4 + j);
  return {word, 4 * nib};
}

// zs is tile-major: [n_pad / 16][groups_pad][16].
size_t ZsIndex(const W4A16Layout& l, int64_t row, int64_t g) {
  return static_cast<size_t>((row / 16 * l.groups_pad + g) * 16 + row % 16);
}

}  // namespace

const char* CheckW4A16Shape(int64_t n, int64_t k, int64_t group) {
  if (n <= 0 || n % 8 != 0) return "n (out features) must be a positive multiple of 8";
  if (k <= 0) return "k (in features) must be positive";
  if (group != 32 && group != 64 && group != 128) return "group size must be 32, 64 or 128";
  return nullptr;
}

W4A16Layout MakeW4A16Layout(int64_t n, int64_t k, int64_t group) {
  W4A16Layout l;
  l.n = n;
  l.k = k;
  l.group = group;
  l.n_pad = (n + 15) / 16 * 16;
  l.k_pad = (k + 63) / 64 * 64;
  l.groups = (k + group - 1) / group;
  l.groups_pad = (l.k_pad + group - 1) / group;
  return l;
}

void RepackW4A16(const W4A16Layout& l, const uint8_t* q, const uint8_t* zeros,
                 const uint16_t* scales, uint32_t* qw, uint32_t* zs) {
  std::memset(qw, 0, l.qw_words() * sizeof(uint32_t));
  std::memset(zs, 0, l.zs_words() * sizeof(uint32_t));
  for (int64_t row = 0; row < l.n; ++row) {
    const uint8_t* qrow = q + row * l.k;
    for (int64_t kk = 0; kk < l.k; ++kk) {
      const NibbleSlot s = Slot(l, row, kk);
      qw[s.word] |= static_cast<uint32_t>(qrow[kk] & 15) << s.shift;
    }
    for (int64_t g = 0; g < l.groups; ++g) {
      const uint16_t z = SmallIntToHalf(zeros[row * l.groups + g] & 15);
      zs[ZsIndex(l, row, g)] = scales[row * l.groups + g] | (static_cast<uint32_t>(z) << 16);
    }
  }
}

void UnpackW4A16(const W4A16Layout& l, const uint32_t* qw, const uint32_t* zs, uint8_t* q,
                 uint8_t* zeros, uint16_t* scales) {
  for (int64_t row = 0; row < l.n; ++row) {
    for (int64_t kk = 0; kk < l.k; ++kk) {
      const NibbleSlot s = Slot(l, row, kk);
      q[row * l.k + kk] = static_cast<uint8_t>((qw[s.word] >> s.shift) & 15);
    }
    for (int64_t g = 0; g < l.groups; ++g) {
      const uint32_t v = zs[ZsIndex(l, row, g)];
      scales[row * l.groups + g] = static_cast<uint16_t>(v & 0xffff);
      zeros[row * l.groups + g] = static_cast<uint8_t>(HalfToSmallInt(static_cast<uint16_t>(v >> 16)));
    }
  }
}

}  // namespace nibble::kernels::cuda
