#include "engine/attention/gpu_chunking.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <functional>
#include <queue>
#include <vector>

#include "absl/status/statusor.h"

namespace deft {

double EstimateGpuAttentionSeconds(const PartitionPlan& plan, const GpuAttentionCostModel& m) {
  const int32_t group = m.num_heads / m.num_kv_heads;
  const int32_t slots = m.sms * m.ctas_per_sm;
  const double bytes_per_token = 2.0 * m.head_dim * m.elem_bytes;  // K and V of one head
  const double per_cta_bw = m.bandwidth / (m.sms * m.cta_share);
  const double per_cta_flops = m.mma_flops / (m.sms * m.cta_share);
  // Item times in grid order (work items fastest, then KV heads: the same list per head).
  std::vector<double> items;
  for (int32_t c = 0; c < plan.num_chunks(); ++c) {
    const double len = plan.chunk_begin[c + 1] - plan.chunk_begin[c];
    int64_t rows = static_cast<int64_t>(plan.entry_begin[c + 1] - plan.entry_begin[c]) * group;
    while (rows > 0) {
      const int64_t r = std::min<int64_t>(rows, 64);
      rows -= r;
      const double rows16 = static_cast<double>((r + 15) / 16 * 16);
      items.push_back(std::max(len * bytes_per_token / per_cta_bw,
                               4.0 * rows16 * len * m.head_dim / per_cta_flops) +
                      m.item_overhead_s);
    }
  }
  // The block scheduler hands each CTA to the first free slot: simulate it for the makespan
  // (this is what charges a chunk size for a last, partly filled wave).
  std::priority_queue<double, std::vector<double>, std::greater<double>> free_at;
  for (int32_t i = 0; i < slots; ++i) free_at.push(0.0);
  double makespan = 0;
  for (int32_t h = 0; h < m.num_kv_heads; ++h) {
    for (double t : items) {
      const double done = free_at.top() + t;
      free_at.pop();
      free_at.push(done);
      makespan = std::max(makespan, done);
    }
  }
  // Partial o in the KV dtype and lse in fp32, written by the chunk kernel and read by the merge.
  const double partial_bytes =
      2.0 * plan.num_entries() * m.num_heads * (m.head_dim * m.elem_bytes + 4.0);
  // The bandwidth floor counts each distinct KV token once: a token several chunks read (the
  // seq and tree modes read a shared prompt once per query or per split) comes from L2 after
  // its first read.
  int32_t max_slot = -1;
  for (const int32_t s : plan.kv_slots) max_slot = std::max(max_slot, s);
  std::vector<uint8_t> seen(static_cast<size_t>(max_slot + 1), 0);
  int64_t unique_tokens = 0;
  for (const int32_t s : plan.kv_slots) {
    if (s >= 0 && !seen[static_cast<size_t>(s)]) {
      seen[static_cast<size_t>(s)] = 1;
      ++unique_tokens;
    }
  }
  const double kv_bytes = static_cast<double>(unique_tokens) * m.num_kv_heads * bytes_per_token;
  return std::max(makespan, kv_bytes / m.bandwidth) + partial_bytes / m.bandwidth +
         m.merge_overhead_s;
}

absl::StatusOr<PlannerOptions> ChooseGpuPlannerOptions(AttentionMode mode,
                                                       std::span<const PlanSegment> segments,
                                                       std::span<const PlanQuery> queries,
                                                       const GpuAttentionCostModel& model,
                                                       PartitionPlan* plan) {
  static constexpr int32_t kSizes[] = {64,  96,  128,  192,  256,  320,  384,  448,  512,
                                       576, 640, 704,  768,  832,  896,  960,  1024, 1152,
                                       1280, 1536, 2048, 3072, 4096, 8192};
  PlannerOptions best;
  double best_time = -1;
  PartitionPlan trial;
  for (int32_t size : kSizes) {
    PlannerOptions o;
    o.mode = mode;
    o.min_chunks = 1;
    o.min_chunk_tokens = size;
    o.max_chunk_tokens = size;
    o.seq_chunk_tokens = size;
    o.bytes_per_kv_token = 2LL * model.num_kv_heads * model.head_dim * model.elem_bytes;
    PartitionPlanner planner(o);
    if (absl::Status st = planner.Plan(segments, queries, &trial); !st.ok()) return st;
    const double t = EstimateGpuAttentionSeconds(trial, model);
    if (best_time < 0 || t < best_time) {
      best_time = t;
      best = o;
      std::swap(*plan, trial);
    }
  }
  return best;
}

absl::Status GpuChunkChooser::Plan(const PlannerOptions& base,
                                   std::span<const PlanSegment> segments,
                                   std::span<const PlanQuery> queries, PartitionPlan* plan) {
  int64_t tokens = 0;
  for (const PlanSegment& s : segments) tokens += static_cast<int64_t>(s.slots.size());
  const bool moved = planner_ == nullptr || mode_ != base.mode || queries_ != queries.size() ||
                     std::abs(tokens - tokens_) * 8 > tokens_;
  if (moved) {
    absl::StatusOr<PlannerOptions> chosen =
        ChooseGpuPlannerOptions(base.mode, segments, queries, model_, plan);
    if (!chosen.ok()) return chosen.status();
    PlannerOptions options = *chosen;
    options.bytes_per_kv_token = base.bytes_per_kv_token;  // the engine's IO accounting
    planner_ = std::make_unique<PartitionPlanner>(options);
    mode_ = base.mode;
    queries_ = queries.size();
    tokens_ = tokens;
    ++choices_;
  }
  return planner_->Plan(segments, queries, plan);
}

}  // namespace deft
