#include "kernels/model/invariant_gemm.h"

#include <cstdint>

#include "kernels/model/dispatch.cuh"

namespace deft::kernels {
namespace {

constexpr int kRowsPerWarp = 4;   // rows of x sharing one read of a weight row
constexpr int kWarpsPerBlock = 8;  // output features per block

template <typename T>
__device__ __forceinline__ float Load(const T* p) {
  return ToFloat<T>(*p);
}

template <typename O>
__device__ __forceinline__ void Store(O* y, float v, bool accumulate);
template <>
__device__ __forceinline__ void Store<float>(float* y, float v, bool accumulate) {
  *y = accumulate ? *y + v : v;
}
template <>
__device__ __forceinline__ void Store<__half>(__half* y, float v, bool accumulate) {
  *y = __float2half_rn(accumulate ? __half2float(*y) + v : v);
}
template <>
__device__ __forceinline__ void Store<__nv_bfloat16>(__nv_bfloat16* y, float v, bool accumulate) {
  *y = __float2bfloat16_rn(accumulate ? __bfloat162float(*y) + v : v);
}

// Warp (blockIdx.x * 8 + warp) computes output feature `col` for rows blockIdx.y * 4 .. + 3.
// Lane l takes k = 8l .. 8l + 7, then + 256, ... (kVec) or k = l, l + 32, ... (scalar); each
// row's sum runs in that fixed order, so it does not depend on the other rows.
template <typename T, typename O, bool kVec>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    RowInvariantGemmKernel(const T* __restrict__ w, const T* __restrict__ x, O* __restrict__ y,
                           int64_t m, int64_t n, int64_t k, bool accumulate) {
  const int lane = threadIdx.x & 31;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (col >= n) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowsPerWarp;
  const int rows = m - r0 < kRowsPerWarp ? static_cast<int>(m - r0) : kRowsPerWarp;
  const T* wr = w + col * k;
  float acc[kRowsPerWarp] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (kVec) {
    for (int64_t k0 = lane * 8; k0 < k; k0 += 256) {
      const uint4 wv = *reinterpret_cast<const uint4*>(wr + k0);
      const T* we = reinterpret_cast<const T*>(&wv);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (r >= rows) break;
        const uint4 xv = *reinterpret_cast<const uint4*>(x + (r0 + r) * k + k0);
        const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r] = fmaf(ToFloat<T>(we[e]), ToFloat<T>(xe[e]), acc[r]);
      }
    }
  } else {
    for (int64_t kk = lane; kk < k; kk += 32) {
      const float wv = Load(wr + kk);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (r < rows) acc[r] = fmaf(wv, Load(x + (r0 + r) * k + kk), acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  }
  if (lane < rows) {
    float v = acc[0];
#pragma unroll
    for (int r = 1; r < kRowsPerWarp; ++r) v = lane == r ? acc[r] : v;
    Store<O>(y + (r0 + lane) * n + col, v, accumulate);
  }
}

template <typename T, typename O>
cudaError_t Launch(const GemmParams& p, cudaStream_t stream) {
  const int64_t blocks_y = (p.m + kRowsPerWarp - 1) / kRowsPerWarp;
  const int64_t blocks_x = (p.n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks_y > 65535 || blocks_x > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  const T* w = static_cast<const T*>(p.w);
  const T* x = static_cast<const T*>(p.x);
  O* y = static_cast<O*>(p.y);
  const bool vec = p.k % 8 == 0 && reinterpret_cast<uintptr_t>(p.w) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
  if (vec) {
    RowInvariantGemmKernel<T, O, true>
        <<<grid, kWarpsPerBlock * 32, 0, stream>>>(w, x, y, p.m, p.n, p.k, p.accumulate);
  } else {
    RowInvariantGemmKernel<T, O, false>
        <<<grid, kWarpsPerBlock * 32, 0, stream>>>(w, x, y, p.m, p.n, p.k, p.accumulate);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t RunRowInvariantGemm(const GemmParams& p, cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0 || p.k <= 0 || p.in_dtype == Dtype::kFloat32 || p.w == nullptr ||
      p.x == nullptr || p.y == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.out_dtype == Dtype::kFloat32) {
    DEFT_DISPATCH_HALF(p.in_dtype, T, return Launch<T, float>(p, stream));
  }
  if (p.out_dtype != p.in_dtype) return cudaErrorInvalidValue;
  DEFT_DISPATCH_HALF(p.in_dtype, T, return Launch<T, T>(p, stream));
  return cudaErrorInvalidValue;
}

}  // namespace deft::kernels
