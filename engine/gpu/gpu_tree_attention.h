// The engine's handle on the GPU tree attention kernels: uploads a step's PartitionPlan once
// (one packed copy) and runs it for each layer, turning cudaError_t into absl::Status.
//
// Usage per step: Upload(plan, group, stream); then Run(layer_args, stream) for every layer.
// The workspace (partial states) grows to the largest plan seen; it is allocated in Upload, so
// Run allocates nothing (it can be captured in a CUDA graph).
// Thread safety: one object per stream; not thread-safe.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "engine/attention/partition_plan.h"
#include "kernels/attention/tree_attention.h"
#include "kernels/attention/tree_attention_plan.h"

namespace deft {

struct GpuAttentionLayer {
  kernels::KvDtype dtype = kernels::KvDtype::kFloat16;
  int32_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  const void* q = nullptr;  // [num_queries, num_heads, head_dim]
  void* out = nullptr;      // [num_queries, num_heads, head_dim]
  const void* k = nullptr;  // this layer's K: slot * kv_slot_stride + kv_head * head_dim
  const void* v = nullptr;
  int64_t kv_slot_stride = 0;
};

class GpuTreeAttention {
 public:
  GpuTreeAttention() = default;
  ~GpuTreeAttention();
  GpuTreeAttention(const GpuTreeAttention&) = delete;
  GpuTreeAttention& operator=(const GpuTreeAttention&) = delete;

  // Uploads `plan` for heads grouped `num_heads / num_kv_heads` and sizes the workspace.
  absl::Status Upload(const PartitionPlan& plan, int32_t num_heads, int32_t num_kv_heads,
                      int32_t head_dim, cudaStream_t stream);
  // Runs the uploaded plan on one layer. INVALID_ARGUMENT for a shape the kernels do not
  // support or that differs from the upload's; INTERNAL for a CUDA error. `trace`: see
  // kernels::TreeAttentionArgs::trace (profiling builds).
  absl::Status Run(const GpuAttentionLayer& layer, cudaStream_t stream,
                   kernels::TreeAttentionPhases phases = kernels::TreeAttentionPhases::kBoth,
                   unsigned long long* trace = nullptr) const;

  // Which merge kernel Run launches (kernels::TreeAttentionMerge; kAuto unless a test forces one).
  void set_merge(kernels::TreeAttentionMerge merge) { merge_ = merge; }

  const kernels::TreeAttentionPlanView& view() const { return device_plan_.view(); }
  size_t plan_bytes() const { return device_plan_.uploaded_bytes(); }

 private:
  kernels::DeviceTreeAttentionPlan device_plan_;
  void* workspace_ = nullptr;
  size_t workspace_capacity_ = 0, workspace_bytes_ = 0;
  int32_t num_heads_ = 0, head_dim_ = 0;
  bool skip_masked_ = true;
  kernels::TreeAttentionMerge merge_ = kernels::TreeAttentionMerge::kAuto;
};

}  // namespace deft
