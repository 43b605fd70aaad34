// bench/gpu_decode: end-to-end decode step (TPOT: one step of the whole tree) of a synthetic
// Llama-3-8B (bf16 weights generated on the device) on one GPU, per DeFT workload and attention
// mode, against the IO floor of ../shared/PERFORMANCE.md section 2: (weight bytes read per step +
// KV bytes the mode reads) / measured copy bandwidth.
//
// Workloads (PERFORMANCE.md section 2): few-shot (4000-token prompt, 50 branches at 400 generated
// tokens), speculative (APPS tree of 64 draft tokens under a 4000-token prefix), reasoning
// (sorting128 tree 0, prompt padded to 4000). The KV of every tree token is in a device pool
// filled with random bf16 (never zeros); a step feeds one token per query of the tree (its K/V
// written to its slot, as a real step does) and computes the logits of every query.
//
// Per (workload, mode): the planner options come from the GPU cost model
// (engine/attention/gpu_chunking.h); plan time is the host planning alone (median); TPOT is the
// median over --reps steps of host time around GpuBackend::ForwardStepOnDevice + stream
// synchronize (upload of inputs and plan, all launches, logits left on the device), after 3
// warm-up steps; "host enqueue" is the part before the synchronize. "graph" replays the same
// step from a CUDA graph (a lower bound: real steps change the plan, see GpuBackendOptions).
// "GEMMs" sums the device time of the step's projections (every layer's QKV, O, gate/up and
// down, and the output head) from a profiled step (events between phases; the per-phase table
// is printed last): the weight-streaming part, whose floor is the weights' bytes / bandwidth.
// Sampling (device, temperature 1: the costliest path) is timed apart.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "engine/attention/gpu_chunking.h"
#include "engine/attention/workload_forest.h"
#include "engine/gpu/device_kv_storage.h"
#include "engine/gpu/gpu_backend.h"
#include "engine/sampler/sampler.h"
#include "engine/util/thread_pool.h"
#include "kernels/model/weight_kernels.h"

ABSL_FLAG(std::string, model, "synthetic:llama3-8b", "synthetic model name");
ABSL_FLAG(std::string, modes, "seq,flatten", "attention modes (seq, tree, node, flatten)");
ABSL_FLAG(std::string, workloads_dir, "", "workloads directory (default: the build's)");
ABSL_FLAG(int32_t, reps, 20, "timed steps per (workload, mode)");
ABSL_FLAG(int32_t, decode_steps, 48,
          "steps of a growing decode per (workload, mode) with and without CUDA graphs (0: skip)");

namespace deft {
namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Device copy bandwidth (bytes read + written per second), median of 10 copies of 2 GiB.
double CopyBandwidth() {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) return 0;
  cudaMemset(a, 1, bytes);
  std::vector<double> t;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (int i = 0; i < 12; ++i) {
    cudaEventRecord(e0);
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (i >= 2) t.push_back(ms * 1e-3);
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / Median(t);
}

struct Workload {
  std::string name;
  WorkloadForest forest;
  double io_speedup = 0;  // PERFORMANCE.md's IO-model flatten-over-seq speedup
};

int Run() {
  auto spec = SyntheticSpecFromName(absl::GetFlag(FLAGS_model));
  if (!spec.ok()) {
    std::fprintf(stderr, "%s\n", spec.status().ToString().c_str());
    return 2;
  }
  std::string dir = absl::GetFlag(FLAGS_workloads_dir);
  if (dir.empty()) dir = WorkloadsDir(DEFT_WORKLOADS_DIR);
  std::vector<Workload> workloads;
  workloads.push_back({"few-shot P4000 W50 @400", FewShotForest(4000, 50, 400), 2.3});
  auto spec_forest = LoadSpeculativeForest(dir + "/speculative/APPS_tree_size64.json", 4000);
  auto reason_forest = LoadReasoningForest(dir + "/reasoning/sorting128ToT.json", 0, 4000);
  if (!spec_forest.ok() || !reason_forest.ok()) {
    std::fprintf(stderr, "workloads: %s %s\n", spec_forest.status().ToString().c_str(),
                 reason_forest.status().ToString().c_str());
    return 2;
  }
  workloads.push_back({"speculative APPS tree64 P4000", *spec_forest, 2.9});
  workloads.push_back({"reasoning sorting128 t0 P4000", *reason_forest, 1.27});

  const double bw = CopyBandwidth();
  const auto t0 = Clock::now();
  auto gpu_or = gpu::GpuBackend::CreateSynthetic(*spec, {});
  if (!gpu_or.ok()) {
    std::fprintf(stderr, "%s\n", gpu_or.status().ToString().c_str());
    return 1;
  }
  gpu::GpuBackend& gpu = **gpu_or;
  const LlamaConfig& c = spec->config;
  const double weight_s = Seconds(t0, Clock::now());
  // Bytes a step reads: every matrix but the embedding table (only its rows are gathered).
  const double embd_bytes = 2.0 * c.vocab_size * c.hidden;
  const double weight_bytes = gpu.weights().bytes() - embd_bytes;
  const KvPoolShape shape{c.num_layers, c.num_kv_heads, c.head_dim, 16};
  const double kv_token_bytes = 2.0 * c.num_layers * 2 * c.num_kv_heads * c.head_dim;
  int64_t max_tokens = 0;
  const int32_t decode_steps = absl::GetFlag(FLAGS_decode_steps);
  for (const Workload& w : workloads) {
    max_tokens = std::max(max_tokens, w.forest.total_tokens() +
                                          static_cast<int64_t>(w.forest.queries.size()) * decode_steps);
  }
  auto pool_or = KvBlockPool::Create(shape, max_tokens / 16 + 2, gpu.kv_storage());
  if (!pool_or.ok()) {
    std::fprintf(stderr, "%s\n", pool_or.status().ToString().c_str());
    return 1;
  }
  KvBlockPool& pool = **pool_or;
  auto* storage = static_cast<gpu::DeviceKvStorage*>(&pool.storage());
  const int64_t pool_elems =
      2 * c.num_layers * pool.num_blocks() * 16 * c.num_kv_heads * c.head_dim;
  kernels::LaunchSyntheticFill({storage->k(0), storage->dtype(), pool_elems, 42, 1.f, 0.f},
                               gpu.stream());
  cudaStreamSynchronize(gpu.stream());
  std::printf("device weights: %.2f GB generated in %.0f ms; copy bandwidth %.2f TB/s\n",
              gpu.weights().bytes() / 1e9, weight_s * 1e3, bw / 1e12);
  std::printf(
      "floor = (%.2f GB of weights read per step + KV bytes the mode reads) / bandwidth\n\n",
      weight_bytes / 1e9);
  std::printf(
      "| workload | mode | queries | KV tokens read | floor ms | TPOT ms | TPOT/floor | host "
      "enqueue ms | graph ms | GEMMs ms | plan ms | sample ms |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|\n");

  std::mt19937_64 rng(7);
  GpuAttentionCostModel cost;
  cost.num_heads = static_cast<int32_t>(c.num_heads);
  cost.num_kv_heads = static_cast<int32_t>(c.num_kv_heads);
  cost.head_dim = static_cast<int32_t>(c.head_dim);
  const std::vector<std::string> modes = absl::StrSplit(absl::GetFlag(FLAGS_modes), ',');
  std::vector<std::string> breakdowns, growing, served;
  ThreadPool sampling_pool(0);  // one thread per core, as TreeEngine's sampling_threads = 0
  for (const Workload& w : workloads) {
    const WorkloadForest& f = w.forest;
    const auto slots = f.ContiguousSlots(0);
    const std::vector<PlanSegment> segments = f.Segments(slots);
    // Depth of each segment's first token.
    std::vector<int64_t> offset(f.parent.size(), 0);
    for (size_t s = 0; s < f.parent.size(); ++s) {
      if (f.parent[s] >= 0) offset[s] = offset[f.parent[s]] + f.length[f.parent[s]];
    }
    std::vector<int32_t> tokens, kv_slots, rows;
    std::vector<int64_t> positions;
    for (size_t q = 0; q < f.queries.size(); ++q) {
      const PlanQuery& pq = f.queries[q];
      tokens.push_back(static_cast<int32_t>(rng() % c.vocab_size));
      positions.push_back(offset[pq.segment] + pq.visible - 1);
      kv_slots.push_back(slots[pq.segment][pq.visible - 1]);
      rows.push_back(static_cast<int32_t>(q));
    }
    const StepInput step{tokens, positions, kv_slots, rows};
    double seq_tpot = 0, flatten_tpot = 0;
    for (const std::string& mode_name : modes) {
      AttentionMode mode;
      if (!ParseAttentionMode(mode_name, &mode)) {
        std::fprintf(stderr, "unknown mode %s\n", mode_name.c_str());
        return 2;
      }
      PartitionPlan plan;
      std::vector<double> plan_t;
      for (int i = 0; i < 5; ++i) {
        const auto a = Clock::now();
        auto opts = ChooseGpuPlannerOptions(mode, segments, f.queries, cost, &plan);
        plan_t.push_back(Seconds(a, Clock::now()));
        if (!opts.ok()) {
          std::fprintf(stderr, "plan: %s\n", opts.status().ToString().c_str());
          return 1;
        }
      }
      // Without graphs (host time to enqueue the step reported apart), then with them.
      std::vector<double> step_t, enqueue_t, graph_t;
      for (bool graphs : {false, true}) {
        gpu.set_cuda_graphs(graphs);
        for (int i = 0; i < 3 + absl::GetFlag(FLAGS_reps); ++i) {
          const auto a = Clock::now();
          absl::Status s = gpu.ForwardStepOnDevice(step, pool, plan);
          const auto b = Clock::now();
          if (s.ok()) s = gpu::CudaStatus(cudaStreamSynchronize(gpu.stream()), "step");
          if (!s.ok()) {
            std::fprintf(stderr, "step: %s\n", s.ToString().c_str());
            return 1;
          }
          if (i < 3) continue;
          (graphs ? graph_t : step_t).push_back(Seconds(a, Clock::now()));
          if (!graphs) enqueue_t.push_back(Seconds(a, b));
        }
      }
      std::vector<kernels::SampleRowParams> sp(rows.size());
      for (size_t r = 0; r < sp.size(); ++r) sp[r] = {1.f, 0, 1.f, 0.f, rng(), 0, 0};
      std::vector<double> sample_t;
      for (int i = 0; i < 4; ++i) {
        const auto a = Clock::now();
        auto toks = gpu.SampleOnDevice(sp);
        if (!toks.ok()) {
          std::fprintf(stderr, "sample: %s\n", toks.status().ToString().c_str());
          return 1;
        }
        if (i >= 1) sample_t.push_back(Seconds(a, Clock::now()));
      }
      // A served step as TreeEngine runs it (CUDA graphs on, every row sampled at temperature
      // 1): the logits copied into a fresh host vector and each row drawn by its branch's
      // Sampler on a pool of one thread per core, against the rows drawn on the device with
      // only their tokens and log-probabilities copied back (StepSampling).
      {
        gpu.set_cuda_graphs(true);
        std::vector<Sampler> samplers;
        StepSampling sampling;
        sampling.need_logits = false;
        for (size_t r = 0; r < rows.size(); ++r) {
          SamplingParams sp;
          sp.seed = rng();
          samplers.emplace_back(sp, std::span<const int32_t>());
          sampling.rows.push_back({static_cast<int32_t>(r), 1.f, 0, 1.f, 0.f, sp.seed, 0, 0});
        }
        StepSampling with_top = sampling;  // and 20 alternatives per row (tree-of-thought)
        for (StepSampling::Row& r : with_top.rows) r.top_logprobs = 20;
        // Ways 4 and 5: every row penalized (repetition 1.1 over a 4000-token prompt and 200
        // outputs, frequency 0.3, presence 0.2), drawn on the host from the logits, and on the
        // device with the samplers' seen tokens uploaded as entries.
        std::vector<Sampler> penalized;
        StepSampling pen_sampling;
        pen_sampling.need_logits = false;
        for (size_t r = 0; r < rows.size(); ++r) {
          SamplingParams sp;
          sp.seed = rng();
          sp.repetition_penalty = 1.1f;
          sp.frequency_penalty = 0.3f;
          sp.presence_penalty = 0.2f;
          std::vector<int32_t> prompt(4000);
          for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % c.vocab_size);
          penalized.emplace_back(sp, prompt);
          for (int k = 0; k < 200; ++k) {
            penalized.back().Record(static_cast<int32_t>(rng() % 3000), 0.f);
          }
          StepSampling::Row row{static_cast<int32_t>(r), 1.f, 0, 1.f, 0.f, sp.seed,
                                static_cast<uint64_t>(penalized.back().steps()), 0};
          row.repetition_penalty = sp.repetition_penalty;
          row.frequency_penalty = sp.frequency_penalty;
          row.presence_penalty = sp.presence_penalty;
          row.penalty_begin = static_cast<int32_t>(pen_sampling.penalty_ids.size());
          penalized.back().AppendPenaltyEntries(&pen_sampling.penalty_ids,
                                                &pen_sampling.penalty_counts);
          row.penalty_count =
              static_cast<int32_t>(pen_sampling.penalty_ids.size()) - row.penalty_begin;
          pen_sampling.rows.push_back(row);
        }
        // Way 3: the step with every logits row copied to the host and none sampled there: what
        // a verification of the step's rows cost when its walk read the logits on the host (it
        // samples only the few rows it walks), against way 1, every row drawn on the device.
        std::vector<double> host_t, device_t, top_t, logits_t, pen_host_t, pen_device_t;
        for (int i = 0; i < 3 + absl::GetFlag(FLAGS_reps); ++i) {
          for (int way : {0, 1, 2, 3, 4, 5}) {
            StepSampling* asked = way == 1   ? &sampling
                                  : way == 2 ? &with_top
                                  : way == 5 ? &pen_sampling
                                             : nullptr;
            const auto a = Clock::now();
            std::vector<float> logits;
            absl::Status s = gpu.ForwardStep(step, pool, plan, &logits, asked);
            std::vector<Sampler>* on_host = way == 0 ? &samplers : way == 4 ? &penalized : nullptr;
            if (s.ok() && on_host != nullptr) {
              sampling_pool.ParallelFor(
                  static_cast<int64_t>(rows.size()), 1, [&](int, int64_t b, int64_t e) {
                    for (int64_t r = b; r < e; ++r) {
                      (*on_host)[r].Sample(std::span<const float>(
                          logits.data() + r * c.vocab_size, static_cast<size_t>(c.vocab_size)));
                    }
                  });
            }
            if (!s.ok() || (asked != nullptr && !asked->sampled)) {
              std::fprintf(stderr, "served step: %s\n", s.ToString().c_str());
              return 1;
            }
            if (i >= 3) {
              std::vector<double>* t[] = {&host_t,   &device_t,   &top_t,
                                          &logits_t, &pen_host_t, &pen_device_t};
              t[way]->push_back(Seconds(a, Clock::now()));
            }
          }
        }
        gpu.set_cuda_graphs(false);
        served.push_back(absl::StrFormat(
            "| %s | %s | %zu | %.2f | %.2f | %.2fx | %.2f | %.2f | %.2f | %.2f |", w.name,
            mode_name, rows.size(), Median(host_t) * 1e3, Median(device_t) * 1e3,
            Median(host_t) / Median(device_t), Median(top_t) * 1e3, Median(logits_t) * 1e3,
            Median(pen_host_t) * 1e3, Median(pen_device_t) * 1e3));
      }
      // Device time per phase of one more step, events between the phases.
      gpu.set_profiling(true);
      if (absl::Status s = gpu.ForwardStepOnDevice(step, pool, plan); !s.ok()) {
        std::fprintf(stderr, "step: %s\n", s.ToString().c_str());
        return 1;
      }
      auto phases = gpu.LastStepPhases();
      gpu.set_profiling(false);
      if (!phases.ok()) {
        std::fprintf(stderr, "profile: %s\n", phases.status().ToString().c_str());
        return 1;
      }
      std::string breakdown;
      double gemm_s = 0;
      for (const auto& [phase, sec] : *phases) {
        if (phase.starts_with("gemm") || phase == "output head") gemm_s += sec;
        breakdown += absl::StrFormat("%s%s %.2f", breakdown.empty() ? "" : ", ", phase, sec * 1e3);
      }
      breakdowns.push_back(absl::StrFormat("%s, %s: %s", w.name, mode_name, breakdown));
      // A growing decode: every query's segment gains its token each step (new slots after the
      // forest's), planned per step as TreeEngine plans on the GPU (GpuChunkChooser); run without
      // and with CUDA graphs from the same start. Only for forests whose queries are the tips of
      // distinct segments (few-shot, reasoning; not a token tree).
      bool tips = decode_steps > 0;
      std::vector<int32_t> seen(f.parent.size(), 0);
      for (const PlanQuery& pq : f.queries) {
        tips = tips && pq.visible == f.length[pq.segment] && seen[pq.segment]++ == 0;
      }
      if (tips) {
        double tpot_ms[2] = {0, 0};
        int64_t replays = 0, captures = 0;
        for (bool graphs : {false, true}) {
          gpu.set_cuda_graphs(graphs);
          const int64_t replays0 = gpu.graph_replays(), captures0 = gpu.graph_captures();
          std::vector<std::vector<int32_t>> grow = slots;
          std::vector<PlanQuery> queries = f.queries;
          std::vector<int64_t> pos = positions;
          int32_t next_slot = static_cast<int32_t>(f.total_tokens());
          GpuChunkChooser chooser(cost);
          PlannerOptions base;
          base.mode = mode;
          std::vector<double> t;
          for (int32_t s = 0; s < decode_steps; ++s) {
            std::vector<int32_t> toks, step_slots;
            for (size_t q = 0; q < queries.size(); ++q) {
              grow[queries[q].segment].push_back(next_slot);
              step_slots.push_back(next_slot++);
              queries[q].visible += 1;
              pos[q] += 1;
              toks.push_back(static_cast<int32_t>(rng() % c.vocab_size));
            }
            const std::vector<PlanSegment> segs = f.Segments(grow);
            const auto a = Clock::now();
            absl::Status st = chooser.Plan(base, segs, queries, &plan);
            if (st.ok()) st = gpu.ForwardStepOnDevice(StepInput{toks, pos, step_slots, rows}, pool, plan);
            if (st.ok()) st = gpu::CudaStatus(cudaStreamSynchronize(gpu.stream()), "step");
            if (!st.ok()) {
              std::fprintf(stderr, "growing step: %s\n", st.ToString().c_str());
              return 1;
            }
            if (s >= 3) t.push_back(Seconds(a, Clock::now()));
          }
          tpot_ms[graphs] = Median(t) * 1e3;
          if (graphs) {
            replays = gpu.graph_replays() - replays0;
            captures = gpu.graph_captures() - captures0;
          }
        }
        growing.push_back(absl::StrFormat("| %s | %s | %d | %.2f | %.2f | %.2fx | %lld | %lld |",
                                          w.name, mode_name, decode_steps, tpot_ms[0], tpot_ms[1],
                                          tpot_ms[0] / tpot_ms[1], static_cast<long long>(replays),
                                          static_cast<long long>(captures)));
        gpu.set_cuda_graphs(false);
      }
      const double floor = (weight_bytes + plan.kv_tokens_read * kv_token_bytes) / bw;
      const double tpot = Median(step_t);
      if (mode == AttentionMode::kSeq) seq_tpot = tpot;
      if (mode == AttentionMode::kFlatten) flatten_tpot = tpot;
      std::printf(
          "| %s | %s | %zu | %lld | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.3f | %.2f |\n",
          w.name.c_str(), mode_name.c_str(), f.queries.size(),
          static_cast<long long>(plan.kv_tokens_read), floor * 1e3, tpot * 1e3, tpot / floor,
          Median(enqueue_t) * 1e3, Median(graph_t) * 1e3, gemm_s * 1e3, Median(plan_t) * 1e3,
          Median(sample_t) * 1e3);
      std::fflush(stdout);
    }
    if (seq_tpot > 0 && flatten_tpot > 0) {
      std::printf("| %s | flatten over seq | | | | %.2fx | %.0f%% of IO model %.2fx | | | | | |\n",
                  w.name.c_str(), seq_tpot / flatten_tpot,
                  100 * (seq_tpot / flatten_tpot) / w.io_speedup, w.io_speedup);
    }
  }
  if (!growing.empty()) {
    std::printf(
        "\nGrowing decode (each step adds every branch's token and is planned again; step time "
        "incl. planning, median after 3):\n\n| workload | mode | steps | step ms, no graphs | "
        "step ms, CUDA graphs | speedup | graph replays | graph captures |\n"
        "|---|---|---|---|---|---|---|---|\n");
    for (const std::string& line : growing) std::printf("%s\n", line.c_str());
  }
  std::printf(
      "\nServed step (CUDA graphs; every row sampled at temperature 1, as TreeEngine does it; "
      "median):\n\n| workload | mode | rows | step + logits to host + host Samplers ms | step + "
      "device sampling ms | speedup | the same with 20 alternatives a row ms | step + logits to "
      "host, none sampled (a verification's walk on the host) ms | penalized (repetition, "
      "frequency, presence), host Samplers ms | penalized, device sampling ms |\n"
      "|---|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& line : served) std::printf("%s\n", line.c_str());
  std::printf("\nDevice ms per phase of one step (events between phases, all layers):\n");
  for (const std::string& b : breakdowns) std::printf("- %s\n", b.c_str());
  return 0;
}

}  // namespace
}  // namespace deft

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return deft::Run();
}
