// DequantizeRow against gguf-python (tests/reference/make_dequant_vectors.py) on random blocks of
// every type, and on rows of the real model; fp16/bf16 helpers against the compiler's _Float16
// and against the definition of round-to-nearest-even.
//
// Comparisons are bit-exact: in every format the scale x quant products are exact in fp32 (see
// ggml_types.cc), so order of operations and FMA contraction cannot change a result, and the
// reference computes the same single rounding. NaNs compare by NaN-ness only: the IEEE payload a
// conversion keeps is not something any caller relies on.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/gguf/ggml_types.h"
#include "engine/gguf/gguf_file.h"
#include "gtest/gtest.h"

namespace deft {
namespace {

const std::string kVectorDir = std::string(DEFT_TEST_DATA_DIR) + "/dequant";

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// Sequential little-endian reader over a vector file; `ok` turns false on a short read.
struct Reader {
  const std::vector<uint8_t>& buf;
  size_t pos = 0;
  bool ok = true;
  template <typename T>
  T Get() {
    T v{};
    if (pos + sizeof(T) > buf.size()) {
      ok = false;
      return v;
    }
    std::memcpy(&v, buf.data() + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::vector<uint8_t> Bytes(size_t n) {
    if (pos + n > buf.size()) {
      ok = false;
      return {};
    }
    std::vector<uint8_t> v(buf.begin() + pos, buf.begin() + pos + n);
    pos += n;
    return v;
  }
  std::vector<float> Floats(size_t n) {
    std::vector<uint8_t> b = Bytes(n * sizeof(float));
    std::vector<float> v(ok ? n : 0);
    if (ok) std::memcpy(v.data(), b.data(), b.size());
    return v;
  }
};

// Bit equality, except that any NaN matches any NaN.
testing::AssertionResult SameFloat(float got, float want) {
  if (std::isnan(want) ? std::isnan(got)
                       : std::bit_cast<uint32_t>(got) == std::bit_cast<uint32_t>(want)) {
    return testing::AssertionSuccess();
  }
  return testing::AssertionFailure()
         << "got " << got << " (0x" << std::hex << std::bit_cast<uint32_t>(got) << "), want "
         << want << " (0x" << std::bit_cast<uint32_t>(want) << ")";
}

struct TypeVector {
  uint32_t type_id = 0;
  std::vector<uint8_t> raw;
  std::vector<float> expected;
};

TypeVector LoadTypeVector(const std::string& type_name) {
  const std::vector<uint8_t> buf = ReadFile(absl::StrCat(kVectorDir, "/", type_name, ".bin"));
  Reader r{buf};
  TypeVector v;
  const uint32_t magic = r.Get<uint32_t>();
  v.type_id = r.Get<uint32_t>();
  const uint32_t n = r.Get<uint32_t>();
  const uint32_t n_bytes = r.Get<uint32_t>();
  v.raw = r.Bytes(n_bytes);
  v.expected = r.Floats(n);
  if (!r.ok || magic != 0x31565144 /* "DQV1" */ || r.pos != buf.size()) v.expected.clear();
  return v;
}

constexpr float kGuard = -12345.5f;

class DequantizeRowMatchesGgufPython : public testing::TestWithParam<std::string> {};

TEST_P(DequantizeRowMatchesGgufPython, BitExactOnRandomBlocks) {
  const TypeVector v = LoadTypeVector(GetParam());
  ASSERT_FALSE(v.expected.empty()) << "missing or malformed vector file for " << GetParam()
                                   << "; run tests/reference/make_dequant_vectors.py";
  const GgmlTypeTraits* traits = GetTypeTraits(v.type_id);
  ASSERT_NE(traits, nullptr);
  EXPECT_EQ(traits->name, GetParam());
  const auto type = static_cast<GgmlType>(v.type_id);
  const int64_t n = static_cast<int64_t>(v.expected.size());
  ASSERT_EQ(n % traits->block_elems, 0);
  ASSERT_EQ(RowBytes(type, n), v.raw.size());

  // Whole row; the guard after it must survive.
  std::vector<float> out(n + 4, kGuard);
  DequantizeRow(type, v.raw.data(), out.data(), n);
  for (int64_t i = 0; i < n; ++i) ASSERT_TRUE(SameFloat(out[i], v.expected[i])) << "element " << i;
  for (int64_t i = n; i < n + 4; ++i) EXPECT_EQ(out[i], kGuard) << "wrote past n at " << i;

  // Block by block from an odd address: no alignment assumption, writes exactly n values.
  const int64_t bytes_per_block = traits->block_bytes, elems = traits->block_elems;
  std::vector<uint8_t> shifted(1);
  shifted.insert(shifted.end(), v.raw.begin(), v.raw.end());
  for (int64_t b = 0; b < n / elems; ++b) {
    std::vector<float> one(elems + 1, kGuard);
    DequantizeRow(type, shifted.data() + 1 + b * bytes_per_block, one.data(), elems);
    for (int64_t i = 0; i < elems; ++i) {
      ASSERT_TRUE(SameFloat(one[i], v.expected[b * elems + i])) << "block " << b << " elem " << i;
    }
    EXPECT_EQ(one[elems], kGuard);
  }
}

const std::string kVectorTypes[] = {"F32",  "F16",  "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                    "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"};

INSTANTIATE_TEST_SUITE_P(AllTypes, DequantizeRowMatchesGgufPython, testing::ValuesIn(kVectorTypes),
                         [](const testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

TEST(GgmlTypes, EveryReadableTypeHasReferenceVectors) {
  int readable = 0;
  for (uint32_t id = 0; id < 64; ++id) {
    const GgmlTypeTraits* t = GetTypeTraits(id);
    if (t == nullptr) continue;
    ++readable;
    EXPECT_EQ(GgmlTypeName(id), t->name);
    EXPECT_NE(std::find(std::begin(kVectorTypes), std::end(kVectorTypes), t->name),
              std::end(kVectorTypes))
        << t->name << " has no test vectors";
  }
  EXPECT_EQ(readable, static_cast<int>(std::size(kVectorTypes)));
}

TEST(GgmlTypes, TraitsMatchGgmlBlockLayouts) {
  struct Layout {
    uint32_t id;
    const char* name;
    int64_t elems, bytes;
  };
  // Sizes from ggml-common.h's static_asserts on block_*; QK_K = 256.
  const Layout layouts[] = {
      {0, "F32", 1, 4},       {1, "F16", 1, 2},       {30, "BF16", 1, 2},
      {2, "Q4_0", 32, 18},    {3, "Q4_1", 32, 20},    {6, "Q5_0", 32, 22},
      {7, "Q5_1", 32, 24},    {8, "Q8_0", 32, 34},    {9, "Q8_1", 32, 36},
      {10, "Q2_K", 256, 84},  {11, "Q3_K", 256, 110}, {12, "Q4_K", 256, 144},
      {13, "Q5_K", 256, 176}, {14, "Q6_K", 256, 210}, {15, "Q8_K", 256, 292},
  };
  for (const Layout& l : layouts) {
    const GgmlTypeTraits* t = GetTypeTraits(l.id);
    ASSERT_NE(t, nullptr) << l.name;
    EXPECT_EQ(t->name, l.name);
    EXPECT_EQ(t->block_elems, l.elems) << l.name;
    EXPECT_EQ(t->block_bytes, l.bytes) << l.name;
    EXPECT_EQ(RowBytes(static_cast<GgmlType>(l.id), 4 * l.elems), static_cast<size_t>(4 * l.bytes));
  }
  EXPECT_EQ(GetTypeTraits(4), nullptr);   // removed Q4_2
  EXPECT_EQ(GetTypeTraits(16), nullptr);  // IQ2_XXS: not readable here
  EXPECT_EQ(GgmlTypeName(16), "IQ2_XXS");
  EXPECT_EQ(GetTypeTraits(99), nullptr);
  EXPECT_EQ(GgmlTypeName(99), "");
  EXPECT_EQ(GgmlTypeName(39), "MXFP4");
}

// Rows of the real model, dequantized through GgufFile's data pointers, against gguf-python's
// GGUFReader + dequantize on the same file.
TEST(DequantizeRealModel, RowsMatchGgufPython) {
  const std::vector<uint8_t> buf = ReadFile(kVectorDir + "/model_rows.bin");
  Reader r{buf};
  ASSERT_EQ(r.Get<uint32_t>(), 0x31525144u);  // "DQR1"
  const uint64_t model_size = r.Get<uint64_t>();
  const uint32_t n_rows = r.Get<uint32_t>();
  ASSERT_TRUE(r.ok);
  auto file = GgufFile::Open(DEFT_TEST_MODEL);
  ASSERT_TRUE(file.ok()) << file.status();
  std::ifstream model(DEFT_TEST_MODEL, std::ios::binary | std::ios::ate);
  ASSERT_EQ(static_cast<uint64_t>(model.tellg()), model_size)
      << "model_rows.bin was made from a different model file; regenerate it";
  std::map<GgmlType, int> rows_by_type;
  for (uint32_t k = 0; k < n_rows; ++k) {
    const std::vector<uint8_t> name_bytes = r.Bytes(r.Get<uint32_t>());
    const std::string name(name_bytes.begin(), name_bytes.end());
    const auto type = static_cast<GgmlType>(r.Get<uint32_t>());
    const uint32_t row = r.Get<uint32_t>();
    const uint32_t row_len = r.Get<uint32_t>();
    const std::vector<float> expected = r.Floats(row_len);
    ASSERT_TRUE(r.ok) << "model_rows.bin is malformed at entry " << k;

    auto t = (*file)->GetTensor(name);
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_EQ((*t)->type, type) << name;
    ASSERT_EQ((*t)->dims[0], row_len) << name;
    ASSERT_LT(row, (*t)->rows()) << name;
    std::vector<float> out(row_len + 1, kGuard);
    DequantizeRow(type, (*t)->data + row * RowBytes(type, row_len), out.data(), row_len);
    for (uint32_t i = 0; i < row_len; ++i) {
      ASSERT_TRUE(SameFloat(out[i], expected[i])) << name << " row " << row << " element " << i;
    }
    EXPECT_EQ(out[row_len], kGuard);
    ++rows_by_type[type];
  }
  EXPECT_EQ(r.pos, buf.size());
  // The model's three tensor types are all covered.
  EXPECT_GE(rows_by_type[GgmlType::kQ8_0], 2);
  EXPECT_GE(rows_by_type[GgmlType::kQ4_1], 2);
  EXPECT_GE(rows_by_type[GgmlType::kF32], 1);
}

// ---- fp16 / bf16 helpers ----------------------------------------------------------------------

// The compiler's _Float16 (F16C instructions or libgcc's soft-float) is the independent reference.
float CompilerHalfToFloat(uint16_t h) { return static_cast<float>(std::bit_cast<_Float16>(h)); }
uint16_t CompilerFloatToHalf(float f) { return std::bit_cast<uint16_t>(static_cast<_Float16>(f)); }

bool IsHalfNan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }
bool IsBf16Nan(uint16_t h) { return (h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0; }

TEST(Fp16, ToFp32MatchesCompilerForAllBitPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float got = Fp16ToFp32(static_cast<uint16_t>(h));
    ASSERT_TRUE(SameFloat(got, CompilerHalfToFloat(static_cast<uint16_t>(h))))
        << "half 0x" << std::hex << h;
    if (IsHalfNan(static_cast<uint16_t>(h))) {
      EXPECT_EQ(std::signbit(got), (h & 0x8000) != 0);
    }
  }
}

TEST(Fp16, RoundTripsEveryHalf) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t back = Fp32ToFp16(Fp16ToFp32(static_cast<uint16_t>(h)));
    if (IsHalfNan(static_cast<uint16_t>(h))) {
      ASSERT_TRUE(IsHalfNan(back)) << std::hex << h;
      EXPECT_EQ(back & 0x8000, h & 0x8000);
    } else {
      ASSERT_EQ(back, h) << std::hex << h;
    }
  }
}

TEST(Fp16, FromFp32EdgeCases) {
  struct Case {
    float f;
    uint16_t h;
  };
  const Case cases[] = {
      {0.0f, 0x0000},
      {-0.0f, 0x8000},
      {1.0f, 0x3c00},
      {-2.0f, 0xc000},
      {1.0f + 0x1p-11f, 0x3c00},             // tie between 1 and 1 + 2^-10: even is 1
      {1.0f + 3 * 0x1p-11f, 0x3c02},         // tie between 0x3c01 and 0x3c02: even is 0x3c02
      {1.0f + 0x1p-11f + 0x1p-23f, 0x3c01},  // just above the tie
      {65504.0f, 0x7bff},                    // largest half
      {65519.99f, 0x7bff},                   // just below the tie with 65536
      {65520.0f, 0x7c00},                    // tie: rounds to even, which is infinity
      {-1e6f, 0xfc00},
      {std::numeric_limits<float>::infinity(), 0x7c00},
      {-std::numeric_limits<float>::infinity(), 0xfc00},
      {0x1p-14f, 0x0400},             // smallest normal half
      {0x1p-14f - 0x1p-25f, 0x0400},  // 1023.5 subnormal units: tie to even 1024
      {0x1p-24f, 0x0001},             // smallest subnormal half
      {0x1p-25f, 0x0000},             // tie between 0 and 2^-24: even is 0
      {0x1p-25f * 1.0000001f, 0x0001},
      {3 * 0x1p-25f, 0x0002},  // 1.5 units: tie to even 2
      {5 * 0x1p-25f, 0x0002},  // 2.5 units: tie to even 2
      {-0x1p-26f, 0x8000},     // underflow keeps the sign
      {std::numeric_limits<float>::denorm_min(), 0x0000},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(Fp32ToFp16(c.f), c.h) << c.f;
    EXPECT_EQ(CompilerFloatToHalf(c.f), c.h) << "reference disagrees on " << c.f;
  }
  EXPECT_TRUE(IsHalfNan(Fp32ToFp16(std::numeric_limits<float>::quiet_NaN())));
  // A NaN whose payload lives only in the low 13 bits must not collapse to infinity.
  EXPECT_TRUE(IsHalfNan(Fp32ToFp16(std::bit_cast<float>(0x7f800001u))));
  EXPECT_TRUE(IsHalfNan(Fp32ToFp16(std::bit_cast<float>(0xff800001u))));
  EXPECT_EQ(Fp32ToFp16(std::bit_cast<float>(0xff800001u)) & 0x8000, 0x8000);
}

TEST(Fp16, FromFp32MatchesCompilerOnMidpointsAndRandomFloats) {
  // Every midpoint between adjacent halves, and one fp32 ulp either side of it.
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float lo = CompilerHalfToFloat(static_cast<uint16_t>(h));
    const float hi = CompilerHalfToFloat(static_cast<uint16_t>(h + 1));
    const float mid = lo + (hi - lo) / 2;  // exact: halves have 11 significant bits
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
      ASSERT_EQ(Fp32ToFp16(f), CompilerFloatToHalf(f)) << f;
      ASSERT_EQ(Fp32ToFp16(-f), CompilerFloatToHalf(-f)) << -f;
    }
  }
  std::mt19937 rng(std::random_device{}());
  for (int i = 0; i < 1000000; ++i) {
    const float f = std::bit_cast<float>(static_cast<uint32_t>(rng()));
    if (std::isnan(f)) {
      ASSERT_TRUE(IsHalfNan(Fp32ToFp16(f)));
    } else {
      ASSERT_EQ(Fp32ToFp16(f), CompilerFloatToHalf(f)) << f;
    }
  }
}

TEST(Bf16, RoundTripsEveryBf16) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = Bf16ToFp32(static_cast<uint16_t>(b));
    EXPECT_EQ(std::bit_cast<uint32_t>(f), b << 16);  // bf16 is the top half of an fp32
    const uint16_t back = Fp32ToBf16(f);
    if (IsBf16Nan(static_cast<uint16_t>(b))) {
      ASSERT_TRUE(IsBf16Nan(back)) << std::hex << b;
      EXPECT_EQ(back & 0x8000, b & 0x8000);
    } else {
      ASSERT_EQ(back, b) << std::hex << b;
    }
  }
}

TEST(Bf16, FromFp32EdgeCases) {
  EXPECT_EQ(Fp32ToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Fp32ToBf16(1.0f + 0x1p-8f), 0x3f80);             // tie: even is 1.0
  EXPECT_EQ(Fp32ToBf16(1.0f + 3 * 0x1p-8f), 0x3f82);         // tie: even is 0x3f82
  EXPECT_EQ(Fp32ToBf16(1.0f + 0x1p-8f + 0x1p-23f), 0x3f81);  // just above the tie
  EXPECT_EQ(Fp32ToBf16(-0.0f), 0x8000);
  EXPECT_EQ(Fp32ToBf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf
  EXPECT_EQ(Fp32ToBf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(Fp32ToBf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(Fp32ToBf16(std::bit_cast<float>(0x00018000u)), 0x0002);       // subnormal tie to even
  EXPECT_TRUE(IsBf16Nan(Fp32ToBf16(std::bit_cast<float>(0x7f800001u))));  // not inf
  EXPECT_TRUE(IsBf16Nan(Fp32ToBf16(std::bit_cast<float>(0x7fffffffu))));  // no carry into sign
  EXPECT_EQ(Fp32ToBf16(std::bit_cast<float>(0xffffffffu)) & 0x8000, 0x8000);
}

// Round-to-nearest-even checked from its definition, in double arithmetic.
TEST(Bf16, FromFp32IsNearestEvenOnRandomFloats) {
  std::mt19937 rng(std::random_device{}());
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t bits = static_cast<uint32_t>(rng());
    const float f = std::bit_cast<float>(bits);
    if (std::isnan(f)) continue;
    const uint16_t down = static_cast<uint16_t>(bits >> 16);  // toward zero
    const uint16_t up = static_cast<uint16_t>(down + 1);      // away from zero (may be inf)
    const double dist_down = std::fabs(static_cast<double>(f) - Bf16ToFp32(down));
    // Beyond the largest bf16, "up" is infinity; measure to 2^128 as IEEE rounding does.
    const double up_value = (up & 0x7fff) == 0x7f80 ? std::ldexp(std::signbit(f) ? -1.0 : 1.0, 128)
                                                    : static_cast<double>(Bf16ToFp32(up));
    const double dist_up = std::fabs(up_value - f);
    uint16_t want;
    if (dist_down < dist_up) {
      want = down;
    } else if (dist_up < dist_down) {
      want = up;
    } else {
      want = (down & 1) == 0 ? down : up;
    }
    if ((down & 0x7fff) == 0x7f80) want = down;  // f is +-inf itself
    ASSERT_EQ(Fp32ToBf16(f), want) << std::hex << bits;
  }
}

}  // namespace
}  // namespace deft
