// cuBLASLt GEMM runner (kernels/model/gemm.h) against an fp64 CPU product of the same fp16/bf16
// operands, at decode and prefill shapes, fp32 and T outputs, overwrite and accumulate; the same
// for the row-invariant GEMM (invariant_gemm.h), whose rows must also not depend on m.
#include <random>
#include <vector>

#include "kernels/model/gemm.h"
#include "kernels/model/invariant_gemm.h"
#include "tests/gpu/gpu_test_util.h"

namespace deft::gpu::testing {
namespace {

using kernels::Dtype;

class GemmTest : public ::testing::TestWithParam<Dtype> {
 protected:
  void SetUp() override { DEFT_SKIP_WITHOUT_GPU(); }
};

TEST_P(GemmTest, MatchesFp64ReferenceAtStepShapes) {
  std::unique_ptr<kernels::GemmRunner> gemm;
  ASSERT_EQ(kernels::GemmRunner::Create(32 << 20, &gemm), cudaSuccess);
  const Dtype dt = GetParam();
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  struct Shape {
    int64_t m, n, k;
    bool row_invariant;
  };
  // The row-invariant kernel also at a k that is not a multiple of 8 (its scalar path).
  for (Shape s : {Shape{1, 3072, 1024, false}, Shape{50, 1024, 4096, false},
                  Shape{300, 1536, 576, false}, Shape{7, 2000, 256, false},
                  Shape{1, 3072, 1024, true}, Shape{50, 1024, 576, true}, Shape{7, 2000, 256, true},
                  Shape{5, 40, 100, true}}) {
    SCOPED_TRACE(s.row_invariant ? "row-invariant" : "cuBLASLt");
    std::vector<uint16_t> w(s.n * s.k), x(s.m * s.k);
    for (auto& v : w) v = RoundHalf(dt, u(rng) * 0.05f);
    for (auto& v : x) v = RoundHalf(dt, u(rng));
    std::vector<float> y0(s.m * s.n);
    for (auto& v : y0) v = u(rng);
    std::vector<float> ref(s.m * s.n);
    for (int64_t i = 0; i < s.m; ++i) {
      for (int64_t j = 0; j < s.n; ++j) {
        double acc = 0;
        for (int64_t k = 0; k < s.k; ++k) {
          acc += double{HalfValue(dt, x[i * s.k + k])} * HalfValue(dt, w[j * s.k + k]);
        }
        ref[i * s.n + j] = static_cast<float>(acc);
      }
    }
    DeviceBuffer d_w = Upload(w), d_x = Upload(x), d_acc = Upload(y0);
    DeviceBuffer d_y = Poisoned(s.m * s.n * 4), d_yt = Poisoned(s.m * s.n * 2);
    kernels::GemmParams p{s.m, s.n, s.k, d_w.get(), d_x.get(), d_y.get(), dt, Dtype::kFloat32};
    p.row_invariant = s.row_invariant;
    ASSERT_EQ(gemm->Run(p, nullptr), cudaSuccess) << gemm->last_error();
    p.y = d_yt.get();
    p.out_dtype = dt;
    ASSERT_EQ(gemm->Run(p, nullptr), cudaSuccess) << gemm->last_error();
    p.y = d_acc.get();
    p.out_dtype = Dtype::kFloat32;
    p.accumulate = true;
    ASSERT_EQ(gemm->Run(p, nullptr), cudaSuccess) << gemm->last_error();
    const auto y = Download<float>(d_y, s.m * s.n);
    const auto yt_bits = Download<uint16_t>(d_yt, s.m * s.n);
    const auto acc = Download<float>(d_acc, s.m * s.n);
    std::vector<float> yt(yt_bits.size()), ref_acc(ref.size());
    for (size_t i = 0; i < yt.size(); ++i) yt[i] = HalfValue(dt, yt_bits[i]);
    for (size_t i = 0; i < ref.size(); ++i) ref_acc[i] = ref[i] + y0[i];
    // fp32 accumulation of exact products: far under 1e-4; a T output adds one rounding.
    EXPECT_LT(RelL2(y, ref), 1e-4) << s.m << "x" << s.n << "x" << s.k;
    EXPECT_LT(RelL2(acc, ref_acc), 1e-4) << s.m << "x" << s.n << "x" << s.k;
    EXPECT_LT(RelL2(yt, ref), dt == Dtype::kBFloat16 ? 4e-3 : 5e-4) << s.m << "x" << s.n;
  }
}

// Row r of the row-invariant GEMM over m rows is bit-identical to the product of row r alone.
TEST_P(GemmTest, RowInvariantRowsDoNotDependOnM) {
  const Dtype dt = GetParam();
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int64_t k : {576, 100}) {
    const int64_t m = 9, n = 300;
    std::vector<uint16_t> w(n * k), x(m * k);
    for (auto& v : w) v = RoundHalf(dt, u(rng) * 0.05f);
    for (auto& v : x) v = RoundHalf(dt, u(rng));
    DeviceBuffer d_w = Upload(w), d_x = Upload(x), d_all = Poisoned(m * n * 4);
    kernels::GemmParams p{m, n, k, d_w.get(), d_x.get(), d_all.get(), dt, Dtype::kFloat32};
    ASSERT_EQ(kernels::RunRowInvariantGemm(p, nullptr), cudaSuccess);
    const auto all = Download<float>(d_all, m * n);
    for (int64_t r = 0; r < m; ++r) {
      DeviceBuffer d_row = Upload(std::vector<uint16_t>(x.begin() + r * k, x.begin() + (r + 1) * k));
      DeviceBuffer d_one = Poisoned(n * 4);
      kernels::GemmParams one{1, n, k, d_w.get(), d_row.get(), d_one.get(), dt, Dtype::kFloat32};
      ASSERT_EQ(kernels::RunRowInvariantGemm(one, nullptr), cudaSuccess);
      const auto got = Download<float>(d_one, n);
      for (int64_t j = 0; j < n; ++j) {
        ASSERT_EQ(got[j], all[r * n + j]) << "k " << k << " row " << r << " col " << j;
      }
    }
  }
}

TEST_P(GemmTest, RejectsFp32Operands) {
  std::unique_ptr<kernels::GemmRunner> gemm;
  ASSERT_EQ(kernels::GemmRunner::Create(0, &gemm), cudaSuccess);
  int dummy = 0;
  kernels::GemmParams p{1, 8, 8, &dummy, &dummy, &dummy, Dtype::kFloat32, Dtype::kFloat32};
  EXPECT_EQ(gemm->Run(p, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(kernels::RunRowInvariantGemm(p, nullptr), cudaErrorInvalidValue);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GemmTest, ::testing::Values(Dtype::kFloat16, Dtype::kBFloat16),
                         [](const auto& info) {
                           return info.param == Dtype::kFloat16 ? "fp16" : "bf16";
                         });

}  // namespace
}  // namespace deft::gpu::testing
