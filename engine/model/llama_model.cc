#include "engine/model/llama_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_format.h"
#include "engine/attention/cpu_attention.h"
#include "engine/cpu/matmul.h"
#include "engine/cpu/simd.h"
#include "engine/util/thread_pool.h"

namespace deft {
namespace {

// out[i] = x[i] / rms(x) * weight[i], over `n` values (fp32 throughout, as HF's LlamaRMSNorm).
void RmsNorm(const float* x, const float* weight, float* out, int64_t n, float eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  float scale = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * scale);
}

// Rotates the first rope_dim dims of each of `heads` vectors of head_dim at `pos`.
void ApplyRope(float* x, int64_t heads, const LlamaConfig& c, const std::vector<double>& inv_freq,
               int64_t pos) {
  const int64_t half = c.rope_dim / 2;
  const double p = static_cast<double>(pos) / c.rope_linear_scale;
  for (int64_t i = 0; i < half; ++i) {
    double angle = p * inv_freq[i];
    float cs = static_cast<float>(std::cos(angle)), sn = static_cast<float>(std::sin(angle));
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + h * c.head_dim;
      int64_t a = c.rope_neox ? i : 2 * i, b = c.rope_neox ? i + half : 2 * i + 1;
      float x0 = v[a], x1 = v[b];
      v[a] = x0 * cs - x1 * sn;
      v[b] = x0 * sn + x1 * cs;
    }
  }
}

// Per-call activations of a forward pass over n tokens.
struct Activations {
  std::vector<float> x, xn, q, k, v, attn, proj, gate, up, scores;
  void Resize(const LlamaConfig& c, int64_t n) {
    x.resize(n * c.hidden);
    xn.resize(n * c.hidden);
    q.resize(n * c.num_heads * c.head_dim);
    k.resize(n * c.num_kv_heads * c.head_dim);
    v.resize(n * c.num_kv_heads * c.head_dim);
    attn.resize(n * c.num_heads * c.head_dim);
    proj.resize(n * c.hidden);
    gate.resize(n * c.ffn_hidden);
    up.resize(n * c.ffn_hidden);
  }
};

thread_local std::vector<float> tls_scores;

}  // namespace

KvCache::KvCache(const LlamaConfig& config, int64_t capacity)
    : capacity_(capacity), row_(config.num_kv_heads * config.head_dim) {
  k_.resize(static_cast<size_t>(config.num_layers));
  v_.resize(static_cast<size_t>(config.num_layers));
  for (auto& l : k_) l.resize(static_cast<size_t>(capacity * row_));
  for (auto& l : v_) l.resize(static_cast<size_t>(capacity * row_));
}

void KvCache::Truncate(int64_t n) { size_ = std::min(size_, std::max<int64_t>(0, n)); }

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(std::unique_ptr<LoadedModel> model,
                                                               const ModelOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("no model");
  if (absl::Status s = ValidateWeights(model->config, model->weights); !s.ok()) return s;
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  m->model_ = std::move(model);
  m->pool_ = std::make_unique<ThreadPool>(options.num_threads);
  m->inv_freq_ = RopeInverseFrequencies(m->model_->config);
  return m;
}

LlamaModel::~LlamaModel() = default;

absl::Status LlamaModel::CheckTokens(std::span<const int32_t> tokens) const {
  const int64_t vocab = model_->config.vocab_size;
  if (tokens.empty()) return absl::InvalidArgumentError("no tokens to run");
  for (int32_t t : tokens) {
    if (t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrFormat("token id %d is outside the vocabulary [0, %d)", t, vocab));
    }
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::Forward(std::span<const int32_t> tokens, KvCache& cache, bool all_logits,
                                 std::vector<float>* logits) {
  const LlamaConfig& c = model_->config;
  if (absl::Status s = CheckTokens(tokens); !s.ok()) return s;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t pos0 = cache.size();
  if (pos0 + n > cache.capacity()) {
    return absl::OutOfRangeError(absl::StrFormat(
        "%d tokens do not fit in the KV cache (%d of %d used)", n, pos0, cache.capacity()));
  }
  if (cache.row_ != c.num_kv_heads * c.head_dim ||
      static_cast<int64_t>(cache.k_.size()) != c.num_layers) {
    return absl::InvalidArgumentError("KV cache was made for another model");
  }
  std::vector<int64_t> positions(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) positions[t] = pos0 + t;
  std::vector<int32_t> rows;
  for (int64_t t = all_logits ? 0 : n - 1; t < n; ++t) rows.push_back(static_cast<int32_t>(t));

  const int64_t hd = c.head_dim, nh = c.num_heads, kv_dim = c.num_kv_heads * hd;
  const int64_t group = c.num_heads / c.num_kv_heads;
  const float attn_scale = 1.f / std::sqrt(static_cast<float>(hd));
  ThreadPool& pool = *pool_;
  KvAccess kv;
  kv.write = [&](int64_t l, int64_t t, const float* k, const float* v) {
    std::memcpy(cache.k(l, pos0 + t), k, kv_dim * sizeof(float));
    std::memcpy(cache.v(l, pos0 + t), v, kv_dim * sizeof(float));
  };
  // Causal attention: token t (position pos0 + t) sees positions [0, pos0 + t].
  kv.attend = [&](int64_t l, const float* q, float* out) {
    pool.ParallelFor(n * nh, 1, [&](int, int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t t = job / nh, h = job % nh, g = h / group;
        const int64_t len = pos0 + t + 1;
        const float* qv = q + (t * nh + h) * hd;
        tls_scores.resize(static_cast<size_t>(len));
        float* s = tls_scores.data();
        float mx = -INFINITY;
        for (int64_t p = 0; p < len; ++p) {
          s[p] = simd::Dot(qv, cache.k(l, p) + g * hd, hd) * attn_scale;
          mx = std::max(mx, s[p]);
        }
        float sum = 0.f;
        for (int64_t p = 0; p < len; ++p) {
          s[p] = std::exp(s[p] - mx);
          sum += s[p];
        }
        float* o = out + (t * nh + h) * hd;
        std::fill(o, o + hd, 0.f);
        for (int64_t p = 0; p < len; ++p) simd::Axpy(s[p] / sum, cache.v(l, p) + g * hd, o, hd);
      }
    });
  };
  RunTokens(tokens, positions, kv, rows, logits);
  cache.size_ = pos0 + n;
  return absl::OkStatus();
}

absl::Status LlamaModel::ForwardStep(const StepInput& step, KvBlockPool& kv_pool,
                                     const PartitionPlan& plan, std::vector<float>* logits,
                                     StepSampling* sampling) {
  const LlamaConfig& c = model_->config;
  if (absl::Status s = CheckTokens(step.tokens); !s.ok()) return s;
  const int64_t n = static_cast<int64_t>(step.tokens.size());
  if (static_cast<int64_t>(step.positions.size()) != n ||
      static_cast<int64_t>(step.kv_slots.size()) != n || plan.num_queries() != n) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "step shapes disagree: %d tokens, %d positions, %d slots, %d planned queries", n,
        step.positions.size(), step.kv_slots.size(), plan.num_queries()));
  }
  const KvPoolShape& shape = kv_pool.shape();
  if (shape.num_layers != c.num_layers || shape.num_kv_heads != c.num_kv_heads ||
      shape.head_dim != c.head_dim) {
    return absl::InvalidArgumentError("KV pool was made for another model");
  }
  const int64_t pool_slots = kv_pool.num_blocks() * kv_pool.block_tokens();
  for (int64_t t = 0; t < n; ++t) {
    if (step.positions[t] < 0 || step.positions[t] >= c.context_length) {
      return absl::OutOfRangeError(absl::StrFormat("position %d is outside the context (%d)",
                                                   step.positions[t], c.context_length));
    }
    if (step.kv_slots[t] < -1 || step.kv_slots[t] >= pool_slots) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV slot %d is outside the pool", step.kv_slots[t]));
    }
  }
  for (int32_t r : step.logit_rows) {
    if (r < 0 || r >= n) {
      return absl::InvalidArgumentError(absl::StrFormat("logit row %d of %d tokens", r, n));
    }
  }
  if (sampling != nullptr) {
    sampling->sampled = false;
    for (const StepSampling::Row& r : sampling->rows) {
      if (r.logit_row < 0 || r.logit_row >= static_cast<int64_t>(step.logit_rows.size())) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "sampling row %d of %d logit rows", r.logit_row, step.logit_rows.size()));
      }
    }
  }
  if (backend_ != nullptr) return backend_->ForwardStep(step, kv_pool, plan, logits, sampling);
  if (kv_pool.storage().host_data() == nullptr) {
    return absl::FailedPreconditionError("the KV pool's storage is not in host memory");
  }
  const int64_t kv_dim = c.num_kv_heads * c.head_dim;
  const AttentionShape attn{c.num_heads, c.num_kv_heads, c.head_dim};
  KvAccess kv;
  kv.write = [&](int64_t l, int64_t t, const float* k, const float* v) {
    if (step.kv_slots[t] < 0) return;  // query-only token: its KV is stored already
    std::memcpy(kv_pool.k(l, step.kv_slots[t]), k, kv_dim * sizeof(float));
    std::memcpy(kv_pool.v(l, step.kv_slots[t]), v, kv_dim * sizeof(float));
  };
  kv.attend = [&](int64_t l, const float* q, float* out) {
    RunAttentionCpu(*pool_, plan, kv_pool, l, attn, q, out);
  };
  RunTokens(step.tokens, step.positions, kv, step.logit_rows, logits);
  return absl::OkStatus();
}

void LlamaModel::SetStepBackend(std::unique_ptr<StepBackend> backend) {
  backend_ = std::move(backend);
}

absl::StatusOr<std::unique_ptr<KvBlockPool>> LlamaModel::NewKvPool(const KvPoolShape& shape,
                                                                   int64_t requested_bytes) {
  if (backend_ == nullptr) {
    return KvBlockPool::Create(shape, KvBlockPool::BlocksForBytes(shape, requested_bytes));
  }
  return KvBlockPool::Create(shape, backend_->KvPoolBlocks(shape, requested_bytes),
                             backend_->kv_storage());
}

void LlamaModel::RunTokens(std::span<const int32_t> tokens, std::span<const int64_t> positions,
                           const KvAccess& kv, std::span<const int32_t> logit_rows,
                           std::vector<float>* logits) {
  const LlamaConfig& c = model_->config;
  const LlamaWeights& w = model_->weights;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t H = c.hidden, hd = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const int64_t q_dim = nh * hd, kv_dim = nkv * hd;
  // The calling thread's buffers; pool workers reach them through this reference (naming the
  // thread_local inside a worker would give the worker's own, empty, instance).
  static thread_local Activations tls_act;
  Activations& act = tls_act;
  act.Resize(c, n);
  ThreadPool& pool = *pool_;

  for (int64_t t = 0; t < n; ++t) EmbeddingRow(w.token_embd, tokens[t], &act.x[t * H]);

  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LlamaLayerWeights& L = w.layers[l];
    for (int64_t t = 0; t < n; ++t) {
      RmsNorm(&act.x[t * H], L.attn_norm.data(), &act.xn[t * H], H, c.rms_eps);
    }
    {
      const WeightMatrix* ws[] = {&L.wq, &L.wk, &L.wv};
      float* ys[] = {act.q.data(), act.k.data(), act.v.data()};
      MatMulMany(pool, ws, act.xn.data(), n, ys);
    }
    for (int64_t t = 0; t < n; ++t) {
      ApplyRope(&act.q[t * q_dim], nh, c, inv_freq_, positions[t]);
      ApplyRope(&act.k[t * kv_dim], nkv, c, inv_freq_, positions[t]);
      kv.write(l, t, &act.k[t * kv_dim], &act.v[t * kv_dim]);
    }
    kv.attend(l, act.q.data(), act.attn.data());
    MatMul(pool, L.wo, act.attn.data(), n, act.proj.data());
    for (int64_t i = 0; i < n * H; ++i) act.x[i] += act.proj[i];

    for (int64_t t = 0; t < n; ++t) {
      RmsNorm(&act.x[t * H], L.ffn_norm.data(), &act.xn[t * H], H, c.rms_eps);
    }
    {
      const WeightMatrix* ws[] = {&L.w_gate, &L.w_up};
      float* ys[] = {act.gate.data(), act.up.data()};
      MatMulMany(pool, ws, act.xn.data(), n, ys);
    }
    const int64_t F = c.ffn_hidden;
    pool.ParallelFor(n * F, 256, [&](int, int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float g = act.gate[i];
        act.gate[i] = g / (1.f + std::exp(-g)) * act.up[i];
      }
    });
    MatMul(pool, L.w_down, act.gate.data(), n, act.proj.data());
    for (int64_t i = 0; i < n * H; ++i) act.x[i] += act.proj[i];
  }

  const int64_t rows = static_cast<int64_t>(logit_rows.size());
  for (int64_t r = 0; r < rows; ++r) {
    RmsNorm(&act.x[logit_rows[r] * H], w.output_norm.data(), &act.xn[r * H], H, c.rms_eps);
  }
  logits->resize(static_cast<size_t>(rows * c.vocab_size));
  if (rows > 0) MatMul(pool, w.output, act.xn.data(), rows, logits->data());
}

}  // namespace deft
