// StepBuilder: assembles the inputs of one model step (LlamaModel::ForwardStep plus the DeFT plan)
// from tree nodes of any number of trees. The engine's scheduler step, its synchronous helpers
// (ComputePendingLocked, ScoreLeavesLocked) and speculative verification all describe their work
// to one builder:
//  - Feed(node, slots): the node's next pending tokens are computed into reserved `slots`; each
//    is a query that sees its path and the node's tokens up to itself;
//  - QueryOnly(node): the node's last token (KV already stored) recomputed for its logits;
//  - Draft(parent segment, ...): a token of a speculative token tree in a segment of its own
//    under the tip's segment (or an earlier draft token's), KV written to a temporary slot;
//  - Logits(row): the rows whose logits the caller wants, each once, in request order.
// The planner's segments are every node on the paths involved, each once (shared ancestors of
// several branches or trees are one segment each, so the plan reads their KV once): its computed
// slots followed by the slots fed this step.
//
// REQUIRES for Feed: the node's ancestors are fully computed (TreeKvCache's invariant) and the
// slots were reserved for exactly its next pending tokens. The builder reads the cache while it
// is built and until Run returns; the engine holds its lock throughout.
//
// Thread safety: none (one builder per step, on the thread that runs the step).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "engine/attention/partition_plan.h"
#include "engine/model/llama_model.h"
#include "engine/tree/tree_kv_cache.h"

namespace deft {

// A node of some tree, as a hash key.
struct NodeKey {
  TreeId tree;
  NodeId node;
  bool operator==(const NodeKey& o) const { return tree == o.tree && node == o.node; }
  template <typename H>
  friend H AbslHashValue(H h, const NodeKey& k) {
    return H::combine(std::move(h), k.tree, k.node);
  }
};

class StepBuilder {
 public:
  StepBuilder(const TreeKvCache& cache, int32_t block_tokens)
      : cache_(cache), block_tokens_(block_tokens) {}

  // The segment of `node` (creating it and its ancestors' segments on first use).
  // REQUIRES: the node exists.
  int32_t SegmentOf(TreeId tree, NodeId node);
  // Feeds the next slots.size() pending tokens of `node`; returns the row of the last one.
  // REQUIRES: !slots.empty(); the node is fed at most once per step.
  int32_t Feed(TreeId tree, NodeId node, std::span<const int32_t> slots);
  // Row of `node`'s last token recomputed as a query-only token (one row per node and step).
  // REQUIRES: the node is non-empty and fully computed.
  int32_t QueryOnly(TreeId tree, NodeId node);
  // A draft token in a new segment under `parent_segment`, its KV written to `slot`; returns
  // {segment, row}.
  std::pair<int32_t, int32_t> Draft(int32_t parent_segment, int32_t token, int64_t position,
                                    int32_t slot);
  // Asks for the logits of `row`; returns its index in the step's logits ([index, vocab]).
  int32_t Logits(int32_t row);

  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }
  bool empty() const { return tokens_.empty(); }

  // Plans the step and runs it: *logits gets [number of Logits() rows, vocab] (see
  // LlamaModel::ForwardStep for `sampling`).
  absl::Status Run(PartitionPlanner& planner, PartitionPlan* plan, LlamaModel& model,
                   KvBlockPool& pool, std::vector<float>* logits,
                   StepSampling* sampling = nullptr);

 private:
  using Key = NodeKey;
  int32_t NewSegment(int32_t parent, std::vector<int32_t> slots);

  const TreeKvCache& cache_;
  int32_t block_tokens_;
  std::vector<std::vector<int32_t>> seg_slots_;
  std::vector<int32_t> seg_parent_;
  absl::flat_hash_map<Key, int32_t> seg_of_;
  absl::flat_hash_map<Key, int32_t> query_only_row_;
  std::vector<int32_t> tokens_, kv_slots_, logit_rows_;
  std::vector<int64_t> positions_;
  std::vector<PlanQuery> queries_;
  absl::flat_hash_map<int32_t, int32_t> logits_index_;  // row -> index in logit_rows_
};

}  // namespace deft
