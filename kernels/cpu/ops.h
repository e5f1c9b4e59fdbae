// Element-wise and per-row operations of the transformer forward pass, fp32.
#pragma once

#include <cstdint>

namespace nibble::kernels::cpu {

// Threads used by the parallel CPU kernels called from the calling thread from now on (<= 0:
// all cores). OpenMP's thread count is a per-thread setting: other threads, and threads
// started later, keep their own (the OMP_NUM_THREADS default), so a thread that drives the
// kernels sets it itself.
void SetCpuThreads(int threads);
// The calling thread's setting.
int CpuThreads();

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) * weight, for each of `rows` rows.
// `out` may alias `x`. The mean of squares is accumulated in double: the reference path.
void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
             float* out);

// x += y, element-wise.
void AddInPlace(float* x, const float* y, int64_t n);

// gate[i] = silu(gate[i]) * up[i].
void SiluMulInPlace(float* gate, const float* up, int64_t n);

// Rotary embedding in the "rotate_half" layout HF checkpoints use: within each head of
// `head_dim`, element i and i + head_dim/2 form the pair rotated by angle
// position * inv_freq[i]. `x` holds `heads` heads of one token.
void RopeRotateHalf(float* x, int64_t heads, int64_t head_dim, int64_t position,
                    const float* inv_freq);

// Rotary inverse frequencies base^(-2i/head_dim), i < head_dim/2, computed in double.
void RopeInverseFrequencies(double base, int64_t head_dim, float* inv_freq);

// In-place softmax of one row; the maximum is subtracted first.
void Softmax(float* x, int64_t n);

}  // namespace nibble::kernels::cpu
