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
#include "engine/sampler/sampler.h"

namespace deft {

// One decoding step over tokens of many trees (LlamaModel::ForwardStep documents the fields).
struct StepInput {
  std::span<const int32_t> tokens;
  std::span<const int64_t> positions;
  std::span<const int32_t> kv_slots;
  std::span<const int32_t> logit_rows;
};

// Rows of a step that its backend may sample next to the logits (StepBackend::ForwardStep's
// optional `sampling`: each draw is a function of the logits row, the settings, the draw's index
// and, with penalties, the sampler's seen tokens given as entries). A backend that does so fills tokens, logprobs
// and top (one per row, as Sampler::Sample would choose and report them) and sets `sampled`;
// one that does not leaves `sampled` false and the caller samples from `logits`. When
// `need_logits` is false and the backend sampled, `logits` may be left untouched (a GPU then
// copies nothing but the tokens to the host).
struct StepSampling {
  struct Row {
    int32_t logit_row = 0;  // index into StepInput::logit_rows
    float temperature = 1.f;
    int32_t top_k = 0;
    float top_p = 1.f;
    float min_p = 0.f;
    uint64_t seed = 0;
    uint64_t step = 0;  // the sampler's draw index (Sampler::steps())
    int32_t top_logprobs = 0;  // alternatives to report (0..20, SamplingParams)
    // Penalties (SamplingParams) over entries [penalty_begin, + penalty_count) of penalty_ids /
    // penalty_counts (Sampler::AppendPenaltyEntries), then [override_begin, + override_count),
    // whose ids replace their entries in the first range (kernels/model/sampling.h).
    float repetition_penalty = 1.f;
    float frequency_penalty = 0.f;
    float presence_penalty = 0.f;
    int32_t penalty_begin = 0;
    int32_t penalty_count = 0;
    int32_t override_begin = 0;
    int32_t override_count = 0;
  };
  std::vector<Row> rows;
  std::vector<int32_t> penalty_ids;
  std::vector<int32_t> penalty_counts;
  bool need_logits = true;
  // Out.
  bool sampled = false;
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::vector<std::vector<TokenLogprob>> top;  // per row, top_logprobs of them (TopLogprobs)
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
  // `sampling` (optional): rows the backend may sample itself (StepSampling).
  virtual absl::Status ForwardStep(const StepInput& step, KvBlockPool& kv_pool,
                                   const PartitionPlan& plan, std::vector<float>* logits,
                                   StepSampling* sampling = nullptr) = 0;
};

}  // namespace deft
