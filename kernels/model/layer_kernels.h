// The non-attention kernels of a Llama step on the GPU: embedding gather, RMSNorm, RoPE fused
// with writing K/V into the paged KV pool, SwiGLU, and copies within the pool. One params struct
// per kernel, passed by value; every launcher returns the launch's cudaError_t
// (cudaErrorInvalidValue for an unsupported dtype or shape) and runs on `stream`.
//
// Precision: the residual stream is fp32; activations that feed a GEMM or the attention kernel
// are T (fp16 or bf16); each kernel computes in fp32 and rounds once (to nearest even) on store.
// The residual add is fused into the GEMMs (cuBLASLt beta = 1 on the fp32 stream, gemm.h), so
// RMSNorm is a single pass: read x, write the normalized T rows.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/model/dtype.h"

namespace deft::kernels {

// out[r, :] = float(table[tokens[r], :]) (exact). table: T [vocab, hidden]; out: fp32 [rows,
// hidden]. Token ids must be in [0, vocab) (the engine validates them).
struct EmbeddingParams {
  const void* table = nullptr;
  Dtype dtype = Dtype::kBFloat16;
  const int32_t* tokens = nullptr;  // [rows]
  float* out = nullptr;
  int32_t rows = 0;
  int32_t hidden = 0;
};
cudaError_t LaunchEmbedding(const EmbeddingParams& p, cudaStream_t stream);

// out[r, :] = x[src, :] / rms(x[src, :]) * weight, src = rows ? rows[r] : r (HF LlamaRMSNorm:
// fp32 math, scale = 1 / sqrt(mean(x^2) + eps)). x: fp32 [*, hidden]; out: T [num_rows, hidden].
struct RmsNormParams {
  const float* x = nullptr;
  const int32_t* rows = nullptr;  // optional gather of input rows (the logit rows)
  const float* weight = nullptr;  // [hidden]
  void* out = nullptr;
  Dtype dtype = Dtype::kBFloat16;
  int32_t num_rows = 0;
  int32_t hidden = 0;
  float eps = 1e-5f;
};
cudaError_t LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream);

// out[r, j] = silu(g) * u with g = gate_up[r, j], u = gate_up[r, ffn + j] (fp32 math).
// gate_up: T [rows, 2 * ffn]; out: T [rows, ffn].
struct SwigluParams {
  const void* gate_up = nullptr;
  void* out = nullptr;
  Dtype dtype = Dtype::kBFloat16;
  int32_t rows = 0;
  int32_t ffn = 0;
};
cudaError_t LaunchSwiglu(const SwigluParams& p, cudaStream_t stream);

// RoPE on a step's Q and K and the step's K/V appended to one layer of the paged pool, in one
// launch. Row r of qkv holds num_heads Q heads, then num_kv_heads K heads, then num_kv_heads V
// heads (head_dim each, the fused QKV projection's output), at positions[r]. Rotation: for pair
// i < rope_dim / 2, angle = (pos / linear_scale) * inv_freq[i] in fp64 (positions reach 1e5,
// where an fp32 angle would be off by 1e-2 rad), cos/sin rounded to fp32, then
// (a, b) -> (a cos - b sin, a sin + b cos) with a, b = (2i, 2i+1) ("normal" GGML rope) or
// (i, i + rope_dim/2) (neox); dims past rope_dim pass unchanged. Outputs: rotated Q to q_out
// [num_rows, num_heads, head_dim]; for rows with slots[r] >= 0, rotated K to k_pool[slots[r]]
// and V copied exactly to v_pool[slots[r]] (pool layer layout [slot][num_kv_heads * head_dim]);
// slot -1 is a query-only token whose K/V the pool holds already. Distinct rows must name
// distinct slots. (Three launches before: Q rope, K rope in place, append: 0.41 ms a
// Llama-3-8B step.)
struct RopeKvAppendParams {
  const void* qkv = nullptr;
  int64_t qkv_row_stride = 0;  // elements between rows of qkv
  void* q_out = nullptr;
  void* k_pool = nullptr;
  void* v_pool = nullptr;
  const int32_t* slots = nullptr;      // [num_rows]
  const int64_t* positions = nullptr;  // [num_rows]
  const double* inv_freq = nullptr;    // [rope_dim / 2]
  double linear_scale = 1.0;
  Dtype dtype = Dtype::kBFloat16;
  int32_t num_rows = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t rope_dim = 0;
  bool neox = false;
};
cudaError_t LaunchRopeKvAppend(const RopeKvAppendParams& p, cudaStream_t stream);

// Copies rows between places of `num_arrays` arrays (exact): for each pair i and each array a,
// base[a * array_stride + dst_rows[i] * row_elems + j] = base[a * array_stride + src_rows[i] *
// row_elems + j] for j < row_elems (elements of `dtype`). In the KV pool the arrays are the
// 2 * num_layers K and V arrays; a row is a block (copy-on-write) or a slot (keeping accepted
// draft tokens). Destinations must not overlap sources or each other.
struct CopyRowsParams {
  void* base = nullptr;
  Dtype dtype = Dtype::kBFloat16;
  int32_t num_arrays = 0;
  int64_t array_stride = 0;
  int64_t row_elems = 0;
  const int32_t* src_rows = nullptr;  // [num_pairs], device
  const int32_t* dst_rows = nullptr;  // [num_pairs], device
  int32_t num_pairs = 0;
};
cudaError_t LaunchCopyRows(const CopyRowsParams& p, cudaStream_t stream);

}  // namespace deft::kernels
