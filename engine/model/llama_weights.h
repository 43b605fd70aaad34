// The weights of a Llama-family model as typed row-major matrices. A matrix either views memory
// owned elsewhere (a GGUF or safetensors mmap) or memory held in `LlamaWeights::owned`.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/gguf/ggml_types.h"
#include "engine/model/llama_config.h"

namespace deft {

// [rows, cols] row-major: row r holds the `cols` input weights of output feature r, encoded in
// `type` (cols % block_elems == 0). For GGUF this is a tensor with dims {cols, rows}.
struct WeightMatrix {
  GgmlType type = GgmlType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_bytes = 0;
  const uint8_t* data = nullptr;
  const uint8_t* row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes; }
};

struct LlamaLayerWeights {
  std::vector<float> attn_norm;  // [hidden]
  WeightMatrix wq;               // [num_heads * head_dim, hidden]
  WeightMatrix wk;               // [num_kv_heads * head_dim, hidden]
  WeightMatrix wv;               // [num_kv_heads * head_dim, hidden]
  WeightMatrix wo;               // [hidden, num_heads * head_dim]
  std::vector<float> ffn_norm;   // [hidden]
  WeightMatrix w_gate;           // [ffn_hidden, hidden]
  WeightMatrix w_up;             // [ffn_hidden, hidden]
  WeightMatrix w_down;           // [hidden, ffn_hidden]
};

struct LlamaWeights {
  WeightMatrix token_embd;         // [vocab, hidden]
  std::vector<float> output_norm;  // [hidden]
  WeightMatrix output;             // [vocab, hidden]; views token_embd when tied
  std::vector<LlamaLayerWeights> layers;
  // Storage for matrices that do not view a mapping (converted or dequantized copies), and the
  // mappings themselves kept alive for the weights' lifetime.
  std::vector<std::unique_ptr<uint8_t[]>> owned;
  std::vector<std::shared_ptr<const void>> keep_alive;
};

}  // namespace deft
