// GGML type traits, fp16/bf16 conversion and row dequantization to fp32.
//
// Block layouts follow ggml-common.h (QK_K = 256); each is written out below as a struct whose
// size is checked against the traits table. Blocks are copied out of `src` with memcpy, so `src`
// needs no alignment and the host must be little-endian (as GGUF data is).
//
// Exactness: in every format the product (fp16 scale) x (small integer quant), and (fp16 scale) x
// (6-bit sub-scale) x (quant) for the k-quants, has at most 24 significant bits and so is exact
// in fp32. The only rounding is the final "+ min" / "- min" of the affine formats. Results are
// therefore bit-identical whatever the multiplication order and whether or not the compiler
// contracts `a * b + c` into an FMA, and equal to ggml's and gguf-python's dequantizers.
#include "engine/gguf/ggml_types.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

namespace deft {
namespace {

static_assert(std::endian::native == std::endian::little, "GGUF block decoding assumes LE");

constexpr int kQK = 32;    // elements per block of the legacy formats (Q4_0 .. Q8_1)
constexpr int kQKK = 256;  // elements per super-block of the k-quants
constexpr int kKScaleBytes = 12;

// ggml_half is stored as its raw bits.
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQK / 2];  // element j in the low nibble of qs[j], element j+16 in the high nibble
};
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[kQK / 2];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];  // bit j (little-endian uint32) is the 5th bit of element j
  uint8_t qs[kQK / 2];
};
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[kQK / 2];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQK];
};
struct BlockQ8_1 {
  uint16_t d;
  uint16_t s;  // d * sum(qs); not needed to dequantize
  int8_t qs[kQK];
};
struct BlockQ2_K {
  uint8_t scales[kQKK / 16];  // per 16 elements: low nibble scale, high nibble min
  uint8_t qs[kQKK / 4];
  uint16_t d;
  uint16_t dmin;
};
struct BlockQ3_K {
  uint8_t hmask[kQKK / 8];
  uint8_t qs[kQKK / 4];
  uint8_t scales[kKScaleBytes];  // 16 6-bit scales
  uint16_t d;
};
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[kKScaleBytes];  // 8 6-bit scales and 8 6-bit mins
  uint8_t qs[kQKK / 2];
};
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[kKScaleBytes];
  uint8_t qh[kQKK / 8];
  uint8_t qs[kQKK / 2];
};
struct BlockQ6_K {
  uint8_t ql[kQKK / 2];
  uint8_t qh[kQKK / 4];
  int8_t scales[kQKK / 16];
  uint16_t d;
};
struct BlockQ8_K {
  float d;
  int8_t qs[kQKK];
  int16_t bsums[kQKK / 16];  // sums of groups of 16 quants; not needed to dequantize
};

static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
              sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34 && sizeof(BlockQ8_1) == 36);
static_assert(sizeof(BlockQ2_K) == 84 && sizeof(BlockQ3_K) == 110 && sizeof(BlockQ4_K) == 144 &&
              sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210 && sizeof(BlockQ8_K) == 292);

// The readable types.
struct TraitsEntry {
  uint32_t id;
  GgmlTypeTraits traits;
};
constexpr TraitsEntry kTraits[] = {
    {0, {"F32", 1, 4}},
    {1, {"F16", 1, 2}},
    {2, {"Q4_0", kQK, sizeof(BlockQ4_0)}},
    {3, {"Q4_1", kQK, sizeof(BlockQ4_1)}},
    {6, {"Q5_0", kQK, sizeof(BlockQ5_0)}},
    {7, {"Q5_1", kQK, sizeof(BlockQ5_1)}},
    {8, {"Q8_0", kQK, sizeof(BlockQ8_0)}},
    {9, {"Q8_1", kQK, sizeof(BlockQ8_1)}},
    {10, {"Q2_K", kQKK, sizeof(BlockQ2_K)}},
    {11, {"Q3_K", kQKK, sizeof(BlockQ3_K)}},
    {12, {"Q4_K", kQKK, sizeof(BlockQ4_K)}},
    {13, {"Q5_K", kQKK, sizeof(BlockQ5_K)}},
    {14, {"Q6_K", kQKK, sizeof(BlockQ6_K)}},
    {15, {"Q8_K", kQKK, sizeof(BlockQ8_K)}},
    {30, {"BF16", 1, 2}},
};

// The ids ggml defines (ggml.h enum ggml_type) that this build cannot read, named so errors can
// say what a model needs. Ids 4, 5 (Q4_2, Q4_3), 31..33 and 36..38 (repacked layouts) were
// removed from ggml and never appear in GGUF files.
struct NameEntry {
  uint32_t id;
  std::string_view name;
};
constexpr NameEntry kUnreadableNames[] = {
    {16, "IQ2_XXS"}, {17, "IQ2_XS"}, {18, "IQ3_XXS"}, {19, "IQ1_S"}, {20, "IQ4_NL"},
    {21, "IQ3_S"},   {22, "IQ2_S"},  {23, "IQ4_XS"},  {24, "I8"},    {25, "I16"},
    {26, "I32"},     {27, "I64"},    {28, "F64"},     {29, "IQ1_M"}, {34, "TQ1_0"},
    {35, "TQ2_0"},   {39, "MXFP4"},  {40, "NVFP4"},   {41, "Q1_0"},
};

template <typename Block>
inline Block LoadBlock(const uint8_t* src, int64_t i) {
  Block b;
  std::memcpy(&b, src + i * static_cast<int64_t>(sizeof(Block)), sizeof(Block));
  return b;
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, or nan with its payload kept
  } else if (exp != 0) {
    bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
  } else {
    // Zero or subnormal: mant * 2^-24, exact in fp32 (a normal number there).
    bits = sign | std::bit_cast<uint32_t>(static_cast<float>(mant) * 0x1p-24f);
  }
  return std::bit_cast<float>(bits);
}

// Rounds `m >> shift` to nearest, ties to even. REQUIRES: 1 <= shift <= 31.
inline uint32_t ShiftRoundEven(uint32_t m, int shift) {
  const uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  return r + ((rem > half || (rem == half && (r & 1))) ? 1 : 0);
}

void DequantizeF16(const uint8_t* src, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    y[i] = HalfToFloat(h);
  }
}

void DequantizeBF16(const uint8_t* src, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    y[i] = std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
  }
}

void DequantizeQ4_0(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ4_0>(src, i);
    const float d = HalfToFloat(b.d);
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = d * static_cast<float>((b.qs[j] & 0xF) - 8);
      y[j + kQK / 2] = d * static_cast<float>((b.qs[j] >> 4) - 8);
    }
  }
}

void DequantizeQ4_1(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ4_1>(src, i);
    const float d = HalfToFloat(b.d);
    const float m = HalfToFloat(b.m);
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = d * static_cast<float>(b.qs[j] & 0xF) + m;
      y[j + kQK / 2] = d * static_cast<float>(b.qs[j] >> 4) + m;
    }
  }
}

void DequantizeQ5_0(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ5_0>(src, i);
    const float d = HalfToFloat(b.d);
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    for (int j = 0; j < kQK / 2; ++j) {
      const int lo = (b.qs[j] & 0xF) | (((qh >> j) & 1) << 4);
      const int hi = (b.qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      y[j] = d * static_cast<float>(lo - 16);
      y[j + kQK / 2] = d * static_cast<float>(hi - 16);
    }
  }
}

void DequantizeQ5_1(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ5_1>(src, i);
    const float d = HalfToFloat(b.d);
    const float m = HalfToFloat(b.m);
    uint32_t qh;
    std::memcpy(&qh, b.qh, 4);
    for (int j = 0; j < kQK / 2; ++j) {
      const int lo = (b.qs[j] & 0xF) | (((qh >> j) & 1) << 4);
      const int hi = (b.qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      y[j] = d * static_cast<float>(lo) + m;
      y[j + kQK / 2] = d * static_cast<float>(hi) + m;
    }
  }
}

void DequantizeQ8_0(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ8_0>(src, i);
    const float d = HalfToFloat(b.d);
    for (int j = 0; j < kQK; ++j) y[j] = d * static_cast<float>(b.qs[j]);
  }
}

void DequantizeQ8_1(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const auto b = LoadBlock<BlockQ8_1>(src, i);
    const float d = HalfToFloat(b.d);
    for (int j = 0; j < kQK; ++j) y[j] = d * static_cast<float>(b.qs[j]);
  }
}

// Q2_K: 16 groups of 16. Element 128*h + 32*s + l holds bits [2s, 2s+2) of qs[32*h + l]; its
// group g = element / 16 has scale d * (scales[g] & 0xF) and min dmin * (scales[g] >> 4).
void DequantizeQ2_K(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQKK) {
    const auto b = LoadBlock<BlockQ2_K>(src, i);
    const float d = HalfToFloat(b.d);
    const float dmin = HalfToFloat(b.dmin);
    for (int e0 = 0; e0 < kQKK; e0 += 16) {
      const int g = e0 / 16;
      const float dl = d * static_cast<float>(b.scales[g] & 0xF);
      const float ml = dmin * static_cast<float>(b.scales[g] >> 4);
      const int h = e0 / 128, shift = 2 * ((e0 / 32) % 4), q0 = 32 * h + e0 % 32;
      for (int l = 0; l < 16; ++l) {
        y[e0 + l] = dl * static_cast<float>((b.qs[q0 + l] >> shift) & 3) - ml;
      }
    }
  }
}

// Q3_K: 16 groups of 16 with signed 6-bit scales: low 4 bits in nibbles of scales[0..8)
// (groups 0..7 low nibbles, 8..15 high nibbles), high 2 bits in scales[8 + g % 4] at bit 2*(g/4).
// Element 128*h + 32*s + l has low bits [2s, 2s+2) of qs[32*h + l] and, as bit 2, bit 4h+s of
// hmask[l]; a clear hmask bit subtracts 4.
void DequantizeQ3_K(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQKK) {
    const auto b = LoadBlock<BlockQ3_K>(src, i);
    const float d = HalfToFloat(b.d);
    for (int g = 0; g < 16; ++g) {
      const int low = g < 8 ? (b.scales[g] & 0xF) : (b.scales[g - 8] >> 4);
      const int high = (b.scales[8 + g % 4] >> (2 * (g / 4))) & 3;
      const float dl = d * static_cast<float>((low | (high << 4)) - 32);
      const int e0 = 16 * g;
      const int h = e0 / 128, s = (e0 / 32) % 4, q0 = 32 * h + e0 % 32;
      for (int l = 0; l < 16; ++l) {
        const int q = (b.qs[q0 + l] >> (2 * s)) & 3;
        const int hbit = (b.hmask[e0 % 32 + l] >> (4 * h + s)) & 1;
        y[e0 + l] = dl * static_cast<float>(q - (hbit ? 0 : 4));
      }
    }
  }
}

// Scale and min of sub-block j (0..7) of Q4_K/Q5_K: 6 bits each, packed in 12 bytes.
inline void ScaleMinK4(const uint8_t* q, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K: 8 sub-blocks of 32. Sub-block 2c takes the low nibbles of qs[32c .. 32c+32), 2c+1 the
// high nibbles.
void DequantizeQ4_K(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQKK) {
    const auto b = LoadBlock<BlockQ4_K>(src, i);
    const float d = HalfToFloat(b.d);
    const float dmin = HalfToFloat(b.dmin);
    for (int c = 0; c < 4; ++c) {
      int sc0, m0, sc1, m1;
      ScaleMinK4(b.scales, 2 * c, &sc0, &m0);
      ScaleMinK4(b.scales, 2 * c + 1, &sc1, &m1);
      const float d0 = d * static_cast<float>(sc0), min0 = dmin * static_cast<float>(m0);
      const float d1 = d * static_cast<float>(sc1), min1 = dmin * static_cast<float>(m1);
      const uint8_t* qs = b.qs + 32 * c;
      float* out = y + 64 * c;
      for (int l = 0; l < 32; ++l) {
        out[l] = d0 * static_cast<float>(qs[l] & 0xF) - min0;
        out[l + 32] = d1 * static_cast<float>(qs[l] >> 4) - min1;
      }
    }
  }
}

// Q5_K: Q4_K plus a 5th bit: bit j of qh[l] belongs to element 32j + l.
void DequantizeQ5_K(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQKK) {
    const auto b = LoadBlock<BlockQ5_K>(src, i);
    const float d = HalfToFloat(b.d);
    const float dmin = HalfToFloat(b.dmin);
    for (int c = 0; c < 4; ++c) {
      int sc0, m0, sc1, m1;
      ScaleMinK4(b.scales, 2 * c, &sc0, &m0);
      ScaleMinK4(b.scales, 2 * c + 1, &sc1, &m1);
      const float d0 = d * static_cast<float>(sc0), min0 = dmin * static_cast<float>(m0);
      const float d1 = d * static_cast<float>(sc1), min1 = dmin * static_cast<float>(m1);
      const uint8_t* qs = b.qs + 32 * c;
      float* out = y + 64 * c;
      for (int l = 0; l < 32; ++l) {
        const int q0 = (qs[l] & 0xF) | (((b.qh[l] >> (2 * c)) & 1) << 4);
        const int q1 = (qs[l] >> 4) | (((b.qh[l] >> (2 * c + 1)) & 1) << 4);
        out[l] = d0 * static_cast<float>(q0) - min0;
        out[l + 32] = d1 * static_cast<float>(q1) - min1;
      }
    }
  }
}

// Q6_K: two halves of 128. In half h, element 32k + l (k = 0..3) has its low 4 bits in
// ql[64h + 32(k%2) + l] (low nibble for k < 2, high nibble otherwise), its high 2 bits at bit 2k
// of qh[32h + l]; the quant is that 6-bit value - 32, scaled by d * scales[(128h + 32k + l) / 16].
void DequantizeQ6_K(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQKK) {
    const auto b = LoadBlock<BlockQ6_K>(src, i);
    const float d = HalfToFloat(b.d);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = b.ql + 64 * h;
      const uint8_t* qh = b.qh + 32 * h;
      for (int k = 0; k < 4; ++k) {
        const uint8_t* lo = ql + 32 * (k % 2);
        const int nibble_shift = k < 2 ? 0 : 4;
        float* out = y + 128 * h + 32 * k;
        const float d0 = d * static_cast<float>(b.scales[8 * h + 2 * k]);
        const float d1 = d * static_cast<float>(b.scales[8 * h + 2 * k + 1]);
        for (int l = 0; l < 32; ++l) {
          const int q = ((lo[l] >> nibble_shift) & 0xF) | (((qh[l] >> (2 * k)) & 3) << 4);
          out[l] = (l < 16 ? d0 : d1) * static_cast<float>(q - 32);
        }
      }
    }
  }
}

void DequantizeQ8_K(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQKK) {
    const auto b = LoadBlock<BlockQ8_K>(src, i);
    for (int j = 0; j < kQKK; ++j) y[j] = b.d * static_cast<float>(b.qs[j]);
  }
}

}  // namespace

const GgmlTypeTraits* GetTypeTraits(uint32_t type_id) {
  for (const TraitsEntry& e : kTraits) {
    if (e.id == type_id) return &e.traits;
  }
  return nullptr;
}

std::string_view GgmlTypeName(uint32_t type_id) {
  if (const GgmlTypeTraits* t = GetTypeTraits(type_id)) return t->name;
  for (const NameEntry& e : kUnreadableNames) {
    if (e.id == type_id) return e.name;
  }
  return {};
}

size_t RowBytes(GgmlType type, int64_t n) {
  const GgmlTypeTraits* t = GetTypeTraits(static_cast<uint32_t>(type));
  if (t == nullptr) return 0;
  return static_cast<size_t>(n / t->block_elems * t->block_bytes);
}

void DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n) {
  const auto* s = static_cast<const uint8_t*>(src);
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(dst, s, static_cast<size_t>(n) * sizeof(float));
      return;
    case GgmlType::kF16:
      return DequantizeF16(s, dst, n);
    case GgmlType::kBF16:
      return DequantizeBF16(s, dst, n);
    case GgmlType::kQ4_0:
      return DequantizeQ4_0(s, dst, n / kQK);
    case GgmlType::kQ4_1:
      return DequantizeQ4_1(s, dst, n / kQK);
    case GgmlType::kQ5_0:
      return DequantizeQ5_0(s, dst, n / kQK);
    case GgmlType::kQ5_1:
      return DequantizeQ5_1(s, dst, n / kQK);
    case GgmlType::kQ8_0:
      return DequantizeQ8_0(s, dst, n / kQK);
    case GgmlType::kQ8_1:
      return DequantizeQ8_1(s, dst, n / kQK);
    case GgmlType::kQ2_K:
      return DequantizeQ2_K(s, dst, n / kQKK);
    case GgmlType::kQ3_K:
      return DequantizeQ3_K(s, dst, n / kQKK);
    case GgmlType::kQ4_K:
      return DequantizeQ4_K(s, dst, n / kQKK);
    case GgmlType::kQ5_K:
      return DequantizeQ5_K(s, dst, n / kQKK);
    case GgmlType::kQ6_K:
      return DequantizeQ6_K(s, dst, n / kQKK);
    case GgmlType::kQ8_K:
      return DequantizeQ8_K(s, dst, n / kQKK);
  }
  // A value outside the enum breaks the precondition; make the bug visible instead of silent.
  for (int64_t i = 0; i < n; ++i) dst[i] = std::numeric_limits<float>::quiet_NaN();
}

float Fp16ToFp32(uint16_t h) { return HalfToFloat(h); }

uint16_t Fp32ToFp16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) {
    // NaN: keep the top payload bits and force quiet so the payload cannot round to inf.
    return sign | 0x7e00u | static_cast<uint16_t>((ax >> 13) & 0x3ffu);
  }
  // 65520 (0x477ff000) is halfway between 65504, the largest half, and 65536: ties go to the
  // even neighbour, which is infinity.
  if (ax >= 0x477ff000u) return sign | 0x7c00u;
  if (ax >= 0x38800000u) {  // >= 2^-14: a normal half
    const uint32_t rebiased = ax - ((127u - 15u) << 23);
    return sign | static_cast<uint16_t>(ShiftRoundEven(rebiased, 13));
  }
  // Subnormal half, in units of 2^-24: mantissa-with-implicit-bit * 2^(exp - 126).
  // Anything at or below 2^-25 (0x33000000) rounds to zero (2^-25 itself ties to even 0).
  if (ax <= 0x33000000u) return sign;
  const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
  const int shift = 126 - static_cast<int>(ax >> 23);  // 14 .. 24 here
  return sign | static_cast<uint16_t>(ShiftRoundEven(mant, shift));
}

float Bf16ToFp32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

uint16_t Fp32ToBf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN: truncate, force quiet
  }
  // Round to nearest even; a carry out of the mantissa correctly bumps the exponent, up to inf.
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace deft
