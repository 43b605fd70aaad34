// A tiny Llama model with deterministic random fp32 weights, for engine tests that need many
// forward passes (every workload tree in every mode) rather than a trained model's text.
//
// Shapes: 2 layers, hidden 64, 4 query heads over 2 KV heads (GQA ratio 2, head dim 16), SwiGLU
// hidden 128, vocabulary 256, context 1024, GGML-order RoPE. Weights are drawn from a seeded
// std::mt19937 (the same seed gives bit-identical models), scaled so that attention is far from
// uniform (q.k / sqrt(d) has a standard deviation of about 3) and the residual stream stays near
// unit RMS: the next token then depends on which tokens the context holds and where, so KV that is
// wrong, missing, misplaced or stale changes greedy tokens (SyntheticModel.NextTokenDependsOn*
// measures this). All matrices are fp32: the exact path, no activation quantization.
//
// The tokenizer spells token i as "t<i> " (ASCII, no special tokens, no end-of-generation ids).
//
// Not engine/model/synthetic_model.h: those are bf16/fp16 models at real shapes for the GPU
// backend and benchmarks (the smallest has hidden 1024 and 8k tokens, no tokenizer); this one is
// fp32 (token equality needs the exact path) and small enough for thousands of branches.
#pragma once

#include <charconv>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_loader.h"
#include "engine/tokenizer/tokenizer.h"

namespace deft::testing_synthetic {

constexpr int64_t kVocab = 256;
constexpr int64_t kHidden = 64;
constexpr int64_t kLayers = 2;
constexpr int64_t kHeads = 4;
constexpr int64_t kKvHeads = 2;
constexpr int64_t kFfn = 128;
constexpr int64_t kContext = 1024;

// Token i <-> "t<i> ".
class SyntheticTokenizer : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text, bool, bool) const override {
    std::vector<int32_t> ids;
    size_t i = 0;
    while (i < text.size()) {
      if (text[i] != 't') {
        ++i;
        continue;
      }
      int32_t id = -1;
      const char* begin = text.data() + i + 1;
      const auto [end, ec] = std::from_chars(begin, text.data() + text.size(), id);
      if (ec == std::errc() && id >= 0 && id < kVocab) ids.push_back(id);
      i = static_cast<size_t>(end - text.data()) + (end == begin ? 1 : 0);
    }
    return ids;
  }
  std::string Decode(std::span<const int32_t> ids, bool) const override {
    std::string s;
    for (int32_t id : ids) s += TokenBytes(id);
    return s;
  }
  std::string TokenBytes(int32_t id) const override {
    if (id < 0 || id >= kVocab) return "";
    std::string s = "t";
    s += std::to_string(id);
    s += ' ';
    return s;
  }
  int32_t vocab_size() const override { return kVocab; }
  int32_t bos_id() const override { return -1; }
  int32_t eos_id() const override { return -1; }
  const std::vector<int32_t>& end_of_generation_ids() const override { return eog_; }
  bool IsSpecial(int32_t) const override { return false; }
  bool add_bos_by_default() const override { return false; }
  ChatTemplateKind chat_template_kind() const override { return ChatTemplateKind::kNone; }
  absl::StatusOr<std::string> ApplyChatTemplate(const std::vector<ChatMessage>&,
                                                bool) const override {
    return absl::FailedPreconditionError("the synthetic model has no chat template");
  }

 private:
  std::vector<int32_t> eog_;
};

// The model's weights and config; every call with the same seed gives the same model.
inline std::unique_ptr<LoadedModel> SyntheticLoadedModel(uint32_t seed) {
  auto m = std::make_unique<LoadedModel>();
  LlamaConfig& c = m->config;
  c.name = "synthetic";
  c.vocab_size = kVocab;
  c.hidden = kHidden;
  c.num_layers = kLayers;
  c.num_heads = kHeads;
  c.num_kv_heads = kKvHeads;
  c.head_dim = kHidden / kHeads;
  c.ffn_hidden = kFfn;
  c.context_length = kContext;
  c.rope_dim = c.head_dim;
  c.rms_eps = 1e-5f;
  c.rope_theta = 10000.f;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  LlamaWeights& w = m->weights;
  // A [rows, cols] fp32 matrix with entries N(0, std^2), owned by the weights.
  auto matrix = [&](int64_t rows, int64_t cols, float std) {
    auto data = std::make_unique<uint8_t[]>(static_cast<size_t>(rows * cols) * sizeof(float));
    float* f = reinterpret_cast<float*>(data.get());
    for (int64_t i = 0; i < rows * cols; ++i) f[i] = std * normal(rng);
    WeightMatrix mat{GgmlType::kF32, rows, cols, static_cast<size_t>(cols) * sizeof(float),
                     data.get()};
    w.owned.push_back(std::move(data));
    return mat;
  };
  // After RMSNorm the input has unit RMS (|x|^2 = hidden). q, k entries: N(0, hidden std^2), so
  // q.k / sqrt(head_dim) has std hidden std^2: 0.22^2 * 64 = 3.1.
  const float qk_std = 0.22f;
  const float in_std = 1.f / std::sqrt(static_cast<float>(kHidden));  // unit-variance outputs
  const float ffn_in_std = 1.f / std::sqrt(static_cast<float>(kFfn));
  w.token_embd = matrix(kVocab, kHidden, 1.f);
  for (int64_t l = 0; l < kLayers; ++l) {
    LlamaLayerWeights L;
    L.attn_norm.assign(kHidden, 1.f);
    L.ffn_norm.assign(kHidden, 1.f);
    L.wq = matrix(kHeads * c.head_dim, kHidden, qk_std);
    L.wk = matrix(kKvHeads * c.head_dim, kHidden, qk_std);
    L.wv = matrix(kKvHeads * c.head_dim, kHidden, in_std);
    L.wo = matrix(kHidden, kHeads * c.head_dim, in_std);
    L.w_gate = matrix(kFfn, kHidden, in_std);
    L.w_up = matrix(kFfn, kHidden, in_std);
    L.w_down = matrix(kHidden, kFfn, ffn_in_std);
    w.layers.push_back(std::move(L));
  }
  w.output_norm.assign(kHidden, 1.f);
  w.output = matrix(kVocab, kHidden, in_std * 4.f);  // logits with std ~4
  m->tokenizer = std::make_unique<SyntheticTokenizer>();
  m->source = "synthetic seed " + std::to_string(seed);
  return m;
}

// One thread: the model is small enough that a second thread's hand-off costs more than it saves.
inline std::unique_ptr<LlamaModel> SyntheticModel(uint32_t seed) {
  ModelOptions options;
  options.num_threads = 1;
  auto model = LlamaModel::Create(SyntheticLoadedModel(seed), options);
  if (!model.ok()) std::abort();  // the shapes above are valid; only a bug gets here
  return std::move(*model);
}

}  // namespace deft::testing_synthetic
