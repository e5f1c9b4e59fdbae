#include "engine/linear.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/int4_weight.h"
#include "kernels/cpu/half.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/w4a16.h"

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
  void Row(int64_t index, float* out) const override {
    std::memcpy(out, weight_.data() + index * in_features(),
                static_cast<size_t>(in_features()) * sizeof(float));
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

// fp16 weights, owned or borrowed from a file mapping (then `owner_` keeps it alive).
class DenseF16Linear final : public LinearWeight {
 public:
  DenseF16Linear(int64_t in, int64_t out, const std::vector<float>& weight,
                 std::vector<float> bias)
      : LinearWeight(in, out), owned_(weight.size()), bias_(std::move(bias)) {
    kernels::cpu::FloatToHalfBulk(weight.data(), weight.size(), owned_.data());
    weight_ = owned_.data();
  }
  DenseF16Linear(int64_t in, int64_t out, std::shared_ptr<const void> owner,
                 const uint16_t* weight)
      : LinearWeight(in, out), weight_(weight), owner_(std::move(owner)) {}

  void Forward(const float* x, int64_t rows, float* y) const override {
    kernels::cpu::MatMulWeightsF16(x, weight_, bias_.empty() ? nullptr : bias_.data(), rows,
                                   out_features(), in_features(), y);
  }
  void Row(int64_t index, float* out) const override {
    kernels::cpu::HalfToFloat(weight_ + index * in_features(),
                              static_cast<size_t>(in_features()), out);
  }
  std::vector<float> DequantizedWeight() const override {
    std::vector<float> out(static_cast<size_t>(in_features() * out_features()));
    kernels::cpu::HalfToFloatBulk(weight_, out.size(), out.data());
    return out;
  }
  const std::vector<float>& bias() const override { return bias_; }
  size_t StorageBytes() const override {
    return static_cast<size_t>(in_features() * out_features()) * sizeof(uint16_t) +
           bias_.size() * sizeof(float);
  }
  std::string StorageName() const override { return owner_ ? "f16-mapped" : "f16"; }

 private:
  std::vector<uint16_t> owned_;
  const uint16_t* weight_ = nullptr;  // owned_.data() or within the mapping
  std::shared_ptr<const void> owner_;
  std::vector<float> bias_;
};

class Int4Linear final : public LinearWeight {
 public:
  Int4Linear(const Int4Weight& w, std::vector<float> bias)
      : LinearWeight(w.in_features, w.out_features),
        group_size_(w.group_size),
        packed_(static_cast<size_t>(w.out_features * ((w.in_features + 1) / 2)), 0),
        zeros_(w.zeros),
        scales_(w.scales),
        bias_(std::move(bias)) {
    const int64_t row_bytes = (w.in_features + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < w.out_features; ++n) {
      for (int64_t k = 0; k < w.in_features; ++k) {
        packed_[n * row_bytes + k / 2] |=
            static_cast<uint8_t>(w.q[n * w.in_features + k] << (4 * (k & 1)));
      }
    }
  }

  void Forward(const float* x, int64_t rows, float* y) const override {
    kernels::cpu::MatMulW4A16(x, packed_.data(), zeros_.data(), scales_.data(),
                              bias_.empty() ? nullptr : bias_.data(), rows, out_features(),
                              in_features(), group_size_, y);
  }
  void Row(int64_t index, float* out) const override {
    kernels::cpu::DequantizeW4Row(packed_.data(), zeros_.data(), scales_.data(), index,
                                  in_features(), group_size_, out);
  }
  std::vector<float> DequantizedWeight() const override {
    std::vector<float> w(static_cast<size_t>(in_features() * out_features()));
    for (int64_t n = 0; n < out_features(); ++n) {
      kernels::cpu::DequantizeW4Row(packed_.data(), zeros_.data(), scales_.data(), n,
                                    in_features(), group_size_, w.data() + n * in_features());
    }
    return w;
  }
  const std::vector<float>& bias() const override { return bias_; }
  // What is resident: 4 bits a weight, a byte of zero point and an fp16 scale a group.
  size_t StorageBytes() const override {
    return packed_.size() + zeros_.size() + scales_.size() * sizeof(uint16_t) +
           bias_.size() * sizeof(float);
  }
  std::string StorageName() const override { return absl::StrCat("int4-g", group_size_); }
  std::optional<Int4Weight> Int4() const override {
    Int4Weight w;
    w.in_features = in_features();
    w.out_features = out_features();
    w.group_size = group_size_;
    w.q.resize(static_cast<size_t>(in_features() * out_features()));
    const int64_t row_bytes = (in_features() + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < out_features(); ++n) {
      for (int64_t k = 0; k < in_features(); ++k) {
        w.q[n * in_features() + k] = (packed_[n * row_bytes + k / 2] >> (4 * (k & 1))) & 15;
      }
    }
    w.zeros = zeros_;
    w.scales = scales_;
    return w;
  }

 private:
  int64_t group_size_;
  std::vector<uint8_t> packed_;   // [out, ceil(in / 2)]
  std::vector<uint8_t> zeros_;    // [out, groups], 0..15
  std::vector<uint16_t> scales_;  // [out, groups], fp16 bits
  std::vector<float> bias_;
};

}  // namespace

std::unique_ptr<LinearWeight> MakeInt4Linear(const Int4Weight& weight, std::vector<float> bias) {
  return std::make_unique<Int4Linear>(weight, std::move(bias));
}

std::unique_ptr<LinearWeight> MakeMappedF16Linear(int64_t in_features, int64_t out_features,
                                                  std::shared_ptr<const void> mapping,
                                                  const uint16_t* weight) {
  return std::make_unique<DenseF16Linear>(in_features, out_features, std::move(mapping), weight);
}

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
