// The GPU chunk-size choice (engine/attention/gpu_chunking.h), host only: the cost model prefers
// parallel chunks for a lone chain and long chunks for a prompt shared by many queries; the
// chooser plans exactly as a planner with the options it chose, keeps the caller's mode and IO
// accounting, and chooses again only when the step's shape moves.
#include "engine/attention/gpu_chunking.h"

#include <gtest/gtest.h>

#include "engine/attention/workload_forest.h"

namespace deft {
namespace {

GpuAttentionCostModel Llama3() { return GpuAttentionCostModel{}; }  // 32/8 heads of 128, H100

struct Step {
  WorkloadForest forest;
  std::vector<std::vector<int32_t>> slots;
  std::vector<PlanSegment> segments;
  explicit Step(WorkloadForest f) : forest(std::move(f)) {
    slots = forest.ContiguousSlots();
    segments = forest.Segments(slots);
  }
};

TEST(GpuChunking, ALoneChainIsCutForParallelismAndASharedPromptIsKeptLong) {
  Step chain(ChainForest(8000));
  PartitionPlan plan;
  auto o = ChooseGpuPlannerOptions(AttentionMode::kFlatten, chain.segments, chain.forest.queries,
                                   Llama3(), &plan);
  ASSERT_TRUE(o.ok()) << o.status();
  // One query: only the split gives CTAs; 8 KV heads x chunks should cover the 132 SMs.
  EXPECT_GE(plan.num_chunks() * 8, 132);
  Step siblings(SiblingsForest(4000, 256));
  auto s = ChooseGpuPlannerOptions(AttentionMode::kFlatten, siblings.segments,
                                   siblings.forest.queries, Llama3(), &plan);
  ASSERT_TRUE(s.ok()) << s.status();
  // 257 queries share the prompt: each chunk leaves a partial state per query and head, so the
  // chosen chunks are much longer than the chain's.
  EXPECT_GE(s->max_chunk_tokens, 2 * o->max_chunk_tokens);
}

void ExpectSamePlan(const PartitionPlan& a, const PartitionPlan& b) {
  EXPECT_EQ(a.kv_slots, b.kv_slots);
  EXPECT_EQ(a.chunk_begin, b.chunk_begin);
  EXPECT_EQ(a.entry_begin, b.entry_begin);
  EXPECT_EQ(a.entry_query, b.entry_query);
  EXPECT_EQ(a.entry_mask_begin, b.entry_mask_begin);
  EXPECT_EQ(a.masks, b.masks);
  EXPECT_EQ(a.query_entries, b.query_entries);
  EXPECT_EQ(a.kv_bytes_read, b.kv_bytes_read);
}

TEST(GpuChunking, TheChooserPlansLikeItsChoiceAndChoosesAgainOnlyWhenTheShapeMoves) {
  GpuChunkChooser chooser(Llama3());
  PlannerOptions base;
  base.mode = AttentionMode::kNode;
  base.bytes_per_kv_token = 12345;
  Step step(FewShotForest(4000, 16, 100));
  PartitionPlan plan, direct;
  ASSERT_TRUE(chooser.Plan(base, step.segments, step.forest.queries, &plan).ok());
  EXPECT_EQ(chooser.choices(), 1);
  EXPECT_EQ(plan.mode, AttentionMode::kNode);
  EXPECT_EQ(plan.kv_bytes_read, plan.kv_tokens_read * 12345);  // the caller's accounting
  auto chosen = ChooseGpuPlannerOptions(base.mode, step.segments, step.forest.queries, Llama3(),
                                        &direct);
  ASSERT_TRUE(chosen.ok());
  chosen->bytes_per_kv_token = base.bytes_per_kv_token;
  PartitionPlanner planner(*chosen);
  ASSERT_TRUE(planner.Plan(step.segments, step.forest.queries, &direct).ok());
  ExpectSamePlan(plan, direct);

  // A few more tokens per branch (5600 -> 5632): same choice, no new search.
  Step grown(FewShotForest(4000, 16, 102));
  ASSERT_TRUE(chooser.Plan(base, grown.segments, grown.forest.queries, &plan).ok());
  EXPECT_EQ(chooser.choices(), 1);
  // More than 1/8 growth, another query count, another mode: a new choice each.
  Step longer(FewShotForest(4000, 16, 200));
  ASSERT_TRUE(chooser.Plan(base, longer.segments, longer.forest.queries, &plan).ok());
  EXPECT_EQ(chooser.choices(), 2);
  Step wider(FewShotForest(4000, 17, 200));
  ASSERT_TRUE(chooser.Plan(base, wider.segments, wider.forest.queries, &plan).ok());
  EXPECT_EQ(chooser.choices(), 3);
  base.mode = AttentionMode::kFlatten;
  ASSERT_TRUE(chooser.Plan(base, wider.segments, wider.forest.queries, &plan).ok());
  EXPECT_EQ(chooser.choices(), 4);
  EXPECT_EQ(plan.mode, AttentionMode::kFlatten);
}

TEST(GpuChunking, PlannerErrorsComeBackFromTheChooser) {
  GpuChunkChooser chooser(Llama3());
  Step step(ChainForest(10));
  std::vector<PlanQuery> bad = {{5, 1}};  // no segment 5
  PartitionPlan plan;
  EXPECT_EQ(chooser.Plan(PlannerOptions{}, step.segments, bad, &plan).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace deft
