// CPU execution of a PartitionPlan; see cpu_attention.h for the contract and the loop order.
#include "engine/attention/cpu_attention.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "engine/cpu/simd.h"
#include "engine/util/thread_pool.h"

namespace deft {
namespace {

// Tokens per tile: K and V rows of a tile (32 x 3 KV heads x 64 x 4 B = 24 KiB each for
// SmolLM2) serve every entry of the chunk from L1/L2. A multiple of 8 that divides 64. Measured
// with bench/cpu_tree (2-core EPYC VM, 2026-11-24), flatten, tile 16 / 32 / 64: few-shot 50 x 400
// 8.1-8.7 / 8.7-8.9 / 10.1-10.2 ms, speculative tree 128 14.5-14.7 / 11.1 / 16.4-16.9 ms.
constexpr int32_t kTileTokens = 32;

// e^x on 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial of degree 7
// (truncation error < 6e-9 relative), 2^n through the exponent bits. Lanes below -87.3 (where e^x
// leaves the normal floats, and -inf) give exactly 0, so masked scores contribute nothing.
inline __m256 Exp(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln 2 = 0.693359375 (exact in few bits, so n * it is exact) - 2.12194440e-4.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440054e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// Max of 8 lanes.
inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Lanes j with bit j of `bits` set: all ones.
inline __m256 LaneMask(uint32_t bits) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane_bit);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bit));
}

// Dots of q [d] with 8 rows k[j] + offset [d]; d a multiple of 8. One accumulator per row, then a
// transpose-and-add reduction, so that 8 dots cost 3 horizontal-add levels instead of 8.
inline __m256 Dot8(const float* q, const float* const* k, int64_t offset, int64_t d) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int j = 0; j < 8; ++j) {
      acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j] + offset + i), acc[j]);
    }
  }
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// o [kRegs * 8] += sum over t < n of p[t] * v[t] + offset, o held in registers.
template <int kRegs>
inline void AccumulateBlock(float* o, const float* p, const float* const* v, int64_t offset,
                            int32_t n) {
  __m256 acc[kRegs];
  for (int j = 0; j < kRegs; ++j) acc[j] = _mm256_loadu_ps(o + 8 * j);
  for (int32_t t = 0; t < n; ++t) {
    const __m256 pv = _mm256_set1_ps(p[t]);
    const float* row = v[t] + offset;
    for (int j = 0; j < kRegs; ++j)
      acc[j] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row + 8 * j), acc[j]);
  }
  for (int j = 0; j < kRegs; ++j) _mm256_storeu_ps(o + 8 * j, acc[j]);
}

// o [d] += sum over t < n of p[t] * v[t] + offset [d], in blocks of 64 floats (8 registers).
inline void Accumulate(float* o, const float* p, const float* const* v, int64_t offset, int64_t d,
                       int32_t n) {
  int64_t i = 0;
  for (; i + 64 <= d; i += 64) AccumulateBlock<8>(o + i, p, v, offset + i, n);
  using Block = void (*)(float*, const float*, const float* const*, int64_t, int32_t);
  static constexpr Block kTail[8] = {nullptr,
                                     &AccumulateBlock<1>,
                                     &AccumulateBlock<2>,
                                     &AccumulateBlock<3>,
                                     &AccumulateBlock<4>,
                                     &AccumulateBlock<5>,
                                     &AccumulateBlock<6>,
                                     &AccumulateBlock<7>};
  if (i < d) kTail[(d - i) / 8](o + i, p, v, offset + i, n);
}

struct Pass1 {
  const PartitionPlan& plan;
  const KvBlockPool& kv;
  int64_t layer, heads, group, head_dim;
  float scale;
  const float* q;
  float* partial_o;
  float* partial_lse;
};

// Per-thread buffers of RunChunk.
struct ChunkScratch {
  float* scores;   // [heads, kTileTokens]
  float* run_max;  // [entries of the chunk, heads]
  float* run_sum;  // [entries of the chunk, heads]
};

// Visible tokens [local, local + w) of entry e as bits (w <= kTileTokens, local a multiple of
// kTileTokens, so the bits lie in one mask word).
inline uint64_t TileBits(const PartitionPlan& plan, int32_t e, int32_t local, int32_t w) {
  const uint64_t all = w == 64 ? ~uint64_t{0} : (uint64_t{1} << w) - 1;
  const int32_t mb = plan.entry_mask_begin[e];
  if (mb == plan.entry_mask_begin[e + 1]) return all;
  return (plan.masks[mb + local / 64] >> (local % 64)) & all;
}
static_assert(kTileTokens % 8 == 0 && 64 % kTileTokens == 0);

// Partial states of every entry of chunk c. Loop order: tile of tokens (K/V rows gathered once)
// -> entries -> heads; per (entry, head) an online softmax over the tiles.
void RunChunk(const Pass1& a, int32_t c, const ChunkScratch& cs) {
  const PartitionPlan& plan = a.plan;
  const int32_t t_begin = plan.chunk_begin[c], t_end = plan.chunk_begin[c + 1];
  const int32_t e0 = plan.entry_begin[c], ne = plan.entry_begin[c + 1] - e0;
  if (ne == 0) return;
  const int64_t H = a.heads, D = a.head_dim, W = kTileTokens;

  float* o_base = a.partial_o + static_cast<int64_t>(e0) * H * D;
  std::fill(o_base, o_base + ne * H * D, 0.f);
  std::fill(cs.run_max, cs.run_max + ne * H, -INFINITY);
  std::fill(cs.run_sum, cs.run_sum + ne * H, 0.f);
  const float* k_rows[kTileTokens];
  const float* v_rows[kTileTokens];

  for (int32_t tile = t_begin; tile < t_end; tile += kTileTokens) {
    const int32_t w = std::min<int32_t>(kTileTokens, t_end - tile);
    const int32_t groups = (w + 7) / 8;
    for (int32_t t = 0; t < groups * 8; ++t) {  // padding lanes point at a real row, masked off
      const int32_t slot = plan.kv_slots[tile + std::min(t, w - 1)];
      k_rows[t] = a.kv.k(a.layer, slot);
      v_rows[t] = a.kv.v(a.layer, slot);
    }
    for (int32_t i = 0; i < ne; ++i) {
      const uint64_t bits = TileBits(plan, e0 + i, tile - t_begin, w);
      if (bits == 0) continue;  // the entry sees none of this tile
      const float* qe = a.q + static_cast<int64_t>(plan.entry_query[e0 + i]) * H * D;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t kv_offset = (h / a.group) * D;
        float* s = cs.scores + h * W;
        // Scores, masked lanes -inf.
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        for (int32_t g = 0; g < groups; ++g) {
          const uint32_t b8 = static_cast<uint32_t>(bits >> (8 * g)) & 0xFF;
          __m256 dots = _mm256_set1_ps(-INFINITY);
          if (b8 != 0) {
            dots = _mm256_mul_ps(Dot8(qe + h * D, k_rows + 8 * g, kv_offset, D),
                                 _mm256_set1_ps(a.scale));
            dots = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), dots, LaneMask(b8));
          }
          _mm256_storeu_ps(s + 8 * g, dots);
          vmax = _mm256_max_ps(vmax, dots);
        }
        const float tile_max = HorizontalMax(vmax);  // finite: bits != 0
        // Online softmax: rescale what came before when the max grows.
        const int64_t r = i * H + h;
        float* o = o_base + r * D;
        const float old_max = cs.run_max[r];
        if (tile_max > old_max) {
          if (old_max != -INFINITY) {
            const float alpha = std::exp(old_max - tile_max);
            for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
            cs.run_sum[r] *= alpha;
          }
          cs.run_max[r] = tile_max;
        }
        const __m256 m = _mm256_set1_ps(cs.run_max[r]);
        __m256 sum = _mm256_setzero_ps();
        for (int32_t g = 0; g < groups; ++g) {
          const __m256 p = Exp(_mm256_sub_ps(_mm256_loadu_ps(s + 8 * g), m));
          _mm256_storeu_ps(s + 8 * g, p);
          sum = _mm256_add_ps(sum, p);
        }
        cs.run_sum[r] += simd::HorizontalSum(sum);
        // o += p V over the tile (masked tokens have p = 0 exactly).
        Accumulate(o, s, v_rows, kv_offset, D, w);
      }
    }
  }
  for (int64_t r = 0; r < ne * H; ++r) {
    float* o = o_base + r * D;
    float* lse = a.partial_lse + static_cast<int64_t>(e0) * H + r;
    if (cs.run_sum[r] == 0.f) {
      *lse = -INFINITY;
      continue;
    }
    const float inv = 1.f / cs.run_sum[r];
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    *lse = cs.run_max[r] + std::log(cs.run_sum[r]);
  }
}

}  // namespace

void MergeStates(float* o_a, float* lse_a, const float* o_b, float lse_b, int64_t head_dim) {
  if (lse_b == -INFINITY) return;
  if (*lse_a == -INFINITY) {
    std::memcpy(o_a, o_b, static_cast<size_t>(head_dim) * sizeof(float));
    *lse_a = lse_b;
    return;
  }
  // With m = max(lse_a, lse_b) one weight is 1 and the other e^-|lse_a - lse_b|.
  const float m = std::max(*lse_a, lse_b);
  const float wa = std::exp(*lse_a - m), wb = std::exp(lse_b - m);
  const float inv = 1.f / (wa + wb);
  const float ca = wa * inv, cb = wb * inv;
  for (int64_t d = 0; d < head_dim; ++d) o_a[d] = ca * o_a[d] + cb * o_b[d];
  *lse_a = m + std::log1p(std::min(wa, wb));
}

void RunAttentionCpu(ThreadPool& pool, const PartitionPlan& plan, const KvBlockPool& kv,
                     int64_t layer, const AttentionShape& shape, const float* q, float* out,
                     CpuAttentionScratch* scratch) {
  const int64_t H = shape.num_heads, D = shape.head_dim;
  const int64_t num_entries = plan.num_entries();
  const int32_t num_chunks = plan.num_chunks(), num_queries = plan.num_queries();
  scratch->partial_o.resize(static_cast<size_t>(num_entries * H * D));
  scratch->partial_lse.resize(static_cast<size_t>(num_entries * H));
  int64_t max_entries = 0;
  for (int32_t c = 0; c < num_chunks; ++c) {
    max_entries = std::max<int64_t>(max_entries, plan.entry_begin[c + 1] - plan.entry_begin[c]);
  }
  const size_t threads = static_cast<size_t>(pool.num_threads());
  for (auto* v : {&scratch->scores, &scratch->running_max, &scratch->running_sum}) {
    if (v->size() < threads) v->resize(threads);
  }
  for (size_t t = 0; t < threads; ++t) {
    scratch->scores[t].resize(static_cast<size_t>(H * kTileTokens));
    scratch->running_max[t].resize(static_cast<size_t>(max_entries * H));
    scratch->running_sum[t].resize(static_cast<size_t>(max_entries * H));
  }

  // Pass 1: chunks handed out one at a time (their costs differ by the number of entries).
  const Pass1 args{.plan = plan,
                   .kv = kv,
                   .layer = layer,
                   .heads = H,
                   .group = H / shape.num_kv_heads,
                   .head_dim = D,
                   .scale = 1.f / std::sqrt(static_cast<float>(D)),
                   .q = q,
                   .partial_o = scratch->partial_o.data(),
                   .partial_lse = scratch->partial_lse.data()};
  std::atomic<int32_t> next_chunk{0};
  pool.ParallelFor(pool.num_threads(), 1, [&](int thread, int64_t, int64_t) {
    const ChunkScratch cs{scratch->scores[thread].data(), scratch->running_max[thread].data(),
                          scratch->running_sum[thread].data()};
    for (int32_t c; (c = next_chunk.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      RunChunk(args, c, cs);
    }
  });

  // Pass 2: each query's entries merged in plan order.
  const float* partial_o = scratch->partial_o.data();
  const float* partial_lse = scratch->partial_lse.data();
  pool.ParallelFor(num_queries, 1, [&](int, int64_t begin, int64_t end) {
    for (int64_t qi = begin; qi < end; ++qi) {
      float* o_q = out + qi * H * D;
      const int32_t k0 = plan.query_entry_begin[qi], k1 = plan.query_entry_begin[qi + 1];
      for (int64_t h = 0; h < H; ++h) {
        float* o = o_q + h * D;
        if (k0 == k1) {
          std::fill(o, o + D, 0.f);
          continue;
        }
        int64_t e = plan.query_entries[k0];
        std::memcpy(o, partial_o + (e * H + h) * D, static_cast<size_t>(D) * sizeof(float));
        float lse = partial_lse[e * H + h];
        for (int32_t k = k0 + 1; k < k1; ++k) {
          e = plan.query_entries[k];
          MergeStates(o, &lse, partial_o + (e * H + h) * D, partial_lse[e * H + h], D);
        }
      }
    }
  });
}

void RunAttentionCpu(ThreadPool& pool, const PartitionPlan& plan, const KvBlockPool& kv,
                     int64_t layer, const AttentionShape& shape, const float* q, float* out) {
  // The calling thread's scratch; workers reach it only through the pointer.
  thread_local CpuAttentionScratch scratch;
  RunAttentionCpu(pool, plan, kv, layer, shape, q, out, &scratch);
}

}  // namespace deft
