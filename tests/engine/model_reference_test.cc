// The CPU engine against HF transformers on the same GGUF (tests/data/model, written by
// tests/reference/make_model_reference.py): token ids, full next-token logits at recorded
// positions, and 64-token greedy continuations, for every recorded prompt.
//
// Exact path (weights dequantized to fp32, fp32 math as the reference): logits relative L2 error
// <= 1e-3 and greedy continuations identical token for token. Fast path (int8-quantized
// activations against the quantized weights, as llama.cpp computes): logits within a looser
// bound that reflects the activation quantization, and the same next token wherever the
// reference's top-1 margin is clear.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/model/llama_model.h"

namespace deft {
namespace {

using nlohmann::json;

constexpr double kExactLogitsRelL2 = 1e-3;
// Int8 activations are inherently noisy. Measured 2026-11-23 over the 19 recorded positions:
// ours vs HF 0.6%-7.4%, llama.cpp (same GGUF, same quantization scheme) vs HF 0.8%-7.5%.
// Bound at 10%; a wrong kernel (dropped block, wrong scale, bad rope) gives far more.
constexpr double kFastLogitsRelL2 = 1e-1;

struct Reference {
  json doc;
  std::vector<float> logits;
};

const Reference& LoadReference() {
  static Reference* ref = [] {
    auto* r = new Reference;
    std::ifstream jf(std::string(DEFT_TEST_DATA_DIR) + "/model/reference.json");
    EXPECT_TRUE(jf.good()) << "missing tests/data/model/reference.json";
    r->doc = json::parse(jf);
    std::ifstream bf(std::string(DEFT_TEST_DATA_DIR) + "/model/logits.bin", std::ios::binary);
    bf.seekg(0, std::ios::end);
    r->logits.resize(static_cast<size_t>(bf.tellg()) / sizeof(float));
    bf.seekg(0);
    bf.read(reinterpret_cast<char*>(r->logits.data()), r->logits.size() * sizeof(float));
    return r;
  }();
  return *ref;
}

LlamaModel& Model(bool exact) {
  static std::unique_ptr<LlamaModel> models[2];
  std::unique_ptr<LlamaModel>& m = models[exact ? 1 : 0];
  if (!m) {
    LoadOptions lo;
    lo.dequantize_to_f32 = exact;
    auto loaded = LoadGgufModel(DEFT_TEST_MODEL, lo);
    if (!loaded.ok()) {
      ADD_FAILURE() << "cannot load " << DEFT_TEST_MODEL << ": " << loaded.status()
                    << " (run scripts/fetch_model.sh)";
      std::abort();
    }
    m = std::move(*LlamaModel::Create(std::move(*loaded), {}));
  }
  return *m;
}

double RelativeL2(const float* got, const float* want, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / den);
}

int32_t ArgMax(const float* v, int64_t n) {
  return static_cast<int32_t>(std::max_element(v, v + n) - v);
}

std::vector<std::string> PromptNames() {
  std::vector<std::string> names;
  for (const json& p : LoadReference().doc["prompts"]) names.push_back(p["name"]);
  return names;
}

const json& Prompt(const std::string& name) {
  for (const json& p : LoadReference().doc["prompts"]) {
    if (p["name"] == name) return p;
  }
  ADD_FAILURE() << "no prompt " << name;
  std::abort();
}

class ModelReference : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelReference, TokenIdsMatchHf) {
  const json& p = Prompt(GetParam());
  const Tokenizer& tok = Model(false).tokenizer();
  const bool chat = p["kind"] == "chat";
  if (chat) {
    std::vector<ChatMessage> messages;
    for (const json& m : p["chat_messages"]) messages.push_back({m["role"], m["content"]});
    auto rendered = tok.ApplyChatTemplate(messages, true);
    ASSERT_TRUE(rendered.ok()) << rendered.status();
    EXPECT_EQ(*rendered, p["text"].get<std::string>());
  }
  const bool add_bos = LoadReference().doc["tokenizer"]["adds_bos"];
  std::vector<int32_t> ids = tok.Encode(p["text"].get<std::string>(), add_bos, chat);
  EXPECT_EQ(ids, p["ids"].get<std::vector<int32_t>>());
}

// Runs the prompt through `model` in one batched forward (all logits), compares the recorded
// positions, then decodes greedily and returns the continuation.
std::vector<int32_t> CheckLogitsThenGreedy(LlamaModel& model, const json& p, double tolerance,
                                           int n_greedy) {
  const Reference& ref = LoadReference();
  const int64_t vocab = ref.doc["vocab_size"];
  std::vector<int32_t> ids = p["ids"];
  KvCache cache = model.NewCache(static_cast<int64_t>(ids.size()) + n_greedy);
  std::vector<float> logits(static_cast<size_t>(ids.size() * vocab), NAN);
  absl::Status s = model.Forward(ids, cache, /*all_logits=*/true, &logits);
  EXPECT_TRUE(s.ok()) << s;
  for (const json& rec : p["logits"]) {
    const int64_t pos = rec["position"];
    const size_t offset = rec["offset_bytes"].get<size_t>() / sizeof(float);
    if (offset + vocab > ref.logits.size()) {
      ADD_FAILURE() << "logits.bin is shorter than reference.json says";
      return {};
    }
    const float* want = ref.logits.data() + offset;
    const float* got = logits.data() + pos * vocab;
    double err = RelativeL2(got, want, static_cast<size_t>(vocab));
    EXPECT_LE(err, tolerance) << "position " << pos;
    const json& top5 = rec["top5"];
    const double margin = top5[0]["logit"].get<double>() - top5[1]["logit"].get<double>();
    if (margin > 0.5) {
      EXPECT_EQ(ArgMax(got, vocab), top5[0]["id"].get<int32_t>()) << pos;
    }
  }
  std::vector<int32_t> out;
  std::vector<float> last(logits.end() - vocab, logits.end());
  for (int i = 0; i < n_greedy; ++i) {
    int32_t next = ArgMax(last.data(), vocab);
    out.push_back(next);
    if (i + 1 < n_greedy) {
      s = model.Forward({&next, 1}, cache, false, &last);
      EXPECT_TRUE(s.ok()) << s;
    }
  }
  return out;
}

TEST_P(ModelReference, ExactPathLogitsAndGreedyMatchHf) {
  const json& p = Prompt(GetParam());
  std::vector<int32_t> want = p["continuation_ids"];
  std::vector<int32_t> got =
      CheckLogitsThenGreedy(Model(true), p, kExactLogitsRelL2, static_cast<int>(want.size()));
  EXPECT_EQ(got, want);
}

TEST_P(ModelReference, FastPathLogitsCloseToHf) {
  const json& p = Prompt(GetParam());
  CheckLogitsThenGreedy(Model(false), p, kFastLogitsRelL2, 1);
}

INSTANTIATE_TEST_SUITE_P(Prompts, ModelReference, ::testing::ValuesIn(PromptNames()),
                         [](const auto& info) { return info.param; });

TEST(Model, RejectsBadInput) {
  LlamaModel& model = Model(false);
  KvCache cache = model.NewCache(4);
  std::vector<float> logits;
  std::vector<int32_t> bad = {1, static_cast<int32_t>(model.config().vocab_size)};
  absl::Status s = model.Forward(bad, cache, false, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("outside the vocabulary"), std::string::npos) << s;
  std::vector<int32_t> too_many = {1, 2, 3, 4, 5};
  s = model.Forward(too_many, cache, false, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache.size(), 0);
  s = model.Forward({}, cache, false, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

TEST(Model, ConfigComesFromMetadata) {
  const LlamaConfig& c = Model(false).config();
  EXPECT_EQ(c.num_layers, 30);
  EXPECT_EQ(c.hidden, 576);
  EXPECT_EQ(c.num_heads, 9);
  EXPECT_EQ(c.num_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.ffn_hidden, 1536);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_FLOAT_EQ(c.rope_theta, 100000.f);
}

}  // namespace
}  // namespace deft
