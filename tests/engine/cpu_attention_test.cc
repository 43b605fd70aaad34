// CPU tree attention executing partition plans, against a naive per-query reference in double
// (softmax over exactly the tokens the query sees), in all four modes, on random forests and on
// every shared workload (reasoning trees, speculative token trees, few-shot), with fresh random
// q/K/V and the output poisoned before each run. Also MergeStates and thread-count independence.
#include "engine/attention/cpu_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "engine/util/thread_pool.h"
#include "nlohmann/json.hpp"

namespace deft {
namespace {

constexpr AttentionMode kAllModes[] = {AttentionMode::kSeq, AttentionMode::kTree,
                                       AttentionMode::kNode, AttentionMode::kFlatten};

// fp32 attention against the double reference: max |out - ref| over a (query, head) row, relative
// to the row's largest |ref|.
constexpr double kMaxRelError = 1e-5;

// A step's forest by segment lengths; slots are assigned when it is put into a pool.
struct Step {
  std::vector<int32_t> parent, length;
  std::vector<PlanQuery> queries;
  int32_t Add(int32_t p, int32_t len) {
    parent.push_back(p);
    length.push_back(len);
    return static_cast<int32_t>(parent.size()) - 1;
  }
  int64_t tokens() const { return std::accumulate(length.begin(), length.end(), int64_t{0}); }
};

// Max over rows of the row-relative error; rows whose reference is all zero must be exactly 0.
double MaxRelError(const std::vector<float>& out, const std::vector<double>& ref, int64_t rows,
                   int64_t dim) {
  double worst = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double scale = 0, err = 0;
    for (int64_t d = 0; d < dim; ++d) {
      scale = std::max(scale, std::abs(ref[r * dim + d]));
      const double diff = std::abs(static_cast<double>(out[r * dim + d]) - ref[r * dim + d]);
      err = std::isnan(diff) ? std::numeric_limits<double>::infinity() : std::max(err, diff);
    }
    worst = std::max(
        worst, scale == 0 ? (err == 0 ? 0 : std::numeric_limits<double>::infinity()) : err / scale);
  }
  return worst;
}

// Runs every mode on `step` with random data and checks each against the reference and against
// the flatten output.
class Harness {
 public:
  Harness(const Step& step, const AttentionShape& shape, int64_t num_layers, uint32_t seed,
          float q_scale = 2.f)
      : step_(step), shape_(shape), rng_(seed) {
    const int64_t total = step.tokens();
    const int32_t block_tokens = 16;
    auto pool = KvBlockPool::Create({num_layers, shape.num_kv_heads, shape.head_dim, block_tokens},
                                    total / block_tokens + 3);
    EXPECT_TRUE(pool.ok()) << pool.status();
    pool_ = std::move(*pool);
    layer_ = num_layers - 1;
    // Slots scattered over the pool, like blocks handed out over time.
    std::vector<int32_t> all(pool_->num_blocks() * block_tokens);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng_);
    slots_.resize(step.length.size());
    int64_t next = 0;
    for (size_t s = 0; s < step.length.size(); ++s) {
      slots_[s].assign(all.begin() + next, all.begin() + next + step.length[s]);
      next += step.length[s];
    }
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    const int64_t kv_dim = pool_->kv_dim();
    for (int64_t l = 0; l < num_layers; ++l) {
      for (int32_t slot : all) {
        float* k = pool_->k(l, slot);
        float* v = pool_->v(l, slot);
        for (int64_t i = 0; i < kv_dim; ++i) k[i] = u(rng_);
        for (int64_t i = 0; i < kv_dim; ++i) v[i] = u(rng_);
      }
    }
    q_.resize(step.queries.size() * shape.num_heads * shape.head_dim);
    for (float& x : q_) x = q_scale * u(rng_);
    segments_.resize(step.length.size());
    for (size_t s = 0; s < step.length.size(); ++s) segments_[s] = {step.parent[s], slots_[s]};
    Reference();
  }

  // The output of one mode, poisoned with NaN before the run.
  std::vector<float> Run(ThreadPool& pool, const PlannerOptions& options) {
    PartitionPlanner planner(options);
    PartitionPlan plan;
    const absl::Status st = planner.Plan(segments_, step_.queries, &plan);
    EXPECT_TRUE(st.ok()) << st;
    std::vector<float> out(q_.size(), std::numeric_limits<float>::quiet_NaN());
    RunAttentionCpu(pool, plan, *pool_, layer_, shape_, q_.data(), out.data());
    return out;
  }

  // Multiplies the keys of token i of every segment by 1 + growth * i (scores grow along a
  // segment, so the running max moves at every tile) and recomputes the reference.
  void GrowKeys(float growth) {
    for (const std::vector<int32_t>& slots : slots_) {
      for (size_t i = 0; i < slots.size(); ++i) {
        float* k = pool_->k(layer_, slots[i]);
        for (int64_t d = 0; d < pool_->kv_dim(); ++d) k[d] *= 1.f + growth * i;
      }
    }
    Reference();
  }

  void CheckAllModes(ThreadPool& pool, PlannerOptions options) {
    const int64_t rows = static_cast<int64_t>(step_.queries.size()) * shape_.num_heads;
    std::vector<float> flatten;
    for (AttentionMode mode : {AttentionMode::kFlatten, AttentionMode::kSeq, AttentionMode::kTree,
                               AttentionMode::kNode}) {
      options.mode = mode;
      const std::vector<float> out = Run(pool, options);
      const double err = MaxRelError(out, ref_, rows, shape_.head_dim);
      EXPECT_LE(err, kMaxRelError) << "mode " << AttentionModeName(mode);
      max_error_ = std::max(max_error_, err);
      if (mode == AttentionMode::kFlatten) {
        flatten = out;
      } else {
        std::vector<double> as_double(flatten.begin(), flatten.end());
        EXPECT_LE(MaxRelError(out, as_double, rows, shape_.head_dim), kMaxRelError)
            << "mode " << AttentionModeName(mode) << " vs flatten";
      }
    }
  }

  double max_error() const { return max_error_; }

 private:
  // Naive attention in double: each query over exactly its visible tokens.
  void Reference() {
    const int64_t H = shape_.num_heads, D = shape_.head_dim;
    const int64_t group = H / shape_.num_kv_heads;
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    ref_.assign(q_.size(), 0.0);
    for (size_t qi = 0; qi < step_.queries.size(); ++qi) {
      const PlanQuery& pq = step_.queries[qi];
      std::vector<int32_t> seen(slots_[pq.segment].begin(),
                                slots_[pq.segment].begin() + pq.visible);
      for (int32_t a = step_.parent[pq.segment]; a != -1; a = step_.parent[a]) {
        seen.insert(seen.end(), slots_[a].begin(), slots_[a].end());
      }
      if (seen.empty()) continue;
      std::vector<double> s(seen.size());
      for (int64_t h = 0; h < H; ++h) {
        const float* q = q_.data() + (qi * H + h) * D;
        const int64_t g = h / group;
        double m = -std::numeric_limits<double>::infinity();
        for (size_t t = 0; t < seen.size(); ++t) {
          const float* k = pool_->k(layer_, seen[t]) + g * D;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(q[d]) * k[d];
          s[t] = dot * scale;
          m = std::max(m, s[t]);
        }
        double sum = 0;
        for (double& x : s) sum += (x = std::exp(x - m));
        double* o = ref_.data() + (qi * H + h) * D;
        for (size_t t = 0; t < seen.size(); ++t) {
          const float* v = pool_->v(layer_, seen[t]) + g * D;
          for (int64_t d = 0; d < D; ++d) o[d] += s[t] / sum * v[d];
        }
      }
    }
  }

  const Step& step_;
  AttentionShape shape_;
  std::mt19937 rng_;
  std::unique_ptr<KvBlockPool> pool_;
  int64_t layer_ = 0;
  std::vector<std::vector<int32_t>> slots_;
  std::vector<PlanSegment> segments_;
  std::vector<float> q_;
  std::vector<double> ref_;
  double max_error_ = 0;
};

// Small chunks, so that even small steps have many chunks, chunks span segments, and entries
// span several tiles.
PlannerOptions SmallChunks() {
  PlannerOptions o;
  o.min_chunk_tokens = 16;
  o.max_chunk_tokens = 96;
  o.seq_chunk_tokens = 48;
  return o;
}

Step RandomStep(std::mt19937& rng) {
  Step s;
  const int32_t n = std::uniform_int_distribution<int32_t>(1, 10)(rng);
  for (int32_t i = 0; i < n; ++i) {
    const bool root = i == 0 || std::uniform_int_distribution<int>(0, 6)(rng) == 0;
    const int32_t parent = root ? -1 : std::uniform_int_distribution<int32_t>(0, i - 1)(rng);
    const int shape = std::uniform_int_distribution<int>(0, 7)(rng);
    const int32_t len = shape == 0   ? 0
                        : shape == 1 ? std::uniform_int_distribution<int32_t>(200, 400)(rng)
                                     : std::uniform_int_distribution<int32_t>(1, 70)(rng);
    s.Add(parent, len);
  }
  const int32_t nq = std::uniform_int_distribution<int32_t>(1, 10)(rng);
  for (int32_t i = 0; i < nq; ++i) {
    const int32_t seg = std::uniform_int_distribution<int32_t>(0, n - 1)(rng);
    const int32_t visible = std::uniform_int_distribution<int>(0, 1)(rng) == 0
                                ? std::uniform_int_distribution<int32_t>(0, s.length[seg])(rng)
                                : s.length[seg];
    s.queries.push_back({seg, visible});
  }
  return s;
}

struct ShapeCase {
  int64_t heads, kv_heads, head_dim;
};

TEST(CpuAttentionTest, RandomForestsMatchTheReferenceInEveryModeForGqaRatiosAndHeadDims) {
  ThreadPool pool(2);
  std::mt19937 rng(424242);
  double worst = 0;
  // GQA ratios 1, 3, 4 at head dims 64 and 128; then dims that are not multiples of 64.
  for (const ShapeCase sc : {ShapeCase{2, 2, 64}, ShapeCase{6, 2, 64}, ShapeCase{8, 2, 64},
                             ShapeCase{2, 2, 128}, ShapeCase{6, 2, 128}, ShapeCase{8, 2, 128},
                             ShapeCase{4, 2, 80}, ShapeCase{3, 1, 96}, ShapeCase{2, 1, 8}}) {
    for (int iter = 0; iter < 8; ++iter) {
      const Step step = RandomStep(rng);
      SCOPED_TRACE(testing::Message() << "heads " << sc.heads << "/" << sc.kv_heads << " dim "
                                      << sc.head_dim << " iteration " << iter);
      // Every other case with a large q: peaked softmax, the running max moves between tiles.
      Harness h(step, {sc.heads, sc.kv_heads, sc.head_dim}, 2, rng(), iter % 2 ? 8.f : 2.f);
      h.CheckAllModes(pool, SmallChunks());
      worst = std::max(worst, h.max_error());
      if (HasFailure()) return;
    }
  }
  std::printf("random forests: max relative error %.3g\n", worst);
}

TEST(CpuAttentionTest, DegenerateTreesMatchTheReference) {
  ThreadPool pool(2);
  const AttentionShape shape{9, 3, 64};
  Step chain;  // one 3000-token chain, one query
  chain.queries.push_back({chain.Add(-1, 3000), 3000});
  Harness(chain, shape, 1, 1).CheckAllModes(pool, {});
  Step siblings;  // 128 one-token siblings under 500, and the prefix's own query
  siblings.queries.push_back({siblings.Add(-1, 500), 500});
  for (int i = 0; i < 128; ++i) siblings.queries.push_back({siblings.Add(0, 1), 1});
  Harness(siblings, shape, 1, 2).CheckAllModes(pool, {});
  Step prefill;  // a causal prefill of 300 tokens in one segment: query i sees i + 1
  prefill.Add(-1, 300);
  for (int32_t i = 0; i < 300; ++i) prefill.queries.push_back({0, i + 1});
  Harness(prefill, shape, 1, 3).CheckAllModes(pool, SmallChunks());
}

TEST(CpuAttentionTest, ScoresGrowingBeyondTheExpRangeAcrossTilesMatchTheReference) {
  ThreadPool pool(2);
  Step chain;  // keys grow 300x along the chain: the last tiles' scores exceed the first's by >88
  chain.queries.push_back({chain.Add(-1, 600), 600});
  chain.queries.push_back({0, 100});
  Harness h(chain, {4, 2, 64}, 1, 7);
  h.GrowKeys(0.5f);
  h.CheckAllModes(pool, SmallChunks());
  std::printf("growing scores: max relative error %.3g\n", h.max_error());
}

TEST(CpuAttentionTest, OutputDoesNotDependOnTheThreadCount) {
  std::mt19937 rng(99);
  Step step;
  step.Add(-1, 700);
  for (int b = 0; b < 12; ++b) step.queries.push_back({step.Add(0, 30 + 17 * b), 30 + 17 * b});
  step.queries.push_back({0, 650});
  Harness h(step, {8, 2, 64}, 1, 5);
  for (AttentionMode mode : kAllModes) {
    PlannerOptions o = SmallChunks();
    o.mode = mode;
    ThreadPool one(1), two(2), three(3);
    const std::vector<float> a = h.Run(one, o), b = h.Run(two, o), c = h.Run(three, o);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
        << AttentionModeName(mode);
    EXPECT_EQ(std::memcmp(a.data(), c.data(), a.size() * sizeof(float)), 0)
        << AttentionModeName(mode);
  }
}

TEST(CpuAttentionTest, QueriesThatSeeNothingGetZeros) {
  ThreadPool pool(2);
  Step step;
  step.Add(-1, 40);
  step.Add(0, 10);
  step.queries = {{0, 0}, {1, 10}, {0, 0}};
  Harness(step, {4, 2, 64}, 1, 6).CheckAllModes(pool, SmallChunks());
}

// MergeStates.

struct State {
  std::vector<float> o;
  float lse;
};

State RandomState(std::mt19937& rng, int64_t dim) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  State s{std::vector<float>(dim), 3.f * u(rng)};
  for (float& x : s.o) x = u(rng);
  return s;
}

State Merged(State a, const State& b) {
  MergeStates(a.o.data(), &a.lse, b.o.data(), b.lse, static_cast<int64_t>(a.o.size()));
  return a;
}

TEST(MergeStatesTest, MatchesTheDefinitionAndIsAssociativeWithinRounding) {
  std::mt19937 rng(11);
  const int64_t dim = 72;  // not a multiple of 8
  for (int iter = 0; iter < 200; ++iter) {
    const State a = RandomState(rng, dim), b = RandomState(rng, dim), c = RandomState(rng, dim);
    // Definition, in double.
    const double ea = std::exp(double{a.lse}), eb = std::exp(double{b.lse});
    const State ab = Merged(a, b);
    EXPECT_NEAR(ab.lse, std::log(ea + eb), 1e-6);
    for (int64_t d = 0; d < dim; ++d) {
      EXPECT_NEAR(ab.o[d], (ea * a.o[d] + eb * b.o[d]) / (ea + eb), 1e-6);
    }
    const State left = Merged(ab, c), right = Merged(a, Merged(b, c));
    EXPECT_NEAR(left.lse, right.lse, 1e-6);
    for (int64_t d = 0; d < dim; ++d) EXPECT_NEAR(left.o[d], right.o[d], 2e-6);
  }
}

TEST(MergeStatesTest, FarApartLogSumExpsKeepTheLargerStateWithoutOverflow) {
  std::mt19937 rng(12);
  const State a = RandomState(rng, 64);
  State big = RandomState(rng, 64);
  big.lse = 500.f;  // e^500 overflows float; the merge must not form it
  const State m = Merged(a, big);
  EXPECT_FLOAT_EQ(m.lse, 500.f);
  for (int d = 0; d < 64; ++d) EXPECT_FLOAT_EQ(m.o[d], big.o[d]);
}

TEST(MergeStatesTest, MinusInfinityIsTheEmptyState) {
  std::mt19937 rng(13);
  const State a = RandomState(rng, 64);
  State empty{std::vector<float>(64, 0.f), -std::numeric_limits<float>::infinity()};
  // a + empty = a, bit for bit.
  const State a_empty = Merged(a, empty);
  EXPECT_EQ(a_empty.lse, a.lse);
  EXPECT_EQ(a_empty.o, a.o);
  // empty + a = a, whatever the empty state's o held.
  State garbage = empty;
  for (float& x : garbage.o) x = std::numeric_limits<float>::quiet_NaN();
  const State empty_a = Merged(garbage, a);
  EXPECT_EQ(empty_a.lse, a.lse);
  EXPECT_EQ(empty_a.o, a.o);
  // empty + empty stays empty.
  const State both = Merged(empty, empty);
  EXPECT_EQ(both.lse, -std::numeric_limits<float>::infinity());
  EXPECT_EQ(both.o, empty.o);
}

// Shared workloads.

nlohmann::json LoadJson(const std::string& relative) {
  const std::string path = std::string(DEFT_WORKLOADS_DIR) + "/" + relative;
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return nlohmann::json::parse(in);
}

// A reasoning tree: node 0 is the prompt (length replaced by prompt_len), every leaf is a query
// that sees its whole path.
Step ReasoningStep(const nlohmann::json& tree, int32_t prompt_len) {
  const nlohmann::json& data = tree.at("data");
  Step step;
  std::vector<std::pair<std::string, int32_t>> stack = {{"0", -1}};
  while (!stack.empty()) {
    auto [id, parent] = stack.back();
    stack.pop_back();
    const nlohmann::json& node = data.at(id);
    const int32_t len = id == "0" ? prompt_len : node.at("value").get<int32_t>();
    const int32_t s = step.Add(parent, len);
    const nlohmann::json& children = node.at("children");
    if (children.empty()) step.queries.push_back({s, len});
    for (auto it = children.rbegin(); it != children.rend(); ++it) {
      stack.push_back({std::to_string(it->get<int>()), s});
    }
  }
  return step;
}

// A Medusa token tree of Token_Tree_size nodes (its first size - 1 paths, parents before
// children) under a prefix whose last token is the tree's root; every node is a query.
Step SpeculativeStep(const nlohmann::json& spec, int32_t prefix) {
  Step step;
  step.queries.push_back({step.Add(-1, prefix), prefix});
  std::map<std::vector<int>, int32_t> segment_of;
  const int size = spec.at("Token_Tree_size").get<int>();
  const nlohmann::json& paths = spec.at("Tree_Structure");
  for (int i = 0; i + 1 < size && i < static_cast<int>(paths.size()); ++i) {
    const std::vector<int> path = paths[i].get<std::vector<int>>();
    int32_t parent = 0;
    if (path.size() > 1) {
      auto it = segment_of.find(std::vector<int>(path.begin(), path.end() - 1));
      EXPECT_NE(it, segment_of.end()) << "path " << i << " before its parent";
      if (it == segment_of.end()) return step;
      parent = it->second;
    }
    const int32_t s = step.Add(parent, 1);
    segment_of[path] = s;
    step.queries.push_back({s, 1});
  }
  return step;
}

Step FewShotStep(int32_t prompt, int32_t branches, int32_t branch_len) {
  Step step;
  step.Add(-1, prompt);
  for (int32_t b = 0; b < branches; ++b) {
    step.queries.push_back({step.Add(0, branch_len), branch_len});
  }
  return step;
}

const AttentionShape kSmolLm{9, 3, 64};
const AttentionShape kLlama8b{32, 8, 128};

TEST(CpuAttentionWorkloadTest, ReasoningTreesMatchTheReference) {
  ThreadPool pool(2);
  uint32_t seed = 100;
  for (const char* file : {"reasoning/sorting128ToT.json", "reasoning/docmergeToT.json"}) {
    const nlohmann::json trees = LoadJson(file);
    ASSERT_GE(trees.size(), 3u);
    for (int t = 0; t < 3; ++t) {
      const Step step = ReasoningStep(trees[t], 256);
      SCOPED_TRACE(testing::Message() << file << " tree " << t << ", prompt 256");
      Harness(step, kSmolLm, 1, ++seed).CheckAllModes(pool, {});
    }
    // Full size, the prompt padded to 4000 as in the paper.
    const Step full = ReasoningStep(trees[0], 4000);
    SCOPED_TRACE(testing::Message() << file << " tree 0, prompt 4000");
    Harness(full, kSmolLm, 1, ++seed).CheckAllModes(pool, {});
  }
}

TEST(CpuAttentionWorkloadTest, SpeculativeTokenTreesMatchTheReference) {
  ThreadPool pool(2);
  uint32_t seed = 200;
  for (int size : {5, 10, 32, 64, 128}) {
    const std::string file = "speculative/APPS_tree_size" + std::to_string(size) + ".json";
    const nlohmann::json spec = LoadJson(file);
    const Step step = SpeculativeStep(spec, 300);
    ASSERT_EQ(step.queries.size(), static_cast<size_t>(size)) << file;
    for (const AttentionShape& shape : {kSmolLm, kLlama8b}) {
      SCOPED_TRACE(testing::Message() << file << " heads " << shape.num_heads);
      Harness(step, shape, 1, ++seed).CheckAllModes(pool, {});
    }
  }
}

TEST(CpuAttentionWorkloadTest, FewShotBranchesMatchTheReference) {
  ThreadPool pool(2);
  Harness(FewShotStep(256, 8, 64), kSmolLm, 1, 300).CheckAllModes(pool, {});
  Harness(FewShotStep(1000, 16, 40), kLlama8b, 1, 301).CheckAllModes(pool, {});
}

}  // namespace
}  // namespace deft
