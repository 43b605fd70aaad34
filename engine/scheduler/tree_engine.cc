#include "engine/scheduler/tree_engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "engine/scheduler/step_builder.h"

namespace deft {
namespace {

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

absl::StatusOr<std::unique_ptr<TreeEngine>> TreeEngine::Create(std::unique_ptr<LlamaModel> model,
                                                               const EngineOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("no model");
  if (options.step_token_budget < 1) {
    return absl::InvalidArgumentError("step_token_budget must be >= 1");
  }
  if (options.block_tokens < 1) return absl::InvalidArgumentError("block_tokens must be >= 1");
  const LlamaConfig& c = model->config();
  KvPoolShape shape{c.num_layers, c.num_kv_heads, c.head_dim, options.block_tokens};
  // The model's pool: host fp32 on the CPU, the step backend's own storage otherwise.
  auto pool = model->NewKvPool(shape, options.kv_pool_bytes);
  if (!pool.ok()) return pool.status();
  std::unique_ptr<TreeEngine> e(new TreeEngine(std::move(model), options, std::move(*pool)));
  e->scheduler_ = std::thread([p = e.get()] { p->SchedulerLoop(); });
  return e;
}

TreeEngine::TreeEngine(std::unique_ptr<LlamaModel> model, const EngineOptions& options,
                       std::unique_ptr<KvBlockPool> pool)
    : model_(std::move(model)),
      options_(options),
      pool_(std::move(pool)),
      cache_(std::make_unique<TreeKvCache>(pool_.get())),
      planner_([&] {
        PlannerOptions p = options.planner;
        p.mode = options.mode;
        p.bytes_per_kv_token = pool_->storage().bytes_per_token();  // what attention reads
        return p;
      }()),
      sampling_pool_(std::make_unique<ThreadPool>(options.sampling_threads)) {}

TreeEngine::~TreeEngine() {
  std::vector<Event> events;
  {
    std::unique_lock<std::mutex> lock(mu_);
    WaitForStepLocked(lock);
    stop_ = true;
    for (VerifyJob* job : verifies_) {
      FinishVerifyLocked(*job, absl::CancelledError("the engine is shutting down"));
    }
    verifies_.clear();
    for (auto& [id, g] : generations_) {
      for (auto& b : g->branches) {
        if (!b->done) FinishBranch(*g, *b, FinishReason::kCancelled, &events);
      }
    }
  }
  work_cv_.notify_all();
  if (scheduler_.joinable()) scheduler_.join();
  for (Event& e : events) e.deliver();
}

absl::StatusOr<TreeId> TreeEngine::CreateTree(std::span<const int32_t> prompt) {
  const int64_t vocab = model_->config().vocab_size;
  for (int32_t t : prompt) {
    if (t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrFormat("token id %d is outside the vocabulary [0, %d)", t, vocab));
    }
  }
  if (static_cast<int64_t>(prompt.size()) >= model_->config().context_length) {
    return absl::InvalidArgumentError(
        absl::StrFormat("the prompt has %d tokens; the model's context holds %d", prompt.size(),
                        model_->config().context_length));
  }
  std::lock_guard<std::mutex> lock(mu_);
  return cache_->CreateTree(prompt);
}

bool TreeEngine::NodeIsGenerating(TreeId tree, NodeId node) const {
  // True when an active branch's tip is `node` or lies in its subtree.
  for (const auto& [id, g] : generations_) {
    for (const auto& b : g->branches) {
      if (b->done || b->tree != tree) continue;
      auto path = cache_->Path(tree, b->node);
      if (!path.ok()) continue;
      for (const TreeNode* n : *path) {
        if (n->id == node) return true;
      }
    }
  }
  return false;
}

absl::Status TreeEngine::DeleteTree(TreeId tree) {
  absl::Status s;
  {
    std::unique_lock<std::mutex> lock(mu_);
    WaitForStepLocked(lock);
    if (!cache_->HasTree(tree)) {
      return absl::NotFoundError(absl::StrFormat("no tree %d", tree));
    }
    // Branches generating in this tree are finished (kCancelled) by the scheduler's next step,
    // on its own thread, so that their callbacks stay in order: a finish is never delivered
    // before token events the scheduler is still holding from the step before.
    s = cache_->DeleteTree(tree);
  }
  work_cv_.notify_all();
  return s;
}

absl::StatusOr<std::vector<NodeId>> TreeEngine::Fork(TreeId tree, NodeId node, int64_t offset,
                                                     int32_t count) {
  std::unique_lock<std::mutex> lock(mu_);
  WaitForStepLocked(lock);
  auto n = cache_->GetNode(tree, node);
  if (!n.ok()) return n.status();
  // Splitting a generating tip would move its pending tokens under a new parent mid-step; fork
  // at its end is fine only when it is not generating (children of a tip would make it a
  // non-leaf while tokens are being appended to it).
  if (NodeIsGenerating(tree, node) && (*n)->children.empty()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("node %d of tree %d is generating; cancel it before forking", node, tree));
  }
  return cache_->Fork(tree, node, offset, count);
}

absl::Status TreeEngine::Extend(TreeId tree, NodeId node, std::span<const int32_t> tokens) {
  const int64_t vocab = model_->config().vocab_size;
  for (int32_t t : tokens) {
    if (t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrFormat("token id %d is outside the vocabulary [0, %d)", t, vocab));
    }
  }
  std::unique_lock<std::mutex> lock(mu_);
  WaitForStepLocked(lock);
  if (NodeIsGenerating(tree, node)) {
    return absl::FailedPreconditionError(
        absl::StrFormat("node %d of tree %d is generating", node, tree));
  }
  auto n = cache_->GetNode(tree, node);
  if (!n.ok()) return n.status();
  if ((*n)->end_position() + static_cast<int64_t>(tokens.size()) >
      model_->config().context_length) {
    return absl::OutOfRangeError(
        absl::StrFormat("extending node %d to %d tokens exceeds the model's context (%d)", node,
                        (*n)->end_position() + tokens.size(), model_->config().context_length));
  }
  return cache_->Extend(tree, node, tokens);
}

absl::Status TreeEngine::Prune(TreeId tree, NodeId node) {
  std::unique_lock<std::mutex> lock(mu_);
  WaitForStepLocked(lock);
  if (NodeIsGenerating(tree, node)) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "node %d of tree %d has a generating branch in its subtree; cancel it first", node, tree));
  }
  return cache_->Prune(tree, node);
}

absl::StatusOr<int64_t> TreeEngine::Generate(TreeId tree, std::vector<BranchRequest> branches,
                                             GenerateCallbacks callbacks) {
  if (branches.empty()) return absl::InvalidArgumentError("branches: at least one is required");
  if (static_cast<int32_t>(branches.size()) > options_.max_branches_per_generate) {
    return absl::InvalidArgumentError(absl::StrFormat("branches: %d requested, at most %d per call",
                                                      branches.size(),
                                                      options_.max_branches_per_generate));
  }
  const int64_t vocab = model_->config().vocab_size;
  for (size_t i = 0; i < branches.size(); ++i) {
    absl::Status s = branches[i].params.Validate(vocab);
    if (!s.ok()) {
      return absl::InvalidArgumentError(absl::StrFormat("branches[%d]: %s", i, s.message()));
    }
  }
  auto g = std::make_unique<Generation>();
  int64_t id;
  {
    std::unique_lock<std::mutex> lock(mu_);
    // A node whose verification is in the step running now is not generating yet, but its
    // commit is coming: wait for it (other nodes need not wait for the step).
    step_cv_.wait(lock, [&] {
      for (const BranchRequest& r : branches) {
        if (inflight_verify_tips_.contains(NodeKey{tree, r.node})) return false;
      }
      return true;
    });
    absl::flat_hash_set<NodeId> seen;
    for (size_t i = 0; i < branches.size(); ++i) {
      const NodeId node = branches[i].node;
      auto n = cache_->GetNode(tree, node);
      if (!n.ok()) return n.status();
      if (!(*n)->children.empty()) {
        return absl::FailedPreconditionError(
            absl::StrFormat("branches[%d]: node %d is not a leaf", i, node));
      }
      if (!seen.insert(node).second) {
        return absl::InvalidArgumentError(
            absl::StrFormat("branches[%d]: node %d is listed twice", i, node));
      }
      if (NodeIsGenerating(tree, node)) {
        return absl::FailedPreconditionError(
            absl::StrFormat("branches[%d]: node %d is already generating", i, node));
      }
    }
    // Admission: blocks this request needs at most. n new tokens of a node take ceil(n / B)
    // fresh blocks, plus one when the node already holds blocks (its partly filled last block
    // may be shared and copied on write). Pending nodes shared by several branches (a fresh
    // prompt) count once; each branch adds its new tokens, capped by the context.
    const int32_t bt = pool_->block_tokens();
    int64_t need = 0;
    absl::flat_hash_set<NodeId> counted;
    auto blocks_for = [bt](int64_t tokens, const TreeNode& n) {
      return (tokens + bt - 1) / bt + (n.blocks.empty() ? 0 : 1);
    };
    for (const BranchRequest& r : branches) {
      auto path = cache_->Path(tree, r.node);
      for (const TreeNode* n : *path) {
        const int64_t pending = n->length() - n->num_computed;
        if (pending > 0 && counted.insert(n->id).second) need += blocks_for(pending, *n);
      }
      const TreeNode& tip = *path->back();
      const int64_t room = model_->config().context_length - tip.end_position();
      need += blocks_for(std::min<int64_t>(r.params.max_tokens, std::max<int64_t>(room, 0)), tip);
    }
    if (need > pool_->num_blocks()) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "the request needs up to %d KV blocks of %d tokens; the pool has %d in all (lower "
          "max_tokens or the number of branches)",
          need, bt, pool_->num_blocks()));
    }
    id = g->id = next_generation_++;
    g->callbacks = std::move(callbacks);
    const double now = NowSeconds();
    for (BranchRequest& r : branches) {
      auto b = std::make_unique<Branch>();
      b->generation = g->id;
      b->tree = tree;
      b->node = r.node;
      b->params = std::move(r.params);
      auto path = cache_->Path(tree, r.node);
      std::vector<int32_t> history;
      for (const TreeNode* n : *path)
        history.insert(history.end(), n->tokens.begin(), n->tokens.end());
      b->sampler = std::make_unique<Sampler>(b->params, history);
      b->detok = std::make_unique<StreamingDetokenizer>(model_->tokenizer());
      b->stops = std::make_unique<StopStringMatcher>(b->params.stop_strings);
      b->start_s = now;
      g->branches.push_back(std::move(b));
    }
    g->remaining = static_cast<int>(g->branches.size());
    generations_[g->id] = std::move(g);
  }
  work_cv_.notify_all();
  return id;  // read under the lock: another call may have taken the next id since
}

void TreeEngine::Cancel(int64_t generation) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = generations_.find(generation);
  if (it != generations_.end()) it->second->cancelled = true;
  work_cv_.notify_all();
}

void TreeEngine::WithTrees(const std::function<void(const TreeKvCache&)>& fn) const {
  std::lock_guard<std::mutex> lock(mu_);
  fn(*cache_);
}

StepStats TreeEngine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

int64_t TreeEngine::waiting_verifications() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(verifies_.size());
}

int64_t TreeEngine::free_blocks() const { return pool_->free_blocks(); }
int64_t TreeEngine::total_blocks() const { return pool_->num_blocks(); }
int64_t TreeEngine::shared_blocks() const { return pool_->shared_blocks(); }

void TreeEngine::FinishBranch(Generation& g, Branch& b, FinishReason reason,
                              std::vector<Event>* events) {
  if (b.done) return;
  b.done = true;
  --g.remaining;
  // Text held back (partial UTF-8, possible stop-string prefix) is delivered with the finish.
  if (reason != FinishReason::kStopString && reason != FinishReason::kCancelled &&
      reason != FinishReason::kDeadlineExceeded) {
    bool ignored;
    std::string tail = b.stops->Push(b.detok->Flush(), &ignored) + b.stops->Flush();
    if (!tail.empty() && g.callbacks.on_token) {
      // A text-only event: token id -1 carries the flushed text.
      events->push_back({[cb = g.callbacks.on_token, node = b.node, tail] {
        SampledToken none;
        none.id = -1;
        cb(node, none, tail);
      }});
    }
  }
  if (g.callbacks.on_finish) {
    events->push_back({[cb = g.callbacks.on_finish, node = b.node, reason, usage = b.usage] {
      cb(node, reason, usage);
    }});
  }
  if (g.remaining == 0 && g.callbacks.on_done) {
    events->push_back({[cb = g.callbacks.on_done] { cb(absl::OkStatus()); }});
  }
}

void TreeEngine::SchedulerLoop() {
  while (true) {
    std::vector<Event> events;
    bool worked;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_ || !generations_.empty() || !verifies_.empty(); });
      if (stop_) return;
      worked = RunStep(lock, &events);
      for (auto it = generations_.begin(); it != generations_.end();) {
        if (it->second->remaining == 0) {
          generations_.erase(it++);
        } else {
          ++it;
        }
      }
    }
    for (Event& e : events) e.deliver();
    if (!worked) std::this_thread::yield();
  }
}

void TreeEngine::WaitForStepLocked(std::unique_lock<std::mutex>& lock) {
  step_cv_.wait(lock, [&] { return !step_in_flight_; });
}

bool TreeEngine::RunStep(std::unique_lock<std::mutex>& lock, std::vector<Event>* events) {
  const LlamaConfig& c = model_->config();
  const int32_t bt = pool_->block_tokens();

  // 1. Cancelled generations and branches whose tree vanished.
  std::vector<Branch*> active;
  for (auto& [id, g] : generations_) {
    for (auto& b : g->branches) {
      if (b->done) continue;
      if (g->cancelled || !cache_->GetNode(b->tree, b->node).ok()) {
        FinishBranch(*g, *b, FinishReason::kCancelled, events);
        continue;
      }
      if (g->callbacks.deadline && std::chrono::steady_clock::now() >= *g->callbacks.deadline) {
        FinishBranch(*g, *b, FinishReason::kDeadlineExceeded, events);
        continue;
      }
      active.push_back(b.get());
    }
  }
  if (active.empty() && verifies_.empty()) return false;
  // Round-robin: rotate the order so a different tree's work goes first each step.
  std::stable_sort(active.begin(), active.end(),
                   [](const Branch* a, const Branch* b) { return a->tree < b->tree; });
  if (!active.empty()) {
    std::rotate(active.begin(), active.begin() + (round_robin_++ % active.size()), active.end());
  }

  // 2. What each branch needs: the first node on its path with pending tokens is fed; when the
  // whole path is computed, the branch needs logits of its path's last token.
  struct Feed {
    TreeId tree;
    NodeId node;
    int64_t count = 0;
    std::vector<int32_t> slots;
  };
  std::vector<Feed> feeds;
  absl::flat_hash_map<NodeKey, size_t> feed_index;
  struct LogitNeed {
    Branch* branch;
    NodeKey key;      // node whose last fed/computed token gives the logits
    bool query_only;  // the token's KV is stored already
  };
  std::vector<LogitNeed> needs;
  int64_t budget = options_.step_token_budget;
  // A prefill chunk of `node` (its first `count` pending tokens), shared by everything that needs
  // that node computed.
  auto add_feed = [&](TreeId tree, const TreeNode& node) {
    const NodeKey key{tree, node.id};
    auto it = feed_index.find(key);
    if (it != feed_index.end() || budget <= 0) return;
    const int64_t count = std::min(node.length() - node.num_computed, budget);
    budget -= count;
    feed_index[key] = feeds.size();
    feeds.push_back({tree, node.id, count, {}});
  };

  // Verifications first, in arrival order, one per node: a draft rides in this step when the path
  // above its tip is computed and the tip's pending tokens plus the draft fit the budget left (or
  // nothing was placed yet); otherwise the pending tokens in its way are prefilled.
  std::vector<VerifyRider> riders;
  absl::flat_hash_set<NodeKey> verify_nodes;
  for (auto it = verifies_.begin(); it != verifies_.end();) {
    VerifyJob& job = **it;
    if (!verify_nodes.insert({job.tree, job.node}).second) {
      ++it;
      continue;
    }
    if (absl::Status v = CheckVerifyTargetLocked(job); !v.ok()) {
      FinishVerifyLocked(job, v);
      it = verifies_.erase(it);
      continue;
    }
    const std::vector<const TreeNode*> path = *cache_->Path(job.tree, job.node);
    const TreeNode* blocking = nullptr;
    for (size_t i = 0; i + 1 < path.size() && blocking == nullptr; ++i) {
      if (path[i]->num_computed < path[i]->length()) blocking = path[i];
    }
    const TreeNode& tip = *path.back();
    const int64_t tip_pending = tip.length() - tip.num_computed;
    const int64_t cost = tip_pending + static_cast<int64_t>(job.draft.size());
    const bool first = budget == options_.step_token_budget;
    // The tip's pending tokens and the draft do not fit: the first verification of a step still
    // rides when the tip's tokens alone fit the budget (the draft goes over it); otherwise the
    // tip is prefilled (in chunks) and the draft rides once a query-only row of it is left.
    if (blocking == nullptr && tip_pending > 0 && cost > budget &&
        !(first && tip_pending <= budget)) {
      blocking = &tip;
    }
    if (blocking != nullptr) {
      add_feed(job.tree, *blocking);
      ++it;
      continue;
    }
    if (cost > budget && !first) {
      ++it;  // the next step has room: verifications go first, and the first one always rides
      continue;
    }
    VerifyRider rider;
    rider.job = &job;
    rider.tip_pending = tip_pending;
    if (absl::Status a = pool_->AllocateMany((job.draft.size() + bt - 1) / bt, &rider.temp_blocks);
        !a.ok()) {
      FinishVerifyLocked(job, a);
      it = verifies_.erase(it);
      continue;
    }
    budget -= cost;
    if (tip_pending > 0) {
      feed_index[{job.tree, job.node}] = feeds.size();
      feeds.push_back({job.tree, job.node, tip_pending, {}});
    }
    riders.push_back(std::move(rider));
    it = verifies_.erase(it);
  }

  // Decode tips first (one pending token each), then prefill chunks.
  for (int pass = 0; pass < 2; ++pass) {
    for (Branch* b : active) {
      auto path = cache_->Path(b->tree, b->node);
      const TreeNode* first_pending = nullptr;
      for (const TreeNode* n : *path) {
        if (n->num_computed < n->length()) {
          first_pending = n;
          break;
        }
      }
      if (first_pending == nullptr) {
        if (pass == 0) {
          const TreeNode* last = nullptr;
          for (const TreeNode* n : *path) {
            if (n->length() > 0) last = n;
          }
          needs.push_back({b, {b->tree, last->id}, true});
        }
        continue;
      }
      const int64_t pending = first_pending->length() - first_pending->num_computed;
      const bool decode = first_pending->id == b->node && pending == 1;
      if ((pass == 0) != decode) continue;
      NodeKey key{b->tree, first_pending->id};
      auto it = feed_index.find(key);
      if (it == feed_index.end()) {
        if (budget <= 0) continue;
        const int64_t count = std::min(pending, budget);
        budget -= count;
        feed_index[key] = feeds.size();
        feeds.push_back({b->tree, first_pending->id, count, {}});
        it = feed_index.find(key);
      }
      if (first_pending->id == b->node && feeds[it->second].count == pending) {
        needs.push_back({b, key, false});
      }
    }
  }

  // 3. Reserve KV slots; a node that cannot get blocks waits (or fails when nothing can run).
  std::vector<Feed> runnable;
  absl::Status exhausted;
  for (Feed& f : feeds) {
    auto slots = cache_->ReserveSlots(f.tree, f.node, f.count);
    if (!slots.ok()) {
      exhausted = slots.status();
      continue;
    }
    f.slots = std::move(*slots);
    runnable.push_back(std::move(f));
  }
  feed_index.clear();
  for (size_t i = 0; i < runnable.size(); ++i) {
    feed_index[{runnable[i].tree, runnable[i].node}] = i;
  }
  needs.erase(std::remove_if(
                  needs.begin(), needs.end(),
                  [&](const LogitNeed& n) { return !n.query_only && !feed_index.contains(n.key); }),
              needs.end());
  // A verification whose tip could not get blocks fails (as Verify always has) rather than wait.
  riders.erase(
      std::remove_if(riders.begin(), riders.end(),
                     [&](VerifyRider& r) {
                       if (r.tip_pending == 0 || feed_index.contains({r.job->tree, r.job->node})) {
                         return false;
                       }
                       for (int32_t b : r.temp_blocks) pool_->Release(b);
                       FinishVerifyLocked(*r.job, exhausted);
                       return true;
                     }),
      riders.end());
  if (runnable.empty() && needs.empty() && riders.empty()) {
    // Verifications waiting for a prefill that cannot get blocks fail too.
    if (!exhausted.ok()) {
      for (VerifyJob* job : verifies_) FinishVerifyLocked(*job, exhausted);
      verifies_.clear();
    }
    // Nothing fits in the pool: fail every active branch rather than spin.
    for (auto& [id, g] : generations_) {
      bool hit = false;
      for (auto& b : g->branches) {
        if (!b->done) {
          b->done = true;
          hit = true;
        }
      }
      if (hit) {
        g->remaining = 0;
        if (g->callbacks.on_done) {
          events->push_back({[cb = g->callbacks.on_done, s = exhausted] { cb(s); }});
        }
      }
    }
    return false;
  }

  // 4. The step: fed tokens, then the query-only rows of tips whose paths are computed.
  StepBuilder step(*cache_, bt);
  absl::flat_hash_map<NodeKey, int32_t> last_row;  // node -> row of its last fed token
  for (const Feed& f : runnable) last_row[{f.tree, f.node}] = step.Feed(f.tree, f.node, f.slots);
  std::vector<int32_t> need_rows;
  for (const LogitNeed& need : needs) {
    const int32_t row =
        need.query_only ? step.QueryOnly(need.key.tree, need.key.node) : last_row.at(need.key);
    need_rows.push_back(step.Logits(row));
  }
  // Drafts: the tip's row (its last fed token, or its path's last token as a query-only row),
  // then one segment per draft token under its parent's (each sees the path and its ancestors).
  for (VerifyRider& r : riders) {
    const VerifyJob& job = *r.job;
    const int64_t before = step.num_tokens();
    const std::vector<const TreeNode*> path = *cache_->Path(job.tree, job.node);
    int32_t tip_row;
    if (r.tip_pending > 0) {
      tip_row = last_row.at({job.tree, job.node});
    } else {
      NodeId last_nonempty = kNoNode;
      for (const TreeNode* n : path) {
        if (n->length() > 0) last_nonempty = n->id;
      }
      tip_row = step.QueryOnly(job.tree, last_nonempty);
    }
    r.tip_logits = step.Logits(tip_row);
    const int32_t tip_seg = step.SegmentOf(job.tree, job.node);
    const int64_t tip_end = path.back()->end_position();
    const size_t n = job.draft.size();
    std::vector<int32_t> seg(n);
    for (size_t i = 0; i < n; ++i) {
      const int32_t slot = r.temp_blocks[i / bt] * bt + static_cast<int32_t>(i % bt);
      const auto [s_i, row] = step.Draft(job.parents[i] < 0 ? tip_seg : seg[job.parents[i]],
                                         job.draft[i], tip_end + job.depth[i] - 1, slot);
      seg[i] = s_i;
      r.draft_logits.push_back(step.Logits(row));
    }
    r.own_tokens = r.tip_pending + (step.num_tokens() - before);
  }

  // Every draw of the step may be made by the backend next to the logits (the GPU: only the
  // tokens and alternatives come back), a penalized one with its sampler's seen tokens as
  // entries (built here, under the lock: a verification's come from its tip's path). A
  // verification has every row of its draft drawn there too: the walk reaches the tip's row at
  // draw 0 with the path as the penalties' prompt, and a draft token's row at draw depth with
  // the draft tokens from the tip down to it as the sampler's outputs, so each row has one
  // possible draw and the walk needs only the tokens.
  StepSampling sampling;
  sampling.need_logits = false;
  for (size_t i = 0; i < needs.size(); ++i) {
    const Sampler& sm = *needs[i].branch->sampler;
    const SamplingParams& sp = sm.params();
    StepSampling::Row row{need_rows[i], sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.seed,
                          static_cast<uint64_t>(sm.steps()), sp.top_logprobs};
    if (!sm.Plain()) {
      row.repetition_penalty = sp.repetition_penalty;
      row.frequency_penalty = sp.frequency_penalty;
      row.presence_penalty = sp.presence_penalty;
      row.penalty_begin = static_cast<int32_t>(sampling.penalty_ids.size());
      sm.AppendPenaltyEntries(&sampling.penalty_ids, &sampling.penalty_counts);
      row.penalty_count = static_cast<int32_t>(sampling.penalty_ids.size()) - row.penalty_begin;
    }
    sampling.rows.push_back(row);
  }
  for (VerifyRider& r : riders) {
    const VerifyJob& job = *r.job;
    const SamplingParams& sp = job.params;
    StepSampling::Row tip{r.tip_logits, sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.seed,
                          0, 0};
    const bool plain = Sampler(sp, {}).Plain();
    if (!plain) {
      std::vector<int32_t> history;
      const std::vector<const TreeNode*> path = *cache_->Path(job.tree, job.node);
      for (const TreeNode* nd : path) {
        history.insert(history.end(), nd->tokens.begin(), nd->tokens.end());
      }
      tip.repetition_penalty = sp.repetition_penalty;
      tip.frequency_penalty = sp.frequency_penalty;
      tip.presence_penalty = sp.presence_penalty;
      tip.penalty_begin = static_cast<int32_t>(sampling.penalty_ids.size());
      Sampler(sp, history).AppendPenaltyEntries(&sampling.penalty_ids, &sampling.penalty_counts);
      tip.penalty_count = static_cast<int32_t>(sampling.penalty_ids.size()) - tip.penalty_begin;
    }
    r.draws = static_cast<int32_t>(sampling.rows.size());
    sampling.rows.push_back(tip);
    // A draft row's outputs: its parent's (parents come first) plus its own token, kept as
    // sorted (token, count) lists, so a row costs its depth, not its depth squared.
    std::vector<std::vector<std::pair<int32_t, int32_t>>> outputs(
        plain ? 0 : r.draft_logits.size());
    for (size_t i = 0; i < r.draft_logits.size(); ++i) {
      StepSampling::Row row = tip;
      row.logit_row = r.draft_logits[i];
      row.step = static_cast<uint64_t>(job.depth[i]);
      if (!plain) {
        std::vector<std::pair<int32_t, int32_t>>& mine = outputs[i];
        if (job.parents[i] >= 0) mine = outputs[static_cast<size_t>(job.parents[i])];
        auto it = std::lower_bound(mine.begin(), mine.end(), std::pair(job.draft[i], 0));
        if (it != mine.end() && it->first == job.draft[i]) {
          ++it->second;
        } else {
          mine.insert(it, {job.draft[i], 1});
        }
        row.override_begin = static_cast<int32_t>(sampling.penalty_ids.size());
        row.override_count = static_cast<int32_t>(mine.size());
        for (const auto& [id, count] : mine) {
          sampling.penalty_ids.push_back(id);
          sampling.penalty_counts.push_back(count);
        }
      }
      sampling.rows.push_back(row);
    }
  }

  // 5. Plan and run.
  // The forward pass runs without the lock: the step's inputs are in `step`, its slots reserved.
  // Until it ends, operations that could move or free what it reads or writes (Fork, Extend,
  // Prune, DeleteTree, BeamSearch, Generate on a verification's tip) wait in WaitForStepLocked;
  // the rest (CreateTree, Generate, Cancel, Verify's queueing, reads) go ahead.
  step_in_flight_ = true;
  for (const VerifyRider& r : riders) inflight_verify_tips_.insert({r.job->tree, r.job->node});
  lock.unlock();
  if (options_.before_unlocked_forward) options_.before_unlocked_forward();
  std::vector<float> logits;
  absl::Status s = step.Run(planner_, &plan_, *model_, *pool_, &logits, &sampling);
  lock.lock();
  step_in_flight_ = false;
  inflight_verify_tips_.clear();
  step_cv_.notify_all();
  if (!s.ok()) {
    // A bug, not bad input: end everything that took part with the error.
    for (VerifyRider& r : riders) {
      for (int32_t b : r.temp_blocks) pool_->Release(b);
      FinishVerifyLocked(*r.job, s);
    }
    for (auto& [id, g] : generations_) {
      for (auto& b : g->branches) b->done = true;
      g->remaining = 0;
      if (g->callbacks.on_done) events->push_back({[cb = g->callbacks.on_done, s] { cb(s); }});
    }
    return false;
  }
  RecordStep(step);
  for (const Feed& f : runnable) {
    absl::Status m = cache_->MarkComputed(f.tree, f.node, f.count);
    (void)m;  // cannot fail: the slots were reserved for exactly these tokens
  }
  for (VerifyRider& r : riders) {
    ++stats_.verifications;
    if (step.num_tokens() > r.own_tokens) ++stats_.verifications_batched;
    FinishVerifyLocked(*r.job, CommitVerifyLocked(r, logits, sampling));
  }

  // 6. Sample, append, stream, finish.
  const int64_t vocab = c.vocab_size;
  const std::vector<int32_t>& eog = model_->tokenizer().end_of_generation_ids();
  const double now = NowSeconds();
  // The rows are sampled side by side (each branch has its own sampler), then handled in order.
  std::vector<SampledToken> sampled(needs.size());
  std::vector<size_t> on_host;  // needs sampled here
  for (size_t i = 0; i < needs.size(); ++i) {
    if (sampling.sampled) {  // rows [0, needs.size()) are the needs', in order
      sampled[i] = needs[i].branch->sampler->Record(sampling.tokens[i], sampling.logprobs[i]);
      sampled[i].top = std::move(sampling.top[i]);
    } else {
      on_host.push_back(i);
    }
  }
  sampling_pool_->ParallelFor(
      static_cast<int64_t>(on_host.size()), 1, [&](int, int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const size_t i = on_host[static_cast<size_t>(k)];
          std::span<const float> row(logits.data() + need_rows[i] * vocab,
                                     static_cast<size_t>(vocab));
          sampled[i] = needs[i].branch->sampler->Sample(row);
        }
      });
  for (size_t i = 0; i < needs.size(); ++i) {
    Branch& b = *needs[i].branch;
    Generation& g = *generations_.at(b.generation);
    const SampledToken& tok = sampled[i];
    if (b.usage.completion_tokens == 0) b.usage.time_to_first_token_s = now - b.start_s;
    ++b.usage.completion_tokens;
    const int32_t id = tok.id;
    (void)cache_->Extend(b.tree, b.node, {&id, 1});
    const bool stop_token =
        std::find(b.params.stop_token_ids.begin(), b.params.stop_token_ids.end(), id) !=
            b.params.stop_token_ids.end() ||
        (!b.params.ignore_eos && std::find(eog.begin(), eog.end(), id) != eog.end());
    bool stop_string = false;
    std::string piece;
    if (!stop_token) piece = b.stops->Push(b.detok->Push(id), &stop_string);
    if (g.callbacks.on_token) {
      events->push_back(
          {[cb = g.callbacks.on_token, node = b.node, tok, piece] { cb(node, tok, piece); }});
    }
    const TreeNode* tip = *cache_->GetNode(b.tree, b.node);
    if (stop_token) {
      FinishBranch(g, b, FinishReason::kStopToken, events);
    } else if (stop_string) {
      FinishBranch(g, b, FinishReason::kStopString, events);
    } else if (b.usage.completion_tokens >= b.params.max_tokens) {
      FinishBranch(g, b, FinishReason::kLength, events);
    } else if (tip->end_position() >= c.context_length) {
      FinishBranch(g, b, FinishReason::kContextFull, events);
    }
  }
  return true;
}

}  // namespace deft

namespace deft {

absl::StatusOr<VerifyResult> TreeEngine::Verify(TreeId tree, NodeId node,
                                                std::span<const int32_t> draft,
                                                std::span<const int32_t> parents,
                                                const SamplingParams& params) {
  const LlamaConfig& c = model_->config();
  const int64_t n = static_cast<int64_t>(draft.size());
  if (n == 0) return absl::InvalidArgumentError("draft_tokens: at least one token is required");
  if (n > kMaxDraftTokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("draft_tokens: %d tokens, at most %d", n, kMaxDraftTokens));
  }
  if (static_cast<int64_t>(parents.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrFormat("draft_parents has %d entries for %d draft tokens", parents.size(), n));
  }
  std::vector<int32_t> depth(static_cast<size_t>(n), 1);
  for (int64_t i = 0; i < n; ++i) {
    if (draft[i] < 0 || draft[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("draft_tokens[%d]: token id %d is outside the vocabulary [0, %d)", i,
                          draft[i], c.vocab_size));
    }
    const int32_t p = parents[i];
    if (p == i) {
      return absl::InvalidArgumentError(
          absl::StrFormat("draft_parents[%d]: a token cannot be its own parent (cycle)", i));
    }
    if (p < -1 || p >= n) {
      return absl::InvalidArgumentError(
          absl::StrFormat("draft_parents[%d] = %d is out of range [-1, %d)", i, p, n));
    }
    if (p > i) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "draft_parents[%d] = %d: a parent must come before its child (list the tree in "
          "topological order; a later parent can form a cycle)",
          i, p));
    }
    if (p >= 0) depth[i] = depth[p] + 1;
  }
  absl::Status s = params.Validate(c.vocab_size);
  if (!s.ok()) return s;

  VerifyJob job;
  job.tree = tree;
  job.node = node;
  job.draft = draft;
  job.parents = parents;
  job.depth = std::move(depth);
  job.params = params;
  std::unique_lock<std::mutex> lock(mu_);
  if (std::this_thread::get_id() == scheduler_.get_id()) {
    return absl::FailedPreconditionError(
        "Verify waits for the scheduler thread, so an engine callback cannot call it");
  }
  if (absl::Status v = CheckVerifyTargetLocked(job); !v.ok()) return v;
  if (stop_) return absl::CancelledError("the engine is shutting down");
  verifies_.push_back(&job);
  work_cv_.notify_all();
  verify_cv_.wait(lock, [&] { return job.result.has_value(); });
  return std::move(*job.result);
}

absl::Status TreeEngine::CheckVerifyTargetLocked(const VerifyJob& job) const {
  auto tip = cache_->GetNode(job.tree, job.node);
  if (!tip.ok()) return tip.status();
  if (!(*tip)->children.empty()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("node %d of tree %d is not a leaf", job.node, job.tree));
  }
  if (NodeIsGenerating(job.tree, job.node)) {
    return absl::FailedPreconditionError(
        absl::StrFormat("node %d of tree %d is generating", job.node, job.tree));
  }
  const int64_t reach =
      (*tip)->end_position() + *std::max_element(job.depth.begin(), job.depth.end()) + 1;
  if (reach > model_->config().context_length) {
    return absl::OutOfRangeError(
        absl::StrFormat("the draft would reach position %d; the model's context holds %d", reach,
                        model_->config().context_length));
  }
  return absl::OkStatus();
}

void TreeEngine::FinishVerifyLocked(VerifyJob& job, absl::StatusOr<VerifyResult> result) {
  job.result = std::move(result);
  verify_cv_.notify_all();
}

absl::StatusOr<VerifyResult> TreeEngine::CommitVerifyLocked(VerifyRider& rider,
                                                            const std::vector<float>& logits,
                                                            const StepSampling& sampling) {
  const VerifyJob& job = *rider.job;
  const int32_t bt = pool_->block_tokens();
  struct TempRelease {  // the draft's KV blocks go back to the pool however this ends
    KvBlockPool* pool;
    std::vector<int32_t>* blocks;
    ~TempRelease() {
      for (int32_t b : *blocks) pool->Release(b);
    }
  } release{pool_.get(), &rider.temp_blocks};
  auto draft_slot = [&](int64_t i) {
    return rider.temp_blocks[i / bt] * bt + static_cast<int32_t>(i % bt);
  };

  // Walk the draft tree.
  const int64_t vocab = model_->config().vocab_size;
  const int64_t n = static_cast<int64_t>(job.draft.size());
  std::vector<int32_t> history;
  const std::vector<const TreeNode*> path = *cache_->Path(job.tree, job.node);
  for (const TreeNode* nd : path)
    history.insert(history.end(), nd->tokens.begin(), nd->tokens.end());
  Sampler sampler(job.params, history);
  const bool drawn = sampling.sampled && rider.draws >= 0;
  VerifyResult result;
  int32_t row = rider.tip_logits, at = -1;
  while (true) {
    SampledToken t;
    if (drawn) {  // the backend's draw of this row: the tip's, or draft token at's
      const size_t d = static_cast<size_t>(rider.draws + 1 + at);
      t = sampler.Record(sampling.tokens[d], sampling.logprobs[d]);
    } else {
      std::span<const float> lg(logits.data() + static_cast<size_t>(row) * vocab,
                                static_cast<size_t>(vocab));
      t = sampler.Sample(lg);
    }
    result.tokens.push_back(t.id);
    result.logprobs.push_back(t.logprob);
    int32_t next = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (job.parents[i] == at && job.draft[i] == t.id) {
        next = static_cast<int32_t>(i);
        break;
      }
    }
    if (next < 0) break;
    result.accepted.push_back(next);
    at = next;
    row = rider.draft_logits[next];
  }

  // Commit: accepted tokens with their KV copied from the draft slots; the bonus stays pending.
  absl::Status s = cache_->Extend(job.tree, job.node, result.tokens);
  if (!s.ok()) return s;
  const int64_t n_acc = static_cast<int64_t>(result.accepted.size());
  if (n_acc > 0) {
    auto dst = cache_->ReserveSlots(job.tree, job.node, n_acc);
    if (dst.ok()) {
      std::vector<int32_t> src;
      for (int32_t i : result.accepted) src.push_back(draft_slot(i));
      // Through the pool's storage, so that it works wherever the KV lives.
      if (pool_->CopySlots(src, *dst).ok()) (void)cache_->MarkComputed(job.tree, job.node, n_acc);
    }
    // Without room to copy (or a failed copy), the accepted tokens simply stay pending and are
    // recomputed by a later step.
  }
  return result;
}

absl::Status TreeEngine::ComputePendingLocked(TreeId tree, NodeId node) {
  auto n = cache_->GetNode(tree, node);
  if (!n.ok()) return n.status();
  const int64_t pending = (*n)->length() - (*n)->num_computed;
  if (pending == 0) return absl::OkStatus();
  auto reserved = cache_->ReserveSlots(tree, node, pending);
  if (!reserved.ok()) return reserved.status();
  StepBuilder step(*cache_, pool_->block_tokens());
  step.Feed(tree, node, *reserved);
  std::vector<float> logits;
  absl::Status s = step.Run(planner_, &plan_, *model_, *pool_, &logits);
  if (!s.ok()) return s;
  RecordStep(step);
  return cache_->MarkComputed(tree, node, pending);
}

void TreeEngine::RecordStep(const StepBuilder& step) {
  ++stats_.steps;
  stats_.tokens_fed += step.num_tokens();
  stats_.kv_bytes_read += plan_.kv_bytes_read;
  stats_.kv_bytes_floor += plan_.kv_bytes_floor;
}

absl::StatusOr<std::vector<float>> TreeEngine::ScoreLeavesLocked(TreeId tree,
                                                                 std::span<const NodeId> nodes) {
  const int32_t bt = pool_->block_tokens();
  // Ancestors first, one node at a time (their tokens are shared by several leaves).
  for (NodeId leaf : nodes) {
    auto path = cache_->Path(tree, leaf);
    if (!path.ok()) return path.status();
    for (size_t i = 0; i + 1 < path->size(); ++i) {
      if ((*path)[i]->num_computed < (*path)[i]->length()) {
        absl::Status s = ComputePendingLocked(tree, (*path)[i]->id);
        if (!s.ok()) return s;
      }
    }
  }
  // Then every leaf in one step: its pending tokens fed (the last one's logits), or its path's
  // last token as a query-only row.
  StepBuilder step(*cache_, bt);
  std::vector<std::pair<NodeId, int64_t>> marked;
  std::vector<int32_t> rows;
  for (NodeId leaf : nodes) {
    auto path = *cache_->Path(tree, leaf);
    const TreeNode* tip = path.back();
    const int64_t pending = tip->length() - tip->num_computed;
    int32_t row;
    if (pending > 0) {
      auto r = cache_->ReserveSlots(tree, leaf, pending);
      if (!r.ok()) return r.status();
      row = step.Feed(tree, leaf, *r);
      marked.push_back({leaf, pending});
    } else {
      const TreeNode* last_nonempty = nullptr;
      for (const TreeNode* n : path) {
        if (n->length() > 0) last_nonempty = n;
      }
      row = step.QueryOnly(tree, last_nonempty->id);
    }
    rows.push_back(step.Logits(row));
  }
  std::vector<float> logits;
  absl::Status s = step.Run(planner_, &plan_, *model_, *pool_, &logits);
  if (!s.ok()) return s;
  RecordStep(step);
  for (const auto& [id, count] : marked) (void)cache_->MarkComputed(tree, id, count);
  // One row per leaf, in the order asked (Logits() numbers distinct rows in first-use order).
  const int64_t vocab = model_->config().vocab_size;
  std::vector<float> out(nodes.size() * static_cast<size_t>(vocab));
  for (size_t i = 0; i < nodes.size(); ++i) {
    std::copy_n(logits.begin() + static_cast<int64_t>(rows[i]) * vocab, vocab,
                out.begin() + static_cast<int64_t>(i) * vocab);
  }
  return out;
}

absl::StatusOr<BeamSearchResult> TreeEngine::BeamSearch(TreeId tree, NodeId node,
                                                        const BeamSearchOptions& options) {
  if (options.width < 1 || options.width > 64) {
    return absl::InvalidArgumentError(
        absl::StrFormat("width must be in [1, 64], got %d", options.width));
  }
  if (options.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("max_tokens must be >= 1, got %d", options.max_tokens));
  }
  if (!std::isfinite(options.length_penalty)) {
    return absl::InvalidArgumentError("length_penalty must be finite");
  }
  const LlamaConfig& c = model_->config();
  const int64_t vocab = c.vocab_size;
  const std::vector<int32_t>& eog = model_->tokenizer().end_of_generation_ids();
  std::unique_lock<std::mutex> lock(mu_);
  WaitForStepLocked(lock);
  auto start = cache_->GetNode(tree, node);
  if (!start.ok()) return start.status();
  if (!(*start)->children.empty()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("node %d of tree %d is not a leaf", node, tree));
  }
  if (NodeIsGenerating(tree, node)) {
    return absl::FailedPreconditionError(
        absl::StrFormat("node %d of tree %d is generating", node, tree));
  }
  using Beam = BeamSearchResult::Beam;
  auto score = [&](const Beam& b) {
    return b.logprob / std::pow(static_cast<double>(std::max<size_t>(b.tokens.size(), 1)),
                                options.length_penalty);
  };
  // Removes a dead beam's leaf and the ancestors that lead nowhere else, never `node` itself.
  auto prune_dead = [&](NodeId leaf) {
    NodeId cur = leaf;
    while (cur != node) {
      const TreeNode* n = *cache_->GetNode(tree, cur);
      const NodeId parent = n->parent;
      if (!n->children.empty()) break;
      (void)cache_->Prune(tree, cur);
      cur = parent;
    }
  };
  std::vector<Beam> live = {Beam{node, {}, 0.0, 0.0, false}};
  std::vector<Beam> finished;
  for (int32_t step = 0; step < options.max_tokens && !live.empty(); ++step) {
    std::vector<NodeId> leaves;
    for (const Beam& b : live) leaves.push_back(b.node);
    auto logits = ScoreLeavesLocked(tree, leaves);
    if (!logits.ok()) return logits.status();
    struct Cand {
      size_t beam;
      int32_t token;
      double logprob;
    };
    std::vector<Cand> cands;
    for (size_t i = 0; i < live.size(); ++i) {
      std::span<const float> row(logits->data() + i * vocab, static_cast<size_t>(vocab));
      for (const TokenLogprob& t : TopLogprobs(row, 2 * options.width)) {
        cands.push_back({i, t.id, live[i].logprob + t.logprob});
      }
    }
    std::stable_sort(cands.begin(), cands.end(),
                     [](const Cand& a, const Cand& b) { return a.logprob > b.logprob; });
    // Take the best `width` continuations; end-of-generation ones become finished hypotheses.
    std::vector<Cand> chosen;
    for (const Cand& cd : cands) {
      if (static_cast<int32_t>(chosen.size()) >= options.width) break;
      const bool eos =
          options.stop_at_eos && std::find(eog.begin(), eog.end(), cd.token) != eog.end();
      if (eos) {
        if (static_cast<int32_t>(finished.size()) < options.width) {
          Beam f = live[cd.beam];
          f.tokens.push_back(cd.token);
          f.logprob = cd.logprob;
          f.finished = true;
          f.score = score(f);
          finished.push_back(f);  // its node is the parent beam's; no tree change
        }
        continue;
      }
      chosen.push_back(cd);
    }
    // Apply to the tree: beams chosen k times fork k children, once extend in place.
    std::vector<int> times(live.size(), 0);
    for (const Cand& cd : chosen) ++times[cd.beam];
    std::vector<Beam> next;
    std::vector<std::vector<NodeId>> kids(live.size());
    for (size_t i = 0; i < live.size(); ++i) {
      if (times[i] > 1) {
        const TreeNode* n = *cache_->GetNode(tree, live[i].node);
        auto k = cache_->Fork(tree, live[i].node, n->length(), times[i]);
        if (!k.ok()) return k.status();
        kids[i] = std::move(*k);
      }
    }
    std::vector<int> used(live.size(), 0);
    for (const Cand& cd : chosen) {
      Beam b = live[cd.beam];
      b.node = times[cd.beam] > 1 ? kids[cd.beam][used[cd.beam]++] : live[cd.beam].node;
      b.tokens.push_back(cd.token);
      b.logprob = cd.logprob;
      b.score = score(b);
      absl::Status s = cache_->Extend(tree, b.node, {&cd.token, 1});
      if (!s.ok()) return s;
      next.push_back(std::move(b));
    }
    // Beams that were not continued (and were not the parent of a finished hypothesis) die.
    for (size_t i = 0; i < live.size(); ++i) {
      bool keeps = times[i] > 0;
      for (const Beam& f : finished) keeps = keeps || f.node == live[i].node;
      if (!keeps && live[i].node != node) prune_dead(live[i].node);
    }
    live = std::move(next);
    // Stop once `width` hypotheses have finished (HF's early_stopping=True).
    if (static_cast<int32_t>(finished.size()) >= options.width) break;
    const TreeNode* any = live.empty() ? nullptr : *cache_->GetNode(tree, live[0].node);
    if (any != nullptr && any->end_position() >= c.context_length) break;
  }
  BeamSearchResult result;
  result.beams = finished;
  result.beams.insert(result.beams.end(), live.begin(), live.end());
  std::stable_sort(result.beams.begin(), result.beams.end(),
                   [](const Beam& a, const Beam& b) { return a.score > b.score; });
  if (static_cast<int32_t>(result.beams.size()) > options.width) {
    for (size_t i = options.width; i < result.beams.size(); ++i) {
      const Beam& b = result.beams[i];
      if (!b.finished && b.node != node) {
        bool shared = false;
        for (size_t j = 0; j < static_cast<size_t>(options.width); ++j) {
          shared = shared || result.beams[j].node == b.node;
        }
        if (!shared) prune_dead(b.node);
      }
    }
    result.beams.resize(options.width);
  }
  return result;
}

}  // namespace deft
