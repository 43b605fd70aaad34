// CPU reference forward pass of a Llama-family model: embeddings, RMSNorm, RoPE, grouped-query
// attention, SwiGLU MLP, output head; batched prefill and single-token decode over a
// per-sequence KV cache (Forward), and batched steps over many trees' tokens in the paged KV
// pool with attention following a DeFT partition plan (ForwardStep). Matrix-vector products run on
// a thread pool sized to the cores.
//
// Thread safety: Forward() may be called concurrently for different caches (each call uses the
// shared pool); a KvCache must not be used by two calls at once.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/attention/partition_plan.h"
#include "engine/kv/kv_block_pool.h"
#include "engine/model/model_loader.h"
#include "engine/model/step_backend.h"

namespace deft {

class ThreadPool;

// Contiguous fp32 KV cache of one sequence: per layer K and V of [capacity, kv_heads, head_dim].
class KvCache {
 public:
  KvCache(const LlamaConfig& config, int64_t capacity);
  int64_t size() const { return size_; }
  int64_t capacity() const { return capacity_; }
  // Forgets tokens from `n` on (REQUIRES: n <= size()).
  void Truncate(int64_t n);
  float* k(int64_t layer, int64_t pos) { return k_[layer].data() + pos * row_; }
  float* v(int64_t layer, int64_t pos) { return v_[layer].data() + pos * row_; }

 private:
  friend class LlamaModel;
  int64_t capacity_;
  int64_t row_;  // kv_heads * head_dim
  int64_t size_ = 0;
  std::vector<std::vector<float>> k_, v_;
};

struct ModelOptions {
  int num_threads = 0;  // 0: one per core
};

class LlamaModel {
 public:
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Create(std::unique_ptr<LoadedModel> model,
                                                            const ModelOptions& options);
  ~LlamaModel();

  // Runs `tokens` at positions cache.size() .. cache.size()+n-1 and appends their K/V.
  // logits: when `all_logits`, [n, vocab] (one row per token), else [vocab] for the last token.
  // Errors: INVALID_ARGUMENT for an empty input or a token id outside the vocabulary,
  // OUT_OF_RANGE when the cache (or the model's context) cannot hold the tokens.
  absl::Status Forward(std::span<const int32_t> tokens, KvCache& cache, bool all_logits,
                       std::vector<float>* logits);

  // One decoding step over tokens of many trees, KV in the paged pool: token t sits at
  // positions[t], its K/V are written to pool slot kv_slots[t] (every layer; -1: a query-only
  // token whose K/V the pool holds already, recomputed for its logits), then attention
  // follows `plan` (query t = token t; the plan must include the slots written by this step).
  // logits: [logit_rows.size(), vocab], one row per listed token index.
  // Runs on the step backend when one is set (SetStepBackend), else on the CPU; `kv_pool` must
  // come from NewKvPool (FAILED_PRECONDITION when its storage is not the backend's).
  // `sampling` (optional, StepSampling): rows a backend may sample itself; the CPU leaves them
  // to the caller (sampled = false).
  using StepInput = ::deft::StepInput;
  absl::Status ForwardStep(const StepInput& step, KvBlockPool& kv_pool, const PartitionPlan& plan,
                           std::vector<float>* logits, StepSampling* sampling = nullptr);

  // Plans a step for the current backend (StepBackend::Plan; the CPU: planner.Plan).
  absl::Status PlanStep(PartitionPlanner& planner, std::span<const PlanSegment> segments,
                        std::span<const PlanQuery> queries, PartitionPlan* plan) {
    return backend_ ? backend_->Plan(planner, segments, queries, plan)
                    : planner.Plan(segments, queries, plan);
  }
  // Runs ForwardStep on `backend` from now on (nullptr: back to the CPU). Pools made before
  // belong to the old backend. REQUIRES: no step in flight.
  void SetStepBackend(std::unique_ptr<StepBackend> backend);
  StepBackend* step_backend() const { return backend_.get(); }
  // A KV pool for ForwardStep with the storage of the current backend: host fp32 of
  // `requested_bytes` on the CPU; the backend's own sizing otherwise (the GPU's: a fraction of
  // free device memory). Errors as KvBlockPool::Create.
  absl::StatusOr<std::unique_ptr<KvBlockPool>> NewKvPool(const KvPoolShape& shape,
                                                         int64_t requested_bytes);

  KvCache NewCache(int64_t capacity) const { return KvCache(model_->config, capacity); }
  const LlamaConfig& config() const { return model_->config; }
  const Tokenizer& tokenizer() const { return *model_->tokenizer; }
  const LoadedModel& loaded() const { return *model_; }
  ThreadPool& pool() { return *pool_; }

 private:
  LlamaModel() = default;
  // Where a forward pass keeps its KV: write(layer, token, k, v) stores one token's K/V;
  // attend(layer, q [n, heads, head_dim], out [n, heads, head_dim]) runs attention for all n.
  struct KvAccess {
    std::function<void(int64_t, int64_t, const float*, const float*)> write;
    std::function<void(int64_t, const float*, float*)> attend;
  };
  absl::Status CheckTokens(std::span<const int32_t> tokens) const;
  void RunTokens(std::span<const int32_t> tokens, std::span<const int64_t> positions,
                 const KvAccess& kv, std::span<const int32_t> logit_rows,
                 std::vector<float>* logits);

  std::unique_ptr<LoadedModel> model_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<StepBackend> backend_;  // null: the CPU code below
  std::vector<double> inv_freq_;          // RoPE inverse frequencies, from the config
};

}  // namespace deft
