// Test and benchmark helper: device memory owned by an RAII object (no naked cudaFree), and a
// CHECK for test code that aborts with file:line on a failed CUDA call (tests only: the
// library returns errors instead, kernels/cuda/check.h).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <utility>

#include <cuda_runtime_api.h>

#define NIBBLE_TEST_CUDA_CHECK(expr)                                                       \
  do {                                                                                     \
    const cudaError_t e_ = (expr);                                                         \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #expr,              \
                   cudaGetErrorString(e_));                                                \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

namespace nibble::testing {

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) : count_(count) {
    NIBBLE_TEST_CUDA_CHECK(cudaMalloc(&ptr_, count * sizeof(T) + 16));
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(count_, o.count_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  T* get() const { return static_cast<T*>(ptr_); }
  size_t count() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }
  void CopyFrom(const T* host) {
    NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(ptr_, host, bytes(), cudaMemcpyHostToDevice));
  }
  void CopyTo(T* host) const {
    NIBBLE_TEST_CUDA_CHECK(cudaMemcpy(host, ptr_, bytes(), cudaMemcpyDeviceToHost));
  }

 private:
  void* ptr_ = nullptr;
  size_t count_ = 0;
};

}  // namespace nibble::testing
