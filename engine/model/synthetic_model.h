// Synthetic Llama models: exact architecture shapes with deterministic pseudo-random weights,
// for benchmarks (Llama-3-8B's shapes, whose weights cannot be downloaded; timing does not depend
// on their values) and for GPU-vs-CPU tests on weights both backends hold bit for bit.
//
// Every tensor's element i is SyntheticValue(seed, i, scale, offset)
// (kernels/model/synthetic_values.h) with (seed, scale, offset) from SyntheticTensorParams,
// rounded to the model's dtype (matrices) or kept fp32 (norm vectors). The host builds them here
// (MakeSyntheticModel); the GPU backend generates the same values in device memory without a
// host copy (engine/gpu/device_weights.h).
//
// Names: "synthetic:llama3-8b" (32 layers, hidden 4096, 32 heads, 8 KV heads, head dim 128, FFN
// 14336, vocab 128256, rope theta 500000), "synthetic:tiny" (the same family at test size:
// 4 layers, hidden 1024, 8 heads, 2 KV heads, head dim 128, FFN 2816, vocab 8192). A suffix
// ":f16" selects fp16 weights (default bf16).
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/gguf/ggml_types.h"
#include "engine/model/model_loader.h"

namespace deft {

inline constexpr std::string_view kSyntheticPrefix = "synthetic:";

struct SyntheticModelSpec {
  LlamaConfig config;
  GgmlType dtype = GgmlType::kBF16;  // kBF16 or kF16
  uint64_t seed = 0x5EED;
  // Multiplies the output head's scale: tests that compare greedy tokens across backends use a
  // larger value so that the top two logits are far apart compared with fp16/bf16 rounding.
  float logit_scale = 1.f;
};

enum class SyntheticTensor {
  kTokenEmbd,
  kOutputNorm,
  kOutput,
  kAttnNorm,
  kWq,
  kWk,
  kWv,
  kWo,
  kFfnNorm,
  kGate,
  kUp,
  kDown
};

struct SyntheticTensorParams {
  uint64_t seed;
  float scale;
  float offset;
};

bool IsSyntheticModelName(std::string_view name);
// INVALID_ARGUMENT naming the known models for an unknown name.
absl::StatusOr<SyntheticModelSpec> SyntheticSpecFromName(std::string_view name);
// Matrices: U(-sqrt(3 / cols), sqrt(3 / cols)) (unit variance in, unit variance out);
// embeddings U(-1, 1); norm weights 1 + U(-0.1, 0.1). `layer` is ignored for the global tensors.
SyntheticTensorParams GetSyntheticTensorParams(const SyntheticModelSpec& spec,
                                               SyntheticTensor tensor, int64_t layer);
// The host copy (weights in spec.dtype, fp32 norms; no tokenizer). Costs the full weight size in
// host memory: meant for test-size models.
absl::StatusOr<std::unique_ptr<LoadedModel>> MakeSyntheticModel(const SyntheticModelSpec& spec);

}  // namespace deft
