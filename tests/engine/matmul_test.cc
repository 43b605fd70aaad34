// The SIMD matmul kernels against their scalar reference, on fresh random weights and
// activations of every directly supported type, for 1 token (decode) and several (prefill).
#include "engine/cpu/matmul.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "engine/gguf/ggml_types.h"
#include "engine/util/thread_pool.h"

namespace deft {
namespace {

// Random row data of `type` whose fp16 scales are finite and moderate.
std::vector<uint8_t> RandomRows(GgmlType type, int64_t rows, int64_t cols, std::mt19937& rng) {
  size_t row_bytes = RowBytes(type, cols);
  std::vector<uint8_t> data(row_bytes * rows);
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : data) b = static_cast<uint8_t>(byte(rng));
  std::uniform_real_distribution<float> scale(-0.05f, 0.05f);
  auto put_half = [&](uint8_t* p, float v) {
    uint16_t h = Fp32ToFp16(v);
    std::memcpy(p, &h, 2);
  };
  const int64_t nb = cols / 32;
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = data.data() + r * row_bytes;
    if (type == GgmlType::kQ8_0) {
      for (int64_t b = 0; b < nb; ++b) put_half(row + b * 34, scale(rng));
    } else if (type == GgmlType::kQ4_0) {
      for (int64_t b = 0; b < nb; ++b) put_half(row + b * 18, scale(rng));
    } else if (type == GgmlType::kQ4_1) {
      for (int64_t b = 0; b < nb; ++b) {
        put_half(row + b * 20, scale(rng));
        put_half(row + b * 20 + 2, scale(rng));
      }
    } else if (type == GgmlType::kF32) {
      auto* f = reinterpret_cast<float*>(row);
      for (int64_t i = 0; i < cols; ++i) f[i] = scale(rng);
    } else if (type == GgmlType::kF16 || type == GgmlType::kBF16) {
      auto* h = reinterpret_cast<uint16_t*>(row);
      for (int64_t i = 0; i < cols; ++i) {
        h[i] = type == GgmlType::kF16 ? Fp32ToFp16(scale(rng)) : Fp32ToBf16(scale(rng));
      }
    }
  }
  return data;
}

class MatMulTest : public ::testing::TestWithParam<std::tuple<GgmlType, int>> {};

TEST_P(MatMulTest, MatchesScalarReference) {
  const auto [type, n_tokens] = GetParam();
  std::mt19937 rng(1234 + static_cast<int>(type) * 7 + n_tokens);
  const int64_t rows = 83, cols = 576;  // rows not a multiple of the thread grain
  std::vector<uint8_t> data = RandomRows(type, rows, cols, rng);
  WeightMatrix w{type, rows, cols, RowBytes(type, cols), data.data()};
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(n_tokens * cols);
  for (float& v : x) v = normal(rng);
  std::vector<float> y(n_tokens * rows, NAN);  // poisoned

  ThreadPool pool(2);
  MatMul(pool, w, x.data(), n_tokens, y.data());

  std::vector<Q8ActBlock> xq(cols / 32);
  for (int t = 0; t < n_tokens; ++t) {
    QuantizeActivationsQ8(&x[t * cols], xq.data(), cols);
    for (int64_t r = 0; r < rows; ++r) {
      float ref = DotRowReference(w, r, &x[t * cols], xq.data());
      float got = y[t * rows + r];
      // Same integer products; only fp32 summation order differs from the double reference.
      EXPECT_NEAR(got, ref, 1e-4f * (1.f + std::fabs(ref))) << "token " << t << " row " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Types, MatMulTest,
    ::testing::Combine(::testing::Values(GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0,
                                         GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16),
                       ::testing::Values(1, 5, 19)));  // 19: two 8-token tiles + 3

TEST(QuantizeActivations, ErrorBoundedByHalfStep) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::vector<float> x(256);
  for (float& v : x) v = normal(rng);
  std::vector<Q8ActBlock> q(8);
  QuantizeActivationsQ8(x.data(), q.data(), 256);
  for (int b = 0; b < 8; ++b) {
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      EXPECT_LE(std::fabs(q[b].d * q[b].qs[i] - x[b * 32 + i]), 0.5f * q[b].d + 1e-6f);
      sum += q[b].qs[i];
    }
    EXPECT_FLOAT_EQ(q[b].s, q[b].d * sum);
  }
}

TEST(ThreadPool, CoversRangeExactlyOnce) {
  ThreadPool pool(3);
  for (int64_t n : {1, 7, 100, 1001}) {
    std::vector<int> hits(n, 0);
    pool.ParallelFor(n, 4, [&](int, int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) ++hits[i];
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i], 1) << "n=" << n << " i=" << i;
  }
}

}  // namespace
}  // namespace deft
