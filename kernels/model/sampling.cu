// Device sampling (sampling.h): one 512-thread CTA per row.
#include <cfloat>

#include "kernels/model/dispatch.cuh"
#include "kernels/model/sampling.h"
#include "kernels/model/synthetic_values.h"

namespace deft::kernels {
namespace {

constexpr int kThreads = 512;  // 128 registers: 7 prefix sums per thread and 2 loads in flight

// Sampler::Uniform: splitmix64 of (splitmix64(seed) ^ step * odd constant), top 53 bits.
__host__ __device__ double Uniform(uint64_t seed, uint64_t step) {
  const uint64_t bits = SyntheticMix(SyntheticMix(seed) ^ (step * 0xD1B54A32D192ED03ull));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

struct Agg {
  double sum;
  int32_t count;
};

__device__ Agg BlockSum(Agg a, Agg (*scratch)[kThreads / 32]) {
  for (int o = 16; o > 0; o >>= 1) {
    a.sum += __shfl_xor_sync(0xffffffffu, a.sum, o);
    a.count += __shfl_xor_sync(0xffffffffu, a.count, o);
  }
  __syncthreads();  // scratch may still be read by the previous reduction
  if (threadIdx.x % 32 == 0) scratch[0][threadIdx.x / 32] = a;
  __syncthreads();
  Agg t{0.0, 0};
  for (int w = 0; w < kThreads / 32; ++w) {
    t.sum += scratch[0][w].sum;
    t.count += scratch[0][w].count;
  }
  return t;
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
  // The pass is bound by the row's read latency: 16-byte loads, two in flight per thread
  // (4-byte loads kept only 4 KB per SM in flight). Rows of a vocab that is a multiple of 4 are 16-byte aligned (the workspace
  // is); others take the scalar loop.
  int32_t done = 0;
  if (vocab % 4 == 0) {
    const uint4* p4 = reinterpret_cast<const uint4*>(pbits);
    const int32_t n4 = vocab / 4;
    int32_t q = threadIdx.x;
    for (; q + kThreads < n4; q += 2 * kThreads) {  // two loads in flight
      const uint4 x = p4[q], y = p4[q + kThreads];
      add(x.x, 4 * q);
      add(x.y, 4 * q + 1);
      add(x.z, 4 * q + 2);
      add(x.w, 4 * q + 3);
      const int32_t r = 4 * (q + kThreads);
      add(y.x, r);
      add(y.y, r + 1);
      add(y.z, r + 2);
      add(y.w, r + 3);
    }
    if (q < n4) {
      const uint4 x = p4[q];
      add(x.x, 4 * q);
      add(x.y, 4 * q + 1);
      add(x.z, 4 * q + 2);
      add(x.w, 4 * q + 3);
    }
    done = vocab;
  }
  for (int32_t i = done + threadIdx.x; i < vocab; i += kThreads) add(pbits[i], i);
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    a[j].sum += base.sum;
    a[j].count += base.count;
    for (int o = 16; o > 0; o >>= 1) {
      a[j].sum += __shfl_xor_sync(0xffffffffu, a[j].sum, o);
      a[j].count += __shfl_xor_sync(0xffffffffu, a[j].count, o);
    }
  }
  __syncthreads();  // scratch may still be read by the previous reduction
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int j = 0; j < kN; ++j) scratch[j][threadIdx.x / 32] = a[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    Agg t{0.0, 0};
    for (int w = 0; w < kThreads / 32; ++w) {
      t.sum += scratch[j][w].sum;
      t.count += scratch[j][w].count;
    }
    out[j] = t;
  }
}

__device__ Agg PrefixAgg(const uint32_t* pbits, int32_t vocab, const Members& m, uint32_t tb,
                         int32_t ib, Agg (*scratch)[kThreads / 32]) {
  const Boundary b[1] = {Boundary{tb, ib}};
  Agg out[1];
  PrefixAggs<1>(pbits, vocab, m, b, Boundary{UINT32_MAX, -1}, Boundary{}, out, scratch);
  return out[0];
}

// Thresholds per pass of the searches below: a (kSplit)-ary search, kSplit - 1 prefixes per pass
// over the row (the pass is bound by reading the row; the extra sums are cheap).
constexpr int kSplit = 8;

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
__device__ bool FindFirst(const uint32_t* pbits, int32_t vocab, const Members& m, Pred pred,
                          double target, Boundary* found, Agg (*scratch)[kThreads / 32]) {
  if (!Holds(pred, target, PrefixAgg(pbits, vocab, m, 0, INT32_MAX, scratch))) return false;
  int64_t lo = 0, hi = 0x3f800001;  // the level: pred holds at lo, fails at hi
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

__device__ bool KeyLess(const Boundary& a, const Boundary& b) {
  return a.tb > b.tb || (a.tb == b.tb && a.ib < b.ib);
}

__global__ void __launch_bounds__(kThreads) SampleKernel(const __grid_constant__ SampleParams p) {
  __shared__ Agg scratch[kSplit - 1][kThreads / 32];
  
  __shared__ float s_max[kThreads / 32];
  __shared__ int32_t s_arg[kThreads / 32];
  const int row = blockIdx.x;
  const SampleRowParams rp = p.row_params[row];
  const float* logits = p.logits + static_cast<int64_t>(row) * p.vocab;

  // Max and first argmax of the raw logits.
  float mx = -INFINITY;
  int32_t arg = INT32_MAX;
  for (int32_t i = threadIdx.x; i < p.vocab; i += kThreads) {
    const float v = logits[i];
    if (v > mx || (v == mx && i < arg)) {
      mx = v;
      arg = i;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, mx, o);
    const int32_t a = __shfl_xor_sync(0xffffffffu, arg, o);
    if (v > mx || (v == mx && a < arg)) {
      mx = v;
      arg = a;
    }
  }
  if (threadIdx.x % 32 == 0) {
    s_max[threadIdx.x / 32] = mx;
    s_arg[threadIdx.x / 32] = arg;
  }
  __syncthreads();
  mx = s_max[0];
  arg = s_arg[0];
  for (int w = 1; w < kThreads / 32; ++w) {
    if (s_max[w] > mx || (s_max[w] == mx && s_arg[w] < arg)) {
      mx = s_max[w];
      arg = s_arg[w];
    }
  }
  // log-sum-exp of the raw logits, in fp64 as the CPU's LogSumExp (a pass of fp64 exp: only
  // when the logprobs are asked for).
  double lse = 0.0;
  if (p.out_logprobs != nullptr) {
    Agg e{0.0, 0};
    for (int32_t i = threadIdx.x; i < p.vocab; i += kThreads) {
      e.sum += exp(static_cast<double>(logits[i]) - mx);
    }
    lse = mx + log(BlockSum(e, scratch).sum);
  }

  int32_t chosen = arg;
  if (rp.temperature != 0.f) {
    // p_i = expf((v - max) * (1 / T)), as the CPU computes it, kept as bits in the workspace.
    uint32_t* pbits =
        reinterpret_cast<uint32_t*>(p.workspace) + static_cast<int64_t>(row) * p.vocab;
    const float inv_t = 1.f / rp.temperature;
    Agg t{0.0, 0};
    for (int32_t i = threadIdx.x; i < p.vocab; i += kThreads) {
      const float v = expf((logits[i] - mx) * inv_t);
      pbits[i] = __float_as_uint(v);
      t.sum += v;
    }
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
  if (threadIdx.x == 0) {
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
  if (p.rows == 0) return cudaSuccess;
  SampleKernel<<<p.rows, kThreads, 0, stream>>>(p);
  return LastLaunchError();
}

}  // namespace deft::kernels
