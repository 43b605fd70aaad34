// wgmma (sm_90a warpgroup MMA) wrappers for the tree attention chunk kernel: A from registers
// (the mma.sync m16n8k16 A-fragment layout per warp, warp w holding rows 16w..16w+15 of the 64),
// B from shared memory through a matrix descriptor, fp32 accumulators in the m16n8 C-fragment
// layout per 8 columns (d[j][e]: row lane/4 + 8 * (e >= 2), column 8j + 2 * (lane % 4) + e % 2).
// scale_d = 0 overwrites d, 1 accumulates. Each call only issues the MMA: the caller brackets
// them with WgmmaFence / WgmmaCommit / WgmmaWait. Included only where __CUDA_ARCH_FEAT_SM90_ALL.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace deft::kernels {

// d[8][4] += A (registers) x B (descriptor) for m64n64k16; TY is the PTX type, TRANS the
// B transpose immediate (0: K-major, 1: MN-major).
#define DEFT_WGMMA_N64(NAME, TY, TRANS)                                                   \
  __device__ static void NAME(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc,        \
                              int scale_d) {                                            \
    asm volatile(                                                                        \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                      \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                      \
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"  \
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "  \
        "{%32,%33,%34,%35}, %36, p, 1, 1, " #TRANS ";\n}\n"               \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),   \
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),   \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),   \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),   \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),   \
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),   \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),   \
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));              \
  }

// d[16][4] += A (registers) x B (descriptor) for m64n128k16; TY is the PTX type, TRANS the
// B transpose immediate (0: K-major, 1: MN-major).
#define DEFT_WGMMA_N128(NAME, TY, TRANS)                                                   \
  __device__ static void NAME(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc,        \
                              int scale_d) {                                            \
    asm volatile(                                                                        \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                      \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                      \
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"  \
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"  \
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"  \
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "  \
        "{%64,%65,%66,%67}, %68, p, 1, 1, " #TRANS ";\n}\n"               \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),   \
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),   \
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),   \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),   \
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),   \
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),   \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),   \
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),   \
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),   \
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),   \
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),   \
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),   \
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),   \
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),   \
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),   \
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));              \
  }

template <typename T>
struct Wgmma;
// N64: S = Q K^T over a 64-token sub-tile (B = K, K-major: tokens x head dims, dims contiguous).
// N64Trans / N128Trans: O += P V (B = V, MN-major: the head dims are the N dimension, contiguous).
#define DEFT_WGMMA_OPS(T, TY)         \
  template <>                         \
  struct Wgmma<T> {                   \
    DEFT_WGMMA_N64(N64, TY, 0)        \
    DEFT_WGMMA_N64(N64Trans, TY, 1)   \
    DEFT_WGMMA_N128(N128Trans, TY, 1) \
  };
DEFT_WGMMA_OPS(__half, "f16")
DEFT_WGMMA_OPS(__nv_bfloat16, "bf16")
#undef DEFT_WGMMA_OPS
#undef DEFT_WGMMA_N64
#undef DEFT_WGMMA_N128

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaWaitAll() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Orders the accumulators' later uses after the wait (the asm claims to rewrite them).
template <int N>
__device__ __forceinline__ void WgmmaFenceOperands(float (&d)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
  }
}

// Shared-memory matrix descriptor with the 128-byte swizzle (Swizzle<3,4,3>: the 16-byte chunk
// index of a 128-byte row XOR the row index mod 8, over 1024-byte-aligned 8-row atoms).
// K-major (rows of the N dimension, 128 bytes of K each): lbo unused, sbo = 1024 (8 rows).
// MN-major (rows of the K dimension, 128 bytes = 64 N-elements each): lbo = bytes between
// 64-element N blocks, sbo = 1024 (8 K rows).
__device__ __forceinline__ uint64_t SmemDescSw128(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (1ull << 62);
}

// The same descriptor in two words, for issuing many wgmma from one base: the low word (address
// and lbo) of a base address, to which byte offsets >> 4 are added (shared addresses are below
// 2^18, so the 14-bit address field never carries), and the constant high word (sbo, swizzle).
__device__ __forceinline__ uint32_t SmemDescSw128Lo(uint32_t addr, uint32_t lbo) {
  return ((addr & 0x3ffff) >> 4) | ((lbo >> 4) << 16);
}
constexpr uint32_t SmemDescSw128Hi(uint32_t sbo) { return (sbo >> 4) | (1u << 30); }
__device__ __forceinline__ uint64_t SmemDesc(uint32_t lo, uint32_t hi) {
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

}  // namespace deft::kernels
