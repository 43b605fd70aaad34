// Device sampling (kernels/model/sampling.h) gives the CPU Sampler's token for the same logits,
// seed and step, over random logits (with ties), every filter alone and combined; greedy is the
// first argmax; the reported log-probability is the CPU's.
#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "engine/sampler/sampler.h"
#include "kernels/model/sampling.h"
#include "tests/gpu/gpu_test_util.h"

namespace deft::gpu::testing {
namespace {

TEST(SampleUniformTest, EqualsTheCpuSamplersDraw) {
  std::mt19937_64 rng(std::random_device{}());
  for (int i = 0; i < 1000; ++i) {
    const uint64_t seed = rng(), step = rng() % 10000;
    ASSERT_EQ(kernels::SampleUniformHost(seed, step), Sampler::Uniform(seed, step));
  }
}

struct Case {
  float temperature;
  int32_t top_k;
  float top_p;
  float min_p;
  float repetition_penalty = 1.f;
  float frequency_penalty = 0.f;
  float presence_penalty = 0.f;
};

class DeviceSamplingTest : public ::testing::Test {
 protected:
  void SetUp() override { DEFT_SKIP_WITHOUT_GPU(); }

  // Runs `rows` rows of random logits with per-row params; each row r uses cases[r % size], a
  // fresh seed and step r % 5; compares with the CPU Sampler (advanced to that step).
  // gather: output r samples logits row r / 2 (each row drawn twice, with different params).
  // split: a penalized row's entries in two ranges, as a verification's draft rows have them:
  // the prompt's (count 0), then the outputs' with their counts (override_*; ids of both).
  void Check(int32_t vocab, int rows, const std::vector<Case>& cases, bool ties,
             bool gather = false, bool split = false) {
    std::mt19937_64 rng(std::random_device{}());
    std::normal_distribution<float> normal(0.f, 3.f);
    std::vector<float> logits(size_t(rows) * vocab);
    for (auto& v : logits) v = ties ? std::round(normal(rng) * 2.f) / 2.f : normal(rng);
    std::vector<int32_t> logit_rows(rows);
    for (int r = 0; r < rows; ++r) logit_rows[r] = gather ? r / 2 : r;
    // Each row's CPU sampler, brought to the draw the device makes: a prompt and recorded
    // outputs (with repeats, half among the row's best logits, so the penalties move the
    // draw) where the case has penalties, then r % 5 draws of its own.
    std::vector<kernels::SampleRowParams> params(rows);
    std::vector<Sampler> cpu;
    std::vector<int32_t> penalty_ids, penalty_counts;
    for (int r = 0; r < rows; ++r) {
      const Case& c = cases[r % cases.size()];
      SamplingParams sp;
      sp.temperature = c.temperature;
      sp.top_k = c.top_k;
      sp.top_p = c.top_p;
      sp.min_p = c.min_p;
      sp.repetition_penalty = c.repetition_penalty;
      sp.frequency_penalty = c.frequency_penalty;
      sp.presence_penalty = c.presence_penalty;
      sp.seed = rng();
      // Alternatives asked on two rows of three: 5, or the most the device takes.
      sp.top_logprobs = r % 3 == 0 ? 0 : (r % 3 == 1 ? 5 : kernels::kMaxTopLogprobs);
      std::span<const float> row(&logits[size_t(logit_rows[r]) * vocab], vocab);
      std::vector<int32_t> best(static_cast<size_t>(vocab));
      std::iota(best.begin(), best.end(), 0);
      std::partial_sort(best.begin(), best.begin() + 8, best.end(),
                        [&](int32_t a, int32_t b) { return row[a] > row[b]; });
      best.resize(8);
      auto pick = [&] {
        return rng() % 2 == 0 ? best[rng() % best.size()] : static_cast<int32_t>(rng() % vocab);
      };
      std::vector<int32_t> prompt;
      const bool penalized = !Sampler(sp, {}).Plain();
      if (penalized) {
        for (int i = 0; i < 30; ++i) prompt.push_back(pick());
      }
      cpu.emplace_back(sp, prompt);
      std::map<int32_t, int32_t> outputs;
      if (penalized) {
        for (int i = 0; i < 12; ++i) ++outputs[cpu.back().Record(pick(), 0.f).id];
      }
      for (int s = 0; s < r % 5; ++s) ++outputs[cpu.back().Sample(row).id];
      const int32_t begin = static_cast<int32_t>(penalty_ids.size());
      int32_t override_begin = 0, override_count = 0;
      if (split && penalized) {
        Sampler(sp, prompt).AppendPenaltyEntries(&penalty_ids, &penalty_counts);
        override_begin = static_cast<int32_t>(penalty_ids.size());
        for (const auto& [id, count] : outputs) {
          penalty_ids.push_back(id);
          penalty_counts.push_back(count);
        }
        override_count = static_cast<int32_t>(outputs.size());
      } else {
        cpu.back().AppendPenaltyEntries(&penalty_ids, &penalty_counts);
      }
      params[r] = {sp.temperature,
                   sp.top_k,
                   sp.top_p,
                   sp.min_p,
                   sp.seed,
                   static_cast<uint64_t>(cpu.back().steps()),
                   sp.top_logprobs,
                   sp.repetition_penalty,
                   sp.frequency_penalty,
                   sp.presence_penalty,
                   begin,
                   (override_count > 0 ? override_begin
                                       : static_cast<int32_t>(penalty_ids.size())) - begin,
                   override_begin,
                   override_count};
      if (penalized) {
        EXPECT_GT(params[r].penalty_count + params[r].override_count, 0) << "row " << r;
      }
    }
    penalty_ids.push_back(0);  // never empty (Upload)
    penalty_counts.push_back(0);
    DeviceBuffer d_pen_ids = Upload(penalty_ids), d_pen_counts = Upload(penalty_counts);
    DeviceBuffer d_logits = Upload(logits), d_params = Upload(params);
    DeviceBuffer d_tokens = Poisoned(rows * 4), d_lp = Poisoned(rows * 4);
    const int32_t max_top = kernels::kMaxTopLogprobs;
    DeviceBuffer d_top_ids = Poisoned(rows * max_top * 4), d_top_lps = Poisoned(rows * max_top * 4);
    DeviceBuffer d_rows = Upload(logit_rows);
    DeviceBuffer d_ws;
    ASSERT_TRUE(d_ws.Reserve(kernels::SampleWorkspaceBytes(rows, vocab)).ok());
    kernels::SampleParams p{d_logits.as<float>(),
                            d_params.as<kernels::SampleRowParams>(),
                            d_tokens.as<int32_t>(),
                            d_lp.as<float>(),
                            d_ws.as<float>(),
                            rows,
                            vocab,
                            gather ? d_rows.as<int32_t>() : nullptr,
                            d_top_ids.as<int32_t>(),
                            d_top_lps.as<float>(),
                            max_top,
                            d_pen_ids.as<int32_t>(),
                            d_pen_counts.as<int32_t>()};
    DEFT_CUDA_OK(kernels::LaunchSample(p, nullptr));
    const auto tokens = Download<int32_t>(d_tokens, rows);
    const auto lps = Download<float>(d_lp, rows);
    const auto top_ids = Download<int32_t>(d_top_ids, rows * max_top);
    const auto top_lps = Download<float>(d_top_lps, rows * max_top);
    int disagreements = 0;
    for (int r = 0; r < rows; ++r) {
      const SamplingParams& sp = cpu[r].params();
      std::span<const float> row(&logits[size_t(logit_rows[r]) * vocab], vocab);
      const SampledToken want = cpu[r].Sample(row);
      if (tokens[r] != want.id) {
        ++disagreements;
        ADD_FAILURE() << "row " << r << " (T=" << sp.temperature << " k=" << sp.top_k
                      << " p=" << sp.top_p << " min_p=" << sp.min_p << " rep "
                      << sp.repetition_penalty << " freq " << sp.frequency_penalty << " pres "
                      << sp.presence_penalty << " step " << params[r].step
                      << "): device " << tokens[r] << ", cpu " << want.id;
        continue;
      }
      EXPECT_NEAR(lps[r], want.logprob, 1e-4f) << "row " << r;
      ASSERT_EQ(want.top.size(), static_cast<size_t>(std::min(params[r].top_logprobs, vocab)));
      for (size_t k = 0; k < want.top.size(); ++k) {
        EXPECT_EQ(top_ids[r * max_top + k], want.top[k].id) << "row " << r << " alternative " << k;
        EXPECT_NEAR(top_lps[r * max_top + k], want.top[k].logprob, 1e-4f)
            << "row " << r << " alternative " << k;
      }
    }
    EXPECT_EQ(disagreements, 0);
  }
};

const std::vector<Case> kCases = {
    {0.f, 0, 1.f, 0.f},        // greedy
    {1.f, 0, 1.f, 0.f},        // the full distribution
    {0.7f, 40, 1.f, 0.f},      // top-k
    {1.f, 0, 0.9f, 0.f},       // top-p
    {1.3f, 0, 1.f, 0.05f},     // min-p
    {0.8f, 50, 0.95f, 0.02f},  // all three
    {2.f, 1, 1.f, 0.f},        // top-k 1 is greedy over the tempered logits
    {1.f, 0, 0.3f, 0.f},       // a short top-p prefix
};

// Penalties (the CPU's rules: repetition over prompt and outputs, frequency and presence over
// outputs), alone and with the filters, penalties below 1 / negative ones (boosts) included.
const std::vector<Case> kPenaltyCases = {
    {0.f, 0, 1.f, 0.f, 1.3f},                 // greedy, repetition
    {1.f, 0, 1.f, 0.f, 1.f, 0.5f, 0.3f},      // frequency + presence
    {0.8f, 50, 0.95f, 0.02f, 1.1f, 0.2f, -0.4f},
    {0.f, 0, 1.f, 0.f, 1.f, -1.5f, 0.f},      // greedy, a boost by count
    {1.f, 0, 0.9f, 0.f, 0.8f},                // repetition below 1
    {0.7f, 40, 1.f, 0.f, 1.2f, 0.f, 2.f},
    {1.f, 0, 1.f, 0.f},                       // no penalty beside penalized rows
};

TEST_F(DeviceSamplingTest, SameTokenAsCpuSamplerSmallVocab) { Check(5000, 64, kCases, false); }
TEST_F(DeviceSamplingTest, PenaltiesAsTheCpuSampler) { Check(5000, 64, kPenaltyCases, false); }
TEST_F(DeviceSamplingTest, PenaltiesWithTiedLogits) { Check(3000, 64, kPenaltyCases, true); }
TEST_F(DeviceSamplingTest, PenaltiesLlama3VocabFewRows) { Check(128256, 7, kPenaltyCases, false); }
// A draft row's entries: the prompt's, then its outputs overriding them; an odd vocabulary.
TEST_F(DeviceSamplingTest, PenaltiesInTwoRangesOddVocab) {
  Check(4999, 48, kPenaltyCases, false, /*gather=*/false, /*split=*/true);
}

TEST_F(DeviceSamplingTest, SameTokenAsCpuSamplerWithTiedLogits) { Check(3000, 64, kCases, true); }

TEST_F(DeviceSamplingTest, SameTokenAsCpuSamplerLlama3Vocab) { Check(128256, 24, kCases, false); }

// Few rows: each row is split over a cluster of up to 4 CTAs (sampling.cu); a vocab that is not
// a multiple of 4 takes the scalar loops.
TEST_F(DeviceSamplingTest, SameTokenAsCpuSamplerFewRowsOddVocab) { Check(4999, 5, kCases, true); }
TEST_F(DeviceSamplingTest, SameTokenAsCpuSamplerOneRow) { Check(128256, 1, kCases, false); }
// Rows picked from the logits by index (logit_rows), each twice: the engine's StepSampling.
TEST_F(DeviceSamplingTest, SameTokenAsCpuSamplerGatheredRows) {
  Check(32000, 32, kCases, false, /*gather=*/true);
}

TEST_F(DeviceSamplingTest, RejectsMissingBuffers) {
  kernels::SampleParams p;
  p.rows = 1;
  p.vocab = 10;
  EXPECT_EQ(kernels::LaunchSample(p, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace deft::gpu::testing
