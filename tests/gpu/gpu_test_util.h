// Helpers of the GPU tests: skip without a device, device buffers filled from / read into host
// vectors, poison, fp16/bf16 rounding on the host, and relative errors.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "engine/gguf/ggml_types.h"
#include "engine/gpu/cuda_util.h"
#include "gtest/gtest.h"
#include "kernels/model/dtype.h"

namespace deft::gpu::testing {

#define DEFT_SKIP_WITHOUT_GPU()                                              \
  do {                                                                       \
    if (!::deft::gpu::CudaDevicePresent()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

#define DEFT_CUDA_OK(expr) \
  ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(cudaGetLastError())

// A device copy of `host`.
template <typename T>
DeviceBuffer Upload(const std::vector<T>& host) {
  DeviceBuffer b;
  EXPECT_TRUE(b.Reserve(std::max<size_t>(host.size() * sizeof(T), 16)).ok());
  EXPECT_EQ(cudaMemcpy(b.get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
            cudaSuccess);
  return b;
}

template <typename T>
std::vector<T> Download(const DeviceBuffer& b, size_t n) {
  std::vector<T> host(n);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(host.data(), b.get(), n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return host;
}

// Fills `bytes` of a device buffer with 0xFF (a NaN in fp16, bf16 and fp32).
inline DeviceBuffer Poisoned(size_t bytes) {
  DeviceBuffer b;
  EXPECT_TRUE(b.Reserve(std::max<size_t>(bytes, 16)).ok());
  EXPECT_EQ(cudaMemset(b.get(), 0xFF, bytes), cudaSuccess);
  return b;
}

inline uint16_t RoundHalf(kernels::Dtype d, float x) {
  return d == kernels::Dtype::kFloat16 ? Fp32ToFp16(x) : Fp32ToBf16(x);
}
inline float HalfValue(kernels::Dtype d, uint16_t h) {
  return d == kernels::Dtype::kFloat16 ? Fp16ToFp32(h) : Bf16ToFp32(h);
}

// ||a - b|| / ||b|| over all elements (fp64).
inline double RelL2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace deft::gpu::testing
