// Weight preparation on the GPU: GGUF/GGML blocks dequantized to fp16/bf16 at load, and the
// deterministic synthetic weights of benchmark models generated in place (no host copy).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/model/dtype.h"

namespace deft::kernels {

// GGML type ids this kernel decodes (ggml.h numbering; engine/gguf/ggml_types.h is the CPU
// reference): F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q8_1 9, Q2_K 10, Q3_K 11,
// Q4_K 12, Q5_K 13, Q6_K 14, Q8_K 15, BF16 30.
bool GgmlTypeOnDevice(int32_t ggml_type);

// out[r, c] = dequant(src row r)[c], rounded to nearest even into T. src: `rows` rows of
// `src_row_bytes` bytes (device, no alignment needed); out: T [rows, cols] row-major.
// The fp32 values are exactly those of the CPU's DequantizeRow (products of a scale and a small
// integer are exact in fp32; see ggml_types.cc), so the result is bit-identical to rounding the
// CPU's output. cudaErrorInvalidValue for an unknown type or cols not a multiple of its block.
struct DequantParams {
  const uint8_t* src = nullptr;
  int32_t ggml_type = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t src_row_bytes = 0;
  void* out = nullptr;
  Dtype dtype = Dtype::kBFloat16;
};
cudaError_t LaunchDequant(const DequantParams& p, cudaStream_t stream);

// out[i] = round(SyntheticValue(seed, i, scale, offset)) for i < n (synthetic_values.h), into
// T or fp32: the same values the host generates for the CPU reference of a synthetic model.
struct SyntheticFillParams {
  void* out = nullptr;
  Dtype dtype = Dtype::kBFloat16;
  int64_t n = 0;
  uint64_t seed = 0;
  float scale = 1.f;
  float offset = 0.f;
};
cudaError_t LaunchSyntheticFill(const SyntheticFillParams& p, cudaStream_t stream);

}  // namespace deft::kernels
