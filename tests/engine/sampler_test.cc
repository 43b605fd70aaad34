// Sampler: greedy, seeded reproducibility, the filters (top-k, top-p, min-p), penalties,
// log-probabilities, parameter validation; and the stop-string matcher of the generation loop.
#include "engine/sampler/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>

#include "engine/model/generate.h"

namespace deft {
namespace {

std::vector<float> RandomLogits(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.f, 2.f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

std::vector<double> Softmax(const std::vector<float>& l, float t = 1.f) {
  double mx = *std::max_element(l.begin(), l.end()), s = 0;
  std::vector<double> p(l.size());
  for (size_t i = 0; i < l.size(); ++i) s += p[i] = std::exp((l[i] - mx) / t);
  for (double& x : p) x /= s;
  return p;
}

TEST(Sampler, GreedyPicksFirstMaximum) {
  SamplingParams p;
  p.temperature = 0;
  Sampler s(p, {});
  std::vector<float> logits = {0.f, 3.f, 1.f, 3.f};
  EXPECT_EQ(s.Sample(logits).id, 1);
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDifferentTokens) {
  auto logits = RandomLogits(1000, 1);
  auto run = [&](uint64_t seed) {
    SamplingParams p;
    p.temperature = 1.5f;
    p.seed = seed;
    Sampler s(p, {});
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) out.push_back(s.Sample(logits).id);
    return out;
  };
  EXPECT_EQ(run(42), run(42));
  EXPECT_NE(run(42), run(43));
}

TEST(Sampler, FrequenciesFollowSoftmax) {
  // 20000 draws from a 5-token distribution: each frequency within 4 standard deviations.
  std::vector<float> logits = {1.f, 0.5f, 0.f, -1.f, 2.f};
  SamplingParams p;
  p.temperature = 0.8f;
  p.seed = 99;
  Sampler s(p, {});
  std::vector<int> counts(5, 0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++counts[s.Sample(logits).id];
  auto probs = Softmax(logits, 0.8f);
  for (int i = 0; i < 5; ++i) {
    double sd = std::sqrt(n * probs[i] * (1 - probs[i]));
    EXPECT_NEAR(counts[i], n * probs[i], 4 * sd + 1) << "token " << i;
  }
}

TEST(Sampler, TopKRestrictsToBestK) {
  auto logits = RandomLogits(500, 2);
  std::vector<int> idx(500);
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  std::set<int> best(idx.begin(), idx.begin() + 3);
  SamplingParams p;
  p.temperature = 5.f;  // nearly flat: without top-k other tokens would appear
  p.top_k = 3;
  p.seed = 5;
  Sampler s(p, {});
  std::set<int> seen;
  for (int i = 0; i < 300; ++i) seen.insert(s.Sample(logits).id);
  EXPECT_EQ(seen, best);
}

TEST(Sampler, TopPKeepsSmallestSetReachingP) {
  // probabilities ~ 0.5, 0.25, 0.125, 0.0625, ...: top_p 0.7 keeps exactly the first two.
  std::vector<float> logits;
  for (int i = 0; i < 12; ++i) logits.push_back(-std::log(2.f) * i);
  SamplingParams p;
  p.top_p = 0.7f;
  p.seed = 3;
  Sampler s(p, {});
  std::set<int> seen;
  for (int i = 0; i < 400; ++i) seen.insert(s.Sample(logits).id);
  EXPECT_EQ(seen, (std::set<int>{0, 1}));
}

TEST(Sampler, MinPDropsUnlikelyTokens) {
  std::vector<float> logits = {0.f, -0.1f, -3.f, -3.f, -0.5f};
  // p_i / p_max = exp(l_i): 1, .905, .05, .05, .607; min_p .5 keeps {0, 1, 4}.
  SamplingParams p;
  p.min_p = 0.5f;
  p.seed = 11;
  Sampler s(p, {});
  std::set<int> seen;
  for (int i = 0; i < 400; ++i) seen.insert(s.Sample(logits).id);
  EXPECT_EQ(seen, (std::set<int>{0, 1, 4}));
}

// The definition, by brute force: every candidate sorted by (prob desc, id asc), top-k, the
// shortest prefix reaching top_p of the total, min-p against the best, then the first candidate
// whose running sum exceeds u * kept (the last when none does).
int32_t ReferenceDraw(const std::vector<float>& logits, const SamplingParams& p, int64_t step) {
  const float inv_t = 1.f / p.temperature;
  const float mx = *std::max_element(logits.begin(), logits.end());
  std::vector<float> w(logits.size());
  double total = 0;
  for (size_t i = 0; i < w.size(); ++i) total += w[i] = std::exp((logits[i] - mx) * inv_t);
  std::vector<int32_t> order(w.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
  std::sort(order.begin(), order.end(),
            [&](int32_t a, int32_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); });
  size_t n = p.top_k > 0 ? std::min<size_t>(p.top_k, order.size()) : order.size();
  if (p.top_p < 1.f) {
    double kept = 0;
    for (size_t i = 0; i < n; ++i) {
      kept += w[order[i]];
      if (kept >= p.top_p * total) {
        n = i + 1;
        break;
      }
    }
  }
  size_t m = 1;
  while (m < n && w[order[m]] >= p.min_p * w[order[0]]) ++m;
  n = m;
  double kept = 0;
  for (size_t i = 0; i < n; ++i) kept += w[order[i]];
  const double u = Sampler::Uniform(p.seed, static_cast<uint64_t>(step)) * kept;
  double acc = 0;
  for (size_t i = 0; i < n; ++i) {
    acc += w[order[i]];
    if (u < acc) return order[i];
  }
  return order[n - 1];
}

TEST(Sampler, DrawsTheTokenOfTheSortedDefinition) {
  // The sampler never sorts (weighted quickselect); it must pick what the sorted definition
  // picks, over filters, temperatures and rows with many tied probabilities.
  std::mt19937 rng(5);
  int checked = 0;
  for (int row = 0; row < 60; ++row) {
    const int vocab = row % 3 == 0 ? 5000 : 700;
    std::vector<float> logits = RandomLogits(vocab, 100 + row);
    if (row % 4 == 1) {
      for (float& x : logits) x = std::round(x);  // ties
    }
    SamplingParams p;
    p.temperature = row % 5 == 0 ? 0.6f : 1.f;
    p.top_k = row % 3 == 1 ? 1 + static_cast<int32_t>(rng() % 200) : 0;
    p.top_p = row % 2 == 0 ? 0.5f + 0.45f * static_cast<float>(rng() % 100) / 100.f : 1.f;
    p.min_p = row % 6 == 3 ? 0.05f : 0.f;
    p.seed = rng();
    Sampler s(p, {});
    for (int64_t step = 0; step < 20; ++step) {
      const int32_t want = ReferenceDraw(logits, p, step);
      EXPECT_EQ(s.Sample(logits).id, want) << "row " << row << " step " << step;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 1200);
}

TEST(Sampler, RepetitionPenaltyFollowsHfRule) {
  std::vector<float> logits = {2.0f, 1.9f, -1.f};
  SamplingParams p;
  p.temperature = 0;
  p.repetition_penalty = 1.2f;  // token 0: 2.0 / 1.2 = 1.67 < 1.9
  std::vector<int32_t> prompt = {0};
  Sampler s(p, prompt);
  EXPECT_EQ(s.Sample(logits).id, 1);
  // now both 0 and 1 are seen: 1.67 vs 1.58 -> 0
  EXPECT_EQ(s.Sample(logits).id, 0);
}

TEST(Sampler, FrequencyAndPresencePenaltiesApplyToOutputTokens) {
  std::vector<float> logits = {1.0f, 0.7f};
  SamplingParams p;
  p.temperature = 0;
  p.frequency_penalty = 0.2f;
  Sampler s(p, {});
  // counts: t0 penalized by .2 per use: 1.0, .8 -> 0 chosen twice, then .6 < .7 -> 1
  EXPECT_EQ(s.Sample(logits).id, 0);
  EXPECT_EQ(s.Sample(logits).id, 0);
  EXPECT_EQ(s.Sample(logits).id, 1);
  SamplingParams q;
  q.temperature = 0;
  q.presence_penalty = 0.5f;
  Sampler s2(q, {});
  EXPECT_EQ(s2.Sample(logits).id, 0);
  EXPECT_EQ(s2.Sample(logits).id, 1);  // 0.5 < 0.7
}

TEST(Sampler, LogprobsAreRawLogSoftmax) {
  auto logits = RandomLogits(300, 4);
  SamplingParams p;
  p.temperature = 0.7f;
  p.top_logprobs = 5;
  p.seed = 8;
  Sampler s(p, {});
  SampledToken t = s.Sample(logits);
  auto probs = Softmax(logits);
  EXPECT_NEAR(t.logprob, std::log(probs[t.id]), 1e-5);
  ASSERT_EQ(t.top.size(), 5u);
  for (size_t i = 0; i < t.top.size(); ++i) {
    EXPECT_NEAR(t.top[i].logprob, std::log(probs[t.top[i].id]), 1e-5);
    if (i > 0) {
      EXPECT_GE(t.top[i - 1].logprob, t.top[i].logprob);
    }
  }
  EXPECT_EQ(t.top[0].id, std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// A draw made elsewhere and handed to Record leaves the sampler where Sample would have: the
// next draws, penalties included, are the same.
TEST(Sampler, RecordAdvancesLikeSample) {
  auto logits = RandomLogits(500, 6);
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_p = 0.95f;
  p.seed = 11;
  p.repetition_penalty = 1.3f;
  p.frequency_penalty = 0.4f;
  std::vector<int32_t> prompt = {3, 4};
  Sampler a(p, prompt), b(p, prompt);
  for (int i = 0; i < 20; ++i) {
    const SampledToken want = a.Sample(logits);
    const SampledToken got = i % 2 == 0 ? b.Record(want.id, want.logprob) : b.Sample(logits);
    EXPECT_EQ(got.id, want.id) << "draw " << i;
    EXPECT_EQ(got.logprob, want.logprob) << "draw " << i;
    EXPECT_EQ(b.steps(), a.steps());
  }
}

TEST(Sampler, PlainOnlyWithoutPenalties) {
  SamplingParams p;
  p.temperature = 0.7f;
  p.top_k = 40;
  p.top_p = 0.9f;
  p.min_p = 0.05f;
  p.top_logprobs = 20;
  EXPECT_TRUE(Sampler(p, {}).Plain());
  for (int f = 0; f < 3; ++f) {
    SamplingParams q = p;
    if (f == 0) q.repetition_penalty = 1.1f;
    if (f == 1) q.frequency_penalty = 0.1f;
    if (f == 2) q.presence_penalty = -0.1f;
    EXPECT_FALSE(Sampler(q, {}).Plain()) << f;
  }
}

// The entries a backend gets for penalties (AppendPenaltyEntries), applied by the rule the GPU
// sampler applies them (kernels/model/sampling.h: repetition over every entry, then frequency
// and presence by count, one fma), turn the raw logits into those the penalized sampler draws
// from: a Plain sampler at the same step draws the same token from them.
TEST(Sampler, PenaltyEntriesReproduceThePenalizedDraw) {
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.f, 2.f);
  const int vocab = 300;
  for (int trial = 0; trial < 200; ++trial) {
    SamplingParams p;
    p.temperature = trial % 4 == 0 ? 0.f : 0.9f;
    p.top_p = trial % 3 == 0 ? 0.8f : 1.f;
    p.seed = rng();
    p.repetition_penalty = trial % 5 == 1 ? 1.f : (trial % 2 ? 1.3f : 0.7f);
    p.frequency_penalty = trial % 5 == 2 ? 0.f : 0.4f;
    p.presence_penalty = trial % 5 == 3 ? 0.f : -0.3f;
    std::vector<int32_t> prompt;
    for (int i = 0; i < 20; ++i) prompt.push_back(static_cast<int32_t>(rng() % 40));
    Sampler penalized(p, prompt);
    ASSERT_FALSE(penalized.Plain());
    for (int i = 0; i < 15; ++i) penalized.Record(static_cast<int32_t>(rng() % 60), 0.f);
    std::vector<float> logits(vocab);
    for (float& v : logits) v = normal(rng);
    for (int i = 0; i < 10; ++i) logits[rng() % 40] += 4.f;  // penalized tokens near the top

    std::vector<int32_t> ids, counts;
    penalized.AppendPenaltyEntries(&ids, &counts);
    ASSERT_EQ(ids.size(), counts.size());
    ASSERT_EQ(std::set<int32_t>(ids.begin(), ids.end()).size(), ids.size()) << "ids repeat";
    std::vector<float> work = logits;
    for (size_t e = 0; e < ids.size(); ++e) {
      float& v = work[ids[e]];
      if (p.repetition_penalty != 1.f) {
        v = v > 0.f ? v / p.repetition_penalty : v * p.repetition_penalty;
      }
      if (counts[e] > 0) {
        v -= std::fma(p.frequency_penalty, static_cast<float>(counts[e]), p.presence_penalty);
      }
    }
    SamplingParams plain_p = p;
    plain_p.repetition_penalty = 1.f;
    plain_p.frequency_penalty = 0.f;
    plain_p.presence_penalty = 0.f;
    Sampler plain(plain_p, {});
    while (plain.steps() < penalized.steps()) plain.Record(0, 0.f);
    EXPECT_EQ(plain.Sample(work).id, penalized.Sample(logits).id) << "trial " << trial;
  }
}

TEST(SamplingParams, ValidateNamesTheField) {
  auto msg = [](auto mutate) {
    SamplingParams p;
    mutate(p);
    absl::Status s = p.Validate(100);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    return std::string(s.message());
  };
  EXPECT_NE(msg([](auto& p) { p.temperature = -1; }).find("temperature"), std::string::npos);
  EXPECT_NE(msg([](auto& p) { p.top_p = 0; }).find("top_p"), std::string::npos);
  EXPECT_NE(msg([](auto& p) { p.top_p = 1.5f; }).find("top_p"), std::string::npos);
  EXPECT_NE(msg([](auto& p) { p.top_k = -2; }).find("top_k"), std::string::npos);
  EXPECT_NE(msg([](auto& p) { p.min_p = 1; }).find("min_p"), std::string::npos);
  EXPECT_NE(msg([](auto& p) { p.max_tokens = 0; }).find("max_tokens"), std::string::npos);
  EXPECT_NE(msg([](auto& p) { p.repetition_penalty = 0; }).find("repetition_penalty"),
            std::string::npos);
  EXPECT_NE(msg([](auto& p) { p.stop_token_ids = {100}; }).find("stop_token_ids"),
            std::string::npos);
  EXPECT_NE(msg([](auto& p) { p.top_logprobs = 21; }).find("top_logprobs"), std::string::npos);
  EXPECT_TRUE(SamplingParams{}.Validate(100).ok());
}

TEST(StopStringMatcher, HoldsPossiblePrefixAndCutsAtStop) {
  StopStringMatcher m({"END", "\n\n"});
  bool stopped;
  EXPECT_EQ(m.Push("hello E", &stopped), "hello ");
  EXPECT_FALSE(stopped);
  EXPECT_EQ(m.Push("N", &stopped), "");
  EXPECT_EQ(m.Push("x more\n", &stopped), "ENx more");
  EXPECT_FALSE(stopped);
  EXPECT_EQ(m.Push("\nafter", &stopped), "");
  EXPECT_TRUE(stopped);
}

TEST(StopStringMatcher, FlushReturnsHeldText) {
  StopStringMatcher m({"STOP"});
  bool stopped;
  EXPECT_EQ(m.Push("abc ST", &stopped), "abc ");
  EXPECT_EQ(m.Flush(), "ST");
}

}  // namespace
}  // namespace deft
