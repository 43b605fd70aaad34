// Loads a Llama-family model from a Hugging Face directory (config.json, safetensors weights,
// tokenizer.json), and LoadModel, which picks GGUF or safetensors by what a path is.
//
// HF checkpoints keep q/k rows in rotate_half order, so the config says rope_neox = true and the
// rows are used as stored (the GGUF path instead has llama.cpp's interleaved rows and rope_neox =
// false). F32/F16/BF16 matrices view the mapping unless dequantize_to_f32 asks for fp32 copies or
// the data is not aligned to its element size.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/model_loader.h"
#include "engine/model/safetensors.h"

namespace deft {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

bool IsFloatDtype(SafetensorsDtype dtype) {
  return dtype == SafetensorsDtype::kF32 || dtype == SafetensorsDtype::kF16 ||
         dtype == SafetensorsDtype::kBF16;
}

// Converts `n` elements of a float dtype at `src` (any alignment) to fp32.
void ToF32(SafetensorsDtype dtype, const uint8_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == SafetensorsDtype::kF32) {
      std::memcpy(&dst[i], src + 4 * i, 4);
      continue;
    }
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = dtype == SafetensorsDtype::kF16 ? Fp16ToFp32(h) : Bf16ToFp32(h);
  }
}

// Builds LlamaWeights from checkpoint tensors, checking each tensor's dtype and shape.
class WeightBuilder {
 public:
  WeightBuilder(const SafetensorsCheckpoint& ckpt, const LoadOptions& options,
                LlamaWeights& weights)
      : ckpt_(ckpt), options_(options), weights_(weights) {}

  absl::Status Matrix(const std::string& name, int64_t rows, int64_t cols, WeightMatrix* out) {
    absl::StatusOr<const SafetensorsTensor*> t = Get(name, {rows, cols});
    if (!t.ok()) return t.status();
    const SafetensorsTensor& tensor = **t;
    const size_t elem = SafetensorsDtypeSize(tensor.dtype);
    out->rows = rows;
    out->cols = cols;
    if (options_.dequantize_to_f32 && tensor.dtype != SafetensorsDtype::kF32) {
      out->type = GgmlType::kF32;
      out->row_bytes = static_cast<size_t>(cols) * 4;
      uint8_t* dst = Own(static_cast<size_t>(rows) * out->row_bytes);
      ToF32(tensor.dtype, tensor.data, reinterpret_cast<float*>(dst), rows * cols);
      out->data = dst;
      return absl::OkStatus();
    }
    out->type = tensor.dtype == SafetensorsDtype::kF32   ? GgmlType::kF32
                : tensor.dtype == SafetensorsDtype::kF16 ? GgmlType::kF16
                                                         : GgmlType::kBF16;
    out->row_bytes = static_cast<size_t>(cols) * elem;
    // The data section starts wherever the header ends, so a writer that does not pad the
    // header can leave tensors misaligned for their element type; those get an aligned copy.
    if (reinterpret_cast<uintptr_t>(tensor.data) % elem == 0) {
      out->data = tensor.data;
    } else {
      uint8_t* dst = Own(tensor.nbytes());
      std::memcpy(dst, tensor.data, tensor.nbytes());
      out->data = dst;
    }
    return absl::OkStatus();
  }

  absl::Status Vector(const std::string& name, int64_t n, std::vector<float>* out) {
    absl::StatusOr<const SafetensorsTensor*> t = Get(name, {n});
    if (!t.ok()) return t.status();
    out->resize(n);
    ToF32((*t)->dtype, (*t)->data, out->data(), n);
    return absl::OkStatus();
  }

 private:
  absl::StatusOr<const SafetensorsTensor*> Get(const std::string& name,
                                               const std::vector<int64_t>& shape) {
    absl::StatusOr<const SafetensorsTensor*> t = ckpt_.Get(name);
    if (!t.ok()) return t.status();
    const SafetensorsTensor& tensor = **t;
    const std::string where = absl::StrCat(ckpt_.FileOf(tensor), ": tensor '", name, "': ");
    if (!IsFloatDtype(tensor.dtype)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "dtype ", std::string(SafetensorsDtypeName(tensor.dtype)),
                       " unsupported (F32, F16 or BF16)"));
    }
    if (tensor.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(where, "shape ", ShapeString(tensor.shape),
                                                     " where ", ShapeString(shape), " expected"));
    }
    return &tensor;
  }

  uint8_t* Own(size_t bytes) {
    weights_.owned.push_back(std::make_unique<uint8_t[]>(bytes));
    return weights_.owned.back().get();
  }

  const SafetensorsCheckpoint& ckpt_;
  const LoadOptions& options_;
  LlamaWeights& weights_;
};

absl::Status LoadWeights(const SafetensorsCheckpoint& ckpt, const LlamaConfig& c,
                         const LoadOptions& options, LlamaWeights& w) {
  WeightBuilder b(ckpt, options, w);
  const int64_t q_rows = c.num_heads * c.head_dim;
  const int64_t kv_rows = c.num_kv_heads * c.head_dim;
  if (absl::Status s = b.Matrix("model.embed_tokens.weight", c.vocab_size, c.hidden, &w.token_embd);
      !s.ok()) {
    return s;
  }
  w.layers.resize(c.num_layers);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    LlamaLayerWeights& l = w.layers[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    for (absl::Status s : {
             b.Vector(p + "input_layernorm.weight", c.hidden, &l.attn_norm),
             b.Matrix(p + "self_attn.q_proj.weight", q_rows, c.hidden, &l.wq),
             b.Matrix(p + "self_attn.k_proj.weight", kv_rows, c.hidden, &l.wk),
             b.Matrix(p + "self_attn.v_proj.weight", kv_rows, c.hidden, &l.wv),
             b.Matrix(p + "self_attn.o_proj.weight", c.hidden, q_rows, &l.wo),
             b.Vector(p + "post_attention_layernorm.weight", c.hidden, &l.ffn_norm),
             b.Matrix(p + "mlp.gate_proj.weight", c.ffn_hidden, c.hidden, &l.w_gate),
             b.Matrix(p + "mlp.up_proj.weight", c.ffn_hidden, c.hidden, &l.w_up),
             b.Matrix(p + "mlp.down_proj.weight", c.hidden, c.ffn_hidden, &l.w_down),
         }) {
      if (!s.ok()) return s;
    }
  }
  if (absl::Status s = b.Vector("model.norm.weight", c.hidden, &w.output_norm); !s.ok()) return s;
  // Tied checkpoints may still store lm_head.weight (a copy); the config decides.
  if (c.tied_embeddings) {
    w.output = w.token_embd;
    return absl::OkStatus();
  }
  return b.Matrix("lm_head.weight", c.vocab_size, c.hidden, &w.output);
}

}  // namespace

absl::StatusOr<std::unique_ptr<LoadedModel>> LoadSafetensorsModel(const std::string& dir,
                                                                  const LoadOptions& options) {
  const std::string config_path = dir + "/config.json";
  std::ifstream config_in(config_path, std::ios::binary);
  if (!config_in) {
    return absl::NotFoundError(
        absl::StrCat(config_path, ": missing (not a Hugging Face model directory?)"));
  }
  std::ostringstream config_text;
  config_text << config_in.rdbuf();

  auto model = std::make_unique<LoadedModel>();
  model->source = dir;
  absl::StatusOr<LlamaConfig> config = LlamaConfigFromHfJson(config_text.str(), config_path);
  if (!config.ok()) return config.status();
  model->config = std::move(*config);
  if (model->config.name.empty()) {
    model->config.name = std::filesystem::path(dir).filename().string();
  }

  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt = SafetensorsCheckpoint::Open(dir);
  if (!ckpt.ok()) return ckpt.status();
  if (absl::Status s = LoadWeights(**ckpt, model->config, options, model->weights); !s.ok()) {
    return s;
  }
  for (const std::shared_ptr<const SafetensorsFile>& file : (*ckpt)->files()) {
    model->weights.keep_alive.push_back(file);
  }

  const std::string tokenizer_path = dir + "/tokenizer.json";
  const std::string tokenizer_config_path = dir + "/tokenizer_config.json";
  if (!std::filesystem::is_regular_file(tokenizer_path)) {
    return absl::NotFoundError(absl::StrCat(tokenizer_path, ": missing"));
  }
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromTokenizerJson(
      tokenizer_path, std::filesystem::is_regular_file(tokenizer_config_path)
                          ? tokenizer_config_path
                          : std::string());
  if (!tokenizer.ok()) return tokenizer.status();
  model->tokenizer = std::move(*tokenizer);
  // Ids past the embedding would index outside it; HF vocab_size may exceed the tokenizer's.
  if (model->tokenizer->vocab_size() > model->config.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(tokenizer_path, ": ", model->tokenizer->vocab_size(),
                     " tokens but config.json's ", "vocab_size is ", model->config.vocab_size));
  }
  if (absl::Status s = ValidateWeights(model->config, model->weights); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(dir, ": ", s.message()));
  }
  return model;
}

absl::StatusOr<std::unique_ptr<LoadedModel>> LoadModel(const std::string& path,
                                                       const LoadOptions& options) {
  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  if (st.type() == std::filesystem::file_type::directory) {
    return LoadSafetensorsModel(path, options);
  }
  if (st.type() == std::filesystem::file_type::regular) return LoadGgufModel(path, options);
  if (st.type() == std::filesystem::file_type::not_found) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": neither a GGUF file nor a model directory"));
}

}  // namespace deft
