// Device sampling (sampling.h): one 1024-thread CTA per row.
#include <cfloat>

#include "kernels/model/dispatch.cuh"
#include "kernels/model/sampling.h"
#include "kernels/model/synthetic_values.h"

namespace deft::kernels {
namespace {

constexpr int kThreads = 1024;

// Sampler::Uniform: splitmix64 of (splitmix64(seed) ^ step * odd constant), top 53 bits.
__host__ __device__ double Uniform(uint64_t seed, uint64_t step) {
  const uint64_t bits = SyntheticMix(SyntheticMix(seed) ^ (step * 0xD1B54A32D192ED03ull));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

struct Agg {
  double sum;
  int32_t count;
};

__device__ Agg BlockSum(Agg a, Agg* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    a.sum += __shfl_xor_sync(0xffffffffu, a.sum, o);
    a.count += __shfl_xor_sync(0xffffffffu, a.count, o);
  }
  __syncthreads();  // scratch may still be read by the previous reduction
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = a;
  __syncthreads();
  Agg t{0.0, 0};
  for (int w = 0; w < kThreads / 32; ++w) {
    t.sum += scratch[w].sum;
    t.count += scratch[w].count;
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

// Sum and count of the members with key (pb, i) at or before (tb, ib).
__device__ Agg PrefixAgg(const uint32_t* pbits, int32_t vocab, const Members& m, uint32_t tb,
                         int32_t ib, Agg* scratch) {
  Agg a{0.0, 0};
  const Boundary b{tb, ib};
  for (int32_t i = threadIdx.x; i < vocab; i += kThreads) {
    const uint32_t pb = pbits[i];
    if (m.Has(pb, i) && Before(pb, i, b)) {
      a.sum += __uint_as_float(pb);
      ++a.count;
    }
  }
  return BlockSum(a, scratch);
}

// The first member, in candidate order, at which the running aggregate satisfies `pred`;
// false when even all members do not. Bisection on p's bits (the level of that element: the
// largest level whose prefix satisfies pred), then on the id within that level.
__device__ bool FindFirst(const uint32_t* pbits, int32_t vocab, const Members& m, Pred pred,
                          double target, Boundary* found, Agg* scratch) {
  if (!Holds(pred, target, PrefixAgg(pbits, vocab, m, 0, INT32_MAX, scratch))) return false;
  uint32_t lo = 0, hi = 0x7f800001u;  // pred holds at lo, fails at hi
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (Holds(pred, target, PrefixAgg(pbits, vocab, m, mid, INT32_MAX, scratch))) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  int32_t ilo = -1, ihi = vocab - 1;  // fails at ilo, holds at ihi
  while (ihi - ilo > 1) {
    const int32_t mid = ilo + (ihi - ilo) / 2;
    if (Holds(pred, target, PrefixAgg(pbits, vocab, m, lo, mid, scratch))) {
      ihi = mid;
    } else {
      ilo = mid;
    }
  }
  *found = Boundary{lo, ihi};
  return true;
}

__device__ bool KeyLess(const Boundary& a, const Boundary& b) {
  return a.tb > b.tb || (a.tb == b.tb && a.ib < b.ib);
}

__global__ void __launch_bounds__(kThreads) SampleKernel(const __grid_constant__ SampleParams p) {
  __shared__ Agg scratch[kThreads / 32];
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
  // log-sum-exp of the raw logits, in fp64 as the CPU's LogSumExp.
  Agg e{0.0, 0};
  for (int32_t i = threadIdx.x; i < p.vocab; i += kThreads) {
    e.sum += exp(static_cast<double>(logits[i]) - mx);
  }
  const double lse = mx + log(BlockSum(e, scratch).sum);

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
    Boundary top_p;
    if (FindFirst(pbits, p.vocab, m, Pred::kSumAtLeast, static_cast<double>(rp.top_p) * total,
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
