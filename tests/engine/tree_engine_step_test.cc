// The scheduler's step, on the synthetic fp32 model (tests/engine/synthetic_model.h: fast, and
// exact enough for token equality with decoding alone; tree_engine_workload_test.cc measures the
// margins).
//
// VerifyInStep: speculative verification inside the batched step (TreeEngine::Verify): a draft
// rides in the same step (one ForwardStep, one plan) as other trees' decode tips and prefill
// chunks, and the results are those of verification alone: greedy acceptance commits the greedy
// tokens, sampled acceptance commits exactly the tokens that sampling alone with the same seed
// draws, drafts behind pending prefill or larger than the step budget still complete, and the
// errors that only the scheduler can find (the pool) come back to the caller.
//
// UnlockedForward: the engine lock is released during a step's forward pass: with the scheduler
// held inside one (EngineOptions::before_unlocked_forward), CreateTree, Generate, Cancel and the
// reads complete, while Fork and DeleteTree wait for the pass to end; every result stays exact.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "engine/scheduler/tree_engine.h"
#include "tests/engine/synthetic_model.h"

namespace deft {
namespace {

using testing_synthetic::SyntheticModel;

constexpr uint32_t kModelSeed = 20240611;

std::vector<int32_t> RandomTokens(std::mt19937& rng, int n) {
  std::uniform_int_distribution<int32_t> token(0, testing_synthetic::kVocab - 1);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t) x = token(rng);
  return t;
}

SamplingParams Greedy() {
  SamplingParams p;
  p.temperature = 0;
  p.ignore_eos = true;
  return p;
}

// `n` tokens decoded alone (contiguous KV cache, no tree) with `params`.
std::vector<int32_t> DecodeAlone(const std::vector<int32_t>& sequence, int n,
                                 SamplingParams params) {
  static std::unique_ptr<LlamaModel> model = SyntheticModel(kModelSeed);
  params.max_tokens = n;
  params.ignore_eos = true;
  auto r = Generate(*model, sequence, params, nullptr);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->tokens : std::vector<int32_t>{};
}

// A draft chain carrying `tokens` with a wrong sibling before each (so acceptance has to pick
// the child by its token, not its position). Accepted whole, it is indices 1, 3, 5, ...
void ChainWithDistractors(const std::vector<int32_t>& tokens, std::vector<int32_t>* draft,
                          std::vector<int32_t>* parents) {
  int32_t prev = -1;
  for (int32_t t : tokens) {
    draft->push_back((t + 1) % testing_synthetic::kVocab);
    parents->push_back(prev);
    draft->push_back(t);
    parents->push_back(prev);
    prev = static_cast<int32_t>(draft->size()) - 1;
  }
}

std::unique_ptr<TreeEngine> MakeEngine(EngineOptions options = {}) {
  if (options.kv_pool_bytes == EngineOptions{}.kv_pool_bytes) {
    options.kv_pool_bytes = int64_t{16} << 20;
  }
  auto engine = TreeEngine::Create(SyntheticModel(kModelSeed), options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? std::move(*engine) : nullptr;
}

// Tree A generates 40 greedy tokens; its first token's callback (on the scheduler thread, so no
// step runs meanwhile) waits until a Verify of tree B, called only then, is queued. The next step
// then holds A's decode tip and B's prompt and draft: the stats must show the verification scored
// in a step that fed other work, and both A's tokens and B's commit must equal decoding alone.
TEST(VerifyInStep, DraftRidesInTheStepOfAnotherTreesDecodeAndBothStayExact) {
  std::unique_ptr<TreeEngine> engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  const int64_t baseline = engine->free_blocks();
  std::mt19937 rng(1);
  const std::vector<int32_t> prompt_a = RandomTokens(rng, 10);
  const std::vector<int32_t> prompt_b = RandomTokens(rng, 12);
  const std::vector<int32_t> greedy_b = DecodeAlone(prompt_b, 6, Greedy());
  auto a = engine->CreateTree(prompt_a);
  auto b = engine->CreateTree(prompt_b);
  ASSERT_TRUE(a.ok() && b.ok());

  std::mutex mu;
  std::vector<int32_t> tokens_a;
  std::promise<void> a_done, a_holding;
  bool saw_queued_verify = false;
  GenerateCallbacks cb;
  cb.on_token = [&](NodeId, const SampledToken& t, std::string_view) {
    if (t.id < 0) return;
    bool first;
    {
      std::lock_guard<std::mutex> lock(mu);
      tokens_a.push_back(t.id);
      first = tokens_a.size() == 1;
    }
    if (!first) return;
    a_holding.set_value();
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (engine->waiting_verifications() == 0 && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::yield();
    }
    std::lock_guard<std::mutex> lock(mu);
    saw_queued_verify = engine->waiting_verifications() == 1;
  };
  cb.on_done = [&](const absl::Status&) { a_done.set_value(); };
  BranchRequest branch;
  branch.node = 0;
  branch.params = Greedy();
  branch.params.max_tokens = 40;
  const StepStats before = engine->stats();
  ASSERT_TRUE(engine->Generate(*a, {branch}, cb).ok());

  std::vector<int32_t> draft, parents;
  ChainWithDistractors({greedy_b.begin(), greedy_b.begin() + 5}, &draft, &parents);
  a_holding.get_future().wait();  // the scheduler sits in A's first on_token
  auto r = engine->Verify(*b, 0, draft, parents, Greedy());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->accepted, (std::vector<int32_t>{1, 3, 5, 7, 9}));
  EXPECT_EQ(r->tokens, greedy_b);
  a_done.get_future().wait();
  const StepStats after = engine->stats();
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_TRUE(saw_queued_verify);
    EXPECT_EQ(tokens_a, DecodeAlone(prompt_a, 40, Greedy()));
  }
  // One verification, scored in a step that also fed A's decode tip; A's 40 tokens took one
  // step each (prompt + first token, then 39 decode steps) and the verification no step of its
  // own.
  EXPECT_EQ(after.verifications - before.verifications, 1);
  EXPECT_EQ(after.verifications_batched - before.verifications_batched, 1);
  EXPECT_EQ(after.steps - before.steps, 40);

  // B continues exactly from its commit (accepted KV kept, bonus token pending).
  std::vector<int32_t> seq_b = prompt_b;
  seq_b.insert(seq_b.end(), greedy_b.begin(), greedy_b.end());
  auto r2 = engine->Verify(*b, 0, std::vector<int32_t>{0}, std::vector<int32_t>{-1}, Greedy());
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->tokens.back(),
            DecodeAlone(seq_b, static_cast<int>(r2->tokens.size()), Greedy()).back());
  ASSERT_TRUE(engine->DeleteTree(*a).ok());
  ASSERT_TRUE(engine->DeleteTree(*b).ok());
  EXPECT_EQ(engine->free_blocks(), baseline);
}

TEST(VerifyInStep, ConcurrentVerificationsOfManyTreesShareStepsAndEachEqualsGreedy) {
  std::unique_ptr<TreeEngine> engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  constexpr int kTrees = 8;
  std::mt19937 rng(2);
  std::vector<std::vector<int32_t>> prompts, expected;
  std::vector<TreeId> trees;
  for (int t = 0; t < kTrees; ++t) {
    prompts.push_back(RandomTokens(rng, 5 + t));
    expected.push_back(DecodeAlone(prompts.back(), 4, Greedy()));
    auto tree = engine->CreateTree(prompts.back());
    ASSERT_TRUE(tree.ok());
    trees.push_back(*tree);
  }
  const StepStats before = engine->stats();
  std::vector<std::thread> threads;
  std::vector<absl::StatusOr<VerifyResult>> results(kTrees, absl::UnknownError("not run"));
  std::atomic<int> ready{0};
  for (int t = 0; t < kTrees; ++t) {
    threads.emplace_back([&, t] {
      std::vector<int32_t> draft, parents;
      ChainWithDistractors({expected[t].begin(), expected[t].begin() + 3}, &draft, &parents);
      ++ready;
      while (ready.load() < kTrees) std::this_thread::yield();
      results[t] = engine->Verify(trees[t], 0, draft, parents, Greedy());
    });
  }
  for (std::thread& th : threads) th.join();
  const StepStats after = engine->stats();
  for (int t = 0; t < kTrees; ++t) {
    ASSERT_TRUE(results[t].ok()) << results[t].status();
    EXPECT_EQ(results[t]->tokens, expected[t]) << "tree " << t;
  }
  EXPECT_EQ(after.verifications - before.verifications, kTrees);
  // Each verification took at most one step of its own (prompt and draft together).
  EXPECT_LE(after.steps - before.steps, kTrees);
}

// Sampled acceptance draws from exactly the target distribution: with the same seed, the
// committed tokens are those that sampling alone draws, token for token, whatever the draft.
TEST(VerifyInStep, SampledAcceptanceCommitsWhatSamplingAloneDraws) {
  std::unique_ptr<TreeEngine> engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  std::mt19937 rng(3);
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_k = 40;
  p.seed = 11;
  for (int trial = 0; trial < 6; ++trial) {
    p.seed = 11 + trial;
    const std::vector<int32_t> prompt = RandomTokens(rng, 9);
    const std::vector<int32_t> sampled = DecodeAlone(prompt, 7, p);
    // Draft: the sampled chain up to depth `keep` (then a wrong token): the walk accepts `keep`
    // tokens and the bonus is sampling's next token.
    const int keep = trial % 6;
    std::vector<int32_t> chain(sampled.begin(), sampled.begin() + keep);
    chain.push_back((sampled[keep] + 7) % testing_synthetic::kVocab);
    std::vector<int32_t> draft, parents;
    ChainWithDistractors(chain, &draft, &parents);
    auto tree = engine->CreateTree(prompt);
    ASSERT_TRUE(tree.ok());
    auto r = engine->Verify(*tree, 0, draft, parents, p);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens, std::vector<int32_t>(sampled.begin(), sampled.begin() + keep + 1))
        << "trial " << trial;
    EXPECT_EQ(r->accepted.size(), static_cast<size_t>(keep));
    ASSERT_TRUE(engine->DeleteTree(*tree).ok());
  }
}

// Under a 16-token step budget: the tip's ancestors hold pending tokens (a 70-token prompt split
// by a fork), so the scheduler prefills them in chunks first; the draft (40 tokens) is larger
// than the budget and still rides, whole, as the first work of a step.
TEST(VerifyInStep, DraftBehindPendingPrefillAndLargerThanTheBudgetCompletes) {
  EngineOptions o;
  o.step_token_budget = 16;
  o.block_tokens = 4;
  std::unique_ptr<TreeEngine> engine = MakeEngine(o);
  ASSERT_NE(engine, nullptr);
  std::mt19937 rng(4);
  const std::vector<int32_t> prompt = RandomTokens(rng, 70);
  auto tree = engine->CreateTree(prompt);
  ASSERT_TRUE(tree.ok());
  auto kids = engine->Fork(*tree, 0, 50, 2);  // splits the prompt: both kids sit after token 50
  ASSERT_TRUE(kids.ok()) << kids.status();
  const std::vector<int32_t> ext = RandomTokens(rng, 3);
  ASSERT_TRUE(engine->Extend(*tree, (*kids)[0], ext).ok());
  std::vector<int32_t> seq(prompt.begin(), prompt.begin() + 50);
  seq.insert(seq.end(), ext.begin(), ext.end());
  const std::vector<int32_t> greedy = DecodeAlone(seq, 21, Greedy());
  std::vector<int32_t> draft, parents;
  ChainWithDistractors({greedy.begin(), greedy.begin() + 20}, &draft, &parents);
  const StepStats before = engine->stats();
  auto r = engine->Verify(*tree, (*kids)[0], draft, parents, Greedy());
  const StepStats after = engine->stats();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens, greedy);
  EXPECT_EQ(r->accepted.size(), 20u);
  // 50 pending prompt tokens at 16 per step, then the 3-token tip with the 40-token draft.
  EXPECT_EQ(after.steps - before.steps, 5);
  EXPECT_EQ(after.tokens_fed - before.tokens_fed, 50 + 3 + 40);
}

TEST(VerifyInStep, PoolTooSmallForTheDraftIsResourceExhaustedAndChangesNothing) {
  EngineOptions o;
  o.block_tokens = 4;
  o.kv_pool_bytes = 8 * 4 * 512;  // 8 blocks of 4 tokens (512 bytes per token)
  std::unique_ptr<TreeEngine> engine = MakeEngine(o);
  ASSERT_NE(engine, nullptr);
  ASSERT_EQ(engine->total_blocks(), 8);
  std::mt19937 rng(5);
  const std::vector<int32_t> prompt = RandomTokens(rng, 8);
  auto tree = engine->CreateTree(prompt);
  ASSERT_TRUE(tree.ok());
  std::vector<int32_t> draft = RandomTokens(rng, 40), parents;
  for (int i = 0; i < 40; ++i) parents.push_back(i - 1);
  auto r = engine->Verify(*tree, 0, draft, parents, Greedy());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  engine->WithTrees(
      [&](const TreeKvCache& c) { EXPECT_EQ((*c.GetNode(*tree, 0))->tokens, prompt); });
  // A draft that fits still verifies.
  const std::vector<int32_t> greedy = DecodeAlone(prompt, 3, Greedy());
  auto ok = engine->Verify(*tree, 0, std::vector<int32_t>{greedy[0], greedy[1]},
                           std::vector<int32_t>{-1, 0}, Greedy());
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->tokens, greedy);
}

// Verify waits for the scheduler thread, so a callback (which runs on it) gets an error instead
// of a deadlock.
TEST(VerifyInStep, VerifyFromAnEngineCallbackIsRefused) {
  std::unique_ptr<TreeEngine> engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  std::mt19937 rng(6);
  auto a = engine->CreateTree(RandomTokens(rng, 6));
  auto b = engine->CreateTree(RandomTokens(rng, 6));
  ASSERT_TRUE(a.ok() && b.ok());
  std::promise<absl::Status> from_callback;
  std::promise<void> done;
  GenerateCallbacks cb;
  std::atomic<bool> once{false};
  cb.on_token = [&](NodeId, const SampledToken&, std::string_view) {
    if (once.exchange(true)) return;
    from_callback.set_value(
        engine->Verify(*b, 0, std::vector<int32_t>{1}, std::vector<int32_t>{-1}, Greedy())
            .status());
  };
  cb.on_done = [&](const absl::Status&) { done.set_value(); };
  BranchRequest br;
  br.node = 0;
  br.params = Greedy();
  br.params.max_tokens = 2;
  ASSERT_TRUE(engine->Generate(*a, {br}, cb).ok());
  const absl::Status s = from_callback.get_future().get();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("callback"), std::string::npos) << s;
  done.get_future().wait();
}

// Holds the scheduler inside the first forward pass after Arm() until Release().
struct ForwardGate {
  std::mutex mu;
  std::condition_variable cv;
  bool armed = false, inside = false, released = false;
  void Arm() {
    std::lock_guard<std::mutex> lock(mu);
    armed = true;
  }
  void Hook() {
    std::unique_lock<std::mutex> lock(mu);
    if (!armed || inside) return;
    inside = true;
    cv.notify_all();
    cv.wait(lock, [&] { return released; });
  }
  bool WaitInside() {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(30), [&] { return inside; });
  }
  void Release() {
    std::lock_guard<std::mutex> lock(mu);
    released = true;
    cv.notify_all();
  }
};

// An engine whose scheduler stops at `gate` before its forward passes.
std::unique_ptr<TreeEngine> MakeGatedEngine(const std::shared_ptr<ForwardGate>& gate) {
  EngineOptions o;
  o.before_unlocked_forward = [gate] { gate->Hook(); };
  return MakeEngine(o);
}

template <typename T>
bool ReadyWithin(std::future<T>& f, int ms) {
  return f.wait_for(std::chrono::milliseconds(ms)) == std::future_status::ready;
}

// A generation's tokens and its end (callbacks run on the scheduler thread; read after `done`).
struct Collected {
  std::vector<int32_t> tokens;
  std::promise<absl::Status> done;
};

GenerateCallbacks CollectInto(Collected* c) {
  GenerateCallbacks cb;
  cb.on_token = [c](NodeId, const SampledToken& t, std::string_view) {
    if (t.id >= 0) c->tokens.push_back(t.id);
  };
  cb.on_done = [c](const absl::Status& s) { c->done.set_value(s); };
  return cb;
}

TEST(UnlockedForward, CallsThatCannotDisturbTheStepProceedAndTheOthersWaitForIt) {
  auto gate = std::make_shared<ForwardGate>();
  std::unique_ptr<TreeEngine> engine = MakeGatedEngine(gate);
  ASSERT_NE(engine, nullptr);
  const int64_t baseline = engine->free_blocks();
  std::mt19937 rng(7);
  const std::vector<int32_t> prompt_a = RandomTokens(rng, 9), prompt_b = RandomTokens(rng, 7),
                             prompt_c = RandomTokens(rng, 11);
  auto a = engine->CreateTree(prompt_a);
  auto b = engine->CreateTree(prompt_b);
  auto d = engine->CreateTree(prompt_b);
  ASSERT_TRUE(a.ok() && b.ok() && d.ok());

  // A's first step (its prompt) is held inside its forward pass.
  gate->Arm();
  Collected got_a, got_c;
  BranchRequest branch;
  branch.node = 0;
  branch.params = Greedy();
  branch.params.max_tokens = 5;
  ASSERT_TRUE(engine->Generate(*a, {branch}, CollectInto(&got_a)).ok());
  ASSERT_TRUE(gate->WaitInside()) << "the scheduler never reached the forward pass";

  // These complete while the forward pass is held (they would hang under the lock).
  auto create = std::async(std::launch::async, [&] { return engine->CreateTree(prompt_c); });
  // On failure the gate opens first, so that the blocked call (and the test) can end.
  if (!ReadyWithin(create, 10000)) {
    gate->Release();
    FAIL() << "CreateTree waited for the forward pass";
  }
  auto c = create.get();
  if (!c.ok()) gate->Release();
  ASSERT_TRUE(c.ok()) << c.status();
  auto generate = std::async(std::launch::async,
                             [&] { return engine->Generate(*c, {branch}, CollectInto(&got_c)); });
  if (!ReadyWithin(generate, 10000)) {
    gate->Release();
    FAIL() << "Generate waited for the forward pass";
  }
  const absl::Status started = generate.get().status();
  if (!started.ok()) gate->Release();
  ASSERT_TRUE(started.ok()) << started;
  auto reads = std::async(std::launch::async, [&] {
    engine->Cancel(12345);  // no such generation: a no-op
    int64_t nodes = 0;
    engine->WithTrees([&](const TreeKvCache& cache) { nodes = cache.ListTrees().size(); });
    return engine->stats().steps + nodes;
  });
  if (!ReadyWithin(reads, 10000)) {
    gate->Release();
    FAIL() << "reads waited for the forward pass";
  }
  EXPECT_EQ(reads.get(), 4);  // no step finished yet; trees a, b, c, d

  // These would change what the step reads or writes: they wait until the pass ends.
  auto fork = std::async(std::launch::async, [&] { return engine->Fork(*b, 0, 3, 1); });
  auto remove = std::async(std::launch::async, [&] { return engine->DeleteTree(*d); });
  EXPECT_FALSE(ReadyWithin(fork, 300)) << "Fork ran during the forward pass";
  EXPECT_FALSE(ReadyWithin(remove, 10)) << "DeleteTree ran during the forward pass";
  gate->Release();
  EXPECT_TRUE(fork.get().ok());
  EXPECT_TRUE(remove.get().ok());

  ASSERT_TRUE(got_a.done.get_future().get().ok());
  ASSERT_TRUE(got_c.done.get_future().get().ok());
  EXPECT_EQ(got_a.tokens, DecodeAlone(prompt_a, 5, Greedy()));
  EXPECT_EQ(got_c.tokens, DecodeAlone(prompt_c, 5, Greedy()));
  ASSERT_TRUE(engine->DeleteTree(*a).ok());
  ASSERT_TRUE(engine->DeleteTree(*b).ok());
  ASSERT_TRUE(engine->DeleteTree(*c).ok());
  EXPECT_EQ(engine->free_blocks(), baseline);
}

// Generate on the tip of a verification whose step is in its forward pass waits for the commit
// (the tip is not generating yet, but the verification has checked that it will not be), then
// decodes on from the committed tokens.
TEST(UnlockedForward, GenerateOnATipBeingVerifiedWaitsForTheCommit) {
  auto gate = std::make_shared<ForwardGate>();
  std::unique_ptr<TreeEngine> engine = MakeGatedEngine(gate);
  ASSERT_NE(engine, nullptr);
  std::mt19937 rng(8);
  const std::vector<int32_t> prompt = RandomTokens(rng, 10);
  const std::vector<int32_t> greedy = DecodeAlone(prompt, 7, Greedy());
  auto tree = engine->CreateTree(prompt);
  ASSERT_TRUE(tree.ok());
  gate->Arm();
  auto verify = std::async(std::launch::async, [&] {
    return engine->Verify(*tree, 0, std::vector<int32_t>{greedy[0], greedy[1], greedy[2]},
                          std::vector<int32_t>{-1, 0, 1}, Greedy());
  });
  ASSERT_TRUE(gate->WaitInside());
  Collected got;
  BranchRequest branch;
  branch.node = 0;
  branch.params = Greedy();
  branch.params.max_tokens = 3;
  auto generate = std::async(std::launch::async,
                             [&] { return engine->Generate(*tree, {branch}, CollectInto(&got)); });
  EXPECT_FALSE(ReadyWithin(generate, 300)) << "Generate started on a tip being verified";
  gate->Release();
  auto r = verify.get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens, std::vector<int32_t>(greedy.begin(), greedy.begin() + 4));
  ASSERT_TRUE(generate.get().ok());
  ASSERT_TRUE(got.done.get_future().get().ok());
  EXPECT_EQ(got.tokens, std::vector<int32_t>(greedy.begin() + 4, greedy.end()));
}

}  // namespace
}  // namespace deft
