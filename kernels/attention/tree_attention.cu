// DeFT tree attention kernels: the chunk kernel (partial states per plan entry) and the merge
// kernel (per-query log-sum-exp reduction in plan order). See tree_attention.h for the contract.
//
// Chunk kernel, per CTA = (work item, KV head), 4 warps, 3 CTAs per SM (168 registers):
//  - rows: tile row r (0..63) is chunk row work_row + r = entry * group + g. On sm_90a every
//    tile runs on wgmma (warp w owns rows 16w..16w+15, a tile of a few rows leaves the others
//    empty). Where wgmma is missing, mma.sync: warp w owns rows 16 * (w / S) .. +15 and, within
//    each 64-token sub-tile, tokens (w % S) * 64/S .. +64/S, where S = 4 / (number of 16-row
//    groups) (1 group: 4 warps split the tokens; 2: 2x2; 3-4: 1).
//  - K/V: 64-token sub-tiles gathered slot by slot (16-byte cp.async, zero-filled past the chunk)
//    into a 2-stage ring; rows of head_dim values swizzled (16-byte column chunk XOR token & 7)
//    so ldmatrix and wgmma read them without bank conflicts. Slot ids: a shared-memory ring
//    filled by cp.async ahead of the copies (wgmma: a wgmma fence waits for every pending
//    register load), or registers one sub-tile ahead (mma.sync).
//  - math: S = Q K^T (fp32 accumulate), scores in log2 domain, online softmax per row, P
//    rounded to T for O += P V. Masked tokens get -inf.
//  - end: S > 1 warps of a row group merge through shared memory; partial o is normalized and
//    stored in T (16-byte pieces of rows, staged in shared memory), lse = ln(sum) + max in
//    natural log, fp32.
// Merge kernel: one warp per (query, head), entries in plan order, weights exp(lse - max), sums
// in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string_view>

#include "kernels/attention/tree_attention.h"
#include "kernels/attention/wgmma_ops.cuh"

namespace deft::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
// Tokens per sub-tile (32 or 64; a mask word covers 64) and ring depth (kStages - 1 sub-tiles in
// flight while one is computed). Overridable at build time for the sweeps in bench/RESULTS.md.
#ifndef DEFT_ATTN_SUB_TOKENS
#define DEFT_ATTN_SUB_TOKENS 64
#endif
// CTAs per SM the chunk kernel is compiled for (registers per thread: 64K / (128 x this)). At
// 3 (168 registers; 2 stages, 66 KiB of shared memory per CTA) every tile runs on wgmma: the
// mma.sync path for tiles of up to 16 rows would spill there. Measured on the H100 against
// 2 CTAs of 3 stages with mma.sync for those tiles (bench/RESULTS.md): 6-17% faster on every row.
#ifndef DEFT_ATTN_STAGES
#define DEFT_ATTN_STAGES 2
#endif
#ifndef DEFT_ATTN_MIN_BLOCKS
#define DEFT_ATTN_MIN_BLOCKS 3
#endif
#define DEFT_ATTN_SUB_TOKENS_IS_64 (DEFT_ATTN_SUB_TOKENS == 64)
// wgmma exists on sm_90a only (the arch-specific feature set); other targets use mma.sync alone.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && DEFT_ATTN_SUB_TOKENS_IS_64
#define DEFT_ATTN_WGMMA 1
#else
#define DEFT_ATTN_WGMMA 0
#endif
constexpr int kSubTokens = DEFT_ATTN_SUB_TOKENS;
constexpr int kStages = DEFT_ATTN_STAGES;
static_assert(kSubTokens == 32 || kSubTokens == 64, "sub-tile of 32 or 64 tokens");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLazyMax = 8.f;  // see SoftmaxScores

struct ChunkParams {
  const void* q;
  const void* k;
  const void* v;
  uint32_t kv_slot_bytes;  // bytes between consecutive slots
  int32_t num_heads, num_kv_heads, group;
  float scale_log2;  // log2(e) / sqrt(head_dim)
  TreeAttentionPlanView plan;
  void* part_o;     // [num_entries, num_heads, head_dim] of T (normalized: o / l)
  float* part_lse;  // [num_entries, num_heads]
  bool skip_masked;
  unsigned long long* trace;  // DEFT_ATTN_TRACE builds: this kernel's records (see the header)
};

#ifndef DEFT_ATTN_TRACE
#define DEFT_ATTN_TRACE 0
#endif
__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#if DEFT_ATTN_TRACE
__device__ __forceinline__ unsigned SmId() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}
#endif
__global__ void TraceStampKernel(unsigned long long* trace, long long chunk_ctas,
                                 long long merge_ctas) {
  trace[0] = GlobalTimer();
  trace[1] = chunk_ctas;
  trace[2] = merge_ctas;
}

template <typename T>
struct MmaOp;
template <>
struct MmaOp<__half> {
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct MmaOp<__nv_bfloat16> {
  __device__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: zero-fill (past the chunk's end)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
// The same with an L2 cache policy (EvictFirstPolicy).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid,
                                          uint64_t policy) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
               "l"(src), "r"(bytes), "l"(policy));
}
// The L2 policy of the K/V copies of a work item no other CTA reads from (the chunk's only
// work item in a plan whose chunks share no slots: the work item's sole-reader bit):
// evict-first, so the copied lines are the first the L2 replaces and the stream of a step's
// K/V does not evict lines other work still holds in L2, dirty lines of earlier kernels
// included, whose write-back would otherwise share the DRAM with the reads (measured on the
// H100 after a 256 MB memset: 1.8-3.3 us off a step on the rows with such chunks, none after a
// read flush; bench/RESULTS.md). The copies of chunks several work items read carry no hint
// (their readers meet in L2; an evict-normal policy there measured up to 12% slower,
// evict-unchanged up to 0.5 us).
__device__ __forceinline__ uint64_t EvictFirstPolicy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// A global load the compiler issues in program order with the other volatile loads: the
// prologue's loads of one round then go out before the wait for an earlier round's results
// (left to itself the compiler issued the plan rows after the copies, which wait for the slot
// ids: one more round trip before Q).
__device__ __forceinline__ int LoadOrdered(const int32_t* p) {
  int v;
  asm volatile("ld.volatile.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Byte offset of (token, 16-byte column chunk) in a sub-tile of K or V: the head dims are cut in
// 64-value halves, each stored as [tokens][128 bytes] with the 128-byte swizzle (16-byte chunk
// XOR token mod 8). That is wgmma's canonical SW128 layout (K-major for K, MN-major for V, atoms
// of 8 tokens x 128 bytes; the ring is 1024-byte aligned), and ldmatrix of 8 tokens at one chunk
// is conflict-free.
constexpr int kHalfBytes = kSubTokens * 128;  // one 64-dim half of a sub-tile
template <int D>
__device__ __forceinline__ uint32_t TileOffset(int token, int chunk16) {
  return static_cast<uint32_t>((chunk16 >> 3) * kHalfBytes + token * 128 +
                               (((chunk16 & 7) ^ (token & 7)) << 4));
}

// Slot ids travel through shared memory: a ring of kIdSlots sub-tiles' ids, copied by cp.async
// (4 bytes per token, zeros past the chunk) kIdAhead sub-tiles before their K/V copies read them.
// Held in registers instead, a sub-tile's id loads were still in flight at the next wgmma fence,
// which waits for every pending register load: one global round trip per sub-tile. Within a
// ring slot the ids are stored in the order the copy threads take them (SubTileSlots: a
// thread's tokens are kTokStep apart), so a thread reads its ids with 16-byte loads.
constexpr int kIdAhead = kStages - 1;          // ids copied this many sub-tiles before their K/V
// Ids of sub-tiles next .. next + kIdAhead are live; a power of two makes `sub % kIdSlots` a mask.
constexpr int kIdSlots = (kStages + 1) <= 4 ? 4 : 8;
static_assert(kStages + 1 <= kIdSlots, "id ring too small");
constexpr int kIdBytes = kIdSlots * kSubTokens * 4;

template <typename T, int D>
struct ChunkKernel {
  static constexpr int kChunk16 = D / 8;                       // 16-byte chunks per row
  static constexpr int kSubBytes = kSubTokens * D * 2;         // one of K or V
  static constexpr int kStageBytes = 2 * kSubBytes;            // K then V
  static constexpr int kRingBytes = kStages * kStageBytes;     // D=128: 96 KiB, D=64: 48 KiB
  static constexpr int kMergeBytes = kWarps * 16 * (D + 2) * 4;  // o, m, l per warp row
  static_assert(kMergeBytes + kWarps * 16 * (D * 2 + 16) <= kRingBytes, "partials' staging");
  // + 1 KiB: the ring starts at the first 1024-byte boundary (the swizzle atoms' alignment).
  // + the slot id ring after them.
  static constexpr int kSmemBytes =
      (kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes) + 1024 + kIdBytes;
  static constexpr int kIdOffset = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;
  static constexpr int kKSteps = D / 16;
  static constexpr int kDTiles = D / 8;
};

// 4-byte cp.async (zero-fill when !valid; src then not read).
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

// Copies the slot ids of sub-tile `sub` into its id slot (threads 0..kSubTokens-1, one each),
// token t at position (t % kTokStep) * kPer + t / kTokStep (see SubTileSlots).
template <int D>
__device__ __forceinline__ void LoadSlotIds(const ChunkParams& p, uint32_t ids, int chunk_first,
                                            int chunk_len, int sub) {
  constexpr int kTokStep = kThreads / (D / 8), kPer = kSubTokens / kTokStep;
  const int t = static_cast<int>(threadIdx.x);
  if (t < kSubTokens) {
    const int token = sub * kSubTokens + t;
    const bool valid = token < chunk_len;
    const int pos = (t % kTokStep) * kPer + t / kTokStep;
    CpAsync4(ids + ((sub & (kIdSlots - 1)) * kSubTokens + pos) * 4,
             p.plan.kv_slots + chunk_first + (valid ? token : 0), valid);
  }
}

// Slot ids of sub-tile `sub` for this thread's pieces and how many of the sub-tile's tokens from
// the thread's first lie inside the chunk (piece j is valid while j * kTokStep < here; ids past
// the chunk are 0 and not read). Piece j of a thread is
// 16-byte column chunk c16 = threadIdx.x % kChunk16 of token t0 + j * kTokStep of the sub-tile,
// t0 = threadIdx.x / kChunk16, kTokStep = kThreads / kChunk16 (8 for D = 128, 16 for D = 64). As
// kTokStep is a multiple of 8, the swizzle (token mod 8) is the same for all of a thread's pieces
// and their shared-memory offsets step by kTokStep rows: the copy loop is an address add and a
// multiply-add per piece. From global memory (LoadSlots, one sub-tile ahead of the copy in the
// mma.sync loop) or from the id ring (SlotsFromRing, the wgmma loop).
template <typename T, int D>
struct SubTileSlots {
  static constexpr int kPer = kSubTokens * (D / 8) / kThreads;
  static constexpr int kTokStep = kThreads / (D / 8);
  static_assert(kTokStep % 8 == 0, "a thread's pieces share their swizzle");
  static_assert(kPer % 4 == 0, "ids read 4 at a time from the ring");
  int id[kPer];
  int here;
};

template <typename T, int D>
__device__ __forceinline__ void LoadSlots(const ChunkParams& p, int chunk_first, int chunk_len,
                                          int sub, SubTileSlots<T, D>& s) {
  using S = SubTileSlots<T, D>;
  const int t0 = sub * kSubTokens + static_cast<int>(threadIdx.x) / (D / 8);
  const int32_t* ids = p.plan.kv_slots + chunk_first;
  s.here = chunk_len - t0;
#pragma unroll
  for (int j = 0; j < S::kPer; ++j) {
    const int t = t0 + j * S::kTokStep;
    s.id[j] = t < chunk_len ? __ldg(ids + t) : 0;
  }
}

template <typename T, int D>
__device__ __forceinline__ void SlotsFromRing(const int32_t* ids, int chunk_len, int sub,
                                              SubTileSlots<T, D>& s) {
  using S = SubTileSlots<T, D>;
  const int t0 = static_cast<int>(threadIdx.x) / (D / 8);
  const int4* mine =
      reinterpret_cast<const int4*>(ids + (sub & (kIdSlots - 1)) * kSubTokens + t0 * S::kPer);
  s.here = chunk_len - sub * kSubTokens - t0;
#pragma unroll
  for (int j = 0; j < S::kPer / 4; ++j) {
    const int4 v = mine[j];
    s.id[4 * j] = v.x;
    s.id[4 * j + 1] = v.y;
    s.id[4 * j + 2] = v.z;
    s.id[4 * j + 3] = v.w;
  }
}

// Issues the cp.async copies of one sub-tile (slot ids from LoadSlots or SlotsFromRing) into
// ring slot `slot`. Per piece: a 32 x 32 -> 64-bit multiply (slot id x slot bytes), two 64-bit
// adds and the two copies.
template <typename T, int D>
__device__ __forceinline__ void LoadSubTile(const ChunkParams& p, uint8_t* smem, int slot,
                                            const SubTileSlots<T, D>& s, int kv_head,
                                            bool sole_reader) {
  using K = ChunkKernel<T, D>;
  using S = SubTileSlots<T, D>;
  static_assert(kSubTokens * K::kChunk16 % kThreads == 0, "pieces per thread");
  const int c16 = static_cast<int>(threadIdx.x) % K::kChunk16;
  const int t0 = static_cast<int>(threadIdx.x) / K::kChunk16;
  const uint32_t kdst = SmemAddr(smem + slot * K::kStageBytes) + TileOffset<D>(t0, c16);
  const uint32_t vdst = kdst + K::kSubBytes;
  const uint32_t col = static_cast<uint32_t>((kv_head * D + c16 * 8) * sizeof(T));
  const char* kb = static_cast<const char*>(p.k) + col;
  const char* vb = static_cast<const char*>(p.v) + col;
  const uint32_t stride = p.kv_slot_bytes;  // < 2^32 (RunTreeAttention)
  const auto copy = [&](auto... policy) {
#pragma unroll
    for (int j = 0; j < S::kPer; ++j) {
      const bool valid = j * S::kTokStep < s.here;
      const uint32_t row = static_cast<uint32_t>(j * S::kTokStep * 128);
      const uint32_t id = static_cast<uint32_t>(s.id[j]);
      const uint64_t off = static_cast<uint64_t>(id) * stride;
      CpAsync16(kdst + row, kb + off, valid, policy...);
      CpAsync16(vdst + row, vb + off, valid, policy...);
    }
  };
  if (sole_reader) {
    copy(EvictFirstPolicy());
  } else {
    copy();
  }
}

// 2^x on the special-function unit (2^-inf = 0; subnormal results flush to 0).
__device__ __forceinline__ float Ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The wgmma path's epilogue: rows staged by stmatrix and stored by bulk copies (1, measured
// 0.3-1.0 us faster per step on the H100 than 0, the generic staged stores the mma.sync path
// keeps: bench/RESULTS.md).
// 1/x and log2(x) on the special-function unit (x > 0; ~1 ulp / ~2^-22 absolute).
__device__ __forceinline__ float FastRcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float FastLog2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#ifndef DEFT_ATTN_BULK_EPILOGUE
#define DEFT_ATTN_BULK_EPILOGUE 1
#endif
#if DEFT_ATTN_WGMMA
// Four 8x8 matrices of 16-bit values to shared memory (lane l gives the row address of row l % 8
// of matrix l / 8; register j of a lane holds its pair of matrix j: row lane / 4, cols
// 2 * (lane % 4) + {0, 1}).
__device__ __forceinline__ void StMatrixX4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2,
                                           uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}
// A bulk (TMA) copy of `bytes` (multiple of 16, both ends 16-byte aligned) from shared to global.
__device__ __forceinline__ void BulkStore(void* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst),
               "r"(src), "r"(bytes)
               : "memory");
}
// Commits this thread's bulk copies and waits until they have read their shared memory.
__device__ __forceinline__ void BulkCommitAndWaitRead() {
  asm volatile("cp.async.bulk.commit_group;\ncp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
#endif

// Scores s (n-tiles of 8 tokens from t0; rows a and b of the thread's 16-row group), masked by the
// visibility words, folded into the running (m, l): s becomes the probabilities, l is rescaled
// and summed, and alpha (per row) is the factor o must be rescaled by; returns whether any row
// of the warp has alpha != 1 (else o needs no rescale). m is in the scaled log2 domain and may
// trail the true max by up to kLazyMax; the scale is folded into the exponent (max over raw
// scores: the scale is positive). A thread holds cols 2*(lane%4)+{0,1} of each n-tile; a quad
// is a row.
template <int kN>
__device__ __forceinline__ bool SoftmaxScores(const ChunkParams& p, float (&s)[kN][4], int t0,
                                              uint64_t word_a, uint64_t word_b, float (&m)[2],
                                              float (&l)[2], float (&alpha)[2]) {
  const int lane = threadIdx.x & 31;
  const int c = 2 * (lane & 3);
  float mx[2] = {-INFINITY, -INFINITY};
  if (__all_sync(0xffffffffu, (word_a & word_b) == ~0ull)) {  // the warp's rows see every token
#pragma unroll
    for (int j = 0; j < kN; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kN; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = e >> 1;
        const int col = t0 + 8 * j + c + (e & 1);
        const uint64_t w = row == 0 ? word_a : word_b;
        const float v = ((w >> col) & 1ull) ? s[j][e] : -INFINITY;
        s[j][e] = v;
        mx[row] = fmaxf(mx[row], v);
      }
    }
  }
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    // Lazy rescaling: the running max moves only when the sub-tile's exceeds it by more than
    // kLazyMax (log2 units), so p <= 2^kLazyMax and o, l are rarely rescaled (a warp skips the
    // 64 multiplies of o unless one of its rows moved). m = -inf moves to any finite max.
    const float m_cand = mx[r] * p.scale_log2;  // -inf stays -inf
    const bool moves = m_cand > m[r] + kLazyMax;
    alpha[r] = moves ? Ex2(m[r] - m_cand) : 1.f;  // 2^-inf = 0 from m = -inf (o, l are 0)
    if (moves) m[r] = m_cand;
    base[r] = m[r] == -INFINITY ? 0.f : m[r];
    l[r] *= alpha[r];
  }
#pragma unroll
  for (int j = 0; j < kN; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pv = Ex2(fmaf(s[j][e], p.scale_log2, -base[e >> 1]));  // masked: 2^-inf = 0
      s[j][e] = pv;
      l[e >> 1] += pv;
    }
  }
  return __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f);
}

template <int D>
__device__ __forceinline__ void RescaleO(float (&o)[D / 8][4], const float (&alpha)[2]) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    o[n][0] *= alpha[0];
    o[n][1] *= alpha[0];
    o[n][2] *= alpha[1];
    o[n][3] *= alpha[1];
  }
}

// The A fragment (16 rows x 16 tokens) of k-step t of O += P V: n-tiles 2t and 2t+1 of P.
template <typename T, int kN>
__device__ __forceinline__ void PackP(const float (&s)[kN][4], int t, uint32_t (&a)[4]) {
  a[0] = MmaOp<T>::pack(s[2 * t][0], s[2 * t][1]);
  a[1] = MmaOp<T>::pack(s[2 * t][2], s[2 * t][3]);
  a[2] = MmaOp<T>::pack(s[2 * t + 1][0], s[2 * t + 1][1]);
  a[3] = MmaOp<T>::pack(s[2 * t + 1][2], s[2 * t + 1][3]);
}

// One warp's work on one sub-tile: tokens [t0, t0 + TW) of the sub-tile in `slot`, rows a (lane/4)
// and b (lane/4 + 8) of its 16-row group with visibility words word_a / word_b (bit t: token t of
// the sub-tile), online softmax into (m, l, o).
template <typename T, int D, int TW>
__device__ __forceinline__ void ComputeSubTile(const ChunkParams& p, const uint8_t* smem, int slot,
                                               int t0, uint64_t word_a, uint64_t word_b,
                                               const uint32_t (&qf)[D / 16][4], float (&m)[2],
                                               float (&l)[2], float (&o)[D / 8][4]) {
  using K = ChunkKernel<T, D>;
  const int lane = threadIdx.x & 31;
  const uint8_t* ks = smem + slot * K::kStageBytes;
  const uint8_t* vs = ks + K::kSubBytes;
  constexpr int kN = TW / 8;
  float s[kN][4];
#pragma unroll
  for (int j = 0; j < kN; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
  // S = Q K^T: ldmatrix x4 gives the B fragments of two k-steps for one 8-token n-tile.
#pragma unroll
  for (int kk = 0; kk < K::kKSteps; kk += 2) {
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      uint32_t b[4];
      const int token = t0 + 8 * j + (lane & 7);
      LdMatrixX4(b, SmemAddr(ks + TileOffset<D>(token, 2 * kk + (lane >> 3))));
      MmaOp<T>::run(s[j], qf[kk], b[0], b[1]);
      MmaOp<T>::run(s[j], qf[kk + 1], b[2], b[3]);
    }
  }
  float alpha[2];
  if (SoftmaxScores<kN>(p, s, t0, word_a, word_b, m, l, alpha)) RescaleO<D>(o, alpha);
  // O += P V: the accumulators of n-tiles 2t, 2t+1 are the A fragment of k-step t.
#pragma unroll
  for (int t = 0; t < TW / 16; ++t) {
    uint32_t a[4];
    PackP<T>(s, t, a);
    const int token = t0 + 16 * t + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int n = 0; n < K::kDTiles; n += 2) {
      uint32_t b[4];
      LdMatrixX4Trans(b, SmemAddr(vs + TileOffset<D>(token, n + (lane >> 4))));
      MmaOp<T>::run(o[n], a, b[0], b[1]);
      MmaOp<T>::run(o[n + 1], a, b[2], b[3]);
    }
  }
}

#ifndef DEFT_ATTN_DEFER_PV
#define DEFT_ATTN_DEFER_PV 1
#endif
#if DEFT_ATTN_WGMMA
// The warpgroup's (all 4 warps, 64 rows: warp w holds rows 16w..16w+15) work on one 64-token
// sub-tile with wgmma: S = Q K^T (Q from registers, K from the ring), online softmax in
// registers, O += P V (P from registers, V from the ring, transposed B). Every warp of the CTA
// must call it (the wgmma instructions are warpgroup-wide). `between` runs while the tensor
// cores compute S (the next sub-tile's copies are issued there).
template <typename T, int D, typename Between>
__device__ __forceinline__ void ComputeSubTileWg(const ChunkParams& p, const uint8_t* smem,
                                                 int slot, uint64_t word_a, uint64_t word_b,
                                                 const uint32_t (&qf)[D / 16][4], float (&m)[2],
                                                 float (&l)[2], float (&o)[D / 8][4],
                                                 const Between& between) {
  using K = ChunkKernel<T, D>;
  // Descriptors: one low word per operand, constant offsets added per k-step.
  const uint32_t k_lo = SmemDescSw128Lo(SmemAddr(smem + slot * K::kStageBytes), 16);
  const uint32_t v_lo = SmemDescSw128Lo(SmemAddr(smem + slot * K::kStageBytes + K::kSubBytes),
                                        kHalfBytes);
  float s[8][4];
  WgmmaFence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    // k-step kk: head dims 16kk..16kk+15, i.e. half kk/4, 32 bytes into its 128-byte rows.
    const uint64_t desc =
        SmemDesc(k_lo + (((kk >> 2) * kHalfBytes + (kk & 3) * 32) >> 4), SmemDescSw128Hi(1024));
    Wgmma<T>::N64(s, qf[kk], desc, kk > 0 ? 1 : 0);
  }
  WgmmaCommit();
  between();
  WgmmaWaitAll();
  WgmmaFenceOperands(s);
  float alpha[2];
  if (SoftmaxScores<8>(p, s, 0, word_a, word_b, m, l, alpha)) RescaleO<D>(o, alpha);
  uint32_t a[4][4];
#pragma unroll
  for (int t = 0; t < 4; ++t) PackP<T>(s, t, a[t]);
  WgmmaFenceOperands(o);
  WgmmaFence();
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    // k-step t: tokens 16t..16t+15 = two 8-token atoms (2048 bytes) into each half.
    const uint64_t desc = SmemDesc(v_lo + ((t * 2048) >> 4), SmemDescSw128Hi(1024));
    if constexpr (D == 128) {
      Wgmma<T>::N128Trans(o, a[t], desc, 1);
    } else {
      Wgmma<T>::N64Trans(o, a[t], desc, 1);
    }
  }
  WgmmaCommit();
  // With DEFT_ATTN_DEFER_PV the caller waits for O += P V (before the slot of V is refilled and
  // before o is read again), so that it runs beside the wait for the next sub-tile's K/V.
  if (!DEFT_ATTN_DEFER_PV) {
    WgmmaWaitAll();
    WgmmaFenceOperands(o);
  }
}
#endif

// Visibility words of the thread's rows a and b over the sub-tile starting at token tok0 of the
// chunk (bit t: token tok0 + t is inside the chunk and, for a masked entry, visible to the row).
__device__ __forceinline__ void VisibilityWords(const ChunkParams& p, int tok0, int chunk_len,
                                                const bool (&valid)[2], const int32_t (&mask_at)[2],
                                                uint64_t (&word)[2]) {
  const int here = min(chunk_len - tok0, kSubTokens);  // tokens of the sub-tile inside the chunk
  const uint64_t in_chunk = here >= 64 ? ~0ull : ((1ull << here) - 1ull);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    word[r] = !valid[r] ? 0ull
                        : (mask_at[r] < 0
                               ? in_chunk
                               : (p.plan.masks[mask_at[r] + tok0 / 64] >> (tok0 & 63)) & in_chunk);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, DEFT_ATTN_MIN_BLOCKS) TreeAttentionChunkKernel(
    const __grid_constant__ ChunkParams p) {
  using K = ChunkKernel<T, D>;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (SmemAddr(smem_raw) & 1023u)) & 1023u);
  const int item = blockIdx.x, kv_head = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#if DEFT_ATTN_TRACE
  const unsigned long long trace_start = GlobalTimer();
  unsigned long long trace_ready = 0, trace_loop = 0, trace_staged = 0;
#endif
  // Round 1 of the prologue: the work item and its prologue data (work_pre), both addressed by
  // the item alone.
  const int4 w = __ldg(reinterpret_cast<const int4*>(p.plan.work) + item);
  const int32_t* pre = p.plan.work_pre + static_cast<int64_t>(item) * kTreeAttentionWorkPreInts;
  const int chunk_first = w.x, chunk_len = w.y, entry0 = w.z;
  const int row0 = w.w & 0xffffff, rows = (w.w >> 24) & 0x7f;
  const bool sole_reader = w.w < 0;  // bit 31 (EvictFirstPolicy)
  const int groups = (rows + 15) / 16;
  constexpr int kMaxSplits = kSubTokens / 16;  // a warp takes at least 16 tokens (one k-step)
  // Every tile runs on wgmma where the target has it (all 4 warps, 64 rows; a tile of a few
  // rows wastes tensor-core rows but not time: see DEFT_ATTN_MIN_BLOCKS), else on mma.sync.
  constexpr bool wg = DEFT_ATTN_WGMMA;
  const int splits = wg ? 1 : (groups == 1 ? kMaxSplits : (groups == 2 ? min(2, kMaxSplits) : 1));
  const int rg = warp / splits, split = warp % splits;
  const bool active = rg < groups;

  // The prologue goes out in two rounds of global loads (three on the mma.sync path, whose row
  // groups depend on the work item), each round's loads independent of each other and issued
  // in order (LoadOrdered) before the next round waits: (1) the work item, the slot ids of
  // sub-tile 0 and this thread's two rows' query and mask offset, all from the item's
  // work_pre; (2) the K/V copies of the first kStages - 1 sub-tiles (the later ids into the
  // shared-memory id ring), Q, and the first sub-tile's mask words.
  static_assert(kSubTokens <= kTreeAttentionTileRows, "work_pre holds sub-tile 0's slot ids");
  const int num_sub = (chunk_len + kSubTokens - 1) / kSubTokens;
  const int32_t* ids = reinterpret_cast<const int32_t*>(smem + K::kIdOffset);
  const uint32_t ids_s = SmemAddr(smem + K::kIdOffset);
  // This thread's two rows: a = lane/4, b = lane/4 + 8 of row group rg (work_pre is zero past
  // the tile's rows, so the loads need not wait for the work item). Before the slot ids: the
  // compiler keeps ordered loads in order but moves them past the copies, which wait for the
  // ids.
  int query[2], head[2];
  int32_t at[2];  // (entry, head) row of the partial states (RunTreeAttention: < 2^31)
  int32_t mask_at[2];
  bool valid[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int tile_row = (rg * 16 + (lane >> 2) + 8 * r) & (kTreeAttentionTileRows - 1);
    const int q = LoadOrdered(pre + kTreeAttentionTileRows + tile_row);
    const int mask = LoadOrdered(pre + 2 * kTreeAttentionTileRows + tile_row);
    valid[r] = active && rg * 16 + (lane >> 2) + 8 * r < rows;
    const int chunk_row = row0 + tile_row;
    const int entry = entry0 + (valid[r] ? chunk_row / p.group : 0);
    head[r] = kv_head * p.group + (valid[r] ? chunk_row % p.group : 0);
    at[r] = entry * p.num_heads + head[r];
    query[r] = valid[r] ? q : 0;
    mask_at[r] = valid[r] ? mask : -1;
  }
  SubTileSlots<T, D> first[kStages];  // ids of sub-tiles 0 .. kStages - 1 (0 past the chunk)
  {
    using S = SubTileSlots<T, D>;
    const int t0 = static_cast<int>(threadIdx.x) / (D / 8);
#pragma unroll
    for (int j = 0; j < S::kPer; ++j) first[0].id[j] = LoadOrdered(pre + t0 + j * S::kTokStep);
    first[0].here = chunk_len - t0;
  }
#pragma unroll
  for (int st = 1; st < kStages; ++st) {
    // The wgmma loop takes sub-tile kStages - 1's ids from the ring; the mma.sync loop from here.
    if (st < kStages - 1 || !wg) LoadSlots<T, D>(p, chunk_first, chunk_len, st, first[st]);
  }
  // Launched as a programmatic dependent launch (RunTreeAttention): the plan's loads above may
  // go out while the kernel before this one (the step's RoPE + KV append, which writes Q and the
  // new tokens' K/V) finishes; Q and K/V only after it has.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < num_sub) LoadSubTile<T, D>(p, smem, st, first[st], kv_head, sole_reader);
    if (st == 0 && wg) {
#pragma unroll
      for (int i = kStages - 1; i < kStages - 1 + kIdAhead; ++i) {
        if (i < num_sub) LoadSlotIds<D>(p, ids_s, chunk_first, chunk_len, i);
      }
    }
    CpAsyncCommit();
  }
  // The mma.sync loop's slot ids of the next sub-tile to copy (kStages - 1).
  SubTileSlots<T, D> slots = first[kStages - 1];

  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) qf[kk][0] = qf[kk][1] = qf[kk][2] = qf[kk][3] = 0u;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!valid[r]) continue;
    const T* qrow = static_cast<const T*>(p.q) +
                    (static_cast<int64_t>(query[r]) * p.num_heads + head[r]) * D;
    const uint32_t* q32 = reinterpret_cast<const uint32_t*>(qrow);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      // A fragment: regs 0/1 row a/b at k 2*(lane%4); regs 2/3 the same 8 columns further.
      qf[kk][r] = __ldg(q32 + (kk * 16 + 2 * (lane & 3)) / 2);
      qf[kk][r + 2] = __ldg(q32 + (kk * 16 + 8 + 2 * (lane & 3)) / 2);
    }
  }

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  const int tw = kSubTokens / splits;
#if DEFT_ATTN_WGMMA
  for (int sub = 0; wg && sub < num_sub; ++sub) {
    CpAsyncWait<kStages - 2>();
    // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    uint64_t word[2];
    VisibilityWords(p, sub * kSubTokens, chunk_len, valid, mask_at, word);
    if (DEFT_ATTN_DEFER_PV) {  // sub - 1's O += P V (it reads the slot the copies below refill)
      WgmmaWaitAll();
      WgmmaFenceOperands(o);
    }
    // Sub-tile `sub` landed for all, the slot of sub - 1 is free, and whether any row sees it.
    const int seen = __syncthreads_or(!p.skip_masked || (word[0] | word[1]) != 0ull);
#if DEFT_ATTN_TRACE
    if (sub == 0) trace_ready = GlobalTimer();
#endif
    const int next = sub + kStages - 1;
    // K/V of sub-tile `next` (its ids landed kIdAhead iterations ago), the ids of next +
    // kIdAhead into an id slot whose previous ids were read before an earlier barrier. Issued
    // after this sub-tile's S = Q K^T went to the tensor cores (the slot they fill was freed
    // by the barrier above).
    const auto copies = [&] {
      if (next < num_sub) {
        SlotsFromRing<T, D>(ids, chunk_len, next, slots);
        LoadSubTile<T, D>(p, smem, next % kStages, slots, kv_head, sole_reader);
      }
      if (next + kIdAhead < num_sub) {
        LoadSlotIds<D>(p, ids_s, chunk_first, chunk_len, next + kIdAhead);
      }
      CpAsyncCommit();
    };
    // Rows past the tile (zero Q, never written) take the unmasked path: they may not force
    // the masked one on the others.
    copies();
    if (seen) {
      ComputeSubTileWg<T, D>(p, smem, sub % kStages, valid[0] ? word[0] : ~0ull,
                             valid[1] ? word[1] : ~0ull, qf, m, l, o, [] {});
    }
  }
#endif
  for (int sub = 0; !wg && sub < num_sub; ++sub) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();  // sub-tile `sub` landed for all; slot of sub-1 free for reuse
    const int next = sub + kStages - 1;
    if (next < num_sub) {
      LoadSubTile<T, D>(p, smem, next % kStages, slots, kv_head, sole_reader);
      if (next + 1 < num_sub) LoadSlots<T, D>(p, chunk_first, chunk_len, next + 1, slots);
    }
    CpAsyncCommit();
    if (!active) continue;
    uint64_t word[2];
    VisibilityWords(p, sub * kSubTokens, chunk_len, valid, mask_at, word);
    const int t0 = split * tw;
    const uint64_t mine = tw == 64 ? ~0ull : (((1ull << tw) - 1ull) << t0);
    if (p.skip_masked && !__any_sync(0xffffffffu, ((word[0] | word[1]) & mine) != 0ull)) continue;
    // Rows past the tile (zero Q, never written) take the unmasked path (see the wgmma loop).
    if (!valid[0]) word[0] = ~0ull;
    if (!valid[1]) word[1] = ~0ull;
    if (tw == 16) {
      ComputeSubTile<T, D, 16>(p, smem, sub % kStages, t0, word[0], word[1], qf, m, l, o);
    } else if (tw == 32) {
      ComputeSubTile<T, D, 32>(p, smem, sub % kStages, t0, word[0], word[1], qf, m, l, o);
    } else if constexpr (kSubTokens == 64) {
      ComputeSubTile<T, D, 64>(p, smem, sub % kStages, t0, word[0], word[1], qf, m, l, o);
    }
  }
  CpAsyncWait<0>();
#if DEFT_ATTN_WGMMA
  if (DEFT_ATTN_DEFER_PV && wg) {  // the last sub-tile's O += P V
    WgmmaWaitAll();
    WgmmaFenceOperands(o);
  }
#endif
  // Every copy landed and every warp left the loop: the ring is free for the partials' staging.
  __syncthreads();
#if DEFT_ATTN_TRACE
  trace_loop = GlobalTimer();
  const auto record_trace = [&] {
    if (threadIdx.x == 0 && p.trace != nullptr) {
      unsigned long long* rec =
          p.trace + 3 + 6 * (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x);
      rec[0] = trace_start;
      rec[1] = trace_ready;
      rec[2] = trace_loop;
      rec[3] = trace_staged;
      rec[4] = GlobalTimer();
      rec[5] = SmId() | (static_cast<unsigned long long>(num_sub) << 16) |
               (static_cast<unsigned long long>(rows) << 32);
    }
  };
#endif
  // Programmatic dependent launch: the merge grid may be scheduled once every CTA got here (it
  // still waits for this grid's completion and memory flush before reading the partials).
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const int c = 2 * (lane & 3);
  if (splits > 1) {
    // Each warp parks (m, l, o) for its 16 rows; warp split 0 of each group merges them.
    __syncthreads();
    float* park = reinterpret_cast<float*>(smem) + warp * 16 * (D + 2);
    if (active) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float* row = park + ((lane >> 2) + 8 * r) * (D + 2);
        if ((lane & 3) == 0) {
          row[D] = m[r];
          row[D + 1] = l[r];
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          row[8 * n + c] = o[n][2 * r];
          row[8 * n + c + 1] = o[n][2 * r + 1];
        }
      }
    }
    __syncthreads();
    if (!active || split != 0) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row_in = (lane >> 2) + 8 * r;
      float mm = -INFINITY;
      for (int s = 0; s < splits; ++s) {
        mm = fmaxf(mm, reinterpret_cast<float*>(smem)[((warp + s) * 16 + row_in) * (D + 2) + D]);
      }
      float ll = 0.f;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) o[n][2 * r] = o[n][2 * r + 1] = 0.f;
      for (int s = 0; s < splits; ++s) {
        const float* row = reinterpret_cast<float*>(smem) + ((warp + s) * 16 + row_in) * (D + 2);
        const float ws = mm == -INFINITY ? 0.f : exp2f(row[D] - mm);
        ll += ws * row[D + 1];
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          o[n][2 * r] += ws * row[8 * n + c];
          o[n][2 * r + 1] += ws * row[8 * n + c + 1];
        }
      }
      m[r] = mm;
      l[r] = ll;
    }
  }
  if (!active) return;
#if DEFT_ATTN_WGMMA && DEFT_ATTN_BULK_EPILOGUE
  if (wg) {
    // The wgmma path's epilogue (splits == 1: each warp owns 16 whole rows). Issue-bound under
    // the other CTAs' loops, so kept short: approximate reciprocal and log, o packed to T by
    // stmatrix into the warp's staging rows, and each of the warp's valid rows stored by one
    // 256-byte bulk copy (lanes 0..15, one row each) that the CTA does not wait for beyond
    // its shared-memory reads. The merge reads the rows after this grid completes.
    constexpr int kStageRow = D * 2 + 16;  // bytes; rows 16-byte aligned, 8 rows hit 32 banks
    uint8_t* stage = smem + K::kMergeBytes + warp * 16 * kStageRow;
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      inv[r] = l[r] > 0.f ? FastRcp(l[r]) : 0.f;
      if (valid[r] && (lane & 3) == 0) {
        p.part_lse[at[r]] = l[r] > 0.f ? (m[r] + FastLog2(l[r])) * kLn2 : -INFINITY;
      }
    }
    // stmatrix x4 per pair of 8-column n-tiles: matrices (rows 0-7, n), (rows 8-15, n),
    // (rows 0-7, n + 1), (rows 8-15, n + 1); lane l addresses row l % 8 of matrix l / 8.
    const uint32_t st_base = SmemAddr(stage) + ((lane >> 3) & 1) * 8 * kStageRow +
                             (lane & 7) * kStageRow + (lane >> 4) * 16;
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      StMatrixX4(st_base + n * 16, MmaOp<T>::pack(o[n][0] * inv[0], o[n][1] * inv[0]),
                 MmaOp<T>::pack(o[n][2] * inv[1], o[n][3] * inv[1]),
                 MmaOp<T>::pack(o[n + 1][0] * inv[0], o[n + 1][1] * inv[0]),
                 MmaOp<T>::pack(o[n + 1][2] * inv[1], o[n + 1][3] * inv[1]));
    }
    // The rows were written through the generic proxy; the bulk copies read through the async.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncwarp();
#if DEFT_ATTN_TRACE
    trace_staged = GlobalTimer();
#endif
    // Lane i < 16 stores warp row i (row a of lane 4 * (i % 8) for i < 8, its row b above).
    const int owner = (lane & 7) * 4;
    const int at0 = __shfl_sync(0xffffffffu, at[0], owner);
    const int at1 = __shfl_sync(0xffffffffu, at[1], owner);
    const int v0 = __shfl_sync(0xffffffffu, valid[0] ? 1 : 0, owner);
    const int v1 = __shfl_sync(0xffffffffu, valid[1] ? 1 : 0, owner);
    if (lane < 16 && (lane < 8 ? v0 : v1)) {
      const int row_at = lane < 8 ? at0 : at1;
      BulkStore(static_cast<T*>(p.part_o) + static_cast<int64_t>(row_at) * D,
                SmemAddr(stage + lane * kStageRow), D * 2);
    }
    BulkCommitAndWaitRead();
#if DEFT_ATTN_TRACE
    record_trace();
#endif
    return;
  }
#endif
  // Partial o in T (a convex combination of V rows, so within T's range): half the bytes of
  // fp32 for these stores and the merge's reads. Staged through this warp's rows in shared
  // memory (after the split-merge area) so that each store is a whole 16-byte piece of a row.
  constexpr int kStageRow = D * 2 + 16;  // bytes; the pad spreads the rows over the banks
  uint8_t* stage = smem + K::kMergeBytes + warp * 16 * kStageRow;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    uint8_t* row = stage + ((lane >> 2) + 8 * r) * kStageRow;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(row + (8 * n + c) * 2) =
          MmaOp<T>::pack(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
    if (valid[r] && (lane & 3) == 0) {
      p.part_lse[at[r]] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
    }
  }
  __syncwarp();
#if DEFT_ATTN_TRACE
  trace_staged = GlobalTimer();
#endif
  constexpr int kSegs = D * 2 / 16;  // 16-byte pieces per row
  static_assert(8 % (32 / kSegs) == 0, "a pass's rows are all a rows or all b rows");
#pragma unroll
  for (int k = 0; k < 16 * kSegs / 32; ++k) {
    const int i = k * 32 + lane;
    const int row = i / kSegs, seg = i % kSegs;
    constexpr int kRowsPerPass = 32 / kSegs;
    const int r = (k * kRowsPerPass) / 8;  // row >> 3, the same for the whole pass
    const int owner = (row & 7) * 4;       // the lane holding the row's (entry, head)
    const int row_at = __shfl_sync(0xffffffffu, at[r], owner);
    const int row_valid = __shfl_sync(0xffffffffu, valid[r] ? 1 : 0, owner);
    if (row_valid) {
      const uint4 piece = *reinterpret_cast<const uint4*>(stage + row * kStageRow + seg * 16);
      *reinterpret_cast<uint4*>(static_cast<T*>(p.part_o) + static_cast<int64_t>(row_at) * D +
                                seg * 8) = piece;
    }
  }
#if DEFT_ATTN_TRACE
  record_trace();
#endif
}

struct MergeParams {
  const void* part_o;  // of T
  const float* part_lse;
  const int32_t* query_entry_begin;
  const int32_t* query_entries;
  void* out;
  int32_t num_queries, num_heads;
  unsigned long long* trace;  // DEFT_ATTN_TRACE builds: this kernel's records (see the header)
};

// Two values of T packed in a word (MmaOp<T>::pack's layout) as floats.
template <typename T>
__device__ __forceinline__ float2 Unpack(uint32_t w);
template <>
__device__ __forceinline__ float2 Unpack<__half>(uint32_t w) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
template <>
__device__ __forceinline__ float2 Unpack<__nv_bfloat16>(uint32_t w) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
}


// acc[0..7] += w x the 8 values of T in v.
template <typename T>
__device__ __forceinline__ void AddWeighted(float* acc, const uint4& v, float w) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = Unpack<T>(words[k]);
    acc[2 * k] += w * f.x;
    acc[2 * k + 1] += w * f.y;
  }
}

// Profiling builds: a merge CTA's start stamp and SM.
__device__ __forceinline__ void MergeTraceStart(const MergeParams& p) {
#if DEFT_ATTN_TRACE
  if (threadIdx.x == 0 && p.trace != nullptr) {
    p.trace[4 * blockIdx.x] = GlobalTimer();
    p.trace[4 * blockIdx.x + 3] = SmId();
  }
#endif
}

// A merge warp's set-up: its query's entry range [b, e) and lane i's entry id b + i (0 past e),
// read before waiting for the chunk kernel's partial states (the plan's arrays are not written
// by it), so that the wait is followed by two dependent loads, not four. The wait is a no-op
// when the merge is launched normally.
__device__ __forceinline__ void MergeEntries(const MergeParams& p, int query, int lane, int& b,
                                             int& e, int& first_entry) {
  b = __ldg(p.query_entry_begin + query);
  e = __ldg(p.query_entry_begin + query + 1);
  first_entry = lane < e - b ? __ldg(p.query_entries + b + lane) : 0;
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#if DEFT_ATTN_TRACE
  if (threadIdx.x == 0 && p.trace != nullptr) p.trace[4 * blockIdx.x + 1] = GlobalTimer();
#endif
}

// One warp per (query, head). Entries are taken 32 at a time: each lane holds one entry's id and
// loads its lse; the warp reads kLanesPerEntry-lane slices of the entries' o vectors, 4 entries
// side by side, 8 entries per round (the first round overlapping the lse loads); the batch's
// weights are rescaled online to the running max, and the 4 lane groups' sums are combined by
// shuffles at the end. Fixed entry order and shuffle tree: deterministic.
// kRound: lane-group passes per round of loads (4 * kRound entries' o slices in flight). 2 keeps
// the kernel at 72 registers (D = 128) for grids of many (query, head) warps; 4 (88 registers)
// reads 16 entries per round trip; 8 reads a batch of 32 entries in one round trip (121
// registers) for queries with many entries and a grid of one wave.
template <typename T, int D, int kRound>
__global__ void __launch_bounds__(128) TreeAttentionMergeKernel(const __grid_constant__ MergeParams p) {
  constexpr int kGroups = 4;                  // entries read side by side
  constexpr int kLanesPerEntry = 32 / kGroups;  // 8 lanes cover one o vector
  constexpr int kPer = D / kLanesPerEntry;      // floats per lane: 16 (D=128) or 8 (D=64)
  const int lane = threadIdx.x & 31;
  const int group = lane / kLanesPerEntry, sub = lane % kLanesPerEntry;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  MergeTraceStart(p);
  if (gw >= static_cast<int64_t>(p.num_queries) * p.num_heads) return;
  const int query = static_cast<int>(gw / p.num_heads), head = static_cast<int>(gw % p.num_heads);
  int b, e, first_entry;
  MergeEntries(p, query, lane, b, e, first_entry);
  float acc[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) acc[j] = 0.f;
  float mx = -INFINITY, sum = 0.f;
  // A batch of 32 entries is read in rounds of 2 lane-group passes (8 entries, 4 independent
  // 16-byte loads per lane in flight at D = 128: the partial o are in T); the first round goes
  // out before the batch's lse, so the two round trips overlap.
  constexpr int kPasses = 32 / kGroups;
  static_assert(kPasses % kRound == 0, "rounds of passes");
  constexpr int kVec = kPer / 8;  // 16-byte loads (8 values of T) per lane and entry
  uint4 v[kRound][kVec];
  auto load_round = [&](int my_entry, int n, int first_pass) {
#pragma unroll
    for (int r = 0; r < kRound; ++r) {
      const int i = (first_pass + r) * kGroups + group;  // this lane group's entry (zeros past n)
      // Every lane shuffles (a shuffle must not diverge), then lanes past the batch load nothing.
      const int entry = __shfl_sync(0xffffffffu, my_entry, i & 31);
      const uint4* src = reinterpret_cast<const uint4*>(
          static_cast<const T*>(p.part_o) + (static_cast<int64_t>(entry) * p.num_heads + head) * D +
          sub * kPer);
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[r][j] = i < n ? __ldg(src + j) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  auto add_round = [&](float my_w, int first_pass) {
#pragma unroll
    for (int r = 0; r < kRound; ++r) {
      const int i = (first_pass + r) * kGroups + group;
      const float w = __shfl_sync(0xffffffffu, my_w, i & 31);  // 0 past the batch
#pragma unroll
      for (int j = 0; j < kVec; ++j) AddWeighted<T>(acc + 8 * j, v[r][j], w);
    }
  };
  for (int base = b; base < e; base += 32) {
    const int n = min(32, e - base);
    const int my_entry = base == b ? first_entry : (lane < n ? p.query_entries[base + lane] : 0);
    load_round(my_entry, n, 0);
    const float my_lse =
        lane < n ? p.part_lse[static_cast<int64_t>(my_entry) * p.num_heads + head] : -INFINITY;
    float bm = my_lse;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, off));
    if (bm == -INFINITY) continue;  // the whole batch is empty
    const float new_mx = fmaxf(mx, bm);
    const float rescale = mx == -INFINITY ? 0.f : __expf(mx - new_mx);
    mx = new_mx;
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[j] *= rescale;
    const float my_w = my_lse == -INFINITY ? 0.f : __expf(my_lse - mx);
    float bs = my_w;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) bs += __shfl_xor_sync(0xffffffffu, bs, off);
    sum = sum * rescale + bs;
    add_round(my_w, 0);
    for (int pass = kRound; pass < kPasses && pass * kGroups < n; pass += kRound) {
      load_round(my_entry, n, pass);
      add_round(my_w, pass);
    }
  }
  // Combine the lane groups (lanes sub, sub + 8, sub + 16, sub + 24 hold the same dims).
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], kLanesPerEntry);
    acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], 2 * kLanesPerEntry);
  }
  // Every lane group holds the sums now: group g stores the g-th quarter of its lanes' dims, one
  // 8-byte (D = 128) or 4-byte store per lane.
  const float inv = sum > 0.f ? FastRcp(sum) : 0.f;
  constexpr int kQ = kPer / kGroups;  // values per lane to store: 4 or 2
  float mine[kQ];
#pragma unroll
  for (int k = 0; k < kQ; ++k) {
    mine[k] = acc[k];
#pragma unroll
    for (int g = 1; g < kGroups; ++g) mine[k] = group == g ? acc[g * kQ + k] : mine[k];
  }
  uint32_t words[kQ / 2];
#pragma unroll
  for (int k = 0; k < kQ / 2; ++k) {
    words[k] = MmaOp<T>::pack(mine[2 * k] * inv, mine[2 * k + 1] * inv);
  }
  T* dst = static_cast<T*>(p.out) + gw * D + sub * kPer + group * kQ;
  if constexpr (kQ == 4) {
    *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = words[0];
  }
#if DEFT_ATTN_TRACE
  if (threadIdx.x == 0 && p.trace != nullptr) p.trace[4 * blockIdx.x + 2] = GlobalTimer();
#endif
}

// The merge for plans with more (query, head) pairs than one wave of the kernel above holds
// (hundreds of queries: wide token trees, many samples of one prompt): one warp per (query, KV
// head) merges the G query heads of the group side by side, 32 / G lanes per head, each lane
// kPer = D * G / 32 consecutive dims of its head. A round loads kEntries entries' lse and o
// slices at once (one round trip), rescales to the round's max and accumulates in entry order,
// per lane: no shuffles, deterministic. A quarter of the warps of the kernel above for G = 4.
template <typename T, int D, int G, int kEntries>
__global__ void __launch_bounds__(128) TreeAttentionGroupMergeKernel(
    const __grid_constant__ MergeParams p) {
  constexpr int kLanes = 32 / G;       // lanes per head
  constexpr int kPer = D / kLanes;     // dims per lane
  constexpr int kVec = kPer / 8;       // 16-byte loads per lane and entry
  static_assert(kVec >= 1, "at least 8 dims per lane");
  const int lane = threadIdx.x & 31;
  const int g = lane / kLanes, sub = lane % kLanes;
  const int num_kv_heads = p.num_heads / G;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  MergeTraceStart(p);
  if (gw >= static_cast<int64_t>(p.num_queries) * num_kv_heads) return;
  const int query = static_cast<int>(gw / num_kv_heads);
  const int head = static_cast<int>(gw % num_kv_heads) * G + g;
  int b, e, first_entry;
  MergeEntries(p, query, lane, b, e, first_entry);
  float acc[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) acc[j] = 0.f;
  float mx = -INFINITY, sum = 0.f;
  for (int base = b; base < e; base += 32) {
    const int n = min(32, e - base);
    const int my_entry = base == b ? first_entry : (lane < n ? p.query_entries[base + lane] : 0);
    for (int r0 = 0; r0 < n; r0 += kEntries) {
      uint4 v[kEntries][kVec];
      float lse[kEntries];
#pragma unroll
      for (int i = 0; i < kEntries; ++i) {
        const int entry = __shfl_sync(0xffffffffu, my_entry, (r0 + i) & 31);
        const bool here = r0 + i < n;
        const int64_t row = static_cast<int64_t>(entry) * p.num_heads + head;
        const uint4* src =
            reinterpret_cast<const uint4*>(static_cast<const T*>(p.part_o) + row * D + sub * kPer);
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[i][k] = here ? __ldg(src + k) : make_uint4(0u, 0u, 0u, 0u);
        lse[i] = here ? p.part_lse[row] : -INFINITY;
      }
      float rm = lse[0];
#pragma unroll
      for (int i = 1; i < kEntries; ++i) rm = fmaxf(rm, lse[i]);
      if (rm == -INFINITY) continue;  // nothing in this round
      const float new_mx = fmaxf(mx, rm);
      const float rescale = mx == -INFINITY ? 0.f : __expf(mx - new_mx);
      mx = new_mx;
      sum *= rescale;
#pragma unroll
      for (int j = 0; j < kPer; ++j) acc[j] *= rescale;
#pragma unroll
      for (int i = 0; i < kEntries; ++i) {
        const float w = lse[i] == -INFINITY ? 0.f : __expf(lse[i] - mx);
        sum += w;
#pragma unroll
        for (int k = 0; k < kVec; ++k) AddWeighted<T>(acc + 8 * k, v[i][k], w);
      }
    }
  }
  const float inv = sum > 0.f ? FastRcp(sum) : 0.f;
  T* dst = static_cast<T*>(p.out) + (static_cast<int64_t>(query) * p.num_heads + head) * D +
           sub * kPer;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    uint4 w;
    w.x = MmaOp<T>::pack(acc[8 * k] * inv, acc[8 * k + 1] * inv);
    w.y = MmaOp<T>::pack(acc[8 * k + 2] * inv, acc[8 * k + 3] * inv);
    w.z = MmaOp<T>::pack(acc[8 * k + 4] * inv, acc[8 * k + 5] * inv);
    w.w = MmaOp<T>::pack(acc[8 * k + 6] * inv, acc[8 * k + 7] * inv);
    reinterpret_cast<uint4*>(dst)[k] = w;
  }
#if DEFT_ATTN_TRACE
  if (threadIdx.x == 0 && p.trace != nullptr) p.trace[4 * blockIdx.x + 2] = GlobalTimer();
#endif
}

// (query, head) warps above which the per-(query, KV head) merge is used: about one wave of the
// per-(query, head) kernel (72 registers at kRound 2: 7 CTAs of 4 warps per SM).
int64_t GroupMergeMinWarps() {
  static const int64_t warps = [] {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      return int64_t{1} << 62;
    }
    return int64_t{sms} * 7 * 4;
  }();
  return warps;
}

// (query, head) warps up to which the merge reads 32 entries per round (see the merge kernel):
// 2 CTAs of 4 warps per SM (measured on the H100 with fp32 partials, 179 registers: a chain's
// merge 7.8 -> 6.8 us; 1600 warps, two waves, 8.7 -> 11.0 us). With partials in T it needs 121
// registers, but allowing 4 CTAs per SM (2112 warps) made few-shot 50x400 (1600 warps) slower:
// 48.7 against 48.3 us.
int64_t WideMergeMaxWarps() {
  static const int64_t warps = [] {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();  // clear it: the launch below reports its own errors
      return int64_t{0};
    }
    return int64_t{sms} * 2 * 4;
  }();
  return warps;
}

size_t AlignUp(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

template <typename T, int D>
cudaError_t Launch(const TreeAttentionArgs& a, cudaStream_t stream) {
  using K = ChunkKernel<T, D>;
  static std::once_flag once;
  static cudaError_t attr_status = cudaSuccess;
  std::call_once(once, [] {
    attr_status = cudaFuncSetAttribute(TreeAttentionChunkKernel<T, D>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmemBytes);
  });
  if (attr_status != cudaSuccess) return attr_status;
  const size_t o_bytes = AlignUp(static_cast<size_t>(a.plan.num_entries) * a.num_heads * D * 4);
  ChunkParams cp;
  cp.q = a.q;
  cp.k = a.k;
  cp.v = a.v;
  cp.kv_slot_bytes = static_cast<uint32_t>(a.kv_slot_stride * static_cast<int64_t>(sizeof(T)));
  cp.num_heads = a.num_heads;
  cp.num_kv_heads = a.num_kv_heads;
  cp.group = a.num_heads / a.num_kv_heads;
  cp.scale_log2 = kLog2e / sqrtf(static_cast<float>(D));
  cp.plan = a.plan;
  cp.part_o = a.workspace;
  cp.part_lse = reinterpret_cast<float*>(static_cast<char*>(a.workspace) + o_bytes);
  cp.skip_masked = a.skip_masked_blocks;
  const int64_t chunk_ctas = static_cast<int64_t>(a.plan.num_work) * a.num_kv_heads;
  const int64_t merge_ctas = (static_cast<int64_t>(a.plan.num_queries) * a.num_heads + 3) / 4;
  // Profiling builds: a stamp on the stream, then the kernels' records (tree_attention.h).
  cp.trace = DEFT_ATTN_TRACE && a.trace != nullptr ? a.trace : nullptr;
  if (cp.trace != nullptr) TraceStampKernel<<<1, 1, 0, stream>>>(a.trace, chunk_ctas, merge_ctas);
  if (a.plan.num_work > 0 && a.phases != TreeAttentionPhases::kMergeOnly) {
    // A programmatic dependent launch: its CTAs may be scheduled and load the plan while the
    // kernel before it (in a model step, RoPE + KV append) ends; the kernel waits for that one
    // before it reads Q or K/V.
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(a.plan.num_work, a.num_kv_heads);
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = K::kSmemBytes;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    static const bool pdl = [] {  // DEFT_PDL=0 turns it off (as kernels/model/dispatch.cuh)
      const char* env = std::getenv("DEFT_PDL");
      return env == nullptr || std::string_view(env) != "0";
    }();
    config.numAttrs = pdl ? 1 : 0;
    if (cudaError_t err = cudaLaunchKernelEx(&config, TreeAttentionChunkKernel<T, D>, cp);
        err != cudaSuccess) {
      return err;
    }
  }
  MergeParams mp{cp.part_o,           cp.part_lse, a.plan.query_entry_begin, a.plan.query_entries,
                 a.out,               a.plan.num_queries, a.num_heads,
                 cp.trace != nullptr ? cp.trace + 3 + 6 * chunk_ctas : nullptr};
  const int64_t warps = static_cast<int64_t>(a.plan.num_queries) * a.num_heads;
  if (warps > 0 && a.phases != TreeAttentionPhases::kChunkOnly) {
    // After the chunk kernel, a programmatic dependent launch: its launch latency overlaps the
    // chunk kernel's last CTAs instead of following them.
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>((warps + 3) / 4));
    config.blockDim = dim3(128);
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = a.phases == TreeAttentionPhases::kBoth && a.plan.num_work > 0 ? 1 : 0;
    // Queries with more than 8 entries need several rounds of loads at kRound = 2, each an L2
    // round trip; all in one round costs occupancy, which matters only for large grids: up to
    // 8 entries kRound 2, else 32 in one round (kRound 8) for a grid of one wave at its
    // registers, else 16 (kRound 4). Measured on the H100 (bench/RESULTS.md): kRound 4 for
    // 256 siblings' 6 entries and 8224 warps took 12.5 us against 10.6 at kRound 2.
    const int group = a.num_heads / a.num_kv_heads;
    // At least 8 dims (one 16-byte load) per lane: G >= 2 at D = 128, G >= 4 at D = 64.
    const bool per_group =
        a.merge == TreeAttentionMerge::kPerGroup ||
        (a.merge == TreeAttentionMerge::kAuto && warps > GroupMergeMinWarps());
    if (per_group && (group == 2 || group == 4 || group == 8) && D * group / 32 >= 8) {
      config.gridDim = dim3(static_cast<unsigned>((warps / group + 3) / 4));
      if constexpr (D == 128) {
        if (group == 2) {
          return cudaLaunchKernelEx(&config, TreeAttentionGroupMergeKernel<T, D, 2, 8>, mp);
        }
      }
      if (group == 4) {
        return cudaLaunchKernelEx(&config, TreeAttentionGroupMergeKernel<T, D, 4, 8>, mp);
      }
      return cudaLaunchKernelEx(&config, TreeAttentionGroupMergeKernel<T, D, 8, 4>, mp);
    }
    if (a.plan.max_query_entries > 8) {
      if (warps <= WideMergeMaxWarps()) {
        return cudaLaunchKernelEx(&config, TreeAttentionMergeKernel<T, D, 8>, mp);
      }
      return cudaLaunchKernelEx(&config, TreeAttentionMergeKernel<T, D, 4>, mp);
    }
    return cudaLaunchKernelEx(&config, TreeAttentionMergeKernel<T, D, 2>, mp);
  }
  return cudaSuccess;
}

}  // namespace

bool TreeAttentionTraceEnabled() { return DEFT_ATTN_TRACE != 0; }

size_t TreeAttentionTraceWords(int32_t num_work, int32_t num_kv_heads, int32_t num_queries,
                               int32_t num_heads) {
  return 3 + 6 * static_cast<size_t>(num_work) * num_kv_heads +
         4 * ((static_cast<size_t>(num_queries) * num_heads + 3) / 4);
}

size_t TreeAttentionWorkspaceBytes(int32_t num_entries, int32_t num_heads, int32_t head_dim) {
  const size_t n = static_cast<size_t>(num_entries > 0 ? num_entries : 0) * num_heads;
  return AlignUp(n * head_dim * 4) + AlignUp(n * 4);
}

cudaError_t RunTreeAttention(const TreeAttentionArgs& a, cudaStream_t stream) {
  if (a.num_heads <= 0 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  const int group = a.num_heads / a.num_kv_heads;
  if (group > 8 || group != a.plan.group) return cudaErrorInvalidValue;
  if (a.q == nullptr || a.out == nullptr || a.k == nullptr || a.v == nullptr) {
    return cudaErrorInvalidValue;
  }
  // The chunk kernel multiplies slot ids by the slot's bytes in 32 bits.
  if (a.kv_slot_stride < static_cast<int64_t>(a.num_kv_heads) * a.head_dim ||
      a.kv_slot_stride * 2 > UINT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (a.plan.num_entries > 0 &&
      (a.workspace == nullptr ||
       a.workspace_bytes < TreeAttentionWorkspaceBytes(a.plan.num_entries, a.num_heads, a.head_dim))) {
    return cudaErrorInvalidValue;
  }
  if (a.plan.num_work > 65535 * 1024) return cudaErrorInvalidValue;
  // The chunk kernel indexes partial states by (entry, head) in 32 bits.
  if (static_cast<int64_t>(a.plan.num_entries) * a.num_heads > INT32_MAX) return cudaErrorInvalidValue;
  const bool bf16 = a.dtype == KvDtype::kBFloat16;
  if (a.head_dim == 128) return bf16 ? Launch<__nv_bfloat16, 128>(a, stream) : Launch<__half, 128>(a, stream);
  if (a.head_dim == 64) return bf16 ? Launch<__nv_bfloat16, 64>(a, stream) : Launch<__half, 64>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace deft::kernels
