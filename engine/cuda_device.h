// What the engine's GPU code shares (the CUDA backend, and the GPU quantizer in quant/):
// CUDA errors as Status, device and pinned memory owned by objects, and cuBLAS loaded at run
// time. Built only with CUDA (NIBBLE_HAVE_CUDA).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nibble::engine {

// values rounded to fp16 (round to nearest even), for uploading fp32 host weights.
std::vector<uint16_t> ToHalf(const std::vector<float>& values);

// A Status naming `what` and the CUDA error: ResourceExhausted for an allocation failure,
// InvalidArgument for an invalid value, Internal otherwise.
absl::Status CudaError(cudaError_t error, const std::string& what);

#define NIBBLE_CUDA_OR_RETURN(expr, what)                            \
  do {                                                               \
    const cudaError_t nibble_cuda_error_ = (expr);                   \
    if (nibble_cuda_error_ != cudaSuccess) {                         \
      return ::nibble::engine::CudaError(nibble_cuda_error_, what);  \
    }                                                                \
  } while (0)

// cuBLAS, loaded with dlopen when first needed rather than linked: its libcublasLt carries
// 92 KiB of static TLS, and with it in the process from the start glibc refuses civetweb's
// small-stack worker threads (pthread_create: EINVAL), so nibbled's Prometheus endpoint
// would not start. Loaded later, it costs only the processes that use the GPU, and threads
// started before it keep working.
struct CublasApi {
  decltype(&cublasCreate) create = nullptr;
  decltype(&cublasDestroy) destroy = nullptr;
  decltype(&cublasSetStream) set_stream = nullptr;
  decltype(&cublasSetWorkspace) set_workspace = nullptr;
  // cublasGemmEx (overloaded in C++, so spelled out).
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*,
                            cudaDataType, int, const void*, void*, cudaDataType, int,
                            cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  decltype(&cublasGetStatusName) status_name = nullptr;
  decltype(&cublasGetStatusString) status_string = nullptr;
};

// The process's cuBLAS (loaded once); FailedPrecondition when the library is missing.
absl::StatusOr<const CublasApi*> LoadCublas();

absl::Status CublasError(const CublasApi& api, cublasStatus_t status, const std::string& what);

#define NIBBLE_CUBLAS_OR_RETURN(api, expr, what)                         \
  do {                                                                   \
    const cublasStatus_t nibble_cublas_status_ = (expr);                 \
    if (nibble_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                \
      return ::nibble::engine::CublasError(api, nibble_cublas_status_, what); \
    }                                                                    \
  } while (0)

// A cuBLAS handle on one stream with its own workspace (so that nothing is allocated inside
// a graph capture), destroyed with its owner.
class CublasHandle {
 public:
  CublasHandle() = default;
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  ~CublasHandle();
  // Creates the handle on `stream` with `workspace` (device memory of `workspace_bytes` the
  // caller keeps alive as long as the handle).
  absl::Status Init(cudaStream_t stream, void* workspace, size_t workspace_bytes);
  const CublasApi& api() const { return *api_; }
  cublasHandle_t get() const { return handle_; }

 private:
  const CublasApi* api_ = nullptr;
  cublasHandle_t handle_ = nullptr;
};

// A non-blocking CUDA stream, destroyed with its owner.
class CudaStream {
 public:
  CudaStream() = default;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  ~CudaStream() {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  absl::Status Init() {
    NIBBLE_CUDA_OR_RETURN(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                          "creating a CUDA stream");
    return absl::OkStatus();
  }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// Device memory owned by one object; freed with it.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(DeviceMemory&& other) noexcept
      : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  DeviceMemory& operator=(DeviceMemory&& other) noexcept {
    std::swap(ptr_, other.ptr_);
    std::swap(bytes_, other.bytes_);
    return *this;
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    if (ptr_ != nullptr) cudaFree(ptr_);  // a failure here has no one left to tell
  }

  // ResourceExhausted naming `what` and the bytes when the device has no room.
  static absl::StatusOr<DeviceMemory> Allocate(size_t bytes, const std::string& what);
  static absl::StatusOr<DeviceMemory> Upload(const void* host, size_t bytes,
                                             const std::string& what);

  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A device buffer that only grows (scratch activations, metadata, workspaces), at least
// doubling. Each reallocation bumps *generation when given, so that CUDA graphs captured over
// the old address are known to be stale.
class GrowingDeviceBuffer {
 public:
  absl::Status Reserve(size_t bytes, const std::string& what, uint64_t* generation = nullptr);
  template <typename T>
  T* as() const {
    return memory_.as<T>();
  }

 private:
  DeviceMemory memory_;
};

// Pinned host memory (for asynchronous copies), grown on demand.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
  }
  absl::Status Reserve(size_t bytes);
  char* data() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace nibble::engine
