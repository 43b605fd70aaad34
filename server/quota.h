// Per-API-key quotas on nodes and KV blocks (the `nodes=N` and `kv_blocks=N` options of the key
// file, server/auth.h): how a key's usage is counted, and the bookkeeping that keeps concurrent
// calls of one key from overshooting.
//
// What is counted, over every live tree the key owns:
//  - nodes: the engine's nodes (TreeStats.nodes). CreateTree adds 1; Fork adds `count`, plus 1
//    when the offset falls strictly inside the node (the split's new head); Prune and DeleteTree
//    give them back. BeamSearch is admitted on its worst case, width * max_tokens new nodes (at
//    most `width` children per step); Generate, Extend and Verify add none.
//  - kv_blocks: the KV blocks each node will hold once all of its tokens are computed, pending
//    ones included: per tree the distinct blocks held now (a block shared between a split's two
//    halves counts once, as TreeStats.blocks does; trees never share blocks), plus for each node
//    the blocks still to allocate for its pending tokens, ceil((first_slot + length) / B) minus
//    the blocks it holds, plus 1 when its next write lands in a shared block (copy-on-write).
//    A running Generate branch is charged as if it had already reached its token cap (its length
//    at the start + the max_tokens it was granted), so concurrent streams of one key never
//    overcommit. Verify is admitted on its worst case, ceil((draft tokens + 1) / B) + 2 blocks
//    (every draft token stored, the bonus token, a block boundary and a copy-on-write), and
//    BeamSearch on width * (max_tokens + 1) blocks; while they run that reservation is added to
//    the key's usage. Fork adds 1 block when it splits a node that still has pending tokens (a
//    later copy-on-write of the split block).
//
// Generate and the kv_blocks quota: the request is refused (RESOURCE_EXHAUSTED naming the quota)
// only when some branch could not get even its first token; otherwise the free blocks are
// granted to the branches one block at a time, round robin, and a branch whose grant is smaller
// than its max_tokens runs with that smaller cap and finishes with FINISH_REASON_KV_QUOTA when it
// reaches it (a clean finish, never a hang). Blocks granted to a branch that stops early (EOS)
// come back when it finishes.
//
// Thread safety: all methods may be called from any thread. Check-and-act sequences of one owner
// run under LockOwner(owner), so two calls of one key cannot both pass on the same headroom.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "engine/scheduler/tree_engine.h"

namespace deft::server {

struct QuotaUsage {
  int64_t nodes = 0;
  int64_t kv_blocks = 0;
};

// Blocks of `block_tokens` slots that hold `length` tokens starting at slot `first_slot` of the
// first block (0 for no tokens).
int64_t BlocksFor(int64_t first_slot, int64_t length, int32_t block_tokens);

// How many times each block id appears among the nodes of one tree.
using BlockCounts = absl::flat_hash_map<int32_t, int32_t>;
BlockCounts CountBlocks(const TreeKvCache& cache, TreeId tree);

// Blocks `node` still has to allocate to hold `target_length` tokens (>= its length), copy-on-write
// of a shared block included. `counts` are its tree's.
int64_t BlocksToAllocate(const TreeNode& node, int64_t target_length, const BlockCounts& counts,
                         int32_t block_tokens);

class QuotaLedger {
 public:
  // Held for a check-and-act of `owner` (the mutex lives as long as the ledger).
  std::unique_lock<std::mutex> LockOwner(const std::string& owner);

  // The usage charged to `trees` (all of one owner) plus the owner's reservations. Takes the
  // engine's lock (WithTrees); `what_if` charges the listed nodes at the given target lengths.
  QuotaUsage Usage(const TreeEngine& engine, const std::string& owner,
                   std::span<const TreeId> trees,
                   const absl::flat_hash_map<std::pair<TreeId, NodeId>, int64_t>& what_if = {});

  // A running branch: charge `node` as `target_length` tokens until ClearTarget.
  void SetTarget(TreeId tree, NodeId node, int64_t target_length);
  void ClearTarget(TreeId tree, NodeId node);

  // Usage held for a running Verify or BeamSearch of `owner`.
  void Reserve(const std::string& owner, QuotaUsage usage);
  void Unreserve(const std::string& owner, QuotaUsage usage);

 private:
  std::mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<std::mutex>> owner_mu_;
  absl::flat_hash_map<std::pair<TreeId, NodeId>, int64_t> targets_;
  absl::flat_hash_map<std::string, QuotaUsage> reserved_;
};

// The token caps of branches growing leaves `nodes` (of one tree) under a budget of
// `free_blocks`: blocks are granted one at a time, round robin over the branches still below
// their `max_tokens`; a branch's cap is the most tokens its granted blocks hold. Empty when
// some branch cannot get its first token.
std::vector<int32_t> GrantTokens(std::span<const TreeNode> nodes,
                                 std::span<const int32_t> max_tokens, const BlockCounts& counts,
                                 int64_t free_blocks, int32_t block_tokens);

}  // namespace deft::server
