// Chunk sizes for the GPU tree attention kernels, chosen per step by a small cost model.
//
// Why: on the GPU a chunk is a CTA's stream of K/V. Small chunks give parallelism (a 8000-token
// chain with one query needs ~2 CTAs per SM, so ~250-token chunks), but every chunk leaves one
// partial state (o in the KV dtype, lse in fp32) per query and head it serves, written and read
// back by the merge: a 4000-token prompt shared by 257 queries cut into 128-token chunks would
// move 75 MB of partials to save nothing (its K/V is 16 MB). So the best size depends on the tree: the model
// below weighs both and picks, among candidate sizes, the one with the least estimated time.
//
// Model (per layer; constants are measured H100 numbers, overridable):
//  item   = up to 64 rows (entry x query head of a GQA group) of one chunk, for one KV head;
//  t_item = max(len x head_dim x 2 x elem_bytes / (bw / slots),
//               4 x rows16 x len x head_dim / (mma_flops / slots)) + item_overhead
//  t      = makespan of the items (in grid order) on slots = sms x ctas_per_sm CTA slots, each
//           item taking the first free slot, + (partial bytes written and read back) / bw
//           + merge_overhead
// where rows16 is the rows rounded up to 16. The constants are a calibration, not the kernel's
// shape (it runs 3 CTAs per SM and 64-row wgmma tiles): on the H100 sweeps of bench/RESULTS.md
// (9 trees x 7-13 chunk sizes, kernels of 4dabfbf) they pick the best size or one within 0.3 us
// on 7 of 9 trees (few-shot 50x400: 48.3 at 384 against 45.4 us at 896; 50x200: 36.0 at 896
// against 33.7 at 640), where the kernel's own shape (3 CTAs per SM, 64-row tiles) picked
// smaller chunks that lost 0.5-1.5 us to the merge on 5 of 9 rows (at 9f202b1).
// Thread safety: stateless functions.
#pragma once

#include <memory>
#include <span>

#include "absl/status/statusor.h"
#include "engine/attention/partition_plan.h"

namespace deft {

struct GpuAttentionCostModel {
  int32_t num_heads = 32, num_kv_heads = 8, head_dim = 128, elem_bytes = 2;
  int32_t sms = 132, ctas_per_sm = 2;
  double bandwidth = 3.0e12;  // bytes/s
  double mma_flops = 4.0e14;  // achieved by mma.sync m16n8k16 in the chunk kernel
  double item_overhead_s = 0.4e-6;
  double merge_overhead_s = 2.0e-6;
};

// Estimated seconds of one layer's attention for `plan` (any mode).
double EstimateGpuAttentionSeconds(const PartitionPlan& plan, const GpuAttentionCostModel& model);

// The planner options for `mode` whose plan has the least estimated time, trying chunk sizes
// 64..8192 (flatten: the chunk size; node: the longest piece of a segment; seq and tree: the
// split size). `plan` receives the chosen plan. Errors are the planner's.
absl::StatusOr<PlannerOptions> ChooseGpuPlannerOptions(AttentionMode mode,
                                                       std::span<const PlanSegment> segments,
                                                       std::span<const PlanQuery> queries,
                                                       const GpuAttentionCostModel& model,
                                                       PartitionPlan* plan);

// ChooseGpuPlannerOptions amortized over a decode: it chooses again only when the step's shape
// moved (another mode or number of queries, or KV tokens changed by more than 1/8 since the last
// choice) and otherwise plans with the options it chose last. A decode grows every tree by one
// token per branch per step, so the choice (16 trial plans; 14 took 1-7 ms of host time on
// the workloads) is made about once per 12% of growth, not every step. Not thread-safe.
class GpuChunkChooser {
 public:
  explicit GpuChunkChooser(const GpuAttentionCostModel& model) : model_(model) {}
  // Plans with base's mode and IO accounting (bytes_per_kv_token) and the chosen chunk sizes.
  absl::Status Plan(const PlannerOptions& base, std::span<const PlanSegment> segments,
                    std::span<const PlanQuery> queries, PartitionPlan* plan);
  int64_t choices() const { return choices_; }

 private:
  GpuAttentionCostModel model_;
  std::unique_ptr<PartitionPlanner> planner_;  // with the chosen options; null before a choice
  AttentionMode mode_ = AttentionMode::kFlatten;
  size_t queries_ = 0;
  int64_t tokens_ = 0;
  int64_t choices_ = 0;
};

}  // namespace deft
