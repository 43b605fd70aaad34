#include "engine/model/synthetic_model.h"

#include <cmath>
#include <new>

#include "absl/strings/str_cat.h"
#include "kernels/model/synthetic_values.h"

namespace deft {
namespace {

LlamaConfig Llama3Family(std::string name) {
  LlamaConfig c;
  c.architecture = "llama";
  c.name = std::move(name);
  c.rms_eps = 1e-5f;
  c.rope_theta = 500000.f;
  c.context_length = 8192;
  c.rope_neox = false;
  return c;
}

LlamaConfig Llama3_8B() {
  LlamaConfig c = Llama3Family("synthetic:llama3-8b");
  c.num_layers = 32;
  c.hidden = 4096;
  c.num_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.ffn_hidden = 14336;
  c.vocab_size = 128256;
  c.rope_dim = 128;
  return c;
}

LlamaConfig Tiny() {
  LlamaConfig c = Llama3Family("synthetic:tiny");
  c.num_layers = 4;
  c.hidden = 1024;
  c.num_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 128;
  c.ffn_hidden = 2816;
  c.vocab_size = 8192;
  c.rope_dim = 128;
  return c;
}

// [rows, cols] of `tensor` in `c` (norms: [1, hidden]).
void TensorShape(const LlamaConfig& c, SyntheticTensor t, int64_t* rows, int64_t* cols) {
  const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  switch (t) {
    case SyntheticTensor::kTokenEmbd:
    case SyntheticTensor::kOutput:
      *rows = c.vocab_size, *cols = c.hidden;
      return;
    case SyntheticTensor::kOutputNorm:
    case SyntheticTensor::kAttnNorm:
    case SyntheticTensor::kFfnNorm:
      *rows = 1, *cols = c.hidden;
      return;
    case SyntheticTensor::kWq:
      *rows = q, *cols = c.hidden;
      return;
    case SyntheticTensor::kWk:
    case SyntheticTensor::kWv:
      *rows = kv, *cols = c.hidden;
      return;
    case SyntheticTensor::kWo:
      *rows = c.hidden, *cols = q;
      return;
    case SyntheticTensor::kGate:
    case SyntheticTensor::kUp:
      *rows = c.ffn_hidden, *cols = c.hidden;
      return;
    case SyntheticTensor::kDown:
      *rows = c.hidden, *cols = c.ffn_hidden;
      return;
  }
}

}  // namespace

bool IsSyntheticModelName(std::string_view name) { return name.starts_with(kSyntheticPrefix); }

absl::StatusOr<SyntheticModelSpec> SyntheticSpecFromName(std::string_view name) {
  SyntheticModelSpec spec;
  const std::string full(name);
  if (!IsSyntheticModelName(name)) {
    return absl::InvalidArgumentError(absl::StrCat("not a synthetic model name: ", full));
  }
  std::string_view rest = name.substr(kSyntheticPrefix.size());
  if (rest.ends_with(":f16")) {
    spec.dtype = GgmlType::kF16;
    rest.remove_suffix(4);
  }
  if (rest == "llama3-8b") {
    spec.config = Llama3_8B();
  } else if (rest == "tiny") {
    spec.config = Tiny();
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown synthetic model \"", full, "\" (known: synthetic:llama3-8b, synthetic:tiny)"));
  }
  return spec;
}

SyntheticTensorParams GetSyntheticTensorParams(const SyntheticModelSpec& spec,
                                               SyntheticTensor tensor, int64_t layer) {
  const bool global = tensor == SyntheticTensor::kTokenEmbd ||
                      tensor == SyntheticTensor::kOutputNorm || tensor == SyntheticTensor::kOutput;
  const uint64_t id =
      (global ? 0 : static_cast<uint64_t>(layer + 1)) * 64 + static_cast<uint64_t>(tensor);
  const uint64_t seed = kernels::SyntheticMix(spec.seed ^ kernels::SyntheticMix(id));
  int64_t rows = 0, cols = 0;
  TensorShape(spec.config, tensor, &rows, &cols);
  switch (tensor) {
    case SyntheticTensor::kTokenEmbd:
      return {seed, 1.f, 0.f};
    case SyntheticTensor::kOutputNorm:
    case SyntheticTensor::kAttnNorm:
    case SyntheticTensor::kFfnNorm:
      return {seed, 0.1f, 1.f};
    case SyntheticTensor::kOutput:
      return {seed,
              static_cast<float>(spec.logit_scale * std::sqrt(3.0 / static_cast<double>(cols))),
              0.f};
    default:
      return {seed, static_cast<float>(std::sqrt(3.0 / static_cast<double>(cols))), 0.f};
  }
}

absl::StatusOr<std::unique_ptr<LoadedModel>> MakeSyntheticModel(const SyntheticModelSpec& spec) {
  if (spec.dtype != GgmlType::kBF16 && spec.dtype != GgmlType::kF16) {
    return absl::InvalidArgumentError("synthetic weights are bf16 or f16");
  }
  auto m = std::make_unique<LoadedModel>();
  m->config = spec.config;
  m->source = spec.config.name;
  const LlamaConfig& c = m->config;
  LlamaWeights& w = m->weights;
  auto values = [&](SyntheticTensor t, int64_t layer, int64_t n, auto store) {
    const SyntheticTensorParams p = GetSyntheticTensorParams(spec, t, layer);
    for (int64_t i = 0; i < n; ++i) {
      store(i, kernels::SyntheticValue(p.seed, static_cast<uint64_t>(i), p.scale, p.offset));
    }
  };
  auto norm = [&](SyntheticTensor t, int64_t layer) {
    std::vector<float> v(static_cast<size_t>(c.hidden));
    values(t, layer, c.hidden, [&](int64_t i, float x) { v[i] = x; });
    return v;
  };
  auto matrix = [&](SyntheticTensor t, int64_t layer) -> absl::StatusOr<WeightMatrix> {
    WeightMatrix mat;
    TensorShape(c, t, &mat.rows, &mat.cols);
    mat.type = spec.dtype;
    mat.row_bytes = static_cast<size_t>(mat.cols) * 2;
    const int64_t n = mat.rows * mat.cols;
    std::unique_ptr<uint8_t[]> data(new (std::nothrow) uint8_t[static_cast<size_t>(n) * 2]);
    if (data == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate ", n * 2, " bytes of synthetic weights"));
    }
    auto* h = reinterpret_cast<uint16_t*>(data.get());
    const bool bf16 = spec.dtype == GgmlType::kBF16;
    values(t, layer, n, [&](int64_t i, float x) { h[i] = bf16 ? Fp32ToBf16(x) : Fp32ToFp16(x); });
    mat.data = data.get();
    w.owned.push_back(std::move(data));
    return mat;
  };
#define DEFT_SYNTH_MATRIX(dst, tensor, layer) \
  do {                                        \
    auto made = matrix(tensor, layer);        \
    if (!made.ok()) return made.status();     \
    dst = *made;                              \
  } while (0)
  DEFT_SYNTH_MATRIX(w.token_embd, SyntheticTensor::kTokenEmbd, 0);
  DEFT_SYNTH_MATRIX(w.output, SyntheticTensor::kOutput, 0);
  w.output_norm = norm(SyntheticTensor::kOutputNorm, 0);
  w.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LlamaLayerWeights& L = w.layers[l];
    L.attn_norm = norm(SyntheticTensor::kAttnNorm, l);
    L.ffn_norm = norm(SyntheticTensor::kFfnNorm, l);
    DEFT_SYNTH_MATRIX(L.wq, SyntheticTensor::kWq, l);
    DEFT_SYNTH_MATRIX(L.wk, SyntheticTensor::kWk, l);
    DEFT_SYNTH_MATRIX(L.wv, SyntheticTensor::kWv, l);
    DEFT_SYNTH_MATRIX(L.wo, SyntheticTensor::kWo, l);
    DEFT_SYNTH_MATRIX(L.w_gate, SyntheticTensor::kGate, l);
    DEFT_SYNTH_MATRIX(L.w_up, SyntheticTensor::kUp, l);
    DEFT_SYNTH_MATRIX(L.w_down, SyntheticTensor::kDown, l);
  }
#undef DEFT_SYNTH_MATRIX
  if (absl::Status s = ValidateWeights(c, w); !s.ok()) return s;
  return m;
}

}  // namespace deft
