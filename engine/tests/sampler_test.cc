// The sampler against independent computations: argmax by a plain loop, the sampled
// distribution against a softmax computed here in long double (per-bin bounds of five
// standard errors and a chi-square bound, on a fixed seed so the test is deterministic), the
// repetition penalty against the CTRL / Hugging Face rule written out by hand.
#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace nibble::engine {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

SamplingParams Params(float temperature, int32_t top_k = 0, float top_p = 1.0f,
                      float penalty = 1.0f, uint64_t seed = 0) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.repetition_penalty = penalty;
  p.seed = seed;
  return p;
}

// Sample works on a copy: it may modify the logits in place.
int32_t SampleCopy(Sampler& sampler, const std::vector<float>& logits,
                   const std::vector<int32_t>& previous = {}) {
  std::vector<float> copy = logits;
  return sampler.Sample(copy, previous);
}

// softmax(logits / temperature) restricted to `allowed` ids, renormalized; long double.
std::vector<double> ExpectedProbabilities(const std::vector<float>& logits, double temperature,
                                          const std::vector<int32_t>& allowed) {
  long double max_logit = -INFINITY;
  for (int32_t id : allowed) max_logit = std::max<long double>(max_logit, logits[id]);
  std::vector<long double> weight(logits.size(), 0.0L);
  long double total = 0;
  for (int32_t id : allowed) {
    weight[id] = std::exp((static_cast<long double>(logits[id]) - max_logit) / temperature);
    total += weight[id];
  }
  std::vector<double> p(logits.size());
  for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<double>(weight[i] / total);
  return p;
}

std::vector<int32_t> AllIds(size_t n) {
  std::vector<int32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  return ids;
}

// Draws `draws` samples and checks the frequencies against `expected`: each bin within five
// standard errors (plus one count), ids of probability 0 never drawn, and Pearson's
// chi-square below its mean + 6 standard deviations (df + 6·sqrt(2·df)).
void ExpectFrequencies(Sampler& sampler, const std::vector<float>& logits,
                       const std::vector<double>& expected, int draws,
                       const std::vector<int32_t>& previous = {}) {
  std::vector<int64_t> counts(logits.size(), 0);
  for (int i = 0; i < draws; ++i) {
    const int32_t id = SampleCopy(sampler, logits, previous);
    ASSERT_GE(id, 0);
    ASSERT_LT(id, static_cast<int32_t>(logits.size()));
    ++counts[id];
  }
  double chi_square = 0;
  int bins = 0;
  for (size_t id = 0; id < logits.size(); ++id) {
    const double mean = expected[id] * draws;
    if (expected[id] == 0) {
      EXPECT_EQ(counts[id], 0) << "id " << id << " has probability 0";
      continue;
    }
    const double sd = std::sqrt(draws * expected[id] * (1 - expected[id]));
    EXPECT_NEAR(static_cast<double>(counts[id]), mean, 5 * sd + 1)
        << "id " << id << " expected p " << expected[id] << ", observed "
        << static_cast<double>(counts[id]) / draws;
    chi_square += (counts[id] - mean) * (counts[id] - mean) / mean;
    ++bins;
  }
  if (bins > 1) {
    const double df = bins - 1;
    EXPECT_LT(chi_square, df + 6 * std::sqrt(2 * df)) << "df " << df;
  }
}

// ---------------------------------------------------------------------------------------
// Validation

TEST(SamplerValidationTest, AcceptsDefaultsAndEdges) {
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}).ok());
  EXPECT_TRUE(ValidateSamplingParams(Params(0.0f, 0, 1.0f, 1.0f)).ok());
  EXPECT_TRUE(ValidateSamplingParams(Params(2.0f, 40, 0.01f, 1.3f)).ok());
  EXPECT_TRUE(ValidateSamplingParams(Params(1e-3f, 1, 1.0f, 0.5f)).ok());
}

TEST(SamplerValidationTest, RejectsOutOfRangeValuesNamingTheField) {
  struct Case {
    SamplingParams params;
    std::string field;
  };
  const std::vector<Case> cases = {
      {Params(-0.1f), "temperature"},
      {Params(-kInf), "temperature"},
      {Params(kNaN), "temperature"},
      {Params(kInf), "temperature"},
      {Params(1.0f, -1), "top_k"},
      {Params(1.0f, 0, 0.0f), "top_p"},
      {Params(1.0f, 0, -0.5f), "top_p"},
      {Params(1.0f, 0, 1.5f), "top_p"},
      {Params(1.0f, 0, 1.0000001f), "top_p"},
      {Params(1.0f, 0, kNaN), "top_p"},
      {Params(1.0f, 0, 1.0f, 0.0f), "repetition_penalty"},
      {Params(1.0f, 0, 1.0f, -1.0f), "repetition_penalty"},
      {Params(1.0f, 0, 1.0f, kNaN), "repetition_penalty"},
      {Params(1.0f, 0, 1.0f, kInf), "repetition_penalty"},
  };
  for (const Case& c : cases) {
    const absl::Status status = ValidateSamplingParams(c.params);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.field << ": " << status;
    EXPECT_NE(std::string(status.message()).find(c.field), std::string::npos)
        << "message should name " << c.field << ": " << status.message();
  }
}

// ---------------------------------------------------------------------------------------
// Greedy

TEST(SamplerTest, GreedyIsArgmaxWithLowestIdOnTies) {
  Sampler sampler(Params(0.0f));
  EXPECT_EQ(SampleCopy(sampler, {1.0f, 3.0f, 3.0f, 2.0f}), 1);
  EXPECT_EQ(SampleCopy(sampler, {5.0f, 5.0f}), 0);
  EXPECT_EQ(SampleCopy(sampler, {-3.0f, -1.0f, -2.0f}), 1);
  EXPECT_EQ(SampleCopy(sampler, {-kInf, -kInf, 0.0f, -kInf}), 2);
  EXPECT_EQ(SampleCopy(sampler, {7.0f}), 0);
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> small(-5, 5);  // many ties
  for (int trial = 0; trial < 1000; ++trial) {
    std::vector<float> logits(1 + trial % 50);
    for (float& v : logits) v = static_cast<float>(small(rng));
    int32_t best = 0;
    for (int32_t i = 1; i < static_cast<int32_t>(logits.size()); ++i) {
      if (logits[i] > logits[best]) best = i;
    }
    ASSERT_EQ(SampleCopy(sampler, logits), best) << "trial " << trial;
  }
}

TEST(SamplerTest, GreedyIgnoresSeedTopKAndTopP) {
  const std::vector<float> logits = {0.5f, 2.0f, 1.9f, -1.0f};
  for (uint64_t seed : {0u, 1u, 99u}) {
    Sampler sampler(Params(0.0f, 3, 0.5f, 1.0f, seed));
    for (int i = 0; i < 10; ++i) EXPECT_EQ(SampleCopy(sampler, logits), 1);
  }
}

// ---------------------------------------------------------------------------------------
// Reproducibility

std::vector<int32_t> Draw(const SamplingParams& params, const std::vector<float>& logits,
                          int n) {
  Sampler sampler(params);
  std::vector<int32_t> ids;
  for (int i = 0; i < n; ++i) ids.push_back(SampleCopy(sampler, logits));
  return ids;
}

TEST(SamplerTest, SameSeedSameSequenceDifferentSeedDifferentSequence) {
  std::vector<float> logits(50);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(static_cast<float>(i));
  const std::vector<int32_t> a = Draw(Params(1.0f, 0, 1.0f, 1.0f, 42), logits, 200);
  const std::vector<int32_t> b = Draw(Params(1.0f, 0, 1.0f, 1.0f, 42), logits, 200);
  const std::vector<int32_t> c = Draw(Params(1.0f, 0, 1.0f, 1.0f, 43), logits, 200);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  // Not a constant stream: 200 draws over 50 near-uniform ids hit many of them.
  EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 20u);
  // With top-k and top-p too.
  EXPECT_EQ(Draw(Params(0.7f, 10, 0.9f, 1.0f, 7), logits, 200),
            Draw(Params(0.7f, 10, 0.9f, 1.0f, 7), logits, 200));
  EXPECT_NE(Draw(Params(0.7f, 10, 0.9f, 1.0f, 7), logits, 200),
            Draw(Params(0.7f, 10, 0.9f, 1.0f, 8), logits, 200));
}

TEST(SamplerTest, StreamIsTheTopBitsOfMt19937_64) {
  // The header promises a platform-independent stream: u = (mt19937_64() >> 11) · 2^-53,
  // then the first id whose cumulative probability exceeds u. With two equally likely ids
  // the choice is exactly u >= 0.5, which we recompute from the standard engine here.
  const uint64_t seed = 12345;
  std::mt19937_64 engine(seed);
  Sampler sampler(Params(1.0f, 0, 1.0f, 1.0f, seed));
  for (int i = 0; i < 1000; ++i) {
    const double u = static_cast<double>(engine() >> 11) * 0x1.0p-53;
    ASSERT_EQ(SampleCopy(sampler, {0.25f, 0.25f}), u < 0.5 ? 0 : 1) << "draw " << i;
  }
}

// ---------------------------------------------------------------------------------------
// Top-k and top-p

TEST(SamplerTest, TopKOneIsArgmaxAtAnyTemperature) {
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  for (float temperature : {0.1f, 1.0f, 100.0f, 1e6f}) {
    Sampler sampler(Params(temperature, 1, 1.0f, 1.0f, 5));
    for (int trial = 0; trial < 500; ++trial) {
      std::vector<float> logits(37);
      for (float& v : logits) v = normal(rng);
      const int32_t best =
          static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      ASSERT_EQ(SampleCopy(sampler, logits), best) << "T " << temperature;
    }
  }
}

TEST(SamplerTest, TopKThreeNeverLeavesTheTopThreeAndMatchesRenormalizedSoftmax) {
  // Ids 4, 9, 2 are the top three; the rest are close behind so a cut-off bug would show.
  std::vector<float> logits = {0.0f, 0.1f, 1.0f, -0.5f, 1.5f, 0.2f, 0.3f, 0.9f, 0.0f, 1.2f};
  {
    Sampler sampler(Params(100.0f, 3, 1.0f, 1.0f, 3));  // nearly flat among the three
    std::set<int32_t> seen;
    for (int i = 0; i < 20000; ++i) {
      const int32_t id = SampleCopy(sampler, logits);
      ASSERT_TRUE(id == 4 || id == 9 || id == 2) << id;
      seen.insert(id);
    }
    EXPECT_EQ(seen.size(), 3u);
  }
  Sampler sampler(Params(1.0f, 3, 1.0f, 1.0f, 4));
  ExpectFrequencies(sampler, logits, ExpectedProbabilities(logits, 1.0, {4, 9, 2}), 100000);
  // top_k larger than the vocabulary keeps everything.
  Sampler all(Params(1.0f, 1000, 1.0f, 1.0f, 6));
  ExpectFrequencies(all, logits, ExpectedProbabilities(logits, 1.0, AllIds(logits.size())),
                    100000);
}

TEST(SamplerTest, TopKTiesAtTheCutKeepTheLowerId) {
  // Logits 3 > 2 = 2 = 2: top_k = 2 keeps id 1 (the lowest of the tied ids), never 2 or 3.
  const std::vector<float> logits = {3.0f, 2.0f, 2.0f, 2.0f};
  Sampler sampler(Params(5.0f, 2, 1.0f, 1.0f, 8));
  std::set<int32_t> seen;
  for (int i = 0; i < 5000; ++i) seen.insert(SampleCopy(sampler, logits));
  EXPECT_EQ(seen, (std::set<int32_t>{0, 1}));
}

TEST(SamplerTest, SmallTopPReturnsOnlyTheTopToken) {
  // The top token has probability ~0.3 only; top_p below that leaves it alone.
  std::vector<float> logits(20);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = 0.1f * static_cast<float>(i % 7);
  logits[13] = 2.2f;
  const double top = ExpectedProbabilities(logits, 1.0, AllIds(logits.size()))[13];
  ASSERT_GT(top, 0.2);
  ASSERT_LT(top, 0.5);
  for (float top_p : {0.01f, 0.2f, static_cast<float>(top) * 0.999f}) {
    Sampler sampler(Params(1.0f, 0, top_p, 1.0f, 9));
    for (int i = 0; i < 5000; ++i) ASSERT_EQ(SampleCopy(sampler, logits), 13) << top_p;
  }
}

TEST(SamplerTest, TopPKeepsTheSmallestPrefixReachingTheMass) {
  // Probabilities 0.5, 0.3, 0.15, 0.05 (ids 2, 0, 3, 1).
  const std::vector<float> logits = {std::log(0.3f), std::log(0.05f), std::log(0.5f),
                                     std::log(0.15f)};
  const std::vector<double> full = ExpectedProbabilities(logits, 1.0, AllIds(4));
  ASSERT_NEAR(full[2], 0.5, 1e-6);
  {
    Sampler sampler(Params(1.0f, 0, 0.75f, 1.0f, 10));  // 0.5 < 0.75 <= 0.8: ids 2, 0
    ExpectFrequencies(sampler, logits, ExpectedProbabilities(logits, 1.0, {2, 0}), 100000);
  }
  {
    Sampler sampler(Params(1.0f, 0, 0.9f, 1.0f, 11));  // 0.8 < 0.9 <= 0.95: ids 2, 0, 3
    ExpectFrequencies(sampler, logits, ExpectedProbabilities(logits, 1.0, {2, 0, 3}), 100000);
  }
  {
    Sampler sampler(Params(1.0f, 0, 0.97f, 1.0f, 12));  // everything
    ExpectFrequencies(sampler, logits, full, 100000);
  }
  {
    // top_k first (ids 2, 0), then top_p of the renormalized pair: 0.5/0.8 = 0.625 < 0.7.
    Sampler sampler(Params(1.0f, 2, 0.7f, 1.0f, 13));
    ExpectFrequencies(sampler, logits, ExpectedProbabilities(logits, 1.0, {2, 0}), 100000);
  }
}

// ---------------------------------------------------------------------------------------
// The distribution

TEST(SamplerTest, TemperatureOneMatchesSoftmax) {
  const std::vector<float> logits = {1.0f, 2.5f, -0.3f, 0.0f, 1.7f, -2.0f, 3.0f, 0.4f, -5.0f};
  Sampler sampler(Params(1.0f, 0, 1.0f, 1.0f, 2024));
  ExpectFrequencies(sampler, logits, ExpectedProbabilities(logits, 1.0, AllIds(logits.size())),
                    200000);
}

TEST(SamplerTest, TemperatureScalesTheLogits) {
  const std::vector<float> logits = {1.0f, 2.5f, -0.3f, 0.0f, 1.7f, 3.0f};
  const std::vector<int32_t> all = AllIds(logits.size());
  for (float temperature : {0.5f, 2.0f, 0.2f}) {
    Sampler sampler(Params(temperature, 0, 1.0f, 1.0f, 77));
    ExpectFrequencies(sampler, logits, ExpectedProbabilities(logits, temperature, all), 100000);
  }
  // And the effect goes the right way: the top id's share grows as the temperature falls.
  auto top_share = [&](float temperature) {
    Sampler sampler(Params(temperature, 0, 1.0f, 1.0f, 78));
    int hits = 0;
    for (int i = 0; i < 20000; ++i) hits += SampleCopy(sampler, logits) == 5;
    return hits;
  };
  EXPECT_LT(top_share(4.0f), top_share(1.0f));
  EXPECT_LT(top_share(1.0f), top_share(0.25f));
}

TEST(SamplerTest, NegativeInfinityLogitsAreNeverSampled) {
  const std::vector<float> logits = {-kInf, 0.0f, -kInf, 1.0f, -kInf};
  Sampler sampler(Params(1.5f, 0, 1.0f, 1.0f, 5));
  ExpectFrequencies(sampler, logits, ExpectedProbabilities(logits, 1.5, {1, 3}), 20000);
}

TEST(SamplerTest, LargeVocabularyMatchesSoftmax) {
  // A Llama-sized vocabulary with a planted head of 20 ids over a normal tail.
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> logits(32000);
  for (float& v : logits) v = normal(rng);
  std::vector<int32_t> head;
  for (int i = 0; i < 20; ++i) {
    head.push_back(i * 997 + 5);
    logits[head.back()] = 6.0f + 0.1f * static_cast<float>(i);
  }
  {
    // top_k = 40: the 40 largest logits, found here by a full sort.
    std::vector<int32_t> by_logit = AllIds(logits.size());
    std::sort(by_logit.begin(), by_logit.end(),
              [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    const std::vector<int32_t> top40(by_logit.begin(), by_logit.begin() + 40);
    Sampler sampler(Params(1.0f, 40, 1.0f, 1.0f, 31));
    ExpectFrequencies(sampler, logits, ExpectedProbabilities(logits, 1.0, top40), 10000);
  }
  {
    // No limit: the head's share of the mass. Few draws: without top_k each draw sorts the
    // whole vocabulary (about 5 ms at 32000 ids).
    const std::vector<double> expected =
        ExpectedProbabilities(logits, 1.0, AllIds(logits.size()));
    double head_mass = 0;
    for (int32_t id : head) head_mass += expected[id];
    ASSERT_GT(head_mass, 0.3);
    ASSERT_LT(head_mass, 0.7);
    Sampler sampler(Params(1.0f, 0, 1.0f, 1.0f, 32));
    const int draws = 300;
    int head_hits = 0;
    for (int i = 0; i < draws; ++i) {
      const int32_t id = SampleCopy(sampler, logits);
      head_hits += std::find(head.begin(), head.end(), id) != head.end();
    }
    EXPECT_NEAR(head_hits, head_mass * draws,
                5 * std::sqrt(draws * head_mass * (1 - head_mass)) + 1);
  }
}

// ---------------------------------------------------------------------------------------
// Repetition penalty

TEST(SamplerTest, RepetitionPenaltyDividesPositiveLogits) {
  // 2.0 / 2 = 1.0 falls below 1.5: the argmax flips from 0 to 1.
  Sampler sampler(Params(0.0f, 0, 1.0f, 2.0f));
  std::vector<float> logits = {2.0f, 1.5f, -1.0f};
  const std::vector<int32_t> previous = {0};
  EXPECT_EQ(sampler.Sample(logits, previous), 1);
  EXPECT_EQ(logits, (std::vector<float>{1.0f, 1.5f, -1.0f}));
  // Without the id in the history nothing changes.
  Sampler untouched(Params(0.0f, 0, 1.0f, 2.0f));
  EXPECT_EQ(SampleCopy(untouched, {2.0f, 1.5f, -1.0f}, {2}), 0);
}

TEST(SamplerTest, RepetitionPenaltyMultipliesNegativeLogits) {
  // -0.6 · 2 = -1.2 falls below -1.0: the argmax flips. Dividing (the wrong rule for negative
  // logits) would give -0.3 and keep id 0.
  Sampler sampler(Params(0.0f, 0, 1.0f, 2.0f));
  std::vector<float> logits = {-0.6f, -1.0f, -3.0f};
  const std::vector<int32_t> previous = {0, 2};
  EXPECT_EQ(sampler.Sample(logits, previous), 1);
  EXPECT_EQ(logits, (std::vector<float>{-1.2f, -1.0f, -6.0f}));
}

TEST(SamplerTest, RepetitionPenaltyAppliesOncePerDistinctId) {
  // Seen three times, id 0 is still penalized once: 2.0 / 2 = 1.0 > 0.9. Compounding would
  // give 0.25 and flip the argmax.
  Sampler sampler(Params(0.0f, 0, 1.0f, 2.0f));
  std::vector<float> logits = {2.0f, 0.9f};
  const std::vector<int32_t> previous = {0, 0, 0};
  EXPECT_EQ(sampler.Sample(logits, previous), 0);
  EXPECT_EQ(logits[0], 1.0f);
}

TEST(SamplerTest, RepetitionPenaltyBelowOneFavoursSeenIds) {
  Sampler sampler(Params(0.0f, 0, 1.0f, 0.5f));
  std::vector<float> logits = {1.0f, 1.5f, -2.0f};
  const std::vector<int32_t> previous = {0, 2};
  EXPECT_EQ(sampler.Sample(logits, previous), 0);  // 1.0 / 0.5 = 2.0 > 1.5
  EXPECT_EQ(logits, (std::vector<float>{2.0f, 1.5f, -1.0f}));
}

TEST(SamplerTest, RepetitionPenaltyIgnoresOutOfRangeIdsAndPenaltyOneIsNoOp) {
  Sampler sampler(Params(0.0f, 0, 1.0f, 3.0f));
  std::vector<float> logits = {2.0f, 1.0f};
  const std::vector<int32_t> previous = {-1, 2, 1000, 1};
  EXPECT_EQ(sampler.Sample(logits, previous), 0);
  EXPECT_EQ(logits, (std::vector<float>{2.0f, 1.0f / 3.0f}));
  Sampler none(Params(0.0f, 0, 1.0f, 1.0f));
  std::vector<float> same = {2.0f, -1.0f};
  const std::vector<int32_t> all = {0, 1};
  EXPECT_EQ(none.Sample(same, all), 0);
  EXPECT_EQ(same, (std::vector<float>{2.0f, -1.0f}));
}

TEST(SamplerTest, RepetitionPenaltyShapesTheSampledDistribution) {
  // When sampling, the penalty acts before temperature and softmax.
  const std::vector<float> logits = {2.0f, 1.0f, -0.5f, 0.3f};
  const std::vector<int32_t> previous = {0, 2, 2};
  const float penalty = 1.5f;
  std::vector<float> penalized = logits;
  penalized[0] = 2.0f / penalty;
  penalized[2] = -0.5f * penalty;
  Sampler sampler(Params(0.8f, 0, 1.0f, penalty, 21));
  ExpectFrequencies(sampler, logits, ExpectedProbabilities(penalized, 0.8, AllIds(4)), 100000,
                    previous);
}

// ---------------------------------------------------------------------------------------
// The split of Sample into the host's draw (NextRow, PenaltyIds) and the rule
// (kernels::cpu::SampleRow) that a GPU backend applies on the device.

struct GoldenCase {
  std::vector<float> logits;
  std::vector<int32_t> previous;
  float temperature;
  int32_t top_k;
  float top_p;
  float penalty;
  uint64_t seed;
};
inline std::vector<GoldenCase> GoldenCases() {
  std::vector<GoldenCase> cases;
  std::mt19937 rng(20261206);
  const int32_t vocabs[] = {1, 7, 50, 1000};
  const float temperatures[] = {0.0f, 0.7f, 1.3f};
  const float top_ps[] = {1.0f, 0.9f, 0.3f};
  const float penalties[] = {1.0f, 1.3f};
  uint64_t seed = 1;
  for (int32_t vocab : vocabs) {
    const int32_t top_ks[] = {0, 1, 5, vocab, vocab + 3};
    for (float t : temperatures)
      for (int32_t k : top_ks)
        for (float p : top_ps)
          for (float pen : penalties) {
            GoldenCase c;
            c.logits.resize(vocab);
            // Raw mt19937 words (the standard fixes them), scaled by hand: the same floats on
            // every platform. Every third case on a grid of 0.5: ties.
            for (float& v : c.logits) {
              v = static_cast<float>(rng() >> 8) * 0x1.0p-24f * 16.0f - 8.0f;
              if (seed % 3 == 0) v = static_cast<float>(static_cast<int>(v * 2)) / 2;
            }
            for (int i = 0; i < 6; ++i) c.previous.push_back(static_cast<int32_t>(rng() % vocab));
            c.temperature = t;
            c.top_k = k;
            c.top_p = p;
            c.penalty = pen;
            c.seed = seed++;
            cases.push_back(std::move(c));
          }
  }
  return cases;
}

// Four tokens drawn in turn from each of GoldenCases() by Sampler::Sample as it was before the
// split (commit 17d93c3, the rule inside the Sampler): a seed's stream must not change.
const int32_t kGoldenTokens[] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 5, 5, 5, 5,
    1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 4, 4, 4, 4, 5, 5, 5, 5, 3, 3, 3, 3,
    0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 6, 6, 6, 6, 1, 1, 1, 1, 0, 0, 0, 0, 5, 5, 5, 5, 5, 5, 5, 5,
    1, 1, 1, 1, 6, 6, 6, 6, 4, 4, 4, 4, 6, 6, 6, 6, 5, 5, 5, 5, 1, 1, 1, 1, 2, 2, 2, 2, 6, 6, 6, 6,
    2, 2, 2, 2, 4, 0, 4, 4, 4, 4, 4, 4, 3, 3, 5, 3, 1, 1, 1, 1, 2, 2, 2, 2, 6, 6, 6, 6, 4, 4, 4, 4,
    6, 6, 6, 6, 3, 3, 3, 3, 0, 0, 0, 0, 5, 5, 5, 5, 1, 5, 5, 5, 1, 1, 2, 6, 0, 0, 0, 0, 2, 2, 5, 2,
    5, 5, 5, 5, 0, 0, 0, 0, 2, 2, 2, 6, 5, 5, 5, 5, 3, 3, 3, 3, 2, 2, 2, 0, 3, 3, 3, 3, 2, 2, 2, 2,
    4, 6, 6, 6, 0, 6, 6, 0, 2, 0, 0, 2, 0, 0, 0, 0, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 2, 2, 5, 5,
    4, 1, 4, 4, 2, 2, 4, 4, 3, 3, 3, 3, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1,
    3, 3, 3, 3, 3, 3, 3, 3, 2, 0, 1, 1, 3, 3, 3, 0, 5, 5, 6, 5, 6, 6, 2, 6, 6, 6, 6, 6, 0, 0, 0, 0,
    2, 4, 2, 2, 4, 4, 2, 2, 1, 0, 5, 0, 6, 6, 6, 1, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 5, 1, 1, 1, 1,
    3, 3, 3, 3, 5, 5, 6, 5, 0, 0, 0, 0, 3, 3, 3, 3, 46, 46, 46, 46, 29, 29, 29, 29, 1, 1, 1, 1, 1, 1, 1, 1,
    6, 6, 6, 6, 41, 41, 41, 41, 31, 31, 31, 31, 42, 42, 42, 42, 23, 23, 23, 23, 24, 24, 24, 24, 42, 42, 42, 42, 32, 32, 32, 32,
    12, 12, 12, 12, 48, 48, 48, 48, 0, 0, 0, 0, 3, 3, 3, 3, 49, 49, 49, 49, 3, 3, 3, 3, 1, 1, 1, 1, 20, 20, 20, 20,
    35, 35, 35, 35, 4, 4, 4, 4, 48, 48, 48, 48, 45, 45, 45, 45, 9, 9, 9, 9, 49, 49, 49, 49, 26, 26, 26, 26, 21, 21, 21, 21,
    22, 22, 22, 22, 43, 43, 43, 43, 43, 43, 20, 20, 31, 47, 36, 37, 41, 48, 41, 48, 11, 14, 11, 14, 33, 33, 33, 33, 13, 13, 13, 13,
    49, 49, 49, 49, 7, 7, 7, 7, 14, 14, 14, 14, 49, 49, 49, 49, 4, 4, 4, 4, 0, 0, 0, 0, 9, 23, 24, 24, 3, 15, 15, 3,
    38, 35, 38, 38, 24, 1, 48, 48, 18, 18, 18, 18, 3, 3, 3, 3, 43, 36, 34, 43, 46, 40, 8, 8, 11, 49, 1, 49, 49, 26, 10, 46,
    45, 45, 45, 36, 8, 11, 11, 8, 17, 17, 17, 17, 26, 26, 27, 26, 22, 3, 21, 41, 17, 23, 32, 23, 11, 11, 11, 11, 29, 29, 29, 29,
    41, 19, 8, 44, 11, 48, 6, 11, 15, 31, 15, 49, 38, 18, 44, 27, 16, 27, 27, 27, 34, 34, 34, 34, 40, 40, 40, 40, 4, 4, 4, 4,
    7, 7, 7, 7, 16, 16, 16, 16, 35, 35, 35, 35, 5, 5, 5, 5, 35, 36, 45, 29, 37, 3, 26, 4, 0, 0, 38, 32, 27, 39, 27, 22,
    31, 7, 7, 31, 2, 8, 8, 8, 16, 12, 32, 20, 23, 27, 27, 27, 18, 18, 18, 6, 2, 43, 39, 35, 24, 24, 41, 24, 3, 21, 21, 3,
    42, 2, 3, 3, 6, 25, 25, 32, 26, 4, 24, 44, 14, 10, 17, 8, 37, 37, 31, 37, 35, 35, 34, 34, 102, 102, 102, 102, 55, 55, 55, 55,
    17, 17, 17, 17, 1, 1, 1, 1, 290, 290, 290, 290, 25, 25, 25, 25, 30, 30, 30, 30, 799, 799, 799, 799, 2, 2, 2, 2, 515, 515, 515, 515,
    931, 931, 931, 931, 33, 33, 33, 33, 160, 160, 160, 160, 779, 779, 779, 779, 106, 106, 106, 106, 70, 70, 70, 70, 901, 901, 901, 901, 20, 20, 20, 20,
    725, 725, 725, 725, 383, 383, 383, 383, 18, 18, 18, 18, 952, 952, 952, 952, 280, 280, 280, 280, 5, 5, 5, 5, 910, 910, 910, 910, 921, 921, 921, 921,
    5, 5, 5, 5, 128, 128, 128, 128, 844, 844, 844, 844, 12, 12, 12, 12, 336, 167, 224, 825, 190, 615, 552, 934, 242, 788, 930, 924, 435, 63, 340, 566,
    635, 372, 143, 679, 144, 524, 104, 100, 69, 69, 69, 69, 995, 995, 995, 995, 54, 54, 54, 54, 146, 146, 146, 146, 143, 143, 143, 143, 22, 22, 22, 22,
    896, 213, 554, 667, 877, 419, 827, 148, 70, 208, 88, 208, 16, 947, 291, 999, 363, 908, 908, 363, 34, 45, 34, 45, 966, 994, 550, 530, 431, 785, 963, 0,
    873, 127, 347, 475, 69, 669, 366, 996, 322, 15, 51, 51, 319, 94, 193, 93, 399, 957, 936, 585, 425, 669, 179, 996, 203, 831, 429, 261, 817, 238, 864, 182,
    437, 303, 930, 956, 236, 142, 330, 236, 446, 448, 283, 247, 253, 541, 67, 913, 215, 686, 898, 663, 905, 128, 173, 842, 404, 923, 203, 606, 213, 294, 201, 400,
    618, 618, 618, 618, 211, 211, 211, 211, 30, 30, 30, 30, 510, 510, 510, 510, 45, 45, 45, 45, 11, 11, 11, 11, 655, 756, 756, 756, 801, 943, 801, 843,
    154, 213, 176, 213, 449, 77, 161, 791, 424, 557, 557, 557, 44, 44, 123, 123, 65, 448, 590, 3, 579, 750, 994, 552, 168, 900, 789, 262, 155, 887, 46, 854,
    417, 459, 460, 55, 615, 187, 762, 295, 23, 10, 251, 550, 368, 840, 825, 995, 889, 603, 392, 754, 772, 778, 896, 251, 496, 607, 496, 563, 266, 395, 208, 738,
};

SamplingParams ParamsOf(const GoldenCase& c) {
  return Params(c.temperature, c.top_k, c.top_p, c.penalty, c.seed);
}

TEST(SamplerSplitTest, SampleKeepsThePreSplitTokensOfEverySeed) {
  const std::vector<GoldenCase> cases = GoldenCases();
  ASSERT_EQ(cases.size() * 4, std::size(kGoldenTokens));
  size_t at = 0;
  for (const GoldenCase& c : cases) {
    Sampler sampler(ParamsOf(c));
    for (int draw = 0; draw < 4; ++draw, ++at) {
      EXPECT_EQ(SampleCopy(sampler, c.logits, c.previous), kGoldenTokens[at])
          << "case seed " << c.seed << " draw " << draw;
    }
  }
}

TEST(SamplerSplitTest, NextRowAndSampleRowGiveSampleOnTheSameDraws) {
  // Two samplers of one seed: one samples, the other hands its row to the pure rule, as the
  // serving engine does for a backend that samples; the streams stay in step.
  size_t at = 0;
  for (const GoldenCase& c : GoldenCases()) {
    Sampler split(ParamsOf(c));
    kernels::cpu::SampleScratch scratch;
    std::vector<int32_t> ids;
    for (int draw = 0; draw < 4; ++draw, ++at) {
      const kernels::SampleRowParams row = split.NextRow();
      EXPECT_EQ(row.temperature, c.temperature);
      EXPECT_EQ(row.top_k, c.top_k);
      EXPECT_EQ(row.top_p, c.top_p);
      EXPECT_EQ(row.repetition_penalty, c.penalty);
      if (c.temperature == 0.0f) {
        EXPECT_EQ(row.u, 0.0);
      }
      split.PenaltyIds(c.previous, static_cast<int64_t>(c.logits.size()), ids);
      std::vector<float> copy = c.logits;
      EXPECT_EQ(kernels::cpu::SampleRow(copy, row, ids, scratch), kGoldenTokens[at])
          << "case seed " << c.seed << " draw " << draw;
    }
  }
}

TEST(SamplerSplitTest, NextRowDrawsTheTopBitsOfTheSeededStream) {
  Sampler sampler(Params(0.9f, 0, 1.0f, 1.0f, 77));
  std::mt19937_64 stream(77);
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(sampler.NextRow().u, static_cast<double>(stream() >> 11) * 0x1.0p-53);
  }
  Sampler greedy(Params(0.0f, 0, 1.0f, 1.0f, 77));
  EXPECT_EQ(greedy.NextRow().u, 0.0);  // greedy takes no draw
}

TEST(SamplerSplitTest, PenaltyIdsAreDistinctInRangeAndSorted) {
  std::vector<int32_t> ids = {99};
  Sampler penalized(Params(0.9f, 0, 1.0f, 1.2f));
  penalized.PenaltyIds(std::vector<int32_t>{5, 2, 5, -1, 9, 2, 10, 0}, 10, ids);
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 2, 5, 9}));
  Sampler plain(Params(0.9f));
  plain.PenaltyIds(std::vector<int32_t>{1, 2}, 10, ids);
  EXPECT_TRUE(ids.empty());
}

}  // namespace
}  // namespace nibble::engine
