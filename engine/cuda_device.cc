#include "engine/cuda_device.h"

#include <dlfcn.h>

#include <algorithm>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "kernels/cpu/half.h"

namespace nibble::engine {

std::vector<uint16_t> ToHalf(const std::vector<float>& values) {
  std::vector<uint16_t> half(values.size());
  kernels::cpu::FloatToHalfBulk(values.data(), values.size(), half.data());
  return half;
}

absl::Status CudaError(cudaError_t error, const std::string& what) {
  const std::string message = absl::StrCat(what, ": CUDA error ", cudaGetErrorName(error), " (",
                                           cudaGetErrorString(error), ")");
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  if (error == cudaErrorInvalidValue) return absl::InvalidArgumentError(message);
  return absl::InternalError(message);
}

absl::StatusOr<const CublasApi*> LoadCublas() {
  static const absl::StatusOr<CublasApi> api = []() -> absl::StatusOr<CublasApi> {
    const std::string library = absl::StrCat("libcublas.so.", CUBLAS_VER_MAJOR);
    void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot load cuBLAS (", library, "): ", dlerror()));
    }
    CublasApi loaded;
    absl::Status missing = absl::OkStatus();
    auto bind = [&](auto& function, const char* name) {
      function = reinterpret_cast<std::remove_reference_t<decltype(function)>>(dlsym(handle, name));
      if (function == nullptr && missing.ok()) {
        missing = absl::FailedPreconditionError(absl::StrCat(library, " has no ", name));
      }
    };
    bind(loaded.create, "cublasCreate_v2");
    bind(loaded.destroy, "cublasDestroy_v2");
    bind(loaded.set_stream, "cublasSetStream_v2");
    bind(loaded.set_workspace, "cublasSetWorkspace_v2");
    bind(loaded.gemm_ex, "cublasGemmEx");
    bind(loaded.status_name, "cublasGetStatusName");
    bind(loaded.status_string, "cublasGetStatusString");
    if (!missing.ok()) return missing;
    return loaded;  // the library stays loaded for the life of the process
  }();
  if (!api.ok()) return api.status();
  return &*api;
}

absl::Status CublasError(const CublasApi& api, cublasStatus_t status, const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": cuBLAS error ", api.status_name(status), " (",
                                          api.status_string(status), ")"));
}

CublasHandle::~CublasHandle() {
  if (handle_ != nullptr) api_->destroy(handle_);
}

absl::Status CublasHandle::Init(cudaStream_t stream, void* workspace, size_t workspace_bytes) {
  NIBBLE_ASSIGN_OR_RETURN(api_, LoadCublas());
  if (cublasStatus_t s = api_->create(&handle_); s != CUBLAS_STATUS_SUCCESS) {
    handle_ = nullptr;
    return CublasError(*api_, s, "creating the cuBLAS handle");
  }
  NIBBLE_CUBLAS_OR_RETURN(*api_, api_->set_stream(handle_, stream), "cublasSetStream");
  NIBBLE_CUBLAS_OR_RETURN(*api_, api_->set_workspace(handle_, workspace, workspace_bytes),
                          "cublasSetWorkspace");
  return absl::OkStatus();
}

absl::StatusOr<DeviceMemory> DeviceMemory::Allocate(size_t bytes, const std::string& what) {
  DeviceMemory memory;
  if (bytes == 0) return memory;
  const cudaError_t error = cudaMalloc(&memory.ptr_, bytes);
  if (error != cudaSuccess) {
    cudaGetLastError();  // an allocation failure is not sticky: clear it for later calls
    return CudaError(error,
                     absl::StrCat("allocating ", bytes, " bytes of device memory for ", what));
  }
  memory.bytes_ = bytes;
  return memory;
}

absl::StatusOr<DeviceMemory> DeviceMemory::Upload(const void* host, size_t bytes,
                                                  const std::string& what) {
  NIBBLE_ASSIGN_OR_RETURN(DeviceMemory memory, Allocate(bytes, what));
  if (bytes > 0) {
    NIBBLE_CUDA_OR_RETURN(cudaMemcpy(memory.ptr_, host, bytes, cudaMemcpyHostToDevice),
                          absl::StrCat("copying ", what, " to the device"));
  }
  return memory;
}

absl::Status GrowingDeviceBuffer::Reserve(size_t bytes, const std::string& what,
                                          uint64_t* generation) {
  const size_t held = memory_.bytes();
  if (bytes <= held) return absl::OkStatus();
  memory_ = DeviceMemory();  // freed first: the new buffer may need the room
  if (generation != nullptr) ++*generation;
  NIBBLE_ASSIGN_OR_RETURN(memory_, DeviceMemory::Allocate(std::max(bytes, held * 2), what));
  return absl::OkStatus();
}

absl::Status PinnedBuffer::Reserve(size_t bytes) {
  if (bytes <= bytes_) return absl::OkStatus();
  if (ptr_ != nullptr) cudaFreeHost(ptr_);
  ptr_ = nullptr;
  const size_t size = std::max(bytes, bytes_ * 2);
  bytes_ = 0;
  NIBBLE_CUDA_OR_RETURN(cudaMallocHost(&ptr_, size), "allocating pinned host memory");
  bytes_ = size;
  return absl::OkStatus();
}

}  // namespace nibble::engine
