// TreeEngine runs unchanged on the GPU backend: the same tree (a prompt forked into three
// branches, one of them forked again mid-prompt) generates the same greedy tokens with the model
// on the GPU (KV pool in device memory via LlamaModel::NewKvPool) as on the CPU, in modes flatten
// and seq. The synthetic model's output head is scaled up (logit_scale) so that its top two
// logits are usually far apart compared with fp16 rounding. The prompt is random, so a branch
// can still meet a near-tie: tokens are compared up to the first position where the CPU's top
// two log-probabilities are closer than kTieNats (after it the continuations may rightly
// differ); prompts are drawn until 32 tokens were compared (at most 4).
// With GpuBackendOptions::batch_invariant, a branch decoded beside the others gives bit-identical
// tokens and log-probabilities to the same path decoded alone in its own tree.
#include <future>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/gpu/attach_backend.h"
#include "engine/gpu/gpu_backend.h"
#include "engine/model/synthetic_model.h"
#include "engine/scheduler/tree_engine.h"
#include "tests/engine/synthetic_model.h"
#include "tests/gpu/gpu_test_util.h"

namespace deft::gpu::testing {
namespace {

std::unique_ptr<LlamaModel> TinyModel(bool on_gpu, bool batch_invariant = false,
                                      bool device_sampling = true) {
  auto spec = SyntheticSpecFromName("synthetic:tiny:f16");
  EXPECT_TRUE(spec.ok());
  spec->logit_scale = 8.f;
  auto loaded = MakeSyntheticModel(*spec);
  EXPECT_TRUE(loaded.ok());
  // Token text does not matter here ("t<i> " below 256, empty above); no end-of-generation ids.
  (*loaded)->tokenizer = std::make_unique<testing_synthetic::SyntheticTokenizer>();
  auto model = LlamaModel::Create(std::move(*loaded), {});
  EXPECT_TRUE(model.ok());
  if (on_gpu) {
    GpuBackendOptions o;
    o.dtype = kernels::Dtype::kFloat16;
    o.kv_memory_fraction = 0.05;
    o.batch_invariant = batch_invariant;
    o.device_sampling = device_sampling;
    auto name = AttachStepBackend(**model, false, o);
    EXPECT_TRUE(name.ok()) << name.status();
    EXPECT_EQ(*name, "cuda");
  }
  return std::move(*model);
}

constexpr float kTieNats = 0.05f;

struct Branch {
  std::vector<int32_t> tokens;
  std::vector<float> margin;  // top-1 minus top-2 log-probability at each token
  std::vector<float> logprob;  // of each chosen token
  std::vector<std::vector<TokenLogprob>> top;  // its alternatives
};

BranchRequest Greedy(NodeId node, int tokens) {
  BranchRequest r;
  r.node = node;
  r.params.temperature = 0;
  r.params.max_tokens = tokens;
  r.params.ignore_eos = true;
  r.params.top_logprobs = 2;
  return r;
}

// Generates `branches` of `tree` and returns what each node got.
std::map<NodeId, Branch> RunBranches(TreeEngine& engine, TreeId tree,
                             const std::vector<BranchRequest>& branches) {
  std::map<NodeId, Branch> got;
  std::promise<absl::Status> done;
  GenerateCallbacks cb;
  cb.on_token = [&](NodeId node, const SampledToken& t, std::string_view) {
    got[node].tokens.push_back(t.id);
    got[node].margin.push_back(t.top.size() >= 2 ? t.top[0].logprob - t.top[1].logprob : 1e9f);
    got[node].logprob.push_back(t.logprob);
    got[node].top.push_back(t.top);
  };
  cb.on_done = [&](const absl::Status& s) { done.set_value(s); };
  auto gen = engine.Generate(tree, branches, cb);
  EXPECT_TRUE(gen.ok()) << gen.status();
  const absl::Status s = done.get_future().get();
  EXPECT_TRUE(s.ok()) << s;
  return got;
}

// Greedy tokens of every branch: three children of the whole prompt and one forked at 11.
std::map<int, Branch> Decode(bool on_gpu, AttentionMode mode, const std::vector<int32_t>& prompt,
                             int tokens, int64_t* blocks, bool batch_invariant = false) {
  EngineOptions opts;
  opts.mode = mode;
  auto engine = TreeEngine::Create(TinyModel(on_gpu, batch_invariant), opts);
  EXPECT_TRUE(engine.ok()) << engine.status();
  *blocks = (*engine)->total_blocks();
  auto tree = (*engine)->CreateTree(prompt);
  EXPECT_TRUE(tree.ok());
  auto kids = (*engine)->Fork(*tree, 0, static_cast<int64_t>(prompt.size()), 3);
  auto inner = (*engine)->Fork(*tree, 0, 11, 1);
  EXPECT_TRUE(kids.ok() && inner.ok());
  std::vector<NodeId> nodes = {(*kids)[0], (*kids)[1], (*kids)[2], (*inner)[0]};
  // Different first tokens for the three full-prompt branches.
  for (int i = 0; i < 3; ++i) {
    const std::vector<int32_t> first = {100 + i};
    EXPECT_TRUE((*engine)->Extend(*tree, nodes[i], first).ok());
  }
  std::vector<BranchRequest> branches;
  for (NodeId n : nodes) branches.push_back(Greedy(n, tokens));
  std::map<NodeId, Branch> got = RunBranches(**engine, *tree, branches);
  std::map<int, Branch> out;
  for (size_t i = 0; i < nodes.size(); ++i) out[static_cast<int>(i)] = got[nodes[i]];
  return out;
}

std::vector<int32_t> RandomPrompt(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> prompt(40);
  for (auto& t : prompt) t = static_cast<int32_t>(rng() % 8192);
  return prompt;
}

// An engine over the tiny model on the GPU with batch-invariant kernels (and its backend).
absl::StatusOr<std::unique_ptr<TreeEngine>> InvariantGpuEngine(bool device_sampling,
                                                               AttentionMode mode,
                                                               GpuBackend** gpu) {
  std::unique_ptr<LlamaModel> model = TinyModel(true, true, device_sampling);
  *gpu = dynamic_cast<GpuBackend*>(model->step_backend());
  EXPECT_NE(*gpu, nullptr);
  EngineOptions opts;
  opts.mode = mode;
  auto engine = TreeEngine::Create(std::move(model), opts);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine;
}

class GpuTreeEngineTest : public ::testing::TestWithParam<AttentionMode> {
 protected:
  void SetUp() override { DEFT_SKIP_WITHOUT_GPU(); }
};

TEST_P(GpuTreeEngineTest, SameGreedyTokensAsOnTheCpu) {
  const int kTokens = 16;
  // A random prompt can put near-ties early in several branches, which leaves little to compare:
  // new prompts are drawn until 2 * kTokens tokens were compared (a mismatch fails at once).
  int compared = 0;
  for (int attempt = 0; attempt < 4 && compared < 2 * kTokens; ++attempt) {
    const uint64_t seed = std::random_device{}();
    SCOPED_TRACE("prompt seed " + std::to_string(seed));
    const std::vector<int32_t> prompt = RandomPrompt(seed);
    int64_t cpu_blocks = 0, gpu_blocks = 0;
    const auto cpu = Decode(false, GetParam(), prompt, kTokens, &cpu_blocks);
    const auto gpu = Decode(true, GetParam(), prompt, kTokens, &gpu_blocks);
    EXPECT_GT(gpu_blocks, 0);
    for (int i = 0; i < 4; ++i) {
      ASSERT_EQ(cpu.at(i).tokens.size(), size_t{kTokens}) << "branch " << i;
      ASSERT_EQ(gpu.at(i).tokens.size(), size_t{kTokens}) << "branch " << i;
      for (int p = 0; p < kTokens; ++p) {
        if (cpu.at(i).margin[p] < kTieNats) break;  // a near-tie: this token and later may differ
        ASSERT_EQ(gpu.at(i).tokens[p], cpu.at(i).tokens[p])
            << "branch " << i << " token " << p << " (CPU top-2 margin "
            << cpu.at(i).margin[p] << " nats)";
        ++compared;
      }
    }
  }
  EXPECT_GE(compared, 2 * kTokens) << "too many near-ties to compare the backends";
}

// The batch-invariant backend: each of Decode's four branches, decoded beside the others, equals
// its path decoded alone (a tree whose prompt is the branch's prefix), bit for bit: tokens and
// log-probabilities, whatever the engine's mode (the backend plans seq chunks from the path's
// start and runs the row-invariant GEMM).
TEST_P(GpuTreeEngineTest, BatchInvariantBranchDecodesAloneAsBesideOthers) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("prompt seed " + std::to_string(seed));
  const std::vector<int32_t> prompt = RandomPrompt(seed);
  const int kTokens = 12;
  int64_t blocks = 0;
  const auto together = Decode(true, GetParam(), prompt, kTokens, &blocks, /*batch_invariant=*/true);
  EngineOptions opts;
  opts.mode = GetParam();
  auto engine = TreeEngine::Create(TinyModel(true, /*batch_invariant=*/true), opts);
  ASSERT_TRUE(engine.ok()) << engine.status();
  for (int i = 0; i < 4; ++i) {
    // Branches 0-2: the prompt and a first token 100 + i; branch 3: the prompt's first 11.
    std::vector<int32_t> prefix(prompt.begin(), prompt.begin() + (i < 3 ? prompt.size() : 11));
    if (i < 3) prefix.push_back(100 + i);
    auto tree = (*engine)->CreateTree(prefix);
    ASSERT_TRUE(tree.ok()) << tree.status();
    std::map<NodeId, Branch> alone = RunBranches(**engine, *tree, {Greedy(0, kTokens)});
    ASSERT_EQ(alone[0].tokens, together.at(i).tokens) << "branch " << i;
    for (int p = 0; p < kTokens; ++p) {
      ASSERT_EQ(alone[0].logprob[p], together.at(i).logprob[p]) << "branch " << i << " token " << p;
    }
    ASSERT_TRUE((*engine)->DeleteTree(*tree).ok());
  }
}

// Sampled branches draw on the device (GpuBackendOptions::device_sampling: only their tokens
// come back) and get the tokens, log-probabilities and top_logprobs alternatives the host's
// Samplers give from the same logits (device_sampling off), with every sampling setting:
// filters, repetition penalty over the prompt and outputs, frequency and presence penalties. The
// kernels are batch-invariant: the two runs' steps need not group the branches alike (the
// device run's shorter steps let the scheduler start some sooner), and without it the logits
// of the two runs differed by up to 5e-3 nats on the H100.
TEST_P(GpuTreeEngineTest, DeviceSamplingDrawsTheHostSamplersTokens) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("prompt seed " + std::to_string(seed));
  const std::vector<int32_t> prompt = RandomPrompt(seed);
  const int kTokens = 20;
  auto run = [&](bool device_sampling, int64_t* device_rows) {
    GpuBackend* gpu = nullptr;
    auto engine = InvariantGpuEngine(device_sampling, GetParam(), &gpu);
    auto tree = (*engine)->CreateTree(prompt);
    EXPECT_TRUE(tree.ok());
    auto kids = (*engine)->Fork(*tree, 0, static_cast<int64_t>(prompt.size()), 7);
    EXPECT_TRUE(kids.ok());
    std::vector<BranchRequest> branches(7);
    for (int i = 0; i < 7; ++i) {
      BranchRequest& r = branches[i];
      r.node = (*kids)[i];
      r.params.max_tokens = kTokens;
      r.params.ignore_eos = true;
      r.params.seed = seed + static_cast<uint64_t>(i);
    }
    branches[0].params.temperature = 1.f;
    branches[0].params.top_logprobs = 3;
    branches[1].params.temperature = 0.8f;
    branches[1].params.top_p = 0.9f;
    branches[2].params.temperature = 0.7f;
    branches[2].params.top_k = 40;
    branches[2].params.min_p = 0.05f;
    branches[3].params.temperature = 0.f;
    branches[3].params.top_logprobs = 20;
    branches[4].params.temperature = 1.3f;
    branches[4].params.top_k = 5;
    branches[4].params.top_p = 0.6f;
    branches[5].params.temperature = 0.9f;
    branches[5].params.repetition_penalty = 1.2f;
    branches[5].params.top_p = 0.95f;
    branches[6].params.temperature = 0.f;  // greedy, pushed off its repeats
    branches[6].params.frequency_penalty = 0.8f;
    branches[6].params.presence_penalty = 0.4f;
    branches[6].params.repetition_penalty = 1.1f;
    branches[6].params.top_logprobs = 2;
    std::map<NodeId, Branch> got = RunBranches(**engine, *tree, branches);
    *device_rows = gpu->device_sampled_rows();
    std::vector<Branch> out;
    for (int i = 0; i < 7; ++i) out.push_back(got[(*kids)[i]]);
    return out;
  };
  int64_t device_rows = 0, host_rows = 0;
  const std::vector<Branch> device = run(true, &device_rows);
  const std::vector<Branch> host = run(false, &host_rows);
  EXPECT_EQ(host_rows, 0);
  EXPECT_EQ(device_rows, 7 * kTokens);  // every draw of every branch
  for (int i = 0; i < 7; ++i) {
    ASSERT_EQ(device[i].tokens.size(), size_t{kTokens}) << "branch " << i;
    EXPECT_EQ(device[i].tokens, host[i].tokens) << "branch " << i;
    for (int p = 0; p < kTokens; ++p) {
      EXPECT_NEAR(device[i].logprob[p], host[i].logprob[p], 1e-4f)
          << "branch " << i << " token " << p;
      ASSERT_EQ(device[i].top[p].size(), host[i].top[p].size()) << "branch " << i;
      for (size_t k = 0; k < host[i].top[p].size(); ++k) {
        EXPECT_EQ(device[i].top[p][k].id, host[i].top[p][k].id)
            << "branch " << i << " token " << p << " alternative " << k;
        EXPECT_NEAR(device[i].top[p][k].logprob, host[i].top[p][k].logprob, 1e-4f)
            << "branch " << i << " token " << p << " alternative " << k;
      }
    }
  }
}

// Verifications have every row of the draft drawn on the device (the tip's at draw 0, a draft
// token's at its depth, penalized with the path and the draft tokens above it) and only the
// tokens come back: the walk accepts the same draft tokens, commits the same tokens with the
// same log-probabilities as the host's walk over the logits (device_sampling off), greedy,
// sampled and penalized (batch-invariant kernels: the five concurrent verifications may share
// steps differently in the two runs).
TEST_P(GpuTreeEngineTest, DeviceDrawnVerificationsMatchTheHostWalk) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("prompt seed " + std::to_string(seed));
  const std::vector<int32_t> prompt = RandomPrompt(seed);
  auto run = [&](bool device_sampling, int64_t* device_rows) {
    GpuBackend* gpu = nullptr;
    auto engine = InvariantGpuEngine(device_sampling, GetParam(), &gpu);
    auto tree = (*engine)->CreateTree(prompt);
    EXPECT_TRUE(tree.ok());
    // The model's own greedy continuation, so that greedy drafts are accepted.
    auto kid = (*engine)->Fork(*tree, 0, static_cast<int64_t>(prompt.size()), 1);
    EXPECT_TRUE(kid.ok());
    std::map<NodeId, Branch> greedy = RunBranches(**engine, *tree, {Greedy((*kid)[0], 6)});
    const std::vector<int32_t> g = greedy[(*kid)[0]].tokens;
    EXPECT_EQ(g.size(), 6u);
    // A draft of the greedy chain with a wrong sibling at every level and a branch off the
    // second token: indices 0..5 the chain, 6.. the siblings.
    std::vector<int32_t> draft = g, parents = {-1, 0, 1, 2, 3, 4};
    for (int i = 0; i < 6; ++i) {
      draft.push_back((g[i] + 7) % 8192);
      parents.push_back(i == 0 ? -1 : i - 1);
    }
    draft.push_back((g[2] + 3) % 8192);
    parents.push_back(6);
    std::vector<SamplingParams> params(5);
    params[0].temperature = 0.f;
    params[1].temperature = 0.8f;
    params[1].seed = seed;
    params[2].temperature = 1.2f;
    params[2].top_k = 3;
    params[2].seed = seed + 1;
    params[3].temperature = 0.7f;
    params[3].repetition_penalty = 1.3f;
    params[3].seed = seed + 2;
    params[4].temperature = 0.f;  // greedy, pushed off the draft's repeats
    params[4].frequency_penalty = 0.6f;
    params[4].presence_penalty = 0.3f;
    params[4].repetition_penalty = 1.1f;
    // Five tips, verified concurrently so that they share steps.
    auto tips = (*engine)->Fork(*tree, 0, static_cast<int64_t>(prompt.size()), 5);
    EXPECT_TRUE(tips.ok());
    std::vector<std::future<absl::StatusOr<VerifyResult>>> futures;
    for (int i = 0; i < 5; ++i) {
      futures.push_back(std::async(std::launch::async, [&, i] {
        return (*engine)->Verify(*tree, (*tips)[i], draft, parents, params[i]);
      }));
    }
    std::vector<VerifyResult> out;
    for (auto& f : futures) {
      absl::StatusOr<VerifyResult> r = f.get();
      EXPECT_TRUE(r.ok()) << r.status();
      out.push_back(r.ok() ? *r : VerifyResult{});
    }
    *device_rows = gpu->device_sampled_rows();
    return std::make_pair(out, g);
  };
  int64_t device_rows = 0, host_rows = 0;
  const auto [device, greedy] = run(true, &device_rows);
  const auto [host, greedy_host] = run(false, &host_rows);
  EXPECT_EQ(host_rows, 0);
  // The greedy decode's 6 draws, then every row of the five drafts (tip + 13 tokens).
  EXPECT_EQ(device_rows, 6 + 5 * 14);
  EXPECT_EQ(greedy, greedy_host);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(device[i].accepted, host[i].accepted) << "verification " << i;
    EXPECT_EQ(device[i].tokens, host[i].tokens) << "verification " << i;
    ASSERT_EQ(device[i].logprobs.size(), host[i].logprobs.size()) << "verification " << i;
    for (size_t k = 0; k < host[i].logprobs.size(); ++k) {
      EXPECT_NEAR(device[i].logprobs[k], host[i].logprobs[k], 1e-4f)
          << "verification " << i << " token " << k;
    }
  }
  // Greedy accepts (at least the start of) the model's own chain.
  EXPECT_FALSE(device[0].accepted.empty());
  EXPECT_EQ(device[0].tokens.size(), device[0].accepted.size() + 1);
}

INSTANTIATE_TEST_SUITE_P(Modes, GpuTreeEngineTest,
                         ::testing::Values(AttentionMode::kFlatten, AttentionMode::kSeq),
                         [](const auto& info) {
                           return std::string(AttentionModeName(info.param));
                         });

}  // namespace
}  // namespace deft::gpu::testing
