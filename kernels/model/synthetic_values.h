// Deterministic pseudo-random weights for synthetic models, identical on host and device:
// value(seed, i) = offset + scale * u, u = uniform in [-1, 1) from a counter-based hash
// (splitmix64 of seed and index), computed with one correctly rounded fma so that host
// (std::fma) and device (__fmaf_rn) agree bit for bit. Plain C++ when compiled without CUDA.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define DEFT_HOST_DEVICE __host__ __device__
#else
#include <cmath>
#define DEFT_HOST_DEVICE
#endif

namespace deft::kernels {

DEFT_HOST_DEVICE inline uint64_t SyntheticMix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

DEFT_HOST_DEVICE inline float SyntheticValue(uint64_t seed, uint64_t i, float scale, float offset) {
  const uint64_t bits = SyntheticMix(SyntheticMix(seed) ^ (i * 0xD1B54A32D192ED03ull));
  // 24 random bits: u = k * 2^-23 - 1 is exact in fp32.
  const float u = static_cast<float>(bits >> 40) * 0x1.0p-23f - 1.f;
#ifdef __CUDA_ARCH__
  return __fmaf_rn(scale, u, offset);
#else
  return std::fma(scale, u, offset);
#endif
}

}  // namespace deft::kernels
