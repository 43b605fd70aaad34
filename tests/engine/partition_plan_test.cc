// The DeFT partition planner against a brute-force reading of the visibility definition (a query
// sees every token of its segment's ancestors and the first `visible` of its own), on hand-made
// and random forests in all four modes: coverage (every visible (query, token) pair exactly once),
// structure (reduction lists, masks, chunk sizes), IO accounting, error messages, speed.
#include "engine/attention/partition_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/match.h"

namespace deft {
namespace {

constexpr AttentionMode kAllModes[] = {AttentionMode::kSeq, AttentionMode::kTree,
                                       AttentionMode::kNode, AttentionMode::kFlatten};

// A forest that owns its slot vectors.
struct Forest {
  std::vector<int32_t> parent;
  std::vector<std::vector<int32_t>> slots;
  std::vector<PlanQuery> queries;

  int32_t Add(int32_t p, std::vector<int32_t> s) {
    parent.push_back(p);
    slots.push_back(std::move(s));
    return static_cast<int32_t>(parent.size()) - 1;
  }
  std::vector<PlanSegment> Segments() const {
    std::vector<PlanSegment> out(parent.size());
    for (size_t i = 0; i < parent.size(); ++i) out[i] = {parent[i], slots[i]};
    return out;
  }
  // The visibility definition, as a multiset of slots (slots may repeat across segments).
  std::multiset<int32_t> Visible(const PlanQuery& q) const {
    std::multiset<int32_t> out(slots[q.segment].begin(), slots[q.segment].begin() + q.visible);
    for (int32_t a = parent[q.segment]; a != -1; a = parent[a]) {
      out.insert(slots[a].begin(), slots[a].end());
    }
    return out;
  }
};

std::vector<int32_t> Range(int32_t begin, int32_t n) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), begin);
  return v;
}

bool Bit(const PartitionPlan& plan, int32_t e, int32_t j) {
  return ((plan.masks[plan.entry_mask_begin[e] + j / 64] >> (j % 64)) & 1) != 0;
}
bool MaskFree(const PartitionPlan& plan, int32_t e) {
  return plan.entry_mask_begin[e] == plan.entry_mask_begin[e + 1];
}
int32_t ChunkLen(const PartitionPlan& plan, int32_t c) {
  return plan.chunk_begin[c + 1] - plan.chunk_begin[c];
}

// Structure and coverage checks shared by every mode.
void CheckPlan(const Forest& f, const PlannerOptions& options, const PartitionPlan& plan) {
  const int32_t nq = static_cast<int32_t>(f.queries.size());
  ASSERT_EQ(plan.mode, options.mode);
  ASSERT_EQ(plan.num_queries(), nq);
  // Offsets arrays: start at 0, non-decreasing, end at their arrays' sizes.
  ASSERT_EQ(plan.chunk_begin.front(), 0);
  ASSERT_EQ(plan.chunk_begin.back(), static_cast<int32_t>(plan.kv_slots.size()));
  ASSERT_EQ(plan.entry_begin.size(), plan.chunk_begin.size());
  ASSERT_EQ(plan.entry_begin.front(), 0);
  ASSERT_EQ(plan.entry_begin.back(), plan.num_entries());
  ASSERT_EQ(plan.entry_mask_begin.size(), static_cast<size_t>(plan.num_entries()) + 1);
  ASSERT_EQ(plan.entry_mask_begin.front(), 0);
  ASSERT_EQ(plan.entry_mask_begin.back(), static_cast<int32_t>(plan.masks.size()));
  ASSERT_EQ(plan.query_entry_begin.front(), 0);
  ASSERT_EQ(plan.query_entry_begin.back(), static_cast<int32_t>(plan.query_entries.size()));
  for (int32_t c = 0; c < plan.num_chunks(); ++c) {
    ASSERT_GT(ChunkLen(plan, c), 0) << "chunk " << c;
    ASSERT_LE(plan.entry_begin[c], plan.entry_begin[c + 1]);
  }
  for (int32_t q = 0; q < nq; ++q) {
    ASSERT_LE(plan.query_entry_begin[q], plan.query_entry_begin[q + 1]);
  }

  // Every entry is in exactly one reduction list, its own query's, and each list is in
  // increasing chunk order.
  std::vector<int32_t> entry_chunk(plan.num_entries());
  for (int32_t c = 0; c < plan.num_chunks(); ++c) {
    for (int32_t e = plan.entry_begin[c]; e < plan.entry_begin[c + 1]; ++e) entry_chunk[e] = c;
  }
  std::vector<int32_t> seen(plan.num_entries(), 0);
  for (int32_t q = 0; q < nq; ++q) {
    int32_t last_chunk = -1;
    for (int32_t k = plan.query_entry_begin[q]; k < plan.query_entry_begin[q + 1]; ++k) {
      const int32_t e = plan.query_entries[k];
      ASSERT_GE(e, 0);
      ASSERT_LT(e, plan.num_entries());
      ++seen[e];
      EXPECT_EQ(plan.entry_query[e], q) << "entry " << e;
      EXPECT_GT(entry_chunk[e], last_chunk) << "query " << q << " merge order";
      last_chunk = entry_chunk[e];
    }
  }
  for (int32_t e = 0; e < plan.num_entries(); ++e) EXPECT_EQ(seen[e], 1) << "entry " << e;

  // Entries of a chunk: increasing query order, each query at most once. Masks: ceil(len / 64)
  // words, no bit past the chunk's end, never all ones (then the entry must be mask-free), and
  // all zero only in mode tree.
  for (int32_t c = 0; c < plan.num_chunks(); ++c) {
    const int32_t len = ChunkLen(plan, c);
    for (int32_t e = plan.entry_begin[c]; e < plan.entry_begin[c + 1]; ++e) {
      if (e > plan.entry_begin[c]) {
        EXPECT_LT(plan.entry_query[e - 1], plan.entry_query[e]);
      }
      if (MaskFree(plan, e)) continue;
      ASSERT_EQ(plan.entry_mask_begin[e + 1] - plan.entry_mask_begin[e], (len + 63) / 64);
      int32_t bits = 0;
      for (int32_t j = 0; j < len; ++j) bits += Bit(plan, e, j);
      if (len % 64 != 0) {
        const uint64_t last = plan.masks[plan.entry_mask_begin[e + 1] - 1];
        EXPECT_EQ(last >> (len % 64), 0u) << "entry " << e << " has bits past the chunk";
      }
      EXPECT_LT(bits, len) << "entry " << e << " sees the whole chunk but has a mask";
      if (options.mode != AttentionMode::kTree) {
        EXPECT_GT(bits, 0) << "entry " << e << " sees nothing";
      }
    }
  }

  // Coverage by brute force: the (query, slot) pairs the entries cover, with multiplicity, equal
  // exactly each query's visible multiset.
  std::vector<std::multiset<int32_t>> covered(nq);
  for (int32_t c = 0; c < plan.num_chunks(); ++c) {
    for (int32_t e = plan.entry_begin[c]; e < plan.entry_begin[c + 1]; ++e) {
      for (int32_t j = 0; j < ChunkLen(plan, c); ++j) {
        if (MaskFree(plan, e) || Bit(plan, e, j)) {
          covered[plan.entry_query[e]].insert(plan.kv_slots[plan.chunk_begin[c] + j]);
        }
      }
    }
  }
  for (int32_t q = 0; q < nq; ++q) {
    EXPECT_EQ(covered[q], f.Visible(f.queries[q])) << "query " << q;
  }

  // Accounting: reads are the sum of chunk lengths, unique the distinct slots the step sees.
  std::set<int32_t> step_slots;
  int64_t path_tokens = 0;
  for (const PlanQuery& q : f.queries) {
    const auto v = f.Visible(q);
    step_slots.insert(v.begin(), v.end());
    path_tokens += static_cast<int64_t>(v.size());
  }
  EXPECT_EQ(plan.kv_tokens_read, static_cast<int64_t>(plan.kv_slots.size()));
  EXPECT_EQ(plan.kv_tokens_unique, static_cast<int64_t>(step_slots.size()));
  EXPECT_EQ(plan.kv_bytes_read, plan.kv_tokens_read * options.bytes_per_kv_token);
  EXPECT_EQ(plan.kv_bytes_floor, plan.kv_tokens_unique * options.bytes_per_kv_token);
  if (options.mode == AttentionMode::kSeq) {
    EXPECT_EQ(plan.kv_tokens_read, path_tokens);
  }
}

// In modes flatten, node and tree each token of the step is in kv_slots exactly once (so read
// once per step) when segments hold distinct slots.
void CheckReadOnce(const Forest& f, const PartitionPlan& plan) {
  std::multiset<int32_t> step;
  for (const PlanQuery& q : f.queries) {
    for (int32_t s : f.Visible(q)) step.insert(s);
  }
  std::set<int32_t> unique(step.begin(), step.end());
  std::multiset<int32_t> read(plan.kv_slots.begin(), plan.kv_slots.end());
  EXPECT_EQ(read, std::multiset<int32_t>(unique.begin(), unique.end()));
  EXPECT_EQ(plan.kv_tokens_read, plan.kv_tokens_unique);
}

int32_t FlattenChunkTokens(const PlannerOptions& o, int32_t total) {
  return std::clamp((total + o.min_chunks - 1) / o.min_chunks, o.min_chunk_tokens,
                    o.max_chunk_tokens);
}

// Mode-specific chunking rules.
void CheckChunking(const Forest& f, const PlannerOptions& o, const PartitionPlan& plan) {
  const int32_t n = plan.num_chunks();
  const int32_t nq = static_cast<int32_t>(f.queries.size());
  switch (o.mode) {
    case AttentionMode::kFlatten: {
      if (!o.flatten_chunk_tokens.empty()) {
        // The given lengths in order, the last repeated; only the last chunk may be shorter.
        const std::vector<int32_t>& len = o.flatten_chunk_tokens;
        for (int32_t c = 0; c < n; ++c) {
          const int32_t want = len[std::min<size_t>(c, len.size() - 1)];
          if (c + 1 < n) {
            EXPECT_EQ(ChunkLen(plan, c), want) << "chunk " << c;
          } else {
            EXPECT_LE(ChunkLen(plan, c), want) << "chunk " << c;
            EXPECT_GE(ChunkLen(plan, c), 1) << "chunk " << c;
          }
        }
        break;
      }
      const int32_t size = FlattenChunkTokens(o, static_cast<int32_t>(plan.kv_slots.size()));
      for (int32_t c = 0; c + 1 < n; ++c) EXPECT_EQ(ChunkLen(plan, c), size) << "chunk " << c;
      if (n > 0) {
        EXPECT_LE(ChunkLen(plan, n - 1), size);
      }
      break;
    }
    case AttentionMode::kNode: {
      // Each chunk within one segment's tokens, at most max_chunk_tokens long.
      std::map<int32_t, int32_t> segment_of;
      for (size_t s = 0; s < f.slots.size(); ++s) {
        for (int32_t slot : f.slots[s]) segment_of[slot] = static_cast<int32_t>(s);
      }
      for (int32_t c = 0; c < n; ++c) {
        EXPECT_LE(ChunkLen(plan, c), o.max_chunk_tokens);
        const int32_t s0 = segment_of[plan.kv_slots[plan.chunk_begin[c]]];
        for (int32_t t = plan.chunk_begin[c]; t < plan.chunk_begin[c + 1]; ++t) {
          EXPECT_EQ(segment_of[plan.kv_slots[t]], s0) << "chunk " << c << " spans segments";
        }
      }
      break;
    }
    case AttentionMode::kTree:
      for (int32_t c = 0; c < n; ++c) {
        EXPECT_LE(ChunkLen(plan, c), o.seq_chunk_tokens);
        EXPECT_EQ(plan.entry_begin[c + 1] - plan.entry_begin[c], nq) << "chunk " << c;
      }
      break;
    case AttentionMode::kSeq:
      for (int32_t c = 0; c < n; ++c) {
        EXPECT_LE(ChunkLen(plan, c), o.seq_chunk_tokens);
        ASSERT_EQ(plan.entry_begin[c + 1] - plan.entry_begin[c], 1) << "chunk " << c;
        EXPECT_TRUE(MaskFree(plan, plan.entry_begin[c]));
      }
      break;
  }
}

Forest RandomForest(std::mt19937& rng) {
  Forest f;
  const int32_t n = std::uniform_int_distribution<int32_t>(1, 12)(rng);
  // Parents drawn in a random topological order, then indices shuffled so that a parent may
  // have a larger index than its child.
  std::vector<int32_t> perm = Range(0, n);
  std::shuffle(perm.begin(), perm.end(), rng);
  f.parent.assign(n, -1);
  f.slots.resize(n);
  for (int32_t i = 1; i < n; ++i) {
    if (std::uniform_int_distribution<int>(0, 5)(rng) == 0) continue;  // another root
    f.parent[perm[i]] = perm[std::uniform_int_distribution<int32_t>(0, i - 1)(rng)];
  }
  // Distinct slots, scattered like pool slots.
  int32_t next_slot = std::uniform_int_distribution<int32_t>(0, 100)(rng);
  for (int32_t s = 0; s < n; ++s) {
    const int shape = std::uniform_int_distribution<int>(0, 9)(rng);
    const int32_t len = shape == 0   ? 0
                        : shape == 1 ? std::uniform_int_distribution<int32_t>(65, 200)(rng)
                                     : std::uniform_int_distribution<int32_t>(1, 40)(rng);
    for (int32_t i = 0; i < len; ++i) {
      next_slot += std::uniform_int_distribution<int32_t>(1, 3)(rng);
      f.slots[s].push_back(next_slot);
    }
    std::shuffle(f.slots[s].begin(), f.slots[s].end(), rng);
  }
  const int32_t nq = std::uniform_int_distribution<int32_t>(0, 10)(rng);
  for (int32_t i = 0; i < nq; ++i) {
    const int32_t s = std::uniform_int_distribution<int32_t>(0, n - 1)(rng);
    const int32_t len = static_cast<int32_t>(f.slots[s].size());
    const int32_t visible = std::uniform_int_distribution<int>(0, 2)(rng) == 0
                                ? std::uniform_int_distribution<int32_t>(0, len)(rng)
                                : len;
    f.queries.push_back({s, visible});
  }
  return f;
}

PlannerOptions RandomOptions(std::mt19937& rng, AttentionMode mode) {
  PlannerOptions o;
  o.mode = mode;
  o.min_chunks = std::uniform_int_distribution<int32_t>(1, 8)(rng);
  o.min_chunk_tokens = std::uniform_int_distribution<int32_t>(1, 16)(rng);
  o.max_chunk_tokens = std::uniform_int_distribution<int32_t>(o.min_chunk_tokens, 150)(rng);
  o.seq_chunk_tokens = std::uniform_int_distribution<int32_t>(1, 150)(rng);
  o.bytes_per_kv_token = std::uniform_int_distribution<int64_t>(1, 1 << 20)(rng);
  if (mode == AttentionMode::kFlatten && std::uniform_int_distribution<int>(0, 2)(rng) == 0) {
    // Explicit chunk lengths (attention_bench --chunk_list).
    const int32_t n = std::uniform_int_distribution<int32_t>(1, 5)(rng);
    for (int32_t i = 0; i < n; ++i) {
      o.flatten_chunk_tokens.push_back(std::uniform_int_distribution<int32_t>(1, 100)(rng));
    }
  }
  return o;
}

TEST(PartitionPlanTest, RandomForestsCoverEveryVisiblePairExactlyOnceInEveryMode) {
  std::mt19937 rng(20261124);
  PartitionPlan plan;
  for (int iter = 0; iter < 300; ++iter) {
    const Forest f = RandomForest(rng);
    const auto segments = f.Segments();
    for (AttentionMode mode : kAllModes) {
      const PlannerOptions o = RandomOptions(rng, mode);
      PartitionPlanner planner(o);
      ASSERT_TRUE(planner.Plan(segments, f.queries, &plan).ok());
      SCOPED_TRACE(testing::Message()
                   << "iteration " << iter << " mode " << AttentionModeName(mode));
      CheckPlan(f, o, plan);
      CheckChunking(f, o, plan);
      if (mode != AttentionMode::kSeq) CheckReadOnce(f, plan);
      if (HasFatalFailure() || HasFailure()) return;
    }
  }
}

TEST(PartitionPlanTest, OnePlannerReusedAcrossStepsGivesTheSamePlansAsFreshOnes) {
  std::mt19937 rng(7);
  for (AttentionMode mode : kAllModes) {
    PlannerOptions o;
    o.mode = mode;
    o.min_chunk_tokens = 4;
    o.seq_chunk_tokens = 16;
    PartitionPlanner reused(o);
    PartitionPlan a, b;
    for (int iter = 0; iter < 40; ++iter) {
      const Forest f = RandomForest(rng);
      const auto segments = f.Segments();
      ASSERT_TRUE(reused.Plan(segments, f.queries, &a).ok());
      PartitionPlanner fresh(o);
      ASSERT_TRUE(fresh.Plan(segments, f.queries, &b).ok());
      EXPECT_EQ(a.kv_slots, b.kv_slots);
      EXPECT_EQ(a.chunk_begin, b.chunk_begin);
      EXPECT_EQ(a.entry_begin, b.entry_begin);
      EXPECT_EQ(a.entry_query, b.entry_query);
      EXPECT_EQ(a.entry_mask_begin, b.entry_mask_begin);
      EXPECT_EQ(a.masks, b.masks);
      EXPECT_EQ(a.query_entry_begin, b.query_entry_begin);
      EXPECT_EQ(a.query_entries, b.query_entries);
      EXPECT_EQ(a.kv_tokens_unique, b.kv_tokens_unique);
    }
  }
}

// 0 -> {2, 4}, 1 -> {3}, segment indices chosen so that index order is not DFS order.
Forest SmallForest() {
  Forest f;
  f.Add(-1, Range(100, 3));  // 0
  f.Add(-1, Range(200, 2));  // 1
  f.Add(0, Range(300, 2));   // 2
  f.Add(1, Range(400, 1));   // 3
  f.Add(0, Range(500, 2));   // 4
  f.queries = {{4, 2}, {2, 1}, {3, 1}, {0, 3}};
  return f;
}

TEST(PartitionPlanTest, SegmentsAreFlattenedInDepthFirstOrderOfIncreasingIndex) {
  const Forest f = SmallForest();
  PartitionPlanner planner({});
  PartitionPlan plan;
  ASSERT_TRUE(planner.Plan(f.Segments(), f.queries, &plan).ok());
  // 0, its children 2 (first token only: query 1 sees 1 of 2) and 4, then 1 and 3.
  EXPECT_EQ(plan.kv_slots, (std::vector<int32_t>{100, 101, 102, 300, 500, 501, 200, 201, 400}));
}

TEST(PartitionPlanTest, TokensThatNoQuerySeesAreLeftOut) {
  Forest f;
  f.Add(-1, Range(0, 10));  // 0: a query below, all 10 tokens
  f.Add(0, Range(10, 5));   // 1: its own query sees 3 of 5
  f.Add(0, Range(20, 4));   // 2: no query in its subtree
  f.Add(2, Range(30, 4));   // 3: no query
  f.Add(-1, Range(40, 6));  // 4: two queries, the larger sees 4
  f.queries = {{1, 3}, {4, 2}, {4, 4}};
  for (AttentionMode mode : kAllModes) {
    PlannerOptions o;
    o.mode = mode;
    PartitionPlanner planner(o);
    PartitionPlan plan;
    ASSERT_TRUE(planner.Plan(f.Segments(), f.queries, &plan).ok());
    EXPECT_EQ(plan.kv_tokens_unique, 10 + 3 + 4) << AttentionModeName(mode);
    if (mode == AttentionMode::kSeq) {
      EXPECT_EQ(plan.kv_tokens_read, 13 + 2 + 4);
    } else {
      EXPECT_EQ(plan.kv_slots,
                (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43}));
    }
  }
}

TEST(PartitionPlanTest, FlattenChunkSizeFollowsTheClampedFormula) {
  PlannerOptions o;  // min_chunks 8, tokens in [32, 512]
  for (int32_t total : {1, 31, 32, 255, 256, 257, 1000, 4095, 4096, 4097, 30000}) {
    Forest f;
    f.Add(-1, Range(0, total));
    f.queries = {{0, total}};
    PartitionPlanner planner(o);
    PartitionPlan plan;
    ASSERT_TRUE(planner.Plan(f.Segments(), f.queries, &plan).ok());
    const int32_t expected = total <= 256 ? 32 : total <= 4096 ? (total + 7) / 8 : 512;
    ASSERT_GE(plan.num_chunks(), 1);
    EXPECT_EQ(ChunkLen(plan, 0), std::min(expected, total)) << total;
    EXPECT_EQ(plan.num_chunks(), (total + expected - 1) / expected) << total;
    CheckChunking(f, o, plan);
  }
}

TEST(PartitionPlanTest, FlattenChunksSpanSegmentBoundariesWithMasks) {
  // Prompt of 40 and two branches of 30: chunks of 32 cut across both boundaries.
  Forest f;
  f.Add(-1, Range(0, 40));
  f.Add(0, Range(100, 30));
  f.Add(0, Range(200, 30));
  f.queries = {{1, 30}, {2, 30}};
  PlannerOptions o;
  PartitionPlanner planner(o);
  PartitionPlan plan;
  ASSERT_TRUE(planner.Plan(f.Segments(), f.queries, &plan).ok());
  ASSERT_EQ(plan.chunk_begin, (std::vector<int32_t>{0, 32, 64, 96, 100}));
  // Flattened: prompt [0, 40), branch 1 [40, 70), branch 2 [70, 100). Chunk 0: prompt only.
  // Chunk 1: 8 prompt tokens + 24 of branch 1. Chunk 2: 6 of branch 1 + 26 of branch 2. Chunk 3:
  // the rest of branch 2.
  ASSERT_EQ(plan.entry_begin, (std::vector<int32_t>{0, 2, 4, 6, 7}));
  EXPECT_TRUE(MaskFree(plan, 0));
  EXPECT_TRUE(MaskFree(plan, 1));
  EXPECT_TRUE(MaskFree(plan, 2));   // query 0 sees all of chunk 1 (8 prompt + 24 of its branch)
  ASSERT_FALSE(MaskFree(plan, 3));  // query 1 sees the first 8
  EXPECT_EQ(plan.masks[plan.entry_mask_begin[3]], 0xFFull);
  EXPECT_EQ(plan.masks[plan.entry_mask_begin[4]], 0x3Full);        // query 0: 6 of branch 1
  EXPECT_EQ(plan.masks[plan.entry_mask_begin[5]], 0xFFFFFFC0ull);  // query 1: 26 of branch 2
  EXPECT_TRUE(MaskFree(plan, 6));
  CheckPlan(f, o, plan);
}

TEST(PartitionPlanTest, NodeSplitsLongSegmentsAtMaxChunkTokens) {
  Forest f;
  f.Add(-1, Range(0, 1100));
  f.Add(0, Range(2000, 10));
  f.Add(0, Range(3000, 20));
  f.queries = {{1, 10}, {2, 20}, {0, 1000}};
  PlannerOptions o;
  o.mode = AttentionMode::kNode;
  PartitionPlanner planner(o);
  PartitionPlan plan;
  ASSERT_TRUE(planner.Plan(f.Segments(), f.queries, &plan).ok());
  EXPECT_EQ(plan.chunk_begin, (std::vector<int32_t>{0, 512, 1024, 1100, 1110, 1130}));
  CheckPlan(f, o, plan);
  CheckChunking(f, o, plan);
  CheckReadOnce(f, plan);
}

TEST(PartitionPlanTest, TreeModeGivesEveryQueryAnEntryInEveryChunkEvenWithAnEmptyMask) {
  // A prefix of 8 and two single-token drafts, chunks of 4: the last chunk holds the two drafts,
  // of which the prefix's query sees neither.
  Forest f;
  f.Add(-1, Range(0, 8));
  f.Add(0, {50});
  f.Add(0, {60});
  f.queries = {{0, 8}, {1, 1}, {2, 1}};
  PlannerOptions o;
  o.mode = AttentionMode::kTree;
  o.seq_chunk_tokens = 4;
  PartitionPlanner planner(o);
  PartitionPlan plan;
  ASSERT_TRUE(planner.Plan(f.Segments(), f.queries, &plan).ok());
  ASSERT_EQ(plan.num_chunks(), 3);
  EXPECT_EQ(plan.num_entries(), 9);
  // Chunk 2 = {50, 60}: query 0 sees none (all-zero mask), 1 sees 50, 2 sees 60.
  const int32_t e = plan.entry_begin[2];
  ASSERT_FALSE(MaskFree(plan, e));
  EXPECT_EQ(plan.masks[plan.entry_mask_begin[e]], 0u);
  EXPECT_EQ(plan.masks[plan.entry_mask_begin[e + 1]], 1u);
  EXPECT_EQ(plan.masks[plan.entry_mask_begin[e + 2]], 2u);
  EXPECT_EQ(plan.kv_tokens_read, 10);
  CheckPlan(f, o, plan);
}

TEST(PartitionPlanTest, AccountingCountsPathsForSeqAndUniqueTokensForTheOthers) {
  // Few-shot shape: prompt 1000 shared by 5 branches of 100.
  Forest f;
  f.Add(-1, Range(0, 1000));
  for (int32_t b = 0; b < 5; ++b) {
    const int32_t s = f.Add(0, Range(10000 + 1000 * b, 100));
    f.queries.push_back({s, 100});
  }
  for (AttentionMode mode : kAllModes) {
    PlannerOptions o;
    o.mode = mode;
    o.bytes_per_kv_token = 30 * 2 * 3 * 64 * 4;
    PartitionPlanner planner(o);
    PartitionPlan plan;
    ASSERT_TRUE(planner.Plan(f.Segments(), f.queries, &plan).ok());
    EXPECT_EQ(plan.kv_tokens_unique, 1500);
    EXPECT_EQ(plan.kv_tokens_read, mode == AttentionMode::kSeq ? 5 * 1100 : 1500)
        << AttentionModeName(mode);
    EXPECT_EQ(plan.kv_bytes_read, plan.kv_tokens_read * o.bytes_per_kv_token);
    EXPECT_EQ(plan.kv_bytes_floor, 1500 * o.bytes_per_kv_token);
  }
}

TEST(PartitionPlanTest, UniqueCountsDistinctSlotsEvenWhenSegmentsShareOrUseHugeSlots) {
  for (int32_t base : {0, 1 << 28, 2'000'000'000}) {  // bitmap and sort paths
    Forest f;
    f.Add(-1, {base + 1, base + 2, base + 3});
    f.Add(0, {base + 2, base + 9});  // shares a slot with its parent (not a real tree, but legal)
    f.queries = {{1, 2}, {0, 3}};
    for (AttentionMode mode : kAllModes) {
      PlannerOptions o;
      o.mode = mode;
      PartitionPlanner planner(o);
      PartitionPlan plan;
      ASSERT_TRUE(planner.Plan(f.Segments(), f.queries, &plan).ok());
      EXPECT_EQ(plan.kv_tokens_unique, 4) << base << " " << AttentionModeName(mode);
      CheckPlan(f, o, plan);
    }
  }
}

TEST(PartitionPlanTest, EmptyStepsGiveEmptyPlans) {
  PartitionPlanner planner({});
  PartitionPlan plan;
  ASSERT_TRUE(planner.Plan({}, {}, &plan).ok());
  EXPECT_EQ(plan.num_chunks(), 0);
  EXPECT_EQ(plan.num_queries(), 0);
  Forest f;  // a query that sees nothing gets no entries
  f.Add(-1, Range(0, 5));
  f.queries = {{0, 0}};
  ASSERT_TRUE(planner.Plan(f.Segments(), f.queries, &plan).ok());
  EXPECT_EQ(plan.num_queries(), 1);
  EXPECT_EQ(plan.num_entries(), 0);
  EXPECT_EQ(plan.kv_tokens_read, 0);
}

absl::Status PlanOf(const Forest& f, PlannerOptions o = {}) {
  PartitionPlanner planner(o);
  PartitionPlan plan;
  absl::Status st = planner.Plan(f.Segments(), f.queries, &plan);
  if (!st.ok()) {
    EXPECT_EQ(plan.num_chunks(), 0) << "a failed plan is left empty";
    EXPECT_TRUE(plan.kv_slots.empty());
  }
  return st;
}

void ExpectInvalid(const absl::Status& st, const std::string& message) {
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_EQ(std::string(st.message()), message);
}

TEST(PartitionPlanTest, MalformedForestsAreInvalidArgumentNamingTheProblem) {
  Forest f = SmallForest();
  f.parent[3] = 7;
  ExpectInvalid(PlanOf(f), "segment 3: parent 7 out of range [-1, 5)");
  f.parent[3] = -2;
  ExpectInvalid(PlanOf(f), "segment 3: parent -2 out of range [-1, 5)");

  f = SmallForest();
  f.parent[4] = 4;
  ExpectInvalid(PlanOf(f), "segment 4: its parent chain has a cycle");
  f = SmallForest();  // 0 -> 4 -> 2 -> 0
  f.parent[0] = 2;
  f.parent[2] = 4;
  ExpectInvalid(PlanOf(f), "segment 0: its parent chain has a cycle");

  f = SmallForest();
  f.slots[2][1] = -5;
  ExpectInvalid(PlanOf(f), "segment 2: slot -5 of token 1 is negative");

  f = SmallForest();
  f.queries[2] = {5, 1};
  ExpectInvalid(PlanOf(f), "query 2: segment 5 out of range [0, 5)");
  f.queries[2] = {-1, 0};
  ExpectInvalid(PlanOf(f), "query 2: segment -1 out of range [0, 5)");
  f = SmallForest();
  f.queries[1] = {2, 3};
  ExpectInvalid(PlanOf(f), "query 1: visible 3 out of range [0, 2] of segment 2");
  f.queries[1] = {2, -1};
  ExpectInvalid(PlanOf(f), "query 1: visible -1 out of range [0, 2] of segment 2");
}

TEST(PartitionPlanTest, OptionsOutOfRangeAreInvalidArgument) {
  const Forest f = SmallForest();
  for (int which = 0; which < 6; ++which) {
    PlannerOptions o;
    if (which == 5) o.flatten_chunk_tokens = {64, 0, 32};
    if (which == 0) o.min_chunks = 0;
    if (which == 1) o.min_chunk_tokens = 0;
    if (which == 2) o.max_chunk_tokens = 16;  // below min_chunk_tokens 32
    if (which == 3) o.seq_chunk_tokens = 0;
    if (which == 4) o.bytes_per_kv_token = -1;
    const absl::Status st = PlanOf(f, o);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << which;
    EXPECT_TRUE(absl::StartsWith(st.message(), "planner options out of range")) << st;
  }
}

TEST(PartitionPlanTest, ModeNamesRoundTrip) {
  for (AttentionMode mode : kAllModes) {
    AttentionMode parsed;
    ASSERT_TRUE(ParseAttentionMode(AttentionModeName(mode), &parsed));
    EXPECT_EQ(parsed, mode);
  }
  AttentionMode parsed = AttentionMode::kSeq;
  EXPECT_FALSE(ParseAttentionMode("radix", &parsed));
  EXPECT_EQ(parsed, AttentionMode::kSeq);
}

// A 64-query step over ~30k tokens: prompt 4000, 20 branches of ~1300, 44 speculative drafts.
Forest LargeStep() {
  Forest f;
  int32_t slot = 0;
  auto next = [&](int32_t n) {
    std::vector<int32_t> v = Range(slot, n);
    slot += n;
    return v;
  };
  f.Add(-1, next(4000));
  for (int32_t b = 0; b < 20; ++b) {
    const int32_t s = f.Add(0, next(1200 + 10 * b));
    f.queries.push_back({s, 1200 + 10 * b});
  }
  int32_t tip = 1;
  for (int32_t d = 0; d < 44; ++d) {
    tip = f.Add(d % 4 == 0 ? 1 : tip, next(1));
    f.queries.push_back({tip, 1});
  }
  return f;
}

TEST(PartitionPlanTest, PlanningA64QueryStepOver30kTokensTakesWellUnderAMillisecond) {
  const Forest f = LargeStep();
  const auto segments = f.Segments();
  for (AttentionMode mode : {AttentionMode::kFlatten, AttentionMode::kNode}) {
    PlannerOptions o;
    o.mode = mode;
    PartitionPlanner planner(o);
    PartitionPlan plan;
    ASSERT_TRUE(planner.Plan(segments, f.queries, &plan).ok());
    ASSERT_EQ(plan.num_queries(), 64);
    ASSERT_GT(plan.kv_tokens_unique, 29000);
    // Reuse: a second plan of the same step allocates nothing new.
    const int32_t* slots_data = plan.kv_slots.data();
    const int32_t* entries_data = plan.entry_query.data();
    std::vector<double> us;
    for (int i = 0; i < 51; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      ASSERT_TRUE(planner.Plan(segments, f.queries, &plan).ok());
      us.push_back(
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
    EXPECT_EQ(plan.kv_slots.data(), slots_data);
    EXPECT_EQ(plan.entry_query.data(), entries_data);
    std::sort(us.begin(), us.end());
    // Budget 1 ms; expected tens of microseconds, the margin absorbs a busy machine.
    EXPECT_LT(us[us.size() / 2], 1000.0) << AttentionModeName(mode);
    std::printf("plan %s: median %.1f us\n", std::string(AttentionModeName(mode)).c_str(),
                us[us.size() / 2]);
  }
}

}  // namespace
}  // namespace deft
