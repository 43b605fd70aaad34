// Attention on every tree of every shared workload (../shared/workloads): both reasoning files
// (every tree of each), the five speculative token trees (every node a query) and few-shot
// prompting with W in {2, 16, 50}. Each tree becomes a forest of segments with scattered slots in
// a KvBlockPool, fresh random K/V and q (never zeros), outputs poisoned with NaN; the four modes
// are run with RunAttentionCpu and each is checked against a naive double-precision reference and
// against flatten within 1e-5 relative, and the plan accounting is checked: flatten, node and
// tree read every unique KV token of the step exactly once, seq reads each query's path.
//
// Cheap shapes keep the sweep fast (< 40 s with ctest -j2 on 2 cores): 2 query heads over 1 KV
// head (GQA ratio 2), head dim 64, one layer; reasoning prompts are 64 tokens (the paper pads
// them to 4000) and node lengths are the recorded ones capped at 128 tokens (recorded lengths go
// up to 1536; uncapped, one pass over the trees takes 14 s alone on 2 cores, capped 3.6 s; each
// tree runs twice, under small chunks and under the default planner options). The shapes of the
// real model and long prompts are covered in cpu_attention_test.cc; here the point is every
// topology.
//
// Seeds: fresh per run (std::random_device) unless DEFT_TEST_SEED is set; a failure prints the
// seed, and DEFT_TEST_SEED=<seed> replays it.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "engine/attention/cpu_attention.h"
#include "engine/attention/partition_plan.h"
#include "engine/kv/kv_block_pool.h"
#include "engine/util/thread_pool.h"
#include "nlohmann/json.hpp"

namespace deft {
namespace {

// fp32 attention against the double reference, and mode against mode: max |out - ref| over a
// (query, head) row, relative to the row's largest |ref|.
constexpr double kMaxRelError = 1e-5;

// The sweep's cheap shape: GQA ratio 2, head dim 64.
constexpr AttentionShape kSweepShape{2, 1, 64};
constexpr int32_t kBlockTokens = 16;
// Reasoning trees: the prompt (node 0) is 64 tokens, other nodes their recorded length capped at
// 128 tokens (still several 32-token tiles, and several chunks under the small options).
constexpr int32_t kReasoningPromptTokens = 64;
constexpr int32_t kMaxNodeTokens = 128;

constexpr AttentionMode kAllModes[] = {AttentionMode::kFlatten, AttentionMode::kSeq,
                                       AttentionMode::kTree, AttentionMode::kNode};

uint32_t SweepSeed() {
  static const uint32_t seed = [] {
    const char* env = std::getenv("DEFT_TEST_SEED");
    const uint32_t s = env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10))
                                      : std::random_device{}();
    std::printf("workload_attention_test seed %u (DEFT_TEST_SEED=%u replays it)\n", s, s);
    return s;
  }();
  return seed;
}

// A step's forest by segment lengths (slots are assigned when it is put into a pool) and its
// queries.
struct Forest {
  std::vector<int32_t> parent, length;
  std::vector<PlanQuery> queries;
  int32_t Add(int32_t p, int32_t len) {
    parent.push_back(p);
    length.push_back(len);
    return static_cast<int32_t>(parent.size()) - 1;
  }
  int64_t tokens() const { return std::accumulate(length.begin(), length.end(), int64_t{0}); }
};

// The same forest with segment indices permuted (parents no longer come before children), so
// that the planner's own DFS ordering is what orders the KV.
Forest Permuted(const Forest& f, std::mt19937& rng) {
  const int32_t n = static_cast<int32_t>(f.parent.size());
  std::vector<int32_t> new_index(n);
  std::iota(new_index.begin(), new_index.end(), 0);
  std::shuffle(new_index.begin(), new_index.end(), rng);
  Forest p;
  p.parent.resize(n);
  p.length.resize(n);
  for (int32_t s = 0; s < n; ++s) {
    p.parent[new_index[s]] = f.parent[s] < 0 ? -1 : new_index[f.parent[s]];
    p.length[new_index[s]] = f.length[s];
  }
  for (const PlanQuery& q : f.queries) p.queries.push_back({new_index[q.segment], q.visible});
  return p;
}

// Max over rows of the row-relative error; rows whose reference is all zero must be exactly 0;
// NaN counts as infinite error.
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

struct SweepStats {
  int64_t forests = 0, queries = 0, kv_tokens = 0;
  double max_error = 0;
};

// Puts `forest` into a fresh pool (slots scattered over the pool, random K/V), draws random q,
// and checks every mode against the double reference, against flatten, and its plan accounting.
// Returns false after the first failing check (the caller stops its sweep).
bool CheckForest(ThreadPool& threads, const Forest& forest, PlannerOptions options,
                 std::mt19937& rng, SweepStats* stats) {
  const AttentionShape& shape = kSweepShape;
  const int64_t H = shape.num_heads, D = shape.head_dim, group = H / shape.num_kv_heads;
  const int64_t total = forest.tokens();
  const KvPoolShape pool_shape{1, shape.num_kv_heads, shape.head_dim, kBlockTokens};
  auto pool_or = KvBlockPool::Create(pool_shape, total / kBlockTokens + 2);
  EXPECT_TRUE(pool_or.ok()) << pool_or.status();
  if (!pool_or.ok()) return false;
  KvBlockPool& pool = **pool_or;

  std::vector<int32_t> all(pool.num_blocks() * kBlockTokens);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<std::vector<int32_t>> slots(forest.length.size());
  int64_t next = 0;
  for (size_t s = 0; s < forest.length.size(); ++s) {
    slots[s].assign(all.begin() + next, all.begin() + next + forest.length[s]);
    next += forest.length[s];
  }
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int32_t slot : all) {
    for (int64_t i = 0; i < pool.kv_dim(); ++i) pool.k(0, slot)[i] = u(rng);
    for (int64_t i = 0; i < pool.kv_dim(); ++i) pool.v(0, slot)[i] = u(rng);
  }
  const int64_t num_queries = static_cast<int64_t>(forest.queries.size());
  std::vector<float> q(num_queries * H * D);
  for (float& x : q) x = 2.f * u(rng);

  // Reference: each query over exactly the tokens it sees (its ancestors' and its own first
  // `visible`), in double. Also the union of what the queries see and the sum of path lengths.
  std::vector<double> ref(q.size(), 0.0);
  std::vector<int32_t> seen_union;
  int64_t path_tokens = 0;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int64_t qi = 0; qi < num_queries; ++qi) {
    const PlanQuery& pq = forest.queries[qi];
    std::vector<int32_t> seen(slots[pq.segment].begin(), slots[pq.segment].begin() + pq.visible);
    for (int32_t a = forest.parent[pq.segment]; a != -1; a = forest.parent[a]) {
      seen.insert(seen.end(), slots[a].begin(), slots[a].end());
    }
    path_tokens += static_cast<int64_t>(seen.size());
    seen_union.insert(seen_union.end(), seen.begin(), seen.end());
    if (seen.empty()) continue;
    std::vector<double> s(seen.size());
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = q.data() + (qi * H + h) * D;
      const int64_t g = h / group;
      double m = -std::numeric_limits<double>::infinity();
      for (size_t t = 0; t < seen.size(); ++t) {
        const float* k = pool.k(0, seen[t]) + g * D;
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(qh[d]) * k[d];
        s[t] = dot * scale;
        m = std::max(m, s[t]);
      }
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - m));
      double* o = ref.data() + (qi * H + h) * D;
      for (size_t t = 0; t < seen.size(); ++t) {
        const float* v = pool.v(0, seen[t]) + g * D;
        for (int64_t d = 0; d < D; ++d) o[d] += s[t] / sum * v[d];
      }
    }
  }
  std::sort(seen_union.begin(), seen_union.end());
  seen_union.erase(std::unique(seen_union.begin(), seen_union.end()), seen_union.end());
  const int64_t unique_tokens = static_cast<int64_t>(seen_union.size());

  std::vector<PlanSegment> segments(forest.length.size());
  for (size_t s = 0; s < segments.size(); ++s) segments[s] = {forest.parent[s], slots[s]};
  options.bytes_per_kv_token = pool_shape.bytes_per_token();
  const int64_t rows = num_queries * H;
  std::vector<double> flatten_out;
  for (AttentionMode mode : kAllModes) {
    SCOPED_TRACE(testing::Message() << "mode " << AttentionModeName(mode));
    options.mode = mode;
    PartitionPlanner planner(options);
    PartitionPlan plan;
    const absl::Status st = planner.Plan(segments, forest.queries, &plan);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return false;

    // Plan accounting: the step's KV is exactly what the queries see; flatten, node and tree
    // read each of those tokens once, seq reads every query's whole path.
    EXPECT_EQ(plan.kv_tokens_unique, unique_tokens);
    EXPECT_EQ(plan.kv_tokens_read, static_cast<int64_t>(plan.kv_slots.size()));
    EXPECT_EQ(plan.kv_bytes_read, plan.kv_tokens_read * options.bytes_per_kv_token);
    EXPECT_EQ(plan.kv_bytes_floor, unique_tokens * options.bytes_per_kv_token);
    if (mode == AttentionMode::kSeq) {
      EXPECT_EQ(plan.kv_tokens_read, path_tokens);
    } else {
      EXPECT_EQ(plan.kv_tokens_read, unique_tokens);
      std::vector<int32_t> read = plan.kv_slots;
      std::sort(read.begin(), read.end());
      EXPECT_EQ(read, seen_union) << "the plan's KV is not each seen token exactly once";
    }

    std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
    RunAttentionCpu(threads, plan, pool, 0, shape, q.data(), out.data());
    const double err = MaxRelError(out, ref, rows, D);
    EXPECT_LE(err, kMaxRelError) << "against the double reference";
    stats->max_error = std::max(stats->max_error, err);
    if (mode == AttentionMode::kFlatten) {
      flatten_out.assign(out.begin(), out.end());
    } else {
      EXPECT_LE(MaxRelError(out, flatten_out, rows, D), kMaxRelError) << "against flatten";
    }
    if (testing::Test::HasFailure()) return false;
  }
  ++stats->forests;
  stats->queries += num_queries;
  stats->kv_tokens += total;
  return true;
}

// Every forest runs under two planner options (fresh data each time): small chunks (many chunks
// per tree, chunks spanning segments, segments cut by max_chunk_tokens, several tiles per entry)
// and the engine's defaults.
std::vector<PlannerOptions> PlannerOptionSets() {
  PlannerOptions small;
  small.min_chunk_tokens = 16;
  small.max_chunk_tokens = 96;
  small.seq_chunk_tokens = 48;
  return {small, PlannerOptions{}};
}

nlohmann::json LoadWorkload(const std::string& relative) {
  const std::string path = std::string(DEFT_WORKLOADS_DIR) + "/" + relative;
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  if (!in.good()) return nlohmann::json();
  return nlohmann::json::parse(in);
}

// A reasoning tree: node 0 is the prompt (kReasoningPromptTokens), other nodes their recorded
// length capped at kMaxNodeTokens; each leaf is a query on its last token (it sees its whole
// path; a leaf of recorded length 0 sees its ancestors).
Forest ReasoningForest(const nlohmann::json& tree) {
  const nlohmann::json& data = tree.at("data");
  Forest f;
  std::vector<std::pair<std::string, int32_t>> stack = {{"0", -1}};
  while (!stack.empty()) {
    const auto [id, parent] = stack.back();
    stack.pop_back();
    const nlohmann::json& node = data.at(id);
    const int32_t len = id == "0" ? kReasoningPromptTokens
                                  : std::min(node.at("value").get<int32_t>(), kMaxNodeTokens);
    const int32_t s = f.Add(parent, len);
    const nlohmann::json& children = node.at("children");
    if (children.empty()) f.queries.push_back({s, len});
    for (const nlohmann::json& c : children) stack.push_back({std::to_string(c.get<int>()), s});
  }
  return f;
}

// A Medusa token tree of Token_Tree_size nodes under a prefix of `prefix` tokens whose last token
// is the tree's (implicit) root: one single-token segment per draft node (the first size - 1
// paths of Tree_Structure), every node a query, the root included.
Forest SpeculativeForest(const nlohmann::json& spec, int32_t prefix) {
  Forest f;
  f.queries.push_back({f.Add(-1, prefix), prefix});
  std::map<std::vector<int>, int32_t> segment_of;
  const int size = spec.at("Token_Tree_size").get<int>();
  const nlohmann::json& paths = spec.at("Tree_Structure");
  for (int i = 0; i + 1 < size && i < static_cast<int>(paths.size()); ++i) {
    const std::vector<int> path = paths[i].get<std::vector<int>>();
    int32_t parent = 0;
    if (path.size() > 1) {
      const auto it = segment_of.find(std::vector<int>(path.begin(), path.end() - 1));
      EXPECT_NE(it, segment_of.end()) << "path " << i << " comes before its parent";
      if (it == segment_of.end()) return f;
      parent = it->second;
    }
    const int32_t s = f.Add(parent, 1);
    segment_of[path] = s;
    f.queries.push_back({s, 1});
  }
  return f;
}

// Few-shot prompting: one prompt shared by W branches that decode in lockstep; each branch tip is
// a query.
Forest FewShotForest(int32_t prompt, int32_t branches, int32_t branch_len) {
  Forest f;
  f.Add(-1, prompt);
  for (int32_t b = 0; b < branches; ++b) f.queries.push_back({f.Add(0, branch_len), branch_len});
  return f;
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

void PrintStats(const char* what, const SweepStats& s, double seconds) {
  std::printf("%s: %lld forests, %lld queries, %lld KV tokens, max relative error %.3g, %.2f s\n",
              what, static_cast<long long>(s.forests), static_cast<long long>(s.queries),
              static_cast<long long>(s.kv_tokens), s.max_error, seconds);
}

class ReasoningWorkloadAttention : public testing::TestWithParam<const char*> {};

TEST_P(ReasoningWorkloadAttention, EveryTreeMatchesTheReferenceInAllModesAndReadsEachTokenOnce) {
  const auto start = std::chrono::steady_clock::now();
  const nlohmann::json trees = LoadWorkload(GetParam());
  ASSERT_TRUE(trees.is_array());
  // The README says 100 trees per file; docmergeToT.json holds 50. Every tree is swept.
  ASSERT_GE(trees.size(), 50u);
  ThreadPool threads(2);
  std::mt19937 rng(SweepSeed() ^ static_cast<uint32_t>(std::hash<std::string>{}(GetParam())));
  SweepStats stats;
  for (size_t t = 0; t < trees.size(); ++t) {
    const Forest recorded = ReasoningForest(trees[t]);
    ASSERT_EQ(recorded.parent.size(), trees[t].at("data").size())
        << "tree " << t << ": not every node is reachable from node 0";
    const Forest forest = Permuted(recorded, rng);
    SCOPED_TRACE(testing::Message()
                 << GetParam() << " tree " << t << " (seed " << SweepSeed() << ")");
    for (const PlannerOptions& options : PlannerOptionSets()) {
      if (!CheckForest(threads, forest, options, rng, &stats)) return;
    }
  }
  EXPECT_EQ(stats.forests, 2 * static_cast<int64_t>(trees.size()));
  PrintStats(GetParam(), stats, Seconds(start));
}

INSTANTIATE_TEST_SUITE_P(Files, ReasoningWorkloadAttention,
                         testing::Values("reasoning/sorting128ToT.json",
                                         "reasoning/docmergeToT.json"),
                         [](const auto& info) {
                           return std::string(info.index == 0 ? "sorting128ToT" : "docmergeToT");
                         });

TEST(WorkloadAttention,
     EverySpeculativeTokenTreeNodeMatchesTheReferenceInAllModesAndReadsEachTokenOnce) {
  const auto start = std::chrono::steady_clock::now();
  ThreadPool threads(2);
  std::mt19937 rng(SweepSeed() + 1);
  SweepStats stats;
  for (int size : {5, 10, 32, 64, 128}) {
    const std::string file = "speculative/APPS_tree_size" + std::to_string(size) + ".json";
    const nlohmann::json spec = LoadWorkload(file);
    ASSERT_TRUE(spec.is_object()) << file;
    // Prefixes: a lone root token, one block-aligned prefix, one that ends mid-block.
    for (int32_t prefix : {1, 64, 333}) {
      const Forest forest = Permuted(SpeculativeForest(spec, prefix), rng);
      ASSERT_EQ(forest.queries.size(), static_cast<size_t>(size)) << file;
      SCOPED_TRACE(testing::Message()
                   << file << " prefix " << prefix << " (seed " << SweepSeed() << ")");
      for (const PlannerOptions& options : PlannerOptionSets()) {
        if (!CheckForest(threads, forest, options, rng, &stats)) return;
      }
    }
  }
  PrintStats("speculative", stats, Seconds(start));
}

TEST(WorkloadAttention, EveryFewShotBranchTipMatchesTheReferenceInAllModesAndReadsEachTokenOnce) {
  const auto start = std::chrono::steady_clock::now();
  ThreadPool threads(2);
  std::mt19937 rng(SweepSeed() + 2);
  SweepStats stats;
  for (int32_t width : {2, 16, 50}) {
    // A 300-token prompt (the paper: 4000), branches 40 tokens into their generation.
    const Forest forest = Permuted(FewShotForest(300, width, 40), rng);
    SCOPED_TRACE(testing::Message() << "few-shot W=" << width << " (seed " << SweepSeed() << ")");
    for (const PlannerOptions& options : PlannerOptionSets()) {
      if (!CheckForest(threads, forest, options, rng, &stats)) return;
    }
  }
  PrintStats("few-shot", stats, Seconds(start));
}

}  // namespace
}  // namespace deft
