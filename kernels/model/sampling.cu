// Device sampling (sampling.h): a row per cluster of 1-4 CTAs of 512 threads (as many CTAs per
// row as the SMs allow for the step's rows: the passes over the row are bound by each SM's
// loads and compares, so 10 rows on 10 SMs took as long as 64 on 64).
#include <cooperative_groups.h>

#include <algorithm>
#include <cfloat>

#include "kernels/model/dispatch.cuh"
#include "kernels/model/sampling.h"
#include "kernels/model/synthetic_values.h"

namespace deft::kernels {
namespace {

constexpr int kThreads = 512;  // 128 registers: 7 prefix sums per thread and the loads in flight
constexpr int kInFlight = 8;   // 16-byte loads a thread has in flight in a pass over the row
constexpr int kMaxCluster = 4;  // CTAs per row
// Thresholds per pass of the searches below: a (kSplit)-ary search, kSplit - 1 prefixes per pass
// over the row (the pass is bound by reading the row; the extra sums are cheap).
constexpr int kSplit = 8;

namespace cg = cooperative_groups;

// The row's threads are those of the cluster: this one's index among them and their count.
__device__ __forceinline__ int32_t RowThread() {
  return static_cast<int32_t>(cg::this_cluster().block_rank()) * kThreads + threadIdx.x;
}
__device__ __forceinline__ int32_t RowThreads() {
  return static_cast<int32_t>(cg::this_cluster().num_blocks()) * kThreads;
}

// Sampler::Uniform: splitmix64 of (splitmix64(seed) ^ step * odd constant), top 53 bits.
__host__ __device__ double Uniform(uint64_t seed, uint64_t step) {
  const uint64_t bits = SyntheticMix(SyntheticMix(seed) ^ (step * 0xD1B54A32D192ED03ull));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

struct Agg {
  double sum;
  int32_t count;
};

// f(i, v) for this thread's entries of a row (i = RowThread(), + RowThreads(), ...), in
// increasing i, with kInFlight loads issued before any is used (one in flight per thread left
// the pass waiting on L2 latency).
template <typename F>
__device__ __forceinline__ void ForEachEntry(const float* row, int32_t n, F f) {
  const int32_t stride = RowThreads();
  for (int32_t i0 = RowThread(); i0 < n; i0 += kInFlight * stride) {
    float v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int32_t i = i0 + u * stride;
      v[u] = i < n ? row[i] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int32_t i = i0 + u * stride;
      if (i < n) f(i, v[u]);
    }
  }
}

// The row's sums of kN per-thread aggregates: each warp's in its lane 0, parked in this CTA's
// scratch; then warp 0 of every CTA gathers the cluster's parked sums (lane l those of warps
// (rank, w) with rank * 16 + w = l, l + 32, ...; at most 4 a lane) and reduces them by a fixed
// shuffle tree, so every CTA gets the same bits, and shares them through `result`. The first
// barrier keeps a CTA from overwriting scratch that others may still be reading from the
// previous reduction; the kernel ends with a barrier too, so that no CTA leaves while others
// read its scratch.
template <int kN>
__device__ void RowSums(Agg (&a)[kN], Agg (*scratch)[kThreads / 32], Agg* result) {
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    for (int o = 16; o > 0; o >>= 1) {
      a[j].sum += __shfl_xor_sync(0xffffffffu, a[j].sum, o);
      a[j].count += __shfl_xor_sync(0xffffffffu, a[j].count, o);
    }
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int j = 0; j < kN; ++j) scratch[j][threadIdx.x / 32] = a[j];
  }
  cluster.sync();  // also orders the row's global stores before the readers' loads
  if (threadIdx.x < 32) {
    const int parked = static_cast<int>(cluster.num_blocks()) * (kThreads / 32);
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      Agg t{0.0, 0};
      for (int e = threadIdx.x; e < parked; e += 32) {
        const Agg v = cluster.map_shared_rank(&scratch[j][0], e / (kThreads / 32))[e % (kThreads / 32)];
        t.sum += v.sum;
        t.count += v.count;
      }
      for (int o = 16; o > 0; o >>= 1) {
        t.sum += __shfl_xor_sync(0xffffffffu, t.sum, o);
        t.count += __shfl_xor_sync(0xffffffffu, t.count, o);
      }
      if (threadIdx.x == 0) result[j] = t;
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kN; ++j) a[j] = result[j];
}

// (mx, arg) := the larger of itself and (v, a), the lower id among equal values.
__device__ __forceinline__ void TakeMax(float v, int32_t a, float& mx, int32_t& arg) {
  if (v > mx || (v == mx && a < arg)) {
    mx = v;
    arg = a;
  }
}
// Every lane: the warp's max and its lowest id.
__device__ __forceinline__ void WarpMax(float& mx, int32_t& arg) {
  for (int o = 16; o > 0; o >>= 1) {
    TakeMax(__shfl_xor_sync(0xffffffffu, mx, o), __shfl_xor_sync(0xffffffffu, arg, o), mx, arg);
  }
}

__device__ Agg BlockSum(Agg a, Agg (*scratch)[kThreads / 32]) {
  Agg t[1] = {a};
  RowSums<1>(t, scratch, &scratch[kSplit - 1][0]);
  return t[0];
}

// The candidate order is (p desc, id asc), i.e. by the key (p's bits desc, id asc): p >= 0, so
// its bits order like its value. A prefix of that order ends at a key (tb, ib).
struct Boundary {
  uint32_t tb = 0;
  int32_t ib = INT32_MAX;  // (0, INT32_MAX): every element
};
__device__ __forceinline__ bool Before(uint32_t pb, int32_t i, const Boundary& b) {
  return pb > b.tb || (pb == b.tb && i <= b.ib);
}

// Candidates: inside the boundary and p >= floor.
struct Members {
  Boundary end;
  uint32_t floor_bits = 0;
  __device__ bool Has(uint32_t pb, int32_t i) const {
    return pb >= floor_bits && Before(pb, i, end);
  }
};

enum class Pred { kCountAtLeast, kSumAtLeast, kSumAbove };
__device__ __forceinline__ bool Holds(Pred pred, double target, const Agg& a) {
  switch (pred) {
    case Pred::kCountAtLeast:
      return a.count >= target;
    case Pred::kSumAtLeast:
      return a.sum >= target;
    case Pred::kSumAbove:
      return a.sum > target;
  }
  return false;
}

// Sum and count of the members with key (pb, i) at or before each of kN boundaries, in one pass
// over the row (kN = 1: one prefix). Deterministic: per-thread sums in a fixed order, then a
// fixed reduction tree.
// `inner` and `outer` bound the prefixes (every b[j] holds inner's elements and lies within
// outer's): elements past outer are skipped and those within inner summed once, so a narrowed
// search touches only the elements between the two with kN comparisons.
template <int kN>
__device__ void PrefixAggs(const uint32_t* pbits, int32_t vocab, const Members& m,
                           const Boundary (&b)[kN], const Boundary& inner, const Boundary& outer,
                           Agg (&out)[kN], Agg (*scratch)[kThreads / 32]) {
  Agg a[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) a[j] = Agg{0.0, 0};
  Agg base{0.0, 0};
  auto add = [&](uint32_t pb, int32_t i) {
    if (!Before(pb, i, outer) || !m.Has(pb, i)) return;
    const double v = __uint_as_float(pb);
    if (Before(pb, i, inner)) {
      base.sum += v;
      ++base.count;
      return;
    }
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      if (Before(pb, i, b[j])) {
        a[j].sum += v;
        ++a[j].count;
      }
    }
  };
  // 16-byte loads (the row sits in L2), kInFlight of them issued before any is used (4-byte
  // loads kept only 4 KB per SM in flight, two 16-byte ones 16 KB; with 8 the sampling of 50-64
  // rows of 128256 went 0.84-0.88 -> 0.69-0.75 ms on the H100). Each thread still visits its
  // elements in increasing index order, so its sums are the same. Rows of a vocab that is a
  // multiple of 4 are 16-byte aligned (the workspace is); others take the scalar loop.
  int32_t done = 0;
  if (vocab % 4 == 0) {
    const uint4* p4 = reinterpret_cast<const uint4*>(pbits);
    const int32_t n4 = vocab / 4, stride = RowThreads();
    int32_t q = RowThread();
    for (; q + (kInFlight - 1) * stride < n4; q += kInFlight * stride) {
      uint4 x[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) x[u] = p4[q + u * stride];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int32_t r = 4 * (q + u * stride);
        add(x[u].x, r);
        add(x[u].y, r + 1);
        add(x[u].z, r + 2);
        add(x[u].w, r + 3);
      }
    }
    for (; q < n4; q += stride) {
      const uint4 x = p4[q];
      add(x.x, 4 * q);
      add(x.y, 4 * q + 1);
      add(x.z, 4 * q + 2);
      add(x.w, 4 * q + 3);
    }
    done = vocab;
  }
  for (int32_t i = done + RowThread(); i < vocab; i += RowThreads()) add(pbits[i], i);
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    a[j].sum += base.sum;
    a[j].count += base.count;
  }
  RowSums<kN>(a, scratch, &scratch[kSplit - 1][0]);
#pragma unroll
  for (int j = 0; j < kN; ++j) out[j] = a[j];
}

__device__ Agg PrefixAgg(const uint32_t* pbits, int32_t vocab, const Members& m, uint32_t tb,
                         int32_t ib, Agg (*scratch)[kThreads / 32]) {
  const Boundary b[1] = {Boundary{tb, ib}};
  Agg out[1];
  PrefixAggs<1>(pbits, vocab, m, b, Boundary{UINT32_MAX, -1}, Boundary{}, out, scratch);
  return out[0];
}


// One kSplit-ary narrowing of (lo, hi) per pass until hi = lo + 1: `at(t)` is the prefix
// boundary at t, pred holds at lo and fails at hi (holds_low: the prefix shrinks as t rises) or
// fails at lo and holds at hi (the prefix grows with t).
template <typename At>
__device__ void Narrow(const uint32_t* pbits, int32_t vocab, const Members& m, Pred pred,
                       double target, bool holds_low, At at, int64_t& lo, int64_t& hi,
                       Agg (*scratch)[kThreads / 32]) {
  while (hi - lo > 1) {
    Boundary b[kSplit - 1];
    int64_t t[kSplit - 1];
#pragma unroll
    for (int j = 0; j < kSplit - 1; ++j) {  // non-decreasing, in (lo, hi]
      t[j] = lo + ((hi - lo) * (j + 1) + kSplit - 1) / kSplit;
      b[j] = at(t[j]);
    }
    Agg agg[kSplit - 1];
    // The thresholds lie in (lo, hi]: every prefix contains the one at the end where prefixes
    // are smallest (hi when they shrink as t rises, else lo) and lies within the one at the
    // other end's nearest threshold (lo + 1, else hi).
    const Boundary inner = at(holds_low ? hi : lo), outer = at(holds_low ? lo + 1 : hi);
    PrefixAggs<kSplit - 1>(pbits, vocab, m, b, inner, outer, agg, scratch);
    int64_t new_lo = lo, new_hi = hi;
    for (int k = 0; k < kSplit - 1; ++k) {  // from the holding end towards the failing one
      const int j = holds_low ? k : kSplit - 2 - k;
      if (t[j] >= hi) {
        if (holds_low) break;
        continue;
      }
      if (Holds(pred, target, agg[j])) {  // still on the holding side: move that end
        (holds_low ? new_lo : new_hi) = t[j];
      } else {
        (holds_low ? new_hi : new_lo) = t[j];
        break;
      }
    }
    lo = new_lo;
    hi = new_hi;
  }
}

// The first member, in candidate order, at which the running aggregate satisfies `pred`;
// false when even all members do not. A kSplit-ary search on p's bits (the level of that
// element: the largest level whose prefix satisfies pred), then on the id within that level.
// p <= 1 (exp of a non-positive number), so levels are below 1.0f's bits + 1.
// `level_end`: one past the largest key (p's bits: 1.0f's + 1).
__device__ bool FindFirst(const uint32_t* pbits, int32_t vocab, const Members& m, Pred pred,
                          double target, Boundary* found, Agg (*scratch)[kThreads / 32],
                          int64_t level_end = 0x3f800001) {
  if (!Holds(pred, target, PrefixAgg(pbits, vocab, m, 0, INT32_MAX, scratch))) return false;
  int64_t lo = 0, hi = level_end;  // the level: pred holds at lo, fails at hi
  Narrow(pbits, vocab, m, pred, target, true,
         [](int64_t t) { return Boundary{static_cast<uint32_t>(t), INT32_MAX}; }, lo, hi, scratch);
  int64_t ilo = -1, ihi = vocab - 1;  // the id within level lo: fails at ilo, holds at ihi
  const uint32_t level = static_cast<uint32_t>(lo);
  Narrow(pbits, vocab, m, pred, target, false,
         [level](int64_t t) { return Boundary{level, static_cast<int32_t>(t)}; }, ilo, ihi,
         scratch);
  *found = Boundary{level, static_cast<int32_t>(ihi)};
  return true;
}

// A logit's bits mapped so that unsigned order is the value's (-0 as +0, as the CPU's compare);
// finite and infinite logits map below 0xff800001.
__device__ __forceinline__ uint32_t LogitKey(float l) {
  const uint32_t u = __float_as_uint(l == 0.f ? 0.f : l);
  return (u & 0x80000000u) != 0u ? ~u : u | 0x80000000u;
}
constexpr int64_t kLogitKeyEnd = 0xff800001;

// The row's top_logprobs alternatives (sampling.h): the n-th key in (logit desc, id asc) order
// by the same search as the draws, over the logits' keys written into `keys`; then every CTA
// parks its elements before that boundary (at most n over the cluster), and warp 0 of rank 0
// orders them and stores their ids and log-softmax values.
__device__ void TopAlternatives(const SampleParams& p, int row, const float* logits, int n,
                                double lse, uint32_t* keys, Agg (*scratch)[kThreads / 32],
                                int32_t* s_ids, uint32_t* s_keys, int* s_count) {
  ForEachEntry(logits, p.vocab, [&](int32_t i, float l) { keys[i] = LogitKey(l); });
  BlockSum(Agg{0.0, 0}, scratch);  // orders the key stores before every CTA's reads
  Members all;
  Boundary nth;
  FindFirst(keys, p.vocab, all, Pred::kCountAtLeast, n, &nth, scratch, kLogitKeyEnd);
  if (threadIdx.x == 0) *s_count = 0;
  __syncthreads();
  ForEachEntry(logits, p.vocab, [&](int32_t i, float l) {
    const uint32_t k = LogitKey(l);
    if (Before(k, i, nth)) {
      const int slot = atomicAdd(s_count, 1);  // at most n in the cluster: in range
      s_ids[slot] = i;
      s_keys[slot] = k;
    }
  });
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  if (cluster.block_rank() != 0 || threadIdx.x >= 32) return;
  // Lane l takes the l-th parked entry of the cluster (CTAs in rank order); n <= 32.
  int32_t id = INT32_MAX;
  uint32_t key = 0;
  bool have = false;
  int seen = 0;
  for (int r = 0; r < static_cast<int>(cluster.num_blocks()); ++r) {
    const int c = *cluster.map_shared_rank(s_count, r);
    if (threadIdx.x >= seen && threadIdx.x < seen + c) {
      id = cluster.map_shared_rank(s_ids, r)[threadIdx.x - seen];
      key = cluster.map_shared_rank(s_keys, r)[threadIdx.x - seen];
      have = true;
    }
    seen += c;
  }
  int rank = 0;
  for (int j = 0; j < seen; ++j) {
    const int32_t oid = __shfl_sync(0xffffffffu, id, j);
    const uint32_t okey = __shfl_sync(0xffffffffu, key, j);
    rank += (okey > key || (okey == key && oid < id)) ? 1 : 0;
  }
  if (have && rank < n) {
    const int64_t at = static_cast<int64_t>(row) * p.max_top_logprobs + rank;
    p.out_top_ids[at] = id;
    p.out_top_logprobs[at] = static_cast<float>(logits[id] - lse);
  }
}

__device__ bool KeyLess(const Boundary& a, const Boundary& b) {
  return a.tb > b.tb || (a.tb == b.tb && a.ib < b.ib);
}

__global__ void __launch_bounds__(kThreads) SampleKernel(const __grid_constant__ SampleParams p) {
  __shared__ Agg scratch[kSplit][kThreads / 32];  // the last row: RowSums' results
  
  __shared__ float s_max[kThreads / 32];
  __shared__ float s_raw_max[kThreads / 32];  // penalized rows
  __shared__ int32_t s_arg[kThreads / 32];
  __shared__ int32_t s_top_ids[kMaxTopLogprobs];
  __shared__ uint32_t s_top_keys[kMaxTopLogprobs];
  __shared__ int s_top_count;
  cg::cluster_group cluster = cg::this_cluster();
  const int row = blockIdx.x / static_cast<int>(cluster.num_blocks());
  const SampleRowParams rp = p.row_params[row];
  const int32_t logit_row = p.logit_rows != nullptr ? p.logit_rows[row] : row;
  const float* logits = p.logits + static_cast<int64_t>(logit_row) * p.vocab;
  float* work = p.workspace + static_cast<int64_t>(row) * p.vocab;

  // The logits the draw chooses from: the raw row, or (penalties) the row copied into the
  // workspace with the sampler's seen tokens rewritten there (the CPU's order: repetition, then
  // frequency and presence; each entry's id is unique, so the rewrites do not race). The
  // temperature pass below turns the workspace row into p in place.
  const bool penalized = (rp.penalty_count > 0 || rp.override_count > 0) &&
                         (rp.repetition_penalty != 1.f || rp.frequency_penalty != 0.f ||
                          rp.presence_penalty != 0.f);
  // Entries [begin, + count): each id's raw logit rewritten into the workspace row.
  auto rewrite = [&](int32_t begin, int32_t count) {
    for (int32_t e = RowThread(); e < count; e += RowThreads()) {
      const int32_t id = p.penalty_ids[begin + e];
      const int32_t n = p.penalty_counts[begin + e];
      if (id < 0 || id >= p.vocab) continue;
      float v = logits[id];
      if (rp.repetition_penalty != 1.f) {
        v = v > 0.f ? __fdiv_rn(v, rp.repetition_penalty) : __fmul_rn(v, rp.repetition_penalty);
      }
      if (n > 0) {
        v = __fsub_rn(v, __fmaf_rn(rp.frequency_penalty, static_cast<float>(n),
                                   rp.presence_penalty));
      }
      work[id] = v;
    }
    cluster.sync();  // before the next pass reads them (which may be another CTA's entries)
  };
  if (penalized) {
    // The copy, and the raw logits' max (their log-sum-exp's shift) into s_raw_max[0].
    float raw_max = -INFINITY;
    ForEachEntry(logits, p.vocab, [&](int32_t i, float v) {
      work[i] = v;
      raw_max = fmaxf(raw_max, v);
    });
    for (int o = 16; o > 0; o >>= 1) raw_max = fmaxf(raw_max, __shfl_xor_sync(~0u, raw_max, o));
    if (threadIdx.x % 32 == 0) s_raw_max[threadIdx.x / 32] = raw_max;
    cluster.sync();  // the copies before the rewrites; the warps' maxima parked
    if (threadIdx.x == 0) {
      for (int r = 0; r < static_cast<int>(cluster.num_blocks()); ++r) {
        for (int w = 0; w < kThreads / 32; ++w) {
          raw_max = fmaxf(raw_max, cluster.map_shared_rank(&s_raw_max[0], r)[w]);
        }
      }
    }
    if (rp.penalty_count > 0) rewrite(rp.penalty_begin, rp.penalty_count);
    if (rp.override_count > 0) rewrite(rp.override_begin, rp.override_count);
    // Every CTA has read the parked maxima (the rewrites end with a cluster barrier, and there
    // is at least one): thread 0 keeps the row's max where the lse below reads it.
    if (threadIdx.x == 0) s_raw_max[0] = raw_max;
  }
  const float* sel = penalized ? work : logits;

  // Max and first argmax of the logits the draw chooses from.
  float mx = -INFINITY;
  int32_t arg = INT32_MAX;
  ForEachEntry(sel, p.vocab, [&](int32_t i, float v) { TakeMax(v, i, mx, arg); });
  WarpMax(mx, arg);
  if (threadIdx.x % 32 == 0) {
    s_max[threadIdx.x / 32] = mx;
    s_arg[threadIdx.x / 32] = arg;
  }
  cluster.sync();
  if (threadIdx.x < 32) {  // warp 0 gathers the cluster's warps' maxima (as RowSums)
    const int parked = static_cast<int>(cluster.num_blocks()) * (kThreads / 32);
    for (int e = threadIdx.x; e < parked; e += 32) {
      const int r = e / (kThreads / 32), w = e % (kThreads / 32);
      TakeMax(cluster.map_shared_rank(&s_max[0], r)[w], cluster.map_shared_rank(&s_arg[0], r)[w],
              mx, arg);
    }
    WarpMax(mx, arg);
  }
  // Warp 0's lanes all hold the row's max now; s_max[0] and s_arg[0] (this CTA's) take it once
  // every warp 0 lane of the cluster has read the parked values.
  cluster.sync();
  if (threadIdx.x == 0) {
    s_max[0] = mx;
    s_arg[0] = arg;
  }
  __syncthreads();
  mx = s_max[0];
  arg = s_arg[0];
  // log-sum-exp of the raw logits, in fp64 as the CPU's LogSumExp (a pass of fp64 exp: only
  // when the logprobs are asked for).
  const int top_n = p.out_top_ids == nullptr
                        ? 0
                        : min(min(rp.top_logprobs, p.max_top_logprobs), min(p.vocab, kMaxTopLogprobs));
  double lse = 0.0;
  if (p.out_logprobs != nullptr || top_n > 0) {
    const double shift = penalized ? s_raw_max[0] : mx;  // (written before the barrier above)
    Agg e{0.0, 0};
    ForEachEntry(logits, p.vocab,
                 [&](int32_t, float v) { e.sum += exp(static_cast<double>(v) - shift); });
    lse = shift + log(BlockSum(e, scratch).sum);
  }

  int32_t chosen = arg;
  if (rp.temperature != 0.f) {
    // p_i = expf((v - max) * (1 / T)), as the CPU computes it, kept as bits in the workspace.
    uint32_t* pbits = reinterpret_cast<uint32_t*>(work);
    const float inv_t = 1.f / rp.temperature;
    Agg t{0.0, 0};
    ForEachEntry(sel, p.vocab, [&](int32_t i, float l) {  // in place when penalized
      const float v = expf((l - mx) * inv_t);
      pbits[i] = __float_as_uint(v);
      t.sum += v;
    });
    const double total = BlockSum(t, scratch).sum;  // also orders the pbits stores before reads
    Members m;
    if (rp.top_k > 0 && rp.top_k < p.vocab) {
      FindFirst(pbits, p.vocab, m, Pred::kCountAtLeast, rp.top_k, &m.end, scratch);
    }
    // top_p = 1 keeps every candidate (the CPU's prefix can stop short of the whole row only
    // where the remaining p sum to less than the fp64 rounding of the total: never drawn).
    Boundary top_p;
    if (rp.top_p < 1.f &&
        FindFirst(pbits, p.vocab, m, Pred::kSumAtLeast, static_cast<double>(rp.top_p) * total,
                  &top_p, scratch) &&
        KeyLess(top_p, m.end)) {
      m.end = top_p;
    }
    if (rp.min_p > 0.f) {
      // p of the first candidate: the largest p (the element at the max logit: exactly 1).
      const float p_top = expf((mx - mx) * inv_t);
      m.floor_bits = __float_as_uint(rp.min_p * p_top);
    }
    const Agg kept = PrefixAgg(pbits, p.vocab, m, 0, INT32_MAX, scratch);
    const double u = Uniform(rp.seed, rp.step) * kept.sum;
    Boundary pick;
    if (!FindFirst(pbits, p.vocab, m, Pred::kSumAbove, u, &pick, scratch)) {
      FindFirst(pbits, p.vocab, m, Pred::kCountAtLeast, kept.count, &pick, scratch);  // the last
    }
    chosen = pick.ib;
  }
  if (top_n > 0) {
    // The draw's last reads of the workspace row were before its last cluster barrier.
    TopAlternatives(p, row, logits, top_n, lse,
                    reinterpret_cast<uint32_t*>(p.workspace) + static_cast<int64_t>(row) * p.vocab,
                    scratch, s_top_ids, s_top_keys, &s_top_count);
  }
  cluster.sync();  // no CTA leaves while another may read its shared memory
  if (threadIdx.x == 0 && cluster.block_rank() == 0) {
    p.out_tokens[row] = chosen;
    if (p.out_logprobs != nullptr) {
      p.out_logprobs[row] = static_cast<float>(logits[chosen] - lse);
    }
  }
}

}  // namespace

double SampleUniformHost(uint64_t seed, uint64_t step) { return Uniform(seed, step); }

size_t SampleWorkspaceBytes(int32_t rows, int32_t vocab) {
  return static_cast<size_t>(rows) * static_cast<size_t>(vocab) * sizeof(float);
}

cudaError_t LaunchSample(const SampleParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.vocab <= 0 || p.logits == nullptr || p.out_tokens == nullptr ||
      p.row_params == nullptr || (p.rows > 0 && p.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.out_top_ids != nullptr &&
      (p.out_top_logprobs == nullptr || p.max_top_logprobs < 1 ||
       p.max_top_logprobs > kMaxTopLogprobs)) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  // CTAs per row: as many as fit on the SMs beside the other rows' (one 512-thread CTA per SM
  // at these registers), 1 to kMaxCluster.
  static const int sms = [] {
    int device = 0, n = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      return 1;
    }
    return n;
  }();
  const int per_row = std::clamp(sms / p.rows, 1, kMaxCluster);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(p.rows * per_row));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = per_row;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, SampleKernel, p);
}

}  // namespace deft::kernels
