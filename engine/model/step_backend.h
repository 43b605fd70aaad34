// The narrow backend interface of a model step (ggml-backend style): what a backend must provide
// for LlamaModel::ForwardStep to run on it. The CPU backend is LlamaModel's own code (the
// reference); engine/gpu/ implements the CUDA one. Every operation of a step (embedding,
// RMSNorm, QKV/O/MLP projections, RoPE, KV append, tree attention over the plan, output head)
// exists in both, and tests/gpu compares them on the same weights.
//
// Thread safety: a backend runs one step at a time (LlamaModel::ForwardStep's callers serialize
// steps, as TreeEngine's scheduler thread does).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/attention/partition_plan.h"
#include "engine/kv/kv_block_pool.h"

namespace deft {

// One decoding step over tokens of many trees (LlamaModel::ForwardStep documents the fields).
struct StepInput {
  std::span<const int32_t> tokens;
  std::span<const int64_t> positions;
  std::span<const int32_t> kv_slots;
  std::span<const int32_t> logit_rows;
};

class StepBackend {
 public:
  virtual ~StepBackend() = default;
  virtual std::string_view name() const = 0;
  // Storage for a KV pool whose blocks this backend's steps read and write.
  virtual KvStorageFactory kv_storage() = 0;
  // Blocks of the pool this backend would make for `shape` when asked for `requested_bytes`.
  virtual int64_t KvPoolBlocks(const KvPoolShape& shape, int64_t requested_bytes) = 0;
  // Plans a step's attention for this backend. The CPU uses `planner` as given; a backend may
  // choose its own chunk sizes (the GPU: engine/attention/gpu_chunking.h), keeping the mode and
  // the IO accounting of planner.options().
  virtual absl::Status Plan(PartitionPlanner& planner, std::span<const PlanSegment> segments,
                            std::span<const PlanQuery> queries, PartitionPlan* plan) {
    return planner.Plan(segments, queries, plan);
  }
  // Runs the step. REQUIRES: the inputs passed LlamaModel::ForwardStep's validation and
  // `kv_pool`'s storage came from kv_storage().
  virtual absl::Status ForwardStep(const StepInput& step, KvBlockPool& kv_pool,
                                   const PartitionPlan& plan, std::vector<float>* logits) = 0;
};

}  // namespace deft
