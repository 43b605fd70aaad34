// KvBlockPool (allocation, reference counts, exhaustion, copy-on-write data) and TreeKvCache
// (fork/split/prune/extend/truncate structure, block sharing, data integrity through every split
// and copy), every error path with its code and message, and a randomized property test that
// checks the pool/tree invariants after each of thousands of operations against a plain model.
#include "engine/tree/tree_kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "engine/kv/kv_block_pool.h"

namespace deft {
namespace {

// Small model shape: 2 layers, 2 KV heads of 4 dims (8 floats per token per K/V), 4-token blocks.
KvPoolShape SmallShape(int32_t block_tokens = 4) {
  KvPoolShape s;
  s.num_layers = 2;
  s.num_kv_heads = 2;
  s.head_dim = 4;
  s.block_tokens = block_tokens;
  return s;
}

std::unique_ptr<KvBlockPool> MakePool(int64_t num_blocks, int32_t block_tokens = 4) {
  auto pool = KvBlockPool::Create(SmallShape(block_tokens), num_blocks);
  EXPECT_TRUE(pool.ok()) << pool.status();
  return std::move(pool).value();
}

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The KV value of element j of K (kv 0) or V (kv 1) at `layer` for the token `token` at
// `position` of `tree`: distinct per element, exact in fp32 (24-bit integers).
float KvValue(TreeId tree, int64_t position, int32_t token, int64_t layer, int kv, int64_t j) {
  uint64_t h = SplitMix64(static_cast<uint64_t>(tree));
  h = SplitMix64(h ^ static_cast<uint64_t>(position));
  h = SplitMix64(h ^ static_cast<uint32_t>(token));
  h = SplitMix64(h ^ static_cast<uint64_t>(layer * 2 + kv) << 32 ^ static_cast<uint64_t>(j));
  return static_cast<float>(h >> 40);
}

void WriteToken(KvBlockPool& pool, int32_t slot, TreeId tree, int64_t position, int32_t token) {
  for (int64_t layer = 0; layer < pool.shape().num_layers; ++layer) {
    for (int64_t j = 0; j < pool.kv_dim(); ++j) {
      pool.k(layer, slot)[j] = KvValue(tree, position, token, layer, 0, j);
      pool.v(layer, slot)[j] = KvValue(tree, position, token, layer, 1, j);
    }
  }
}

// Overwrites a slot with values no real token has (negative).
void PoisonSlot(KvBlockPool& pool, int32_t slot) {
  for (int64_t layer = 0; layer < pool.shape().num_layers; ++layer) {
    for (int64_t j = 0; j < pool.kv_dim(); ++j)
      pool.k(layer, slot)[j] = pool.v(layer, slot)[j] = -1;
  }
}

bool TokenReadsBack(const KvBlockPool& pool, int32_t slot, TreeId tree, int64_t position,
                    int32_t token) {
  for (int64_t layer = 0; layer < pool.shape().num_layers; ++layer) {
    for (int64_t j = 0; j < pool.kv_dim(); ++j) {
      if (pool.k(layer, slot)[j] != KvValue(tree, position, token, layer, 0, j)) return false;
      if (pool.v(layer, slot)[j] != KvValue(tree, position, token, layer, 1, j)) return false;
    }
  }
  return true;
}

// Every computed token of every node on the path root -> node reads back its own values.
void ExpectPathReadsBack(TreeKvCache& cache, TreeId tree, NodeId node) {
  auto path = cache.Path(tree, node);
  ASSERT_TRUE(path.ok()) << path.status();
  int64_t position = 0;
  for (const TreeNode* n : *path) {
    EXPECT_EQ(n->start_position, position) << "node " << n->id;
    for (int64_t i = 0; i < n->num_computed; ++i) {
      const int32_t slot = TreeKvCache::SlotOf(*n, i, cache.pool().block_tokens());
      EXPECT_TRUE(TokenReadsBack(cache.pool(), slot, tree, n->start_position + i, n->tokens[i]))
          << "tree " << tree << " node " << n->id << " token " << i << " slot " << slot;
    }
    position = n->end_position();
  }
}

// Reserves, writes and marks computed the next `n` pending tokens of `node`.
void Compute(TreeKvCache& cache, TreeId tree, NodeId node, int64_t n) {
  auto slots = cache.ReserveSlots(tree, node, n);
  ASSERT_TRUE(slots.ok()) << slots.status();
  const TreeNode* nd = *cache.GetNode(tree, node);
  ASSERT_EQ(static_cast<int64_t>(slots->size()), n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t index = nd->num_computed + i;
    WriteToken(cache.pool(), (*slots)[i], tree, nd->start_position + index, nd->tokens[index]);
  }
  ASSERT_TRUE(cache.MarkComputed(tree, node, n).ok());
}

std::vector<int32_t> Tokens(int32_t first, int32_t n) {
  std::vector<int32_t> t(n);
  for (int32_t i = 0; i < n; ++i) t[i] = first + i;
  return t;
}

const TreeNode& Node(TreeKvCache& cache, TreeId tree, NodeId node) {
  auto n = cache.GetNode(tree, node);
  EXPECT_TRUE(n.ok()) << n.status();
  return **n;
}

bool Contains(absl::string_view text, const std::string& part) {
  return std::string(text).find(part) != std::string::npos;
}

#define EXPECT_STATUS(expr, code_, substr)                                           \
  do {                                                                               \
    const absl::Status s_ = (expr);                                                  \
    EXPECT_EQ(s_.code(), absl::StatusCode::code_) << s_;                             \
    EXPECT_TRUE(Contains(s_.message(), substr)) << s_ << "\nexpected: " << (substr); \
  } while (0)

// ---------------------------------------------------------------------------------------------
// KvBlockPool

TEST(KvBlockPool, AllocateAddRefReleaseCountsAndSharedBlocks) {
  auto pool = MakePool(4);
  EXPECT_EQ(pool->num_blocks(), 4);
  EXPECT_EQ(pool->free_blocks(), 4);
  std::set<int32_t> got;
  for (int i = 0; i < 4; ++i) {
    auto b = pool->Allocate();
    ASSERT_TRUE(b.ok());
    EXPECT_EQ(pool->refcount(*b), 1);
    got.insert(*b);
  }
  EXPECT_EQ(got, (std::set<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(pool->free_blocks(), 0);
  EXPECT_EQ(pool->used_blocks(), 4);

  pool->AddRef(2);
  EXPECT_EQ(pool->refcount(2), 2);
  EXPECT_EQ(pool->shared_blocks(), 1);
  pool->AddRef(2);
  pool->AddRef(3);
  EXPECT_EQ(pool->refcount(2), 3);
  EXPECT_EQ(pool->shared_blocks(), 2);
  pool->Release(2);
  EXPECT_EQ(pool->shared_blocks(), 2);
  pool->Release(2);
  EXPECT_EQ(pool->shared_blocks(), 1);
  EXPECT_EQ(pool->refcount(2), 1);
  pool->Release(2);
  EXPECT_EQ(pool->refcount(2), 0);
  EXPECT_EQ(pool->free_blocks(), 1);
  // LIFO: the block just freed is the next one handed out.
  EXPECT_EQ(*pool->Allocate(), 2);
  EXPECT_EQ(pool->refcount(-1), 0);
  EXPECT_EQ(pool->refcount(4), 0);
}

TEST(KvBlockPool, ExhaustionIsResourceExhaustedAndRecoverable) {
  auto pool = MakePool(3, 16);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(pool->Allocate().ok());
  EXPECT_STATUS(pool->Allocate().status(), kResourceExhausted,
                "KV pool exhausted (3 blocks of 16 tokens)");
  EXPECT_EQ(pool->free_blocks(), 0);
  pool->Release(1);
  auto b = pool->Allocate();
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, 1);
}

TEST(KvBlockPool, AllocateManyIsAllOrNothing) {
  auto pool = MakePool(5);
  std::vector<int32_t> out = {42};
  ASSERT_TRUE(pool->AllocateMany(2, &out).ok());
  EXPECT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0], 42);
  EXPECT_STATUS(pool->AllocateMany(4, &out), kResourceExhausted, "4 blocks requested, 3 free");
  EXPECT_EQ(out.size(), 3u);
  EXPECT_EQ(pool->free_blocks(), 3);
  EXPECT_STATUS(pool->AllocateMany(-1, &out), kInvalidArgument, "cannot allocate -1 blocks");
  ASSERT_TRUE(pool->AllocateMany(0, &out).ok());
  ASSERT_TRUE(pool->AllocateMany(3, &out).ok());
  EXPECT_EQ(std::set<int32_t>(out.begin() + 1, out.end()), (std::set<int32_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(pool->free_blocks(), 0);
}

TEST(KvBlockPool, SlotsOfEveryLayerAndKvDoNotOverlap) {
  auto pool = MakePool(3);
  const int64_t slots = pool->num_blocks() * pool->block_tokens();
  for (int32_t s = 0; s < slots; ++s) WriteToken(*pool, s, 9, s, 100 + s);
  for (int32_t s = 0; s < slots; ++s) EXPECT_TRUE(TokenReadsBack(*pool, s, 9, s, 100 + s)) << s;
}

TEST(KvBlockPool, MakeWritableCopiesAllLayersExactly) {
  auto pool = MakePool(4);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-3.f, 3.f);
  const int64_t slots = pool->num_blocks() * pool->block_tokens();
  for (int64_t layer = 0; layer < pool->shape().num_layers; ++layer) {
    for (int64_t s = 0; s < slots; ++s) {
      for (int64_t j = 0; j < pool->kv_dim(); ++j) {
        pool->k(layer, s)[j] = dist(rng);
        pool->v(layer, s)[j] = dist(rng);
      }
    }
  }
  auto snapshot = [&] {
    std::vector<float> all;
    for (int64_t layer = 0; layer < pool->shape().num_layers; ++layer) {
      for (int64_t s = 0; s < slots; ++s) {
        all.insert(all.end(), pool->k(layer, s), pool->k(layer, s) + pool->kv_dim());
        all.insert(all.end(), pool->v(layer, s), pool->v(layer, s) + pool->kv_dim());
      }
    }
    return all;
  };
  const int32_t b = *pool->Allocate();
  // Refcount 1: the block itself.
  EXPECT_EQ(*pool->MakeWritable(b), b);
  pool->AddRef(b);
  const std::vector<float> before = snapshot();
  auto copy = pool->MakeWritable(b);
  ASSERT_TRUE(copy.ok()) << copy.status();
  ASSERT_NE(*copy, b);
  EXPECT_EQ(pool->refcount(b), 1);
  EXPECT_EQ(pool->refcount(*copy), 1);
  EXPECT_EQ(pool->shared_blocks(), 0);
  const int64_t bt = pool->block_tokens();
  for (int64_t layer = 0; layer < pool->shape().num_layers; ++layer) {
    for (int64_t off = 0; off < bt; ++off) {
      const int64_t src = b * bt + off, dst = *copy * bt + off;
      EXPECT_EQ(std::memcmp(pool->k(layer, src), pool->k(layer, dst), pool->kv_dim() * 4), 0);
      EXPECT_EQ(std::memcmp(pool->v(layer, src), pool->v(layer, dst), pool->kv_dim() * 4), 0);
    }
  }
  // Nothing outside the copy's block changed.
  const std::vector<float> after = snapshot();
  const int64_t per_slot = 2 * pool->kv_dim();
  for (int64_t layer = 0; layer < pool->shape().num_layers; ++layer) {
    for (int64_t s = 0; s < slots; ++s) {
      if (s / bt == *copy) continue;
      const int64_t at = (layer * slots + s) * per_slot;
      EXPECT_TRUE(
          std::equal(before.begin() + at, before.begin() + at + per_slot, after.begin() + at))
          << "layer " << layer << " slot " << s;
    }
  }
}

TEST(KvBlockPool, MakeWritableErrorsChangeNothing) {
  auto pool = MakePool(2);
  const int32_t a = *pool->Allocate();
  ASSERT_TRUE(pool->Allocate().ok());
  pool->AddRef(a);
  EXPECT_STATUS(pool->MakeWritable(a).status(), kResourceExhausted, "KV pool exhausted");
  EXPECT_EQ(pool->refcount(a), 2);
  EXPECT_EQ(pool->shared_blocks(), 1);
  pool->Release(a);
  pool->Release(a);
  EXPECT_STATUS(pool->MakeWritable(a).status(), kFailedPrecondition,
                "cannot make block 0 writable: it is not allocated");
  EXPECT_STATUS(pool->MakeWritable(7).status(), kFailedPrecondition, "block 7");
  EXPECT_EQ(pool->free_blocks(), 1);
}

TEST(KvBlockPool, CreateRejectsBadShapesAndAbsurdSizes) {
  struct Case {
    KvPoolShape shape;
    int64_t blocks;
    absl::StatusCode code;
    std::string substr;
  };
  KvPoolShape ok = SmallShape(), no_layers = ok, neg_heads = ok, no_dim = ok, no_bt = ok, huge = ok,
              overflow = ok;
  no_layers.num_layers = 0;
  neg_heads.num_kv_heads = -2;
  no_dim.head_dim = 0;
  no_bt.block_tokens = 0;
  // 2^53 bytes: representable, but more than any address space.
  huge.num_layers = huge.num_kv_heads = huge.head_dim = 1 << 10;
  huge.block_tokens = 16;
  overflow.num_layers = overflow.num_kv_heads = overflow.head_dim = int64_t{1} << 30;
  const std::vector<Case> cases = {
      {no_layers, 4, absl::StatusCode::kInvalidArgument, "num_layers=0"},
      {neg_heads, 4, absl::StatusCode::kInvalidArgument, "num_kv_heads=-2"},
      {no_dim, 4, absl::StatusCode::kInvalidArgument, "head_dim=0"},
      {no_bt, 4, absl::StatusCode::kInvalidArgument, "block_tokens=0"},
      {ok, 0, absl::StatusCode::kInvalidArgument, "num_blocks=0"},
      {ok, -3, absl::StatusCode::kInvalidArgument, "num_blocks=-3"},
      {ok, int64_t{1} << 30, absl::StatusCode::kInvalidArgument, "slot ids are int32"},
      {overflow, 4, absl::StatusCode::kResourceExhausted, "overflows int64"},
      {huge, int64_t{1} << 16, absl::StatusCode::kResourceExhausted, "cannot allocate KV pool"},
  };
  for (const Case& c : cases) {
    auto pool = KvBlockPool::Create(c.shape, c.blocks);
    EXPECT_EQ(pool.status().code(), c.code) << c.substr << ": " << pool.status();
    EXPECT_TRUE(Contains(pool.status().message(), c.substr)) << pool.status();
  }
  auto pool = KvBlockPool::Create(ok, 3);
  ASSERT_TRUE(pool.ok());
  EXPECT_EQ((*pool)->free_blocks(), 3);
}

TEST(KvBlockPool, BlocksForBytes) {
  const KvPoolShape s = SmallShape();  // 2 layers * 2 * 8 floats * 4 bytes = 128 B/token
  ASSERT_EQ(s.bytes_per_token(), 128);
  EXPECT_EQ(KvBlockPool::BlocksForBytes(s, 512 * 10), 10);
  EXPECT_EQ(KvBlockPool::BlocksForBytes(s, 512 * 10 + 511), 10);
  EXPECT_EQ(KvBlockPool::BlocksForBytes(s, 1), 1);
  EXPECT_EQ(KvBlockPool::BlocksForBytes(s, 0), 0);
  EXPECT_EQ(KvBlockPool::BlocksForBytes(s, -5), 0);
  EXPECT_EQ(KvBlockPool::BlocksForBytes(s, INT64_MAX), KvBlockPool::kMaxSlots / 4);
  KvPoolShape bad = s;
  bad.head_dim = 0;
  EXPECT_EQ(KvBlockPool::BlocksForBytes(bad, 1 << 20), 0);
}

TEST(KvBlockPool, ConcurrentAllocateAndReleaseKeepCounts) {
  auto pool = MakePool(64);
  auto worker = [&](int seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> mine;
    for (int i = 0; i < 20000; ++i) {
      if (mine.empty() || rng() % 2) {
        auto b = pool->Allocate();
        if (b.ok()) {
          pool->AddRef(*b);
          mine.push_back(*b);
        }
      } else {
        pool->Release(mine.back());
        pool->Release(mine.back());
        mine.pop_back();
      }
    }
    for (int32_t b : mine) {
      pool->Release(b);
      pool->Release(b);
    }
  };
  std::thread a(worker, 1), b(worker, 2);
  a.join();
  b.join();
  EXPECT_EQ(pool->free_blocks(), 64);
  EXPECT_EQ(pool->shared_blocks(), 0);
}

TEST(KvBlockPoolDeathTest, ReleasingAFreeBlockIsABugThatAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto pool = MakePool(2);
  EXPECT_DEATH(pool->Release(1), "block is not allocated");
  EXPECT_DEATH(pool->AddRef(5), "block is not allocated");
}

// ---------------------------------------------------------------------------------------------
// TreeKvCache: structure

class TreeKvCacheTest : public ::testing::Test {
 protected:
  std::unique_ptr<KvBlockPool> pool_ = MakePool(16);
  TreeKvCache cache_{pool_.get()};

  // A tree whose root holds `n` tokens 100.. of which `computed` are computed.
  TreeId NewTree(int32_t n, int64_t computed) {
    auto tree = cache_.CreateTree(Tokens(100, n));
    EXPECT_TRUE(tree.ok()) << tree.status();
    if (computed > 0) Compute(cache_, *tree, cache_.root(*tree), computed);
    return *tree;
  }
};

TEST_F(TreeKvCacheTest, CreateTreeHoldsThePromptPending) {
  const TreeId tree = NewTree(10, 0);
  const NodeId root = cache_.root(tree);
  const TreeNode& r = Node(cache_, tree, root);
  EXPECT_EQ(r.parent, kNoNode);
  EXPECT_EQ(r.tokens, Tokens(100, 10));
  EXPECT_EQ(r.start_position, 0);
  EXPECT_EQ(r.num_computed, 0);
  EXPECT_EQ(r.first_slot, 0);
  EXPECT_TRUE(r.blocks.empty());
  EXPECT_TRUE(r.children.empty());
  EXPECT_EQ(cache_.ListTrees(), std::vector<TreeId>{tree});
  EXPECT_TRUE(cache_.HasTree(tree));
  EXPECT_EQ(pool_->free_blocks(), 16);
  EXPECT_STATUS(cache_.CreateTree({}).status(), kInvalidArgument, "empty prompt");
  const TreeId second = NewTree(3, 0);
  EXPECT_NE(second, tree);
  EXPECT_EQ(cache_.ListTrees(), (std::vector<TreeId>{tree, second}));
}

TEST_F(TreeKvCacheTest, ReserveSlotsAllocatesBlocksAndReusesUnmarkedSlots) {
  const TreeId tree = NewTree(10, 0);
  const NodeId root = cache_.root(tree);
  auto slots = cache_.ReserveSlots(tree, root, 6);
  ASSERT_TRUE(slots.ok());
  EXPECT_EQ(*slots, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));  // blocks 0 and 1, fresh pool
  EXPECT_EQ(Node(cache_, tree, root).blocks, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(Node(cache_, tree, root).num_computed, 0);
  // Not marked: the same slots again, no new block.
  EXPECT_EQ(*cache_.ReserveSlots(tree, root, 6), *slots);
  EXPECT_EQ(pool_->free_blocks(), 14);
  ASSERT_TRUE(cache_.MarkComputed(tree, root, 4).ok());
  EXPECT_EQ(*cache_.ReserveSlots(tree, root, 6), (std::vector<int32_t>{4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(Node(cache_, tree, root).blocks, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(*cache_.ReserveSlots(tree, root, 0), std::vector<int32_t>{});
}

TEST_F(TreeKvCacheTest, ForkAtEndAddsEmptyChildrenUnderTheNode) {
  const TreeId tree = NewTree(10, 10);
  const NodeId root = cache_.root(tree);
  auto kids = cache_.Fork(tree, root, 10, 3);
  ASSERT_TRUE(kids.ok()) << kids.status();
  ASSERT_EQ(kids->size(), 3u);
  EXPECT_EQ(cache_.root(tree), root);
  EXPECT_EQ(Node(cache_, tree, root).children, *kids);
  for (NodeId c : *kids) {
    const TreeNode& n = Node(cache_, tree, c);
    EXPECT_EQ(n.parent, root);
    EXPECT_EQ(n.start_position, 10);
    EXPECT_EQ(n.length(), 0);
    EXPECT_EQ(n.num_computed, 0);
    EXPECT_EQ(n.first_slot, 0);
    EXPECT_TRUE(n.blocks.empty());
  }
  EXPECT_EQ(std::set<NodeId>(kids->begin(), kids->end()).size(), 3u);
  // The children grow in fresh blocks; the parent's last block (2, half full) is not touched.
  ASSERT_TRUE(cache_.Extend(tree, (*kids)[0], Tokens(7, 3)).ok());
  Compute(cache_, tree, (*kids)[0], 3);
  EXPECT_EQ(Node(cache_, tree, (*kids)[0]).blocks, std::vector<int32_t>{3});
  EXPECT_EQ(pool_->shared_blocks(), 0);
  ExpectPathReadsBack(cache_, tree, (*kids)[0]);
}

TEST_F(TreeKvCacheTest, ForkMidBlockSplitsAndSharesTheCutBlock) {
  const TreeId tree = NewTree(10, 10);  // blocks 0,1,2; tokens 0-3 | 4-7 | 8-9
  const NodeId tail = cache_.root(tree);
  auto kids = cache_.Fork(tree, tail, 6, 2);
  ASSERT_TRUE(kids.ok()) << kids.status();
  const NodeId head = Node(cache_, tree, tail).parent;
  ASSERT_NE(head, kNoNode);
  EXPECT_EQ(cache_.root(tree), head);  // the root was split: the head is the new root

  const TreeNode& h = Node(cache_, tree, head);
  EXPECT_EQ(h.parent, kNoNode);
  EXPECT_EQ(h.tokens, Tokens(100, 6));
  EXPECT_EQ(h.start_position, 0);
  EXPECT_EQ(h.num_computed, 6);
  EXPECT_EQ(h.first_slot, 0);
  EXPECT_EQ(h.blocks, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(h.children, (std::vector<NodeId>{tail, (*kids)[0], (*kids)[1]}));

  const TreeNode& t = Node(cache_, tree, tail);
  EXPECT_EQ(t.tokens, Tokens(106, 4));
  EXPECT_EQ(t.start_position, 6);
  EXPECT_EQ(t.num_computed, 4);
  EXPECT_EQ(t.first_slot, 2);
  EXPECT_EQ(t.blocks, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(TreeKvCache::SlotOf(t, 0, 4), 6);

  for (NodeId c : *kids) EXPECT_EQ(Node(cache_, tree, c).start_position, 6);
  EXPECT_EQ(pool_->refcount(1), 2);
  EXPECT_EQ(pool_->shared_blocks(), 1);
  EXPECT_EQ(pool_->free_blocks(), 13);
  ExpectPathReadsBack(cache_, tree, tail);
}

TEST_F(TreeKvCacheTest, ForkAtBlockBoundarySharesNothing) {
  const TreeId tree = NewTree(10, 10);
  const NodeId tail = cache_.root(tree);
  ASSERT_TRUE(cache_.Fork(tree, tail, 8, 1).ok());
  const TreeNode& h = Node(cache_, tree, Node(cache_, tree, tail).parent);
  const TreeNode& t = Node(cache_, tree, tail);
  EXPECT_EQ(h.blocks, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(t.blocks, std::vector<int32_t>{2});
  EXPECT_EQ(t.first_slot, 0);
  EXPECT_EQ(t.num_computed, 2);
  EXPECT_EQ(pool_->shared_blocks(), 0);
  ExpectPathReadsBack(cache_, tree, tail);
}

TEST_F(TreeKvCacheTest, ForkInsidePendingTokensSplitsComputedCount) {
  const TreeId tree = NewTree(12, 0);
  const NodeId tail = cache_.root(tree);
  Compute(cache_, tree, tail, 3);
  ASSERT_TRUE(cache_.ReserveSlots(tree, tail, 4).ok());  // blocks 0, 1 held; slots 3-6 reserved
  ASSERT_TRUE(cache_.Fork(tree, tail, 5, 1).ok());
  const TreeNode& h = Node(cache_, tree, Node(cache_, tree, tail).parent);
  const TreeNode& t = Node(cache_, tree, tail);
  EXPECT_EQ(h.num_computed, 3);
  EXPECT_EQ(h.blocks, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(t.num_computed, 0);
  EXPECT_EQ(t.first_slot, 1);
  EXPECT_EQ(t.blocks, std::vector<int32_t>{1});
  EXPECT_EQ(pool_->refcount(1), 2);
  // The tail cannot compute before the head is complete.
  EXPECT_STATUS(cache_.ReserveSlots(tree, tail, 1).status(), kFailedPrecondition,
                "has only 3 of 5 tokens computed");
  Compute(cache_, tree, h.id, 2);  // the head writes into the shared block: copy first
  EXPECT_EQ(pool_->shared_blocks(), 0);
  EXPECT_NE(Node(cache_, tree, h.id).blocks[1], 1);
  Compute(cache_, tree, tail, 7);
  ExpectPathReadsBack(cache_, tree, tail);
}

TEST_F(TreeKvCacheTest, SplitTailWithoutBlocksStartsAtSlotZero) {
  const TreeId tree = NewTree(10, 2);  // one block
  const NodeId tail = cache_.root(tree);
  ASSERT_TRUE(cache_.Fork(tree, tail, 6, 1).ok());
  const TreeNode& t = Node(cache_, tree, tail);
  EXPECT_TRUE(t.blocks.empty());
  EXPECT_EQ(t.first_slot, 0);
  EXPECT_EQ(Node(cache_, tree, t.parent).blocks, std::vector<int32_t>{0});
  EXPECT_EQ(pool_->shared_blocks(), 0);
}

TEST_F(TreeKvCacheTest, ForkAtZeroAddsSiblings) {
  const TreeId tree = NewTree(4, 4);
  const NodeId root = cache_.root(tree);
  const NodeId a = (*cache_.Fork(tree, root, 4, 1))[0];
  ASSERT_TRUE(cache_.Extend(tree, a, Tokens(1, 5)).ok());
  auto kids = cache_.Fork(tree, a, 0, 2);
  ASSERT_TRUE(kids.ok()) << kids.status();
  EXPECT_EQ(Node(cache_, tree, root).children, (std::vector<NodeId>{a, (*kids)[0], (*kids)[1]}));
  EXPECT_EQ(Node(cache_, tree, (*kids)[1]).start_position, 4);
  EXPECT_EQ(Node(cache_, tree, a).tokens, Tokens(1, 5));  // not split
  // An empty node forked at 0 == its length: the children go under the node itself.
  auto under = cache_.Fork(tree, (*kids)[0], 0, 1);
  ASSERT_TRUE(under.ok());
  EXPECT_EQ(Node(cache_, tree, (*under)[0]).parent, (*kids)[0]);
  EXPECT_STATUS(cache_.Fork(tree, root, 0, 1).status(), kFailedPrecondition,
                "cannot fork at offset 0 of node 0 of tree 1: it is the root");
}

TEST_F(TreeKvCacheTest, SplitOfANonRootRelinksItsParent) {
  const TreeId tree = NewTree(4, 4);
  const NodeId root = cache_.root(tree);
  auto kids = *cache_.Fork(tree, root, 4, 3);
  const NodeId mid = kids[1];
  ASSERT_TRUE(cache_.Extend(tree, mid, Tokens(50, 9)).ok());
  Compute(cache_, tree, mid, 9);
  ASSERT_TRUE(cache_.Fork(tree, mid, 3, 1).ok());
  const NodeId head = Node(cache_, tree, mid).parent;
  EXPECT_EQ(Node(cache_, tree, root).children, (std::vector<NodeId>{kids[0], head, kids[2]}));
  EXPECT_EQ(Node(cache_, tree, head).parent, root);
  EXPECT_EQ(Node(cache_, tree, head).start_position, 4);
  EXPECT_EQ(Node(cache_, tree, mid).start_position, 7);
  EXPECT_EQ(cache_.root(tree), root);
  auto path = *cache_.Path(tree, mid);
  ASSERT_EQ(path.size(), 3u);
  EXPECT_EQ(path[0]->id, root);
  EXPECT_EQ(path[1]->id, head);
  EXPECT_EQ(path[2]->id, mid);
  ExpectPathReadsBack(cache_, tree, mid);
}

TEST_F(TreeKvCacheTest, RepeatedSplitsInOneBlockShareItThreeWays) {
  const TreeId tree = NewTree(4, 4);  // one full block
  const NodeId tail = cache_.root(tree);
  ASSERT_TRUE(cache_.Fork(tree, tail, 1, 1).ok());
  ASSERT_TRUE(cache_.Fork(tree, tail, 1, 1).ok());  // the tail (tokens 1-3) again, at token 2
  EXPECT_EQ(pool_->refcount(0), 3);
  EXPECT_EQ(pool_->shared_blocks(), 1);
  EXPECT_EQ(Node(cache_, tree, tail).first_slot, 2);
  EXPECT_EQ(Node(cache_, tree, tail).start_position, 2);
  ExpectPathReadsBack(cache_, tree, tail);
  ASSERT_TRUE(cache_.DeleteTree(tree).ok());
  EXPECT_EQ(pool_->free_blocks(), 16);
}

TEST_F(TreeKvCacheTest, CopyOnWriteKeepsBothSidesData) {
  const TreeId tree = NewTree(10, 10);  // blocks 0,1,2
  const NodeId tail = cache_.root(tree);
  ASSERT_TRUE(cache_.Fork(tree, tail, 6, 1).ok());
  const NodeId head = Node(cache_, tree, tail).parent;
  // Tail keeps token 6 only: block 2 goes, block 1 (shared with the head) stays.
  ASSERT_TRUE(cache_.Truncate(tree, tail, 3).ok());
  EXPECT_EQ(Node(cache_, tree, tail).blocks, std::vector<int32_t>{1});
  EXPECT_EQ(Node(cache_, tree, tail).num_computed, 1);
  EXPECT_EQ(pool_->refcount(2), 0);
  ASSERT_TRUE(cache_.Extend(tree, tail, Tokens(900, 3)).ok());
  const int64_t free_before = pool_->free_blocks();
  Compute(cache_, tree, tail, 3);  // slot 7 is in shared block 1: copy it, then one fresh block
  const TreeNode& t = Node(cache_, tree, tail);
  ASSERT_EQ(t.blocks.size(), 2u);
  EXPECT_NE(t.blocks[0], 1);
  EXPECT_EQ(pool_->refcount(1), 1);
  EXPECT_EQ(pool_->refcount(t.blocks[0]), 1);
  EXPECT_EQ(pool_->shared_blocks(), 0);
  EXPECT_EQ(pool_->free_blocks(), free_before - 2);
  EXPECT_EQ(Node(cache_, tree, head).blocks, (std::vector<int32_t>{0, 1}));
  ExpectPathReadsBack(cache_, tree, tail);
  ExpectPathReadsBack(cache_, tree, head);
}

TEST_F(TreeKvCacheTest, ReserveSlotsCopiesASharedFirstBlockThatIsNotTheLast) {
  const TreeId tree = NewTree(12, 5);  // slots 0-4 computed
  const NodeId tail = cache_.root(tree);
  ASSERT_TRUE(cache_.ReserveSlots(tree, tail, 5).ok());  // blocks 0, 1, 2 held
  ASSERT_TRUE(cache_.Fork(tree, tail, 5, 1).ok());       // cut inside block 1
  const TreeNode& t = Node(cache_, tree, tail);
  EXPECT_EQ(t.blocks, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(t.first_slot, 1);
  EXPECT_EQ(t.num_computed, 0);
  auto slots = cache_.ReserveSlots(tree, tail, 2);  // into block 1, shared with the head
  ASSERT_TRUE(slots.ok());
  EXPECT_NE(t.blocks[0], 1);
  EXPECT_EQ(t.blocks[1], 2);
  for (int32_t s : *slots) EXPECT_EQ(pool_->refcount(s / 4), 1) << "slot " << s;
  EXPECT_EQ(pool_->shared_blocks(), 0);
  Compute(cache_, tree, tail, 7);
  ExpectPathReadsBack(cache_, tree, tail);
}

TEST_F(TreeKvCacheTest, ReserveSlotsIsAllOrNothingWhenThePoolRunsOut) {
  auto pool = MakePool(4);
  TreeKvCache cache(pool.get());
  const TreeId tree = *cache.CreateTree(Tokens(1, 8));
  const NodeId tail = cache.root(tree);
  Compute(cache, tree, tail, 6);                   // blocks 0,1; tokens 6,7 pending in block 1
  ASSERT_TRUE(cache.Fork(tree, tail, 5, 1).ok());  // block 1 shared by head and tail
  ASSERT_TRUE(cache.Extend(tree, tail, Tokens(20, 4)).ok());
  const TreeId other = *cache.CreateTree(Tokens(1, 4));
  Compute(cache, other, cache.root(other), 4);  // 1 block free now
  ASSERT_EQ(pool->free_blocks(), 1);
  const TreeNode before = Node(cache, tree, tail);
  // Tail slots 2..6 (node-relative, first_slot 1): copy of block 1 plus one fresh block = 2.
  EXPECT_STATUS(cache.ReserveSlots(tree, tail, 5).status(), kResourceExhausted,
                "cannot reserve 5 slots in node 0 of tree 1: KV pool exhausted (4 blocks of 4");
  const TreeNode& after = Node(cache, tree, tail);
  EXPECT_EQ(after.blocks, before.blocks);
  EXPECT_EQ(after.num_computed, before.num_computed);
  EXPECT_EQ(pool->free_blocks(), 1);
  EXPECT_EQ(pool->refcount(1), 2);
  ExpectPathReadsBack(cache, tree, tail);
  // Freeing the other tree is enough to go on.
  ASSERT_TRUE(cache.DeleteTree(other).ok());
  Compute(cache, tree, tail, 5);
  ExpectPathReadsBack(cache, tree, tail);
}

TEST_F(TreeKvCacheTest, ExtendOnlyGrowsLeaves) {
  const TreeId tree = NewTree(4, 4);
  const NodeId root = cache_.root(tree);
  ASSERT_TRUE(cache_.Extend(tree, root, Tokens(7, 3)).ok());
  EXPECT_EQ(Node(cache_, tree, root).length(), 7);
  EXPECT_EQ(Node(cache_, tree, root).num_computed, 4);
  ASSERT_TRUE(cache_.Extend(tree, root, {}).ok());
  EXPECT_EQ(Node(cache_, tree, root).length(), 7);
  ASSERT_TRUE(cache_.Fork(tree, root, 7, 2).ok());
  EXPECT_STATUS(cache_.Extend(tree, root, Tokens(1, 1)), kFailedPrecondition,
                "cannot extend node 0 of tree 1: it has 2 children");
  EXPECT_EQ(Node(cache_, tree, root).length(), 7);
}

TEST_F(TreeKvCacheTest, TruncateReleasesBlocksAndComputedTokens) {
  const TreeId tree = NewTree(10, 0);
  const NodeId root = cache_.root(tree);
  Compute(cache_, tree, root, 9);                    // blocks 0,1,2
  ASSERT_TRUE(cache_.Truncate(tree, root, 1).ok());  // a pending token: nothing else changes
  EXPECT_EQ(Node(cache_, tree, root).num_computed, 9);
  EXPECT_EQ(Node(cache_, tree, root).blocks.size(), 3u);
  ASSERT_TRUE(cache_.Truncate(tree, root, 2).ok());  // 7 left, in blocks 0,1
  EXPECT_EQ(Node(cache_, tree, root).num_computed, 7);
  EXPECT_EQ(Node(cache_, tree, root).blocks, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(pool_->free_blocks(), 14);
  ExpectPathReadsBack(cache_, tree, root);
  ASSERT_TRUE(cache_.Truncate(tree, root, 0).ok());
  EXPECT_EQ(Node(cache_, tree, root).length(), 7);
  ASSERT_TRUE(cache_.Truncate(tree, root, 7).ok());
  EXPECT_EQ(Node(cache_, tree, root).length(), 0);
  EXPECT_TRUE(Node(cache_, tree, root).blocks.empty());
  EXPECT_EQ(pool_->free_blocks(), 16);
  // Truncating a split tail to nothing drops its share of the cut block.
  const TreeId t2 = NewTree(10, 10);
  const NodeId tail = cache_.root(t2);
  ASSERT_TRUE(cache_.Fork(t2, tail, 5, 1).ok());
  ASSERT_TRUE(cache_.Truncate(t2, tail, 5).ok());
  EXPECT_TRUE(Node(cache_, t2, tail).blocks.empty());
  EXPECT_EQ(Node(cache_, t2, tail).first_slot, 0);
  EXPECT_EQ(pool_->shared_blocks(), 0);
  EXPECT_EQ(pool_->free_blocks(), 14);
}

TEST_F(TreeKvCacheTest, PruneRemovesTheSubtreeAndItsBlocks) {
  const TreeId tree = NewTree(8, 8);
  const NodeId root = cache_.root(tree);
  auto kids = *cache_.Fork(tree, root, 8, 2);
  ASSERT_TRUE(cache_.Extend(tree, kids[0], Tokens(1, 6)).ok());
  Compute(cache_, tree, kids[0], 6);
  auto grandkids = *cache_.Fork(tree, kids[0], 3, 2);  // splits kids[0]: shares a block
  EXPECT_EQ(pool_->shared_blocks(), 1);
  const NodeId head = Node(cache_, tree, kids[0]).parent;
  const int64_t free_before = pool_->free_blocks();
  ASSERT_TRUE(cache_.Prune(tree, head).ok());
  EXPECT_EQ(Node(cache_, tree, root).children, std::vector<NodeId>{kids[1]});
  for (NodeId gone : {head, kids[0], grandkids[0], grandkids[1]}) {
    EXPECT_STATUS(cache_.GetNode(tree, gone).status(), kNotFound,
                  "tree 1 has no node " + std::to_string(gone));
  }
  EXPECT_EQ(pool_->free_blocks(), free_before + 2);
  EXPECT_EQ(pool_->shared_blocks(), 0);
  EXPECT_STATUS(cache_.Prune(tree, root), kFailedPrecondition,
                "cannot prune node 0 of tree 1: it is the root; use DeleteTree");
  ASSERT_TRUE(cache_.DeleteTree(tree).ok());
  EXPECT_FALSE(cache_.HasTree(tree));
  EXPECT_EQ(cache_.root(tree), kNoNode);
  EXPECT_EQ(pool_->free_blocks(), 16);
}

TEST_F(TreeKvCacheTest, StatsCountNodesLeavesTokensBlocksAndLayout) {
  const TreeId tree = NewTree(10, 10);
  const NodeId tail = cache_.root(tree);
  auto kids = *cache_.Fork(tree, tail, 6, 2);  // head [0,6), tail [6,10), 2 empty kids at 6
  ASSERT_TRUE(cache_.Extend(tree, kids[0], Tokens(1, 3)).ok());
  Compute(cache_, tree, kids[0], 3);
  auto stats = cache_.Stats(tree);
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->nodes, 4);
  EXPECT_EQ(stats->leaves, 3);
  EXPECT_EQ(stats->tokens, 13);
  EXPECT_EQ(stats->blocks, 4);                           // 0, 1 (shared), 2, and kids[0]'s
  EXPECT_EQ(stats->sequence_layout_tokens, 10 + 9 + 6);  // tail, kids[0], kids[1]
  EXPECT_STATUS(cache_.Stats(99).status(), kNotFound, "tree 99 not found");
}

TEST(TreeKvCache, DestroyingTheCacheReturnsEveryBlock) {
  auto pool = MakePool(8);
  {
    TreeKvCache cache(pool.get());
    const TreeId tree = *cache.CreateTree(Tokens(1, 10));
    Compute(cache, tree, cache.root(tree), 10);
    ASSERT_TRUE(cache.Fork(tree, cache.root(tree), 5, 3).ok());
    EXPECT_LT(pool->free_blocks(), 8);
  }
  EXPECT_EQ(pool->free_blocks(), 8);
  EXPECT_EQ(pool->shared_blocks(), 0);
}

// ---------------------------------------------------------------------------------------------
// Error paths: code and message, and nothing changes.

TEST_F(TreeKvCacheTest, UnknownTreeIsNotFoundEverywhere) {
  const std::string msg = "tree 77 not found";
  const std::vector<int32_t> one = {1};
  EXPECT_STATUS(cache_.DeleteTree(77), kNotFound, msg);
  EXPECT_STATUS(cache_.Fork(77, 0, 0, 1).status(), kNotFound, msg);
  EXPECT_STATUS(cache_.Extend(77, 0, one), kNotFound, msg);
  EXPECT_STATUS(cache_.Prune(77, 0), kNotFound, msg);
  EXPECT_STATUS(cache_.ReserveSlots(77, 0, 1).status(), kNotFound, msg);
  EXPECT_STATUS(cache_.MarkComputed(77, 0, 1), kNotFound, msg);
  EXPECT_STATUS(cache_.Truncate(77, 0, 1), kNotFound, msg);
  EXPECT_STATUS(cache_.GetNode(77, 0).status(), kNotFound, msg);
  EXPECT_STATUS(cache_.Path(77, 0).status(), kNotFound, msg);
  EXPECT_STATUS(cache_.Stats(77).status(), kNotFound, msg);
  EXPECT_EQ(cache_.root(77), kNoNode);
}

TEST_F(TreeKvCacheTest, UnknownNodeIsNotFoundEverywhere) {
  const TreeId tree = NewTree(4, 4);
  const std::string msg = "tree 1 has no node 5";
  const std::vector<int32_t> one = {1};
  EXPECT_STATUS(cache_.Fork(tree, 5, 0, 1).status(), kNotFound, msg);
  EXPECT_STATUS(cache_.Extend(tree, 5, one), kNotFound, msg);
  EXPECT_STATUS(cache_.Prune(tree, 5), kNotFound, msg);
  EXPECT_STATUS(cache_.ReserveSlots(tree, 5, 1).status(), kNotFound, msg);
  EXPECT_STATUS(cache_.MarkComputed(tree, 5, 1), kNotFound, msg);
  EXPECT_STATUS(cache_.Truncate(tree, 5, 1), kNotFound, msg);
  EXPECT_STATUS(cache_.GetNode(tree, 5).status(), kNotFound, msg);
  EXPECT_STATUS(cache_.Path(tree, 5).status(), kNotFound, msg);
  EXPECT_STATUS(cache_.Fork(tree, kNoNode, 0, 1).status(), kNotFound, "has no node -1");
}

TEST_F(TreeKvCacheTest, ForkRejectsBadOffsetsAndCounts) {
  const TreeId tree = NewTree(6, 6);
  const NodeId root = cache_.root(tree);
  EXPECT_STATUS(cache_.Fork(tree, root, 7, 1).status(), kOutOfRange,
                "fork offset 7 is outside node 0 of tree 1 (length 6)");
  EXPECT_STATUS(cache_.Fork(tree, root, -1, 1).status(), kOutOfRange, "fork offset -1");
  EXPECT_STATUS(cache_.Fork(tree, root, 3, 0).status(), kInvalidArgument,
                "fork of node 0 of tree 1: count 0 is outside [1, 4096]");
  EXPECT_STATUS(cache_.Fork(tree, root, 3, 4097).status(), kInvalidArgument, "count 4097");
  EXPECT_STATUS(cache_.Fork(tree, root, 3, -2).status(), kInvalidArgument, "count -2");
  const TreeNode& r = Node(cache_, tree, root);
  EXPECT_EQ(cache_.root(tree), root);
  EXPECT_EQ(r.length(), 6);
  EXPECT_TRUE(r.children.empty());
  EXPECT_EQ(pool_->shared_blocks(), 0);
  EXPECT_EQ(cache_.Stats(tree)->nodes, 1);
  auto many = cache_.Fork(tree, root, 6, TreeKvCache::kMaxForkCount);
  ASSERT_TRUE(many.ok());
  EXPECT_EQ(many->size(), 4096u);
}

TEST_F(TreeKvCacheTest, ReserveMarkAndTruncateRejectBadCounts) {
  const TreeId tree = NewTree(6, 2);
  const NodeId root = cache_.root(tree);
  EXPECT_STATUS(cache_.ReserveSlots(tree, root, 5).status(), kFailedPrecondition,
                "cannot reserve 5 slots in node 0 of tree 1: only 4 tokens are pending");
  EXPECT_STATUS(cache_.ReserveSlots(tree, root, -1).status(), kInvalidArgument,
                "cannot reserve -1 slots");
  EXPECT_STATUS(cache_.MarkComputed(tree, root, 5), kFailedPrecondition,
                "cannot mark 5 tokens computed in node 0 of tree 1: only 4 tokens are pending");
  EXPECT_STATUS(cache_.MarkComputed(tree, root, -1), kInvalidArgument, "cannot mark -1");
  // Slots 2, 3 are in block 0 (held); slot 4 is not reserved.
  EXPECT_STATUS(cache_.MarkComputed(tree, root, 3), kFailedPrecondition,
                "their slots were not reserved (4 slots held, 5 needed)");
  EXPECT_EQ(Node(cache_, tree, root).num_computed, 2);
  EXPECT_STATUS(cache_.Truncate(tree, root, 7), kOutOfRange,
                "cannot truncate 7 tokens from node 0 of tree 1: it has only 6");
  EXPECT_STATUS(cache_.Truncate(tree, root, -1), kInvalidArgument, "cannot truncate -1");
  ASSERT_TRUE(cache_.Fork(tree, root, 6, 1).ok());
  EXPECT_STATUS(cache_.Truncate(tree, root, 1), kFailedPrecondition,
                "cannot truncate node 0 of tree 1: it has 1 children");
  const NodeId child = Node(cache_, tree, root).children[0];
  ASSERT_TRUE(cache_.Extend(tree, child, Tokens(1, 2)).ok());
  EXPECT_STATUS(cache_.ReserveSlots(tree, child, 1).status(), kFailedPrecondition,
                "cannot reserve slots in node 1 of tree 1: its parent node 0 has only 2 of 6");
  EXPECT_STATUS(cache_.MarkComputed(tree, child, 1), kFailedPrecondition,
                "cannot mark tokens computed in node 1 of tree 1: its parent node 0 has only 2");
  EXPECT_EQ(Node(cache_, tree, root).length(), 6);
  EXPECT_EQ(pool_->free_blocks(), 15);
}

// ---------------------------------------------------------------------------------------------
// Randomized property test: random operations (valid and invalid) on a small pool, checked
// against a plain model of the tree structure, with the pool invariants verified after each one.

struct ModelNode {
  NodeId parent = kNoNode;
  std::vector<NodeId> children;
  std::vector<int32_t> tokens;
  int64_t start = 0;
  int64_t computed = 0;
  int64_t end() const { return start + static_cast<int64_t>(tokens.size()); }
};
struct ModelTree {
  NodeId root = kNoNode;
  std::map<NodeId, ModelNode> nodes;
};

// Everything a failed call must leave as it was.
struct NodeSnapshot {
  NodeId id, parent;
  std::vector<NodeId> children;
  std::vector<int32_t> tokens, blocks;
  int64_t start, computed;
  int32_t first_slot;
  bool operator==(const NodeSnapshot&) const = default;
};

class RandomOps {
 public:
  RandomOps(uint64_t seed, int64_t num_blocks)
      : rng_(seed), pool_(MakePool(num_blocks)), cache_(pool_.get()) {}

  void Run(int steps) {
    for (step_ = 0; step_ < steps; ++step_) {
      SCOPED_TRACE(::testing::Message() << "step " << step_);
      Step();
      CheckInvariants();
      if (::testing::Test::HasFailure()) return;
    }
    for (TreeId tree : cache_.ListTrees()) ASSERT_TRUE(cache_.DeleteTree(tree).ok());
    model_.clear();
    CheckInvariants();
    EXPECT_EQ(pool_->free_blocks(), pool_->num_blocks());
    EXPECT_EQ(pool_->shared_blocks(), 0);
  }

  // How often each kind of outcome happened, to check that the run covered them.
  std::map<std::string, int> outcomes;

 private:
  int64_t Uniform(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
  }
  std::vector<int32_t> RandomTokens(int64_t n) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(Uniform(0, 999));
    return t;
  }
  int64_t ModelTokens() const {
    int64_t n = 0;
    for (const auto& [id, t] : model_) {
      for (const auto& [nid, nd] : t.nodes) n += nd.tokens.size();
    }
    return n;
  }

  std::vector<NodeSnapshot> Snapshot() {
    std::vector<NodeSnapshot> all;
    for (TreeId tree : cache_.ListTrees()) {
      std::vector<NodeId> stack = {cache_.root(tree)};
      while (!stack.empty()) {
        const TreeNode& n = Node(cache_, tree, stack.back());
        stack.pop_back();
        all.push_back({n.id, n.parent, n.children, n.tokens, n.blocks, n.start_position,
                       n.num_computed, n.first_slot});
        stack.insert(stack.end(), n.children.begin(), n.children.end());
      }
    }
    return all;
  }
  std::vector<int32_t> Refcounts() {
    std::vector<int32_t> r(pool_->num_blocks());
    for (int32_t b = 0; b < pool_->num_blocks(); ++b) r[b] = pool_->refcount(b);
    return r;
  }

  // Runs `op`; on success applies `apply` to the model; on failure expects `code` and that
  // nothing changed. `code` OK means the call must succeed.
  void Expect(const std::string& what, absl::StatusCode code,
              const std::function<absl::Status()>& op, const std::function<void()>& apply) {
    SCOPED_TRACE(what);
    const auto before = Snapshot();
    const auto refs = Refcounts();
    const absl::Status s = op();
    ASSERT_EQ(s.code(), code) << s;
    ++outcomes[what + " " + absl::StatusCodeToString(code)];
    if (s.ok()) {
      apply();
    } else {
      EXPECT_FALSE(s.message().empty());
      EXPECT_TRUE(Snapshot() == before) << "failed call changed the tree: " << s;
      EXPECT_EQ(Refcounts(), refs) << "failed call changed the pool: " << s;
    }
  }

  void Step() {
    if (model_.empty() || Uniform(0, 99) < (model_.size() < 3 ? 15 : 4)) return CreateTree();
    std::vector<TreeId> trees;
    for (const auto& [id, t] : model_) trees.push_back(id);
    const TreeId tree = trees[Uniform(0, trees.size() - 1)];
    ModelTree& mt = model_[tree];
    auto it = std::next(mt.nodes.begin(), Uniform(0, mt.nodes.size() - 1));
    const NodeId node = it->first;
    const int op = Uniform(0, 99);
    if (op < 18) {
      // Half the splits are followed at once by a computation on one side of the cut, which
      // writes into the shared block (copy-on-write) far more often than a random pick would.
      const NodeId head = Fork(tree, node);
      if (head != kNoNode && Uniform(0, 1) == 0 && !::testing::Test::HasFatalFailure()) {
        const ModelNode& h = model_[tree].nodes[head];
        ComputeSome(tree, h.computed < static_cast<int64_t>(h.tokens.size()) ? head : node);
      }
      return;
    }
    if (op < 33) return Extend(tree, node);
    if (op < 63) return ComputeSome(tree, node);
    if (op < 73) return Truncate(tree, node);
    if (op < 85) return Prune(tree, node);
    if (op < 89) return DeleteTree(tree);
    return UnknownIds(tree);
  }

  void CreateTree() {
    const int64_t n = Uniform(0, 12);
    const auto prompt = RandomTokens(n);
    TreeId created = -1;
    Expect(
        "create", n == 0 ? absl::StatusCode::kInvalidArgument : absl::StatusCode::kOk,
        [&] {
          auto t = cache_.CreateTree(prompt);
          if (t.ok()) created = *t;
          return t.status();
        },
        [&] {
          ASSERT_FALSE(model_.contains(created));
          ModelTree& t = model_[created];
          t.root = cache_.root(created);
          t.nodes[t.root].tokens = prompt;
        });
  }

  // Returns the head when the fork split the node, else kNoNode.
  NodeId Fork(TreeId tree, NodeId node) {
    ModelTree& t = model_[tree];
    const ModelNode& nd = t.nodes[node];
    const int64_t len = nd.tokens.size();
    // A third of the forks cut near the computed/pending boundary, where the cut block may hold
    // reserved slots that a later reservation must copy before writing.
    const int64_t offset = Uniform(0, 2) == 0
                               ? std::clamp<int64_t>(nd.computed + Uniform(-1, 1), 0, len)
                               : Uniform(-1, len + 1);
    const int32_t count = Uniform(0, 19) == 0 ? (Uniform(0, 1) ? 0 : 4097) : Uniform(1, 3);
    absl::StatusCode code = absl::StatusCode::kOk;
    if (count < 1 || count > TreeKvCache::kMaxForkCount) {
      code = absl::StatusCode::kInvalidArgument;
    } else if (offset < 0 || offset > len) {
      code = absl::StatusCode::kOutOfRange;
    } else if (offset == 0 && len > 0 && nd.parent == kNoNode) {
      code = absl::StatusCode::kFailedPrecondition;
    }
    std::vector<NodeId> kids;
    NodeId split_head = kNoNode;
    const char* kind = offset == len ? "fork-end" : offset == 0 ? "fork-zero" : "fork-split";
    Expect(
        kind, code,
        [&] {
          auto r = cache_.Fork(tree, node, offset, count);
          if (r.ok()) kids = *r;
          return r.status();
        },
        [&] {
          NodeId parent;
          if (offset == len) {
            parent = node;
          } else if (offset == 0) {
            parent = nd.parent;
          } else {
            const NodeId head = Node(cache_, tree, node).parent;
            ASSERT_FALSE(t.nodes.contains(head)) << "head id " << head << " reused";
            ModelNode h;
            ModelNode& tail = t.nodes[node];
            h.parent = tail.parent;
            h.children = {node};
            h.tokens.assign(tail.tokens.begin(), tail.tokens.begin() + offset);
            h.start = tail.start;
            h.computed = std::min(offset, tail.computed);
            tail.tokens.erase(tail.tokens.begin(), tail.tokens.begin() + offset);
            tail.start += offset;
            tail.computed = std::max<int64_t>(0, tail.computed - offset);
            if (tail.parent == kNoNode) {
              t.root = head;
            } else {
              auto& sib = t.nodes[tail.parent].children;
              *std::find(sib.begin(), sib.end(), node) = head;
            }
            tail.parent = head;
            t.nodes[head] = std::move(h);
            parent = head;
            split_head = head;
            const TreeNode& ch = Node(cache_, tree, head);
            const TreeNode& ct = Node(cache_, tree, node);
            if (!ch.blocks.empty() && !ct.blocks.empty() && ch.blocks.back() == ct.blocks[0]) {
              ++outcomes["fork-split shared"];
            }
          }
          ASSERT_EQ(static_cast<int32_t>(kids.size()), count);
          for (NodeId c : kids) {
            ASSERT_FALSE(t.nodes.contains(c)) << "child id " << c << " reused";
            ModelNode child;
            child.parent = parent;
            child.start = t.nodes[parent].end();
            t.nodes[c] = child;
            t.nodes[parent].children.push_back(c);
          }
        });
    return split_head;
  }

  void Extend(TreeId tree, NodeId node) {
    if (ModelTokens() > 400) return;
    ModelNode& nd = model_[tree].nodes[node];
    const auto tokens = RandomTokens(Uniform(0, 6));
    Expect(
        "extend",
        nd.children.empty() ? absl::StatusCode::kOk : absl::StatusCode::kFailedPrecondition,
        [&] { return cache_.Extend(tree, node, tokens); },
        [&] { nd.tokens.insert(nd.tokens.end(), tokens.begin(), tokens.end()); });
  }

  void ComputeSome(TreeId tree, NodeId node) {
    ModelTree& t = model_[tree];
    ModelNode& nd = t.nodes[node];
    const int64_t pending = nd.tokens.size() - nd.computed;
    const int64_t n = Uniform(0, 9) == 0 ? Uniform(-1, pending + 1) : Uniform(0, pending);
    const bool parent_done =
        nd.parent == kNoNode ||
        t.nodes[nd.parent].computed == static_cast<int64_t>(t.nodes[nd.parent].tokens.size());
    // Blocks the reservation needs: copies of shared blocks it writes into, plus new ones.
    const TreeNode& cn = Node(cache_, tree, node);
    const int64_t bt = pool_->block_tokens(), have = cn.blocks.size();
    const int64_t begin = cn.first_slot + cn.num_computed;
    int64_t copies = 0, needed = 0;
    if (n > 0) {
      const int64_t end_block = (begin + n + bt - 1) / bt;
      for (int64_t i = begin / bt; i < std::min(end_block, have); ++i) {
        copies += pool_->refcount(cn.blocks[i]) > 1;
      }
      needed = copies + std::max<int64_t>(0, end_block - have);
    }
    absl::StatusCode code = absl::StatusCode::kOk;
    if (n < 0) {
      code = absl::StatusCode::kInvalidArgument;
    } else if (!parent_done || n > pending) {
      code = absl::StatusCode::kFailedPrecondition;
    } else if (needed > pool_->free_blocks()) {
      code = absl::StatusCode::kResourceExhausted;
    }
    std::vector<int32_t> slots;
    Expect(
        "reserve", code,
        [&] {
          auto r = cache_.ReserveSlots(tree, node, n);
          if (r.ok()) slots = *r;
          return r.status();
        },
        [] {});
    if (code == absl::StatusCode::kResourceExhausted && copies > 0 &&
        copies <= pool_->free_blocks()) {
      ++outcomes["reserve undid copies"];  // the copies fit, the new blocks did not
    }
    if (code != absl::StatusCode::kOk || ::testing::Test::HasFatalFailure()) return;
    if (copies > 0) ++outcomes["reserve copied"];
    const TreeNode& after = Node(cache_, tree, node);
    ASSERT_EQ(static_cast<int64_t>(slots.size()), n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(slots[i], TreeKvCache::SlotOf(after, nd.computed + i, bt));
      ASSERT_EQ(pool_->refcount(slots[i] / bt), 1) << "slot " << slots[i] << " not writable";
    }
    // Write every reserved slot, but mark only some: the rest hold garbage until re-reserved.
    const int64_t mark = Uniform(0, 3) == 0 ? Uniform(0, n) : n;
    for (int64_t i = 0; i < n; ++i) {
      if (i < mark) {
        WriteToken(*pool_, slots[i], tree, nd.start + nd.computed + i, nd.tokens[nd.computed + i]);
      } else {
        PoisonSlot(*pool_, slots[i]);
      }
    }
    Expect(
        "mark", absl::StatusCode::kOk, [&] { return cache_.MarkComputed(tree, node, mark); },
        [&] { nd.computed += mark; });
    if (Uniform(0, 4) == 0) {
      const int64_t left = nd.tokens.size() - nd.computed;
      Expect(
          "mark-too-many", absl::StatusCode::kFailedPrecondition,
          [&] { return cache_.MarkComputed(tree, node, left + 1); }, [] {});
    }
  }

  void Truncate(TreeId tree, NodeId node) {
    ModelNode& nd = model_[tree].nodes[node];
    const int64_t len = nd.tokens.size();
    const int64_t n = Uniform(-1, len + 1);
    absl::StatusCode code = absl::StatusCode::kOk;
    if (n < 0) {
      code = absl::StatusCode::kInvalidArgument;
    } else if (!nd.children.empty()) {
      code = absl::StatusCode::kFailedPrecondition;
    } else if (n > len) {
      code = absl::StatusCode::kOutOfRange;
    }
    Expect(
        "truncate", code, [&] { return cache_.Truncate(tree, node, n); },
        [&] {
          nd.tokens.resize(len - n);
          nd.computed = std::min(nd.computed, len - n);
        });
  }

  void Prune(TreeId tree, NodeId node) {
    ModelTree& t = model_[tree];
    const bool is_root = t.nodes[node].parent == kNoNode;
    Expect(
        "prune", is_root ? absl::StatusCode::kFailedPrecondition : absl::StatusCode::kOk,
        [&] { return cache_.Prune(tree, node); },
        [&] {
          auto& sib = t.nodes[t.nodes[node].parent].children;
          sib.erase(std::find(sib.begin(), sib.end(), node));
          std::vector<NodeId> stack = {node};
          while (!stack.empty()) {
            const NodeId id = stack.back();
            stack.pop_back();
            stack.insert(stack.end(), t.nodes[id].children.begin(), t.nodes[id].children.end());
            t.nodes.erase(id);
          }
        });
  }

  void DeleteTree(TreeId tree) {
    Expect(
        "delete", absl::StatusCode::kOk, [&] { return cache_.DeleteTree(tree); },
        [&] { model_.erase(tree); });
  }

  void UnknownIds(TreeId tree) {
    const TreeId no_tree = model_.rbegin()->first + 1000;
    const NodeId no_node = 1 << 30;
    const std::vector<int32_t> one = {1};
    const auto nf = absl::StatusCode::kNotFound;
    const auto nothing = [] {};
    switch (Uniform(0, 6)) {
      case 0:
        return Expect(
            "unknown", nf, [&] { return cache_.Fork(tree, no_node, 0, 1).status(); }, nothing);
      case 1:
        return Expect(
            "unknown", nf, [&] { return cache_.Extend(no_tree, 0, one); }, nothing);
      case 2:
        return Expect(
            "unknown", nf, [&] { return cache_.Prune(tree, no_node); }, nothing);
      case 3:
        return Expect(
            "unknown", nf, [&] { return cache_.ReserveSlots(tree, no_node, 1).status(); }, nothing);
      case 4:
        return Expect(
            "unknown", nf, [&] { return cache_.Truncate(no_tree, 0, 0); }, nothing);
      case 5:
        return Expect(
            "unknown", nf, [&] { return cache_.DeleteTree(no_tree); }, nothing);
      default:
        return Expect(
            "unknown", nf, [&] { return cache_.MarkComputed(tree, no_node, 0); }, nothing);
    }
  }

  void CheckInvariants() {
    std::vector<TreeId> ids;
    for (const auto& [id, t] : model_) ids.push_back(id);
    ASSERT_EQ(cache_.ListTrees(), ids);
    const int64_t bt = pool_->block_tokens();
    std::map<int32_t, int32_t> refs;  // block -> (tree, node) references
    std::set<int32_t> computed_slots;
    for (const auto& [tree, mt] : model_) {
      ASSERT_EQ(cache_.root(tree), mt.root) << "tree " << tree;
      std::set<int32_t> tree_blocks;
      TreeStats want;
      // Walk the cache from the root; it must reach exactly the model's nodes.
      std::vector<NodeId> stack = {mt.root};
      std::set<NodeId> seen;
      while (!stack.empty()) {
        const NodeId id = stack.back();
        stack.pop_back();
        SCOPED_TRACE(::testing::Message() << "tree " << tree << " node " << id);
        ASSERT_TRUE(seen.insert(id).second) << "node reached twice";
        ASSERT_TRUE(mt.nodes.contains(id)) << "node not in the model";
        const ModelNode& m = mt.nodes.at(id);
        const TreeNode& n = Node(cache_, tree, id);
        ASSERT_EQ(n.id, id);
        ASSERT_EQ(n.parent, m.parent);
        ASSERT_EQ(n.children, m.children);
        ASSERT_EQ(n.tokens, m.tokens);
        ASSERT_EQ(n.start_position, m.start);
        ASSERT_EQ(n.num_computed, m.computed);
        if (m.parent != kNoNode) {
          const ModelNode& p = mt.nodes.at(m.parent);
          ASSERT_EQ(m.start, p.end());
          if (m.computed > 0) {
            ASSERT_EQ(p.computed, static_cast<int64_t>(p.tokens.size()));
          }
        } else {
          ASSERT_EQ(m.start, 0);
        }
        // Blocks cover every computed slot and no slot past the node's last token.
        const int64_t nb = n.blocks.size();
        ASSERT_GE(n.first_slot, 0);
        ASSERT_LT(n.first_slot, bt);
        if (nb == 0) {
          ASSERT_EQ(n.first_slot, 0);
        }
        ASSERT_GE(nb * bt, n.num_computed == 0 ? 0 : n.first_slot + n.num_computed);
        ASSERT_LE(nb, n.length() == 0 ? 0 : (n.first_slot + n.length() + bt - 1) / bt);
        for (int32_t b : n.blocks) {
          ASSERT_GE(b, 0);
          ASSERT_LT(b, pool_->num_blocks());
          ++refs[b];
          tree_blocks.insert(b);
        }
        for (int64_t i = 0; i < n.num_computed; ++i) {
          const int32_t slot = TreeKvCache::SlotOf(n, i, bt);
          ASSERT_TRUE(computed_slots.insert(slot).second) << "slot " << slot << " aliased";
          ASSERT_TRUE(TokenReadsBack(*pool_, slot, tree, n.start_position + i, n.tokens[i]))
              << "token " << i << " at slot " << slot << " lost its KV";
        }
        ++want.nodes;
        want.tokens += n.length();
        if (n.children.empty()) {
          ++want.leaves;
          want.sequence_layout_tokens += n.end_position();
        }
        stack.insert(stack.end(), n.children.begin(), n.children.end());
      }
      ASSERT_EQ(seen.size(), mt.nodes.size()) << "tree " << tree;
      auto stats = cache_.Stats(tree);
      ASSERT_TRUE(stats.ok());
      EXPECT_EQ(stats->nodes, want.nodes);
      EXPECT_EQ(stats->leaves, want.leaves);
      EXPECT_EQ(stats->tokens, want.tokens);
      EXPECT_EQ(stats->blocks, static_cast<int64_t>(tree_blocks.size()));
      EXPECT_EQ(stats->sequence_layout_tokens, want.sequence_layout_tokens);
    }
    int64_t shared = 0;
    for (int32_t b = 0; b < pool_->num_blocks(); ++b) {
      const int32_t want = refs.contains(b) ? refs[b] : 0;
      ASSERT_EQ(pool_->refcount(b), want) << "block " << b;
      shared += want > 1;
    }
    ASSERT_EQ(pool_->shared_blocks(), shared);
    ASSERT_EQ(pool_->free_blocks(), pool_->num_blocks() - static_cast<int64_t>(refs.size()));
    // The free list holds exactly the unreferenced blocks: take them all, then give them back.
    std::vector<int32_t> free;
    ASSERT_TRUE(pool_->AllocateMany(pool_->free_blocks(), &free).ok());
    ASSERT_EQ(pool_->Allocate().status().code(), absl::StatusCode::kResourceExhausted);
    for (int32_t b : free) ASSERT_FALSE(refs.contains(b)) << "referenced block " << b << " free";
    ASSERT_EQ(std::set<int32_t>(free.begin(), free.end()).size(), free.size());
    for (int32_t b : free) pool_->Release(b);
  }

  std::mt19937_64 rng_;
  std::unique_ptr<KvBlockPool> pool_;
  TreeKvCache cache_;
  std::map<TreeId, ModelTree> model_;
  int step_ = 0;
};

TEST(TreeKvCacheProperty, RandomOperationsKeepPoolAndTreeInvariants) {
  std::map<std::string, int> outcomes;
  for (uint64_t seed : {1, 2, 3, 4, 5, 6}) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    RandomOps ops(seed, 16);
    ops.Run(4000);
    if (::testing::Test::HasFailure()) return;
    for (const auto& [k, v] : ops.outcomes) outcomes[k] += v;
  }
  // The run must have reached every interesting outcome, exhaustion included.
  for (const char* k : {"create OK",
                        "create INVALID_ARGUMENT",
                        "fork-end OK",
                        "fork-zero OK",
                        "fork-split OK",
                        "fork-zero FAILED_PRECONDITION",
                        "fork-split OUT_OF_RANGE",
                        "fork-end INVALID_ARGUMENT",
                        "extend OK",
                        "extend FAILED_PRECONDITION",
                        "reserve OK",
                        "reserve FAILED_PRECONDITION",
                        "reserve RESOURCE_EXHAUSTED",
                        "reserve INVALID_ARGUMENT",
                        "mark OK",
                        "mark-too-many FAILED_PRECONDITION",
                        "truncate OK",
                        "truncate FAILED_PRECONDITION",
                        "truncate OUT_OF_RANGE",
                        "truncate INVALID_ARGUMENT",
                        "prune OK",
                        "prune FAILED_PRECONDITION",
                        "delete OK",
                        "unknown NOT_FOUND",
                        "fork-split shared",
                        "reserve copied",
                        "reserve undid copies"}) {
    EXPECT_GT(outcomes[k], 0) << k;
  }
  for (const auto& [k, v] : outcomes) std::cout << k << ": " << v << "\n";
}

}  // namespace
}  // namespace deft
