// bench/cpu_decode: prefill and single-sequence decode throughput of the CPU reference engine.
//
//   cpu_decode --model M [--prompt-tokens 512] [--gen-tokens 128] [--threads 0] [--repeats 5]
//              [--json] [--dump-prompt-ids FILE]
//
// The prompt is a fixed English text tokenized and repeated to exactly --prompt-tokens ids (the
// same ids are handed to llama.cpp by run.sh via --dump-prompt-ids). Prefill: one batched
// forward of the whole prompt into an empty cache. Decode: --gen-tokens greedy steps after it.
// Each figure is the median over --repeats runs after one warm-up run.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "engine/model/llama_model.h"
#include "engine/util/thread_pool.h"

namespace {

constexpr char kPromptText[] =
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels; later, stored programs let the same hardware run any algorithm. Compilers "
    "turned symbolic instructions into machine code, operating systems shared one computer among "
    "many users, and networks joined computers into systems that span the planet. Each layer hid "
    "the details of the one below it, and each made new kinds of software possible. ";

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, dump_path;
  int prompt_tokens = 512, gen_tokens = 128, threads = 0, repeats = 5;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "cpu_decode: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--model")
      model_path = next();
    else if (a == "--prompt-tokens")
      prompt_tokens = std::atoi(next());
    else if (a == "--gen-tokens")
      gen_tokens = std::atoi(next());
    else if (a == "--threads")
      threads = std::atoi(next());
    else if (a == "--repeats")
      repeats = std::atoi(next());
    else if (a == "--dump-prompt-ids")
      dump_path = next();
    else if (a == "--json")
      json = true;
    else {
      std::fprintf(stderr, "cpu_decode: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (model_path.empty() || prompt_tokens < 1 || gen_tokens < 1 || repeats < 1) {
    std::fprintf(stderr,
                 "usage: cpu_decode --model M [--prompt-tokens N] [--gen-tokens G] "
                 "[--threads T] [--repeats R] [--json] [--dump-prompt-ids FILE]\n");
    return 2;
  }
  auto loaded = deft::LoadModel(model_path, {});
  if (!loaded.ok()) {
    std::fprintf(stderr, "cpu_decode: %s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  deft::ModelOptions mo;
  mo.num_threads = threads;
  auto created = deft::LlamaModel::Create(std::move(*loaded), mo);
  if (!created.ok()) {
    std::fprintf(stderr, "cpu_decode: %s\n", std::string(created.status().message()).c_str());
    return 1;
  }
  deft::LlamaModel& model = **created;
  const deft::Tokenizer& tok = model.tokenizer();

  std::vector<int32_t> chunk = tok.Encode(kPromptText, false, false);
  std::vector<int32_t> prompt;
  while (static_cast<int>(prompt.size()) < prompt_tokens) {
    prompt.insert(prompt.end(), chunk.begin(), chunk.end());
  }
  prompt.resize(prompt_tokens);
  if (!dump_path.empty()) {
    FILE* f = std::fopen(dump_path.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "cpu_decode: cannot write %s\n", dump_path.c_str());
      return 1;
    }
    for (int32_t id : prompt) std::fprintf(f, "%d ", id);
    std::fprintf(f, "\n");
    std::fclose(f);
  }

  using Clock = std::chrono::steady_clock;
  std::vector<double> prefill_s, decode_s;
  std::vector<float> logits;
  for (int r = 0; r <= repeats; ++r) {
    deft::KvCache cache = model.NewCache(prompt_tokens + gen_tokens);
    auto t0 = Clock::now();
    if (auto s = model.Forward(prompt, cache, false, &logits); !s.ok()) {
      std::fprintf(stderr, "cpu_decode: %s\n", std::string(s.message()).c_str());
      return 1;
    }
    auto t1 = Clock::now();
    for (int g = 0; g < gen_tokens; ++g) {
      int32_t next =
          static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      if (auto s = model.Forward({&next, 1}, cache, false, &logits); !s.ok()) {
        std::fprintf(stderr, "cpu_decode: %s\n", std::string(s.message()).c_str());
        return 1;
      }
    }
    auto t2 = Clock::now();
    if (r == 0) continue;  // warm-up
    prefill_s.push_back(std::chrono::duration<double>(t1 - t0).count());
    decode_s.push_back(std::chrono::duration<double>(t2 - t1).count());
  }
  const double prefill_tok_s = prompt_tokens / Median(prefill_s);
  const double decode_tok_s = gen_tokens / Median(decode_s);
  if (json) {
    std::printf(
        "{\"engine\": \"deft\", \"prefill_tok_s\": %.2f, \"decode_tok_s\": %.2f, \"n_prompt\": %d, "
        "\"n_gen\": %d, \"threads\": %d, \"repeats\": %d}\n",
        prefill_tok_s, decode_tok_s, prompt_tokens, gen_tokens, model.pool().num_threads(),
        repeats);
  } else {
    std::printf("prefill: %d tokens, %.1f tok/s (median of %d)\n", prompt_tokens, prefill_tok_s,
                repeats);
    std::printf("decode:  %d tokens, %.1f tok/s (median of %d)\n", gen_tokens, decode_tok_s,
                repeats);
  }
  return 0;
}
