// Function multi-versioning for the CPU kernels.
#pragma once

// On x86-64 the hot loops are also compiled for AVX2 and picked at load time: the same code
// and summation order (and -ffp-contract=off), so every clone gives the same bits. Elsewhere
// (a Jetson's Arm cores) the baseline build already has NEON.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NIBBLE_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define NIBBLE_SIMD_CLONES
#endif
