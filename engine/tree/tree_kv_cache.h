// Decoding trees over the shared paged KV pool.
//
// A tree is a set of nodes; a node is a run of tokens that follows its parent's tokens (the root
// holds the prompt). The tokens of the path root -> node are one sequence; a node's first token
// sits at position `start_position` = the total length of its ancestors. Every node stores the
// KV of its own tokens only, in the pool slots
//   slot(i) = blocks[(first_slot + i) / B] * B + (first_slot + i) % B,  B = block_tokens,
// for i < num_computed; tokens from num_computed on are pending (their KV is not computed yet).
// Invariant: a node has num_computed > 0 only if its parent is fully computed.
//
// Fork(node, offset, count): when 0 < offset < length, the node is split: a new node (the
// "head") takes tokens [0, offset) and the node keeps its id with tokens [offset, length) as a
// child of the head (so a branch tip keeps its id); the pool block holding both sides of the
// split point is shared (refcount + 1), every other block moves to one side. Then `count` new
// empty children are created under the node that ends at `offset` (the head, or the node itself
// when offset == length; offset 0 forks under the node's parent). New children start in fresh
// blocks. Writing into a block whose refcount is > 1 copies it first (copy-on-write).
//
// Prune(node) removes the node and its subtree and releases their blocks at once; DeleteTree
// removes everything. After any sequence of operations, freeing all trees returns the pool to
// its initial free count.
//
// Fork details (decisions where the contract left a choice):
//  - Splitting the root makes the head the new root: root(tree) changes, the old root id now
//    names the tail. Split head's children are [tail, new children...] in that order, and the
//    head takes the tail's place in its parent's children list.
//  - num_computed splits as head = min(offset, computed), tail = the rest; the tail's first_slot
//    is (first_slot + offset) % B. Blocks holding only reserved (not computed) slots move too.
//  - offset == length wins over offset == 0 for an empty node: the children go under the node.
//    offset 0 of a (non-empty) root is FAILED_PRECONDITION (a root has no parent); an offset
//    outside [0, length] is OUT_OF_RANGE; count outside [1, kMaxForkCount] is INVALID_ARGUMENT.
//    Fork never allocates blocks, so it cannot run out of pool.
//  - A node that holds no blocks has first_slot 0 (a split tail or truncated leaf that ends up
//    with no block starts its next block at slot 0).
// Copy-on-write: ReserveSlots copies every shared block that the new slots fall in (the split
// block is the first block of the tail and the last block of the head, so either side may meet
// it), not only the node's last block.
//
// Errors (each its own message): NOT_FOUND for an unknown tree or node ("tree 7 has no node
// 12"), OUT_OF_RANGE for an offset past a node's end, FAILED_PRECONDITION for extending a
// non-leaf or pruning a root, RESOURCE_EXHAUSTED when the pool is out of blocks (the operation
// then changes nothing). Every failing call changes nothing.
//
// Pointers from GetNode/Path stay valid until that node is pruned or its tree deleted (nodes are
// heap-allocated); the values they point to change with later calls. Slots that ReserveSlots
// returns for a node stay valid (write them, then MarkComputed) until the next ReserveSlots,
// Fork, Truncate or Prune of that node or DeleteTree; reserving other nodes, even of the same
// tree, never moves them.
//
// Thread safety: none; the engine serializes calls (one mutex around the cache).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/kv/kv_block_pool.h"

namespace deft {

using TreeId = int64_t;
using NodeId = int32_t;
constexpr NodeId kNoNode = -1;

struct TreeNode {
  NodeId id = kNoNode;
  NodeId parent = kNoNode;
  std::vector<NodeId> children;
  std::vector<int32_t> tokens;
  int64_t start_position = 0;  // position of tokens[0] in the sequence
  int64_t num_computed = 0;    // tokens [0, num_computed) have KV in the pool
  int32_t first_slot = 0;      // offset of tokens[0] inside blocks[0]
  std::vector<int32_t> blocks;
  int64_t length() const { return static_cast<int64_t>(tokens.size()); }
  int64_t end_position() const { return start_position + length(); }
};

struct TreeStats {
  int64_t nodes = 0;
  int64_t leaves = 0;
  int64_t tokens = 0;                  // unique tokens stored in the tree
  int64_t blocks = 0;                  // distinct blocks the tree references
  int64_t sequence_layout_tokens = 0;  // sum over leaves of their path length
};

class TreeKvCache {
 public:
  // Most children one Fork creates.
  static constexpr int32_t kMaxForkCount = 4096;

  explicit TreeKvCache(KvBlockPool* pool) : pool_(pool) {}
  TreeKvCache(const TreeKvCache&) = delete;
  TreeKvCache& operator=(const TreeKvCache&) = delete;
  ~TreeKvCache();

  // A new tree whose root holds `prompt` (pending). INVALID_ARGUMENT for an empty prompt.
  absl::StatusOr<TreeId> CreateTree(std::span<const int32_t> prompt);
  absl::Status DeleteTree(TreeId tree);

  // See the header comment. Returns the ids of the `count` new children (count >= 1).
  absl::StatusOr<std::vector<NodeId>> Fork(TreeId tree, NodeId node, int64_t offset, int32_t count);
  // Appends pending tokens to a leaf (an empty span is a no-op).
  absl::Status Extend(TreeId tree, NodeId node, std::span<const int32_t> tokens);
  absl::Status Prune(TreeId tree, NodeId node);

  // Makes room for the KV of the next `n` pending tokens of `node` (allocating blocks,
  // copy-on-write of a shared last block) and returns their slots. Does not mark them computed.
  // FAILED_PRECONDITION when the parent is not fully computed or fewer than n tokens are pending;
  // INVALID_ARGUMENT for n < 0. Calling it again before MarkComputed returns the same slots
  // (after any copy-on-write).
  absl::StatusOr<std::vector<int32_t>> ReserveSlots(TreeId tree, NodeId node, int64_t n);
  // Marks `n` more pending tokens as computed (after their KV was written to the reserved slots).
  // FAILED_PRECONDITION when fewer than n tokens are pending, their slots were not reserved, or
  // the parent is not fully computed (a split between ReserveSlots and MarkComputed can do that).
  absl::Status MarkComputed(TreeId tree, NodeId node, int64_t n);

  // Removes the last `n` tokens of a leaf (computed or not), releasing blocks no longer used.
  // FAILED_PRECONDITION for a non-leaf, OUT_OF_RANGE for n > length, INVALID_ARGUMENT for n < 0.
  absl::Status Truncate(TreeId tree, NodeId node, int64_t n);

  absl::StatusOr<const TreeNode*> GetNode(TreeId tree, NodeId node) const;
  // Nodes root -> node, root first.
  absl::StatusOr<std::vector<const TreeNode*>> Path(TreeId tree, NodeId node) const;
  // Pool slot of token i of a node. REQUIRES: i < num_computed.
  static int32_t SlotOf(const TreeNode& n, int64_t i, int32_t block_tokens) {
    const int64_t s = n.first_slot + i;
    return n.blocks[s / block_tokens] * block_tokens + static_cast<int32_t>(s % block_tokens);
  }

  bool HasTree(TreeId tree) const { return trees_.contains(tree); }
  std::vector<TreeId> ListTrees() const;
  absl::StatusOr<TreeStats> Stats(TreeId tree) const;
  // kNoNode for an unknown tree.
  NodeId root(TreeId tree) const;
  KvBlockPool& pool() { return *pool_; }

 private:
  struct Tree {
    NodeId root = kNoNode;
    NodeId next_id = 0;
    absl::flat_hash_map<NodeId, std::unique_ptr<TreeNode>> nodes;  // owned, address-stable
  };
  absl::StatusOr<Tree*> FindTree(TreeId tree);
  absl::StatusOr<const Tree*> FindTree(TreeId tree) const;
  absl::StatusOr<TreeNode*> FindNode(Tree& t, TreeId tree, NodeId node);
  absl::StatusOr<const TreeNode*> FindNode(const Tree& t, TreeId tree, NodeId node) const;
  // Splits `node` at 0 < offset < length; returns the head. Cannot fail.
  TreeNode* Split(Tree& t, TreeNode* node, int64_t offset);
  TreeNode* NewNode(Tree& t, NodeId parent, int64_t start_position);
  void ReleaseBlocks(const TreeNode& n);

  KvBlockPool* pool_;
  TreeId next_tree_ = 1;
  absl::flat_hash_map<TreeId, Tree> trees_;
};

}  // namespace deft
