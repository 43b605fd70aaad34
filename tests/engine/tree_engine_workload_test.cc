// TreeEngine on EVERY tree of the shared workloads (../shared/workloads), in all four attention
// modes: for each branch, greedy decoding inside the tree (all leaves of the tree, and of several
// trees, decoded together by the scheduler: shared KV, chunked prefill under a small step budget,
// small planner chunks, many trees per step) gives exactly the tokens of decoding that branch's
// full sequence alone (Generate(): contiguous KV cache, no tree, no plan), token for token, and
// the same log-probabilities within fp32 rounding.
//
// Covered: all 100 trees of reasoning/sorting128ToT.json and all 50 of reasoning/docmergeToT.json
// (every node, every leaf a branch), the five speculative/APPS_tree_size*.json token trees (every
// draft node a branch), and few-shot prompting (W in {2, 16, 50} branches, fresh or a few tokens
// into their generation).
//
// What is scaled, and why the property still holds on what is checked:
//  - The model: a tiny Llama with random fp32 weights (tests/engine/synthetic_model.h), so that
//    about 9k branches x 4 modes fit in CI time; the real SmolLM2 checks the same property on a
//    sample of these shapes (tree_engine_property_test.cc, tree_engine_test.cc). The engine's code
//    paths do not depend on the weights; the synthetic model is context-sensitive (measured by
//    SyntheticModel.NextTokenDependsOnTheContext below), so wrong KV changes tokens. It is fp32
//    everywhere (the exact path), so split-order rounding cannot flip activation quantization;
//    the smallest top-2 log-probability gap met by the references is printed, and a mismatch
//    reports the gap at that token.
//  - Token counts: every node keeps its place in its tree (topology exactly as recorded,
//    children in recorded order), its length becomes ceil(recorded / kLengthScale) tokens (a
//    recorded 0 stays an empty node, anything else keeps >= 1 token), the prompt (node 0)
//    likewise but at least one token. Node boundaries, block boundaries (4-token blocks) and
//    chunk boundaries still fall inside and between nodes; only the lengths shrink.
//  - Tokens are random ids (seeded by file and tree), and each leaf decodes kNewTokens tokens:
//    the first from the tree's own KV, the second also from the KV the step computed for the
//    first.
//
// Time: 25 s on 2 cores for the whole file alone, most of it sorting128ToT (its 7237 branches
// decoded alone: 11 s; each mode 2 s); under ctest -j2 beside the other engine tests, 42 s for
// sorting128ToT and 15 s for docmergeToT. Printed per file and mode.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "engine/attention/workload_forest.h"
#include "engine/scheduler/tree_engine.h"
#include "tests/engine/synthetic_model.h"

namespace deft {
namespace {

using testing_synthetic::SyntheticModel;

constexpr uint32_t kModelSeed = 20240611;
constexpr int64_t kLengthScale = 32;  // recorded lengths go up to 1536 tokens: at most 48 here
constexpr int32_t kNewTokens = 2;
constexpr size_t kTreesPerBatch = 10;  // trees generating at once in one engine
// Engine log-probabilities against Generate()'s: same math, different summation order.
constexpr float kLogprobTolerance = 1e-4f;

constexpr const char* kReasoningFiles[] = {"reasoning/sorting128ToT.json",
                                           "reasoning/docmergeToT.json"};
constexpr int kSpeculativeSizes[] = {5, 10, 32, 64, 128};

constexpr AttentionMode kAllModes[] = {AttentionMode::kSeq, AttentionMode::kTree,
                                       AttentionMode::kNode, AttentionMode::kFlatten};

using Clock = std::chrono::steady_clock;
double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// One tree with its tokens, and what each leaf must decode (its sequence decoded alone).
struct Case {
  std::string name;
  WorkloadForest shape;                      // segments = tree nodes, parents before children
  std::vector<std::vector<int32_t>> tokens;  // per node
  std::vector<int32_t> leaves;
  std::vector<std::vector<int32_t>> expected;         // per leaf
  std::vector<std::vector<float>> expected_logprob;   // per leaf
  std::vector<std::vector<float>> expected_top2_gap;  // per leaf: logprob(1st) - logprob(2nd)
};

// Decodes each leaf's sequence alone (greedy, kNewTokens) into the case's expectations.
void DecodeLeavesAlone(LlamaModel& model, Case& c, float* min_gap) {
  for (int32_t leaf : c.leaves) {
    std::vector<int32_t> path;
    for (int32_t n = leaf; n >= 0; n = c.shape.parent[n]) path.push_back(n);
    std::vector<int32_t> sequence;
    for (auto it = path.rbegin(); it != path.rend(); ++it) {
      sequence.insert(sequence.end(), c.tokens[*it].begin(), c.tokens[*it].end());
    }
    SamplingParams p;
    p.temperature = 0;
    p.max_tokens = kNewTokens;
    p.ignore_eos = true;
    p.top_logprobs = 2;
    std::vector<float> logprobs, gaps;
    auto r = Generate(model, sequence, p, [&](const SampledToken& t, std::string_view) {
      logprobs.push_back(t.logprob);
      gaps.push_back(t.top.size() == 2 ? t.top[0].logprob - t.top[1].logprob : 0.f);
      *min_gap = std::min(*min_gap, gaps.back());
      return true;
    });
    ASSERT_TRUE(r.ok()) << r.status();
    c.expected.push_back(r->tokens);
    c.expected_logprob.push_back(std::move(logprobs));
    c.expected_top2_gap.push_back(std::move(gaps));
  }
}

// A case from a workload shape: node lengths divided by `scale` (rounded up), random tokens from
// `rng`.
Case MakeCase(std::string name, const WorkloadForest& recorded, int64_t scale, std::mt19937& rng) {
  Case c;
  c.name = std::move(name);
  c.shape = recorded;
  std::uniform_int_distribution<int32_t> token(0, testing_synthetic::kVocab - 1);
  for (size_t n = 0; n < recorded.parent.size(); ++n) {
    int64_t len = (recorded.length[n] + scale - 1) / scale;
    if (n == 0) len = std::max<int64_t>(len, 1);  // a tree's prompt is never empty
    c.shape.length[n] = static_cast<int32_t>(len);
    std::vector<int32_t> t(static_cast<size_t>(len));
    for (int32_t& x : t) x = token(rng);
    c.tokens.push_back(std::move(t));
  }
  std::vector<bool> inner(recorded.parent.size(), false);
  for (int32_t p : recorded.parent) {
    if (p >= 0) inner[p] = true;
  }
  for (size_t n = 0; n < inner.size(); ++n) {
    if (!inner[n]) c.leaves.push_back(static_cast<int32_t>(n));
  }
  return c;
}

// What one tree's generation delivered, per engine node.
struct Delivered {
  std::mutex mu;
  std::map<NodeId, std::vector<SampledToken>> tokens;
  std::map<NodeId, FinishReason> finish;
  std::promise<absl::Status> done;
};

// The callbacks share ownership of `d`: a test that stops early must not leave the scheduler
// delivering into freed memory.
GenerateCallbacks Collect(const std::shared_ptr<Delivered>& d) {
  GenerateCallbacks cb;
  cb.on_token = [d](NodeId node, const SampledToken& t, std::string_view) {
    if (t.id < 0) return;
    std::lock_guard<std::mutex> lock(d->mu);
    d->tokens[node].push_back(t);
  };
  cb.on_finish = [d](NodeId node, FinishReason r, const BranchUsage&) {
    std::lock_guard<std::mutex> lock(d->mu);
    d->finish[node] = r;
  };
  cb.on_done = [d](const absl::Status& s) { d->done.set_value(s); };
  return cb;
}

EngineOptions SmallStepOptions(AttentionMode mode) {
  EngineOptions o;
  o.mode = mode;
  o.kv_pool_bytes = int64_t{64} << 20;  // 2 KB blocks: room for kTreesPerBatch of any tree
  o.block_tokens = 4;
  o.step_token_budget = 48;  // prefill of every batch is chunked over many steps
  o.planner.min_chunk_tokens = 4;
  o.planner.max_chunk_tokens = 32;
  o.planner.seq_chunk_tokens = 8;
  return o;
}

// Builds `c` in the engine: CreateTree(prompt), then every other node in preorder as a fork at
// its parent's end extended with its tokens. Returns the tree and each case node's engine node.
TreeId BuildTree(TreeEngine& engine, const Case& c, std::vector<NodeId>* node_of) {
  auto tree = engine.CreateTree(c.tokens[0]);
  EXPECT_TRUE(tree.ok()) << tree.status();
  if (!tree.ok()) return -1;
  node_of->assign(c.shape.parent.size(), kNoNode);
  (*node_of)[0] = 0;
  for (size_t n = 1; n < c.shape.parent.size(); ++n) {
    const NodeId parent = (*node_of)[c.shape.parent[n]];
    auto kid =
        engine.Fork(*tree, parent, static_cast<int64_t>(c.tokens[c.shape.parent[n]].size()), 1);
    EXPECT_TRUE(kid.ok()) << kid.status() << " node " << n;
    if (!kid.ok()) return *tree;
    (*node_of)[n] = (*kid)[0];
    const absl::Status s = engine.Extend(*tree, (*kid)[0], c.tokens[n]);
    EXPECT_TRUE(s.ok()) << s << " node " << n;
  }
  return *tree;
}

// Runs every case in `mode`, kTreesPerBatch trees generating at once, and compares each leaf with
// its expectation. Returns false at the first failing batch.
// *max_logprob_error: the largest |engine - alone| log-probability seen.
bool RunCasesInMode(const std::vector<Case>& cases, AttentionMode mode, float* max_logprob_error) {
  auto engine_or = TreeEngine::Create(SyntheticModel(kModelSeed), SmallStepOptions(mode));
  EXPECT_TRUE(engine_or.ok()) << engine_or.status();
  if (!engine_or.ok()) return false;
  TreeEngine& engine = **engine_or;
  const int64_t baseline = engine.free_blocks();
  for (size_t first = 0; first < cases.size(); first += kTreesPerBatch) {
    const size_t last = std::min(cases.size(), first + kTreesPerBatch);
    const StepStats before = engine.stats();
    std::vector<TreeId> trees;
    std::vector<std::vector<NodeId>> node_of(last - first);
    std::vector<std::shared_ptr<Delivered>> delivered;
    for (size_t i = first; i < last; ++i) {
      trees.push_back(BuildTree(engine, cases[i], &node_of[i - first]));
      if (testing::Test::HasFailure()) return false;
    }
    for (size_t i = first; i < last; ++i) {
      std::vector<BranchRequest> branches;
      for (int32_t leaf : cases[i].leaves) {
        BranchRequest r;
        r.node = node_of[i - first][leaf];
        r.params.temperature = 0;
        r.params.max_tokens = kNewTokens;
        r.params.ignore_eos = true;
        branches.push_back(r);
      }
      delivered.push_back(std::make_shared<Delivered>());
      auto gen = engine.Generate(trees[i - first], branches, Collect(delivered.back()));
      EXPECT_TRUE(gen.ok()) << gen.status() << " " << cases[i].name;
      if (!gen.ok()) return false;
    }
    for (size_t i = first; i < last; ++i) {
      const Case& c = cases[i];
      Delivered& d = *delivered[i - first];
      auto done = d.done.get_future();
      EXPECT_EQ(done.wait_for(std::chrono::seconds(120)), std::future_status::ready) << c.name;
      if (testing::Test::HasFailure()) return false;
      const absl::Status status = done.get();
      EXPECT_TRUE(status.ok()) << status << " " << c.name;
      std::lock_guard<std::mutex> lock(d.mu);
      for (size_t l = 0; l < c.leaves.size(); ++l) {
        const NodeId node = node_of[i - first][c.leaves[l]];
        std::vector<int32_t> got;
        for (const SampledToken& t : d.tokens[node]) got.push_back(t.id);
        EXPECT_EQ(got, c.expected[l])
            << c.name << " leaf " << c.leaves[l] << " (engine node " << node
            << "); top-2 gaps of the reference: " << testing::PrintToString(c.expected_top2_gap[l]);
        for (size_t k = 0; k < got.size() && k < c.expected[l].size(); ++k) {
          const float error = std::abs(d.tokens[node][k].logprob - c.expected_logprob[l][k]);
          *max_logprob_error = std::max(*max_logprob_error, error);
          EXPECT_LE(error, kLogprobTolerance)
              << c.name << " leaf " << c.leaves[l] << " token " << k;
        }
        EXPECT_EQ(d.finish[node], FinishReason::kLength) << c.name << " leaf " << c.leaves[l];
      }
      if (testing::Test::HasFailure()) return false;
    }
    const StepStats after = engine.stats();
    if (mode != AttentionMode::kSeq) {
      // Flatten, node and tree read each KV token of a step once.
      EXPECT_EQ(after.kv_bytes_read - before.kv_bytes_read,
                after.kv_bytes_floor - before.kv_bytes_floor);
    }
    for (TreeId t : trees) EXPECT_TRUE(engine.DeleteTree(t).ok());
    EXPECT_EQ(engine.free_blocks(), baseline);
    if (testing::Test::HasFailure()) return false;
  }
  return true;
}

// Decodes the cases' leaves alone, then runs them in every mode.
void CheckEveryModeAgainstAlone(const char* what, std::vector<Case> cases) {
  auto start = Clock::now();
  std::unique_ptr<LlamaModel> reference = SyntheticModel(kModelSeed);
  float min_gap = std::numeric_limits<float>::infinity();
  size_t leaves = 0, nodes = 0;
  for (Case& c : cases) {
    DecodeLeavesAlone(*reference, c, &min_gap);
    if (testing::Test::HasFailure()) return;
    leaves += c.leaves.size();
    nodes += c.shape.parent.size();
  }
  std::printf(
      "%s: %zu trees, %zu nodes, %zu branches decoded alone in %.1f s (smallest top-2 "
      "logprob gap %.3g)\n",
      what, cases.size(), nodes, leaves, SecondsSince(start), min_gap);
  for (AttentionMode mode : kAllModes) {
    start = Clock::now();
    SCOPED_TRACE(testing::Message() << "mode " << AttentionModeName(mode));
    float max_error = 0;
    if (!RunCasesInMode(cases, mode, &max_error)) return;
    std::printf("%s, %s: %.1f s, largest logprob difference from alone %.3g\n", what,
                AttentionModeName(mode).data(), SecondsSince(start), max_error);
  }
}

std::string WorkloadPath(const std::string& relative) {
  return WorkloadsDir(DEFT_WORKLOADS_DIR) + "/" + relative;
}

void CheckReasoningFile(const char* file) {
  auto count = CountReasoningTrees(WorkloadPath(file));
  ASSERT_TRUE(count.ok()) << count.status();
  // The README says 100 trees per file; docmergeToT.json holds 50. Every one is checked.
  ASSERT_GE(*count, 50) << file;
  std::vector<Case> cases;
  for (int32_t t = 0; t < *count; ++t) {
    auto tree = LoadReasoningForest(WorkloadPath(file), t, /*prompt_tokens=*/0);
    ASSERT_TRUE(tree.ok()) << tree.status();
    std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>{}(file) + t));
    cases.push_back(MakeCase(tree->name, *tree, kLengthScale, rng));
  }
  CheckEveryModeAgainstAlone(file, std::move(cases));
}

TEST(TreeEngineWorkloads, EverySorting128ToTTreeDecodesLikeItsBranchesAloneInAllModes) {
  CheckReasoningFile(kReasoningFiles[0]);
}

TEST(TreeEngineWorkloads, EveryDocmergeToTTreeDecodesLikeItsBranchesAloneInAllModes) {
  CheckReasoningFile(kReasoningFiles[1]);
}

// Each token tree under a prefix whose last token is the tree's root; every draft node is a
// branch (the leaves decode; inner draft nodes are covered as the leaves' ancestors).
TEST(TreeEngineWorkloads, EverySpeculativeTokenTreeDecodesLikeItsBranchesAloneInAllModes) {
  std::vector<Case> cases;
  std::mt19937 rng(kModelSeed + 1);
  for (int size : kSpeculativeSizes) {
    // Prefixes: one token (the root alone), within a block, across several blocks.
    for (int64_t prefix : {1, 3, 19}) {
      auto tree = LoadSpeculativeForest(
          WorkloadPath("speculative/APPS_tree_size" + std::to_string(size) + ".json"),
          static_cast<int32_t>(prefix));
      ASSERT_TRUE(tree.ok()) << tree.status();
      ASSERT_EQ(tree->parent.size(), static_cast<size_t>(size));
      cases.push_back(
          MakeCase("APPS_tree_size" + std::to_string(size) + " prefix " + std::to_string(prefix),
                   *tree, 1, rng));
    }
  }
  CheckEveryModeAgainstAlone("speculative", std::move(cases));
}

// One prompt (the paper's 4000 tokens, scaled by kLengthScale) shared by W branches, fresh
// (empty: each decodes from the prompt's last token) or 1 and 3 tokens into their generation.
TEST(TreeEngineWorkloads, FewShotBranchesDecodeLikeTheirSequencesAloneInAllModes) {
  std::vector<Case> cases;
  std::mt19937 rng(kModelSeed + 2);
  for (int32_t width : {2, 16, 50}) {
    for (int64_t branch : {0, 1, 3}) {
      cases.push_back(
          MakeCase("few-shot W=" + std::to_string(width) + " branch " + std::to_string(branch),
                   FewShotForest(4000, width, static_cast<int32_t>(branch * kLengthScale)),
                   kLengthScale, rng));
    }
  }
  CheckEveryModeAgainstAlone("few-shot", std::move(cases));
}

// The synthetic model must make the property worth checking: the greedy next token after the
// same last token must depend on the tokens before it (and on their order), or KV that is wrong
// in the engine would go unnoticed.
TEST(SyntheticModel, NextTokenDependsOnTheContext) {
  std::unique_ptr<LlamaModel> model = SyntheticModel(kModelSeed);
  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> token(0, testing_synthetic::kVocab - 1);
  SamplingParams p;
  p.temperature = 0;
  p.max_tokens = 1;
  p.ignore_eos = true;
  auto next = [&](const std::vector<int32_t>& seq) {
    auto r = Generate(*model, seq, p, nullptr);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->tokens[0] : -1;
  };
  int changed_context = 0, changed_order = 0;
  constexpr int kTrials = 200;
  for (int trial = 0; trial < kTrials; ++trial) {
    std::vector<int32_t> a(8), b(8);
    for (int32_t& x : a) x = token(rng);
    for (int32_t& x : b) x = token(rng);
    b.back() = a.back();
    std::vector<int32_t> swapped = a;
    std::swap(swapped[0], swapped[5]);
    changed_context += next(a) != next(b);
    changed_order += next(a) != next(swapped);
  }
  std::printf("next token changed: other context %d / %d, two tokens swapped %d / %d\n",
              changed_context, kTrials, changed_order, kTrials);
  EXPECT_GE(changed_context, kTrials / 2);
  EXPECT_GE(changed_order, kTrials / 10);
}

}  // namespace
}  // namespace deft
