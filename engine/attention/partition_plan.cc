// The DeFT partition planner; see partition_plan.h for the contract. Every pass is linear in
// segments + queries + tokens (plus a binary search per path segment), into scratch vectors that
// keep their capacity across calls.
#include "engine/attention/partition_plan.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_format.h"

namespace deft {
namespace {

constexpr int32_t kMaskWordBits = 64;
// Largest slot value for which distinct slots are counted with a bitmap (16 MiB of bits); larger
// values fall back to sorting a copy.
constexpr int32_t kMaxBitmapSlot = (1 << 27) - 1;

int32_t MaskWords(int32_t tokens) { return (tokens + kMaskWordBits - 1) / kMaskWordBits; }

// Sets bits [begin, end) of `words`.
void SetBits(uint64_t* words, int32_t begin, int32_t end) {
  while (begin < end) {
    const int32_t w = begin / kMaskWordBits, lo = begin % kMaskWordBits;
    const int32_t hi = std::min(kMaskWordBits, lo + (end - begin));
    const uint64_t upper = hi == kMaskWordBits ? ~uint64_t{0} : (uint64_t{1} << hi) - 1;
    words[w] |= upper & ~((uint64_t{1} << lo) - 1);
    begin += hi - lo;
  }
}

}  // namespace

std::string_view AttentionModeName(AttentionMode mode) {
  switch (mode) {
    case AttentionMode::kSeq:
      return "seq";
    case AttentionMode::kTree:
      return "tree";
    case AttentionMode::kNode:
      return "node";
    case AttentionMode::kFlatten:
      return "flatten";
  }
  return "unknown";
}

bool ParseAttentionMode(std::string_view name, AttentionMode* mode) {
  for (AttentionMode m :
       {AttentionMode::kSeq, AttentionMode::kTree, AttentionMode::kNode, AttentionMode::kFlatten}) {
    if (name == AttentionModeName(m)) {
      *mode = m;
      return true;
    }
  }
  return false;
}

void PartitionPlan::Clear() {
  kv_slots.clear();
  chunk_begin.assign(1, 0);
  entry_begin.assign(1, 0);
  entry_query.clear();
  entry_mask_begin.assign(1, 0);
  masks.clear();
  query_entry_begin.assign(1, 0);
  query_entries.clear();
  kv_tokens_read = kv_tokens_unique = kv_bytes_read = kv_bytes_floor = 0;
}

absl::Status PartitionPlanner::Validate(std::span<const PlanSegment> segments,
                                        std::span<const PlanQuery> queries) {
  const PlannerOptions& o = options_;
  if (o.min_chunks < 1 || o.min_chunk_tokens < 1 || o.max_chunk_tokens < o.min_chunk_tokens ||
      o.seq_chunk_tokens < 1 || o.bytes_per_kv_token < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "planner options out of range: min_chunks %d, min_chunk_tokens %d, max_chunk_tokens %d, "
        "seq_chunk_tokens %d, bytes_per_kv_token %d",
        o.min_chunks, o.min_chunk_tokens, o.max_chunk_tokens, o.seq_chunk_tokens,
        o.bytes_per_kv_token));
  }
  for (const int32_t len : o.flatten_chunk_tokens) {
    if (len < 1) {
      return absl::InvalidArgumentError(
          absl::StrFormat("planner options out of range: flatten chunk of %d tokens", len));
    }
  }
  const int64_t n = static_cast<int64_t>(segments.size());
  if (n > std::numeric_limits<int32_t>::max() ||
      queries.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError("too many segments or queries for int32 indices");
  }
  int64_t total = 0;
  for (int64_t s = 0; s < n; ++s) {
    const int32_t p = segments[s].parent;
    if (p < -1 || p >= n) {
      return absl::InvalidArgumentError(
          absl::StrFormat("segment %d: parent %d out of range [-1, %d)", s, p, n));
    }
    const std::span<const int32_t> slots = segments[s].slots;
    for (size_t i = 0; i < slots.size(); ++i) {
      if (slots[i] < 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("segment %d: slot %d of token %d is negative", s, slots[i], i));
      }
    }
    total += static_cast<int64_t>(slots.size());
  }
  if (total > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%d KV tokens in the step, more than int32 offsets hold", total));
  }
  // Depths by walking up parent chains; a chain that reaches a segment still on the walk's stack
  // is a cycle (a self-parent included).
  depth_.assign(n, -1);
  for (int64_t s0 = 0; s0 < n; ++s0) {
    if (depth_[s0] >= 0) continue;
    stack_.clear();
    int32_t s = static_cast<int32_t>(s0);
    while (s != -1 && depth_[s] == -1) {
      depth_[s] = -2;
      stack_.push_back(s);
      s = segments[s].parent;
    }
    if (s != -1 && depth_[s] == -2) {
      return absl::InvalidArgumentError(
          absl::StrFormat("segment %d: its parent chain has a cycle", s));
    }
    int32_t d = s == -1 ? -1 : depth_[s];
    for (auto it = stack_.rbegin(); it != stack_.rend(); ++it) depth_[*it] = ++d;
  }
  for (size_t q = 0; q < queries.size(); ++q) {
    const int32_t s = queries[q].segment;
    if (s < 0 || s >= n) {
      return absl::InvalidArgumentError(
          absl::StrFormat("query %d: segment %d out of range [0, %d)", q, s, n));
    }
    const int64_t len = static_cast<int64_t>(segments[s].slots.size());
    if (queries[q].visible < 0 || queries[q].visible > len) {
      return absl::InvalidArgumentError(
          absl::StrFormat("query %d: visible %d out of range [0, %d] of segment %d", q,
                          queries[q].visible, len, s));
    }
  }
  return absl::OkStatus();
}

void PartitionPlanner::ComputeStepLengths(std::span<const PlanSegment> segments,
                                          std::span<const PlanQuery> queries) {
  const size_t n = segments.size();
  step_len_.assign(n, 0);
  // -1 marks "all tokens": a query lies strictly below. Marking stops at an already marked
  // segment, so the walk is linear overall.
  for (const PlanQuery& q : queries) {
    int32_t& own = step_len_[q.segment];
    if (own >= 0) own = std::max(own, q.visible);
    for (int32_t a = segments[q.segment].parent; a != -1 && step_len_[a] != -1;
         a = segments[a].parent) {
      step_len_[a] = -1;
    }
  }
  for (size_t s = 0; s < n; ++s) {
    if (step_len_[s] == -1) step_len_[s] = static_cast<int32_t>(segments[s].slots.size());
  }
}

void PartitionPlanner::FlattenSegments(std::span<const PlanSegment> segments, PartitionPlan* plan) {
  const int32_t n = static_cast<int32_t>(segments.size());
  // Children lists (CSR), in increasing segment index: the children of p (p = -1: the roots)
  // end up in child_list_[child_begin_[p + 1], child_begin_[p + 2]). Counts go to p + 3 and the
  // fill cursor of p is child_begin_[p + 2], which the fill moves to the end of p's list.
  child_begin_.assign(n + 3, 0);
  for (int32_t s = 0; s < n; ++s) ++child_begin_[segments[s].parent + 3];
  for (int32_t i = 0; i + 1 < n + 3; ++i) child_begin_[i + 1] += child_begin_[i];
  child_list_.resize(n);
  for (int32_t s = 0; s < n; ++s) child_list_[child_begin_[segments[s].parent + 2]++] = s;
  order_.clear();
  seg_offset_.assign(n, 0);
  stack_.clear();
  // Pushed in reverse so that they pop in increasing index.
  for (int32_t i = child_begin_[1] - 1; i >= child_begin_[0]; --i) stack_.push_back(child_list_[i]);
  int32_t offset = 0;
  plan->kv_slots.clear();
  while (!stack_.empty()) {
    const int32_t s = stack_.back();
    stack_.pop_back();
    order_.push_back(s);
    seg_offset_[s] = offset;
    const int32_t len = step_len_[s];
    plan->kv_slots.insert(plan->kv_slots.end(), segments[s].slots.begin(),
                          segments[s].slots.begin() + len);
    offset += len;
    for (int32_t i = child_begin_[s + 2] - 1; i >= child_begin_[s + 1]; --i) {
      stack_.push_back(child_list_[i]);
    }
  }
}

int64_t PartitionPlanner::CountUniqueSlots(std::span<const PlanSegment> segments) {
  int32_t max_slot = -1;
  for (size_t s = 0; s < segments.size(); ++s) {
    for (int32_t i = 0; i < step_len_[s]; ++i) max_slot = std::max(max_slot, segments[s].slots[i]);
  }
  if (max_slot < 0) return 0;
  int64_t unique = 0;
  if (max_slot <= kMaxBitmapSlot) {
    const size_t words = static_cast<size_t>(max_slot) / 64 + 1;
    if (slot_bits_.size() < words) slot_bits_.resize(words, 0);
    for (size_t s = 0; s < segments.size(); ++s) {
      for (int32_t i = 0; i < step_len_[s]; ++i) {
        const int32_t slot = segments[s].slots[i];
        uint64_t& w = slot_bits_[slot / 64];
        const uint64_t bit = uint64_t{1} << (slot % 64);
        unique += (w & bit) == 0;
        w |= bit;
      }
    }
    // Leave the bitmap all zero for the next call, touching only the words used.
    for (size_t s = 0; s < segments.size(); ++s) {
      for (int32_t i = 0; i < step_len_[s]; ++i) slot_bits_[segments[s].slots[i] / 64] = 0;
    }
    return unique;
  }
  sorted_slots_.clear();
  for (size_t s = 0; s < segments.size(); ++s) {
    sorted_slots_.insert(sorted_slots_.end(), segments[s].slots.begin(),
                         segments[s].slots.begin() + step_len_[s]);
  }
  std::sort(sorted_slots_.begin(), sorted_slots_.end());
  return std::unique(sorted_slots_.begin(), sorted_slots_.end()) - sorted_slots_.begin();
}

void PartitionPlanner::CutChunks(PartitionPlan* plan) {
  std::vector<int32_t>& cb = plan->chunk_begin;
  cb.assign(1, 0);
  const int32_t total = static_cast<int32_t>(plan->kv_slots.size());
  auto cut_uniform = [&](int32_t begin, int32_t end, int32_t size) {
    for (int32_t b = begin; b < end; b += size) cb.push_back(std::min(end, b + size));
  };
  switch (options_.mode) {
    case AttentionMode::kFlatten: {
      if (!options_.flatten_chunk_tokens.empty()) {
        const std::vector<int32_t>& len = options_.flatten_chunk_tokens;
        for (int32_t b = 0, i = 0; b < total; ++i) {
          b = std::min(total, b + len[std::min<size_t>(i, len.size() - 1)]);
          cb.push_back(b);
        }
        break;
      }
      const int32_t target = (total + options_.min_chunks - 1) / options_.min_chunks;
      cut_uniform(0, total,
                  std::clamp(target, options_.min_chunk_tokens, options_.max_chunk_tokens));
      break;
    }
    case AttentionMode::kTree:
      cut_uniform(0, total, options_.seq_chunk_tokens);
      break;
    case AttentionMode::kNode:
      for (int32_t s : order_) {
        cut_uniform(seg_offset_[s], seg_offset_[s] + step_len_[s], options_.max_chunk_tokens);
      }
      break;
    case AttentionMode::kSeq:
      break;  // BuildSeqPlan
  }
}

void PartitionPlanner::CollectPath(std::span<const PlanSegment> segments, int32_t segment) {
  path_.clear();
  for (int32_t a = segment; a != -1; a = segments[a].parent) path_.push_back(a);
  std::reverse(path_.begin(), path_.end());
}

void PartitionPlanner::BuildEntries(std::span<const PlanSegment> segments,
                                    std::span<const PlanQuery> queries, bool every_chunk,
                                    PartitionPlan* plan) {
  const int32_t num_chunks = plan->num_chunks();
  const int32_t num_queries = static_cast<int32_t>(queries.size());
  const std::vector<int32_t>& cb = plan->chunk_begin;

  // What each query sees, as pieces of chunks, in chunk order (a path's ranges are in
  // increasing flattened position: ancestors precede descendants in preorder).
  pieces_.clear();
  piece_begin_.resize(num_queries + 1);
  piece_begin_[0] = 0;
  for (int32_t q = 0; q < num_queries; ++q) {
    CollectPath(segments, queries[q].segment);
    for (int32_t a : path_) {
      const int32_t begin = seg_offset_[a];
      const int32_t end = begin + (a == queries[q].segment ? queries[q].visible : step_len_[a]);
      if (begin == end) continue;
      int32_t c =
          static_cast<int32_t>(std::upper_bound(cb.begin(), cb.end(), begin) - cb.begin()) - 1;
      for (; c < num_chunks && cb[c] < end; ++c) {
        pieces_.push_back({c, std::max(begin, cb[c]), std::min(end, cb[c + 1])});
      }
    }
    piece_begin_[q + 1] = static_cast<int32_t>(pieces_.size());
  }

  // Calls fn(chunk, visible tokens, first piece, end piece) for each entry of query q, in chunk
  // order: the chunks it sees, or every chunk when every_chunk.
  auto for_each_entry = [&](int32_t q, auto&& fn) {
    int32_t i = piece_begin_[q];
    const int32_t end = piece_begin_[q + 1];
    auto group = [&](int32_t c) {
      int32_t j = i, visible = 0;
      for (; j < end && pieces_[j].chunk == c; ++j) visible += pieces_[j].end - pieces_[j].begin;
      fn(c, visible, i, j);
      i = j;
    };
    if (every_chunk) {
      for (int32_t c = 0; c < num_chunks; ++c) group(c);
    } else {
      while (i < end) group(pieces_[i].chunk);
    }
  };

  // Counting pass: entries and mask words per chunk, entries per query.
  std::vector<int32_t>& entry_begin = plan->entry_begin;
  std::vector<int32_t>& query_entry_begin = plan->query_entry_begin;
  entry_begin.assign(num_chunks + 1, 0);
  mask_cursor_.assign(num_chunks + 1, 0);
  query_entry_begin.assign(num_queries + 1, 0);
  for (int32_t q = 0; q < num_queries; ++q) {
    for_each_entry(q, [&](int32_t c, int32_t visible, int32_t, int32_t) {
      const int32_t len = cb[c + 1] - cb[c];
      ++entry_begin[c + 1];
      if (visible != len) mask_cursor_[c + 1] += MaskWords(len);
      ++query_entry_begin[q + 1];
    });
  }
  for (int32_t c = 0; c < num_chunks; ++c) {
    entry_begin[c + 1] += entry_begin[c];
    mask_cursor_[c + 1] += mask_cursor_[c];
  }
  for (int32_t q = 0; q < num_queries; ++q) query_entry_begin[q + 1] += query_entry_begin[q];

  // Fill pass. Within a chunk, entries and their mask words are handed out in query order, so
  // entry_mask_begin is increasing and each entry's range ends where the next one's begins.
  const int32_t num_entries = entry_begin[num_chunks];
  plan->entry_query.resize(num_entries);
  plan->entry_mask_begin.resize(num_entries + 1);
  plan->entry_mask_begin[num_entries] = mask_cursor_[num_chunks];
  plan->masks.assign(mask_cursor_[num_chunks], 0);
  plan->query_entries.resize(num_entries);
  entry_cursor_.assign(entry_begin.begin(), entry_begin.end() - 1);
  for (int32_t q = 0; q < num_queries; ++q) {
    int32_t k = query_entry_begin[q];
    for_each_entry(q, [&](int32_t c, int32_t visible, int32_t first, int32_t last) {
      const int32_t e = entry_cursor_[c]++;
      const int32_t len = cb[c + 1] - cb[c];
      plan->entry_query[e] = q;
      plan->entry_mask_begin[e] = mask_cursor_[c];
      if (visible != len) {
        uint64_t* words = plan->masks.data() + mask_cursor_[c];
        for (int32_t i = first; i < last; ++i) {
          SetBits(words, pieces_[i].begin - cb[c], pieces_[i].end - cb[c]);
        }
        mask_cursor_[c] += MaskWords(len);
      }
      plan->query_entries[k++] = e;
    });
  }
}

absl::Status PartitionPlanner::BuildSeqPlan(std::span<const PlanSegment> segments,
                                            std::span<const PlanQuery> queries,
                                            PartitionPlan* plan) {
  const int32_t num_queries = static_cast<int32_t>(queries.size());
  const int32_t chunk = options_.seq_chunk_tokens;
  plan->kv_slots.clear();
  plan->query_entries.clear();
  for (int32_t q = 0; q < num_queries; ++q) {
    CollectPath(segments, queries[q].segment);
    int64_t path_tokens = 0;
    for (int32_t a : path_) {
      path_tokens += a == queries[q].segment ? queries[q].visible : step_len_[a];
    }
    if (static_cast<int64_t>(plan->kv_slots.size()) + path_tokens >
        std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("query %d: the seq plan's paths exceed 2^31 - 1 tokens", q));
    }
    const int32_t start = static_cast<int32_t>(plan->kv_slots.size());
    for (int32_t a : path_) {
      const int32_t n = a == queries[q].segment ? queries[q].visible : step_len_[a];
      plan->kv_slots.insert(plan->kv_slots.end(), segments[a].slots.begin(),
                            segments[a].slots.begin() + n);
    }
    const int32_t end = static_cast<int32_t>(plan->kv_slots.size());
    for (int32_t b = start; b < end; b += chunk) {
      plan->query_entries.push_back(plan->num_chunks());
      plan->chunk_begin.push_back(std::min(end, b + chunk));
      plan->entry_query.push_back(q);
      plan->entry_begin.push_back(static_cast<int32_t>(plan->entry_query.size()));
    }
    plan->query_entry_begin.push_back(static_cast<int32_t>(plan->query_entries.size()));
  }
  plan->entry_mask_begin.assign(plan->entry_query.size() + 1, 0);
  return absl::OkStatus();
}

absl::Status PartitionPlanner::Plan(std::span<const PlanSegment> segments,
                                    std::span<const PlanQuery> queries, PartitionPlan* plan) {
  plan->Clear();
  plan->mode = options_.mode;
  if (absl::Status st = Validate(segments, queries); !st.ok()) return st;
  ComputeStepLengths(segments, queries);
  const int64_t unique = CountUniqueSlots(segments);
  if (options_.mode == AttentionMode::kSeq) {
    if (absl::Status st = BuildSeqPlan(segments, queries, plan); !st.ok()) {
      plan->Clear();
      return st;
    }
  } else {
    FlattenSegments(segments, plan);
    CutChunks(plan);
    BuildEntries(segments, queries, options_.mode == AttentionMode::kTree, plan);
  }
  plan->kv_tokens_read = static_cast<int64_t>(plan->kv_slots.size());
  plan->kv_tokens_unique = unique;
  plan->kv_bytes_read = plan->kv_tokens_read * options_.bytes_per_kv_token;
  plan->kv_bytes_floor = unique * options_.bytes_per_kv_token;
  return absl::OkStatus();
}

}  // namespace deft
