#include "kernels/attention/tree_attention_plan.h"

#include <algorithm>
#include <cstring>

namespace deft::kernels {

void BuildTreeAttentionWork(const TreeAttentionPlanArrays& plan, int32_t group,
                            std::vector<int32_t>* work, std::vector<int32_t>* pre) {
  work->clear();
  pre->clear();
  constexpr int kTile = kTreeAttentionTileRows;
  for (size_t c = 0; c + 1 < plan.entry_begin.size(); ++c) {
    const int32_t first = plan.chunk_begin[c], len = plan.chunk_begin[c + 1] - first;
    const int32_t entry0 = plan.entry_begin[c];
    const int64_t rows = static_cast<int64_t>(plan.entry_begin[c + 1] - entry0) * group;
    for (int64_t r = 0; r < rows; r += kTile) {
      const int64_t tile = std::min<int64_t>(kTile, rows - r);
      const bool sole = plan.disjoint_chunks && rows <= kTile;
      work->insert(work->end(),
                   {first, len, entry0,
                    static_cast<int32_t>(static_cast<uint32_t>(r | (tile << 24)) |
                                         (sole ? 0x80000000u : 0u))});
      const size_t at = pre->size();
      pre->resize(at + kTreeAttentionWorkPreInts, 0);
      int32_t* ids = pre->data() + at;
      for (int32_t t = 0; t < std::min(len, kTile); ++t) ids[t] = plan.kv_slots[first + t];
      int32_t* query = ids + kTile;
      int32_t* mask_at = query + kTile;
      for (int64_t i = 0; i < tile; ++i) {
        const int32_t e = entry0 + static_cast<int32_t>((r + i) / group);
        query[i] = plan.entry_query[e];
        mask_at[i] = plan.entry_mask_begin[e] != plan.entry_mask_begin[e + 1]
                         ? plan.entry_mask_begin[e]
                         : -1;
      }
    }
  }
}

DeviceTreeAttentionPlan::~DeviceTreeAttentionPlan() {
  if (copied_ != nullptr) {
    cudaEventSynchronize(copied_);
    cudaEventDestroy(copied_);
  }
  if (host_ != nullptr) cudaFreeHost(host_);
  if (device_ != nullptr) cudaFree(device_);
}

cudaError_t DeviceTreeAttentionPlan::Reserve(size_t bytes) {
  if (bytes <= capacity_) return cudaSuccess;
  if (pending_) {
    if (cudaError_t err = cudaEventSynchronize(copied_); err != cudaSuccess) return err;
    pending_ = false;
  }
  if (host_ != nullptr) cudaFreeHost(host_);
  if (device_ != nullptr) cudaFree(device_);
  host_ = device_ = nullptr;
  capacity_ = 0;
  const size_t want = bytes + bytes / 2;
  if (cudaError_t err = cudaMallocHost(&host_, want); err != cudaSuccess) return err;
  if (cudaError_t err = cudaMalloc(&device_, want); err != cudaSuccess) return err;
  capacity_ = want;
  return cudaSuccess;
}

cudaError_t DeviceTreeAttentionPlan::Upload(const TreeAttentionPlanArrays& p, int32_t group,
                                            cudaStream_t stream) {
  const size_t chunks = p.chunk_begin.empty() ? 0 : p.chunk_begin.size() - 1;
  const size_t queries = p.query_entry_begin.empty() ? 0 : p.query_entry_begin.size() - 1;
  const size_t entries = p.entry_query.size();
  if (p.entry_begin.size() != chunks + 1 || p.entry_mask_begin.size() != entries + 1 ||
      (chunks > 0 && (static_cast<size_t>(p.chunk_begin[chunks]) != p.kv_slots.size() ||
                      static_cast<size_t>(p.entry_begin[chunks]) != entries)) ||
      (queries > 0 && static_cast<size_t>(p.query_entry_begin[queries]) != p.query_entries.size()) ||
      (entries > 0 && static_cast<size_t>(p.entry_mask_begin[entries]) != p.masks.size()) ||
      group <= 0) {
    return cudaErrorInvalidValue;
  }
  for (int32_t e = 0; e + 1 < static_cast<int32_t>(p.entry_begin.size()); ++e) {
    if (static_cast<int64_t>(p.entry_begin[e + 1] - p.entry_begin[e]) * group >= (1 << 24)) {
      return cudaErrorInvalidValue;  // a chunk's rows must fit the work item's 24 bits
    }
  }
  BuildTreeAttentionWork(p, group, &work_, &pre_);
  // Regions in order: work items, masks, the int32 arrays; each 16-byte aligned with headroom.
  const std::span<const int32_t> arrays[] = {p.kv_slots,       p.chunk_begin,       p.entry_begin,
                                             p.entry_query,    p.entry_mask_begin,  p.query_entry_begin,
                                             p.query_entries};
  const size_t sizes[kRegions] = {work_.size() * sizeof(int32_t), p.masks.size_bytes(),
                                  arrays[0].size_bytes(), arrays[1].size_bytes(),
                                  arrays[2].size_bytes(), arrays[3].size_bytes(),
                                  arrays[4].size_bytes(), arrays[5].size_bytes(),
                                  arrays[6].size_bytes(), pre_.size() * sizeof(int32_t)};
  bool outgrown = device_ == nullptr;
  for (int i = 0; i < kRegions; ++i) outgrown = outgrown || sizes[i] > region_capacity_[i];
  size_t total = 0;
  for (int i = 0; i < kRegions; ++i) {
    if (outgrown) region_capacity_[i] = ((sizes[i] + sizes[i] / 2 + 64) + 15) & ~size_t{15};
    total += region_capacity_[i];
  }
  if (outgrown) ++layouts_;
  if (cudaError_t err = Reserve(total); err != cudaSuccess) return err;
  if (copied_ == nullptr) {
    if (cudaError_t err = cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming);
        err != cudaSuccess) {
      return err;
    }
  }
  if (pending_) {  // the previous copy may still read the staging buffer
    if (cudaError_t err = cudaEventSynchronize(copied_); err != cudaSuccess) return err;
    pending_ = false;
  }
  char* h = static_cast<char*>(host_);
  char* d = static_cast<char*>(device_);
  const void* data[kRegions] = {work_.data(), p.masks.data(), arrays[0].data(), arrays[1].data(),
                                arrays[2].data(), arrays[3].data(), arrays[4].data(),
                                arrays[5].data(), arrays[6].data(), pre_.data()};
  const char* dev[kRegions];
  size_t off = 0, end = 0;
  for (int i = 0; i < kRegions; ++i) {
    if (sizes[i] > 0) std::memcpy(h + off, data[i], sizes[i]);
    dev[i] = d + off;
    if (sizes[i] > 0) end = off + sizes[i];
    off += region_capacity_[i];
  }
  view_.work = reinterpret_cast<const int32_t*>(dev[0]);
  view_.masks = reinterpret_cast<const uint64_t*>(dev[1]);
  view_.kv_slots = reinterpret_cast<const int32_t*>(dev[2]);
  view_.chunk_begin = reinterpret_cast<const int32_t*>(dev[3]);
  view_.entry_begin = reinterpret_cast<const int32_t*>(dev[4]);
  view_.entry_query = reinterpret_cast<const int32_t*>(dev[5]);
  view_.entry_mask_begin = reinterpret_cast<const int32_t*>(dev[6]);
  view_.query_entry_begin = reinterpret_cast<const int32_t*>(dev[7]);
  view_.query_entries = reinterpret_cast<const int32_t*>(dev[8]);
  view_.work_pre = reinterpret_cast<const int32_t*>(dev[9]);
  view_.num_chunks = static_cast<int32_t>(chunks);
  view_.num_queries = static_cast<int32_t>(queries);
  view_.num_entries = static_cast<int32_t>(entries);
  view_.num_work = static_cast<int32_t>(work_.size() / 4);
  view_.max_query_entries = 0;
  for (size_t q = 0; q < queries; ++q) {
    view_.max_query_entries = std::max(view_.max_query_entries,
                                       p.query_entry_begin[q + 1] - p.query_entry_begin[q]);
  }
  view_.group = group;
  // One copy up to the last used byte (the headroom between regions travels too).
  bytes_ = end;
  if (end > 0) {
    if (cudaError_t err = cudaMemcpyAsync(device_, host_, end, cudaMemcpyHostToDevice, stream);
        err != cudaSuccess) {
      return err;
    }
  }
  if (cudaError_t err = cudaEventRecord(copied_, stream); err != cudaSuccess) return err;
  pending_ = true;
  return cudaSuccess;
}

}  // namespace deft::kernels
