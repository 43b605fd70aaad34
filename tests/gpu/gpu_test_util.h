// Helpers of the GPU tests: skip without a device, device buffers filled from / read into host
// vectors, poison, fp16/bf16 rounding on the host, and relative errors.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
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

// Random blocks of a GGML type whose scale fields hold finite halves (random bytes elsewhere);
// `magnitude` scales every value (the scale fields, or the elements of F32/F16/BF16).
inline std::vector<uint8_t> RandomBlocks(GgmlType type, int64_t rows, int64_t cols,
                                         std::mt19937_64& rng, float magnitude) {
  const size_t row_bytes = RowBytes(type, cols);
  std::vector<uint8_t> data(row_bytes * rows);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto put_half = [&](size_t at, float v) {
    const uint16_t h = Fp32ToFp16(v);
    std::memcpy(&data[at], &h, 2);
  };
  const GgmlTypeTraits* t = GetTypeTraits(static_cast<uint32_t>(type));
  const size_t blocks = data.size() / t->block_bytes;
  for (size_t b = 0; b < blocks; ++b) {
    const size_t o = b * t->block_bytes;
    switch (type) {
      case GgmlType::kF32:
      case GgmlType::kQ8_K: {
        const float v = u(rng) * (type == GgmlType::kQ8_K ? 0.01f : 4.f) * magnitude;
        std::memcpy(&data[o], &v, 4);
        break;
      }
      case GgmlType::kF16:
        put_half(o, u(rng) * 4.f * magnitude);
        break;
      case GgmlType::kBF16: {
        const uint16_t h = Fp32ToBf16(u(rng) * 4.f * magnitude);
        std::memcpy(&data[o], &h, 2);
        break;
      }
      case GgmlType::kQ4_1:
      case GgmlType::kQ5_1:
      case GgmlType::kQ8_1:
      case GgmlType::kQ4_K:
      case GgmlType::kQ5_K:
        put_half(o, u(rng) * 0.05f * magnitude);
        put_half(o + 2, u(rng) * 0.05f * magnitude);
        break;
      case GgmlType::kQ4_0:
      case GgmlType::kQ5_0:
      case GgmlType::kQ8_0:
        put_half(o, u(rng) * 0.05f * magnitude);
        break;
      case GgmlType::kQ2_K:
        put_half(o + 80, u(rng) * 0.05f * magnitude);
        put_half(o + 82, u(rng) * 0.05f * magnitude);
        break;
      case GgmlType::kQ3_K:
        put_half(o + 108, u(rng) * 0.05f * magnitude);
        break;
      case GgmlType::kQ6_K:
        put_half(o + 208, u(rng) * 0.05f * magnitude);
        break;
    }
  }
  return data;
}

}  // namespace deft::gpu::testing
