// DeFT tree attention on the GPU: executes one layer of a host-built DeFT partition plan
// (engine/attention/partition_plan.h) over the paged KV pool, in any of the four modes
// (seq, tree, node, flatten: the mode only changes the plan, not the kernels).
//
// Two launches per layer:
//  1. chunk kernel, one CTA (4 warps) per (work item, KV head). A work item is up to 64 rows of
//     one chunk, a row being (entry, query head of the GQA group): all query heads that share a
//     KV head and all queries that share a chunk are the M dimension of one tensor-core tile, so
//     the chunk's K/V streams through shared memory once for them (a chunk with more than 64
//     rows has several work items side by side in the grid, which read its K/V from L2 after the
//     first). Per entry it writes a partial state (o normalized, in T; lse in natural log,
//     fp32) to the workspace. Masks (token trees, chunk boundaries inside a segment) come
//     from the plan's per-entry bitmasks.
//  2. merge kernel, one warp per (query, head), or per (query, KV head) for plans of hundreds of
//     queries: merges the query's entries in the plan's order (deterministic; no atomics) into
//     out, in the activation dtype.
//
// Layouts (all device pointers):
//  q   : [num_queries, num_heads, head_dim], dtype T (RoPE applied, not scaled)
//  out : [num_queries, num_heads, head_dim], dtype T
//  k, v: token `slot` of KV head h at k + slot * kv_slot_stride + h * head_dim (elements of T);
//        each head's head_dim values contiguous and 16-byte aligned.
//  plan arrays: the PartitionPlan vectors of the same names, uploaded as int32 / uint64.
//  workspace: TreeAttentionWorkspaceBytes(...) bytes, 256-byte aligned.
// T is __half or __nv_bfloat16; head_dim 64 or 128; num_heads / num_kv_heads in 1..8. Chunks of
// any length (masks are one 64-bit word per 64 tokens of the chunk, as the planner writes them).
//
// Errors: cudaErrorInvalidValue for an unsupported shape or dtype, else the launch's error.
// Thread safety: stateless; concurrent launches need distinct workspaces.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace deft::kernels {

enum class KvDtype { kFloat16, kBFloat16 };

inline constexpr int kTreeAttentionTileRows = 64;  // rows of one work item
inline constexpr int kTreeAttentionWorkPreInts = 3 * kTreeAttentionTileRows;

struct TreeAttentionPlanView {  // device pointers to the plan's arrays
  const int32_t* kv_slots = nullptr;          // [num_kv]
  const int32_t* chunk_begin = nullptr;       // [num_chunks + 1]
  const int32_t* entry_begin = nullptr;       // [num_chunks + 1]
  const int32_t* entry_query = nullptr;       // [num_entries]
  const int32_t* entry_mask_begin = nullptr;  // [num_entries + 1]
  const uint64_t* masks = nullptr;            // [num_mask_words]
  const int32_t* query_entry_begin = nullptr; // [num_queries + 1]
  const int32_t* query_entries = nullptr;     // [query_entry_begin[num_queries]]
  // Work items (BuildTreeAttentionWork in tree_attention_plan.h), 4 int32 each, 16-byte
  // aligned: {first kv index of the chunk, chunk tokens, chunk's first entry,
  //           first row | tile rows << 24 | sole reader << 31}. Packed so a CTA's set-up is
  // one load. Sole reader: no other work item reads the chunk's K/V (the chunk's only item, in
  // a plan whose chunks share no slots: TreeAttentionPlanArrays::disjoint_chunks).
  const int32_t* work = nullptr;  // [num_work * 4]
  // Per work item, kTreeAttentionWorkPreInts int32 (zeros past the chunk / the tile), so that a
  // CTA's first round of loads needs only its index: the slot ids of the chunk's first
  // kTreeAttentionTileRows tokens, then each tile row's query, then each row's first mask word
  // (entry_mask_begin of its entry) or -1 where the entry has no masks.
  const int32_t* work_pre = nullptr;  // [num_work * kTreeAttentionWorkPreInts]
  int32_t num_chunks = 0;
  int32_t num_queries = 0;
  int32_t num_entries = 0;
  int32_t num_work = 0;
  int32_t max_query_entries = 0;  // the most entries of one query
  int32_t group = 0;  // num_heads / num_kv_heads the work items were built for
};

// Which launches RunTreeAttention makes: both (the default), or one of them (profiling).
enum class TreeAttentionPhases { kBoth, kChunkOnly, kMergeOnly };

// The merge kernel: kAuto picks one warp per (query, head), or, for plans with more of those than
// one wave holds (hundreds of queries), one warp per (query, KV head) merging its GQA group of 2,
// 4 or 8 heads (at least 8 dims per lane); kPerHead / kPerGroup force one (tests; kPerGroup
// falls back to kPerHead where the group does not qualify).
enum class TreeAttentionMerge { kAuto, kPerHead, kPerGroup };

struct TreeAttentionArgs {
  KvDtype dtype = KvDtype::kFloat16;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  const void* q = nullptr;
  void* out = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t kv_slot_stride = 0;  // elements between consecutive slots, 2 x this < 2^32 bytes
                               // (num_kv_heads * head_dim for a [slot][head][dim] layout)
  TreeAttentionPlanView plan;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // Skip the tensor-core work of a 16-row x tokens block that no row sees (DeFT's kernels). Off
  // for the tree-mask baseline, which computes its dense mask in full as Medusa-style kernels do.
  bool skip_masked_blocks = true;
  TreeAttentionPhases phases = TreeAttentionPhases::kBoth;
  TreeAttentionMerge merge = TreeAttentionMerge::kAuto;
  // Profiling (builds with -DDEFT_ATTN_TRACE=ON only; ignored otherwise): when set, a device
  // buffer of TreeAttentionTraceWords(...) words that the launches fill with %globaltimer
  // stamps (ns): [0] a stamp taken on the stream just before the chunk kernel, [1] chunk CTAs,
  // [2] merge CTAs, then per chunk CTA (blockIdx.y * gridDim.x + blockIdx.x) {start, first
  // sub-tile landed, loop done, partials staged, end, smid | sub-tiles << 16 | rows << 32}, then per merge CTA
  // {start, after its wait, end, smid}.
  unsigned long long* trace = nullptr;
};

// Whether this build records traces (DEFT_ATTN_TRACE), and the words a trace buffer needs.
bool TreeAttentionTraceEnabled();
size_t TreeAttentionTraceWords(int32_t num_work, int32_t num_kv_heads, int32_t num_queries,
                               int32_t num_heads);

// Bytes of workspace a plan with `num_entries` entries needs for `num_heads` x `head_dim`.
size_t TreeAttentionWorkspaceBytes(int32_t num_entries, int32_t num_heads, int32_t head_dim);

cudaError_t RunTreeAttention(const TreeAttentionArgs& args, cudaStream_t stream);

}  // namespace deft::kernels
