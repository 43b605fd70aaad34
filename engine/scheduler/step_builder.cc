#include "engine/scheduler/step_builder.h"

namespace deft {

int32_t StepBuilder::NewSegment(int32_t parent, std::vector<int32_t> slots) {
  seg_slots_.push_back(std::move(slots));
  seg_parent_.push_back(parent);
  return static_cast<int32_t>(seg_slots_.size()) - 1;
}

int32_t StepBuilder::SegmentOf(TreeId tree, NodeId node) {
  auto found = seg_of_.find(Key{tree, node});
  if (found != seg_of_.end()) return found->second;
  auto path = cache_.Path(tree, node);
  int32_t parent = -1;
  for (const TreeNode* n : *path) {
    auto it = seg_of_.find(Key{tree, n->id});
    if (it == seg_of_.end()) {
      std::vector<int32_t> slots;
      slots.reserve(static_cast<size_t>(n->num_computed));
      for (int64_t i = 0; i < n->num_computed; ++i) {
        slots.push_back(TreeKvCache::SlotOf(*n, i, block_tokens_));
      }
      it = seg_of_.emplace(Key{tree, n->id}, NewSegment(parent, std::move(slots))).first;
    }
    parent = it->second;
  }
  return parent;
}

int32_t StepBuilder::Feed(TreeId tree, NodeId node, std::span<const int32_t> slots) {
  const TreeNode* n = *cache_.GetNode(tree, node);
  const int32_t seg = SegmentOf(tree, node);
  std::vector<int32_t>& seg_slots = seg_slots_[seg];
  for (size_t j = 0; j < slots.size(); ++j) {
    const int64_t idx = n->num_computed + static_cast<int64_t>(j);
    tokens_.push_back(n->tokens[idx]);
    positions_.push_back(n->start_position + idx);
    kv_slots_.push_back(slots[j]);
    queries_.push_back({seg, static_cast<int32_t>(idx + 1)});
    seg_slots.push_back(slots[j]);
  }
  return static_cast<int32_t>(tokens_.size()) - 1;
}

int32_t StepBuilder::QueryOnly(TreeId tree, NodeId node) {
  auto it = query_only_row_.find(Key{tree, node});
  if (it != query_only_row_.end()) return it->second;
  const TreeNode* n = *cache_.GetNode(tree, node);
  const int32_t seg = SegmentOf(tree, node);
  tokens_.push_back(n->tokens.back());
  positions_.push_back(n->end_position() - 1);
  kv_slots_.push_back(-1);  // stored already
  queries_.push_back({seg, static_cast<int32_t>(n->length())});
  const int32_t row = static_cast<int32_t>(tokens_.size()) - 1;
  query_only_row_.emplace(Key{tree, node}, row);
  return row;
}

std::pair<int32_t, int32_t> StepBuilder::Draft(int32_t parent_segment, int32_t token,
                                               int64_t position, int32_t slot) {
  const int32_t seg = NewSegment(parent_segment, {slot});
  tokens_.push_back(token);
  positions_.push_back(position);
  kv_slots_.push_back(slot);
  queries_.push_back({seg, 1});
  return {seg, static_cast<int32_t>(tokens_.size()) - 1};
}

int32_t StepBuilder::Logits(int32_t row) {
  auto [it, inserted] = logits_index_.emplace(row, static_cast<int32_t>(logit_rows_.size()));
  if (inserted) logit_rows_.push_back(row);
  return it->second;
}

absl::Status StepBuilder::Run(PartitionPlanner& planner, PartitionPlan* plan, LlamaModel& model,
                              KvBlockPool& pool, std::vector<float>* logits,
                              StepSampling* sampling) {
  std::vector<PlanSegment> segments(seg_slots_.size());
  for (size_t i = 0; i < segments.size(); ++i) segments[i] = {seg_parent_[i], seg_slots_[i]};
  absl::Status s = model.PlanStep(planner, segments, queries_, plan);
  if (!s.ok()) return s;
  LlamaModel::StepInput step{tokens_, positions_, kv_slots_, logit_rows_};
  return model.ForwardStep(step, pool, *plan, logits, sampling);
}

}  // namespace deft
