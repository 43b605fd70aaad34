// DEFT_DISPATCH_HALF(dtype, T, ...): runs the body with `T` bound to __half or __nv_bfloat16;
// returns cudaErrorInvalidValue from the enclosing launcher for any other dtype (fp32 is not an
// activation/weight dtype of these kernels).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/model/dtype.h"

#define DEFT_DISPATCH_HALF(dtype, T, ...)     \
  switch (dtype) {                            \
    case ::deft::kernels::Dtype::kFloat16: {  \
      using T = __half;                       \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    case ::deft::kernels::Dtype::kBFloat16: { \
      using T = __nv_bfloat16;                \
      __VA_ARGS__;                            \
      break;                                  \
    }                                         \
    default:                                  \
      return cudaErrorInvalidValue;           \
  }

namespace deft::kernels {

template <typename T>
__device__ __forceinline__ float ToFloat(T x);
template <>
__device__ __forceinline__ float ToFloat<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Round to nearest even, as the host's Fp32ToFp16 / Fp32ToBf16.
template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Launch error of the kernel just launched (configuration errors surface here).
inline cudaError_t LastLaunchError() { return cudaGetLastError(); }

}  // namespace deft::kernels
