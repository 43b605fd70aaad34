// CPU reference forward pass of a Llama-family model: embeddings, RMSNorm, RoPE, grouped-query
// attention, SwiGLU MLP, output head; batched prefill and single-token decode over a
// per-sequence KV cache. Matrix-vector products run on a thread pool sized to the cores.
//
// Thread safety: Forward() may be called concurrently for different caches (each call uses the
// shared pool); a KvCache must not be used by two calls at once.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/model_loader.h"

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

  KvCache NewCache(int64_t capacity) const { return KvCache(model_->config, capacity); }
  const LlamaConfig& config() const { return model_->config; }
  const Tokenizer& tokenizer() const { return *model_->tokenizer; }
  const LoadedModel& loaded() const { return *model_; }
  ThreadPool& pool() { return *pool_; }

 private:
  LlamaModel() = default;
  std::unique_ptr<LoadedModel> model_;
  std::unique_ptr<ThreadPool> pool_;
};

}  // namespace deft
