// Loading a Llama-family model from a GGUF file or a Hugging Face model directory into one
// in-memory form (config + weights + tokenizer) that every backend consumes.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/llama_config.h"
#include "engine/model/llama_weights.h"
#include "engine/tokenizer/tokenizer.h"

namespace deft {

struct LoadOptions {
  // Dequantize every matrix to fp32 at load ("exact-dequant path"): the numerics then match an
  // fp32 reference implementation (HF transformers) up to summation order. Costs 4 bytes/weight.
  bool dequantize_to_f32 = false;
};

struct LoadedModel {
  LlamaConfig config;
  LlamaWeights weights;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string source;  // path it came from
};

// GGUF file (architecture "llama"). Errors name the file and the problem (missing tensor, shape
// mismatch, unsupported architecture or tensor type, ...).
absl::StatusOr<std::unique_ptr<LoadedModel>> LoadGgufModel(const std::string& path,
                                                           const LoadOptions& options);
// Hugging Face directory: config.json, model.safetensors or model.safetensors.index.json with
// shards (F32/F16/BF16), tokenizer.json and optionally tokenizer_config.json.
absl::StatusOr<std::unique_ptr<LoadedModel>> LoadSafetensorsModel(const std::string& dir,
                                                                  const LoadOptions& options);
// Dispatches on what `path` is: a directory -> safetensors, a file -> GGUF.
absl::StatusOr<std::unique_ptr<LoadedModel>> LoadModel(const std::string& path,
                                                       const LoadOptions& options);

// Validates shapes of `weights` against `config`; used by both loaders.
absl::Status ValidateWeights(const LlamaConfig& config, const LlamaWeights& weights);

}  // namespace deft
