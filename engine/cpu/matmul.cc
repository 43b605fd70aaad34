#include "engine/cpu/matmul.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "engine/cpu/simd.h"
#include "engine/gguf/ggml_types.h"
#include "engine/util/thread_pool.h"

namespace deft {
namespace {

// Block layouts of the types with integer kernels (ggml-common.h).
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];  // element j: qs[j] & 15, element j + 16: qs[j] >> 4; value (q - 8) * d
};
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[16];  // value q * d + m
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ8_0) == 34);

using simd::HorizontalSum;

// Sum over 32 lanes of u8 a[i] * s8 b[i], as 8 int32 partial sums.
inline __m256i DotU8S8(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

inline __m256i UnpackNibbles(const uint8_t* qs) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  __m128i mask = _mm_set1_epi8(0x0F);
  __m128i lo = _mm_and_si128(raw, mask);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  return _mm256_set_m128i(hi, lo);
}

float DotQ4_1(const BlockQ4_1* w, const Q8ActBlock* x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float offset = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i q = UnpackNibbles(w[b].qs);
    __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
    __m256 p = _mm256_cvtepi32_ps(DotU8S8(q, y));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(simd::HalfToFloat(w[b].d) * x[b].d), p, acc);
    offset += simd::HalfToFloat(w[b].m) * x[b].s;
  }
  return HorizontalSum(acc) + offset;
}

float DotQ4_0(const BlockQ4_0* w, const Q8ActBlock* x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float offset = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i q = UnpackNibbles(w[b].qs);
    __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
    __m256 p = _mm256_cvtepi32_ps(DotU8S8(q, y));
    float d = simd::HalfToFloat(w[b].d);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x[b].d), p, acc);
    offset -= 8.f * d * x[b].s;
  }
  return HorizontalSum(acc) + offset;
}

float DotQ8_0(const BlockQ8_0* w, const Q8ActBlock* x, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs));
    __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs));
    // u8 x s8 product: |q| times y carrying q's sign.
    __m256i p32 = DotU8S8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(simd::HalfToFloat(w[b].d) * x[b].d),
                          _mm256_cvtepi32_ps(p32), acc);
  }
  return HorizontalSum(acc);
}

// kT tokens at once against one weight row (prefill): each weight block is loaded and unpacked
// once for all kT tokens. Token t's blocks start at x + t * nb; its result goes to y[t * y_stride].
template <int kT>
void DotQ4_1Multi(const BlockQ4_1* w, const Q8ActBlock* x, int64_t nb, float* y, int64_t y_stride) {
  __m256 acc[kT];
  float offset[kT];
  for (int t = 0; t < kT; ++t) acc[t] = _mm256_setzero_ps(), offset[t] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i q = UnpackNibbles(w[b].qs);
    const float d = simd::HalfToFloat(w[b].d), m = simd::HalfToFloat(w[b].m);
    for (int t = 0; t < kT; ++t) {
      const Q8ActBlock& xb = x[t * nb + b];
      __m256i yv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.qs));
      acc[t] =
          _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(DotU8S8(q, yv)), acc[t]);
      offset[t] += m * xb.s;
    }
  }
  for (int t = 0; t < kT; ++t) y[t * y_stride] = HorizontalSum(acc[t]) + offset[t];
}

template <int kT>
void DotQ4_0Multi(const BlockQ4_0* w, const Q8ActBlock* x, int64_t nb, float* y, int64_t y_stride) {
  __m256 acc[kT];
  float offset[kT];
  for (int t = 0; t < kT; ++t) acc[t] = _mm256_setzero_ps(), offset[t] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i q = UnpackNibbles(w[b].qs);
    const float d = simd::HalfToFloat(w[b].d);
    for (int t = 0; t < kT; ++t) {
      const Q8ActBlock& xb = x[t * nb + b];
      __m256i yv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.qs));
      acc[t] =
          _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(DotU8S8(q, yv)), acc[t]);
      offset[t] -= 8.f * d * xb.s;
    }
  }
  for (int t = 0; t < kT; ++t) y[t * y_stride] = HorizontalSum(acc[t]) + offset[t];
}

template <int kT>
void DotQ8_0Multi(const BlockQ8_0* w, const Q8ActBlock* x, int64_t nb, float* y, int64_t y_stride) {
  __m256 acc[kT];
  for (int t = 0; t < kT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs));
    const __m256i abs_q = _mm256_sign_epi8(q, q);
    const float d = simd::HalfToFloat(w[b].d);
    for (int t = 0; t < kT; ++t) {
      const Q8ActBlock& xb = x[t * nb + b];
      __m256i yv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.qs));
      __m256i p32 = DotU8S8(abs_q, _mm256_sign_epi8(yv, q));
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p32), acc[t]);
    }
  }
  for (int t = 0; t < kT; ++t) y[t * y_stride] = HorizontalSum(acc[t]);
}

// Tokens per multi-token call. SmolLM2 prefill of 512 tokens on 2 cores (2026-11-23): 2 tokens
// 295 tok/s, 4: 366, 8: 437-461, 12: 418, 16: 453. 8 accumulators also fit AVX2's 16 registers.
constexpr int kTokenTile = 8;

// True when rows of this type have a multi-token kernel.
bool HasMultiTokenKernel(GgmlType type) {
  return type == GgmlType::kQ4_1 || type == GgmlType::kQ4_0 || type == GgmlType::kQ8_0;
}

// y[t * rows + r] for kTokenTile tokens starting at xq (Q8 blocks, nb per token), r in [r0, r1).
void DotRowsMulti(const WeightMatrix& w, int64_t r0, int64_t r1, const Q8ActBlock* xq, float* y) {
  const int64_t nb = w.cols / 32, rows = w.rows;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.row(r);
    switch (w.type) {
      case GgmlType::kQ4_1:
        DotQ4_1Multi<kTokenTile>(reinterpret_cast<const BlockQ4_1*>(row), xq, nb, y + r, rows);
        break;
      case GgmlType::kQ4_0:
        DotQ4_0Multi<kTokenTile>(reinterpret_cast<const BlockQ4_0*>(row), xq, nb, y + r, rows);
        break;
      default:  // kQ8_0
        DotQ8_0Multi<kTokenTile>(reinterpret_cast<const BlockQ8_0*>(row), xq, nb, y + r, rows);
        break;
    }
  }
}

inline float DotF32(const float* w, const float* x, int64_t n) { return simd::Dot(w, x, n); }

inline __m256 LoadF16x8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 LoadBf16x8(const uint16_t* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

template <bool kBf16>
float DotHalf(const uint16_t* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 w0 = kBf16 ? LoadBf16x8(w + i) : LoadF16x8(w + i);
    __m256 w1 = kBf16 ? LoadBf16x8(w + i + 8) : LoadF16x8(w + i + 8);
    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), a1);
  }
  float s = HorizontalSum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) s += (kBf16 ? Bf16ToFp32(w[i]) : simd::HalfToFloat(w[i])) * x[i];
  return s;
}

bool HasDirectKernel(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ8_0:
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kBF16:
      return true;
    default:
      return false;
  }
}

// y[r] for r in [r0, r1): rows of w dotted with one token's activations (x fp32, xq its Q8 blocks).
// REQUIRES: HasDirectKernel(w.type).
void DotRows(const WeightMatrix& w, int64_t r0, int64_t r1, const float* x, const Q8ActBlock* xq,
             float* y) {
  const int64_t cols = w.cols, nb = cols / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.row(r);
    switch (w.type) {
      case GgmlType::kQ4_1:
        y[r] = DotQ4_1(reinterpret_cast<const BlockQ4_1*>(row), xq, nb);
        break;
      case GgmlType::kQ4_0:
        y[r] = DotQ4_0(reinterpret_cast<const BlockQ4_0*>(row), xq, nb);
        break;
      case GgmlType::kQ8_0:
        y[r] = DotQ8_0(reinterpret_cast<const BlockQ8_0*>(row), xq, nb);
        break;
      case GgmlType::kF32:
        y[r] = DotF32(reinterpret_cast<const float*>(row), x, cols);
        break;
      case GgmlType::kF16:
        y[r] = DotHalf<false>(reinterpret_cast<const uint16_t*>(row), x, cols);
        break;
      default:  // kBF16
        y[r] = DotHalf<true>(reinterpret_cast<const uint16_t*>(row), x, cols);
        break;
    }
  }
}

// Rows handled together so that each weight row is read from cache, not memory, for every token.
constexpr int64_t kRowGrain = 16;

thread_local std::vector<Q8ActBlock> tls_xq;
thread_local std::vector<float> tls_row;

}  // namespace

bool UsesQ8Activations(GgmlType type) {
  return type == GgmlType::kQ4_0 || type == GgmlType::kQ4_1 || type == GgmlType::kQ8_0;
}

void QuantizeActivationsQ8(const float* x, Q8ActBlock* out, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* v = x + b * 32;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
    float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      int q = static_cast<int>(std::nearbyint(v[i] * id));
      out[b].qs[i] = static_cast<int8_t>(q);
      sum += q;
    }
    out[b].d = d;
    out[b].s = d * static_cast<float>(sum);
  }
}

float DotRowReference(const WeightMatrix& w, int64_t row, const float* x, const Q8ActBlock* xq) {
  const uint8_t* r = w.row(row);
  double s = 0;
  switch (w.type) {
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ8_0: {
      // Integer dot per block, exactly what the SIMD kernel computes up to fp32 rounding.
      for (int64_t b = 0; b < w.cols / 32; ++b) {
        int32_t acc = 0;
        float d, m = 0.f;
        if (w.type == GgmlType::kQ8_0) {
          auto* blk = reinterpret_cast<const BlockQ8_0*>(r) + b;
          for (int i = 0; i < 32; ++i) acc += blk->qs[i] * xq[b].qs[i];
          d = Fp16ToFp32(blk->d);
        } else {
          const uint8_t* qs;
          if (w.type == GgmlType::kQ4_1) {
            auto* blk = reinterpret_cast<const BlockQ4_1*>(r) + b;
            qs = blk->qs;
            d = Fp16ToFp32(blk->d);
            m = Fp16ToFp32(blk->m);
          } else {
            auto* blk = reinterpret_cast<const BlockQ4_0*>(r) + b;
            qs = blk->qs;
            d = Fp16ToFp32(blk->d);
            m = -8.f * d;
          }
          for (int i = 0; i < 16; ++i) {
            acc += (qs[i] & 15) * xq[b].qs[i] + (qs[i] >> 4) * xq[b].qs[i + 16];
          }
        }
        s += static_cast<double>(d) * xq[b].d * acc + static_cast<double>(m) * xq[b].s;
      }
      return static_cast<float>(s);
    }
    default: {
      std::vector<float> row_f32(w.cols);
      DequantizeRow(w.type, r, row_f32.data(), w.cols);
      for (int64_t i = 0; i < w.cols; ++i) s += static_cast<double>(row_f32[i]) * x[i];
      return static_cast<float>(s);
    }
  }
}

void MatMul(ThreadPool& pool, const WeightMatrix& w, const float* x, int64_t n_tokens, float* y) {
  const WeightMatrix* ws[] = {&w};
  float* ys[] = {y};
  MatMulMany(pool, ws, x, n_tokens, ys);
}

void MatMulMany(ThreadPool& pool, std::span<const WeightMatrix* const> ws, const float* x,
                int64_t n_tokens, std::span<float* const> ys) {
  const int64_t cols = ws[0]->cols, nb = cols / 32;
  const Q8ActBlock* xq = nullptr;
  bool any_q8 = false;
  for (const WeightMatrix* w : ws) any_q8 = any_q8 || UsesQ8Activations(w->type);
  if (any_q8) {
    tls_xq.resize(static_cast<size_t>(n_tokens * nb));
    for (int64_t t = 0; t < n_tokens; ++t) {
      QuantizeActivationsQ8(x + t * cols, &tls_xq[t * nb], cols);
    }
    xq = tls_xq.data();
  }
  // Global row index space: the matrices' rows one after another.
  std::vector<int64_t> starts(ws.size() + 1, 0);
  for (size_t i = 0; i < ws.size(); ++i) starts[i + 1] = starts[i] + ws[i]->rows;
  pool.ParallelFor(starts.back(), kRowGrain, [&](int, int64_t g0, int64_t g1) {
    for (size_t m = 0; m < ws.size(); ++m) {
      const int64_t r0 = std::max(g0, starts[m]) - starts[m];
      const int64_t r1 = std::min(g1, starts[m + 1]) - starts[m];
      if (r0 >= r1) continue;
      const WeightMatrix& w = *ws[m];
      float* y = ys[m];
      const int64_t rows = w.rows;
      if (!HasDirectKernel(w.type)) {
        // Dequantize each row once into fp32 and use it for every token.
        tls_row.resize(static_cast<size_t>(cols));
        for (int64_t r = r0; r < r1; ++r) {
          DequantizeRow(w.type, w.row(r), tls_row.data(), cols);
          for (int64_t t = 0; t < n_tokens; ++t) {
            y[t * rows + r] = DotF32(tls_row.data(), x + t * cols, cols);
          }
        }
        continue;
      }
      // Blocks of rows small enough to stay in L1/L2 while every token passes over them.
      for (int64_t rb = r0; rb < r1; rb += kRowGrain) {
        const int64_t re = std::min(r1, rb + kRowGrain);
        int64_t t = 0;
        if (HasMultiTokenKernel(w.type)) {
          for (; t + kTokenTile <= n_tokens; t += kTokenTile) {
            DotRowsMulti(w, rb, re, xq + t * nb, y + t * rows);
          }
        }
        for (; t < n_tokens; ++t) {
          DotRows(w, rb, re, x + t * cols, xq ? xq + t * nb : nullptr, y + t * rows);
        }
      }
    }
  });
}

void EmbeddingRow(const WeightMatrix& w, int64_t id, float* out) {
  DequantizeRow(w.type, w.row(id), out, w.cols);
}

}  // namespace deft
