// CUDA plumbing of the GPU backend: cudaError_t -> absl::Status at the engine boundary, an owned
// device allocation, and whether a device is present.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string_view>

#include "absl/status/status.h"

namespace deft::gpu {

// OK for cudaSuccess; else INTERNAL (RESOURCE_EXHAUSTED for out-of-memory, INVALID_ARGUMENT for
// cudaErrorInvalidValue) "<what>: <cuda error name>: <description>".
absl::Status CudaStatus(cudaError_t e, std::string_view what);

// True when the runtime sees at least one CUDA device.
bool CudaDevicePresent();

// A cudaMalloc'd region, freed on destruction; grows on demand (contents are not kept).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { Free(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }

  // Ensures at least `bytes` (reallocating, contents lost, when smaller).
  absl::Status Reserve(size_t bytes);
  void Free();
  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace deft::gpu
