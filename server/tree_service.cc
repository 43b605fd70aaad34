#include "server/tree_service.h"

#include <chrono>
#include <deque>
#include <mutex>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace deft::server {
namespace {

namespace pb = deft::v1;

// The caller's engine tree and the ready engine.
struct Resolved {
  ServingState::Call ready;
  TreeId tree = 0;
};

absl::StatusOr<Resolved> Resolve(ServingState& state, const grpc::CallbackServerContext& context,
                                 const std::string& method, const std::string& tree_id) {
  auto ready = state.Begin(context, method);
  if (!ready.ok()) return ready.status();
  auto tree = state.registry().Find(tree_id, ready->owner);
  if (!tree.ok()) return tree.status();
  return Resolved{std::move(*ready), *tree};
}

// A copy of the node, or NOT_FOUND naming the public tree id.
absl::StatusOr<TreeNode> GetNode(const TreeEngine& engine, TreeId tree, const std::string& tree_id,
                                 NodeId node) {
  absl::StatusOr<TreeNode> out =
      absl::NotFoundError(absl::StrFormat("tree \"%s\" has no node %d", tree_id, node));
  engine.WithTrees([&](const TreeKvCache& cache) {
    auto n = cache.GetNode(tree, node);
    if (n.ok()) out = **n;
  });
  return out;
}

absl::Status ToAbsl(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// The usage charged to the caller's key (server/quota.h), with `what_if` targets.
QuotaUsage UsageOf(ServingState& state, const ServingState::Call& call,
                   const absl::flat_hash_map<std::pair<TreeId, NodeId>, int64_t>& what_if = {}) {
  std::vector<TreeId> trees;
  for (const auto& [id, tree] : state.registry().List(call.owner)) trees.push_back(tree);
  return state.quotas().Usage(*call.engine, call.owner, trees, what_if);
}

// OK when the caller's key can take `add` more nodes and KV blocks on top of `now`;
// RESOURCE_EXHAUSTED naming the quota otherwise.
absl::Status CheckUsage(const ServingState::Call& call, const QuotaUsage& now,
                        const QuotaUsage& add) {
  if (!call.has_usage_quota()) return absl::OkStatus();
  grpc::Status s = ApiKeys::CheckNodeQuota(*call.key, now.nodes, add.nodes);
  if (s.ok()) s = ApiKeys::CheckKvBlockQuota(*call.key, now.kv_blocks, add.kv_blocks);
  return ToAbsl(s);
}

// Holds the caller's quota lock (check-and-act) when its key has a nodes or kv_blocks quota.
std::unique_lock<std::mutex> LockQuota(ServingState& state, const ServingState::Call& call) {
  if (!call.has_usage_quota()) return {};
  return state.quotas().LockOwner(call.owner);
}

// A usage reservation for a running Verify or BeamSearch: checked and held under the owner's
// lock, given back when it goes out of scope.
class QuotaReservation {
 public:
  QuotaReservation(ServingState& state, const ServingState::Call& call, QuotaUsage usage)
      : state_(state), owner_(call.owner), usage_(usage) {
    if (!call.has_usage_quota()) return;
    auto lock = state.quotas().LockOwner(owner_);
    status_ = CheckUsage(call, UsageOf(state, call), usage);
    if (!status_.ok()) return;
    state.quotas().Reserve(owner_, usage_);
    held_ = true;
  }
  ~QuotaReservation() {
    if (held_) state_.quotas().Unreserve(owner_, usage_);
  }
  const absl::Status& status() const { return status_; }

 private:
  ServingState& state_;
  std::string owner_;
  QuotaUsage usage_;
  absl::Status status_;
  bool held_ = false;
};

// Lowers the branches' max_tokens to what the caller's kv_blocks quota leaves them (quota.h) and
// charges each branch at its cap (the ledger's targets; the caller clears them). Returns the
// nodes whose cap is below what they asked for, or RESOURCE_EXHAUSTED when some branch cannot
// get its first token. REQUIRES: the owner's quota lock held.
absl::StatusOr<absl::flat_hash_set<NodeId>> CapToKvQuota(ServingState& state,
                                                         const ServingState::Call& call,
                                                         TreeId tree,
                                                         std::vector<BranchRequest>& branches) {
  std::vector<TreeNode> nodes;
  BlockCounts counts;
  call.engine->WithTrees([&](const TreeKvCache& cache) {
    counts = CountBlocks(cache, tree);
    for (const BranchRequest& b : branches) {
      auto n = cache.GetNode(tree, b.node);
      if (n.ok()) nodes.push_back(**n);
    }
  });
  absl::flat_hash_set<NodeId> capped;
  if (nodes.size() != branches.size()) return capped;  // pruned meanwhile: the engine says so
  const int32_t block_tokens = call.engine->options().block_tokens;
  const QuotaUsage now = UsageOf(state, call);
  std::vector<int32_t> max_tokens;
  for (const BranchRequest& b : branches) max_tokens.push_back(b.params.max_tokens);
  const std::vector<int32_t> caps = GrantTokens(
      nodes, max_tokens, counts, *call.key->max_kv_blocks - now.kv_blocks, block_tokens);
  if (caps.empty()) {
    int64_t first = 0;
    for (const TreeNode& n : nodes) {
      first += BlocksToAllocate(n, n.length() + 1, counts, block_tokens) -
               BlocksToAllocate(n, n.length(), counts, block_tokens);
    }
    return ToAbsl(ApiKeys::CheckKvBlockQuota(*call.key, now.kv_blocks, first));
  }
  for (size_t i = 0; i < branches.size(); ++i) {
    if (caps[i] < branches[i].params.max_tokens) capped.insert(branches[i].node);
    branches[i].params.max_tokens = caps[i];
    state.quotas().SetTarget(tree, nodes[i].id, nodes[i].length() + caps[i]);
  }
  return capped;
}

// Text of `tokens` as valid UTF-8.
std::string TextOf(const TreeEngine& engine, std::span<const int32_t> tokens) {
  return RepairUtf8(const_cast<TreeEngine&>(engine).model().tokenizer().Decode(tokens, false));
}

pb::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return pb::FINISH_REASON_LENGTH;
    case FinishReason::kStopToken:
      return pb::FINISH_REASON_STOP_TOKEN;
    case FinishReason::kStopString:
      return pb::FINISH_REASON_STOP_STRING;
    case FinishReason::kContextFull:
      return pb::FINISH_REASON_CONTEXT_FULL;
    case FinishReason::kCancelled:
      return pb::FINISH_REASON_CANCELLED;
    case FinishReason::kDeadlineExceeded:
      return pb::FINISH_REASON_DEADLINE_EXCEEDED;
  }
  return pb::FINISH_REASON_UNSPECIFIED;
}

// Tokens of a prompt or an extension given as text or ids.
absl::StatusOr<std::vector<int32_t>> TokensOfText(const TreeEngine& engine,
                                                  const std::string& field, const std::string& text,
                                                  bool add_bos) {
  absl::Status u = CheckUtf8(field, text);
  if (!u.ok()) return u;
  const Tokenizer& tok = const_cast<TreeEngine&>(engine).model().tokenizer();
  return tok.Encode(text, add_bos && tok.add_bos_by_default(), /*parse_special=*/true);
}

// The Generate stream. The reactor is a thin shell; the state the engine's callbacks touch lives
// in Core, which they co-own, so a callback finishing after the reactor is gone is harmless:
// Core calls into the reactor only until it has called Finish, and gRPC deletes the reactor only
// after that (OnDone).
class GenerateStream final : public grpc::ServerWriteReactor<pb::GenerateEvent> {
 public:
  // Start runs on `work` (it waits for the engine's lock); the call's context and request stay
  // valid until it finishes, which cannot happen before Start has.
  GenerateStream(std::shared_ptr<ServingState> state, WorkQueue& work, EventWriter& writer,
                 grpc::CallbackServerContext* context, const pb::GenerateRequest* request)
      : core_(std::make_shared<Core>()) {
    core_->reactor = this;
    core_->state = std::move(state);
    core_->writer = &writer;
    work.Post([core = core_, context, request] { Start(core, *context, *request); });
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(core_->mu);
    core_->writing = false;
    if (!ok) core_->BreakLocked();
    core_->PumpLocked();
  }
  void OnCancel() override {
    std::lock_guard<std::mutex> lock(core_->mu);
    // gRPC cancels the call when its deadline passes, too: tell the two apart. The client gives
    // up at its own deadline and resets the stream, which can reach us before our timer for the
    // same deadline fires (ours starts when the request arrives, and a busy machine delays it):
    // a cancel that close to the deadline is the deadline passing.
    constexpr auto kDeadlineSlack = std::chrono::milliseconds(250);
    if (std::chrono::system_clock::now() + kDeadlineSlack >= core_->call_deadline) {
      core_->deadline_exceeded = true;
    } else {
      core_->client_cancelled = true;
    }
    core_->BreakLocked();
    core_->PumpLocked();
  }
  void OnDone() override { delete this; }

 private:
  struct Core {
    std::mutex mu;
    GenerateStream* reactor = nullptr;  // null once Finish was called
    std::shared_ptr<ServingState> state;
    // Where events queued by the engine's callbacks are written from (see PushLocked).
    EventWriter* writer = nullptr;
    bool pump_posted = false;  // a PumpLocked is queued on `writer`
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    std::chrono::system_clock::time_point call_deadline =
        std::chrono::system_clock::time_point::max();
    // Weak: the engine's callbacks own this Core, and the engine must not own itself (its last
    // reference dropped on its own scheduler thread). It outlives every reactor (DeftServer).
    std::weak_ptr<TreeEngine> engine;
    std::string tree_id;
    TreeId tree = 0;
    int64_t generation = -1;  // -1 until Generate returned
    std::deque<pb::GenerateEvent> queue;
    pb::GenerateEvent current;  // the event being written
    bool writing = false;
    bool broken = false;  // the client is gone: drop events, cancel the engine
    bool client_cancelled = false;
    bool deadline_exceeded = false;
    bool engine_done = false;
    absl::Status engine_status;
    absl::flat_hash_map<NodeId, int64_t> prompt_tokens;  // per branch; written before Generate
    // Branches capped below their max_tokens by the kv_blocks quota; written before Generate.
    absl::flat_hash_set<NodeId> kv_capped;
    bool quota_targets = false;  // the branches are charged at their caps (QuotaLedger targets)

    void BreakLocked() {
      if (broken) return;
      broken = true;
      queue.clear();
      if (generation < 0 || engine_done) return;
      if (auto e = engine.lock()) e->Cancel(generation);
    }
    // Called on the engine's scheduler thread with the event of a token (or a finish). The gRPC
    // write path costs tens of microseconds per message (bench/RESULTS.md, server_load), so
    // only the first event of a step's burst is written here (at most one inline write per
    // EventWriter::kInlineGap: lowest latency for a lone stream, little engine time); the rest
    // go to the writer thread and the engine starts its next step. While a write is in flight,
    // OnWriteDone takes the next event.
    void PushLocked(pb::GenerateEvent event, const std::shared_ptr<Core>& self) {
      if (reactor == nullptr || broken) return;
      queue.push_back(std::move(event));
      if (writing || pump_posted) return;
      if (writer->TakeInlineWrite()) return PumpLocked();
      pump_posted = true;
      writer->queue.Post([self] {
        std::lock_guard<std::mutex> lock(self->mu);
        self->pump_posted = false;
        self->PumpLocked();
      });
    }
    // Writes the next event, or finishes once the engine is done and the queue is drained.
    void PumpLocked() {
      if (reactor == nullptr || writing) return;
      if (!queue.empty() && !broken) {
        current = std::move(queue.front());
        queue.pop_front();
        writing = true;
        reactor->StartWrite(&current);
        return;
      }
      if (!engine_done) return;
      grpc::Status status = ToGrpcStatus(engine_status);
      if (engine_status.ok() && client_cancelled) {
        status = grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the stream");
      } else if (engine_status.ok() && deadline_exceeded) {
        status = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                              "the call's deadline passed before generation finished");
      }
      state->RecordRequest("Generate", status.error_code());
      if (state->metrics() != nullptr) {
        state->metrics()->RecordRequestDuration(
            "Generate",
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
      GenerateStream* r = reactor;
      reactor = nullptr;
      r->Finish(status);
    }
  };

  // Not members' work: the reactor may be gone once the stream has finished; `core` is not.
  static void FinishNow(const std::shared_ptr<Core>& core, const absl::Status& s) {
    std::lock_guard<std::mutex> lock(core->mu);
    core->engine_done = true;
    core->engine_status = s;
    core->PumpLocked();
  }

  static void Start(const std::shared_ptr<Core>& core_ref,
                    const grpc::CallbackServerContext& context,
                    const pb::GenerateRequest& request) {
    Core& c = *core_ref;
    auto resolved = Resolve(*c.state, context, "Generate", request.tree_id());
    if (!resolved.ok()) return FinishNow(core_ref, resolved.status());
    auto branches = ToBranches(request, resolved->ready.limits);
    if (!branches.ok()) return FinishNow(core_ref, branches.status());
    std::shared_ptr<TreeEngine> engine = resolved->ready.engine;
    c.engine = engine;
    c.tree = resolved->tree;
    c.tree_id = request.tree_id();
    for (size_t i = 0; i < branches->size(); ++i) {
      auto n = GetNode(*engine, c.tree, c.tree_id, (*branches)[i].node);
      if (!n.ok()) {
        return FinishNow(core_ref, absl::NotFoundError(absl::StrCat(
                                       "branches[", i, "].node_id: ", n.status().message())));
      }
      c.prompt_tokens[n->id] = n->end_position();
    }
    // Under the key's kv_blocks quota the branches run with the caps its free blocks allow.
    std::unique_lock<std::mutex> quota_lock;
    const ServingState::Call& call = resolved->ready;
    if (call.has_usage_quota() && call.key->max_kv_blocks.has_value()) {
      quota_lock = LockQuota(*c.state, call);
      auto capped = CapToKvQuota(*c.state, call, c.tree, *branches);
      if (!capped.ok()) return FinishNow(core_ref, capped.status());
      c.kv_capped = std::move(*capped);
      c.quota_targets = true;
    }

    GenerateCallbacks cb;
    std::shared_ptr<Core> core = core_ref;
    const Tokenizer* tok = &engine->model().tokenizer();
    cb.on_token = [core, tok](NodeId node, const SampledToken& t, std::string_view text) {
      if (const TokenObserver& observe = core->state->token_observer()) observe(core->tree, node);
      pb::GenerateEvent e;
      pb::TokenEvent* te = e.mutable_token();
      te->set_node_id(node);
      te->set_token_id(t.id);
      te->set_text(RepairUtf8(text));
      te->set_logprob(t.logprob);
      for (const TokenLogprob& alt : t.top) {
        pb::TokenLogprob* a = te->add_top_logprobs();
        a->set_token_id(alt.id);
        a->set_logprob(alt.logprob);
        a->set_text(RepairUtf8(tok->TokenBytes(alt.id)));
      }
      std::lock_guard<std::mutex> lock(core->mu);
      core->PushLocked(std::move(e), core);
    };
    cb.on_finish = [core](NodeId node, FinishReason reason, const BranchUsage& usage) {
      core->state->SetGenerating(core->tree, node, false);
      if (core->quota_targets) core->state->quotas().ClearTarget(core->tree, node);
      if (ServerMetrics* m = core->state->metrics()) {
        m->AddActiveBranches(-1);
        m->AddGeneratedTokens(usage.completion_tokens);
        if (usage.completion_tokens > 0) m->RecordTimeToFirstToken(usage.time_to_first_token_s);
      }
      pb::GenerateEvent e;
      pb::FinishEvent* fe = e.mutable_finish();
      fe->set_node_id(node);
      fe->set_reason(reason == FinishReason::kLength && core->kv_capped.contains(node)
                         ? pb::FINISH_REASON_KV_QUOTA
                         : ToProto(reason));
      auto pt = core->prompt_tokens.find(node);
      if (pt != core->prompt_tokens.end()) {
        fe->mutable_usage()->set_prompt_tokens(static_cast<int32_t>(pt->second));
      }
      fe->mutable_usage()->set_completion_tokens(static_cast<int32_t>(usage.completion_tokens));
      fe->mutable_usage()->set_time_to_first_token_seconds(usage.time_to_first_token_s);
      std::lock_guard<std::mutex> lock(core->mu);
      if (reason == FinishReason::kDeadlineExceeded) core->deadline_exceeded = true;
      core->PushLocked(std::move(e), core);
    };
    cb.on_done = [core](const absl::Status& s) {
      core->state->registry().Release(core->tree_id);
      std::lock_guard<std::mutex> lock(core->mu);
      core->engine_done = true;
      core->engine_status = s;
      core->PumpLocked();
    };
    // The call's deadline (system clock) as a steady-clock time point for the engine.
    const auto deadline = context.deadline();
    c.call_deadline = deadline;
    if (deadline != std::chrono::system_clock::time_point::max()) {
      cb.deadline = std::chrono::steady_clock::now() +
                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                        deadline - std::chrono::system_clock::now());
    }
    for (const BranchRequest& b : *branches) c.state->SetGenerating(c.tree, b.node, true);
    c.state->registry().Acquire(c.tree_id);
    const int64_t num_branches = static_cast<int64_t>(branches->size());
    if (ServerMetrics* m = c.state->metrics()) m->AddActiveBranches(num_branches);
    auto generation = engine->Generate(c.tree, std::move(*branches), std::move(cb));
    if (!generation.ok()) {
      for (const pb::Branch& b : request.branches()) {
        c.state->SetGenerating(c.tree, b.node_id(), false);
        if (c.quota_targets) c.state->quotas().ClearTarget(c.tree, b.node_id());
      }
      c.state->registry().Release(c.tree_id);
      if (ServerMetrics* m = c.state->metrics()) m->AddActiveBranches(-num_branches);
      return FinishNow(core_ref, generation.status());
    }
    std::lock_guard<std::mutex> lock(c.mu);
    c.generation = *generation;
    if (c.broken && !c.engine_done) engine->Cancel(c.generation);
  }

  std::shared_ptr<Core> core_;
};

// Verify's work, off gRPC's callback threads (it runs the model for a while).
absl::Status VerifyNow(ServingState& state, const grpc::CallbackServerContext& context,
                       const pb::VerifyRequest* request, pb::VerifyResponse* response) {
  auto r = Resolve(state, context, "Verify", request->tree_id());
  if (!r.ok()) return r.status();
  TreeEngine& engine = *r->ready.engine;
  absl::Status s = CheckDraft(*request, r->ready.limits);
  if (!s.ok()) return s;
  auto params = ToSamplingParams(request->sampling(), "sampling", r->ready.limits, false);
  if (!params.ok()) return params.status();
  auto node = GetNode(engine, r->tree, request->tree_id(), request->node_id());
  if (!node.ok()) return node.status();
  std::vector<int32_t> tokens(request->draft_tokens().begin(), request->draft_tokens().end());
  std::vector<int32_t> parents(request->draft_parents().begin(), request->draft_parents().end());
  // Worst case: every draft token stored, the bonus token, a block boundary and a copy-on-write.
  const int64_t draft_blocks =
      BlocksFor(0, static_cast<int64_t>(tokens.size()) + 1, engine.options().block_tokens) + 2;
  QuotaReservation reservation(state, r->ready, QuotaUsage{0, draft_blocks});
  if (!reservation.status().ok()) return reservation.status();
  state.registry().Acquire(request->tree_id());
  auto v = engine.Verify(r->tree, request->node_id(), tokens, parents, *params);
  state.registry().Release(request->tree_id());
  if (!v.ok()) return v.status();
  for (int32_t i : v->accepted) response->add_accepted_indices(i);
  for (int32_t t : v->tokens) response->add_tokens(t);
  for (float l : v->logprobs) response->add_logprobs(l);
  response->set_text(TextOf(engine, v->tokens));
  return absl::OkStatus();
}

// BeamSearch's work, off gRPC's callback threads (it runs the model for a while).
absl::Status BeamSearchNow(ServingState& state, const grpc::CallbackServerContext& context,
                           const pb::BeamSearchRequest* request, pb::BeamSearchResponse* response) {
  auto r = Resolve(state, context, "BeamSearch", request->tree_id());
  if (!r.ok()) return r.status();
  TreeEngine& engine = *r->ready.engine;
  absl::Status s = CheckBeamSearch(*request, r->ready.limits);
  if (!s.ok()) return s;
  auto node = GetNode(engine, r->tree, request->tree_id(), request->node_id());
  if (!node.ok()) return node.status();
  BeamSearchOptions options;
  options.width = request->width();
  options.max_tokens = request->max_tokens();
  options.length_penalty = request->has_length_penalty() ? request->length_penalty() : 1.f;
  options.stop_at_eos = !request->has_stop_at_eos() || request->stop_at_eos();
  // Worst case: at most `width` new nodes per step, each token in a block of its own, plus a
  // copy-on-write per beam.
  const int64_t new_nodes = int64_t{options.width} * options.max_tokens;
  QuotaReservation reservation(state, r->ready, QuotaUsage{new_nodes, new_nodes + options.width});
  if (!reservation.status().ok()) return reservation.status();
  state.registry().Acquire(request->tree_id());
  auto result = engine.BeamSearch(r->tree, request->node_id(), options);
  state.registry().Release(request->tree_id());
  if (!result.ok()) return result.status();
  for (const BeamSearchResult::Beam& b : result->beams) {
    pb::Beam* out = response->add_beams();
    out->set_node_id(b.node);
    for (int32_t t : b.tokens) out->add_tokens(t);
    out->set_text(TextOf(engine, b.tokens));
    out->set_logprob(b.logprob);
    out->set_score(b.score);
    out->set_finished(b.finished);
  }
  return absl::OkStatus();
}

}  // namespace

grpc::ServerUnaryReactor* TreeServiceImpl::Deferred(grpc::CallbackServerContext* context,
                                                    const char* method,
                                                    std::function<absl::Status()> work) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // The state outlives work_ (declared before it), so a raw pointer is safe here.
  work_.Post([state = state_.get(), method, reactor, work = std::move(work)] {
    grpc::Status status = ToGrpcStatus(work());
    state->RecordRequest(method, status.error_code());
    reactor->Finish(status);
  });
  return reactor;
}

grpc::ServerUnaryReactor* TreeServiceImpl::CreateTree(grpc::CallbackServerContext* context,
                                                      const pb::CreateTreeRequest* request,
                                                      pb::CreateTreeResponse* response) {
  return Deferred(context, "CreateTree", [=, this]() -> absl::Status {
    auto ready = state_->Begin(*context, "CreateTree");
    if (!ready.ok()) return ready.status();
    const TreeEngine& engine = *ready->engine;
    const RequestLimits& limits = ready->limits;
    std::vector<int32_t> prompt;
    switch (request->prompt_case()) {
      case pb::CreateTreeRequest::kText: {
        auto t = TokensOfText(engine, "text", request->text(), /*add_bos=*/true);
        if (!t.ok()) return t.status();
        prompt = std::move(*t);
        break;
      }
      case pb::CreateTreeRequest::kTokens: {
        const auto& ids = request->tokens().ids();
        absl::Status s = CheckTokenIds("tokens.ids", AsSpan(ids), limits.vocab_size);
        if (!s.ok()) return s;
        prompt.assign(ids.begin(), ids.end());
        break;
      }
      case pb::CreateTreeRequest::kMessages: {
        std::vector<ChatMessage> messages;
        for (int i = 0; i < request->messages().messages_size(); ++i) {
          const pb::ChatMessage& m = request->messages().messages(i);
          const std::string field = absl::StrFormat("messages.messages[%d]", i);
          if (m.role() != "system" && m.role() != "user" && m.role() != "assistant") {
            return absl::InvalidArgumentError(
                absl::StrCat(field, ".role must be system, user or assistant, got \"",
                             RepairUtf8(m.role()), "\""));
          }
          absl::Status s = CheckUtf8(field + ".content", m.content());
          if (!s.ok()) return s;
          messages.push_back({m.role(), m.content()});
        }
        const bool add_generation_prompt =
            !request->has_add_generation_prompt() || request->add_generation_prompt();
        const Tokenizer& tok = ready->engine->model().tokenizer();
        auto rendered = tok.ApplyChatTemplate(messages, add_generation_prompt);
        if (!rendered.ok()) {
          return absl::Status(rendered.status().code(),
                              absl::StrCat("messages: ", rendered.status().message()));
        }
        prompt = tok.Encode(*rendered, /*add_bos=*/false, /*parse_special=*/true);
        break;
      }
      case pb::CreateTreeRequest::PROMPT_NOT_SET:
        return absl::InvalidArgumentError("prompt: one of text, tokens or messages is required");
    }
    if (prompt.empty()) return absl::InvalidArgumentError("prompt: it is empty");
    absl::Status len =
        CheckPromptLength(static_cast<int64_t>(prompt.size()), limits.context_length);
    if (!len.ok()) return len;
    std::unique_lock<std::mutex> quota_lock = LockQuota(*state_, *ready);
    if (ready->has_usage_quota()) {
      const QuotaUsage add{
          1, BlocksFor(0, static_cast<int64_t>(prompt.size()), engine.options().block_tokens)};
      absl::Status q = CheckUsage(*ready, UsageOf(*state_, *ready), add);
      if (!q.ok()) return q;
    }
    auto tree = ready->engine->CreateTree(prompt);
    if (!tree.ok()) return tree.status();
    NodeId root = kNoNode;
    engine.WithTrees([&](const TreeKvCache& cache) { root = cache.root(*tree); });
    response->set_tree_id(state_->registry().Add(*tree, ready->owner));
    response->set_root_node_id(root);
    response->set_prompt_tokens(static_cast<int32_t>(prompt.size()));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* TreeServiceImpl::Fork(grpc::CallbackServerContext* context,
                                                const pb::ForkRequest* request,
                                                pb::ForkResponse* response) {
  return Deferred(context, "Fork", [=, this]() -> absl::Status {
    auto r = Resolve(*state_, *context, "Fork", request->tree_id());
    if (!r.ok()) return r.status();
    TreeEngine& engine = *r->ready.engine;
    if (request->count() < 1 || request->count() > TreeKvCache::kMaxForkCount) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "count must be in [1, %d], got %d", TreeKvCache::kMaxForkCount, request->count()));
    }
    auto node = GetNode(engine, r->tree, request->tree_id(), request->node_id());
    if (!node.ok()) return node.status();
    if (request->offset() < 0 || request->offset() > node->length()) {
      return absl::OutOfRangeError(
          absl::StrFormat("offset %d is outside node %d, which has %d tokens", request->offset(),
                          request->node_id(), node->length()));
    }
    std::unique_lock<std::mutex> quota_lock = LockQuota(*state_, r->ready);
    if (r->ready.has_usage_quota()) {
      // A split adds its head node, and a copy-on-write when the node still has tokens to compute.
      const bool split = request->offset() > 0 && request->offset() < node->length();
      const QuotaUsage add{request->count() + (split ? 1 : 0),
                           split && node->num_computed < node->length() ? 1 : 0};
      absl::Status q = CheckUsage(r->ready, UsageOf(*state_, r->ready), add);
      if (!q.ok()) return q;
    }
    auto children = engine.Fork(r->tree, request->node_id(), request->offset(), request->count());
    if (!children.ok()) return children.status();
    for (NodeId c : *children) response->add_node_ids(c);
    auto child = GetNode(engine, r->tree, request->tree_id(), children->front());
    if (child.ok()) response->set_parent_node_id(child->parent);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* TreeServiceImpl::Extend(grpc::CallbackServerContext* context,
                                                  const pb::ExtendRequest* request,
                                                  pb::ExtendResponse* response) {
  return Deferred(context, "Extend", [=, this]() -> absl::Status {
    auto r = Resolve(*state_, *context, "Extend", request->tree_id());
    if (!r.ok()) return r.status();
    TreeEngine& engine = *r->ready.engine;
    std::vector<int32_t> tokens;
    if (request->has_text()) {
      auto t = TokensOfText(engine, "text", request->text(), /*add_bos=*/false);
      if (!t.ok()) return t.status();
      tokens = std::move(*t);
    } else if (request->has_tokens()) {
      absl::Status s =
          CheckTokenIds("tokens.ids", AsSpan(request->tokens().ids()), r->ready.limits.vocab_size);
      if (!s.ok()) return s;
      tokens.assign(request->tokens().ids().begin(), request->tokens().ids().end());
    } else {
      return absl::InvalidArgumentError("content: one of text or tokens is required");
    }
    auto node = GetNode(engine, r->tree, request->tree_id(), request->node_id());
    if (!node.ok()) return node.status();
    std::unique_lock<std::mutex> quota_lock = LockQuota(*state_, r->ready);
    if (r->ready.has_usage_quota()) {
      const QuotaUsage now = UsageOf(*state_, r->ready);
      const QuotaUsage after =
          UsageOf(*state_, r->ready,
                  {{{r->tree, node->id}, node->length() + static_cast<int64_t>(tokens.size())}});
      absl::Status q = CheckUsage(r->ready, now, QuotaUsage{0, after.kv_blocks - now.kv_blocks});
      if (!q.ok()) return q;
    }
    absl::Status s = engine.Extend(r->tree, request->node_id(), tokens);
    if (!s.ok()) return s;
    node = GetNode(engine, r->tree, request->tree_id(), request->node_id());
    if (!node.ok()) return node.status();
    response->set_node_tokens(static_cast<int32_t>(node->length()));
    return absl::OkStatus();
  });
}

grpc::ServerWriteReactor<pb::GenerateEvent>* TreeServiceImpl::Generate(
    grpc::CallbackServerContext* context, const pb::GenerateRequest* request) {
  return new GenerateStream(state_, work_, writer_, context, request);
}

grpc::ServerUnaryReactor* TreeServiceImpl::Prune(grpc::CallbackServerContext* context,
                                                 const pb::PruneRequest* request,
                                                 pb::PruneResponse*) {
  return Deferred(context, "Prune", [=, this]() -> absl::Status {
    auto r = Resolve(*state_, *context, "Prune", request->tree_id());
    if (!r.ok()) return r.status();
    auto node = GetNode(*r->ready.engine, r->tree, request->tree_id(), request->node_id());
    if (!node.ok()) return node.status();
    if (node->parent == kNoNode) {
      return absl::FailedPreconditionError(
          absl::StrFormat("node %d is the root; delete the tree instead", node->id));
    }
    return r->ready.engine->Prune(r->tree, request->node_id());
  });
}

grpc::ServerUnaryReactor* TreeServiceImpl::GetTree(grpc::CallbackServerContext* context,
                                                   const pb::GetTreeRequest* request,
                                                   pb::Tree* response) {
  return Deferred(context, "GetTree", [=, this]() -> absl::Status {
    auto r = Resolve(*state_, *context, "GetTree", request->tree_id());
    if (!r.ok()) return r.status();
    const TreeEngine& engine = *r->ready.engine;
    std::vector<TreeNode> nodes;  // parents before children
    TreeStats stats;
    engine.WithTrees([&](const TreeKvCache& cache) {
      std::vector<NodeId> order = {cache.root(r->tree)};
      for (size_t i = 0; i < order.size(); ++i) {
        auto n = cache.GetNode(r->tree, order[i]);
        if (!n.ok()) continue;
        nodes.push_back(**n);
        order.insert(order.end(), (*n)->children.begin(), (*n)->children.end());
      }
      auto s = cache.Stats(r->tree);
      if (s.ok()) stats = *s;
    });
    if (nodes.empty()) {
      return absl::NotFoundError(UnknownTreeMessage(request->tree_id()));
    }
    response->set_tree_id(request->tree_id());
    response->set_root_node_id(nodes.front().id);
    for (const TreeNode& n : nodes) {
      pb::Node* out = response->add_nodes();
      out->set_node_id(n.id);
      out->set_parent_node_id(n.parent);
      for (NodeId c : n.children) out->add_children(c);
      out->set_start_position(n.start_position);
      out->set_num_tokens(static_cast<int32_t>(n.length()));
      out->set_num_computed(static_cast<int32_t>(n.num_computed));
      if (request->include_text()) out->set_text(TextOf(engine, n.tokens));
      if (request->include_tokens()) {
        for (int32_t t : n.tokens) out->add_tokens(t);
      }
      out->set_generating(state_->IsGenerating(r->tree, n.id));
    }
    response->set_kv_blocks(stats.blocks);
    response->set_unique_tokens(stats.tokens);
    response->set_sequence_layout_tokens(stats.sequence_layout_tokens);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* TreeServiceImpl::DeleteTree(grpc::CallbackServerContext* context,
                                                      const pb::DeleteTreeRequest* request,
                                                      pb::DeleteTreeResponse*) {
  return Deferred(context, "DeleteTree", [=, this]() -> absl::Status {
    auto ready = state_->Begin(*context, "DeleteTree");
    if (!ready.ok()) return ready.status();
    auto tree = state_->registry().Remove(request->tree_id(), ready->owner);
    if (!tree.ok()) return tree.status();
    return ready->engine->DeleteTree(*tree);
  });
}

grpc::ServerUnaryReactor* TreeServiceImpl::ListTrees(grpc::CallbackServerContext* context,
                                                     const pb::ListTreesRequest*,
                                                     pb::ListTreesResponse* response) {
  return Deferred(context, "ListTrees", [=, this]() -> absl::Status {
    auto ready = state_->Begin(*context, "ListTrees");
    if (!ready.ok()) return ready.status();
    auto trees = state_->registry().List(ready->owner);
    std::sort(trees.begin(), trees.end());
    ready->engine->WithTrees([&](const TreeKvCache& cache) {
      for (const auto& [id, tree] : trees) {
        auto s = cache.Stats(tree);
        if (!s.ok()) continue;
        pb::TreeSummary* out = response->add_trees();
        out->set_tree_id(id);
        out->set_nodes(static_cast<int32_t>(s->nodes));
        out->set_unique_tokens(s->tokens);
      }
    });
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* TreeServiceImpl::Verify(grpc::CallbackServerContext* context,
                                                  const pb::VerifyRequest* request,
                                                  pb::VerifyResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // The request, response and context stay valid until Finish; the engine outlives every call.
  std::thread([state = state_, context, request, response, reactor]() mutable {
    grpc::Status status = ToGrpcStatus(VerifyNow(*state, *context, request, response));
    state->RecordRequest("Verify", status.error_code());
    state.reset();  // nothing of the server is touched after Finish
    reactor->Finish(status);
  }).detach();
  return reactor;
}

grpc::ServerUnaryReactor* TreeServiceImpl::BeamSearch(grpc::CallbackServerContext* context,
                                                      const pb::BeamSearchRequest* request,
                                                      pb::BeamSearchResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // The request, response and context stay valid until Finish; the engine outlives every call.
  std::thread([state = state_, context, request, response, reactor]() mutable {
    grpc::Status status = ToGrpcStatus(BeamSearchNow(*state, *context, request, response));
    state->RecordRequest("BeamSearch", status.error_code());
    state.reset();  // nothing of the server is touched after Finish
    reactor->Finish(status);
  }).detach();
  return reactor;
}

}  // namespace deft::server
