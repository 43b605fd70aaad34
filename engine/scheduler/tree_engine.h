// TreeEngine: the thread-safe engine API the server calls. It owns the model, the paged KV pool,
// the trees, and a scheduler thread that runs continuous-batching steps: each step feeds every
// active branch tip of every tree its pending token, the draft tokens of waiting speculative
// verifications (Verify), plus chunks of pending prompts/extensions under a per-step token budget
// (round-robin across trees), builds one DeFT plan for all of it in the chosen attention mode,
// runs one ForwardStep, samples, and streams tokens to callbacks.
//
// Node semantics are those of TreeKvCache (engine/tree/tree_kv_cache.h): a sampled token is
// appended to its branch tip as a pending token and its KV is computed by the next step. A
// generating tip with no tokens of its own (a fresh fork) samples from the logits of the last
// token of its path, recomputed as a query-only token (its KV is already stored).
//
// Thread safety: every public method may be called from any thread. Callbacks run on the
// scheduler thread without the engine lock held; they must not block for long, and may call
// back into the engine (except Verify, which waits for the scheduler: FAILED_PRECONDITION there).
//
// The engine lock is released during a scheduler step's forward pass (its inputs are gathered
// and its KV slots reserved before). Meanwhile CreateTree, Generate (except on the tip of a
// verification in that step), Cancel, Verify's queueing and the reads proceed; Fork, Extend,
// Prune, DeleteTree and BeamSearch wait for the forward pass to end, since they could split a
// node the step writes (its MarkComputed would land on the wrong node) or free blocks it writes,
// and BeamSearch runs steps of its own on the same planner scratch. BeamSearch's own steps keep
// the lock throughout.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "engine/attention/partition_plan.h"
#include "engine/model/generate.h"
#include "engine/model/llama_model.h"
#include "engine/sampler/sampler.h"
#include "engine/scheduler/step_builder.h"
#include "engine/tree/tree_kv_cache.h"
#include "engine/util/thread_pool.h"

namespace deft {

struct EngineOptions {
  AttentionMode mode = AttentionMode::kFlatten;
  int64_t kv_pool_bytes = int64_t{512} << 20;
  int32_t block_tokens = 16;
  int32_t step_token_budget = 512;  // tokens fed per step (decode tips + prefill chunks)
  int32_t max_branches_per_generate = 256;
  // Threads that sample a step's rows side by side (0: one per core): each branch samples from
  // its own 50-128k-entry logits row (~1-3 ms on one core), so a step with many branches would
  // otherwise spend more time sampling than in its forward pass.
  int32_t sampling_threads = 0;
  PlannerOptions planner;  // mode is taken from `mode`
  // Test hook: called on the scheduler thread right before each scheduler step's forward pass,
  // with the engine lock released.
  std::function<void()> before_unlocked_forward;
};

// One branch of a Generate call.
struct BranchRequest {
  NodeId node = kNoNode;  // a leaf
  SamplingParams params;
};

struct BranchUsage {
  int64_t completion_tokens = 0;
  double time_to_first_token_s = 0;
};

// Callbacks of a Generate call; `node` tells which branch.
struct GenerateCallbacks {
  std::function<void(NodeId node, const SampledToken& token, std::string_view text)> on_token;
  std::function<void(NodeId node, FinishReason reason, const BranchUsage& usage)> on_finish;
  // Called once when every branch has finished (or the request failed: status not ok).
  std::function<void(const absl::Status& status)> on_done;
  // When set, branches still running at this time finish with kDeadlineExceeded.
  std::optional<std::chrono::steady_clock::time_point> deadline;
};

// Result of verifying a draft token tree.
struct VerifyResult {
  std::vector<int32_t> accepted;  // draft indices accepted, root first
  // The committed tokens: the accepted draft tokens, then the model's own next token (the
  // "bonus" token, which is always appended and left pending).
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;  // raw-distribution log-probability of each committed token
};

struct BeamSearchOptions {
  int32_t width = 4;           // beams kept, 1..64
  int32_t max_tokens = 32;     // new tokens per beam, >= 1
  float length_penalty = 1.f;  // score = logprob / length^length_penalty (HF convention)
  bool stop_at_eos = true;     // a beam that emits an end-of-generation token is finished
};

struct BeamSearchResult {
  struct Beam {
    NodeId node = kNoNode;        // leaf holding the beam's last tokens (others are ancestors)
    std::vector<int32_t> tokens;  // the beam's new tokens
    double logprob = 0;           // sum of the tokens' log-probabilities
    double score = 0;             // with the length penalty
    bool finished = false;        // ended with an end-of-generation token
  };
  std::vector<Beam> beams;  // best first
};

struct StepStats {
  int64_t steps = 0;
  int64_t tokens_fed = 0;
  int64_t kv_bytes_read = 0;
  int64_t kv_bytes_floor = 0;
  int64_t verifications = 0;  // Verify calls whose draft a step scored
  // Of those, the ones whose step also fed other work (another request's decode tips, prefill
  // chunks or drafts): verification riding in the batched step.
  int64_t verifications_batched = 0;
};

class TreeEngine {
 public:
  static constexpr int64_t kMaxDraftTokens = 1024;
  static absl::StatusOr<std::unique_ptr<TreeEngine>> Create(std::unique_ptr<LlamaModel> model,
                                                            const EngineOptions& options);
  ~TreeEngine();  // stops the scheduler; pending generations end with CANCELLED

  absl::StatusOr<TreeId> CreateTree(std::span<const int32_t> prompt);
  absl::Status DeleteTree(TreeId tree);
  absl::StatusOr<std::vector<NodeId>> Fork(TreeId tree, NodeId node, int64_t offset, int32_t count);
  absl::Status Extend(TreeId tree, NodeId node, std::span<const int32_t> tokens);
  // FAILED_PRECONDITION while a generation runs in the subtree.
  absl::Status Prune(TreeId tree, NodeId node);

  // Starts generating on the given leaves; returns an id for Cancel. Errors up front:
  // INVALID_ARGUMENT (no branches, too many, bad params, a node twice), NOT_FOUND,
  // FAILED_PRECONDITION (not a leaf, already generating), RESOURCE_EXHAUSTED when the request
  // could never fit in the KV pool (pending tokens + max_tokens of every branch, capped by the
  // context). A request that fits the pool but not its free blocks now waits; if no work at all
  // can proceed for lack of blocks, the waiting generations end with RESOURCE_EXHAUSTED.
  absl::StatusOr<int64_t> Generate(TreeId tree, std::vector<BranchRequest> branches,
                                   GenerateCallbacks callbacks);
  // Stops a generation: its branches finish with kCancelled. No-op for an unknown id.
  void Cancel(int64_t generation);

  // Speculative verification of a draft token tree under leaf `node`: draft token i is
  // `tokens[i]`, its parent `parents[i]` (-1: the node itself; otherwise an earlier index). All
  // draft tokens are scored in one tree-attention step (each sees the path and its own draft
  // ancestors). Acceptance walks down from the node: greedy (params.temperature == 0) takes the
  // model's argmax, otherwise a token is sampled with `params` (exactly the target distribution);
  // when a child carries that token it is accepted and the walk continues from it, otherwise the
  // token is the bonus and the walk ends. The accepted tokens (their KV kept from the
  // verification step) and the bonus (pending) are appended to `node`.
  // Synchronous for the caller; the draft is scored by the scheduler, in the same batched step as
  // other trees' decode tips and prefill chunks (verifications go first in a step, so they are
  // never starved; the tip's pending tokens and the whole draft ride in one step, the draft over
  // the token budget when it is the step's first work). Pending tokens above the tip are
  // prefilled first, in chunks, like a prompt; so are the tip's own when they exceed the budget
  // (then its last token is recomputed as a query-only row beside the draft). The node is
  // checked when the call arrives and again when its step is built (the call takes effect
  // there: a Fork, Extend, Generate or Prune of the node in between is ordered before it).
  // Verifications of one node are served one per step, in arrival order.
  // Errors: INVALID_ARGUMENT naming the bad draft index (parent out of range, a parent that does
  // not come before its child, a token outside the vocabulary), NOT_FOUND, FAILED_PRECONDITION
  // (not a leaf, generating, called from an engine callback), OUT_OF_RANGE (past the context),
  // RESOURCE_EXHAUSTED (pool), CANCELLED (the engine is being destroyed).
  absl::StatusOr<VerifyResult> Verify(TreeId tree, NodeId node, std::span<const int32_t> tokens,
                                      std::span<const int32_t> parents,
                                      const SamplingParams& params);

  // Beam search from leaf `node`, built on fork/extend/prune: every step scores all live beams in
  // one batched step, keeps the `width` best (beam, token) extensions (a beam chosen k > 1 times
  // forks k children; chosen once, it is extended in place), and prunes beams that fell out (and
  // ancestors left with no descendants, down to `node`). The surviving beams stay in the tree.
  // Runs synchronously. Errors as Generate, plus INVALID_ARGUMENT for width/max_tokens.
  absl::StatusOr<BeamSearchResult> BeamSearch(TreeId tree, NodeId node,
                                              const BeamSearchOptions& options);

  // Runs `fn` with the engine locked, for consistent reads of the trees.
  void WithTrees(const std::function<void(const TreeKvCache&)>& fn) const;

  LlamaModel& model() { return *model_; }
  const EngineOptions& options() const { return options_; }
  StepStats stats() const;
  // Verify calls waiting for a step (queued, not yet scored).
  int64_t waiting_verifications() const;
  int64_t free_blocks() const;
  int64_t total_blocks() const;
  int64_t shared_blocks() const;  // blocks referenced more than once

 private:
  struct Branch {
    int64_t generation = 0;
    TreeId tree = 0;
    NodeId node = kNoNode;
    SamplingParams params;
    std::unique_ptr<Sampler> sampler;
    std::unique_ptr<StreamingDetokenizer> detok;
    std::unique_ptr<StopStringMatcher> stops;
    BranchUsage usage;
    double start_s = 0;
    bool done = false;
  };
  struct Generation {
    int64_t id = 0;
    std::vector<std::unique_ptr<Branch>> branches;
    GenerateCallbacks callbacks;
    int remaining = 0;
    bool cancelled = false;
  };
  // Events produced under the lock, delivered after it is released.
  struct Event {
    std::function<void()> deliver;
  };
  // A Verify call waiting for the scheduler (owned by the calling thread, which waits on
  // verify_cv_ until `result` is set).
  struct VerifyJob {
    TreeId tree = 0;
    NodeId node = kNoNode;
    std::span<const int32_t> draft, parents;
    std::vector<int32_t> depth;  // 1 for children of the node
    SamplingParams params;
    std::optional<absl::StatusOr<VerifyResult>> result;
  };
  // A VerifyJob taking part in the step being built: its draft's temporary KV blocks, whether the
  // tip's pending tokens are fed in the step, and the logits index of the tip and of each draft
  // token.
  struct VerifyRider {
    VerifyJob* job = nullptr;
    std::vector<int32_t> temp_blocks;
    int64_t tip_pending = 0;
    int32_t tip_logits = -1;
    std::vector<int32_t> draft_logits;
    int64_t own_tokens = 0;  // tokens of the step that belong to this verification
    // Where the backend drew the walk's tokens: StepSampling row of the tip's draw, then one per
    // draft token (its row's draw, at the step and with the outputs the walk reaches it with);
    // the walk samples the logits on the host when the backend did not draw.
    int32_t draws = -1;
  };

  TreeEngine(std::unique_ptr<LlamaModel> model, const EngineOptions& options,
             std::unique_ptr<KvBlockPool> pool);
  void SchedulerLoop();
  // Builds and runs one step; returns false when there was nothing to do.
  // REQUIRES: `lock` holds mu_; it is released during the step's forward pass.
  bool RunStep(std::unique_lock<std::mutex>& lock, std::vector<Event>* events);
  // Waits until no scheduler step is in its forward pass. REQUIRES: `lock` holds mu_.
  void WaitForStepLocked(std::unique_lock<std::mutex>& lock);
  void FinishBranch(Generation& g, Branch& b, FinishReason reason, std::vector<Event>* events);
  // The node checks of Verify (NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE). REQUIRES: mu_ held.
  absl::Status CheckVerifyTargetLocked(const VerifyJob& job) const;
  // Walks the draft over the step's logits (or the backend's draws of every row, `sampling`)
  // and commits the result to the tree; releases the rider's temporary blocks. REQUIRES: mu_
  // held.
  absl::StatusOr<VerifyResult> CommitVerifyLocked(VerifyRider& rider,
                                                  const std::vector<float>& logits,
                                                  const StepSampling& sampling);
  void FinishVerifyLocked(VerifyJob& job, absl::StatusOr<VerifyResult> result);
  bool NodeIsGenerating(TreeId tree, NodeId node) const;
  // Computes every pending token of `node` in one step (its ancestors must be computed).
  // REQUIRES: mu_ held.
  absl::Status ComputePendingLocked(TreeId tree, NodeId node);
  // Logits of the token after each of the distinct leaves `nodes` ([nodes.size(), vocab]),
  // computing their pending tokens (and their ancestors') first. REQUIRES: mu_ held.
  absl::StatusOr<std::vector<float>> ScoreLeavesLocked(TreeId tree, std::span<const NodeId> nodes);
  // Counts a step that ran (stats_, from plan_). REQUIRES: mu_ held.
  void RecordStep(const StepBuilder& step);

  std::unique_ptr<LlamaModel> model_;
  EngineOptions options_;
  std::unique_ptr<KvBlockPool> pool_;
  std::unique_ptr<TreeKvCache> cache_;
  PartitionPlanner planner_;
  std::unique_ptr<ThreadPool> sampling_pool_;  // the scheduler thread's; see sampling_threads
  PartitionPlan plan_;

  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  bool stop_ = false;
  int64_t next_generation_ = 1;
  absl::flat_hash_map<int64_t, std::unique_ptr<Generation>> generations_;
  std::deque<VerifyJob*> verifies_;  // waiting, in arrival order
  // A scheduler step is in its forward pass (mu_ released); step_cv_ signals its end.
  bool step_in_flight_ = false;
  absl::flat_hash_set<NodeKey> inflight_verify_tips_;  // tips of the verifications in it
  std::condition_variable step_cv_;
  std::condition_variable verify_cv_;
  size_t round_robin_ = 0;  // rotates which tree's prefill goes first
  StepStats stats_;
  std::thread scheduler_;
};

}  // namespace deft
