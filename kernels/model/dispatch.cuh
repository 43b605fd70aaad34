// DEFT_DISPATCH_HALF(dtype, T, ...): runs the body with `T` bound to __half or __nv_bfloat16;
// returns cudaErrorInvalidValue from the enclosing launcher for any other dtype (fp32 is not an
// activation/weight dtype of these kernels).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <string_view>
#include <utility>

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

// Programmatic dependent launch (sm_90+). A kernel launched by LaunchPdl may be scheduled while
// the kernel before it in the stream is still running, so its CTAs are resident and past their
// launch when that one ends (~1 us per kernel boundary of a decode step, where most kernels are
// a few us long). Such a kernel must call GridDependencyWait() before it reads or writes memory
// that an earlier kernel of the stream touches: the wait returns once the previous kernel has
// completed and its writes are visible (and that kernel, if it was launched so too, waited for
// its own predecessor before it could complete, so the order holds down the stream). It may
// call GridDependentsMayLaunch() to let the next such kernel be scheduled early (at its start:
// these kernels are one wave). Both are no-ops where the kernel was launched normally.
__device__ __forceinline__ void GridDependencyWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void GridDependentsMayLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether kernels are launched as programmatic dependent launches: the current device has them
// (compute capability 9+) and the environment does not turn them off (DEFT_PDL=0: every launch
// normal, for A/B measurements and debugging; read once per process).
inline bool PdlSupported() {
  static const bool supported = [] {
    if (const char* env = std::getenv("DEFT_PDL"); env != nullptr && std::string_view(env) == "0") {
      return false;
    }
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return major >= 9;
  }();
  return supported;
}

// kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent launch where the
// device has it (a normal launch elsewhere).
template <typename... Params, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = PdlSupported() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace deft::kernels
