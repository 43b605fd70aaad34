#include "clients/deftctl/local_generate.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/str_split.h"
#include "clients/deftctl/flags.h"
#include "clients/deftctl/progress.h"
#include "engine/model/generate.h"
#include "engine/model/llama_model.h"

ABSL_FLAG(std::string, model, "",
          "GGUF file or Hugging Face directory (default: $DEFT_MODEL, else the cached SmolLM2)");
ABSL_FLAG(bool, raw, false, "Send the prompt as-is instead of through the model's chat template");
ABSL_FLAG(int32_t, threads, 0, "Worker threads (0: one per core)");
ABSL_FLAG(bool, exact, false, "Dequantize weights to fp32 (slower, matches the fp32 reference)");
ABSL_FLAG(bool, stats, true, "Print timing to stderr at the end");

namespace deft::cli {
namespace {

std::string DefaultModelPath() {
  if (const char* env = std::getenv("DEFT_MODEL"); env && *env) return env;
  std::string cache;
  if (const char* env = std::getenv("DEFT_CACHE"); env && *env) {
    cache = env;
  } else if (const char* home = std::getenv("HOME"); home && *home) {
    cache = std::string(home) + "/.cache/deft";
  } else {
    cache = ".cache/deft";
  }
  return cache + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace

int RunLocalGenerate() {
  std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) path = DefaultModelPath();
  const std::string prompt = absl::GetFlag(FLAGS_prompt);
  if (prompt.empty()) {
    std::fprintf(stderr, "deftctl generate: --prompt is required\n");
    return 2;
  }
  if (!IsValidUtf8(prompt)) {
    std::fprintf(stderr, "deftctl generate: --prompt is not valid UTF-8\n");
    return 2;
  }
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    std::fprintf(stderr,
                 "deftctl generate: model not found: %s\n"
                 "  fetch the default model with scripts/fetch_model.sh, or pass --model PATH\n",
                 path.c_str());
    return 1;
  }

  SamplingParams params;
  params.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  params.top_k = absl::GetFlag(FLAGS_top_k);
  params.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  params.min_p = static_cast<float>(absl::GetFlag(FLAGS_min_p));
  params.repetition_penalty = static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty));
  params.seed = absl::GetFlag(FLAGS_seed);
  params.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  if (std::string stop = absl::GetFlag(FLAGS_stop); !stop.empty()) {
    params.stop_strings = absl::StrSplit(stop, ',', absl::SkipEmpty());
  }

  auto created = [&]() -> absl::StatusOr<std::unique_ptr<LlamaModel>> {
    const std::string what = "loading " + std::filesystem::path(path).filename().string();
    if (!isatty(STDERR_FILENO)) std::fprintf(stderr, "%s...\n", what.c_str());
    WaitIndicator progress(what, std::chrono::milliseconds(0));
    LoadOptions load;
    load.dequantize_to_f32 = absl::GetFlag(FLAGS_exact);
    auto loaded = LoadModel(path, load);
    if (!loaded.ok()) return loaded.status();
    ModelOptions mo;
    mo.num_threads = absl::GetFlag(FLAGS_threads);
    return LlamaModel::Create(std::move(*loaded), mo);
  }();
  if (!created.ok()) {
    std::fprintf(stderr, "deftctl generate: cannot load model: %s\n",
                 std::string(created.status().message()).c_str());
    return 1;
  }
  std::unique_ptr<LlamaModel> model = std::move(*created);
  if (absl::Status s = params.Validate(model->config().vocab_size); !s.ok()) {
    std::fprintf(stderr, "deftctl generate: %s\n", std::string(s.message()).c_str());
    return 2;
  }

  const Tokenizer& tok = model->tokenizer();
  std::string text = prompt;
  bool parse_special = false, add_bos = tok.add_bos_by_default();
  if (!absl::GetFlag(FLAGS_raw) && tok.chat_template_kind() != ChatTemplateKind::kNone) {
    std::vector<ChatMessage> messages;
    if (std::string sys = absl::GetFlag(FLAGS_system); !sys.empty()) {
      messages.push_back({"system", sys});
    }
    messages.push_back({"user", prompt});
    auto rendered = tok.ApplyChatTemplate(messages, /*add_generation_prompt=*/true);
    if (!rendered.ok()) {
      std::fprintf(stderr, "deftctl generate: %s\n",
                   std::string(rendered.status().message()).c_str());
      return 1;
    }
    text = *rendered;
    parse_special = true;
    add_bos = false;  // chat templates write the BOS text themselves
  }
  std::vector<int32_t> ids = tok.Encode(text, add_bos, parse_special);
  auto result = Generate(*model, ids, params, [](const SampledToken&, std::string_view piece) {
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
    return true;
  });
  if (!result.ok()) {
    std::fprintf(stderr, "\ndeftctl generate: %s\n",
                 std::string(result.status().message()).c_str());
    return 1;
  }
  std::fputc('\n', stdout);
  if (absl::GetFlag(FLAGS_stats)) {
    const GenerateResult& r = *result;
    std::fprintf(stderr,
                 "[%lld prompt tokens in %.3fs (%.1f tok/s); %zu generated in %.3fs (%.1f tok/s); "
                 "finish: %s]\n",
                 static_cast<long long>(r.prompt_tokens), r.prefill_seconds,
                 r.prompt_tokens / std::max(r.prefill_seconds, 1e-9), r.tokens.size(),
                 r.decode_seconds, r.tokens.size() / std::max(r.decode_seconds, 1e-9),
                 std::string(FinishReasonName(r.reason)).c_str());
  }
  return 0;
}

}  // namespace deft::cli
