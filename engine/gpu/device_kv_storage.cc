#include "engine/gpu/device_kv_storage.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/model/layer_kernels.h"

namespace deft::gpu {

int64_t DeviceKvStorage::BlockBytes(const KvPoolShape& shape, kernels::Dtype dtype) {
  return shape.num_layers * 2 * int64_t{shape.block_tokens} * shape.num_kv_heads * shape.head_dim *
         kernels::DtypeBytes(dtype);
}

absl::StatusOr<std::unique_ptr<DeviceKvStorage>> DeviceKvStorage::Create(const KvPoolShape& shape,
                                                                         int64_t num_blocks,
                                                                         kernels::Dtype dtype,
                                                                         cudaStream_t stream) {
  if (dtype == kernels::Dtype::kFloat32) {
    return absl::InvalidArgumentError("device KV storage is fp16 or bf16");
  }
  std::unique_ptr<DeviceKvStorage> s(new DeviceKvStorage());
  s->shape_ = shape;
  s->dtype_ = dtype;
  s->slots_ = num_blocks * shape.block_tokens;
  s->kv_dim_ = shape.num_kv_heads * shape.head_dim;
  s->stream_ = stream;
  const size_t bytes = static_cast<size_t>(BlockBytes(shape, dtype) * num_blocks);
  if (absl::Status st = s->data_.Reserve(bytes); !st.ok()) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate a device KV pool of ",
                                                     num_blocks, " blocks: ", st.message()));
  }
  if (absl::Status st = CudaStatus(cudaMemsetAsync(s->data_.get(), 0, bytes, stream),
                                   "zeroing the device KV pool");
      !st.ok()) {
    return st;
  }
  return s;
}

int64_t DeviceKvStorage::bytes_per_token() const {
  return shape_.num_layers * 2 * kv_dim_ * kernels::DtypeBytes(dtype_);
}

absl::Status DeviceKvStorage::CopyRows(std::span<const int32_t> src, std::span<const int32_t> dst,
                                       int64_t row_elems) {
  const size_t n = src.size();
  std::vector<int32_t> rows(src.begin(), src.end());
  rows.insert(rows.end(), dst.begin(), dst.end());
  if (absl::Status s = pairs_.Reserve(rows.size() * sizeof(int32_t)); !s.ok()) return s;
  // Pageable source: the copy is staged before cudaMemcpyAsync returns, so `rows` may go.
  if (absl::Status s = CudaStatus(cudaMemcpyAsync(pairs_.get(), rows.data(), rows.size() * 4,
                                                  cudaMemcpyHostToDevice, stream_),
                                  "KV copy indices");
      !s.ok()) {
    return s;
  }
  kernels::CopyRowsParams p{data_.get(),
                            dtype_,
                            static_cast<int32_t>(2 * shape_.num_layers),
                            slots_ * kv_dim_,
                            row_elems,
                            pairs_.as<int32_t>(),
                            pairs_.as<int32_t>() + n,
                            static_cast<int32_t>(n)};
  return CudaStatus(kernels::LaunchCopyRows(p, stream_), "KV copy");
}

absl::Status DeviceKvStorage::CopyBlock(int32_t src, int32_t dst) {
  const int32_t s[] = {src}, d[] = {dst};
  return CopyRows(s, d, int64_t{shape_.block_tokens} * kv_dim_);
}

absl::Status DeviceKvStorage::CopySlots(std::span<const int32_t> src,
                                        std::span<const int32_t> dst) {
  return CopyRows(src, dst, kv_dim_);
}

}  // namespace deft::gpu
