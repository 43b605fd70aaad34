// The DeFT partition planner: turns one decoding step's attention queries over a forest of KV
// segments into a plan that every backend (CPU reference, CUDA kernels) executes the same way.
//
// Input. A *segment* is a run of KV tokens stored in pool slots (a tree node's computed tokens);
// segments form a forest through `parent`. A *query* (one token of this step: a branch tip, a
// prefill token, a draft token of a speculative token tree) sees every token of every ancestor
// segment of its own segment, and the first `visible` tokens of its own segment (causal). Token
// trees are expressed as one segment per draft token (or per draft chain) under the prefix.
//
// Output (struct of arrays, plain data, preallocated vectors reused across steps):
//  - the step's KV tokens in a flattened order (`kv_slots`), segments in DFS order;
//  - chunks: contiguous ranges of that order; each chunk lists the queries that see any of its
//    tokens, and for each (chunk, query) *entry* either "all tokens visible" or a bitmask over
//    the chunk's tokens (64 tokens per word);
//  - the reduction: for each query, its entries in a fixed order; the backend computes one
//    partial state (o, lse) per entry and merges them in that order (deterministic, each partial
//    merged exactly once).
// KV-guided grouping: a chunk is computed once for all queries in its list, so each KV token is
// read once per step (modes flatten and node). Flattened tree KV splitting: chunks have
// near-equal token counts (mode flatten), a long shared prompt becomes many chunks.
//
// Modes (same outputs within fp32 rounding, different IO):
//  kSeq     : each query over its own path, split into chunks of `seq_chunk_tokens` (flash-
//             decoding over the paged pool; the "radix" baseline): KV read once per query.
//  kTree    : all the step's KV as one sequence with a full query x token mask (Medusa-style
//             tree attention), chunked by `seq_chunk_tokens`; every query in every chunk.
//  kNode    : DeFT-Node: one chunk per segment, its queries grouped.
//  kFlatten : DeFT-Flatten: the flattened tokens cut into chunks of near-equal size.
//
// Decisions (details per mode at PartitionPlanner::Plan):
//  - The step's KV is the set of tokens some query sees: a segment contributes all its tokens
//    when a query lies in its subtree below it, else the first max(visible) tokens of its own
//    queries (0 when it has none). Tokens no query sees are not in the plan, so in modes flatten,
//    node and tree every token of kv_slots is read exactly once and kv_tokens_read equals the
//    number of KV tokens of the step.
//  - Segment order: depth-first preorder, roots and children in increasing segment index, so a
//    segment's subtree is one contiguous range of kv_slots and its ancestors come before it.
//  - Entries of a chunk are in increasing query order; a query's entries in increasing chunk
//    order (that is its merge order).
//  - An entry whose query sees the whole chunk always has an empty mask range.
//
// Thread safety: a planner owns its scratch; use one per thread.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

namespace deft {

enum class AttentionMode { kSeq, kTree, kNode, kFlatten };
std::string_view AttentionModeName(AttentionMode mode);
bool ParseAttentionMode(std::string_view name, AttentionMode* mode);

struct PlanSegment {
  int32_t parent = -1;             // index of the parent segment, -1 for a root
  std::span<const int32_t> slots;  // pool slots of its tokens, in order
};

struct PlanQuery {
  int32_t segment = -1;  // the segment holding the query's own token (or its last ancestor)
  int32_t visible = 0;   // tokens of `segment` it sees: [0, visible)
};

struct PlannerOptions {
  AttentionMode mode = AttentionMode::kFlatten;
  // kFlatten: target tokens per chunk; the planner picks
  //   chunk = clamp(ceil(total / min_chunks), min_chunk_tokens, max_chunk_tokens)
  // so that small steps still give >= min_chunks chunks to spread over workers.
  int32_t min_chunks = 8;
  int32_t min_chunk_tokens = 32;
  int32_t max_chunk_tokens = 512;
  int32_t seq_chunk_tokens = 256;  // kSeq / kTree split size
  // kFlatten: when not empty, the chunk lengths in flattened order instead of the uniform size
  // above, the last one repeated until the tokens run out (the last chunk may be shorter).
  std::vector<int32_t> flatten_chunk_tokens;
  int64_t bytes_per_kv_token = 0;  // for the IO accounting (all layers, K and V)
};

struct PartitionPlan {
  AttentionMode mode = AttentionMode::kFlatten;
  std::vector<int32_t> kv_slots;     // [num_kv] flattened order
  std::vector<int32_t> chunk_begin;  // [num_chunks + 1] offsets into kv_slots
  std::vector<int32_t> entry_begin;  // [num_chunks + 1] offsets into entry_query
  std::vector<int32_t> entry_query;  // [num_entries] query index
  // [num_entries + 1] offsets into masks; an empty range means all tokens of the chunk visible,
  // otherwise ceil(chunk_len / 64) words.
  std::vector<int32_t> entry_mask_begin;
  std::vector<uint64_t> masks;             // bit j of word w: token w*64+j of the chunk is visible
  std::vector<int32_t> query_entry_begin;  // [num_queries + 1] offsets into query_entries
  std::vector<int32_t> query_entries;      // entries of each query, in merge order

  // IO accounting for this step (K and V, all layers): what this mode reads, and the floor
  // (each unique KV token once).
  int64_t kv_tokens_read = 0;
  int64_t kv_tokens_unique = 0;
  int64_t kv_bytes_read = 0;
  int64_t kv_bytes_floor = 0;

  int32_t num_chunks() const { return static_cast<int32_t>(chunk_begin.size()) - 1; }
  int32_t num_queries() const { return static_cast<int32_t>(query_entry_begin.size()) - 1; }
  int32_t num_entries() const { return static_cast<int32_t>(entry_query.size()); }
  // Empties the plan, keeping the vectors' capacity.
  void Clear();
};

class PartitionPlanner {
 public:
  explicit PartitionPlanner(const PlannerOptions& options) : options_(options) {}
  // Builds the plan of one step into *plan (its vectors are reused).
  //
  // Chunking per mode:
  //  kFlatten: chunk = clamp(ceil(T / min_chunks), min_chunk_tokens, max_chunk_tokens) for T
  //            step tokens; every chunk but the last has exactly `chunk` tokens (chunks span
  //            segment boundaries; masks then cover exactly what each query sees).
  //  kNode   : one chunk per segment with tokens in the step; a segment longer than
  //            max_chunk_tokens is cut every max_chunk_tokens tokens (the last piece shorter), so
  //            that a mask never exceeds max_chunk_tokens / 64 words. KV still read once.
  //  kTree   : chunks of seq_chunk_tokens over the flattened order (last one shorter); every
  //            query has an entry in every chunk, masked (an all-zero mask is kept: it is the
  //            wasted work of a dense tree mask and its partial state is empty, lse = -inf).
  //  kSeq    : per query, in query order, its path (ancestors' tokens, then its visible
  //            tokens) cut into chunks of seq_chunk_tokens, one mask-free entry each. kv_slots is
  //            the concatenation of the paths, so it holds a shared token once per query that
  //            sees it (duplicates), and kv_tokens_read is the sum of the path lengths.
  // A query that sees no token has no entries.
  //
  // Accounting: kv_tokens_read = sum of chunk lengths; kv_tokens_unique = distinct slots among
  // the step's tokens; bytes = tokens x options.bytes_per_kv_token.
  //
  // INVALID_ARGUMENT, naming the offending index, for a malformed forest (parent index out of
  // range or a cycle, a negative slot, visible out of [0, segment length], a query with an
  // unknown segment; a cycle is reported at a segment on it), for options out of range (each
  // size >= 1, min_chunk_tokens <= max_chunk_tokens, bytes_per_kv_token >= 0), or for a step or
  // seq plan of more than 2^31 - 1 tokens. On error *plan is empty.
  absl::Status Plan(std::span<const PlanSegment> segments, std::span<const PlanQuery> queries,
                    PartitionPlan* plan);
  const PlannerOptions& options() const { return options_; }

 private:
  struct Piece {  // the part [begin, end) of chunk `chunk` that a query sees (flattened positions)
    int32_t chunk, begin, end;
  };
  absl::Status Validate(std::span<const PlanSegment> segments, std::span<const PlanQuery> queries);
  void ComputeStepLengths(std::span<const PlanSegment> segments,
                          std::span<const PlanQuery> queries);
  void FlattenSegments(std::span<const PlanSegment> segments, PartitionPlan* plan);
  int64_t CountUniqueSlots(std::span<const PlanSegment> segments);
  void CutChunks(PartitionPlan* plan);
  void BuildEntries(std::span<const PlanSegment> segments, std::span<const PlanQuery> queries,
                    bool every_chunk, PartitionPlan* plan);
  absl::Status BuildSeqPlan(std::span<const PlanSegment> segments,
                            std::span<const PlanQuery> queries, PartitionPlan* plan);
  // Ancestors of `segment` and itself, root first, into path_.
  void CollectPath(std::span<const PlanSegment> segments, int32_t segment);

  PlannerOptions options_;
  // Scratch reused across calls, indexed by segment unless noted.
  std::vector<int32_t> order_;       // segments in DFS preorder
  std::vector<int32_t> seg_offset_;  // first flattened position
  std::vector<int32_t> depth_;       // depth in the forest (validation: -1 unknown, -2 on stack)
  std::vector<int32_t> step_len_;    // tokens of the segment in this step
  std::vector<int32_t> child_begin_, child_list_, stack_, path_;
  std::vector<Piece> pieces_;          // per query, sorted by chunk
  std::vector<int32_t> piece_begin_;   // [num_queries + 1]
  std::vector<int32_t> entry_cursor_;  // per chunk
  std::vector<int32_t> mask_cursor_;   // per chunk
  std::vector<uint64_t> slot_bits_;    // distinct-slot bitmap, all zero between calls
  std::vector<int32_t> sorted_slots_;  // distinct-slot fallback for very large slot values
};

}  // namespace deft
