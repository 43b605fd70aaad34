#include "engine/gpu/gpu_tree_attention.h"

#include "absl/strings/str_cat.h"

namespace deft {
namespace {

absl::Status CudaError(cudaError_t err, const char* what) {
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

}  // namespace

GpuTreeAttention::~GpuTreeAttention() {
  if (workspace_ != nullptr) cudaFree(workspace_);
}

absl::Status GpuTreeAttention::Upload(const PartitionPlan& plan, int32_t num_heads,
                                      int32_t num_kv_heads, int32_t head_dim, cudaStream_t stream) {
  if (num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0 ||
      num_heads / num_kv_heads > 8 || (head_dim != 64 && head_dim != 128)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU tree attention supports head_dim 64 or 128 and 1..8 query heads per KV "
                     "head, not ",
                     num_heads, " heads / ", num_kv_heads, " KV heads of ", head_dim));
  }
  kernels::TreeAttentionPlanArrays arrays;
  arrays.kv_slots = plan.kv_slots;
  arrays.chunk_begin = plan.chunk_begin;
  arrays.entry_begin = plan.entry_begin;
  arrays.entry_query = plan.entry_query;
  arrays.entry_mask_begin = plan.entry_mask_begin;
  arrays.masks = plan.masks;
  arrays.query_entry_begin = plan.query_entry_begin;
  arrays.query_entries = plan.query_entries;
  // Flatten, node and tree plans read each token of kv_slots once (partition_plan.h); seq
  // plans repeat a shared prefix's slots in every query's chunks.
  arrays.disjoint_chunks = plan.mode != AttentionMode::kSeq;
  if (cudaError_t err = device_plan_.Upload(arrays, num_heads / num_kv_heads, stream);
      err != cudaSuccess) {
    return CudaError(err, "uploading the attention plan");
  }
  workspace_bytes_ = kernels::TreeAttentionWorkspaceBytes(plan.num_entries(), num_heads, head_dim);
  if (workspace_bytes_ > workspace_capacity_) {
    if (workspace_ != nullptr) {
      // The previous step's kernels may still use it.
      if (cudaError_t err = cudaStreamSynchronize(stream); err != cudaSuccess) {
        return CudaError(err, "waiting for the previous step");
      }
      cudaFree(workspace_);
      workspace_ = nullptr;
      workspace_capacity_ = 0;
    }
    const size_t want = workspace_bytes_ + workspace_bytes_ / 4;
    if (cudaError_t err = cudaMalloc(&workspace_, want); err != cudaSuccess) {
      return CudaError(err, "allocating the attention workspace");
    }
    workspace_capacity_ = want;
  }
  num_heads_ = num_heads;
  head_dim_ = head_dim;
  skip_masked_ = plan.mode != AttentionMode::kTree;
  return absl::OkStatus();
}

absl::Status GpuTreeAttention::Run(const GpuAttentionLayer& layer, cudaStream_t stream,
                                   kernels::TreeAttentionPhases phases,
                                   unsigned long long* trace) const {
  if (layer.num_heads != num_heads_ || layer.head_dim != head_dim_ || layer.num_kv_heads <= 0 ||
      layer.num_heads / layer.num_kv_heads != view().group) {
    return absl::InvalidArgumentError("attention layer shape differs from the uploaded plan's");
  }
  kernels::TreeAttentionArgs a;
  a.dtype = layer.dtype;
  a.num_heads = layer.num_heads;
  a.num_kv_heads = layer.num_kv_heads;
  a.head_dim = layer.head_dim;
  a.q = layer.q;
  a.out = layer.out;
  a.k = layer.k;
  a.v = layer.v;
  a.kv_slot_stride = layer.kv_slot_stride;
  a.plan = view();
  a.workspace = workspace_;
  a.workspace_bytes = workspace_capacity_;
  a.skip_masked_blocks = skip_masked_;
  a.phases = phases;
  a.merge = merge_;
  a.trace = trace;
  if (cudaError_t err = kernels::RunTreeAttention(a, stream); err != cudaSuccess) {
    if (err == cudaErrorInvalidValue) {
      return absl::InvalidArgumentError("tree attention: unsupported shape or arguments");
    }
    return CudaError(err, "tree attention");
  }
  return absl::OkStatus();
}

}  // namespace deft
