#include "engine/tree/tree_kv_cache.h"

#include <algorithm>
#include <climits>
#include <utility>

#include "absl/strings/str_cat.h"

namespace deft {
namespace {

// Blocks needed to hold `count` slots starting at `first_slot` of the first block.
int64_t BlocksSpanned(int64_t first_slot, int64_t count, int64_t block_tokens) {
  return count == 0 ? 0 : (first_slot + count + block_tokens - 1) / block_tokens;
}

std::string NodeName(TreeId tree, NodeId node) {
  return absl::StrCat("node ", node, " of tree ", tree);
}

}  // namespace

TreeKvCache::~TreeKvCache() {
  for (const auto& [id, t] : trees_) {
    for (const auto& [nid, n] : t.nodes) ReleaseBlocks(*n);
  }
}

void TreeKvCache::ReleaseBlocks(const TreeNode& n) {
  for (int32_t b : n.blocks) pool_->Release(b);
}

absl::StatusOr<TreeKvCache::Tree*> TreeKvCache::FindTree(TreeId tree) {
  auto it = trees_.find(tree);
  if (it == trees_.end()) return absl::NotFoundError(absl::StrCat("tree ", tree, " not found"));
  return &it->second;
}

absl::StatusOr<const TreeKvCache::Tree*> TreeKvCache::FindTree(TreeId tree) const {
  auto it = trees_.find(tree);
  if (it == trees_.end()) return absl::NotFoundError(absl::StrCat("tree ", tree, " not found"));
  return &it->second;
}

absl::StatusOr<TreeNode*> TreeKvCache::FindNode(Tree& t, TreeId tree, NodeId node) {
  auto it = t.nodes.find(node);
  if (it == t.nodes.end()) {
    return absl::NotFoundError(absl::StrCat("tree ", tree, " has no node ", node));
  }
  return it->second.get();
}

absl::StatusOr<const TreeNode*> TreeKvCache::FindNode(const Tree& t, TreeId tree,
                                                      NodeId node) const {
  auto it = t.nodes.find(node);
  if (it == t.nodes.end()) {
    return absl::NotFoundError(absl::StrCat("tree ", tree, " has no node ", node));
  }
  return it->second.get();
}

TreeNode* TreeKvCache::NewNode(Tree& t, NodeId parent, int64_t start_position) {
  auto node = std::make_unique<TreeNode>();
  node->id = t.next_id++;
  node->parent = parent;
  node->start_position = start_position;
  TreeNode* raw = node.get();
  t.nodes.emplace(raw->id, std::move(node));
  return raw;
}

absl::StatusOr<TreeId> TreeKvCache::CreateTree(std::span<const int32_t> prompt) {
  if (prompt.empty())
    return absl::InvalidArgumentError("cannot create a tree with an empty prompt");
  const TreeId id = next_tree_++;
  Tree& t = trees_[id];
  TreeNode* root = NewNode(t, kNoNode, 0);
  root->tokens.assign(prompt.begin(), prompt.end());
  t.root = root->id;
  return id;
}

absl::Status TreeKvCache::DeleteTree(TreeId tree) {
  auto t = FindTree(tree);
  if (!t.ok()) return t.status();
  for (const auto& [nid, n] : (*t)->nodes) ReleaseBlocks(*n);
  trees_.erase(tree);
  return absl::OkStatus();
}

TreeNode* TreeKvCache::Split(Tree& t, TreeNode* node, int64_t offset) {
  const int64_t bt = pool_->block_tokens();
  const int64_t cut = node->first_slot + offset;  // slot index of the tail's first token
  const int64_t num_blocks = static_cast<int64_t>(node->blocks.size());
  const int64_t head_blocks = std::min(num_blocks, (cut + bt - 1) / bt);
  const int64_t tail_first = std::min(num_blocks, cut / bt);

  TreeNode* head = NewNode(t, node->parent, node->start_position);
  head->tokens.assign(node->tokens.begin(), node->tokens.begin() + offset);
  head->num_computed = std::min(offset, node->num_computed);
  head->first_slot = node->first_slot;
  head->blocks.assign(node->blocks.begin(), node->blocks.begin() + head_blocks);
  // The block holding both sides of an unaligned cut is now referenced by head and tail.
  if (tail_first < head_blocks) pool_->AddRef(node->blocks[tail_first]);

  node->tokens.erase(node->tokens.begin(), node->tokens.begin() + offset);
  node->blocks.erase(node->blocks.begin(), node->blocks.begin() + tail_first);
  node->first_slot = node->blocks.empty() ? 0 : static_cast<int32_t>(cut % bt);
  node->start_position += offset;
  node->num_computed = std::max<int64_t>(0, node->num_computed - offset);

  if (node->parent == kNoNode) {
    t.root = head->id;
  } else {
    TreeNode* parent = t.nodes.at(node->parent).get();
    std::replace(parent->children.begin(), parent->children.end(), node->id, head->id);
  }
  head->children.push_back(node->id);
  node->parent = head->id;
  return head;
}

absl::StatusOr<std::vector<NodeId>> TreeKvCache::Fork(TreeId tree, NodeId node, int64_t offset,
                                                      int32_t count) {
  auto t = FindTree(tree);
  if (!t.ok()) return t.status();
  auto n = FindNode(**t, tree, node);
  if (!n.ok()) return n.status();
  TreeNode* target = *n;
  if (count < 1 || count > kMaxForkCount) {
    return absl::InvalidArgumentError(absl::StrCat("fork of ", NodeName(tree, node), ": count ",
                                                   count, " is outside [1, ", kMaxForkCount, "]"));
  }
  if (offset < 0 || offset > target->length()) {
    return absl::OutOfRangeError(absl::StrCat("fork offset ", offset, " is outside ",
                                              NodeName(tree, node), " (length ", target->length(),
                                              ")"));
  }
  const bool at_end = offset == target->length();
  if (!at_end && offset == 0 && target->parent == kNoNode) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot fork at offset 0 of ", NodeName(tree, node),
                     ": it is the root, and a root has no parent to fork under"));
  }
  // Node ids are int32; a split takes one more.
  if ((*t)->next_id > INT32_MAX - count - 1) {
    return absl::ResourceExhaustedError(absl::StrCat("tree ", tree, " has run out of node ids"));
  }

  TreeNode* parent;
  if (at_end) {
    parent = target;
  } else if (offset == 0) {
    parent = (*t)->nodes.at(target->parent).get();
  } else {
    parent = Split(**t, target, offset);
  }
  std::vector<NodeId> children;
  children.reserve(count);
  for (int32_t i = 0; i < count; ++i) {
    TreeNode* child = NewNode(**t, parent->id, parent->end_position());
    parent->children.push_back(child->id);
    children.push_back(child->id);
  }
  return children;
}

absl::Status TreeKvCache::Extend(TreeId tree, NodeId node, std::span<const int32_t> tokens) {
  auto t = FindTree(tree);
  if (!t.ok()) return t.status();
  auto n = FindNode(**t, tree, node);
  if (!n.ok()) return n.status();
  if (!(*n)->children.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("cannot extend ", NodeName(tree, node),
                                                      ": it has ", (*n)->children.size(),
                                                      " children and only a leaf can grow"));
  }
  (*n)->tokens.insert((*n)->tokens.end(), tokens.begin(), tokens.end());
  return absl::OkStatus();
}

absl::Status TreeKvCache::Prune(TreeId tree, NodeId node) {
  auto t = FindTree(tree);
  if (!t.ok()) return t.status();
  auto n = FindNode(**t, tree, node);
  if (!n.ok()) return n.status();
  if ((*n)->parent == kNoNode) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot prune ", NodeName(tree, node), ": it is the root; use DeleteTree"));
  }
  auto& siblings = (*t)->nodes.at((*n)->parent)->children;
  siblings.erase(std::find(siblings.begin(), siblings.end(), node));
  // Iterative: decoding trees can be deep chains.
  std::vector<NodeId> stack = {node};
  while (!stack.empty()) {
    const NodeId id = stack.back();
    stack.pop_back();
    auto it = (*t)->nodes.find(id);
    stack.insert(stack.end(), it->second->children.begin(), it->second->children.end());
    ReleaseBlocks(*it->second);
    (*t)->nodes.erase(it);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> TreeKvCache::ReserveSlots(TreeId tree, NodeId node,
                                                               int64_t n) {
  auto t = FindTree(tree);
  if (!t.ok()) return t.status();
  auto found = FindNode(**t, tree, node);
  if (!found.ok()) return found.status();
  TreeNode& nd = **found;
  if (n < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot reserve ", n, " slots in ", NodeName(tree, node)));
  }
  if (nd.parent != kNoNode) {
    const TreeNode& parent = *(*t)->nodes.at(nd.parent);
    if (parent.num_computed < parent.length()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot reserve slots in ", NodeName(tree, node), ": its parent node ", parent.id,
          " has only ", parent.num_computed, " of ", parent.length(), " tokens computed"));
    }
  }
  const int64_t pending = nd.length() - nd.num_computed;
  if (n > pending) {
    return absl::FailedPreconditionError(absl::StrCat("cannot reserve ", n, " slots in ",
                                                      NodeName(tree, node), ": only ", pending,
                                                      " tokens are pending"));
  }
  if (n == 0) return std::vector<int32_t>();

  const int64_t bt = pool_->block_tokens();
  const int64_t begin = nd.first_slot + nd.num_computed;  // first new slot, node-relative
  const int64_t first_block = begin / bt;
  const int64_t end_block = (begin + n + bt - 1) / bt;  // one past the last block written
  const int64_t have = static_cast<int64_t>(nd.blocks.size());

  // Copy-on-write of the shared blocks the new slots land in, remembering how to undo it.
  std::vector<std::pair<int64_t, int32_t>> copied;  // (index in nd.blocks, original block)
  auto undo = [&](absl::Status s) {
    for (const auto& [index, original] : copied) {
      pool_->AddRef(original);
      pool_->Release(nd.blocks[index]);
      nd.blocks[index] = original;
    }
    return absl::Status(s.code(), absl::StrCat("cannot reserve ", n, " slots in ",
                                               NodeName(tree, node), ": ", s.message()));
  };
  for (int64_t i = first_block; i < std::min(end_block, have); ++i) {
    if (pool_->refcount(nd.blocks[i]) <= 1) continue;
    const int32_t original = nd.blocks[i];
    auto writable = pool_->MakeWritable(original);
    if (!writable.ok()) return undo(writable.status());
    copied.emplace_back(i, original);
    nd.blocks[i] = *writable;
  }
  if (end_block > have) {
    std::vector<int32_t> fresh;
    if (absl::Status s = pool_->AllocateMany(end_block - have, &fresh); !s.ok()) return undo(s);
    nd.blocks.insert(nd.blocks.end(), fresh.begin(), fresh.end());
  }
  std::vector<int32_t> slots(n);
  for (int64_t i = 0; i < n; ++i) slots[i] = SlotOf(nd, nd.num_computed + i, bt);
  return slots;
}

absl::Status TreeKvCache::MarkComputed(TreeId tree, NodeId node, int64_t n) {
  auto t = FindTree(tree);
  if (!t.ok()) return t.status();
  auto found = FindNode(**t, tree, node);
  if (!found.ok()) return found.status();
  TreeNode& nd = **found;
  if (n < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot mark ", n, " tokens computed in ", NodeName(tree, node)));
  }
  // Reserve checked this too, but a split between reserve and mark can leave the parent short.
  if (n > 0 && nd.parent != kNoNode) {
    const TreeNode& parent = *(*t)->nodes.at(nd.parent);
    if (parent.num_computed < parent.length()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot mark tokens computed in ", NodeName(tree, node), ": its parent node ", parent.id,
          " has only ", parent.num_computed, " of ", parent.length(), " tokens computed"));
    }
  }
  const int64_t pending = nd.length() - nd.num_computed;
  if (n > pending) {
    return absl::FailedPreconditionError(absl::StrCat("cannot mark ", n, " tokens computed in ",
                                                      NodeName(tree, node), ": only ", pending,
                                                      " tokens are pending"));
  }
  const int64_t covered =
      static_cast<int64_t>(nd.blocks.size()) * pool_->block_tokens() - nd.first_slot;
  if (n > 0 && nd.num_computed + n > covered) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot mark ", n, " tokens computed in ", NodeName(tree, node),
                     ": their slots were not reserved (", std::max<int64_t>(0, covered),
                     " slots held, ", nd.num_computed + n, " needed)"));
  }
  nd.num_computed += n;
  return absl::OkStatus();
}

absl::Status TreeKvCache::Truncate(TreeId tree, NodeId node, int64_t n) {
  auto t = FindTree(tree);
  if (!t.ok()) return t.status();
  auto found = FindNode(**t, tree, node);
  if (!found.ok()) return found.status();
  TreeNode& nd = **found;
  if (n < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot truncate ", n, " tokens from ", NodeName(tree, node)));
  }
  if (!nd.children.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("cannot truncate ", NodeName(tree, node),
                                                      ": it has ", nd.children.size(),
                                                      " children and only a leaf can shrink"));
  }
  if (n > nd.length()) {
    return absl::OutOfRangeError(absl::StrCat("cannot truncate ", n, " tokens from ",
                                              NodeName(tree, node), ": it has only ", nd.length()));
  }
  const int64_t length = nd.length() - n;
  nd.tokens.resize(length);
  nd.num_computed = std::min(nd.num_computed, length);
  const int64_t keep = std::min(static_cast<int64_t>(nd.blocks.size()),
                                BlocksSpanned(nd.first_slot, length, pool_->block_tokens()));
  for (size_t i = keep; i < nd.blocks.size(); ++i) pool_->Release(nd.blocks[i]);
  nd.blocks.resize(keep);
  if (nd.blocks.empty()) nd.first_slot = 0;
  return absl::OkStatus();
}

absl::StatusOr<const TreeNode*> TreeKvCache::GetNode(TreeId tree, NodeId node) const {
  auto t = FindTree(tree);
  if (!t.ok()) return t.status();
  return FindNode(**t, tree, node);
}

absl::StatusOr<std::vector<const TreeNode*>> TreeKvCache::Path(TreeId tree, NodeId node) const {
  auto t = FindTree(tree);
  if (!t.ok()) return t.status();
  auto n = FindNode(**t, tree, node);
  if (!n.ok()) return n.status();
  std::vector<const TreeNode*> path;
  for (const TreeNode* p = *n; p != nullptr;
       p = p->parent == kNoNode ? nullptr : (*t)->nodes.at(p->parent).get()) {
    path.push_back(p);
  }
  std::reverse(path.begin(), path.end());
  return path;
}

std::vector<TreeId> TreeKvCache::ListTrees() const {
  std::vector<TreeId> ids;
  ids.reserve(trees_.size());
  for (const auto& [id, t] : trees_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

absl::StatusOr<TreeStats> TreeKvCache::Stats(TreeId tree) const {
  auto t = FindTree(tree);
  if (!t.ok()) return t.status();
  TreeStats stats;
  std::vector<int32_t> blocks;
  for (const auto& [id, n] : (*t)->nodes) {
    ++stats.nodes;
    stats.tokens += n->length();
    blocks.insert(blocks.end(), n->blocks.begin(), n->blocks.end());
    if (n->children.empty()) {
      ++stats.leaves;
      stats.sequence_layout_tokens += n->end_position();
    }
  }
  std::sort(blocks.begin(), blocks.end());
  stats.blocks = std::unique(blocks.begin(), blocks.end()) - blocks.begin();
  return stats;
}

NodeId TreeKvCache::root(TreeId tree) const {
  auto it = trees_.find(tree);
  return it == trees_.end() ? kNoNode : it->second.root;
}

}  // namespace deft
