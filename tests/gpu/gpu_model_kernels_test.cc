// Every non-attention model kernel (kernels/model/) against a CPU reference on fresh random
// inputs, outputs poisoned (0xFF: NaN) before each run. Gathers and copies are checked for exact
// equality; dequantization bit for bit against engine/gguf's DequantizeRow rounded the same way;
// arithmetic kernels within a named tolerance of one rounding to the output dtype.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "engine/gguf/ggml_types.h"
#include "kernels/model/layer_kernels.h"
#include "kernels/model/synthetic_values.h"
#include "kernels/model/weight_kernels.h"
#include "tests/gpu/gpu_test_util.h"

namespace deft::gpu::testing {
namespace {

using kernels::Dtype;

// One rounding to the output dtype, relative: bf16 has 8 significant bits, fp16 11.
double RoundingLimit(Dtype d) { return d == Dtype::kBFloat16 ? 0x1p-8 : 0x1p-11; }

class ModelKernelsTest : public ::testing::TestWithParam<Dtype> {
 protected:
  void SetUp() override { DEFT_SKIP_WITHOUT_GPU(); }
  std::mt19937_64 rng_{std::random_device{}()};
  Dtype dtype() const { return GetParam(); }
  // n random T values (as raw bits) from U(-scale, scale).
  std::vector<uint16_t> RandomHalf(size_t n, float scale) {
    std::uniform_real_distribution<float> u(-scale, scale);
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = RoundHalf(dtype(), u(rng_));
    return v;
  }
  std::vector<float> RandomFloat(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = u(rng_);
    return v;
  }
};

TEST_P(ModelKernelsTest, EmbeddingGatherIsExact) {
  const int vocab = 1000, hidden = 576, rows = 37;
  const auto table = RandomHalf(size_t(vocab) * hidden, 2.f);
  std::vector<int32_t> tokens(rows);
  for (auto& t : tokens) t = static_cast<int32_t>(rng_() % vocab);
  DeviceBuffer d_table = Upload(table), d_tokens = Upload(tokens);
  DeviceBuffer d_out = Poisoned(size_t(rows) * hidden * 4);
  kernels::EmbeddingParams p{d_table.get(),     dtype(), d_tokens.as<int32_t>(),
                             d_out.as<float>(), rows,    hidden};
  DEFT_CUDA_OK(kernels::LaunchEmbedding(p, nullptr));
  const auto out = Download<float>(d_out, size_t(rows) * hidden);
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < hidden; ++j) {
      ASSERT_EQ(out[r * hidden + j], HalfValue(dtype(), table[size_t(tokens[r]) * hidden + j]))
          << r << "," << j;
    }
  }
}

TEST_P(ModelKernelsTest, RmsNormMatchesCpuWithRowGather) {
  const int hidden = 4096, in_rows = 9;
  const std::vector<int32_t> rows = {3, 0, 8, 8, 5};
  const auto x = RandomFloat(size_t(in_rows) * hidden, -3.f, 3.f);
  const auto w = RandomFloat(hidden, 0.5f, 1.5f);
  DeviceBuffer d_x = Upload(x), d_w = Upload(w), d_rows = Upload(rows);
  const int n = static_cast<int>(rows.size());
  DeviceBuffer d_out = Poisoned(size_t(n) * hidden * 2);
  const float eps = 1e-5f;
  kernels::RmsNormParams p{
      d_x.as<float>(), d_rows.as<int32_t>(), d_w.as<float>(), d_out.get(), dtype(), n, hidden, eps};
  DEFT_CUDA_OK(kernels::LaunchRmsNorm(p, nullptr));
  const auto out = Download<uint16_t>(d_out, size_t(n) * hidden);
  double worst = 0;
  for (int r = 0; r < n; ++r) {
    const float* xr = &x[size_t(rows[r]) * hidden];
    double ss = 0;
    for (int j = 0; j < hidden; ++j) ss += double{xr[j]} * xr[j];
    const double scale = 1.0 / std::sqrt(ss / hidden + eps);
    for (int j = 0; j < hidden; ++j) {
      const double ref = w[j] * xr[j] * scale;
      const double got = HalfValue(dtype(), out[size_t(r) * hidden + j]);
      ASSERT_FALSE(std::isnan(got)) << "unwritten output " << r << "," << j;
      worst = std::max(worst, std::abs(got - ref) / (std::abs(ref) + 1e-3));
    }
  }
  EXPECT_LE(worst, RoundingLimit(dtype()) * 1.01);
}

// The CPU's ApplyRope (engine/model/llama_model.cc) in fp64 angle / fp32 rotation.
void RopeReference(std::vector<float>& x, int heads, int head_dim, int rope_dim, bool neox,
                   const std::vector<double>& inv_freq, int64_t pos, double linear_scale) {
  const int half = rope_dim / 2;
  const double p = static_cast<double>(pos) / linear_scale;
  for (int i = 0; i < half; ++i) {
    const double angle = p * inv_freq[i];
    const float cs = static_cast<float>(std::cos(angle)), sn = static_cast<float>(std::sin(angle));
    for (int h = 0; h < heads; ++h) {
      float* v = x.data() + h * head_dim;
      const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
      const float x0 = v[a], x1 = v[b];
      v[a] = x0 * cs - x1 * sn;
      v[b] = x0 * sn + x1 * cs;
    }
  }
}

// Runs LaunchRopeKvAppend on `rows` random fused QKV rows (num_heads Q, num_kv K, num_kv V heads)
// into a poisoned pool of `slots` slots and q_out; checks Q and K against the CPU rotation within
// one rounding, V exact, and that slots not named (or named by slot -1 rows) stay poisoned.
void CheckRopeKvAppend(Dtype dtype, std::mt19937_64& rng, int rows, int heads, int kv_heads,
                       int head_dim, bool neox, bool zero_positions) {
  const int half = head_dim / 2, kv_dim = kv_heads * head_dim;
  const int stride = (heads + 2 * kv_heads) * head_dim + 8;  // padded rows
  const int slots = 4 * rows;
  std::vector<double> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = std::pow(500000.0, -2.0 * i / head_dim) / (i % 3 == 0 ? 8.0 : 1.0);
  }
  std::vector<int64_t> pos(rows);
  for (auto& q : pos) q = zero_positions ? 0 : static_cast<int64_t>(rng() % 131072);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  std::vector<uint16_t> qkv(size_t(rows) * stride);
  for (auto& x : qkv) x = RoundHalf(dtype, u(rng));
  std::vector<int32_t> perm(slots), slot(rows);
  for (int i = 0; i < slots; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  for (int r = 0; r < rows; ++r) slot[r] = perm[r];
  slot[rows / 2] = -1;  // a query-only token
  DeviceBuffer d_qkv = Upload(qkv), d_pos = Upload(pos), d_inv = Upload(inv_freq);
  DeviceBuffer d_slots = Upload(slot);
  DeviceBuffer d_q = Poisoned(size_t(rows) * heads * head_dim * 2);
  DeviceBuffer d_k = Poisoned(size_t(slots) * kv_dim * 2),
               d_v = Poisoned(size_t(slots) * kv_dim * 2);
  kernels::RopeKvAppendParams p{d_qkv.get(),
                                stride,
                                d_q.get(),
                                d_k.get(),
                                d_v.get(),
                                d_slots.as<int32_t>(),
                                d_pos.as<int64_t>(),
                                d_inv.as<double>(),
                                1.0,
                                dtype,
                                rows,
                                heads,
                                kv_heads,
                                head_dim,
                                head_dim,
                                neox};
  DEFT_CUDA_OK(kernels::LaunchRopeKvAppend(p, nullptr));
  const auto q = Download<uint16_t>(d_q, size_t(rows) * heads * head_dim);
  const auto k = Download<uint16_t>(d_k, size_t(slots) * kv_dim);
  const auto v = Download<uint16_t>(d_v, size_t(slots) * kv_dim);
  double worst = 0;
  std::vector<bool> written(slots, false);
  for (int r = 0; r < rows; ++r) {
    // Reference: the CPU rotation of the row's Q and K heads.
    std::vector<float> ref((heads + kv_heads) * head_dim);
    for (size_t j = 0; j < ref.size(); ++j) ref[j] = HalfValue(dtype, qkv[size_t(r) * stride + j]);
    RopeReference(ref, heads + kv_heads, head_dim, head_dim, neox, inv_freq, pos[r], 1.0);
    auto check = [&](uint16_t got_bits, float want) {
      const double got = HalfValue(dtype, got_bits);
      if (zero_positions) {
        EXPECT_EQ(got_bits, RoundHalf(dtype, want));  // position 0: the identity, exactly
      }
      worst = std::max(worst, std::isnan(got) ? 1e9 : std::abs(got - want) / 4.0);
    };
    for (int j = 0; j < heads * head_dim; ++j) check(q[size_t(r) * heads * head_dim + j], ref[j]);
    if (slot[r] < 0) continue;
    written[slot[r]] = true;
    for (int j = 0; j < kv_dim; ++j) {
      check(k[size_t(slot[r]) * kv_dim + j], ref[heads * head_dim + j]);
      ASSERT_EQ(v[size_t(slot[r]) * kv_dim + j],
                qkv[size_t(r) * stride + (heads + kv_heads) * head_dim + j])
          << "V of row " << r << " element " << j;
    }
  }
  // One rounding of a value of magnitude up to |x0| + |x1| (<= 4).
  EXPECT_LE(worst, RoundingLimit(dtype)) << "neox=" << neox;
  for (int s = 0; s < slots; ++s) {
    if (written[s]) continue;
    for (int j = 0; j < kv_dim; ++j) {
      ASSERT_EQ(k[size_t(s) * kv_dim + j], 0xFFFF) << "slot " << s << " was written";
      ASSERT_EQ(v[size_t(s) * kv_dim + j], 0xFFFF) << "slot " << s << " was written";
    }
  }
}

TEST_P(ModelKernelsTest, RopeKvAppendMatchesCpuAtLargePositions) {
  for (bool neox : {false, true}) {
    CheckRopeKvAppend(dtype(), rng_, 6, 32, 8, 128, neox, false);
    CheckRopeKvAppend(dtype(), rng_, 5, 9, 3, 64, neox, false);  // SmolLM2's GQA 3
  }
}

TEST_P(ModelKernelsTest, RopeKvAppendAtPositionZeroCopiesExactly) {
  CheckRopeKvAppend(dtype(), rng_, 11, 8, 2, 128, false, true);
}

TEST_P(ModelKernelsTest, SwigluMatchesCpu) {
  const int rows = 7, ffn = 1536;
  const auto gu = RandomHalf(size_t(rows) * 2 * ffn, 4.f);
  DeviceBuffer d_gu = Upload(gu), d_out = Poisoned(size_t(rows) * ffn * 2);
  kernels::SwigluParams p{d_gu.get(), d_out.get(), dtype(), rows, ffn};
  DEFT_CUDA_OK(kernels::LaunchSwiglu(p, nullptr));
  const auto out = Download<uint16_t>(d_out, size_t(rows) * ffn);
  double worst = 0;
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < ffn; ++j) {
      const double g = HalfValue(dtype(), gu[size_t(r) * 2 * ffn + j]);
      const double u = HalfValue(dtype(), gu[size_t(r) * 2 * ffn + ffn + j]);
      const double ref = g / (1 + std::exp(-g)) * u;
      const double got = HalfValue(dtype(), out[size_t(r) * ffn + j]);
      ASSERT_FALSE(std::isnan(got));
      worst = std::max(worst, std::abs(got - ref) / (std::abs(ref) + 1e-2));
    }
  }
  EXPECT_LE(worst, RoundingLimit(dtype()) * 1.01);
}

TEST_P(ModelKernelsTest, CopyRowsCopiesBlocksOfEveryArrayExactly) {
  const int arrays = 6, rows_per_array = 10, row_elems = 16 * 1024;  // 3 layers x K/V, blocks
  const size_t total = size_t(arrays) * rows_per_array * row_elems;
  const auto data = RandomHalf(total, 1.f);
  DeviceBuffer d = Upload(data);
  const std::vector<int32_t> src = {1, 7, 3}, dst = {4, 0, 9};
  DeviceBuffer d_src = Upload(src), d_dst = Upload(dst);
  kernels::CopyRowsParams p{d.get(),
                            dtype(),
                            arrays,
                            int64_t{rows_per_array} * row_elems,
                            row_elems,
                            d_src.as<int32_t>(),
                            d_dst.as<int32_t>(),
                            3};
  DEFT_CUDA_OK(kernels::LaunchCopyRows(p, nullptr));
  const auto out = Download<uint16_t>(d, total);
  std::vector<uint16_t> ref = data;
  for (int a = 0; a < arrays; ++a) {
    for (size_t i = 0; i < src.size(); ++i) {
      const size_t base = size_t(a) * rows_per_array * row_elems;
      std::memcpy(&ref[base + dst[i] * size_t(row_elems)], &data[base + src[i] * size_t(row_elems)],
                  row_elems * 2);
    }
  }
  EXPECT_EQ(out, ref);
}

TEST_P(ModelKernelsTest, DequantIsBitIdenticalToCpuForEveryType) {
  const GgmlType types[] = {GgmlType::kF32,  GgmlType::kF16,  GgmlType::kBF16, GgmlType::kQ4_0,
                            GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ8_0,
                            GgmlType::kQ8_1, GgmlType::kQ2_K, GgmlType::kQ3_K, GgmlType::kQ4_K,
                            GgmlType::kQ5_K, GgmlType::kQ6_K, GgmlType::kQ8_K};
  const int64_t rows = 5, cols = 512;
  for (GgmlType type : types) {
    ASSERT_TRUE(kernels::GgmlTypeOnDevice(static_cast<int32_t>(type)));
    const auto src = RandomBlocks(type, rows, cols, rng_, 1.f);
    const size_t row_bytes = RowBytes(type, cols);
    DeviceBuffer d_src = Upload(src), d_out = Poisoned(rows * cols * 2);
    kernels::DequantParams p{d_src.as<uint8_t>(),
                             static_cast<int32_t>(type),
                             rows,
                             cols,
                             static_cast<int64_t>(row_bytes),
                             d_out.get(),
                             dtype()};
    DEFT_CUDA_OK(kernels::LaunchDequant(p, nullptr));
    const auto out = Download<uint16_t>(d_out, rows * cols);
    std::vector<float> row(cols);
    for (int64_t r = 0; r < rows; ++r) {
      DequantizeRow(type, &src[r * row_bytes], row.data(), cols);
      for (int64_t c = 0; c < cols; ++c) {
        ASSERT_EQ(out[r * cols + c], RoundHalf(dtype(), row[c]))
            << GetTypeTraits(static_cast<uint32_t>(type))->name << " row " << r << " col " << c
            << ": cpu " << row[c];
      }
    }
  }
  kernels::DequantParams bad{nullptr, 16 /* IQ2_XXS */, 1, 256, 66, nullptr, dtype()};
  EXPECT_EQ(kernels::LaunchDequant(bad, nullptr), cudaErrorInvalidValue);
}

TEST_P(ModelKernelsTest, SyntheticFillMatchesHostValues) {
  const int64_t n = 100003;
  const uint64_t seed = rng_();
  DeviceBuffer d_out = Poisoned(n * 2), d_f32 = Poisoned(n * 4);
  DEFT_CUDA_OK(kernels::LaunchSyntheticFill({d_out.get(), dtype(), n, seed, 0.02f, 1.f}, nullptr));
  DEFT_CUDA_OK(kernels::LaunchSyntheticFill(
      {d_f32.get(), kernels::Dtype::kFloat32, n, seed, 0.5f, 0.f}, nullptr));
  const auto out = Download<uint16_t>(d_out, n);
  const auto f32 = Download<float>(d_f32, n);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(out[i], RoundHalf(dtype(), kernels::SyntheticValue(seed, i, 0.02f, 1.f))) << i;
    ASSERT_EQ(f32[i], kernels::SyntheticValue(seed, i, 0.5f, 0.f)) << i;
  }
}

TEST_P(ModelKernelsTest, UnsupportedDtypeIsInvalidValue) {
  kernels::SwigluParams p{nullptr, nullptr, Dtype::kFloat32, 1, 8};
  EXPECT_EQ(kernels::LaunchSwiglu(p, nullptr), cudaErrorInvalidValue);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ModelKernelsTest,
                         ::testing::Values(Dtype::kFloat16, Dtype::kBFloat16),
                         [](const auto& info) {
                           return info.param == Dtype::kFloat16 ? "fp16" : "bf16";
                         });

}  // namespace
}  // namespace deft::gpu::testing
