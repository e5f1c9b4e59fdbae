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

}  // namespace
}  // namespace nibble::engine
