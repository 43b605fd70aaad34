// bench/attention: one decode step of tree attention (one layer) on the GPU, our four modes
// (seq = flash-decoding over the paged pool, tree = Medusa-style tree mask, node = DeFT-Node,
// flatten = DeFT-Flatten) beside the IO and compute floors measured in the same run, and the
// anchors of ../shared/PERFORMANCE.md section 1 (radix, DeFT-Flatten, FastTree on H100).
//
// Method (PERFORMANCE.md): random inputs (never zeros) rounded to fp16/bf16, K/V in a paged pool
// (16-token blocks in allocation order), L2 flushed (--flush: a 256 MB read, or memset) before every run, CUDA events
// around the step's launches (chunk kernel + merge kernel; the plan is uploaded once per step
// and timed apart), warm-up, median of --reps runs; every mode is timed in two rounds and the
// spread between rounds is reported. Each mode's output is checked against the fp32 CPU
// reference (relative L2 error) before timing. Floors: IO = unique KV bytes / copy bandwidth
// (read + written bytes of a 2 GiB device copy), compute = 4 x sum over queries of attended
// tokens x heads x head_dim FLOPs / bf16 GEMM rate (cuBLAS 8192^3); floor = the larger.
//
// Trees (--rows, comma-separated; default: the PERFORMANCE.md rows + degenerate ones):
//   fewshot:P:W:L            prompt P shared by W branches of L tokens
//   reasoning:FILE:INDEX:PAD  tree INDEX of reasoning/FILE.json, prompt padded to PAD
//   speculative:SIZE:PREFIX   APPS_tree_sizeSIZE.json under a prefix of PREFIX tokens
//   chain:N / siblings:P:N    one N-token chain; N one-token siblings under a P-token prompt
// Output: a markdown table on stdout; --json=PATH writes every row (all numbers) as JSON.
// Profiling: in a build configured with -DDEFT_ATTN_TRACE=ON, --trace=DIR writes each row's
// per-CTA timestamps of one flushed run (chunk and merge kernels) to DIR/row<N>_<dtype>_<mode>.csv.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "bench/attention/l2_flush.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "engine/attention/cpu_attention.h"
#include "engine/attention/gpu_chunking.h"
#include "engine/attention/workload_forest.h"
#include "engine/gpu/gpu_tree_attention.h"
#include "engine/kv/kv_block_pool.h"
#include "engine/util/thread_pool.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, rows, "default", "trees to measure (see the file's comment)");
ABSL_FLAG(std::string, dtypes, "fp16,bf16", "KV dtypes: fp16, bf16");
ABSL_FLAG(std::string, modes, "seq,tree,node,flatten", "attention modes");
ABSL_FLAG(int32_t, heads, 32, "query heads");
ABSL_FLAG(int32_t, kv_heads, 8, "KV heads");
ABSL_FLAG(int32_t, head_dim, 128, "head dim (64 or 128)");
ABSL_FLAG(int32_t, reps, 200, "timed runs per mode and round");
ABSL_FLAG(std::string, flush, "read",
          "L2 flush before each timed run: read (a read-only kernel; L2 left clean) or memset "
          "(L2 left dirty, as Triton's do_bench; its write-back lands in the timed run)");
ABSL_FLAG(int32_t, chunk_tokens, 0,
          "force this chunk size (flatten/node: chunk tokens; seq/tree: split size) instead of "
          "the cost model's choice (0)");
ABSL_FLAG(std::vector<std::string>, chunk_list, {},
          "flatten: force these chunk lengths in flattened order (comma-separated, the last "
          "repeated) instead of the cost model's uniform size");
ABSL_FLAG(std::string, merge, "auto",
          "merge kernel: auto, head (a warp per query and head) or group (a warp per query and KV "
          "head, where the GQA group is 2, 4 or 8)");
ABSL_FLAG(std::string, json, "", "write the rows as JSON to this file");
ABSL_FLAG(std::string, trace, "",
          "profiling builds (-DDEFT_ATTN_TRACE=ON): write each row's per-CTA timestamps of one "
          "flushed run to DIR/row<N>_<dtype>_<mode>.csv");
ABSL_FLAG(std::string, workloads, "", "workloads directory (default $DEFT_WORKLOADS_DIR or build's)");

namespace deft {
namespace {

#define CHECK_CUDA(expr)                                                              \
  do {                                                                                \
    cudaError_t e_ = (expr);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr,             \
                   cudaGetErrorString(e_));                                           \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

struct Anchor {
  double radix, deft_flatten, fasttree;
};
// PERFORMANCE.md section 1 (H100, 2026-11-23, fp16, microseconds).
const std::map<std::string, Anchor> kAnchors = {
    {"fewshot:4000:50:200", {498, 155, 80}},   {"fewshot:4000:50:400", {520, 206, 95}},
    {"fewshot:4000:16:400", {362, 130, 45}},   {"reasoning:sorting128ToT:0:4000", {432, 116, 56}},
    {"reasoning:docmergeToT:0:4000", {592, 189, 87}}, {"speculative:64:4000", {516, 113, 64}},
    {"chain:8000", {575, 92, 33}},             {"siblings:4000:256", {1773, 367, 176}},
};
const char* kDefaultRows =
    "fewshot:4000:50:200,fewshot:4000:50:400,fewshot:4000:16:400,reasoning:sorting128ToT:0:4000,"
    "reasoning:docmergeToT:0:4000,speculative:64:4000,chain:8000,siblings:4000:256,"
    "fewshot:4000:50:1";

uint64_t SplitMix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
float Uniform(uint64_t& s) {  // [-1, 1), never exactly 0 in practice
  return static_cast<float>(static_cast<int64_t>(SplitMix(s) >> 40) - (1 << 23)) / (1 << 23);
}

bool ParseRow(const std::string& spec, const std::string& dir, WorkloadForest* out) {
  std::vector<std::string> p = absl::StrSplit(spec, ':');
  auto num = [&](size_t i) {
    int32_t v = 0;
    if (i >= p.size() || !absl::SimpleAtoi(p[i], &v)) v = -1;
    return v;
  };
  if (p[0] == "fewshot" && p.size() == 4) {
    *out = FewShotForest(num(1), num(2), num(3));
  } else if (p[0] == "chain" && p.size() == 2) {
    *out = ChainForest(num(1));
  } else if (p[0] == "siblings" && p.size() == 3) {
    *out = SiblingsForest(num(1), num(2));
  } else if (p[0] == "reasoning" && p.size() == 4) {
    auto f = LoadReasoningForest(dir + "/reasoning/" + p[1] + ".json", num(2), num(3));
    if (!f.ok()) {
      std::fprintf(stderr, "%s\n", f.status().ToString().c_str());
      return false;
    }
    *out = *std::move(f);
  } else if (p[0] == "speculative" && p.size() == 3) {
    auto f = LoadSpeculativeForest(dir + "/speculative/APPS_tree_size" + p[1] + ".json", num(2));
    if (!f.ok()) {
      std::fprintf(stderr, "%s\n", f.status().ToString().c_str());
      return false;
    }
    *out = *std::move(f);
  } else {
    std::fprintf(stderr, "attention_bench: bad row spec '%s'\n", spec.c_str());
    return false;
  }
  for (int32_t l : out->length) {
    if (l <= 0) {
      std::fprintf(stderr, "attention_bench: row '%s' has an empty segment\n", spec.c_str());
      return false;
    }
  }
  return true;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Copy bandwidth (bytes read + written per second) of a 2 GiB device-to-device copy.
double MeasureBandwidth() {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  cudaEvent_t s, e;
  CHECK_CUDA(cudaEventCreate(&s));
  CHECK_CUDA(cudaEventCreate(&e));
  std::vector<double> t;
  for (int i = 0; i < 7; ++i) {
    CHECK_CUDA(cudaEventRecord(s));
    CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaEventRecord(e));
    CHECK_CUDA(cudaEventSynchronize(e));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, s, e));
    if (i > 0) t.push_back(ms * 1e-3);
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / Median(t);
}

// bf16 GEMM rate (FLOP/s) of cuBLAS at 8192^3 on random data, fp32 accumulate.
double MeasureGemmRate() {
  const int n = 8192;
  const size_t elems = static_cast<size_t>(n) * n;
  std::vector<__nv_bfloat16> host(elems);
  uint64_t seed = 7;
  for (auto& x : host) x = __float2bfloat16_rn(Uniform(seed));
  void *a = nullptr, *b = nullptr, *c = nullptr;
  CHECK_CUDA(cudaMalloc(&a, elems * 2));
  CHECK_CUDA(cudaMalloc(&b, elems * 2));
  CHECK_CUDA(cudaMalloc(&c, elems * 2));
  CHECK_CUDA(cudaMemcpy(a, host.data(), elems * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(b, host.data(), elems * 2, cudaMemcpyHostToDevice));
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cublasCreate failed\n");
    std::exit(1);
  }
  const float alpha = 1.f, beta = 0.f;
  cudaEvent_t s, e;
  CHECK_CUDA(cudaEventCreate(&s));
  CHECK_CUDA(cudaEventCreate(&e));
  std::vector<double> t;
  for (int i = 0; i < 8; ++i) {
    CHECK_CUDA(cudaEventRecord(s));
    if (cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b,
                     CUDA_R_16BF, n, &beta, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "cublasGemmEx failed\n");
      std::exit(1);
    }
    CHECK_CUDA(cudaEventRecord(e));
    CHECK_CUDA(cudaEventSynchronize(e));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, s, e));
    if (i > 1) t.push_back(ms * 1e-3);
  }
  cublasDestroy(h);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * n * n * static_cast<double>(n) / Median(t);
}

struct ModeResult {
  std::string mode;
  double median_us = 0, min_us = 0, round_spread_us = 0, rel_error = 0, plan_us = 0;
  double chunk_kernel_us = 0, estimate_us = 0;  // the chunk kernel alone; the cost model's
  double merge_kernel_us = 0;  // the merge kernel alone (launched normally, partials in place)
  int64_t kv_bytes_read = 0, chunks = 0, entries = 0, work_items = 0, chunk_tokens = 0;
};

template <typename T>
T FromF(float x);
template <>
__half FromF<__half>(float x) { return __float2half_rn(x); }
template <>
__nv_bfloat16 FromF<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
float ToF(__half x) { return __half2float(x); }
float ToF(__nv_bfloat16 x) { return __bfloat162float(x); }

struct Context {
  ThreadPool* threads;
  void* flush;
  size_t flush_bytes;
  bench::FlushMode flush_mode;
  double bandwidth, gemm_rate;
  int32_t heads, kv_heads, head_dim, reps;
  std::string trace_prefix;  // DIR/row<N>_<dtype> or empty
};

// One flushed run with per-CTA timestamps (kernels::TreeAttentionArgs::trace) written as CSV:
// times in ns from the stamp taken on the stream before the chunk kernel; the run's CUDA event
// time in the header.
void WriteTrace(const Context& ctx, const GpuTreeAttention& attention, const GpuAttentionLayer& layer,
                const std::string& path) {
  const kernels::TreeAttentionPlanView& v = attention.view();
  const size_t words =
      kernels::TreeAttentionTraceWords(v.num_work, ctx.kv_heads, v.num_queries, ctx.heads);
  unsigned long long* dtrace = nullptr;
  CHECK_CUDA(cudaMalloc(&dtrace, words * 8));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  float ms = 0;
  for (int i = 0; i < 5; ++i) {  // warm, then the last run is kept
    CHECK_CUDA(cudaMemset(dtrace, 0, words * 8));
    CHECK_CUDA(bench::FlushL2(ctx.flush, ctx.flush_bytes, ctx.flush_mode, i, nullptr));
    CHECK_CUDA(cudaEventRecord(start));
    if (!attention.Run(layer, nullptr, kernels::TreeAttentionPhases::kBoth, dtrace).ok()) std::exit(1);
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  }
  std::vector<unsigned long long> t(words);
  CHECK_CUDA(cudaMemcpy(t.data(), dtrace, words * 8, cudaMemcpyDeviceToHost));
  cudaFree(dtrace);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::ofstream f(path);
  const unsigned long long t0 = t[0];
  const auto rel = [&](unsigned long long x) { return x == 0 ? -1LL : static_cast<long long>(x - t0); };
  f << "# event_us " << ms * 1e3 << " chunk_ctas " << t[1] << " merge_ctas " << t[2] << "\n";
  f << "kind,index,start,ready,loop,staged,end,smid,subtiles,rows\n";
  const size_t chunk = t[1], merge = t[2];
  for (size_t i = 0; i < chunk; ++i) {
    const unsigned long long* r = &t[3 + 6 * i];
    f << "chunk," << i << "," << rel(r[0]) << "," << rel(r[1]) << "," << rel(r[2]) << ","
      << rel(r[3]) << "," << rel(r[4]) << "," << (r[5] & 0xffff) << "," << ((r[5] >> 16) & 0xffff)
      << "," << (r[5] >> 32) << "\n";
  }
  for (size_t i = 0; i < merge; ++i) {
    const unsigned long long* r = &t[3 + 6 * chunk + 4 * i];
    f << "merge," << i << "," << rel(r[0]) << "," << rel(r[1]) << ",,," << rel(r[2]) << ","
      << r[3] << ",,\n";
  }
}

template <typename T>
std::vector<ModeResult> RunRow(const Context& ctx, const WorkloadForest& forest,
                               kernels::KvDtype dtype, const std::vector<AttentionMode>& modes) {
  const int64_t tokens = forest.total_tokens();
  const int64_t kv_dim = static_cast<int64_t>(ctx.kv_heads) * ctx.head_dim;
  const int64_t blocks = (tokens + 15) / 16 + 1;
  const int64_t slots = blocks * 16;
  const std::vector<std::vector<int32_t>> slots_of = forest.ContiguousSlots();
  const std::vector<PlanSegment> segments = forest.Segments(slots_of);
  const int64_t nq = static_cast<int64_t>(forest.queries.size());
  const int64_t q_elems = nq * ctx.heads * ctx.head_dim;
  uint64_t seed = 12345 + tokens;
  std::vector<T> q(q_elems), k(slots * kv_dim), v(slots * kv_dim);
  std::vector<float> qf(q_elems);
  for (int64_t i = 0; i < q_elems; ++i) {
    q[i] = FromF<T>(2.f * Uniform(seed));
    qf[i] = ToF(q[i]);
  }
  auto pool_or = KvBlockPool::Create({1, ctx.kv_heads, ctx.head_dim, 16}, blocks);
  if (!pool_or.ok()) {
    std::fprintf(stderr, "%s\n", pool_or.status().ToString().c_str());
    std::exit(1);
  }
  KvBlockPool& pool = **pool_or;
  for (int64_t s = 0; s < slots; ++s) {
    for (int64_t j = 0; j < kv_dim; ++j) {
      k[s * kv_dim + j] = FromF<T>(Uniform(seed));
      v[s * kv_dim + j] = FromF<T>(Uniform(seed));
      pool.k(0, s)[j] = ToF(k[s * kv_dim + j]);
      pool.v(0, s)[j] = ToF(v[s * kv_dim + j]);
    }
  }
  PartitionPlanner ref_planner(PlannerOptions{});
  PartitionPlan ref_plan;
  if (!ref_planner.Plan(segments, forest.queries, &ref_plan).ok()) std::exit(1);
  std::vector<float> ref(q_elems);
  RunAttentionCpu(*ctx.threads, ref_plan, pool, 0, {ctx.heads, ctx.kv_heads, ctx.head_dim},
                  qf.data(), ref.data());
  double ref_norm = 0;
  for (float x : ref) ref_norm += static_cast<double>(x) * x;
  ref_norm = std::sqrt(ref_norm);

  void *dq, *dk, *dv, *dout;
  CHECK_CUDA(cudaMalloc(&dq, q.size() * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dk, k.size() * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dv, v.size() * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dout, q.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(dq, q.data(), q.size() * sizeof(T), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dk, k.data(), k.size() * sizeof(T), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dv, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));

  GpuAttentionCostModel model;
  model.num_heads = ctx.heads;
  model.num_kv_heads = ctx.kv_heads;
  model.head_dim = ctx.head_dim;
  model.bandwidth = ctx.bandwidth;
  const GpuAttentionLayer layer{dtype, ctx.heads, ctx.kv_heads, ctx.head_dim, dq,
                                dout,  dk,        dv,           kv_dim};
  std::vector<ModeResult> results;
  std::vector<GpuTreeAttention> attention(modes.size());
  std::vector<std::vector<double>> round_medians(modes.size());
  std::vector<double> best_min(modes.size(), 1e30);
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (size_t mi = 0; mi < modes.size(); ++mi) {
    ModeResult r;
    r.mode = std::string(AttentionModeName(modes[mi]));
    PartitionPlan plan;
    absl::StatusOr<PlannerOptions> options =
        ChooseGpuPlannerOptions(modes[mi], segments, forest.queries, model, &plan);
    if (const int32_t forced = absl::GetFlag(FLAGS_chunk_tokens); forced > 0 && options.ok()) {
      options->min_chunk_tokens = options->max_chunk_tokens = options->seq_chunk_tokens = forced;
    }
    if (const std::vector<std::string> list = absl::GetFlag(FLAGS_chunk_list);
        !list.empty() && options.ok() && modes[mi] == AttentionMode::kFlatten) {
      options->flatten_chunk_tokens.clear();
      for (const std::string& x : list) options->flatten_chunk_tokens.push_back(std::stoi(x));
    }
    if (!options.ok()) {
      std::fprintf(stderr, "%s\n", options.status().ToString().c_str());
      std::exit(1);
    }
    // Host planning time of the chosen options (what a step pays once, for all layers).
    PartitionPlanner planner(*options);
    std::vector<double> pt;
    for (int i = 0; i < 5; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      if (!planner.Plan(segments, forest.queries, &plan).ok()) std::exit(1);
      pt.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    r.plan_us = Median(pt) * 1e6;
    r.kv_bytes_read = plan.kv_tokens_read * kv_dim * 2 * static_cast<int64_t>(sizeof(T));
    r.chunks = plan.num_chunks();
    r.entries = plan.num_entries();
    r.chunk_tokens = modes[mi] == AttentionMode::kFlatten || modes[mi] == AttentionMode::kNode
                         ? options->max_chunk_tokens
                         : options->seq_chunk_tokens;
    absl::Status st = attention[mi].Upload(plan, ctx.heads, ctx.kv_heads, ctx.head_dim, nullptr);
    if (const std::string merge = absl::GetFlag(FLAGS_merge); merge == "head") {
      attention[mi].set_merge(kernels::TreeAttentionMerge::kPerHead);
    } else if (merge == "group") {
      attention[mi].set_merge(kernels::TreeAttentionMerge::kPerGroup);
    } else if (merge != "auto") {
      std::fprintf(stderr, "--merge must be auto, head or group, not %s\n", merge.c_str());
      std::exit(2);
    }
    if (!st.ok()) {
      std::fprintf(stderr, "%s\n", st.ToString().c_str());
      std::exit(1);
    }
    r.work_items = attention[mi].view().num_work;
    r.estimate_us = EstimateGpuAttentionSeconds(plan, model) * 1e6;
    CHECK_CUDA(cudaMemset(dout, 0xff, q.size() * sizeof(T)));
    if (!attention[mi].Run(layer, nullptr).ok()) std::exit(1);
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<T> out(q_elems);
    CHECK_CUDA(cudaMemcpy(out.data(), dout, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    double err = 0;
    bool finite = true;
    for (int64_t i = 0; i < q_elems; ++i) {
      const double g = ToF(out[i]);
      finite = finite && std::isfinite(g);
      err += (g - ref[i]) * (g - ref[i]);
    }
    r.rel_error = finite ? std::sqrt(err) / ref_norm : INFINITY;
    results.push_back(r);
  }
  if (!ctx.trace_prefix.empty()) {
    for (size_t mi = 0; mi < modes.size(); ++mi) {
      WriteTrace(ctx, attention[mi], layer, ctx.trace_prefix + "_" + results[mi].mode + ".csv");
    }
  }
  // Two rounds over the modes (interleaved), reps runs each, L2 flushed before every run.
  for (int round = 0; round < 2; ++round) {
    for (size_t mi = 0; mi < modes.size(); ++mi) {
      for (int i = 0; i < 10; ++i) {
        if (!attention[mi].Run(layer, nullptr).ok()) std::exit(1);
      }
      std::vector<double> t;
      for (int i = 0; i < ctx.reps; ++i) {
        CHECK_CUDA(bench::FlushL2(ctx.flush, ctx.flush_bytes, ctx.flush_mode, i, nullptr));
        CHECK_CUDA(cudaEventRecord(start));
        if (!attention[mi].Run(layer, nullptr).ok()) std::exit(1);
        CHECK_CUDA(cudaEventRecord(stop));
        CHECK_CUDA(cudaEventSynchronize(stop));
        float ms = 0;
        CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
        t.push_back(ms * 1e3);
      }
      round_medians[mi].push_back(Median(t));
      best_min[mi] = std::min(best_min[mi], *std::min_element(t.begin(), t.end()));
    }
  }
  // Each kernel alone: the chunk kernel, then the merge kernel over the partials it left (the
  // merge's partials are flushed from L2 too, which a real step does not do: an upper bound).
  for (const auto phase :
       {kernels::TreeAttentionPhases::kChunkOnly, kernels::TreeAttentionPhases::kMergeOnly}) {
    for (size_t mi = 0; mi < modes.size(); ++mi) {
      std::vector<double> t;
      for (int i = 0; i < ctx.reps; ++i) {
        CHECK_CUDA(bench::FlushL2(ctx.flush, ctx.flush_bytes, ctx.flush_mode, i, nullptr));
        CHECK_CUDA(cudaEventRecord(start));
        if (!attention[mi].Run(layer, nullptr, phase).ok()) std::exit(1);
        CHECK_CUDA(cudaEventRecord(stop));
        CHECK_CUDA(cudaEventSynchronize(stop));
        float ms = 0;
        CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
        t.push_back(ms * 1e3);
      }
      (phase == kernels::TreeAttentionPhases::kChunkOnly ? results[mi].chunk_kernel_us
                                                         : results[mi].merge_kernel_us) = Median(t);
    }
  }
  for (size_t mi = 0; mi < modes.size(); ++mi) {
    results[mi].median_us = std::min(round_medians[mi][0], round_medians[mi][1]);
    results[mi].round_spread_us = std::fabs(round_medians[mi][0] - round_medians[mi][1]);
    results[mi].min_us = best_min[mi];
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dv);
  cudaFree(dout);
  return results;
}

int Main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::string dir = absl::GetFlag(FLAGS_workloads);
  if (dir.empty()) dir = WorkloadsDir(DEFT_WORKLOADS_DIR);
  std::string rows_flag = absl::GetFlag(FLAGS_rows);
  if (rows_flag == "default") rows_flag = kDefaultRows;
  std::vector<std::string> rows = absl::StrSplit(rows_flag, ',', absl::SkipEmpty());
  std::vector<AttentionMode> modes;
  for (absl::string_view m : absl::StrSplit(absl::GetFlag(FLAGS_modes), ',', absl::SkipEmpty())) {
    AttentionMode mode;
    if (!ParseAttentionMode(std::string_view(m.data(), m.size()), &mode)) {
      std::fprintf(stderr, "attention_bench: unknown mode %s\n", std::string(m).c_str());
      return 2;
    }
    modes.push_back(mode);
  }
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    std::fprintf(stderr, "attention_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  ThreadPool threads(ThreadPool::DefaultThreadCount());
  const std::string flush = absl::GetFlag(FLAGS_flush);
  if (flush != "read" && flush != "memset") {
    std::fprintf(stderr, "attention_bench: --flush is read or memset, not '%s'\n", flush.c_str());
    return 2;
  }
  Context ctx{&threads, nullptr, size_t{256} << 20,
              flush == "read" ? bench::FlushMode::kRead : bench::FlushMode::kMemset, 0, 0,
              absl::GetFlag(FLAGS_heads),
              absl::GetFlag(FLAGS_kv_heads), absl::GetFlag(FLAGS_head_dim),
              absl::GetFlag(FLAGS_reps), {}};
  const std::string trace_dir = absl::GetFlag(FLAGS_trace);
  if (!trace_dir.empty() && !kernels::TreeAttentionTraceEnabled()) {
    std::fprintf(stderr, "attention_bench: --trace needs a build with -DDEFT_ATTN_TRACE=ON\n");
    return 2;
  }
  CHECK_CUDA(cudaMalloc(&ctx.flush, ctx.flush_bytes));
  CHECK_CUDA(cudaMemset(ctx.flush, 0x5a, ctx.flush_bytes));
  ctx.bandwidth = MeasureBandwidth();
  ctx.gemm_rate = MeasureGemmRate();
  std::printf("device %s, %d SMs; copy bandwidth %.3f TB/s, bf16 GEMM %.1f TFLOP/s; L2 flush: %s\n",
              prop.name, prop.multiProcessorCount, ctx.bandwidth / 1e12, ctx.gemm_rate / 1e12,
              flush.c_str());
  nlohmann::json out = nlohmann::json::array();
  std::printf(
      "\n| tree | dtype | queries | unique KV | IO floor | compute floor | seq | tree | node | "
      "flatten | flatten / floor | vs DeFT-Flatten | vs FastTree | flatten rel err |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  int row_index = 0;
  for (const std::string& spec : rows) {
    ++row_index;
    WorkloadForest forest;
    if (!ParseRow(spec, dir, &forest)) return 2;
    // Floors: unique KV tokens, attended tokens per query.
    int64_t unique = forest.total_tokens(), attended = 0;
    for (const PlanQuery& q : forest.queries) {
      attended += q.visible;
      for (int32_t s = forest.parent[q.segment]; s >= 0; s = forest.parent[s]) {
        attended += forest.length[s];
      }
    }
    for (absl::string_view dt : absl::StrSplit(absl::GetFlag(FLAGS_dtypes), ',', absl::SkipEmpty())) {
      const bool bf16 = dt == "bf16";
      if (!trace_dir.empty()) {
        ctx.trace_prefix = absl::StrFormat("%s/row%d_%s", trace_dir, row_index, std::string(dt));
      }
      const double io_floor_us =
          unique * 2.0 * ctx.kv_heads * ctx.head_dim * 2 / ctx.bandwidth * 1e6;
      const double compute_floor_us =
          4.0 * attended * ctx.heads * ctx.head_dim / ctx.gemm_rate * 1e6;
      const double floor_us = std::max(io_floor_us, compute_floor_us);
      const std::vector<ModeResult> res =
          bf16 ? RunRow<__nv_bfloat16>(ctx, forest, kernels::KvDtype::kBFloat16, modes)
               : RunRow<__half>(ctx, forest, kernels::KvDtype::kFloat16, modes);
      std::map<std::string, const ModeResult*> by;
      for (const ModeResult& r : res) by[r.mode] = &r;
      auto cell = [&](const char* m) {
        return by.count(m) ? absl::StrFormat("%.1f", by[m]->median_us) : std::string("-");
      };
      const ModeResult* fl = by.count("flatten") ? by["flatten"] : nullptr;
      auto it = kAnchors.find(spec);
      std::string vs_deft = "-", vs_ft = "-";
      if (fl != nullptr && it != kAnchors.end()) {
        vs_deft = absl::StrFormat("%.1fx", it->second.deft_flatten / fl->median_us);
        vs_ft = absl::StrFormat("%.1fx", it->second.fasttree / fl->median_us);
      }
      std::printf("| %s | %s | %zu | %lld | %.1f | %.1f | %s | %s | %s | %s | %s | %s | %s | %s |\n",
                  forest.name.c_str(), std::string(dt).c_str(), forest.queries.size(),
                  static_cast<long long>(unique), io_floor_us, compute_floor_us,
                  cell("seq").c_str(), cell("tree").c_str(), cell("node").c_str(),
                  cell("flatten").c_str(),
                  fl ? absl::StrFormat("%.2fx", fl->median_us / floor_us).c_str() : "-",
                  vs_deft.c_str(), vs_ft.c_str(),
                  fl ? absl::StrFormat("%.1e", fl->rel_error).c_str() : "-");
      std::fflush(stdout);
      nlohmann::json row = {{"row", spec},
                            {"tree", forest.name},
                            {"dtype", std::string(dt)},
                            {"queries", forest.queries.size()},
                            {"unique_kv_tokens", unique},
                            {"attended_tokens", attended},
                            {"io_floor_us", io_floor_us},
                            {"compute_floor_us", compute_floor_us},
                            {"bandwidth_Bps", ctx.bandwidth},
                            {"gemm_flops", ctx.gemm_rate},
                            {"l2_flush", flush},
                            {"device", prop.name}};
      if (it != kAnchors.end()) {
        row["anchor_radix_us"] = it->second.radix;
        row["anchor_deft_flatten_us"] = it->second.deft_flatten;
        row["anchor_fasttree_us"] = it->second.fasttree;
      }
      for (const ModeResult& r : res) {
        row["modes"][r.mode] = {{"median_us", r.median_us},     {"min_us", r.min_us},
                                {"round_spread_us", r.round_spread_us},
                                {"rel_error", r.rel_error},     {"plan_us", r.plan_us},
                                {"kv_bytes_read", r.kv_bytes_read}, {"chunks", r.chunks},
                                {"entries", r.entries},         {"work_items", r.work_items},
                                {"chunk_kernel_us", r.chunk_kernel_us},
                                {"merge_kernel_us", r.merge_kernel_us},
                                {"estimate_us", r.estimate_us},
                                {"chunk_tokens", r.chunk_tokens}};
      }
      out.push_back(row);
    }
  }
  // Detail: per mode, chunking, spread, error and planning time.
  std::printf("\n| tree | dtype | mode | median us | min us | round spread us | chunk kernel us | "
              "merge kernel us | model us | chunk tokens | chunks | work items | KV MB read | "
              "plan us | rel err |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& row : out) {
    for (const auto& [mode, r] : row["modes"].items()) {
      std::printf("| %s | %s | %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %d | %d | %d | %.1f | "
                  "%.0f | %.1e |\n",
                  row["tree"].get<std::string>().c_str(), row["dtype"].get<std::string>().c_str(),
                  mode.c_str(), r["median_us"].get<double>(), r["min_us"].get<double>(),
                  r["round_spread_us"].get<double>(), r["chunk_kernel_us"].get<double>(),
                  r["merge_kernel_us"].get<double>(), r["estimate_us"].get<double>(), r["chunk_tokens"].get<int>(),
                  r["chunks"].get<int>(), r["work_items"].get<int>(),
                  r["kv_bytes_read"].get<double>() / 1e6, r["plan_us"].get<double>(),
                  r["rel_error"].get<double>());
    }
  }
  if (!absl::GetFlag(FLAGS_json).empty()) {
    std::ofstream(absl::GetFlag(FLAGS_json)) << out.dump(1) << "\n";
  }
  return 0;
}

}  // namespace
}  // namespace deft

int main(int argc, char** argv) { return deft::Main(argc, argv); }
