// Per-key quota accounting; see quota.h.
#include "server/quota.h"

#include <algorithm>

namespace deft::server {

int64_t BlocksFor(int64_t first_slot, int64_t length, int32_t block_tokens) {
  if (length <= 0) return 0;
  return (first_slot + length + block_tokens - 1) / block_tokens;
}

BlockCounts CountBlocks(const TreeKvCache& cache, TreeId tree) {
  BlockCounts counts;
  std::vector<NodeId> order = {cache.root(tree)};
  for (size_t i = 0; i < order.size(); ++i) {
    auto n = cache.GetNode(tree, order[i]);
    if (!n.ok()) continue;
    for (int32_t b : (*n)->blocks) ++counts[b];
    order.insert(order.end(), (*n)->children.begin(), (*n)->children.end());
  }
  return counts;
}

int64_t BlocksToAllocate(const TreeNode& node, int64_t target_length, const BlockCounts& counts,
                         int32_t block_tokens) {
  const int64_t held = static_cast<int64_t>(node.blocks.size());
  // A node without blocks starts its first block at slot 0 (tree_kv_cache.h).
  const int64_t first_slot = held > 0 ? node.first_slot : 0;
  int64_t extra = std::max<int64_t>(0, BlocksFor(first_slot, target_length, block_tokens) - held);
  if (target_length > node.num_computed) {
    // The next write goes to slot first_slot + num_computed; inside a shared block it copies it.
    const int64_t next_block = (first_slot + node.num_computed) / block_tokens;
    if (next_block < held) {
      auto it = counts.find(node.blocks[next_block]);
      if (it != counts.end() && it->second > 1) ++extra;
    }
  }
  return extra;
}

std::unique_lock<std::mutex> QuotaLedger::LockOwner(const std::string& owner) {
  std::mutex* m;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto& slot = owner_mu_[owner];
    if (slot == nullptr) slot = std::make_unique<std::mutex>();
    m = slot.get();
  }
  return std::unique_lock<std::mutex>(*m);
}

QuotaUsage QuotaLedger::Usage(
    const TreeEngine& engine, const std::string& owner, std::span<const TreeId> trees,
    const absl::flat_hash_map<std::pair<TreeId, NodeId>, int64_t>& what_if) {
  absl::flat_hash_map<std::pair<TreeId, NodeId>, int64_t> targets;
  QuotaUsage usage;
  {
    std::lock_guard<std::mutex> lock(mu_);
    targets = targets_;
    if (auto it = reserved_.find(owner); it != reserved_.end()) usage = it->second;
  }
  for (const auto& [key, length] : what_if) targets[key] = std::max(targets[key], length);
  const int32_t block_tokens = engine.options().block_tokens;
  engine.WithTrees([&](const TreeKvCache& cache) {
    for (TreeId tree : trees) {
      const BlockCounts counts = CountBlocks(cache, tree);
      usage.kv_blocks += static_cast<int64_t>(counts.size());
      std::vector<NodeId> order = {cache.root(tree)};
      for (size_t i = 0; i < order.size(); ++i) {
        auto n = cache.GetNode(tree, order[i]);
        if (!n.ok()) continue;
        const TreeNode& node = **n;
        ++usage.nodes;
        int64_t target = node.length();
        if (auto t = targets.find(std::make_pair(tree, node.id)); t != targets.end()) {
          target = std::max(target, t->second);
        }
        usage.kv_blocks += BlocksToAllocate(node, target, counts, block_tokens);
        order.insert(order.end(), node.children.begin(), node.children.end());
      }
    }
  });
  return usage;
}

void QuotaLedger::SetTarget(TreeId tree, NodeId node, int64_t target_length) {
  std::lock_guard<std::mutex> lock(mu_);
  targets_[std::make_pair(tree, node)] = target_length;
}

void QuotaLedger::ClearTarget(TreeId tree, NodeId node) {
  std::lock_guard<std::mutex> lock(mu_);
  targets_.erase(std::make_pair(tree, node));
}

void QuotaLedger::Reserve(const std::string& owner, QuotaUsage usage) {
  std::lock_guard<std::mutex> lock(mu_);
  QuotaUsage& r = reserved_[owner];
  r.nodes += usage.nodes;
  r.kv_blocks += usage.kv_blocks;
}

void QuotaLedger::Unreserve(const std::string& owner, QuotaUsage usage) {
  std::lock_guard<std::mutex> lock(mu_);
  QuotaUsage& r = reserved_[owner];
  r.nodes -= usage.nodes;
  r.kv_blocks -= usage.kv_blocks;
}

std::vector<int32_t> GrantTokens(std::span<const TreeNode> nodes,
                                 std::span<const int32_t> max_tokens, const BlockCounts& counts,
                                 int64_t free_blocks, int32_t block_tokens) {
  const size_t n = nodes.size();
  // cost(i, m): blocks branch i allocates to grow by m tokens.
  auto cost = [&](size_t i, int64_t m) {
    const TreeNode& node = nodes[i];
    return BlocksToAllocate(node, node.length() + m, counts, block_tokens) -
           BlocksToAllocate(node, node.length(), counts, block_tokens);
  };
  std::vector<int64_t> granted(n);
  for (size_t i = 0; i < n; ++i) {
    granted[i] = cost(i, 1);
    free_blocks -= granted[i];
  }
  if (free_blocks < 0) return {};
  for (bool more = true; more && free_blocks > 0;) {
    more = false;
    for (size_t i = 0; i < n && free_blocks > 0; ++i) {
      if (cost(i, max_tokens[i]) <= granted[i]) continue;
      ++granted[i];
      --free_blocks;
      more = true;
    }
  }
  std::vector<int32_t> caps(n);
  for (size_t i = 0; i < n; ++i) {
    // The largest m in [1, max_tokens] with cost(i, m) <= granted (cost grows with m).
    int32_t lo = 1, hi = max_tokens[i];
    while (lo < hi) {
      const int32_t mid = lo + (hi - lo + 1) / 2;
      if (cost(i, mid) <= granted[i]) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    caps[i] = lo;
  }
  return caps;
}

}  // namespace deft::server
