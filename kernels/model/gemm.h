// cuBLASLt GEMMs of a Llama step: y [m, n] (+)= x [m, k] * w[n, k]^T, row-major, with fp16 or
// bf16 operands, fp32 accumulation and an fp32 or T result. beta = 1 adds into y in place
// (the residual stream: attention output and MLP down projection land on x without another
// pass). m is the step's token count, n the output features, k the input features.
//
// The matmul descriptors, layouts and chosen algorithm are cached per shape (a decode step
// repeats the same 5 shapes over every layer); the algorithm is the fastest of cuBLASLt's
// heuristic candidates, timed on the first call of a shape (outside graph capture); the
// workspace is owned by the runner.
// Thread safety: one runner per stream (the cache is not locked).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>

#include "kernels/model/dtype.h"

namespace deft::kernels {

struct GemmParams {
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  const void* w = nullptr;  // [n, k], `in_dtype`
  const void* x = nullptr;  // [m, k], `in_dtype`
  void* y = nullptr;        // [m, n], `out_dtype`
  Dtype in_dtype = Dtype::kBFloat16;
  Dtype out_dtype = Dtype::kFloat32;
  bool accumulate = false;  // y += ... (beta = 1) instead of y = ...
  // Row i of y independent of m (RunRowInvariantGemm, invariant_gemm.h) instead of cuBLASLt.
  bool row_invariant = false;
};

class GemmRunner {
 public:
  // Creates the cuBLASLt handle and a workspace of `workspace_bytes`.
  static cudaError_t Create(size_t workspace_bytes, std::unique_ptr<GemmRunner>* out);
  ~GemmRunner();
  // cudaErrorInvalidValue for bad shapes or dtypes; cudaErrorNotSupported when cuBLASLt has no
  // algorithm for the shape or fails (last_error() then names the cuBLAS status).
  cudaError_t Run(const GemmParams& p, cudaStream_t stream);
  const std::string& last_error() const { return last_error_; }

 private:
  struct Impl;
  GemmRunner();
  std::unique_ptr<Impl> impl_;
  std::string last_error_;
};

}  // namespace deft::kernels
