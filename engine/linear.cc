#include "engine/linear.h"

#include "kernels/cpu/half.h"
#include "kernels/cpu/matmul.h"

namespace nibble::engine {
namespace {

class DenseF32Linear final : public LinearWeight {
 public:
  DenseF32Linear(int64_t in, int64_t out, std::vector<float> weight, std::vector<float> bias)
      : LinearWeight(in, out), weight_(std::move(weight)), bias_(std::move(bias)) {}

  void Forward(const float* x, int64_t rows, float* y) const override {
    kernels::cpu::MatMulWeightsF32(x, weight_.data(), bias_.empty() ? nullptr : bias_.data(),
                                   rows, out_features(), in_features(), y);
  }
  std::vector<float> DequantizedWeight() const override { return weight_; }
  const std::vector<float>& bias() const override { return bias_; }
  size_t StorageBytes() const override {
    return (weight_.size() + bias_.size()) * sizeof(float);
  }
  std::string StorageName() const override { return "f32"; }

 private:
  std::vector<float> weight_;
  std::vector<float> bias_;
};

class DenseF16Linear final : public LinearWeight {
 public:
  DenseF16Linear(int64_t in, int64_t out, const std::vector<float>& weight,
                 std::vector<float> bias)
      : LinearWeight(in, out), weight_(weight.size()), bias_(std::move(bias)) {
    kernels::cpu::FloatToHalf(weight.data(), weight.size(), weight_.data());
  }

  void Forward(const float* x, int64_t rows, float* y) const override {
    kernels::cpu::MatMulWeightsF16(x, weight_.data(), bias_.empty() ? nullptr : bias_.data(),
                                   rows, out_features(), in_features(), y);
  }
  std::vector<float> DequantizedWeight() const override {
    std::vector<float> out(weight_.size());
    kernels::cpu::HalfToFloat(weight_.data(), weight_.size(), out.data());
    return out;
  }
  const std::vector<float>& bias() const override { return bias_; }
  size_t StorageBytes() const override {
    return weight_.size() * sizeof(uint16_t) + bias_.size() * sizeof(float);
  }
  std::string StorageName() const override { return "f16"; }

 private:
  std::vector<uint16_t> weight_;
  std::vector<float> bias_;
};

}  // namespace

std::unique_ptr<LinearWeight> MakeDenseLinear(int64_t in_features, int64_t out_features,
                                              std::vector<float> weight,
                                              std::vector<float> bias, WeightStorage storage) {
  if (storage == WeightStorage::kF16) {
    return std::make_unique<DenseF16Linear>(in_features, out_features, weight, std::move(bias));
  }
  return std::make_unique<DenseF32Linear>(in_features, out_features, std::move(weight),
                                          std::move(bias));
}

}  // namespace nibble::engine
