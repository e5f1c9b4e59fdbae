// The device layout of W4A16 weights that kernels/cuda/w4a16.cu reads, and the host-side repack
// from nibble's Int4Weight layout (engine/int4_weight.h: q [n, k] one value 0..15 per byte,
// zeros [n, groups] 0..15, scales [n, groups] fp16 bits, groups = ceil(k / group)).
//
// Why this layout: the kernels multiply with mma.sync m16n8k16 with the *weight* as the A
// operand (16 output features x 16 k) and the activations as B (16 k x 8 tokens). One 32-bit
// word holds exactly one thread's A fragment of one mma (8 nibbles), ordered so that the
// lop3/0x6400 magic turns it into the four half2 registers with two lop3 each and no conversion
// instructions; one 16-byte load per thread holds four such words, i.e. the fragments of 64
// consecutive k for a 16-feature tile, and the 32 lanes of a warp read 512 contiguous bytes.
//
//   qw: uint32 [n_pad / 16][k_pad / 64][32 lanes][4 words]
//     lane = 4 * g + t (g = lane / 4, t = lane % 4), word j (the j-th k16 step), for
//     feature rows r0 = 16 * tile + g and r1 = r0 + 8, and kb = 64 * chunk + 16 * t + 4 * j:
//       nibble 0: W[r0][kb + 0]  nibble 4: W[r0][kb + 1]  nibble 2: W[r0][kb + 2]  nibble 6: W[r0][kb + 3]
//       nibble 1: W[r1][kb + 0]  nibble 5: W[r1][kb + 1]  nibble 3: W[r1][kb + 2]  nibble 7: W[r1][kb + 3]
//     (each thread's 16 k are contiguous, so its activations come as two 16-byte loads; the
//     k order inside an mma is a permutation shared by A and B, which a sum does not see).
//   zs: uint32 [n_pad / 16][groups_pad][16] (tile-major: a tile's scale/zero words for all
//     groups are one contiguous stream, read alongside its weights; the earlier [groups_pad]
//     [n_pad], a 64-byte piece every n_pad words, was 4-9 % slower on the small shapes and the
//     same on the large ones: tests/gpu/NOTES.md run 6):
//     low half the fp16 scale, high half the zero as an fp16 value (0..15), so one 32-bit
//     load gives both.
// Padding (rows >= n, k >= k, groups >= groups) holds q = 0, zero = 0, scale = 0: finite, and
// multiplied by activations the kernels zero-fill.
//
// Pure functions on host memory; no CUDA needed (tested on the CPU).
#pragma once

#include <cstddef>
#include <cstdint>

namespace nibble::kernels::cuda {

struct W4A16Layout {
  int64_t n = 0, k = 0, group = 0;
  int64_t n_pad = 0;       // n rounded up to 16
  int64_t k_pad = 0;       // k rounded up to 64
  int64_t groups = 0;      // ceil(k / group), as the format stores
  int64_t groups_pad = 0;  // ceil(k_pad / group): what the kernels may index
  size_t qw_words() const { return static_cast<size_t>(n_pad / 16 * (k_pad / 64) * 128); }
  size_t zs_words() const { return static_cast<size_t>(groups_pad * n_pad); }
};

// nullptr when the shape is supported, else what is wrong: n > 0 and a multiple of 8 (what the
// AWQ GEMM format needs anyway), k > 0, group one of 32, 64, 128.
const char* CheckW4A16Shape(int64_t n, int64_t k, int64_t group);
// Precondition: CheckW4A16Shape(n, k, group) == nullptr.
W4A16Layout MakeW4A16Layout(int64_t n, int64_t k, int64_t group);

// Int4Weight layout -> device layout. qw has layout.qw_words() words, zs layout.zs_words().
// Values are taken modulo 16 (callers pass 0..15).
void RepackW4A16(const W4A16Layout& layout, const uint8_t* q, const uint8_t* zeros,
                 const uint16_t* scales, uint32_t* qw, uint32_t* zs);
// The inverse, for tests: q [n, k], zeros and scales [n, groups].
void UnpackW4A16(const W4A16Layout& layout, const uint32_t* qw, const uint32_t* zs, uint8_t* q,
                 uint8_t* zeros, uint16_t* scales);

}  // namespace nibble::kernels::cuda
