// LoadGgufModel: a Llama-family GGUF file -> LoadedModel. Matrices view the file's mapping (no
// copy) unless LoadOptions::dequantize_to_f32 asks for fp32 copies.
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/gguf/gguf_file.h"
#include "engine/model/model_loader.h"

namespace deft {
namespace {

absl::Status Annotate(const absl::Status& s, const std::string& path) {
  return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
}

// Reads `{arch}.{key}` as an integer; `fallback` < 0 means required.
absl::StatusOr<int64_t> ArchInt(const GgufFile& f, const std::string& arch, const char* key,
                                int64_t fallback = -1) {
  std::string full = absl::StrCat(arch, ".", key);
  if (f.Find(full) == nullptr && fallback >= 0) return fallback;
  return f.GetInt(full);
}

absl::StatusOr<double> ArchFloat(const GgufFile& f, const std::string& arch, const char* key,
                                 double fallback) {
  std::string full = absl::StrCat(arch, ".", key);
  if (f.Find(full) == nullptr) return fallback;
  return f.GetFloat(full);
}

absl::StatusOr<WeightMatrix> Matrix(const GgufFile& f, const std::string& name, int64_t rows,
                                    int64_t cols) {
  auto t = f.GetTensor(name);
  if (!t.ok()) return t.status();
  const GgufTensor& tensor = **t;
  if (tensor.dims.size() != 2 || tensor.dims[0] != cols || tensor.dims[1] != rows) {
    std::string dims;
    for (size_t i = 0; i < tensor.dims.size(); ++i)
      absl::StrAppend(&dims, i ? ", " : "", tensor.dims[i]);
    return absl::InvalidArgumentError(absl::StrFormat(
        "tensor '%s' has dims [%s], expected [%d, %d] (ggml order)", name, dims, cols, rows));
  }
  WeightMatrix m;
  m.type = tensor.type;
  m.rows = rows;
  m.cols = cols;
  m.row_bytes = RowBytes(tensor.type, cols);
  m.data = tensor.data;
  return m;
}

absl::StatusOr<std::vector<float>> Vector(const GgufFile& f, const std::string& name, int64_t n) {
  auto t = f.GetTensor(name);
  if (!t.ok()) return t.status();
  const GgufTensor& tensor = **t;
  if (tensor.elements() != n || tensor.dims[0] != n) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tensor '%s' has %d elements, expected %d", name, tensor.elements(), n));
  }
  std::vector<float> v(static_cast<size_t>(n));
  DequantizeRow(tensor.type, tensor.data, v.data(), n);
  return v;
}

// Replaces m's data with an fp32 copy owned by `weights`.
void DequantizeToF32(WeightMatrix& m, LlamaWeights& weights) {
  if (m.type == GgmlType::kF32) return;
  auto buf = std::make_unique<uint8_t[]>(static_cast<size_t>(m.rows * m.cols) * sizeof(float));
  float* out = reinterpret_cast<float*>(buf.get());
  const int64_t rows = m.rows;
  const unsigned nt = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> threads;
  for (unsigned i = 0; i < nt; ++i) {
    threads.emplace_back([&, i] {
      for (int64_t r = i; r < rows; r += nt)
        DequantizeRow(m.type, m.row(r), out + r * m.cols, m.cols);
    });
  }
  for (auto& t : threads) t.join();
  m.type = GgmlType::kF32;
  m.row_bytes = static_cast<size_t>(m.cols) * sizeof(float);
  m.data = buf.get();
  weights.owned.push_back(std::move(buf));
}

absl::StatusOr<LlamaConfig> ReadConfig(const GgufFile& f) {
  LlamaConfig c;
  auto arch = f.GetString("general.architecture");
  if (!arch.ok()) return arch.status();
  if (*arch != "llama" && *arch != "mistral") {
    return absl::UnimplementedError(
        absl::StrCat("architecture '", *arch, "' is not supported (llama family only)"));
  }
  const std::string& a = *arch;
  c.architecture = a;
  if (f.Find("general.name")) c.name = f.GetString("general.name").value_or("");
#define DEFT_ASSIGN(lhs, expr)        \
  do {                                \
    auto _v = (expr);                 \
    if (!_v.ok()) return _v.status(); \
    lhs = *_v;                        \
  } while (0)
  DEFT_ASSIGN(c.num_layers, ArchInt(f, a, "block_count"));
  DEFT_ASSIGN(c.hidden, ArchInt(f, a, "embedding_length"));
  DEFT_ASSIGN(c.ffn_hidden, ArchInt(f, a, "feed_forward_length"));
  DEFT_ASSIGN(c.num_heads, ArchInt(f, a, "attention.head_count"));
  DEFT_ASSIGN(c.num_kv_heads, ArchInt(f, a, "attention.head_count_kv", c.num_heads));
  DEFT_ASSIGN(c.context_length, ArchInt(f, a, "context_length", 2048));
  if (c.num_heads <= 0 || c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0 ||
      c.hidden <= 0 || c.num_layers <= 0 || c.ffn_hidden <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "inconsistent shape metadata: hidden=%d layers=%d heads=%d kv_heads=%d ffn=%d", c.hidden,
        c.num_layers, c.num_heads, c.num_kv_heads, c.ffn_hidden));
  }
  DEFT_ASSIGN(c.head_dim, ArchInt(f, a, "attention.key_length", c.hidden / c.num_heads));
  DEFT_ASSIGN(c.rope_dim, ArchInt(f, a, "rope.dimension_count", c.head_dim));
  if (c.head_dim <= 0 || c.head_dim % 2 != 0 || c.rope_dim <= 0 || c.rope_dim > c.head_dim ||
      c.rope_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("bad head/rope dims: head_dim=%d rope_dim=%d", c.head_dim, c.rope_dim));
  }
  double eps, theta;
  DEFT_ASSIGN(eps, ArchFloat(f, a, "attention.layer_norm_rms_epsilon", 1e-5));
  DEFT_ASSIGN(theta, ArchFloat(f, a, "rope.freq_base", 10000.0));
  c.rms_eps = static_cast<float>(eps);
  c.rope_theta = static_cast<float>(theta);
  if (const GgufValue* v = f.Find(absl::StrCat(a, ".rope.scaling.type"))) {
    (void)v;
    std::string type = f.GetString(absl::StrCat(a, ".rope.scaling.type")).value_or("");
    if (type == "linear") {
      double factor;
      DEFT_ASSIGN(factor, ArchFloat(f, a, "rope.scaling.factor", 1.0));
      c.rope_linear_scale = static_cast<float>(factor);
    } else if (!type.empty() && type != "none") {
      return absl::UnimplementedError(absl::StrCat("rope scaling type '", type, "'"));
    }
  }
#undef DEFT_ASSIGN
  c.rope_neox = false;  // llama.cpp permutes Q/K rows of Llama checkpoints for GGML's normal rope
  return c;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LoadedModel>> LoadGgufModel(const std::string& path,
                                                           const LoadOptions& options) {
  auto opened = GgufFile::Open(path);
  if (!opened.ok()) return opened.status();
  std::shared_ptr<const GgufFile> file(std::move(*opened));
  const GgufFile& f = *file;

  auto model = std::make_unique<LoadedModel>();
  model->source = path;
  auto config = ReadConfig(f);
  if (!config.ok()) return Annotate(config.status(), path);
  LlamaConfig& c = model->config = *config;
  LlamaWeights& w = model->weights;
  w.keep_alive.push_back(file);

  const GgufTensor* embd = f.FindTensor("token_embd.weight");
  if (embd == nullptr)
    return Annotate(absl::NotFoundError("missing tensor 'token_embd.weight'"), path);
  if (embd->dims.size() != 2) {
    return Annotate(absl::InvalidArgumentError("tensor 'token_embd.weight' is not 2-D"), path);
  }
  c.vocab_size = embd->dims[1];
  const int64_t q_dim = c.num_heads * c.head_dim, kv_dim = c.num_kv_heads * c.head_dim;

  absl::Status status;
  auto take = [&](auto result, auto& out) {
    if (!status.ok()) return;
    if (!result.ok()) {
      status = result.status();
      return;
    }
    out = std::move(*result);
  };
  take(Matrix(f, "token_embd.weight", c.vocab_size, c.hidden), w.token_embd);
  take(Vector(f, "output_norm.weight", c.hidden), w.output_norm);
  if (f.FindTensor("output.weight") != nullptr) {
    take(Matrix(f, "output.weight", c.vocab_size, c.hidden), w.output);
  } else {
    c.tied_embeddings = true;
  }
  if (const GgufTensor* rf = f.FindTensor("rope_freqs.weight")) {
    take(Vector(f, "rope_freqs.weight", c.rope_dim / 2), c.rope_freq_factors);
    (void)rf;
  }
  w.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers && status.ok(); ++l) {
    LlamaLayerWeights& L = w.layers[l];
    auto n = [l](const char* what) { return absl::StrCat("blk.", l, ".", what, ".weight"); };
    take(Vector(f, n("attn_norm"), c.hidden), L.attn_norm);
    take(Matrix(f, n("attn_q"), q_dim, c.hidden), L.wq);
    take(Matrix(f, n("attn_k"), kv_dim, c.hidden), L.wk);
    take(Matrix(f, n("attn_v"), kv_dim, c.hidden), L.wv);
    take(Matrix(f, n("attn_output"), c.hidden, q_dim), L.wo);
    take(Vector(f, n("ffn_norm"), c.hidden), L.ffn_norm);
    take(Matrix(f, n("ffn_gate"), c.ffn_hidden, c.hidden), L.w_gate);
    take(Matrix(f, n("ffn_up"), c.ffn_hidden, c.hidden), L.w_up);
    take(Matrix(f, n("ffn_down"), c.hidden, c.ffn_hidden), L.w_down);
  }
  if (!status.ok()) return Annotate(status, path);

  if (options.dequantize_to_f32) {
    DequantizeToF32(w.token_embd, w);
    if (!c.tied_embeddings) DequantizeToF32(w.output, w);
    for (auto& L : w.layers) {
      for (WeightMatrix* m : {&L.wq, &L.wk, &L.wv, &L.wo, &L.w_gate, &L.w_up, &L.w_down}) {
        DequantizeToF32(*m, w);
      }
    }
  }
  if (c.tied_embeddings) w.output = w.token_embd;
  if (absl::Status s = ValidateWeights(c, w); !s.ok()) return Annotate(s, path);

  auto tokenizer = Tokenizer::FromGguf(f);
  if (!tokenizer.ok()) return Annotate(tokenizer.status(), path);
  model->tokenizer = std::move(*tokenizer);
  if (model->tokenizer->vocab_size() > c.vocab_size) {
    return Annotate(absl::InvalidArgumentError(
                        absl::StrFormat("tokenizer has %d tokens but the embedding only %d rows",
                                        model->tokenizer->vocab_size(), c.vocab_size)),
                    path);
  }
  return model;
}

absl::Status ValidateWeights(const LlamaConfig& c, const LlamaWeights& w) {
  const int64_t q_dim = c.num_heads * c.head_dim, kv_dim = c.num_kv_heads * c.head_dim;
  auto check = [](const WeightMatrix& m, const std::string& name, int64_t rows,
                  int64_t cols) -> absl::Status {
    const GgmlTypeTraits* traits = GetTypeTraits(static_cast<uint32_t>(m.type));
    if (traits == nullptr) {
      return absl::UnimplementedError(
          absl::StrCat(name, ": unsupported tensor type ", static_cast<uint32_t>(m.type)));
    }
    if (m.rows != rows || m.cols != cols) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: shape [%d, %d], expected [%d, %d]",
                                                        name, m.rows, m.cols, rows, cols));
    }
    if (m.data == nullptr || cols % traits->block_elems != 0 ||
        m.row_bytes != RowBytes(m.type, cols)) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": bad row layout"));
    }
    return absl::OkStatus();
  };
  auto check_vec = [](const std::vector<float>& v, const std::string& name,
                      int64_t n) -> absl::Status {
    if (static_cast<int64_t>(v.size()) != n) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: %d elements, expected %d", name, v.size(), n));
    }
    return absl::OkStatus();
  };
  absl::Status s;
  auto upd = [&s](absl::Status t) {
    if (s.ok()) s = std::move(t);
  };
  upd(check(w.token_embd, "token embedding", c.vocab_size, c.hidden));
  upd(check(w.output, "output head", c.vocab_size, c.hidden));
  upd(check_vec(w.output_norm, "output norm", c.hidden));
  if (static_cast<int64_t>(w.layers.size()) != c.num_layers) {
    upd(absl::InvalidArgumentError(
        absl::StrFormat("%d layers of weights, config says %d", w.layers.size(), c.num_layers)));
  }
  for (size_t l = 0; l < w.layers.size() && s.ok(); ++l) {
    const LlamaLayerWeights& L = w.layers[l];
    std::string p = absl::StrCat("layer ", l, " ");
    upd(check_vec(L.attn_norm, p + "attn_norm", c.hidden));
    upd(check_vec(L.ffn_norm, p + "ffn_norm", c.hidden));
    upd(check(L.wq, p + "wq", q_dim, c.hidden));
    upd(check(L.wk, p + "wk", kv_dim, c.hidden));
    upd(check(L.wv, p + "wv", kv_dim, c.hidden));
    upd(check(L.wo, p + "wo", c.hidden, q_dim));
    upd(check(L.w_gate, p + "w_gate", c.ffn_hidden, c.hidden));
    upd(check(L.w_up, p + "w_up", c.ffn_hidden, c.hidden));
    upd(check(L.w_down, p + "w_down", c.hidden, c.ffn_hidden));
  }
  if (!c.rope_freq_factors.empty() &&
      static_cast<int64_t>(c.rope_freq_factors.size()) != c.rope_dim / 2) {
    upd(absl::InvalidArgumentError("rope frequency factors: wrong length"));
  }
  return s;
}

}  // namespace deft
