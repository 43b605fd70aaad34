#include "engine/gpu/device_weights.h"

#include "absl/strings/str_cat.h"
#include "kernels/model/weight_kernels.h"

namespace deft::gpu {
namespace {

using kernels::Dtype;

constexpr size_t kAlign = 256;
size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Hands out aligned pieces of one region (first pass: base null, only counts).
struct Carver {
  uint8_t* base = nullptr;
  size_t used = 0;
  void* Take(size_t bytes) {
    void* p = base == nullptr ? nullptr : base + used;
    used += AlignUp(bytes);
    return p;
  }
};

}  // namespace

absl::Status DeviceWeights::Allocate(const LlamaConfig& c, bool tied) {
  const size_t e = kernels::DtypeBytes(dtype_);
  const size_t H = c.hidden, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  const size_t F = c.ffn_hidden, V = c.vocab_size;
  for (int pass = 0; pass < 2; ++pass) {
    Carver cv{pass == 0 ? nullptr : storage_.as<uint8_t>()};
    token_embd_ = cv.Take(V * H * e);
    output_ = tied ? token_embd_ : cv.Take(V * H * e);
    output_norm_ = static_cast<const float*>(cv.Take(H * 4));
    layers_.assign(static_cast<size_t>(c.num_layers), {});
    for (DeviceLayerWeights& L : layers_) {
      L.attn_norm = static_cast<const float*>(cv.Take(H * 4));
      L.ffn_norm = static_cast<const float*>(cv.Take(H * 4));
      L.wqkv = cv.Take((q + 2 * kv) * H * e);
      L.wo = cv.Take(H * q * e);
      L.w_gate_up = cv.Take(2 * F * H * e);
      L.w_down = cv.Take(H * F * e);
    }
    if (pass == 0) {
      if (absl::Status s = storage_.Reserve(cv.used); !s.ok()) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "model weights (", cv.used, " bytes) do not fit on the device: ", s.message()));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DeviceWeights>> DeviceWeights::Upload(const LlamaConfig& c,
                                                                     const LlamaWeights& w,
                                                                     Dtype dtype,
                                                                     cudaStream_t stream) {
  if (dtype == Dtype::kFloat32) return absl::InvalidArgumentError("weights are fp16 or bf16");
  std::unique_ptr<DeviceWeights> d(new DeviceWeights());
  d->dtype_ = dtype;
  const bool tied = w.output.data == w.token_embd.data;
  if (absl::Status s = d->Allocate(c, tied); !s.ok()) return s;
  DeviceBuffer staging;
  const size_t e = kernels::DtypeBytes(dtype);
  // Raw rows to the staging buffer, then dequantized into `dst` (stream order keeps the staging
  // buffer's reuse safe).
  auto matrix = [&](const WeightMatrix& m, const void* dst, const char* name) -> absl::Status {
    const int32_t type = static_cast<int32_t>(m.type);
    if (!kernels::GgmlTypeOnDevice(type)) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": GGML type ", std::string(GgmlTypeName(static_cast<uint32_t>(m.type))),
          " cannot be dequantized on the device"));
    }
    const size_t bytes = m.row_bytes * static_cast<size_t>(m.rows);
    if (absl::Status s = staging.Reserve(bytes); !s.ok()) return s;
    if (absl::Status s = CudaStatus(
            cudaMemcpyAsync(staging.get(), m.data, bytes, cudaMemcpyHostToDevice, stream),
            absl::StrCat("upload of ", name));
        !s.ok()) {
      return s;
    }
    kernels::DequantParams p{
        staging.as<uint8_t>(),  type, m.rows, m.cols, static_cast<int64_t>(m.row_bytes),
        const_cast<void*>(dst), dtype};
    return CudaStatus(kernels::LaunchDequant(p, stream), absl::StrCat("dequantize ", name));
  };
  auto vec = [&](const std::vector<float>& v, const float* dst) {
    return CudaStatus(cudaMemcpyAsync(const_cast<float*>(dst), v.data(), v.size() * 4,
                                      cudaMemcpyHostToDevice, stream),
                      "upload of a norm vector");
  };
  auto at_row = [&](const void* base, int64_t row, int64_t cols) {
    return static_cast<const uint8_t*>(base) + static_cast<size_t>(row * cols) * e;
  };
  const int64_t H = c.hidden, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  absl::Status s = matrix(w.token_embd, d->token_embd_, "token_embd");
  if (s.ok() && !tied) s = matrix(w.output, d->output_, "output");
  if (s.ok()) s = vec(w.output_norm, d->output_norm_);
  for (int64_t l = 0; s.ok() && l < c.num_layers; ++l) {
    const LlamaLayerWeights& L = w.layers[l];
    const DeviceLayerWeights& D = d->layers_[l];
    s = vec(L.attn_norm, D.attn_norm);
    if (s.ok()) s = vec(L.ffn_norm, D.ffn_norm);
    if (s.ok()) s = matrix(L.wq, D.wqkv, "wq");
    if (s.ok()) s = matrix(L.wk, at_row(D.wqkv, q, H), "wk");
    if (s.ok()) s = matrix(L.wv, at_row(D.wqkv, q + kv, H), "wv");
    if (s.ok()) s = matrix(L.wo, D.wo, "wo");
    if (s.ok()) s = matrix(L.w_gate, D.w_gate_up, "w_gate");
    if (s.ok()) s = matrix(L.w_up, at_row(D.w_gate_up, c.ffn_hidden, H), "w_up");
    if (s.ok()) s = matrix(L.w_down, D.w_down, "w_down");
  }
  if (absl::Status sync = CudaStatus(cudaStreamSynchronize(stream), "weight upload"); s.ok()) {
    s = sync;
  }
  if (!s.ok()) return s;
  return d;
}

absl::StatusOr<std::unique_ptr<DeviceWeights>> DeviceWeights::Synthetic(
    const SyntheticModelSpec& spec, cudaStream_t stream) {
  std::unique_ptr<DeviceWeights> d(new DeviceWeights());
  d->dtype_ = spec.dtype == GgmlType::kF16 ? Dtype::kFloat16 : Dtype::kBFloat16;
  const LlamaConfig& c = spec.config;
  if (absl::Status s = d->Allocate(c, /*tied=*/false); !s.ok()) return s;
  const int64_t H = c.hidden, q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  const int64_t F = c.ffn_hidden;
  const size_t e = kernels::DtypeBytes(d->dtype_);
  auto fill = [&](SyntheticTensor t, int64_t layer, const void* dst, int64_t n, bool fp32) {
    const SyntheticTensorParams p = GetSyntheticTensorParams(spec, t, layer);
    kernels::SyntheticFillParams f{
        const_cast<void*>(dst), fp32 ? Dtype::kFloat32 : d->dtype_, n, p.seed, p.scale, p.offset};
    return CudaStatus(kernels::LaunchSyntheticFill(f, stream), "synthetic weights");
  };
  auto at = [&](const void* base, int64_t elems) {
    return static_cast<const uint8_t*>(base) + static_cast<size_t>(elems) * e;
  };
  absl::Status s = fill(SyntheticTensor::kTokenEmbd, 0, d->token_embd_, c.vocab_size * H, false);
  if (s.ok()) s = fill(SyntheticTensor::kOutput, 0, d->output_, c.vocab_size * H, false);
  if (s.ok()) s = fill(SyntheticTensor::kOutputNorm, 0, d->output_norm_, H, true);
  for (int64_t l = 0; s.ok() && l < c.num_layers; ++l) {
    const DeviceLayerWeights& D = d->layers_[l];
    s = fill(SyntheticTensor::kAttnNorm, l, D.attn_norm, H, true);
    if (s.ok()) s = fill(SyntheticTensor::kFfnNorm, l, D.ffn_norm, H, true);
    if (s.ok()) s = fill(SyntheticTensor::kWq, l, D.wqkv, q * H, false);
    if (s.ok()) s = fill(SyntheticTensor::kWk, l, at(D.wqkv, q * H), kv * H, false);
    if (s.ok()) s = fill(SyntheticTensor::kWv, l, at(D.wqkv, (q + kv) * H), kv * H, false);
    if (s.ok()) s = fill(SyntheticTensor::kWo, l, D.wo, H * q, false);
    if (s.ok()) s = fill(SyntheticTensor::kGate, l, D.w_gate_up, F * H, false);
    if (s.ok()) s = fill(SyntheticTensor::kUp, l, at(D.w_gate_up, F * H), F * H, false);
    if (s.ok()) s = fill(SyntheticTensor::kDown, l, D.w_down, H * F, false);
  }
  if (absl::Status sync = CudaStatus(cudaStreamSynchronize(stream), "synthetic weights"); s.ok()) {
    s = sync;
  }
  if (!s.ok()) return s;
  return d;
}

}  // namespace deft::gpu
