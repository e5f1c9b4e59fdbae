#include "kernels/cpu/ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

namespace nibble::kernels::cpu {

void SetCpuThreads(int threads) { omp_set_num_threads(threads > 0 ? threads : omp_get_num_procs()); }

int CpuThreads() { return omp_get_max_threads(); }

void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
             float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = x + r * dim;
    double sum_squares = 0;
    for (int64_t i = 0; i < dim; ++i) sum_squares += static_cast<double>(in[i]) * in[i];
    const float scale =
        static_cast<float>(1.0 / std::sqrt(sum_squares / static_cast<double>(dim) + eps));
    float* o = out + r * dim;
    for (int64_t i = 0; i < dim; ++i) o[i] = in[i] * scale * weight[i];
  }
}

void AddInPlace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void SiluMulInPlace(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void RopeRotateHalf(float* x, int64_t heads, int64_t head_dim, int64_t position,
                    const float* inv_freq) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    // Angles in double: positions reach 32768 and beyond, where fp32 loses the phase.
    const double angle = static_cast<double>(position) * inv_freq[i];
    const float c = static_cast<float>(std::cos(angle));
    const float s = static_cast<float>(std::sin(angle));
    for (int64_t h = 0; h < heads; ++h) {
      float* head = x + h * head_dim;
      const float a = head[i];
      const float b = head[i + half];
      head[i] = a * c - b * s;
      head[i + half] = b * c + a * s;
    }
  }
}

void RopeInverseFrequencies(double base, int64_t head_dim, float* inv_freq) {
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    inv_freq[i] = static_cast<float>(
        std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim)));
  }
}

void Softmax(float* x, int64_t n) {
  if (n <= 0) return;
  const float max_value = *std::max_element(x, x + n);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max_value);
    sum += x[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

}  // namespace nibble::kernels::cpu
