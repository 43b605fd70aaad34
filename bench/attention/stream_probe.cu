// bench/attention/stream_probe: how fast can one CTA per (chunk, KV head) stream a chain's K/V
// out of the paged pool? A diagnostic for the attention chunk kernel's memory-bound rows: the same
// bytes (a chain of N tokens, 8 KV heads x head dim 128, fp16, [slot][head][dim] pool: each head's
// 256 bytes of a token sit at a 2 KiB stride), read by kernels that differ in one thing each:
//   plain      : every thread loads 16-byte vectors into registers (8 in flight per thread), no
//                shared memory: what the memory system gives to a load stream of this pattern
//   ring S     : the chunk kernel's copy loop alone: 64-token sub-tiles by 16-byte cp.async into
//                an S-stage ring, wait + __syncthreads per sub-tile, no math
//   bulk S     : the same ring filled by cp.async.bulk (one 256-byte bulk copy per token row of K
//                and of V) completing on an mbarrier per stage
// each at chunk sizes 128..1024 tokens (grid = chunks x 8 KV heads), with --ctas_per_sm 1..4
// (shared memory reserved to force it), L2 flushed by a 256 MB read (--flush=memset: a write)
// before every run, CUDA events, median of --reps. Prints microseconds and the read bandwidth.
// --readers: instead, R = 1/4/16 CTAs per (chunk, head) side by side (the chunk kernel's R
// 64-row tiles of a shared chunk) on the 2-stage ring at 3 CTAs per SM, with and without a
// 600 ns spin per sub-tile (a stand-in for the math) and with the readers staggered (reader r
// starting at sub-tile r * subs / R): what shared reads cost through L2.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/attention/l2_flush.h"

#define CHECK_CUDA(expr)                                                                     \
  do {                                                                                       \
    cudaError_t e_ = (expr);                                                                 \
    if (e_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

namespace {

constexpr int kHeads = 8, kDim = 128, kSlotBytes = kHeads * kDim * 2, kRowBytes = kDim * 2;
constexpr int kSub = 64;                        // tokens per sub-tile
constexpr int kStage = 2 * kSub * kRowBytes;    // K and V: 32 KiB

// (chunk, head) of this CTA: the grid is chunks x heads (head_fast = 0: the chunk index is
// blockIdx.x, CTAs of one head are launched together) or one dimension with the head fastest
// (head_fast = 1: the 8 CTAs reading the same tokens' 8 heads, i.e. whole 2 KiB slots, together).
// head_fast = -R (R >= 1): the grid is (chunks x R) x heads, R CTAs read the same (chunk, head)
// side by side (what R 64-row tiles of one chunk do in the chunk kernel).
__device__ __forceinline__ void ChunkHead(int head_fast, int& c, int& h) {
  if (head_fast < 0) {
    c = blockIdx.x / -head_fast;
    h = blockIdx.y;
  } else if (head_fast) {
    c = blockIdx.x / kHeads;
    h = blockIdx.x % kHeads;
  } else {
    c = blockIdx.x;
    h = blockIdx.y;
  }
}

__device__ __forceinline__ uint32_t Smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__global__ void Plain(const uint8_t* k, const uint8_t* v, int chunk, int n, uint32_t* sink, int head_fast) {
  int c, h;
  ChunkHead(head_fast, c, h);
  const int first = c * chunk, len = min(chunk, n - first);
  uint32_t acc = 0;
  const int pieces = len * 16;  // 16-byte pieces per tensor
  for (int i0 = threadIdx.x; i0 < pieces; i0 += blockDim.x * 8) {
    uint4 r[16];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int i = i0 + u * blockDim.x;
      const size_t off = static_cast<size_t>(first + i / 16) * kSlotBytes + h * kRowBytes + (i % 16) * 16;
      if (i < pieces) {
        r[2 * u] = __ldcg(reinterpret_cast<const uint4*>(k + off));
        r[2 * u + 1] = __ldcg(reinterpret_cast<const uint4*>(v + off));
      } else {
        r[2 * u] = r[2 * u + 1] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < 16; ++u) acc ^= r[u].x ^ r[u].w;
  }
  if (acc == 0x12345678u) *sink = acc;
}

// Readers table only: nanoseconds each CTA spends per sub-tile after it landed (a stand-in for
// the chunk kernel's math on it; 0 elsewhere).
__device__ int g_spin_ns = 0;
// Readers table only: reader r of R starts at sub-tile r * subs / R and wraps around (the R
// readers of a chunk then pull different sub-tiles from DRAM at the same time).
__device__ int g_stagger = 0;

template <int S>
__global__ void Ring(const uint8_t* k, const uint8_t* v, int chunk, int n, uint32_t* sink, int head_fast) {
  extern __shared__ __align__(128) uint8_t smem[];
  int c, h;
  ChunkHead(head_fast, c, h);
  const int first = c * chunk, len = min(chunk, n - first);
  const int subs = (len + kSub - 1) / kSub;
  const int start = head_fast < 0 && g_stagger ? (blockIdx.x % -head_fast) * subs / -head_fast : 0;
  auto issue = [&](int sub) {
    uint8_t* dst = smem + (sub % S) * kStage;
    const int phys = (sub + start) % subs;
#pragma unroll
    for (int j = 0; j < kSub * 16 / 128; ++j) {
      const int i = threadIdx.x + 128 * j, t = phys * kSub + i / 16;
      const bool ok = t < len;
      const size_t off = static_cast<size_t>(first + (ok ? t : 0)) * kSlotBytes + h * kRowBytes + (i % 16) * 16;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(Smem(dst + i * 16)),
                   "l"(k + off), "r"(ok ? 16 : 0));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(Smem(dst + kStage / 2 + i * 16)),
                   "l"(v + off), "r"(ok ? 16 : 0));
    }
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < subs) issue(s);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  uint32_t acc = 0;
  for (int sub = 0; sub < subs; ++sub) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(S - 2));
    __syncthreads();
    if (sub + S - 1 < subs) issue(sub + S - 1);
    asm volatile("cp.async.commit_group;\n" ::);
    acc ^= reinterpret_cast<const uint32_t*>(smem + (sub % S) * kStage)[threadIdx.x * 64];
    if (g_spin_ns > 0) {
      unsigned long long t0, t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
      do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      } while (t - t0 < static_cast<unsigned long long>(g_spin_ns));
    }
  }
  if (acc == 0x12345678u) *sink = acc;
}

template <int S>
__global__ void Bulk(const uint8_t* k, const uint8_t* v, int chunk, int n, uint32_t* sink, int head_fast) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t bar[S];
  int c, h;
  ChunkHead(head_fast, c, h);
  const int first = c * chunk, len = min(chunk, n - first);
  const int subs = (len + kSub - 1) / kSub;
  if (threadIdx.x < S) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(Smem(&bar[threadIdx.x])));
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
  __syncthreads();
  // Threads 0..63 each copy one token's K and V rows; thread 0 arms the stage's barrier first.
  auto issue = [&](int sub) {
    const int slot = sub % S;
    const int here = min(kSub, len - sub * kSub);
    if (threadIdx.x == 0) {
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(Smem(&bar[slot])),
                   "r"(here * 2 * kRowBytes));
    }
    __syncwarp();
    if (threadIdx.x < here) {
      const int t = sub * kSub + threadIdx.x;
      const size_t off = static_cast<size_t>(first + t) * kSlotBytes + h * kRowBytes;
      uint8_t* dst = smem + slot * kStage + threadIdx.x * kRowBytes;
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
              Smem(dst)),
          "l"(k + off), "r"(kRowBytes), "r"(Smem(&bar[slot]))
          : "memory");
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
              Smem(dst + kStage / 2)),
          "l"(v + off), "r"(kRowBytes), "r"(Smem(&bar[slot]))
          : "memory");
    }
  };
  if (threadIdx.x < 64) {
    for (int s = 0; s < S - 1 && s < subs; ++s) issue(s);
  }
  uint32_t acc = 0;
  for (int sub = 0; sub < subs; ++sub) {
    const int slot = sub % S;
    const uint32_t parity = (sub / S) & 1;
    asm volatile(
        "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        " @!p bra WAIT_%=;\n}\n" ::"r"(Smem(&bar[slot])),
        "r"(parity)
        : "memory");
    acc ^= reinterpret_cast<const uint32_t*>(smem + slot * kStage)[threadIdx.x * 64];
    __syncthreads();  // everyone is done with slot (sub - 1) % S before it is refilled
    if (threadIdx.x < 64 && sub + S - 1 < subs) issue(sub + S - 1);
  }
  if (acc == 0x12345678u) *sink = acc;
}

// The same bytes as two contiguous arrays (no paging, no head stride): what a plain read stream
// of this size gets in one launch, the ceiling for any layout. kStream: streaming loads
// (ld.global.cs: the lines evict-first in L2, so after a write flush they replace each other
// rather than the flush's dirty lines), else ld.global.cg.
template <bool kStream>
__device__ __forceinline__ uint4 LoadLine(const uint4* p) {
  if constexpr (kStream) {
    return __ldcs(p);
  } else {
    return __ldcg(p);
  }
}

template <bool kStream>
__global__ void Linear(const uint4* k, const uint4* v, size_t n16, uint32_t* sink) {
  uint32_t acc = 0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    uint4 r[8];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      r[2 * u] = LoadLine<kStream>(k + i + u * stride);
      r[2 * u + 1] = LoadLine<kStream>(v + i + u * stride);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= r[u].x ^ r[u].w;
  }
  for (; i < n16; i += stride) acc ^= LoadLine<kStream>(k + i).x ^ LoadLine<kStream>(v + i).y;
  if (acc == 0x12345678u) *sink = acc;
}

// --floors: the same contiguous bytes pulled into shared memory by bulk copies (the TMA engine,
// no registers in the data path): one thread per CTA keeps S stages of `piece` bytes of K and of
// V in flight, CTA c taking pieces c, c + grid, ...; what a read gets with the fewest
// instructions and the most bytes in flight per SM.
template <int S>
__global__ void LinearBulk(const uint8_t* k, const uint8_t* v, size_t bytes, uint32_t piece, uint32_t* sink) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ __align__(8) uint64_t bar[S];
  if (threadIdx.x != 0) return;
  const size_t pieces = (bytes + piece - 1) / piece;
  const size_t mine = pieces > blockIdx.x ? (pieces - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  for (int s = 0; s < S; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(Smem(&bar[s])));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
  auto issue = [&](size_t j) {
    const size_t off = (blockIdx.x + j * gridDim.x) * static_cast<size_t>(piece);
    const uint32_t len = static_cast<uint32_t>(min(static_cast<size_t>(piece), bytes - off));
    const int slot = static_cast<int>(j % S);
    uint8_t* dst = smem + static_cast<size_t>(slot) * 2 * piece;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(Smem(&bar[slot])), "r"(2 * len));
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     Smem(dst)),
                 "l"(k + off), "r"(len), "r"(Smem(&bar[slot]))
                 : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     Smem(dst + piece)),
                 "l"(v + off), "r"(len), "r"(Smem(&bar[slot]))
                 : "memory");
  };
  for (size_t j = 0; j < S && j < mine; ++j) issue(j);
  uint32_t acc = 0;
  for (size_t j = 0; j < mine; ++j) {
    const int slot = static_cast<int>(j % S);
    const uint32_t parity = static_cast<uint32_t>((j / S) & 1);
    asm volatile(
        "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        " @!p bra WAIT_%=;\n}\n" ::"r"(Smem(&bar[slot])),
        "r"(parity)
        : "memory");
    acc ^= *reinterpret_cast<const uint32_t*>(smem + static_cast<size_t>(slot) * 2 * piece);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the read before the refill
    if (j + S < mine) issue(j + S);
  }
  if (acc == 0x12345678u) *sink = acc;
}

// --floors: a kernel that does nothing (one CTA), for the fixed cost of a launch between events.
__global__ void Empty(uint32_t* sink) {
  if (threadIdx.x == 1024) *sink = 0;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int n = 8000, reps = 50;
  bool readers_only = false, floors = false;
  // --flush=read (default: a 256 MB read, L2 left clean) or --flush=memset (a 256 MB write,
  // PERFORMANCE.md's and the anchors' method: L2 left full of dirty lines).
  auto flush_mode = deft::bench::FlushMode::kRead;
  std::vector<int> floor_tokens = {14000, 24000, 10400, 14303, 26303, 4063, 8000, 4256, 4050};
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--floors") == 0) floors = true;
    if (std::strcmp(argv[i], "--flush=memset") == 0) flush_mode = deft::bench::FlushMode::kMemset;
    if (std::strcmp(argv[i], "--flush=read") == 0) flush_mode = deft::bench::FlushMode::kRead;
    if (std::strncmp(argv[i], "--tokens=", 9) == 0) n = std::atoi(argv[i] + 9);
    if (std::strncmp(argv[i], "--reps=", 7) == 0) reps = std::atoi(argv[i] + 7);
    if (std::strcmp(argv[i], "--readers") == 0) readers_only = true;
  }
  if (floors) n = std::max(n, *std::max_element(floor_tokens.begin(), floor_tokens.end()));
  const size_t bytes = static_cast<size_t>(n + 64) * kSlotBytes;
  uint8_t *k, *v, *flush;
  uint32_t* sink;
  CHECK_CUDA(cudaMalloc(&k, bytes));
  CHECK_CUDA(cudaMalloc(&v, bytes));
  CHECK_CUDA(cudaMemset(k, 1, bytes));
  CHECK_CUDA(cudaMemset(v, 2, bytes));
  const size_t flush_bytes = size_t{256} << 20;
  CHECK_CUDA(cudaMalloc(&flush, flush_bytes));
  CHECK_CUDA(cudaMemset(flush, 3, flush_bytes));
  CHECK_CUDA(cudaMalloc(&sink, 4));
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  const double read_bytes = 2.0 * n * kHeads * kRowBytes;
  std::printf("chain of %d tokens: %.1f MB of K+V; microseconds (TB/s read); L2 flush: %s\n", n,
              read_bytes / 1e6, flush_mode == deft::bench::FlushMode::kMemset ? "memset" : "read");
  auto time = [&](auto launch) {
    std::vector<double> t;
    for (int i = 0; i < reps + 5; ++i) {
      CHECK_CUDA(deft::bench::FlushL2(flush, flush_bytes, flush_mode, i, nullptr));
      CHECK_CUDA(cudaEventRecord(a));
      launch();
      CHECK_CUDA(cudaEventRecord(b));
      CHECK_CUDA(cudaEventSynchronize(b));
      CHECK_CUDA(cudaGetLastError());
      float ms = 0;
      CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
      if (i >= 5) t.push_back(ms * 1e3);
    }
    return Median(t);
  };
  if (floors) {
    // What one launch of the simplest possible reader gives: for each row's unique KV tokens
    // (the attention bench's rows: 50x200, 50x400, 16x400, sorting, docmerge, APPS, chain,
    // siblings, 50x1), the best contiguous grid-stride read of those bytes over grid sizes and
    // block sizes, alone and followed by a second (empty) launch, beside the IO floor at
    // --bandwidth (TB/s, the attention bench's measured copy rate). Timed exactly as the
    // attention bench times a step (--flush, events around the launches, median of reps).
    double tbps = 3.0;
    for (int i = 1; i < argc; ++i) {
      if (std::strncmp(argv[i], "--bandwidth=", 12) == 0) tbps = std::atof(argv[i] + 12);
    }
    const double empty1 = time([&] { Empty<<<1, 32>>>(sink); });
    const double empty2 = time([&] {
      Empty<<<1, 32>>>(sink);
      Empty<<<1, 32>>>(sink);
    });
    std::printf("empty kernel between events: %.2f us; two empty kernels: %.2f us\n", empty1, empty2);
    // The IO target of PERFORMANCE.md: 1.25x the floor where it is >= 15 us, floor + 6 us below
    // (siblings' floor is its compute floor, not shown here).
    std::printf("| tokens | MB | IO floor us | IO target us | best read us | best reader, grid x block | TB/s | read + empty launch us | best bulk-copy read us |\n|---|---|---|---|---|---|---|---|---|\n");
    for (int t : floor_tokens) {
      const size_t n16 = static_cast<size_t>(t) * kHeads * kRowBytes / 16;
      const double mb = 2.0 * t * kHeads * kRowBytes;
      const double floor_us = mb / tbps / 1e6;
      const double target = floor_us >= 15 ? 1.25 * floor_us : floor_us + 6;
      double best = 1e30, best2 = 1e30;
      int bg = 0, bb = 0;
      bool bs = false;
      const auto k4 = reinterpret_cast<const uint4*>(k);
      const auto v4 = reinterpret_cast<const uint4*>(v);
      for (bool stream : {false, true}) {
        const auto kernel = stream ? Linear<true> : Linear<false>;
        for (int threads : {256, 512, 1024}) {
          for (int blocks : {132, 264, 396, 528, 1056, 2112}) {
            const double us = time([&] { kernel<<<blocks, threads>>>(k4, v4, n16, sink); });
            if (us < best) {
              best = us;
              bg = blocks;
              bb = threads;
              bs = stream;
            }
            const double us2 = time([&] {
              kernel<<<blocks, threads>>>(k4, v4, n16, sink);
              Empty<<<1, 32>>>(sink);
            });
            best2 = std::min(best2, us2);
          }
        }
      }
      // Bulk copies: pieces of 4-16 KiB, 4-8 stages, 1-3 CTAs per SM.
      const size_t tensor_bytes = static_cast<size_t>(t) * kHeads * kRowBytes;
      struct BulkCfg {
        int stages;
        uint32_t piece;
        int ctas_per_sm;
      };
      char bulk_best[64] = "";
      double bulk_us = 1e30;
      for (const BulkCfg& b : {BulkCfg{4, 8192, 1}, BulkCfg{4, 8192, 2}, BulkCfg{4, 8192, 3}, BulkCfg{8, 8192, 1},
                               BulkCfg{4, 16384, 1}, BulkCfg{6, 16384, 1}, BulkCfg{8, 4096, 1}, BulkCfg{8, 4096, 3}}) {
        const auto kernel = b.stages == 4 ? LinearBulk<4> : b.stages == 6 ? LinearBulk<6> : LinearBulk<8>;
        const int smem = b.stages * 2 * static_cast<int>(b.piece);
        CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        const int blocks = 132 * b.ctas_per_sm;
        const double us = time([&] { kernel<<<blocks, 32, smem>>>(k, v, tensor_bytes, b.piece, sink); });
        const double us2 = time([&] {
          kernel<<<blocks, 32, smem>>>(k, v, tensor_bytes, b.piece, sink);
          Empty<<<1, 32>>>(sink);
        });
        best2 = std::min(best2, us2);
        bulk_us = std::min(bulk_us, us);
        if (us < best) {
          best = us;
          std::snprintf(bulk_best, sizeof(bulk_best), "bulk %u B x %d stages, %d x 32", b.piece, b.stages, blocks);
        }
      }
      char how[80];
      if (bulk_best[0]) {
        std::snprintf(how, sizeof(how), "%s", bulk_best);
      } else {
        std::snprintf(how, sizeof(how), "%s, %d x %d", bs ? ".cs" : ".cg", bg, bb);
      }
      std::printf("| %d | %.1f | %.1f | %.1f | %.1f | %s | %.2f | %.1f | %.1f |\n", t, mb / 1e6, floor_us, target,
                  best, how, mb / best / 1e6, best2, bulk_us);
      std::fflush(stdout);
    }
    return 0;
  }
  if (readers_only) {
    // Shared reads: R CTAs per (chunk, head) (R 64-row tiles of a chunk) with the chunk kernel's
    // 2-stage ring at 3 CTAs per SM. DRAM sees the unique bytes once (if L2 holds them while
    // the R readers pass), L2 -> SM carries R times as much.
    const int smem = 220 * 1024 / 3;
    CHECK_CUDA(cudaFuncSetAttribute(Ring<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    std::printf("| stagger | spin ns per sub-tile | readers | chunk | CTAs | us | unique TB/s | L2->SM TB/s |\n|---|---|---|---|---|---|---|---|\n");
    for (int stagger : {0, 1})
    for (int spin : {0, 600})
    for (int chunk : {128, 256, 384, 512}) {
      CHECK_CUDA(cudaMemcpyToSymbol(g_spin_ns, &spin, sizeof(spin)));
      CHECK_CUDA(cudaMemcpyToSymbol(g_stagger, &stagger, sizeof(stagger)));
      for (int r : {1, 4, 16}) {
        const int chunks = (n + chunk - 1) / chunk;
        const dim3 grid(chunks * r, kHeads);
        const double us = time([&] { Ring<2><<<grid, 128, smem>>>(k, v, chunk, n, sink, -r); });
        std::printf("| %d | %d | %d | %d | %d | %.1f | %.2f | %.2f |\n", stagger, spin, r, chunk, chunks * r * kHeads, us,
                    read_bytes / us / 1e6, r * read_bytes / us / 1e6);
        std::fflush(stdout);
      }
    }
    return 0;
  }
  {
    const size_t n16 = static_cast<size_t>(n) * kHeads * kRowBytes / 16;
    std::printf("linear (contiguous K and V, %.1f MB):", read_bytes / 1e6);
    for (int blocks : {132, 264, 528, 1056}) {
      const double us = time([&] {
        Linear<false><<<blocks, 256>>>(reinterpret_cast<const uint4*>(k), reinterpret_cast<const uint4*>(v),
                                n16, sink);
      });
      std::printf(" %d CTAs %.1f (%.2f);", blocks, us, read_bytes / us / 1e6);
    }
    std::printf("\n");
  }
  const int chunks_list[] = {64, 128, 256, 512, 1024};
  std::printf("| kernel | ctas/SM | chunk 64 | 128 | 256 | 512 | 1024 |\n|---|---|---|---|---|---|---|\n");
  auto row = [&](const char* name, int ctas, auto kernel, int stages, int head_fast) {
    // Shared memory per CTA sized so at most `ctas` fit on an SM (228 KB per SM).
    const int smem = std::max(stages * kStage, 220 * 1024 / ctas);
    if (smem > 227 * 1024) return;
    CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    std::printf("| %s%s | %d |", name, head_fast ? ", head fastest" : "", ctas);
    for (int chunk : chunks_list) {
      const int chunks = (n + chunk - 1) / chunk;
      const dim3 grid = head_fast ? dim3(chunks * kHeads) : dim3(chunks, kHeads);
      const double us = time([&] { kernel<<<grid, 128, smem>>>(k, v, chunk, n, sink, head_fast); });
      std::printf(" %.1f (%.2f) |", us, read_bytes / us / 1e6);
    }
    std::printf("\n");
    std::fflush(stdout);
  };
  for (int head_fast : {0, 1}) {
    for (int ctas : {1, 2, 4}) {
      row("plain", ctas, Plain, 0, head_fast);
      row("ring 2", ctas, Ring<2>, 2, head_fast);
      row("ring 3", ctas, Ring<3>, 3, head_fast);
      row("ring 4", ctas, Ring<4>, 4, head_fast);
      row("bulk 3", ctas, Bulk<3>, 3, head_fast);
    }
  }
  return 0;
}
