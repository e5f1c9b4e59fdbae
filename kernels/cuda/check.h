// Checking CUDA calls: every runtime call and every launch goes through NIBBLE_CUDA_RETURN_IF_ERROR
// (in functions that return cudaError_t), which prints the file:line, the call and
// cudaGetErrorString to stderr and returns the error to the caller. Nothing fails silently and
// nothing exits the process: the caller (the engine's backend) turns the error into a Status.
#pragma once

#include <cstdio>

#include <cuda_runtime_api.h>

#define NIBBLE_CUDA_RETURN_IF_ERROR(expr)                                                  \
  do {                                                                                     \
    const cudaError_t nibble_cuda_err_ = (expr);                                           \
    if (nibble_cuda_err_ != cudaSuccess) {                                                 \
      std::fprintf(stderr, "%s:%d: CUDA error %s (%s) in %s\n", __FILE__, __LINE__,       \
                   cudaGetErrorName(nibble_cuda_err_), cudaGetErrorString(nibble_cuda_err_), \
                   #expr);                                                                 \
      return nibble_cuda_err_;                                                             \
    }                                                                                      \
  } while (0)
