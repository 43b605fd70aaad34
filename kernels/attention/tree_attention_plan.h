// Host side of the tree attention kernels: work items from a plan, and the plan's upload.
//
// BuildTreeAttentionWork: one work item per 64 rows (kTreeAttentionTileRows) of each chunk,
// rows = entries x group; items of one chunk are adjacent (they run side by side and share the
// chunk's K/V through L2).
//
// Each work item also gets its prologue data (work_pre: the chunk's first 64 slot ids, its rows'
// queries and mask offsets), so a CTA's first round of loads depends on its index alone.
//
// DeviceTreeAttentionPlan packs the plan's arrays and the work items into one pinned host
// buffer and uploads it with a single cudaMemcpyAsync; view() then points into device memory.
// Each array has its own region with headroom (1.5x the size that last outgrew it), so as a
// decode grows the tree by a token per branch per step the arrays keep their device addresses
// and view() changes only in its counts: a CUDA graph of the step replays while the counts
// hold. The regions are laid out again (new addresses) only when an array outgrows its region.
// Upload waits (on the host) for the previous upload's copy to finish before reusing the
// staging buffer, so a plan can be uploaded every step without a stream synchronize.
// Thread safety: one object per stream; not thread-safe.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/attention/tree_attention.h"

namespace deft::kernels {

// The host arrays of a partition plan (same names and meaning as engine/attention's
// PartitionPlan; kernels/ does not include the engine).
struct TreeAttentionPlanArrays {
  std::span<const int32_t> kv_slots, chunk_begin, entry_begin, entry_query, entry_mask_begin;
  std::span<const uint64_t> masks;
  std::span<const int32_t> query_entry_begin, query_entries;
  // No KV slot in more than one chunk (the flatten, node and tree plans; not seq plans, whose
  // chunks repeat a shared prompt's slots for every query). Then a chunk with one work item is read by
  // that item alone, which copies it with an evict-first L2 policy (tree_attention.cu). Only a
  // cache hint: a wrong value costs speed, never correctness.
  bool disjoint_chunks = false;
};

// The work items of a plan (TreeAttentionPlanView::work), 4 int32 per item, into *work, and
// their prologue data (TreeAttentionPlanView::work_pre) into *pre.
// REQUIRES: the arrays consistent (DeviceTreeAttentionPlan::Upload checks); rows of a chunk
// < 2^24.
void BuildTreeAttentionWork(const TreeAttentionPlanArrays& plan, int32_t group,
                            std::vector<int32_t>* work, std::vector<int32_t>* pre);

class DeviceTreeAttentionPlan {
 public:
  DeviceTreeAttentionPlan() = default;
  ~DeviceTreeAttentionPlan();
  DeviceTreeAttentionPlan(const DeviceTreeAttentionPlan&) = delete;
  DeviceTreeAttentionPlan& operator=(const DeviceTreeAttentionPlan&) = delete;

  // cudaErrorInvalidValue for inconsistent arrays (sizes that do not match their offsets).
  cudaError_t Upload(const TreeAttentionPlanArrays& plan, int32_t group, cudaStream_t stream);
  const TreeAttentionPlanView& view() const { return view_; }
  size_t uploaded_bytes() const { return bytes_; }
  // Times the regions were laid out (device addresses changed), first upload included.
  int64_t layouts() const { return layouts_; }

 private:
  cudaError_t Reserve(size_t bytes);
  static constexpr int kRegions = 10;  // work items, masks, the 7 int32 arrays, work_pre
  std::vector<int32_t> work_, pre_;
  size_t region_capacity_[kRegions] = {};  // bytes
  int64_t layouts_ = 0;
  void* host_ = nullptr;    // pinned staging
  void* device_ = nullptr;  // device copy
  size_t capacity_ = 0, bytes_ = 0;
  cudaEvent_t copied_ = nullptr;
  bool pending_ = false;
  TreeAttentionPlanView view_;
};

}  // namespace deft::kernels
