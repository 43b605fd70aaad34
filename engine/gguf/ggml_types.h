// Tensor element types of the GGUF/GGML format and their block layouts, plus row dequantization
// to fp32. Type ids and block layouts match ggml (ggml/include/ggml.h, ggml-common.h).
//
// Thread safety: all functions are pure and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace deft {

enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

// Layout of one type: a row of n elements is n / block_elems blocks of block_bytes each.
struct GgmlTypeTraits {
  std::string_view name;  // "Q4_K", as ggml spells it
  int64_t block_elems;    // elements per block (1 for F32/F16/BF16)
  int64_t block_bytes;    // bytes per block
};

// Returns nullptr for a type id this build cannot read (decode or dequantize).
const GgmlTypeTraits* GetTypeTraits(uint32_t type_id);

// ggml's name for any type id it defines ("IQ2_XXS"), including ones this build cannot read, so
// errors can say which format a model uses; "" for ids ggml does not define.
std::string_view GgmlTypeName(uint32_t type_id);

// Bytes taken by `n` elements of `type`; REQUIRES: n % block_elems == 0.
size_t RowBytes(GgmlType type, int64_t n);

// Dequantizes `n` elements (a whole number of blocks) from `src` into `dst` (fp32).
// REQUIRES: GetTypeTraits(type) != nullptr, n % block_elems == 0.
void DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n);

// Half-precision helpers (IEEE fp16 and bfloat16 <-> fp32).
float Fp16ToFp32(uint16_t h);
uint16_t Fp32ToFp16(float f);
float Bf16ToFp32(uint16_t h);
uint16_t Fp32ToBf16(float f);  // round to nearest even

}  // namespace deft
