// TreeEngine::Verify (speculative decoding): a draft built from the model's own greedy choices
// is accepted whole and the committed tokens equal plain greedy decoding; on random draft trees
// the accepted path is the longest one that matches greedy decoding; the KV kept from the
// verification step is right (decoding after a commit equals decoding the sequence alone);
// malformed drafts get distinct errors. Exact path (fp32 weights), see tree_engine_test.cc.
#include <gtest/gtest.h>

#include <future>
#include <random>

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

struct Fixture {
  std::unique_ptr<TreeEngine> engine;
  std::vector<int32_t> prompt;
  LlamaModel& model() { return engine->model(); }
};

Fixture Make() {
  Fixture f;
  EngineOptions o;
  o.kv_pool_bytes = int64_t{64} << 20;
  f.engine = std::move(*TreeEngine::Create(ExactModel(), o));
  f.prompt = f.engine->model().tokenizer().Encode(
      "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", false, false);
  return f;
}

std::vector<int32_t> GreedyAlone(LlamaModel& model, const std::vector<int32_t>& seq, int n) {
  SamplingParams p;
  p.temperature = 0;
  p.max_tokens = n;
  p.ignore_eos = true;
  return Generate(model, seq, p, nullptr)->tokens;
}

SamplingParams Greedy() {
  SamplingParams p;
  p.temperature = 0;
  return p;
}

TEST(Verify, GreedyDraftIsAcceptedWholeAndEqualsGreedyDecoding) {
  Fixture f = Make();
  const std::vector<int32_t> greedy = GreedyAlone(f.model(), f.prompt, 7);
  // A chain of the first 6 greedy tokens, with a wrong sibling at every level.
  std::vector<int32_t> tokens, parents;
  int32_t prev = -1;
  for (int d = 0; d < 6; ++d) {
    tokens.push_back((greedy[d] + 17) % 49152);  // distractor first: order must not matter
    parents.push_back(prev);
    tokens.push_back(greedy[d]);
    parents.push_back(prev);
    prev = static_cast<int32_t>(tokens.size()) - 1;
  }
  auto tree = f.engine->CreateTree(f.prompt);
  ASSERT_TRUE(tree.ok());
  auto r = f.engine->Verify(*tree, 0, tokens, parents, Greedy());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->accepted, (std::vector<int32_t>{1, 3, 5, 7, 9, 11}));
  EXPECT_EQ(r->tokens, greedy);  // 6 accepted + the bonus token
  ASSERT_EQ(r->logprobs.size(), greedy.size());
  for (float lp : r->logprobs) EXPECT_LE(lp, 0.f);
}

TEST(Verify, RandomTreesAcceptTheLongestGreedyMatchingPath) {
  Fixture f = Make();
  const std::vector<int32_t> greedy = GreedyAlone(f.model(), f.prompt, 9);
  std::mt19937 rng(2026);
  for (int trial = 0; trial < 4; ++trial) {
    // Random tree of 24 tokens; some nodes carry the greedy token of their depth.
    std::vector<int32_t> tokens, parents, depth;
    std::uniform_int_distribution<int32_t> any(0, 49151);
    for (int i = 0; i < 24; ++i) {
      const int32_t p = i == 0 ? -1 : std::uniform_int_distribution<int32_t>(-1, i - 1)(rng);
      const int32_t d = p < 0 ? 0 : depth[p] + 1;
      depth.push_back(d);
      parents.push_back(p);
      const bool match = d < 8 && std::bernoulli_distribution(0.6)(rng);
      tokens.push_back(match ? greedy[d] : any(rng));
    }
    // Expected: walk from the root following children that carry greedy[depth].
    std::vector<int32_t> expected;
    int32_t at = -1;
    for (int d = 0;; ++d) {
      int32_t next = -1;
      for (int i = 0; i < 24; ++i) {
        if (parents[i] == at && tokens[i] == greedy[d]) {
          next = i;
          break;
        }
      }
      if (next < 0) break;
      expected.push_back(next);
      at = next;
    }
    auto tree = f.engine->CreateTree(f.prompt);
    ASSERT_TRUE(tree.ok());
    auto r = f.engine->Verify(*tree, 0, tokens, parents, Greedy());
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->accepted, expected) << "trial " << trial;
    std::vector<int32_t> want(greedy.begin(), greedy.begin() + expected.size() + 1);
    EXPECT_EQ(r->tokens, want) << "trial " << trial;
    ASSERT_TRUE(f.engine->DeleteTree(*tree).ok());
  }
}

TEST(Verify, DecodingAfterACommitContinuesExactly) {
  Fixture f = Make();
  const int64_t baseline = f.engine->free_blocks();
  const std::vector<int32_t> greedy = GreedyAlone(f.model(), f.prompt, 4);
  auto tree = f.engine->CreateTree(f.prompt);
  ASSERT_TRUE(tree.ok());
  // Two verification rounds (the second starts with the first's pending bonus token).
  std::vector<int32_t> seq = f.prompt;
  for (int round = 0; round < 2; ++round) {
    const std::vector<int32_t> g = GreedyAlone(f.model(), seq, 4);
    std::vector<int32_t> tokens = {g[0], g[1], g[2]}, parents = {-1, 0, 1};
    auto r = f.engine->Verify(*tree, 0, tokens, parents, Greedy());
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens, g);
    seq.insert(seq.end(), r->tokens.begin(), r->tokens.end());
  }
  std::promise<std::vector<int32_t>> out;
  std::vector<int32_t> got;
  GenerateCallbacks cb;
  cb.on_token = [&](NodeId, const SampledToken& t, std::string_view) {
    if (t.id >= 0) got.push_back(t.id);
  };
  cb.on_done = [&](const absl::Status&) { out.set_value(got); };
  BranchRequest b;
  b.node = 0;
  b.params = Greedy();
  b.params.max_tokens = 6;
  b.params.ignore_eos = true;
  ASSERT_TRUE(f.engine->Generate(*tree, {b}, cb).ok());
  EXPECT_EQ(out.get_future().get(), GreedyAlone(f.model(), seq, 6));
  ASSERT_TRUE(f.engine->DeleteTree(*tree).ok());
  EXPECT_EQ(f.engine->free_blocks(), baseline);
}

TEST(Verify, MalformedDraftsGetDistinctErrors) {
  Fixture f = Make();
  auto tree = f.engine->CreateTree(f.prompt);
  ASSERT_TRUE(tree.ok());
  auto err = [&](std::vector<int32_t> tokens, std::vector<int32_t> parents) {
    auto r = f.engine->Verify(*tree, 0, tokens, parents, Greedy());
    EXPECT_FALSE(r.ok());
    return r.status();
  };
  absl::Status s = err({5, 6}, {-1, 1});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("own parent (cycle)"), std::string::npos) << s;
  s = err({5, 6}, {1, -1});
  EXPECT_NE(s.message().find("must come before its child"), std::string::npos) << s;
  s = err({5, 6}, {-1, 7});
  EXPECT_NE(s.message().find("out of range"), std::string::npos) << s;
  s = err({5, 1 << 20}, {-1, 0});
  EXPECT_NE(s.message().find("outside the vocabulary"), std::string::npos) << s;
  s = err({}, {});
  EXPECT_NE(s.message().find("at least one"), std::string::npos) << s;
  s = err({5}, {-1, 0});
  EXPECT_NE(s.message().find("entries for"), std::string::npos) << s;
  auto missing =
      f.engine->Verify(*tree, 42, std::vector<int32_t>{5}, std::vector<int32_t>{-1}, Greedy());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  // The tree is untouched by the failed calls: a valid verify still works.
  EXPECT_TRUE(
      f.engine->Verify(*tree, 0, std::vector<int32_t>{5}, std::vector<int32_t>{-1}, Greedy()).ok());
}

}  // namespace
}  // namespace deft
