// The weight of one linear layer on the CPU: y = x · Wᵀ + b. An interface, so that the packed
// int4 AWQ weight of the quantization issue plugs into the same forward pass as fp32/fp16.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/int4_weight.h"

namespace nibble::engine {

// Immutable after construction; Forward may be called from several threads at once.
class LinearWeight {
 public:
  LinearWeight(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  virtual ~LinearWeight() = default;

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }

  // y[rows, out_features] = x[rows, in_features] · Wᵀ (+ bias).
  virtual void Forward(const float* x, int64_t rows, float* y) const = 0;
  // Row `index` of W (0 <= index < out_features, checked by the caller) as fp32,
  // out[in_features]: an embedding lookup when W is a token embedding (tied lm_head).
  virtual void Row(int64_t index, float* out) const = 0;
  // The weight as fp32 [out_features, in_features] (what it computes with, after any
  // rounding of its storage), for tests, conversion and quantization.
  virtual std::vector<float> DequantizedWeight() const = 0;
  virtual const std::vector<float>& bias() const = 0;  // empty when there is none
  // Bytes the weight occupies in memory (what decode streams per token).
  virtual size_t StorageBytes() const = 0;
  // "f32", "f16", ...: how the weight is stored.
  virtual std::string StorageName() const = 0;
  // The 4-bit weight it computes with, unpacked (for a backend that repacks it into its own
  // layout: the CUDA backend); nullopt for a dense weight.
  virtual std::optional<Int4Weight> Int4() const { return std::nullopt; }

 private:
  int64_t in_features_;
  int64_t out_features_;
};

enum class WeightStorage { kF32, kF16 };

// A dense weight kept as fp32 or fp16 (the latter halves memory; compute stays fp32).
// `weight` is row-major [out_features, in_features]; `bias` is empty or [out_features].
std::unique_ptr<LinearWeight> MakeDenseLinear(int64_t in_features, int64_t out_features,
                                              std::vector<float> weight,
                                              std::vector<float> bias, WeightStorage storage);

// An fp16 weight used in place in a read-only file mapping that `mapping` keeps alive: no
// copy, and only the pages that are read become resident (an embedding table's rows).
std::unique_ptr<LinearWeight> MakeMappedF16Linear(int64_t in_features, int64_t out_features,
                                                  std::shared_ptr<const void> mapping,
                                                  const uint16_t* weight);

// A W4A16 weight (int4 in groups, fp16 scales, fp32 compute), repacked for the CPU kernel.
std::unique_ptr<LinearWeight> MakeInt4Linear(const Int4Weight& weight, std::vector<float> bias);

}  // namespace nibble::engine
