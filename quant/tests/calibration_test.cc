// Calibration input of `nibble quantize`: dataset names resolved against the real files in
// shared/datasets ($NIBBLE_SHARED_DIR, set by ctest), and the seeded draw of non-overlapping
// token windows on synthetic id streams (tokenization is not needed to test the draw).
#include "quant/calibration.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "tests/testing/test_support.h"

namespace nibble::quant {
namespace {

using ::testing::HasSubstr;

std::string DatasetsDir() { return ::nibble::testing::SharedDir() + "/datasets"; }

std::vector<int32_t> Iota(int64_t n) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), 0);
  return ids;
}

// Sets (or unsets, for nullopt) an environment variable for the scope, then restores it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) {
      ::setenv(name, value->c_str(), 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      ::setenv(name_, old_->c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(ResolveCalibrationFileTest, NamesResolveToTheSharedFiles) {
  const std::string dir = DatasetsDir();
  ASSERT_FALSE(::nibble::testing::SharedDir().empty());
  struct Case {
    const char* name;
    const char* relative;
  };
  for (const Case& c : {Case{"ptb", "ptb/ptb.valid.txt"},
                        Case{"wikitext2", "wikitext-2/wiki.test.raw"},
                        Case{"tinystories", "tinystories/train-head.txt"}}) {
    auto path = ResolveCalibrationFile(c.name, dir);
    ASSERT_TRUE(path.ok()) << c.name << ": " << path.status();
    EXPECT_EQ(std::filesystem::path(*path), std::filesystem::path(dir) / c.relative) << c.name;
    EXPECT_TRUE(std::filesystem::is_regular_file(*path)) << *path;
    EXPECT_GT(std::filesystem::file_size(*path), 1000u) << *path;
  }
}

TEST(ResolveCalibrationFileTest, PtbUsesTheValidationSplitNotTheTestSplit) {
  auto path = ResolveCalibrationFile("ptb", DatasetsDir());
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_THAT(*path, HasSubstr("ptb.valid.txt"));
}

TEST(ResolveCalibrationFileTest, AnyOtherNameIsAFilePath) {
  const std::string file = DatasetsDir() + "/tinystories/sample.txt";
  // The datasets directory plays no part for a path.
  auto path = ResolveCalibrationFile(file, "/nonexistent-datasets-dir");
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, file);
  const std::string text = ::nibble::testing::ReadFile(*path);
  EXPECT_THAT(text, HasSubstr("Once upon a time"));
}

TEST(ResolveCalibrationFileTest, MissingNamedDatasetSaysWhereItLookedAndHowToFix) {
  auto path = ResolveCalibrationFile("ptb", "/nonexistent-datasets-dir");
  ASSERT_FALSE(path.ok());
  EXPECT_EQ(path.status().code(), absl::StatusCode::kNotFound);
  const std::string msg(path.status().message());
  EXPECT_THAT(msg, HasSubstr("'ptb'"));
  EXPECT_THAT(msg, HasSubstr("/nonexistent-datasets-dir/ptb/ptb.valid.txt"));
  EXPECT_THAT(msg, HasSubstr("--datasets-dir"));
  EXPECT_THAT(msg, HasSubstr("NIBBLE_DATASETS_DIR"));
}

TEST(ResolveCalibrationFileTest, MissingPathSaysItIsNeitherANameNorAFile) {
  auto path = ResolveCalibrationFile("c4", DatasetsDir());
  ASSERT_FALSE(path.ok());
  EXPECT_EQ(path.status().code(), absl::StatusCode::kNotFound);
  const std::string msg(path.status().message());
  EXPECT_THAT(msg, HasSubstr("'c4'"));
  EXPECT_THAT(msg, HasSubstr("ptb, wikitext2, tinystories"));
  EXPECT_THAT(msg, HasSubstr("--datasets-dir"));
}

TEST(ResolveCalibrationFileTest, ADirectoryIsNotAFile) {
  auto path = ResolveCalibrationFile(DatasetsDir() + "/ptb", DatasetsDir());
  ASSERT_FALSE(path.ok());
  EXPECT_EQ(path.status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(ResolveCalibrationFile("", DatasetsDir()).ok());
}

TEST(DefaultDatasetsDirTest, EnvironmentOrder) {
  {
    ScopedEnv a("NIBBLE_DATASETS_DIR", "/data/sets");
    ScopedEnv b("XDG_DATA_HOME", "/xdg");
    EXPECT_EQ(DefaultDatasetsDir(), "/data/sets");
  }
  {
    ScopedEnv a("NIBBLE_DATASETS_DIR", std::nullopt);
    ScopedEnv b("XDG_DATA_HOME", "/xdg");
    EXPECT_EQ(DefaultDatasetsDir(), "/xdg/nibble/datasets");
  }
  {
    ScopedEnv a("NIBBLE_DATASETS_DIR", "");
    ScopedEnv b("XDG_DATA_HOME", std::nullopt);
    ScopedEnv c("HOME", "/home/u");
    EXPECT_EQ(DefaultDatasetsDir(), "/home/u/.local/share/nibble/datasets");
  }
}

TEST(DrawCalibrationSamplesTest, SameSeedSameSamplesDifferentSeedDifferent) {
  const auto ids = Iota(100000);
  CalibrationOptions o{.samples = 16, .seqlen = 512, .seed = 7};
  auto a = DrawCalibrationSamples(ids, o, 2048);
  auto b = DrawCalibrationSamples(ids, o, 2048);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->samples, b->samples);
  o.seed = 8;
  auto c = DrawCalibrationSamples(ids, o, 2048);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_NE(a->samples, c->samples);
  EXPECT_FALSE(a->adjustments.empty());
  EXPECT_THAT(a->adjustments[0], HasSubstr("16 of 195"));
}

TEST(DrawCalibrationSamplesTest, WindowsAreDisjointRealSlicesInTextOrder) {
  // Ids with a repeated pattern would hide a wrong offset, so use distinct values.
  const auto ids = Iota(50000 + 123);
  const int64_t seqlen = 300;
  for (uint64_t seed : {0ull, 1ull, 42ull, 0xdeadbeefull}) {
    auto set = DrawCalibrationSamples(ids, {.samples = 100, .seqlen = seqlen, .seed = seed}, 4096);
    ASSERT_TRUE(set.ok()) << set.status();
    ASSERT_EQ(set->samples.size(), 100u);
    std::set<int32_t> seen;
    int32_t previous_start = -1;
    for (const auto& s : set->samples) {
      ASSERT_EQ(static_cast<int64_t>(s.size()), seqlen);
      const int32_t start = s.front();
      EXPECT_EQ(start % seqlen, 0) << "windows sit on slot boundaries";
      EXPECT_GT(start, previous_start) << "slot order";
      previous_start = start;
      for (int64_t k = 0; k < seqlen; ++k) {
        ASSERT_EQ(s[static_cast<size_t>(k)], ids[static_cast<size_t>(start + k)]);
        EXPECT_TRUE(seen.insert(s[static_cast<size_t>(k)]).second) << "overlap at " << start + k;
      }
    }
  }
}

TEST(DrawCalibrationSamplesTest, RealTextBytesAsIds) {
  // One real file, its bytes standing in for token ids: the draw is a slice of that text.
  auto path = ResolveCalibrationFile("tinystories", DatasetsDir());
  ASSERT_TRUE(path.ok()) << path.status();
  const std::string text = ::nibble::testing::ReadFile(*path);
  std::vector<int32_t> ids(text.begin(), text.end());
  auto set = DrawCalibrationSamples(ids, {.samples = 8, .seqlen = 256, .seed = 3}, 512);
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ(set->samples.size(), 8u);
  for (const auto& s : set->samples) {
    const std::string window(s.begin(), s.end());
    EXPECT_NE(text.find(window), std::string::npos);
  }
}

TEST(DrawCalibrationSamplesTest, AllSlotsTakenIsNotedAndSeedIndependent) {
  const auto ids = Iota(1000 + 17);
  auto a = DrawCalibrationSamples(ids, {.samples = 10, .seqlen = 100, .seed = 1}, 100);
  auto b = DrawCalibrationSamples(ids, {.samples = 10, .seqlen = 100, .seed = 2}, 100);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->samples, b->samples);
  std::string notes;
  for (const auto& n : a->adjustments) notes += n + "\n";
  EXPECT_THAT(notes, HasSubstr("every window"));
  EXPECT_THAT(notes, HasSubstr("last 17 tokens"));
}

TEST(DrawCalibrationSamplesTest, TooManySamplesSaysWhatTheTextHolds) {
  const auto ids = Iota(10000);
  auto set = DrawCalibrationSamples(ids, {.samples = 128, .seqlen = 2048, .seed = 0}, 4096);
  ASSERT_FALSE(set.ok());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(set.status().message());
  EXPECT_THAT(msg, HasSubstr("10000 tokens"));
  EXPECT_THAT(msg, HasSubstr("4 non-overlapping samples of 2048"));
  EXPECT_THAT(msg, HasSubstr("128"));
}

TEST(DrawCalibrationSamplesTest, SeqlenBeyondContextNamesBoth) {
  const auto ids = Iota(100000);
  auto set = DrawCalibrationSamples(ids, {.samples = 4, .seqlen = 2048, .seed = 0}, 512);
  ASSERT_FALSE(set.ok());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(set.status().message());
  EXPECT_THAT(msg, HasSubstr("2048"));
  EXPECT_THAT(msg, HasSubstr("512"));
  EXPECT_THAT(msg, HasSubstr("context"));
}

TEST(DrawCalibrationSamplesTest, DegenerateOptionsAreRejected) {
  const auto ids = Iota(1000);
  for (const CalibrationOptions& o :
       {CalibrationOptions{.samples = 0, .seqlen = 10},
        CalibrationOptions{.samples = -1, .seqlen = 10},
        CalibrationOptions{.samples = 1, .seqlen = 1},
        CalibrationOptions{.samples = 1, .seqlen = 0}}) {
    auto set = DrawCalibrationSamples(ids, o, 100);
    ASSERT_FALSE(set.ok()) << o.samples << " x " << o.seqlen;
    EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_FALSE(DrawCalibrationSamples({}, {.samples = 1, .seqlen = 2}, 10).ok());
}

}  // namespace
}  // namespace nibble::quant
