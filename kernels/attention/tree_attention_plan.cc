#include "kernels/attention/tree_attention_plan.h"

#include <algorithm>
#include <cstring>

namespace deft::kernels {

void BuildTreeAttentionWork(std::span<const int32_t> chunk_begin,
                            std::span<const int32_t> entry_begin, int32_t group,
                            std::vector<int32_t>* work) {
  work->clear();
  for (size_t c = 0; c + 1 < entry_begin.size(); ++c) {
    const int64_t rows = static_cast<int64_t>(entry_begin[c + 1] - entry_begin[c]) * group;
    for (int64_t r = 0; r < rows; r += kTreeAttentionTileRows) {
      const int64_t tile = std::min<int64_t>(kTreeAttentionTileRows, rows - r);
      work->insert(work->end(), {chunk_begin[c], chunk_begin[c + 1] - chunk_begin[c],
                                 entry_begin[c], static_cast<int32_t>(r | (tile << 24))});
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
  BuildTreeAttentionWork(p.chunk_begin, p.entry_begin, group, &work_);
  // Layout: work items first (16-byte aligned), masks (8-byte aligned), the int32 arrays.
  const std::span<const int32_t> arrays[] = {p.kv_slots,       p.chunk_begin,       p.entry_begin,
                                             p.entry_query,    p.entry_mask_begin,  p.query_entry_begin,
                                             p.query_entries};
  size_t bytes = work_.size() * sizeof(int32_t) + p.masks.size_bytes();
  for (const auto& a : arrays) bytes += a.size_bytes();
  if (bytes == 0) bytes = 8;
  if (cudaError_t err = Reserve(bytes); err != cudaSuccess) return err;
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
  size_t off = 0;
  if (!work_.empty()) std::memcpy(h, work_.data(), work_.size() * sizeof(int32_t));
  view_.work = reinterpret_cast<const int32_t*>(d);
  off += work_.size() * sizeof(int32_t);
  if (!p.masks.empty()) std::memcpy(h + off, p.masks.data(), p.masks.size_bytes());
  view_.masks = reinterpret_cast<const uint64_t*>(d + off);
  off += p.masks.size_bytes();
  const int32_t* dev[7];
  for (int i = 0; i < 7; ++i) {
    if (!arrays[i].empty()) std::memcpy(h + off, arrays[i].data(), arrays[i].size_bytes());
    dev[i] = reinterpret_cast<const int32_t*>(d + off);
    off += arrays[i].size_bytes();
  }
  view_.kv_slots = dev[0];
  view_.chunk_begin = dev[1];
  view_.entry_begin = dev[2];
  view_.entry_query = dev[3];
  view_.entry_mask_begin = dev[4];
  view_.query_entry_begin = dev[5];
  view_.query_entries = dev[6];
  view_.num_chunks = static_cast<int32_t>(chunks);
  view_.num_queries = static_cast<int32_t>(queries);
  view_.num_entries = static_cast<int32_t>(entries);
  view_.num_work = static_cast<int32_t>(work_.size() / 4);
  view_.group = group;
  bytes_ = off;
  if (cudaError_t err = cudaMemcpyAsync(device_, host_, off, cudaMemcpyHostToDevice, stream);
      err != cudaSuccess) {
    return err;
  }
  if (cudaError_t err = cudaEventRecord(copied_, stream); err != cudaSuccess) return err;
  pending_ = true;
  return cudaSuccess;
}

}  // namespace deft::kernels
