// Hyper-parameters of a Llama-family model, read from GGUF metadata or a Hugging Face
// config.json. Shapes always come from here, never from constants.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace deft {

struct LlamaConfig {
  std::string architecture = "llama";
  std::string name;  // general.name, for display
  int64_t vocab_size = 0;
  int64_t hidden = 0;  // n_embd
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;        // hidden / num_heads unless the file says otherwise
  int64_t ffn_hidden = 0;      // SwiGLU intermediate size
  int64_t context_length = 0;  // trained context length (n_ctx_train)
  float rms_eps = 1e-5f;
  float rope_theta = 10000.f;
  int64_t rope_dim = 0;  // rotated dims per head (== head_dim for Llama)
  // false: GGML "normal" rope that rotates adjacent pairs (x[2i], x[2i+1]); GGUF Llama weights
  // are permuted for it. true: NeoX/HF style that rotates (x[i], x[i + rope_dim/2]).
  bool rope_neox = false;
  // Per-frequency divisors (size rope_dim / 2), empty when there is no scaling: inv_freq[i] =
  // theta^(-2i/rope_dim) / rope_freq_factors[i]. Llama 3 scaling is expressed this way.
  std::vector<float> rope_freq_factors;
  float rope_linear_scale = 1.f;  // linear scaling: positions are divided by this
  bool tied_embeddings = false;   // output head reuses token_embd
};

// Builds Llama-3 style frequency factors (rope_type "llama3") the way HF and llama.cpp do.
std::vector<float> Llama3RopeFreqFactors(int64_t rope_dim, float theta, float factor,
                                         float low_freq_factor, float high_freq_factor,
                                         int64_t original_context);

// RoPE inverse frequencies per pair index i < rope_dim / 2: theta^(-2i / rope_dim) divided by
// rope_freq_factors[i] when present (fp64; every backend rotates with these).
std::vector<double> RopeInverseFrequencies(const LlamaConfig& config);

}  // namespace deft
