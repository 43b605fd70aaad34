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
//  t_item = max(len x head_dim x 2 x elem_bytes / (bw / (sms x cta_share)),
//               4 x rows16 x len x head_dim / (mma_flops / (sms x cta_share))) + item_overhead
//  t      = max(makespan of the items (in grid order) on slots = sms x ctas_per_sm CTA slots,
//               each item taking the first free slot; distinct KV bytes / bw)
//           + (partial bytes written and read back) / bw + merge_overhead
// where rows16 is the rows rounded up to 16. A CTA runs at 1 / cta_share of an SM's share of
// the machine whether it has the SM alone or not: the chunk kernel is latency-bound, so the
// third CTA an SM holds adds throughput instead of slowing the other two, and only the
// bandwidth caps the sum. The constants are a calibration: on the H100 sweeps of
// bench/RESULTS.md (9 trees x 7-13 chunk sizes, kernels of 4dabfbf) they pick the best size or
// one within 0.7 us on every tree (0.7 on APPS, 0.5 on few-shot 50x1, 0.3 on 16x400), where
// 2 slots per SM at a full share each (the previous constants) lost 2.8 us on few-shot 50x400
// and 2.3 on 50x200, and 3 slots at a full share chose smaller chunks that lost to the merge
// (6.3 us over the 9 trees). Measured with the new choices (flatten, fp16): 50x400 48.2 ->
// 45.0 us, 50x200 35.1 -> 33.1, APPS 23.2 -> 23.7, 50x1 22.8 -> 23.4, the rest within 0.2.
// Thread safety: stateless functions.
#pragma once

#include <memory>
#include <span>

#include "absl/status/statusor.h"
#include "engine/attention/partition_plan.h"

namespace deft {

struct GpuAttentionCostModel {
  int32_t num_heads = 32, num_kv_heads = 8, head_dim = 128, elem_bytes = 2;
  int32_t sms = 132, ctas_per_sm = 3;  // the chunk kernel's CTAs per SM
  double cta_share = 1.5;  // a CTA progresses at bandwidth and mma_flops / (sms x cta_share)
  double bandwidth = 3.0e12;  // bytes/s
  double mma_flops = 4.0e14;  // calibration (wgmma peak is ~2x)
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
