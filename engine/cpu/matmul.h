// CPU matrix products of the forward pass: y = x W^T for a typed weight matrix W [rows, cols]
// and fp32 activations x [n_tokens, cols]. Quantized weights (Q4_0, Q4_1, Q8_0) are multiplied
// with activations quantized per 32-element block to int8 (as llama.cpp does), using AVX2 /
// AVX-512 VNNI integer dot products; F32/F16/BF16 weights use fp32 FMA; every other type is
// dequantized one row at a time into fp32. Rows are split across the thread pool.
//
// Thread safety: MatMul may be called from several threads at once (each call uses the pool).
#pragma once

#include <cstdint>
#include <span>

#include "engine/model/llama_weights.h"

namespace deft {

class ThreadPool;

// One 32-element block of int8-quantized activations: x[i] ~= d * qs[i]; s = d * sum(qs).
struct Q8ActBlock {
  float d;
  float s;
  int8_t qs[32];
};

// Quantizes n (multiple of 32) floats into n / 32 blocks (round to nearest, scale max|x|/127).
void QuantizeActivationsQ8(const float* x, Q8ActBlock* out, int64_t n);

// True when `type` is multiplied through quantized activations.
bool UsesQ8Activations(GgmlType type);

// Dot product of row `row` of w with activations; `xq` are the Q8 blocks of x when
// UsesQ8Activations(w.type), `x` the fp32 values otherwise. Scalar reference implementation,
// used by tests to check the SIMD kernels.
float DotRowReference(const WeightMatrix& w, int64_t row, const float* x, const Q8ActBlock* xq);

// y: [n_tokens, w.rows] = x: [n_tokens, w.cols] times w^T.
void MatMul(ThreadPool& pool, const WeightMatrix& w, const float* x, int64_t n_tokens, float* y);

// Several products over the same activations in one pass over the pool (the activations are
// quantized once): ys[i]: [n_tokens, ws[i]->rows]. REQUIRES: all ws have the same cols.
void MatMulMany(ThreadPool& pool, std::span<const WeightMatrix* const> ws, const float* x,
                int64_t n_tokens, std::span<float* const> ys);

// Gathers row `id` of an embedding matrix (any readable type) into out[cols] as fp32.
void EmbeddingRow(const WeightMatrix& w, int64_t id, float* out);

}  // namespace deft
