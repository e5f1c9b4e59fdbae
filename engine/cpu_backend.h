// The CPU backend: fp32 compute over fp32 or fp16 weights, the reference every other
// backend is checked against. Threads come from OpenMP inside the kernels.
#pragma once

#include <memory>

#include "engine/backend.h"
#include "engine/model_config.h"
#include "engine/model_weights.h"

namespace nibble::engine {

std::unique_ptr<Backend> MakeCpuBackend(const ModelConfig& config, ModelWeights weights);

}  // namespace nibble::engine
