// Timing helpers of the GPU benchmarks (attention_bench, read_probe): event-timed calls after
// warm-ups, the median, and the device-to-device copy that every table is measured against.
#pragma once

#include <algorithm>
#include <vector>

#include <cuda_runtime_api.h>

#include "tests/gpu/device_buffer.h"

namespace nibble::testing {

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median µs of `reps` event-timed calls of fn() on `stream`, after 3 warm-ups.
template <typename Fn>
double TimeUs(cudaStream_t stream, int reps, Fn&& fn) {
  cudaEvent_t e0, e1;
  NIBBLE_TEST_CUDA_CHECK(cudaEventCreate(&e0));
  NIBBLE_TEST_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> us;
  for (int r = 0; r < reps + 3; ++r) {
    NIBBLE_TEST_CUDA_CHECK(cudaEventRecord(e0, stream));
    fn();
    NIBBLE_TEST_CUDA_CHECK(cudaEventRecord(e1, stream));
    NIBBLE_TEST_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    NIBBLE_TEST_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 3) us.push_back(ms * 1e3);
  }
  NIBBLE_TEST_CUDA_CHECK(cudaEventDestroy(e0));
  NIBBLE_TEST_CUDA_CHECK(cudaEventDestroy(e1));
  return Median(us);
}

// GB/s of a 1 GiB device-to-device copy, bytes read + written (the median of 10 after 3
// warm-ups, each its own cudaMemcpyAsync between events).
inline double CopyBandwidth(cudaStream_t stream) {
  const size_t bytes = size_t{1} << 30;
  DeviceBuffer<char> a(bytes), b(bytes);
  NIBBLE_TEST_CUDA_CHECK(cudaMemset(a.get(), 1, bytes));
  const double us = TimeUs(stream, 10, [&] {
    NIBBLE_TEST_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, stream));
  });
  return 2.0 * bytes / (us * 1e3);
}

}  // namespace nibble::testing
