#include "kernels/cpu/matmul.h"

#include <vector>

#include "kernels/cpu/half.h"
#include "kernels/cpu/simd.h"

namespace nibble::kernels::cpu {
namespace {

// Below this many multiply-adds (about 50 us of one core) a parallel region's start and
// barrier cost more than they save, and on a loaded machine far more.
constexpr int64_t kMinParallelWork = 1 << 17;

bool WorthParallel(int64_t m, int64_t n, int64_t k) { return m * n * k >= kMinParallelWork; }

}  // namespace

NIBBLE_SIMD_CLONES
void MatMulWeightsF32(const float* x, const float* w, const float* bias, int64_t m, int64_t n,
                      int64_t k, float* y) {
#pragma omp parallel for schedule(static) if (WorthParallel(m, n, k))
  for (int64_t col = 0; col < n; ++col) {
    const float* w_row = w + col * k;
    const float b = bias ? bias[col] : 0.0f;
    for (int64_t row = 0; row < m; ++row) y[row * n + col] = Dot(x + row * k, w_row, k) + b;
  }
}

NIBBLE_SIMD_CLONES
void MatMulWeightsF16(const float* x, const uint16_t* w, const float* bias, int64_t m,
                      int64_t n, int64_t k, float* y) {
#pragma omp parallel if (WorthParallel(m, n, k))
  {
    std::vector<float> w_row(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t col = 0; col < n; ++col) {
      HalfToFloat(w + col * k, static_cast<size_t>(k), w_row.data());
      const float b = bias ? bias[col] : 0.0f;
      for (int64_t row = 0; row < m; ++row) {
        y[row * n + col] = Dot(x + row * k, w_row.data(), k) + b;
      }
    }
  }
}

}  // namespace nibble::kernels::cpu
