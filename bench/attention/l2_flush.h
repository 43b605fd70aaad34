// L2 flush before a timed GPU run (see l2_flush.cu for the two modes and why both exist).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace deft::bench {

enum class FlushMode { kRead, kMemset };

// Enqueues the flush of `bytes` of `buffer` (>= 2x the L2) on `stream`.
cudaError_t FlushL2(void* buffer, size_t bytes, FlushMode mode, uint32_t salt, cudaStream_t stream);

}  // namespace deft::bench
