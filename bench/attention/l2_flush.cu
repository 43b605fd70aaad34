// L2 flush for the GPU benchmarks: evicts the step's data from L2 before each timed run.
//
// Two ways, because they leave L2 in different states:
//  - kRead (default): a kernel reads the flush buffer (and writes nothing), so L2 ends up full of
//    clean lines of an unrelated buffer, as after the GEMMs that precede attention in a model
//    step (they read weights). The timed kernel's reads then cost only their own HBM traffic.
//  - kMemset: cudaMemsetAsync over the buffer (what Triton's do_bench does with cache.zero_()):
//    L2 ends up full of dirty lines, and the timed kernel's reads evict them, so up to 50 MB of
//    write-back lands inside its time. Kept to compare with anchors measured that way.
#include "bench/attention/l2_flush.h"

#include <cstdint>

namespace deft::bench {
namespace {

__global__ void ReadFlushKernel(const uint4* __restrict__ p, size_t n, uint32_t never, uint32_t* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == never) *sink = acc;  // practically never taken; keeps the loads alive
}

}  // namespace

cudaError_t FlushL2(void* buffer, size_t bytes, FlushMode mode, uint32_t salt, cudaStream_t stream) {
  if (mode == FlushMode::kMemset) return cudaMemsetAsync(buffer, salt & 0xff, bytes, stream);
  // The sink is the buffer's first word: a (practically impossible) write there changes nothing
  // that is timed.
  ReadFlushKernel<<<132 * 8, 512, 0, stream>>>(static_cast<const uint4*>(buffer), bytes / 16,
                                               0x9e3779b9u ^ salt, static_cast<uint32_t*>(buffer));
  return cudaGetLastError();
}

}  // namespace deft::bench
