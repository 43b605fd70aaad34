// Executes a PartitionPlan on the CPU for one layer: partial attention per (chunk, query) entry,
// then the per-query log-sum-exp merge in plan order. The reference every other backend is
// compared with.
//
// Shapes: q [num_queries, num_heads, head_dim] (RoPE applied); K/V read from the pool layer
// through plan.kv_slots; out [num_queries, num_heads, head_dim]. GQA: query head h reads KV head
// h / (num_heads / num_kv_heads). Scale 1/sqrt(head_dim). A query with no visible token gets
// zeros (cannot happen for a well-formed step: a token always sees itself).
//
// Partial states are (o normalized, lse in natural log); MergeStates combines two.
//
// Execution (DeFT's KV-guided grouping on the CPU): pass 1 runs over chunks, handed to the pool's
// threads one at a time. A chunk is walked in tiles of 32 tokens; a tile's K/V rows are gathered
// once and serve every entry of the chunk and every query head (loop order chunk -> tokens ->
// entries), with an online softmax per (entry, head) into a partial state. Scores are computed 8
// tokens at a time; a group of 8 tokens that an entry does not see at all is skipped, other
// masked tokens are computed and get weight exactly 0. Pass 2 merges each query's entries in plan
// order, in parallel over queries. Every partial state is computed by one thread from the same
// inputs in the same order, so the output does not depend on the thread count.
//
// Thread safety: concurrent calls need distinct scratch (the overload without one uses the calling
// thread's own). REQUIRES: not called from inside a ParallelFor job of `pool`;
// num_heads % num_kv_heads == 0; head_dim % 8 == 0; kv.kv_dim() == num_kv_heads * head_dim.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/attention/partition_plan.h"
#include "engine/kv/kv_block_pool.h"

namespace deft {

class ThreadPool;

struct AttentionShape {
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
};

// Merges partial state (o_b, lse_b) into (o_a, lse_a): o = (e^lse_a o_a + e^lse_b o_b) / (e^lse_a
// + e^lse_b), lse = log(e^lse_a + e^lse_b), natural log. lse -inf means "empty".
void MergeStates(float* o_a, float* lse_a, const float* o_b, float lse_b, int64_t head_dim);

// Buffers of RunAttentionCpu, kept across calls (they grow to the largest step seen).
struct CpuAttentionScratch {
  std::vector<float> partial_o;    // [num_entries, num_heads, head_dim]
  std::vector<float> partial_lse;  // [num_entries, num_heads]
  // Per pool thread: scores of one tile of one entry, [num_heads, tile tokens], and the running
  // max and sum per (entry, head) of a chunk.
  std::vector<std::vector<float>> scores, running_max, running_sum;
};

void RunAttentionCpu(ThreadPool& pool, const PartitionPlan& plan, const KvBlockPool& kv,
                     int64_t layer, const AttentionShape& shape, const float* q, float* out,
                     CpuAttentionScratch* scratch);
// Same, with a scratch owned by the calling thread.
void RunAttentionCpu(ThreadPool& pool, const PartitionPlan& plan, const KvBlockPool& kv,
                     int64_t layer, const AttentionShape& shape, const float* q, float* out);

}  // namespace deft
