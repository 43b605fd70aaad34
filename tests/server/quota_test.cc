// Quota arithmetic of server/quota.h without a server: blocks a node still has to allocate
// (pending tokens, block boundaries, copy-on-write of a shared block) and how GrantTokens splits
// a key's free blocks between branches.
#include "server/quota.h"

#include <gtest/gtest.h>

namespace deft::server {
namespace {

constexpr int32_t kB = 16;

TreeNode Node(int64_t length, int64_t computed, int32_t first_slot, std::vector<int32_t> blocks) {
  TreeNode n;
  n.id = 1;
  n.tokens.assign(static_cast<size_t>(length), 7);
  n.num_computed = computed;
  n.first_slot = first_slot;
  n.blocks = std::move(blocks);
  return n;
}

TEST(QuotaArithmeticTest, BlocksForCountsPartialBlocksFromTheFirstSlot) {
  EXPECT_EQ(BlocksFor(0, 0, kB), 0);
  EXPECT_EQ(BlocksFor(0, 1, kB), 1);
  EXPECT_EQ(BlocksFor(0, 16, kB), 1);
  EXPECT_EQ(BlocksFor(0, 17, kB), 2);
  EXPECT_EQ(BlocksFor(15, 2, kB), 2);  // one slot left in the first block
}

TEST(QuotaArithmeticTest, BlocksToAllocateCountsPendingTokensAndCopyOnWrite) {
  // 20 computed tokens in 2 blocks; growing to 33 tokens needs a third.
  TreeNode leaf = Node(20, 20, 0, {4, 5});
  BlockCounts counts = {{4, 1}, {5, 1}};
  EXPECT_EQ(BlocksToAllocate(leaf, 20, counts, kB), 0);
  EXPECT_EQ(BlocksToAllocate(leaf, 32, counts, kB), 0);
  EXPECT_EQ(BlocksToAllocate(leaf, 33, counts, kB), 1);
  // A fresh node holds no block and starts at slot 0, whatever first_slot says.
  TreeNode fresh = Node(3, 0, 9, {});
  EXPECT_EQ(BlocksToAllocate(fresh, 3, {}, kB), 1);
  EXPECT_EQ(BlocksToAllocate(fresh, 17, {}, kB), 2);
  // A split tail writing into the block it shares with its head copies it first.
  TreeNode tail = Node(4, 2, 2, {5});                      // next write: slot 4 of block 5
  EXPECT_EQ(BlocksToAllocate(tail, 4, {{5, 2}}, kB), 1);   // the copy
  EXPECT_EQ(BlocksToAllocate(tail, 4, {{5, 1}}, kB), 0);   // not shared: written in place
  EXPECT_EQ(BlocksToAllocate(tail, 20, {{5, 2}}, kB), 2);  // a new block and the copy
  TreeNode past = Node(4, 2, 14, {5});                     // next write: slot 16, a new block
  EXPECT_EQ(BlocksToAllocate(past, 4, {{5, 2}}, kB), 1);
  TreeNode done = Node(2, 2, 2, {5});  // nothing left to write: no copy
  EXPECT_EQ(BlocksToAllocate(done, 2, {{5, 2}}, kB), 0);
}

TEST(QuotaArithmeticTest, GrantTokensSplitsFreeBlocksRoundRobin) {
  // Two fresh children: 3 free blocks go 2 to the first, 1 to the second.
  std::vector<TreeNode> kids = {Node(0, 0, 0, {}), Node(0, 0, 0, {})};
  kids[1].id = 2;
  std::vector<int32_t> max_tokens = {100, 100};
  EXPECT_EQ(GrantTokens(kids, max_tokens, {}, 3, kB), (std::vector<int32_t>{32, 16}));
  // A branch satisfied early leaves the rest to the other.
  max_tokens = {5, 100};
  EXPECT_EQ(GrantTokens(kids, max_tokens, {}, 3, kB), (std::vector<int32_t>{5, 32}));
  // Enough for everything: the caps are the asked max_tokens.
  EXPECT_EQ(GrantTokens(kids, max_tokens, {}, 100, kB), (std::vector<int32_t>{5, 100}));
  // One block for two branches that each need one for their first token: refused.
  EXPECT_TRUE(GrantTokens(kids, max_tokens, {}, 1, kB).empty());
  // A leaf with room left in its last block takes tokens without a new block.
  std::vector<TreeNode> leaf = {Node(20, 20, 0, {4, 5})};
  std::vector<int32_t> one = {100};
  EXPECT_EQ(GrantTokens(leaf, one, {{4, 1}, {5, 1}}, 0, kB), (std::vector<int32_t>{12}));
  EXPECT_EQ(GrantTokens(leaf, one, {{4, 1}, {5, 1}}, 1, kB), (std::vector<int32_t>{28}));
}

}  // namespace
}  // namespace deft::server
