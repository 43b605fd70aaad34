// Tree shapes of the DeFT workloads (../shared/workloads) and synthetic shapes, as planner
// forests: segments (a parent and a token count each) and queries. Used by the attention
// benchmarks and tests of every backend so that a tree means the same thing everywhere.
//
// Shapes:
//  - Reasoning (reasoning/*.json, one tree of the list): node 0 is the prompt (its length
//    replaced by `prompt_tokens` when > 0), every other node its recorded `value` tokens
//    (capped at `max_node_tokens` when > 0); each leaf is a query on its last token.
//  - Speculative (speculative/APPS_tree_size*.json): a prefix of `prefix_tokens` whose last token
//    is the token tree's implicit root, one single-token segment per draft node (the first
//    Token_Tree_size - 1 paths of Tree_Structure); every node, the root included, is a query.
//  - FewShot: one prompt shared by `branches` branches of `branch_tokens` each; each tip a query.
//  - Chain: one sequence of `tokens`, one query on its last token.
//  - Siblings: a prompt of `prompt_tokens` and `count` one-token children, every child a query
//    and the prompt's last token too (count + 1 queries).
// Loading errors (missing file, bad JSON, a path before its parent, a tree index out of range)
// are INVALID_ARGUMENT / NOT_FOUND with the file named; nothing throws.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/attention/partition_plan.h"

namespace deft {

struct WorkloadForest {
  std::string name;
  std::vector<int32_t> parent;  // per segment
  std::vector<int32_t> length;  // per segment, tokens
  std::vector<PlanQuery> queries;

  int32_t Add(int32_t parent_segment, int32_t tokens);
  int64_t total_tokens() const;
  // Planner input over given slot storage: segment i's slots are slots_of[i] (one span per
  // segment, each length[i] long).
  std::vector<PlanSegment> Segments(const std::vector<std::vector<int32_t>>& slots_of) const;
  // Consecutive slots in segment order starting at `first_slot` (one token each).
  std::vector<std::vector<int32_t>> ContiguousSlots(int32_t first_slot = 0) const;
};

// The reasoning file's trees (JSON list) and the speculative file's object.
absl::StatusOr<int32_t> CountReasoningTrees(const std::string& path);
absl::StatusOr<WorkloadForest> LoadReasoningForest(const std::string& path, int32_t tree_index,
                                                   int32_t prompt_tokens,
                                                   int32_t max_node_tokens = 0);
absl::StatusOr<WorkloadForest> LoadSpeculativeForest(const std::string& path,
                                                     int32_t prefix_tokens);
WorkloadForest FewShotForest(int32_t prompt_tokens, int32_t branches, int32_t branch_tokens);
WorkloadForest ChainForest(int32_t tokens);
WorkloadForest SiblingsForest(int32_t prompt_tokens, int32_t count);

// The workloads directory: $DEFT_WORKLOADS_DIR, else `fallback` (a build-time default).
std::string WorkloadsDir(const std::string& fallback);

}  // namespace deft
