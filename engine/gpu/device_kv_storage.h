// KV pool storage in device memory (KvStorage, engine/kv/kv_storage.h), fp16 or bf16, laid out
// per layer as the tree attention kernel reads it: K of layer l is [slot][kv_head][head_dim] at
// k(l), V likewise at v(l); the 2 * num_layers arrays follow each other (K0, V0, K1, V1, ...).
// Copies run on the backend's stream, in order with its steps.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "engine/gpu/cuda_util.h"
#include "engine/kv/kv_block_pool.h"
#include "kernels/model/dtype.h"

namespace deft::gpu {

class DeviceKvStorage : public KvStorage {
 public:
  // Zero-filled; RESOURCE_EXHAUSTED when it does not fit.
  static absl::StatusOr<std::unique_ptr<DeviceKvStorage>> Create(const KvPoolShape& shape,
                                                                 int64_t num_blocks,
                                                                 kernels::Dtype dtype,
                                                                 cudaStream_t stream);
  // Bytes of one block (all layers, K and V).
  static int64_t BlockBytes(const KvPoolShape& shape, kernels::Dtype dtype);

  absl::Status CopyBlock(int32_t src, int32_t dst) override;
  absl::Status CopySlots(std::span<const int32_t> src, std::span<const int32_t> dst) override;
  int64_t bytes_per_token() const override;

  kernels::Dtype dtype() const { return dtype_; }
  void* k(int64_t layer) const { return Array(2 * layer); }
  void* v(int64_t layer) const { return Array(2 * layer + 1); }
  int64_t slot_stride() const { return kv_dim_; }  // elements between slots

 private:
  DeviceKvStorage() = default;
  void* Array(int64_t a) const {
    return data_.as<uint8_t>() + a * slots_ * kv_dim_ * kernels::DtypeBytes(dtype_);
  }
  absl::Status CopyRows(std::span<const int32_t> src, std::span<const int32_t> dst,
                        int64_t row_elems);
  KvPoolShape shape_;
  kernels::Dtype dtype_ = kernels::Dtype::kBFloat16;
  int64_t slots_ = 0;
  int64_t kv_dim_ = 0;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer data_;
  DeviceBuffer pairs_;  // src rows then dst rows of a copy
};

}  // namespace deft::gpu
