// QuantizeModelDirectory's progress and stop check (quant::QuantizeControl), on the real
// stories260K model: the phases in order, a stop between layers that leaves a checkpoint a
// later run resumes to the same bytes, and a stop while packing that leaves no artifact.
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include <gtest/gtest.h>

#include "quant/manifest.h"
#include "quant/quantize_model.h"

namespace nibble::quant {
namespace {

namespace fs = std::filesystem;

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

class QuantizeControlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = std::string(NIBBLE_TEST_MODELS) + "/stories260K";
    ASSERT_TRUE(fs::exists(model_ + "/config.json")) << model_;
    tmp_ = fs::temp_directory_path() / ("nibble-quantize-control-" + std::to_string(::getpid()));
    fs::remove_all(tmp_);
    fs::create_directories(tmp_);
    // Calibration windows are token ids: any in the vocabulary will do for the search.
    std::mt19937 rng(7);
    options_.method = QuantMethod::kAwq;
    options_.group_size = 32;
    for (int s = 0; s < 4; ++s) {
      std::vector<int32_t> window(64);
      for (int32_t& id : window) id = static_cast<int32_t>(rng() % 512);
      options_.calibration_samples.push_back(window);
    }
  }
  void TearDown() override { fs::remove_all(tmp_); }

  // Runs the job again in `work` and expects it to resume after `layers_done` layers (never
  // calibrating an earlier one) and to write the bytes of the uninterrupted run in `whole`.
  void ExpectResumedToSameBytes(const std::string& work, const std::string& whole,
                                int64_t layers_done) {
    std::vector<QuantizeProgress> events;
    QuantizeControl resume;
    resume.progress = [&](const QuantizeProgress& p) { events.push_back(p); };
    ASSERT_TRUE(QuantizeModelDirectory(model_, work, options_, resume).ok());
    ASSERT_FALSE(events.empty());
    EXPECT_TRUE(events.front().resumed);
    EXPECT_EQ(events.front().layers_done, layers_done);  // it did not start over
    for (const QuantizeProgress& p : events) {
      if (p.phase == "calibrate") {
        EXPECT_GE(p.layer, layers_done);
      }
    }
    for (const char* file : {"model.safetensors", "config.json", "tokenizer.model"}) {
      EXPECT_EQ(ReadAll(whole + "/" + file), ReadAll(work + "/" + file)) << file;
    }
    EXPECT_TRUE(VerifyArtifact(work).ok());
  }

  std::string model_;
  fs::path tmp_;
  QuantizeOptions options_;
};

TEST_F(QuantizeControlTest, ReportsEveryPhaseInOrder) {
  options_.evaluation_ids.assign(options_.calibration_samples[0].begin(),
                                 options_.calibration_samples[0].end());
  options_.evaluation_window = 32;
  std::vector<QuantizeProgress> events;
  QuantizeControl control;
  control.progress = [&](const QuantizeProgress& p) { events.push_back(p); };
  auto report = QuantizeModelDirectory(model_, (tmp_ / "out").string(), options_, control);
  ASSERT_TRUE(report.ok()) << report.status();
  std::vector<std::string> phases;
  for (const QuantizeProgress& p : events) {
    if (phases.empty() || phases.back() != p.phase) phases.push_back(p.phase);
    EXPECT_EQ(p.layers, 5);
    EXPECT_FALSE(p.resumed);
  }
  // calibrate and search alternate per layer; then packing, the safetensors, the evaluation
  // and the manifest.
  std::vector<std::string> expected;
  for (int l = 0; l < 5; ++l) {
    expected.push_back("calibrate");
    expected.push_back("search");
  }
  for (const char* phase : {"quantize", "write", "evaluate", "write"}) expected.push_back(phase);
  EXPECT_EQ(phases, expected);
  int64_t layer_done_events = 0;
  for (const QuantizeProgress& p : events) {
    if (p.step != "layer done") continue;
    EXPECT_EQ(p.layers_done, p.layer + 1);
    ++layer_done_events;
  }
  EXPECT_EQ(layer_done_events, 5);
  EXPECT_EQ(events.back().layers_done, 5);
  const QuantizeProgress* last_tensor = nullptr;
  for (const QuantizeProgress& p : events) {
    if (p.phase == "quantize") last_tensor = &p;
  }
  ASSERT_NE(last_tensor, nullptr);
  EXPECT_EQ(last_tensor->tensors_done, last_tensor->tensors_total);
}

TEST_F(QuantizeControlTest, StopBetweenLayersResumesToTheSameBytes) {
  const std::string whole = (tmp_ / "whole").string();
  ASSERT_TRUE(QuantizeModelDirectory(model_, whole, options_, QuantizeControl{}).ok());

  const std::string work = (tmp_ / "stopped").string();
  bool stop = false;
  QuantizeControl control;
  control.progress = [&](const QuantizeProgress& p) {
    if (p.step == "layer done" && p.layers_done == 2) stop = true;
  };
  control.stop_requested = [&] { return stop; };
  auto stopped = QuantizeModelDirectory(model_, work, options_, control);
  ASSERT_EQ(stopped.status().code(), absl::StatusCode::kCancelled) << stopped.status();
  EXPECT_FALSE(fs::exists(work + "/" + kManifestFileName));
  EXPECT_FALSE(fs::exists(work + "/model.safetensors"));
  EXPECT_NE(ReadAll(work + "/.nibble-job/progress.json").find("\"completed_layers\":2"),
            std::string::npos);

  ExpectResumedToSameBytes(work, whole, 2);
}

// A crash after a layer's states file was renamed into place but before progress.json was
// (the state a stop after 3 layers leaves, with progress.json put back to 2): the states name
// the layers they follow, so the resume counts layer 3 as done and still writes the bytes of
// an uninterrupted run. States that fit neither count are refused by name.
TEST_F(QuantizeControlTest, CrashBetweenStatesAndProgressResumesToTheSameBytes) {
  const std::string whole = (tmp_ / "whole").string();
  ASSERT_TRUE(QuantizeModelDirectory(model_, whole, options_, QuantizeControl{}).ok());
  auto stop_after = [&](const std::string& work, int64_t layers) {
    bool stop = false;
    QuantizeControl control;
    control.progress = [&](const QuantizeProgress& p) {
      if (p.step == "layer done" && p.layers_done == layers) stop = true;
    };
    control.stop_requested = [&] { return stop; };
    return QuantizeModelDirectory(model_, work, options_, control).status();
  };
  auto set_progress = [](const std::string& work, int64_t layers) {
    std::ofstream(work + "/.nibble-job/progress.json", std::ios::trunc)
        << "{\"completed_layers\":" << layers << "}";
  };

  const std::string work = (tmp_ / "crashed").string();
  ASSERT_EQ(stop_after(work, 3).code(), absl::StatusCode::kCancelled);
  set_progress(work, 2);
  ExpectResumedToSameBytes(work, whole, 3);

  const std::string torn = (tmp_ / "torn").string();
  ASSERT_EQ(stop_after(torn, 3).code(), absl::StatusCode::kCancelled);
  set_progress(torn, 1);
  const absl::Status refused = QuantizeModelDirectory(model_, torn, options_, QuantizeControl{}).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kDataLoss) << refused;
  EXPECT_NE(refused.message().find("states after 3 layers"), std::string::npos) << refused;
}

TEST_F(QuantizeControlTest, StopWhilePackingLeavesNoArtifact) {
  options_.method = QuantMethod::kRtn;
  options_.calibration_samples.clear();
  const std::string work = (tmp_ / "rtn").string();
  int64_t tensors = 0;
  QuantizeControl control;
  control.progress = [&](const QuantizeProgress& p) {
    if (p.phase == "quantize") tensors = p.tensors_done;
  };
  control.stop_requested = [&] { return tensors >= 3; };
  auto stopped = QuantizeModelDirectory(model_, work, options_, control);
  ASSERT_EQ(stopped.status().code(), absl::StatusCode::kCancelled) << stopped.status();
  EXPECT_EQ(tensors, 3);
  EXPECT_FALSE(fs::exists(work + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(work + "/" + kManifestFileName));
}

}  // namespace
}  // namespace nibble::quant
