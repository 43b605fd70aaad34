// bench/tree_decode: aggregate decode throughput of W branches sharing one prompt, decoded
// together by the TreeEngine (continuous batching, shared prompt KV, DeFT plans), on the CPU.
//
//   tree_decode --model M [--prompt-tokens 1000] [--branches 16] [--gen-tokens 64]
//               [--mode flatten|node|seq|tree] [--threads 0] [--repeats 3]
//               [--temperature 0] [--top-p 1]
//
// Each repeat: create the tree, prefill the prompt (timed separately), fork W children at its
// end, generate --gen-tokens tokens on all of them at once (ignore EOS; greedy unless
// --temperature > 0: then sampled with a seed per branch and --top-p), delete the tree.
// Reports prefill time and aggregate decode tokens/s (W * gen / decode time), median of repeats
// after one warm-up. PERFORMANCE.md section 3 compares the aggregate with llama.cpp decoding the
// branches one by one (its single-sequence decode rate, bench/cpu_decode/run.sh).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <string>
#include <vector>

#include "engine/scheduler/tree_engine.h"

namespace {

constexpr char kText[] =
    "Trees share their roots. A prompt, once read, can feed many branches of thought, and each "
    "branch grows in its own direction while the common trunk is stored only once. ";

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, mode_name = "flatten";
  int prompt_tokens = 1000, branches = 16, gen = 64, threads = 0, repeats = 3;
  float temperature = 0.f, top_p = 1.f;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "tree_decode: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--model")
      model_path = next();
    else if (a == "--prompt-tokens")
      prompt_tokens = std::atoi(next());
    else if (a == "--branches")
      branches = std::atoi(next());
    else if (a == "--gen-tokens")
      gen = std::atoi(next());
    else if (a == "--mode")
      mode_name = next();
    else if (a == "--threads")
      threads = std::atoi(next());
    else if (a == "--repeats")
      repeats = std::atoi(next());
    else if (a == "--temperature")
      temperature = static_cast<float>(std::atof(next()));
    else if (a == "--top-p")
      top_p = static_cast<float>(std::atof(next()));
    else {
      std::fprintf(stderr, "tree_decode: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  deft::AttentionMode mode;
  if (model_path.empty() || !deft::ParseAttentionMode(mode_name, &mode) || prompt_tokens < 1 ||
      branches < 1 || gen < 1 || repeats < 1) {
    std::fprintf(stderr,
                 "usage: tree_decode --model M [--prompt-tokens N] [--branches W] "
                 "[--gen-tokens G] [--mode flatten|node|seq|tree] [--threads T] "
                 "[--repeats R] [--temperature T] [--top-p P]\n");
    return 2;
  }
  auto loaded = deft::LoadModel(model_path, {});
  if (!loaded.ok()) {
    std::fprintf(stderr, "tree_decode: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  deft::ModelOptions mo;
  mo.num_threads = threads;
  auto model = deft::LlamaModel::Create(std::move(*loaded), mo);
  if (!model.ok()) {
    std::fprintf(stderr, "tree_decode: %s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  deft::EngineOptions options;
  options.mode = mode;
  options.kv_pool_bytes = int64_t{2} << 30;
  auto engine_or = deft::TreeEngine::Create(std::move(*model), options);
  if (!engine_or.ok()) {
    std::fprintf(stderr, "tree_decode: %s\n", std::string(engine_or.status().message()).c_str());
    return 1;
  }
  deft::TreeEngine& engine = **engine_or;
  std::vector<int32_t> chunk = engine.model().tokenizer().Encode(kText, false, false);
  std::vector<int32_t> prompt;
  while (static_cast<int>(prompt.size()) < prompt_tokens) {
    prompt.insert(prompt.end(), chunk.begin(), chunk.end());
  }
  prompt.resize(prompt_tokens);

  using Clock = std::chrono::steady_clock;
  std::vector<double> prefill_s, decode_s;
  double kv_ratio = 0;
  for (int r = 0; r <= repeats; ++r) {
    auto tree = engine.CreateTree(prompt);
    if (!tree.ok()) {
      std::fprintf(stderr, "tree_decode: %s\n", std::string(tree.status().message()).c_str());
      return 1;
    }
    // Prefill through a one-token Verify, which computes the prompt's KV in one step. The
    // branches fork at the prompt's end, so the verify's tokens end up in a sibling node that
    // does not generate.
    auto t0 = Clock::now();
    auto prefill = engine.Verify(*tree, 0, std::vector<int32_t>{prompt.back()},
                                 std::vector<int32_t>{-1}, deft::SamplingParams{});
    auto t1 = Clock::now();
    if (!prefill.ok()) {
      std::fprintf(stderr, "tree_decode: %s\n", std::string(prefill.status().message()).c_str());
      return 1;
    }
    auto kids = engine.Fork(*tree, 0, prompt_tokens, branches);
    if (!kids.ok()) {
      std::fprintf(stderr, "tree_decode: %s\n", std::string(kids.status().message()).c_str());
      return 1;
    }
    std::vector<deft::BranchRequest> reqs;
    for (int b = 0; b < branches; ++b) {
      deft::BranchRequest q;
      q.node = (*kids)[b];
      q.params.temperature = temperature;
      q.params.top_p = top_p;
      q.params.seed = 1000 + static_cast<uint64_t>(b);
      q.params.max_tokens = gen;
      q.params.ignore_eos = true;
      reqs.push_back(q);
    }
    std::promise<absl::Status> done;
    deft::GenerateCallbacks cb;
    cb.on_done = [&](const absl::Status& s) { done.set_value(s); };
    const deft::StepStats before = engine.stats();
    auto t2 = Clock::now();
    auto g = engine.Generate(*tree, reqs, cb);
    if (!g.ok()) {
      std::fprintf(stderr, "tree_decode: %s\n", std::string(g.status().message()).c_str());
      return 1;
    }
    absl::Status s = done.get_future().get();
    auto t3 = Clock::now();
    if (!s.ok()) {
      std::fprintf(stderr, "tree_decode: %s\n", std::string(s.message()).c_str());
      return 1;
    }
    const deft::StepStats after = engine.stats();
    kv_ratio = static_cast<double>(after.kv_bytes_read - before.kv_bytes_read) /
               static_cast<double>(after.kv_bytes_floor - before.kv_bytes_floor);
    (void)engine.DeleteTree(*tree);
    if (r == 0) continue;
    prefill_s.push_back(std::chrono::duration<double>(t1 - t0).count());
    decode_s.push_back(std::chrono::duration<double>(t3 - t2).count());
  }
  const double agg = branches * gen / Median(decode_s);
  std::printf(
      "{\"mode\": \"%s\", \"prompt_tokens\": %d, \"branches\": %d, \"gen_tokens\": %d, "
      "\"prefill_s\": %.3f, \"aggregate_decode_tok_s\": %.1f, \"kv_read_vs_floor\": %.2f, "
      "\"repeats\": %d}\n",
      mode_name.c_str(), prompt_tokens, branches, gen, Median(prefill_s), agg, kv_ratio, repeats);
  return 0;
}
