// TreeEngine::BeamSearch against an independent beam search over whole sequences (contiguous KV
// cache, one sequence at a time): same beams, same tokens, same log-probabilities; width 1 is
// greedy decoding; the tree keeps only surviving beams and the pool returns to its baseline.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "engine/scheduler/tree_engine.h"

namespace deft {
namespace {

std::unique_ptr<LlamaModel> ExactModel() {
  LoadOptions options;
  options.dequantize_to_f32 = true;
  auto loaded = LoadGgufModel(DEFT_TEST_MODEL, options);
  if (!loaded.ok()) {
    ADD_FAILURE() << loaded.status();
    std::abort();
  }
  return std::move(*LlamaModel::Create(std::move(*loaded), {}));
}

struct RefBeam {
  std::vector<int32_t> tokens;
  double logprob = 0;
};

// Plain beam search: every candidate sequence recomputed from scratch. No EOS handling (the
// engine runs with stop_at_eos = false here).
std::vector<RefBeam> ReferenceBeamSearch(LlamaModel& model, const std::vector<int32_t>& prompt,
                                         int width, int steps) {
  std::vector<RefBeam> beams = {RefBeam{}};
  const int64_t vocab = model.config().vocab_size;
  for (int s = 0; s < steps; ++s) {
    struct Cand {
      size_t beam;
      int32_t token;
      double logprob;
    };
    std::vector<Cand> cands;
    for (size_t i = 0; i < beams.size(); ++i) {
      std::vector<int32_t> seq = prompt;
      seq.insert(seq.end(), beams[i].tokens.begin(), beams[i].tokens.end());
      KvCache cache = model.NewCache(static_cast<int64_t>(seq.size()));
      std::vector<float> logits;
      EXPECT_TRUE(model.Forward(seq, cache, false, &logits).ok());
      for (const TokenLogprob& t :
           TopLogprobs({logits.data(), static_cast<size_t>(vocab)}, 2 * width)) {
        cands.push_back({i, t.id, beams[i].logprob + t.logprob});
      }
    }
    std::stable_sort(cands.begin(), cands.end(),
                     [](const Cand& a, const Cand& b) { return a.logprob > b.logprob; });
    std::vector<RefBeam> next;
    for (int k = 0; k < width; ++k) {
      RefBeam b = beams[cands[k].beam];
      b.tokens.push_back(cands[k].token);
      b.logprob = cands[k].logprob;
      next.push_back(b);
    }
    beams = next;
  }
  return beams;
}

TEST(BeamSearch, MatchesAnIndependentSequenceBeamSearch) {
  EngineOptions o;
  o.kv_pool_bytes = int64_t{64} << 20;
  auto engine = std::move(*TreeEngine::Create(ExactModel(), o));
  const int64_t baseline = engine->free_blocks();
  std::vector<int32_t> prompt =
      engine->model().tokenizer().Encode("The three most common trees in Europe are", false, false);
  auto tree = engine->CreateTree(prompt);
  ASSERT_TRUE(tree.ok());
  BeamSearchOptions bo;
  bo.width = 3;
  bo.max_tokens = 5;
  bo.length_penalty = 0.f;  // score = logprob, as the reference ranks
  bo.stop_at_eos = false;
  auto got = engine->BeamSearch(*tree, 0, bo);
  ASSERT_TRUE(got.ok()) << got.status();
  std::vector<RefBeam> want = ReferenceBeamSearch(engine->model(), prompt, 3, 5);
  ASSERT_EQ(got->beams.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got->beams[i].tokens, want[i].tokens) << "beam " << i;
    EXPECT_NEAR(got->beams[i].logprob, want[i].logprob, 1e-3) << "beam " << i;
  }
  // The tree holds the prompt and exactly the surviving beams as leaves.
  engine->WithTrees([&](const TreeKvCache& cache) {
    auto stats = cache.Stats(*tree);
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->leaves, 3);
    for (const auto& b : got->beams) {
      auto path = cache.Path(*tree, b.node);
      ASSERT_TRUE(path.ok());
      std::vector<int32_t> seq;
      for (const TreeNode* n : *path) seq.insert(seq.end(), n->tokens.begin(), n->tokens.end());
      std::vector<int32_t> full = prompt;
      full.insert(full.end(), b.tokens.begin(), b.tokens.end());
      EXPECT_EQ(seq, full);
    }
  });
  ASSERT_TRUE(engine->DeleteTree(*tree).ok());
  EXPECT_EQ(engine->free_blocks(), baseline);
}

TEST(BeamSearch, WidthOneIsGreedyDecoding) {
  auto engine = std::move(*TreeEngine::Create(ExactModel(), {}));
  std::vector<int32_t> prompt =
      engine->model().tokenizer().Encode("Roots, trunk, branches and", false, false);
  auto tree = engine->CreateTree(prompt);
  ASSERT_TRUE(tree.ok());
  BeamSearchOptions bo;
  bo.width = 1;
  bo.max_tokens = 6;
  bo.stop_at_eos = false;
  auto got = engine->BeamSearch(*tree, 0, bo);
  ASSERT_TRUE(got.ok()) << got.status();
  SamplingParams p;
  p.temperature = 0;
  p.max_tokens = 6;
  p.ignore_eos = true;
  EXPECT_EQ(got->beams.at(0).tokens, Generate(engine->model(), prompt, p, nullptr)->tokens);
}

TEST(BeamSearch, RejectsBadOptions) {
  auto engine = std::move(*TreeEngine::Create(ExactModel(), {}));
  auto tree = engine->CreateTree(std::vector<int32_t>{1, 2, 3});
  ASSERT_TRUE(tree.ok());
  BeamSearchOptions bo;
  bo.width = 0;
  EXPECT_NE(engine->BeamSearch(*tree, 0, bo).status().message().find("width"), std::string::npos);
  bo.width = 2;
  bo.max_tokens = 0;
  EXPECT_NE(engine->BeamSearch(*tree, 0, bo).status().message().find("max_tokens"),
            std::string::npos);
  bo.max_tokens = 2;
  EXPECT_EQ(engine->BeamSearch(*tree, 7, bo).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace deft
