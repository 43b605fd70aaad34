// A Llama model's weights in device memory, in the layout the GPU step uses: per layer the Q, K
// and V projections fused into one [(heads + 2 kv_heads) * head_dim, hidden] matrix and gate/up
// into one [2 * ffn, hidden] matrix (one GEMM each), every matrix in the activation dtype
// (fp16/bf16), norm weights fp32. One device allocation holds them all.
//
// Sources: a loaded model (any GGML type the device dequantizer reads, converted at load on the
// device) or a synthetic spec (values generated on the device, identical to
// MakeSyntheticModel's host copy; no host copy of the weights exists).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/gpu/cuda_util.h"
#include "engine/model/llama_config.h"
#include "engine/model/llama_weights.h"
#include "engine/model/synthetic_model.h"
#include "kernels/model/dtype.h"

namespace deft::gpu {

struct DeviceLayerWeights {
  const float* attn_norm = nullptr;  // [hidden]
  const void* wqkv = nullptr;        // [q_dim + 2 * kv_dim, hidden]
  const void* wo = nullptr;          // [hidden, q_dim]
  const float* ffn_norm = nullptr;   // [hidden]
  const void* w_gate_up = nullptr;   // [2 * ffn, hidden]: gate rows, then up rows
  const void* w_down = nullptr;      // [hidden, ffn]
};

class DeviceWeights {
 public:
  // INVALID_ARGUMENT for a matrix type the device cannot dequantize; RESOURCE_EXHAUSTED when the
  // weights do not fit. Work is queued on `stream` and finished before returning.
  static absl::StatusOr<std::unique_ptr<DeviceWeights>> Upload(const LlamaConfig& config,
                                                               const LlamaWeights& weights,
                                                               kernels::Dtype dtype,
                                                               cudaStream_t stream);
  static absl::StatusOr<std::unique_ptr<DeviceWeights>> Synthetic(const SyntheticModelSpec& spec,
                                                                  cudaStream_t stream);

  kernels::Dtype dtype() const { return dtype_; }
  const DeviceLayerWeights& layer(int64_t l) const { return layers_[l]; }
  const void* token_embd() const { return token_embd_; }  // [vocab, hidden]
  const float* output_norm() const { return output_norm_; }
  const void* output() const { return output_; }  // [vocab, hidden]
  size_t bytes() const { return storage_.bytes(); }

 private:
  // Carves every tensor out of one allocation (tied: the output head shares token_embd).
  absl::Status Allocate(const LlamaConfig& c, bool tied);
  kernels::Dtype dtype_ = kernels::Dtype::kBFloat16;
  DeviceBuffer storage_;
  std::vector<DeviceLayerWeights> layers_;
  const void* token_embd_ = nullptr;
  const float* output_norm_ = nullptr;
  const void* output_ = nullptr;
};

}  // namespace deft::gpu
