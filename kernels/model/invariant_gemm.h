// A row-invariant GEMM for batch-invariant steps: y [m, n] (+)= x [m, k] * w[n, k]^T with the
// same operands and accumulation as GemmRunner (fp16/bf16 in, fp32 accumulate, fp32 or T out),
// computed so that row i of y is bit-identical whatever m is and wherever the row sits in x:
// every output is one warp's dot product over k in a fixed order (each lane a fixed stride of
// k, then a fixed shuffle tree). cuBLASLt picks its algorithm (tiles, split-K) per m, so a
// token's logits there depend on how many other tokens share its step; here they do not. Slower
// than cuBLASLt (weights are read once per 4 rows): meant for exact/batch-invariant serving and
// tests, not for throughput.
// Errors: cudaErrorInvalidValue for bad shapes or dtypes, else the launch's error.
#pragma once

#include <cuda_runtime.h>

#include "kernels/model/gemm.h"

namespace deft::kernels {

cudaError_t RunRowInvariantGemm(const GemmParams& p, cudaStream_t stream);

}  // namespace deft::kernels
