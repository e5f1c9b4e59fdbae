// Where the integration tests find their inputs: ctest sets these variables (tests/CMakeLists).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/model.h"
#include "tests/testing/test_support.h"

namespace nibble::testing {

inline std::string TestModel(const std::string& name) {
  return RequiredEnv("NIBBLE_TEST_MODELS") + "/" + name;
}

inline nlohmann::json ReadJson(const std::string& path) {
  return nlohmann::json::parse(ReadFile(path));
}

inline nlohmann::json Golden(const std::string& name) {
  return ReadJson(RequiredEnv("NIBBLE_GOLDEN_DIR") + "/" + name);
}

inline std::unique_ptr<engine::Model> LoadOrDie(
    const std::string& dir, engine::WeightStorage storage = engine::WeightStorage::kF32) {
  engine::ModelLoadOptions options;
  options.weight_storage = storage;
  auto model = engine::Model::Load(dir, options);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(model).value() : nullptr;
}

// Logits of every position of `tokens`, run from an empty cache in one forward call.
inline std::vector<float> AllLogits(engine::Model& model, const std::vector<int32_t>& tokens) {
  auto sequence = model.backend().NewSequence(static_cast<int64_t>(tokens.size()));
  EXPECT_TRUE(sequence.ok()) << sequence.status();
  std::vector<float> logits;
  EXPECT_TRUE(model.backend()
                  .Forward(**sequence, tokens, engine::LogitsFor::kAllPositions, logits)
                  .ok());
  return logits;
}

// max |a - b| / max |b|: the relative error measure every comparison here states.
inline double RelativeError(const std::vector<float>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(static_cast<double>(a[i]) - b[i]));
    max_ref = std::max(max_ref, std::abs(b[i]));
  }
  return max_ref > 0 ? max_diff / max_ref : max_diff;
}

inline double RelativeError(const std::vector<float>& a, const std::vector<float>& b) {
  return RelativeError(a, std::vector<double>(b.begin(), b.end()));
}

// The reference's float64 logits of ProbeTokens() for test model `name`, flattened (written
// by tests/reference/reference.py logits, a ctest fixture).
inline std::vector<double> ReferenceLogits(const std::string& name) {
  const auto json = ReadJson(TestModel(name + "_reference_logits.json"));
  std::vector<double> flat;
  for (const auto& row : json["logits"]) {
    for (double v : row) flat.push_back(v);
  }
  return flat;
}

// The golden token sequence used by the layout comparisons (BOS + the story's start).
inline const std::vector<int32_t>& ProbeTokens() {
  static const std::vector<int32_t> tokens = {1,   403, 407, 261, 378, 432, 383,
                                              286, 261, 376, 298, 315, 421};
  return tokens;
}

}  // namespace nibble::testing
