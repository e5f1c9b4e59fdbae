// The CUDA backend: the same forward pass as the CPU backend (cpu_backend.h, the reference it
// is checked against) on one NVIDIA GPU, in fp16 with fp32 accumulation. Weights live on the
// device: 4-bit linears repacked once into the W4A16 kernels' layout (kernels/cuda/w4a16.h),
// dense ones as fp16 for cuBLAS; q/k/v and gate/up are stacked into one product each where
// their storage agrees. The KV cache is fp16, in the CPU backend's block layout.
//
// Threading: as Backend (one driving thread at a time); any thread may drive it, each call
// selects the backend's device first.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model_config.h"
#include "engine/model_weights.h"

namespace nibble::engine {

// Uploads `weights` to device `device` (consumed: each host weight is released once it is on
// the device, so the host never holds more than one layer twice). Errors: no such device,
// a shape the kernels do not support (head_dim not 8, 64 or 128; a 4-bit group other than
// 32, 64, 128), device memory exhausted (ResourceExhausted, with the bytes asked for).
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const ModelConfig& config,
                                                         ModelWeights weights, int device);

}  // namespace nibble::engine
