// bench/cpu_tree: the DeFT planner and CPU tree attention on the shared workloads, every mode.
//
//   cpu_tree [--workloads DIR] [--threads 0] [--repeats 7]
//
// Workloads (../shared/workloads, see its README): reasoning tree 0 of each file with the prompt
// padded to 4000 (leaves are the queries); speculative APPS token trees of every size under a
// 4000-token prefix (every tree node is a query); few-shot prompt 4000 shared by 50 branches of
// 200 and of 400, and by 16 branches of 400. Attention shapes of SmolLM2-135M: 9 query heads, 3
// KV heads, head dim 64; the KV bytes figure counts 30 layers of fp32 K and V (the pool's
// format). Each segment's KV starts in a fresh pool block, as in TreeKvCache.
//
// Per mode: KV bytes read per step and their ratio to the floor (unique KV bytes), the planning
// time and the CPU time of one layer's attention (median and minimum of --repeats runs after a
// warm-up).
// Output: a markdown table, then the check "flatten reads <= 1.05x the floor on every workload"
// (exit status 1 when it fails).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/attention/cpu_attention.h"
#include "engine/attention/partition_plan.h"
#include "engine/kv/kv_block_pool.h"
#include "engine/util/thread_pool.h"
#include "nlohmann/json.hpp"

namespace deft {
namespace {

constexpr int64_t kHeads = 9, kKvHeads = 3, kHeadDim = 64, kLayers = 30;
constexpr int32_t kBlockTokens = 16;
constexpr int32_t kPrompt = 4000;
constexpr double kFlattenFloorBound = 1.05;

struct Workload {
  std::string name;
  std::vector<int32_t> parent, length;
  std::vector<PlanQuery> queries;
  int32_t Add(int32_t p, int32_t len) {
    parent.push_back(p);
    length.push_back(len);
    return static_cast<int32_t>(parent.size()) - 1;
  }
};

bool LoadJson(const std::filesystem::path& path, nlohmann::json* out) {
  std::ifstream in(path);
  if (!in) {
    std::fprintf(stderr, "cpu_tree: cannot open %s\n", path.c_str());
    return false;
  }
  *out = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (out->is_discarded()) {
    std::fprintf(stderr, "cpu_tree: %s is not valid JSON\n", path.c_str());
    return false;
  }
  return true;
}

// Node 0 is the prompt (its length replaced by `prompt`); leaves are queries over their paths.
Workload Reasoning(const std::string& name, const nlohmann::json& tree, int32_t prompt) {
  Workload w;
  w.name = name;
  const nlohmann::json& data = tree.at("data");
  std::vector<std::pair<std::string, int32_t>> stack = {{"0", -1}};
  while (!stack.empty()) {
    auto [id, parent] = stack.back();
    stack.pop_back();
    const nlohmann::json& node = data.at(id);
    const int32_t len = id == "0" ? prompt : node.at("value").get<int32_t>();
    const int32_t s = w.Add(parent, len);
    const nlohmann::json& children = node.at("children");
    if (children.empty()) w.queries.push_back({s, len});
    for (auto it = children.rbegin(); it != children.rend(); ++it) {
      stack.push_back({std::to_string(it->get<int>()), s});
    }
  }
  return w;
}

// The first Token_Tree_size - 1 paths of Tree_Structure (parents come first) under a prefix
// whose last token is the tree's root; one single-token segment per draft token, all queries.
bool Speculative(const std::string& name, const nlohmann::json& spec, int32_t prefix,
                 Workload* out) {
  Workload w;
  w.name = name;
  w.queries.push_back({w.Add(-1, prefix), prefix});
  std::map<std::vector<int>, int32_t> segment_of;
  const int size = spec.at("Token_Tree_size").get<int>();
  const nlohmann::json& paths = spec.at("Tree_Structure");
  for (int i = 0; i + 1 < size && i < static_cast<int>(paths.size()); ++i) {
    const std::vector<int> path = paths[i].get<std::vector<int>>();
    int32_t parent = 0;
    if (path.size() > 1) {
      auto it = segment_of.find(std::vector<int>(path.begin(), path.end() - 1));
      if (it == segment_of.end()) {
        std::fprintf(stderr, "cpu_tree: %s: path %d comes before its parent\n", name.c_str(), i);
        return false;
      }
      parent = it->second;
    }
    segment_of[path] = w.Add(parent, 1);
    w.queries.push_back({segment_of[path], 1});
  }
  *out = std::move(w);
  return true;
}

Workload FewShot(int32_t prompt, int32_t branches, int32_t len) {
  Workload w;
  w.name = "few-shot: prompt " + std::to_string(prompt) + ", " + std::to_string(branches) +
           " branches x " + std::to_string(len);
  w.Add(-1, prompt);
  for (int32_t b = 0; b < branches; ++b) w.queries.push_back({w.Add(0, len), len});
  return w;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace
}  // namespace deft

int main(int argc, char** argv) {
  using namespace deft;
  std::filesystem::path dir =
      std::filesystem::path(__FILE__).parent_path() / "../../../shared/workloads";
  int threads = 0, repeats = 7;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "usage: cpu_tree [--workloads DIR] [--threads N] [--repeats N]\n");
      return 2;
    }
    if (a == "--workloads") {
      dir = argv[++i];
    } else if (a == "--threads") {
      threads = std::atoi(argv[++i]);
    } else if (a == "--repeats") {
      repeats = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "cpu_tree: unknown flag %s\n", a.c_str());
      return 2;
    }
  }

  std::vector<Workload> workloads;
  for (const char* task : {"sorting128ToT", "docmergeToT"}) {
    nlohmann::json trees;
    if (!LoadJson(dir / "reasoning" / (std::string(task) + ".json"), &trees)) return 1;
    workloads.push_back(Reasoning(std::string("reasoning: ") + task + " tree 0, prompt 4000",
                                  trees.at(0), kPrompt));
  }
  for (int size : {5, 10, 32, 64, 128}) {
    const std::string file = "APPS_tree_size" + std::to_string(size);
    nlohmann::json spec;
    if (!LoadJson(dir / "speculative" / (file + ".json"), &spec)) return 1;
    Workload w;
    if (!Speculative("speculative: " + file + ", prefix 4000", spec, kPrompt, &w)) return 1;
    workloads.push_back(std::move(w));
  }
  workloads.push_back(FewShot(kPrompt, 50, 200));
  workloads.push_back(FewShot(kPrompt, 50, 400));
  workloads.push_back(FewShot(kPrompt, 16, 400));

  ThreadPool pool(threads);
  const KvPoolShape step_shape{kLayers, kKvHeads, kHeadDim, kBlockTokens};
  std::printf(
      "cpu_tree: %d threads, SmolLM2-135M attention (%lld/%lld heads, dim %lld), KV "
      "bytes for %lld layers (%lld B/token), median of %d\n\n",
      pool.num_threads(), static_cast<long long>(kHeads), static_cast<long long>(kKvHeads),
      static_cast<long long>(kHeadDim), static_cast<long long>(kLayers),
      static_cast<long long>(step_shape.bytes_per_token()), repeats);
  std::printf(
      "| workload | queries | unique KV tokens | mode | KV MB read / step | vs floor | "
      "chunks | entries | plan us | attention ms (1 layer), median | min |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");

  bool flatten_ok = true;
  std::mt19937 rng(2026);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (const Workload& w : workloads) {
    // Slots: each segment from a fresh block, blocks in segment order.
    std::vector<std::vector<int32_t>> slots(w.length.size());
    int64_t blocks = 0;
    for (size_t s = 0; s < w.length.size(); ++s) {
      for (int32_t i = 0; i < w.length[s]; ++i) {
        slots[s].push_back(static_cast<int32_t>(blocks * kBlockTokens + i));
      }
      blocks += (w.length[s] + kBlockTokens - 1) / kBlockTokens;
    }
    auto kv_or = KvBlockPool::Create({1, kKvHeads, kHeadDim, kBlockTokens}, blocks + 1);
    if (!kv_or.ok()) {
      std::fprintf(stderr, "cpu_tree: %s\n", kv_or.status().ToString().c_str());
      return 1;
    }
    KvBlockPool& kv = **kv_or;
    for (const auto& seg : slots) {
      for (int32_t slot : seg) {
        for (float* p : {kv.k(0, slot), kv.v(0, slot)}) {
          for (int64_t i = 0; i < kv.kv_dim(); ++i) p[i] = u(rng);
        }
      }
    }
    std::vector<PlanSegment> segments(w.length.size());
    for (size_t s = 0; s < segments.size(); ++s) segments[s] = {w.parent[s], slots[s]};
    std::vector<float> q(w.queries.size() * kHeads * kHeadDim), out(q.size());
    for (float& x : q) x = u(rng);

    for (AttentionMode mode : {AttentionMode::kFlatten, AttentionMode::kNode, AttentionMode::kSeq,
                               AttentionMode::kTree}) {
      PlannerOptions options;
      options.mode = mode;
      options.bytes_per_kv_token = step_shape.bytes_per_token();
      PartitionPlanner planner(options);
      PartitionPlan plan;
      std::vector<double> plan_us, attn_ms;
      CpuAttentionScratch scratch;
      for (int r = 0; r <= repeats; ++r) {  // run 0 is the warm-up
        const auto t0 = std::chrono::steady_clock::now();
        const absl::Status st = planner.Plan(segments, w.queries, &plan);
        const auto t1 = std::chrono::steady_clock::now();
        if (!st.ok()) {
          std::fprintf(stderr, "cpu_tree: %s: %s\n", w.name.c_str(), st.ToString().c_str());
          return 1;
        }
        RunAttentionCpu(pool, plan, kv, 0, {kHeads, kKvHeads, kHeadDim}, q.data(), out.data(),
                        &scratch);
        const auto t2 = std::chrono::steady_clock::now();
        if (r == 0) continue;
        plan_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        attn_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
      }
      const double ratio =
          static_cast<double>(plan.kv_bytes_read) / static_cast<double>(plan.kv_bytes_floor);
      if (mode == AttentionMode::kFlatten && ratio > kFlattenFloorBound) flatten_ok = false;
      std::printf("| %s | %zu | %lld | %s | %.1f | %.2fx | %d | %d | %.0f | %.2f | %.2f |\n",
                  w.name.c_str(), w.queries.size(), static_cast<long long>(plan.kv_tokens_unique),
                  std::string(AttentionModeName(mode)).c_str(), plan.kv_bytes_read / 1e6, ratio,
                  plan.num_chunks(), plan.num_entries(), Median(plan_us), Median(attn_ms),
                  *std::min_element(attn_ms.begin(), attn_ms.end()));
      std::fflush(stdout);
    }
  }
  std::printf("\nCHECK flatten reads <= %.2fx the floor on every workload: %s\n",
              kFlattenFloorBound, flatten_ok ? "PASS" : "FAIL");
  return flatten_ok ? 0 : 1;
}
