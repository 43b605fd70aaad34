// Load: 64 concurrent clients on 16 trees for 60 seconds against an in-process deft-server with
// the real model, over loopback. Each client, on its own channel, repeatedly forks 1 or 2
// children off its tree's root, streams a Generate on them (random sampling, 4..12 tokens, EOS
// ignored), checks every branch got exactly its tokens and one LENGTH finish, now and then
// verifies a draft on a child and reads the tree, and prunes its children. Passes when no call
// failed, every stream completed, and the KV pool is back to its baseline (the 16 prefilled
// roots) at the end, and empty once the trees are deleted.
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "deft/v1/tree_service.grpc.pb.h"
#include "server/deft_server.h"

namespace deft::server {
namespace {

namespace pb = deft::v1;
using Clock = std::chrono::steady_clock;

constexpr int kClients = 64;
constexpr int kTrees = 16;
constexpr auto kDuration = std::chrono::seconds(60);
constexpr auto kCallDeadline = std::chrono::seconds(60);

struct Counters {
  std::atomic<int64_t> streams_started{0};
  std::atomic<int64_t> streams_completed{0};
  std::atomic<int64_t> tokens{0};
  std::atomic<int64_t> unary_calls{0};
  std::mutex mu;
  std::vector<std::string> errors;  // first few, for the failure message
  int64_t error_count = 0;

  void Error(const std::string& what) {
    std::lock_guard<std::mutex> lock(mu);
    if (errors.size() < 10) errors.push_back(what);
    ++error_count;
  }
};

std::unique_ptr<grpc::ClientContext> WithDeadline() {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + kCallDeadline);
  return ctx;
}

// One client's loop on tree `tree_id` until `end`.
void RunClient(int index, const std::string& address, const pb::CreateTreeResponse& tree,
               Clock::time_point end, Counters* counters) {
  auto stub =
      pb::TreeService::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  std::mt19937 rng(1234 + index);
  const std::string& id = tree.tree_id();
  auto check = [&](const grpc::Status& s, const std::string& what) {
    if (!s.ok()) counters->Error(what + ": " + s.error_message());
    return s.ok();
  };
  for (int64_t iter = 0; Clock::now() < end; ++iter) {
    pb::ForkRequest fork;
    fork.set_tree_id(id);
    fork.set_node_id(tree.root_node_id());
    fork.set_offset(tree.prompt_tokens());
    fork.set_count(1 + static_cast<int>(rng() % 2));
    pb::ForkResponse forked;
    counters->unary_calls++;
    if (!check(stub->Fork(WithDeadline().get(), fork, &forked), "Fork")) continue;

    pb::GenerateRequest gen;
    gen.set_tree_id(id);
    std::map<int32_t, int> want;  // node -> max_tokens
    for (int32_t child : forked.node_ids()) {
      pb::Branch* b = gen.add_branches();
      b->set_node_id(child);
      pb::SamplingParams* p = b->mutable_sampling();
      p->set_temperature(static_cast<float>(rng() % 100) / 100.f);
      p->set_top_k(static_cast<int>(rng() % 50));
      p->set_seed(rng());
      p->set_max_tokens(4 + static_cast<int>(rng() % 9));
      p->set_ignore_eos(true);
      want[child] = p->max_tokens();
    }
    counters->streams_started++;
    auto ctx = WithDeadline();
    auto reader = stub->Generate(ctx.get(), gen);
    std::map<int32_t, int> got;
    std::map<int32_t, int> finishes;
    std::map<int32_t, pb::FinishReason> reason;
    pb::GenerateEvent e;
    while (reader->Read(&e)) {
      if (e.has_token() && e.token().token_id() >= 0) ++got[e.token().node_id()];
      if (e.has_finish()) {
        ++finishes[e.finish().node_id()];
        reason[e.finish().node_id()] = e.finish().reason();
      }
    }
    if (check(reader->Finish(), "Generate")) {
      bool whole = true;
      for (const auto& [node, n] : want) {
        if (got[node] != n || finishes[node] != 1 || reason[node] != pb::FINISH_REASON_LENGTH) {
          whole = false;
          counters->Error("branch " + std::to_string(node) + " of tree " + id + ": " +
                          std::to_string(got[node]) + " of " + std::to_string(n) + " tokens, " +
                          std::to_string(finishes[node]) + " finishes");
        }
        counters->tokens += got[node];
      }
      if (whole) counters->streams_completed++;
    }

    const int32_t first_child = forked.node_ids(0);
    if (iter % 4 == 1) {
      pb::VerifyRequest verify;
      verify.set_tree_id(id);
      verify.set_node_id(first_child);
      for (int i = 0; i < 3; ++i) {
        verify.add_draft_tokens(static_cast<int32_t>(rng() % 49152));
        verify.add_draft_parents(i - 1);
      }
      pb::VerifyResponse verified;
      counters->unary_calls++;
      check(stub->Verify(WithDeadline().get(), verify, &verified), "Verify");
    }
    if (iter % 4 == 2) {
      pb::GetTreeRequest get;
      get.set_tree_id(id);
      pb::Tree t;
      counters->unary_calls++;
      if (check(stub->GetTree(WithDeadline().get(), get, &t), "GetTree")) {
        for (const pb::Node& n : t.nodes()) {
          if (want.contains(n.node_id()) && n.generating()) {
            counters->Error("node " + std::to_string(n.node_id()) + " still generating");
          }
        }
      }
    }
    for (int32_t child : forked.node_ids()) {
      pb::PruneRequest prune;
      prune.set_tree_id(id);
      prune.set_node_id(child);
      pb::PruneResponse pruned;
      counters->unary_calls++;
      check(stub->Prune(WithDeadline().get(), prune, &pruned), "Prune");
    }
  }
}

TEST(ServerLoadTest, SixtyFourClientsOnSixteenTreesForSixtySeconds) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.load_model = ModelFromPath(DEFT_TEST_MODEL, /*exact=*/false);
  o.engine.kv_pool_bytes = int64_t{256} << 20;
  o.tree_ttl = std::chrono::seconds(0);
  auto server = DeftServer::Start(std::move(o));
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->WaitUntilLoaded().ok());
  std::shared_ptr<TreeEngine> engine = (*server)->engine();
  const std::string address = "127.0.0.1:" + std::to_string((*server)->port());
  auto stub =
      pb::TreeService::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));

  // 16 trees with their prompts computed: one token generated on a child, then the child pruned.
  std::vector<pb::CreateTreeResponse> trees(kTrees);
  for (int t = 0; t < kTrees; ++t) {
    pb::CreateTreeRequest create;
    create.set_text("Tree " + std::to_string(t) + ": the roots of the old forest reach");
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->CreateTree(&ctx, create, &trees[t]).ok());
    pb::ForkRequest fork;
    fork.set_tree_id(trees[t].tree_id());
    fork.set_node_id(trees[t].root_node_id());
    fork.set_offset(trees[t].prompt_tokens());
    fork.set_count(1);
    pb::ForkResponse forked;
    grpc::ClientContext fctx;
    ASSERT_TRUE(stub->Fork(&fctx, fork, &forked).ok());
    pb::GenerateRequest gen;
    gen.set_tree_id(trees[t].tree_id());
    pb::Branch* b = gen.add_branches();
    b->set_node_id(forked.node_ids(0));
    b->mutable_sampling()->set_max_tokens(1);
    grpc::ClientContext gctx;
    auto reader = stub->Generate(&gctx, gen);
    pb::GenerateEvent e;
    while (reader->Read(&e)) {
    }
    ASSERT_TRUE(reader->Finish().ok());
    pb::PruneRequest prune;
    prune.set_tree_id(trees[t].tree_id());
    prune.set_node_id(forked.node_ids(0));
    pb::PruneResponse pruned;
    grpc::ClientContext pctx;
    ASSERT_TRUE(stub->Prune(&pctx, prune, &pruned).ok());
  }
  const int64_t baseline_free = engine->free_blocks();

  Counters counters;
  const Clock::time_point start = Clock::now();
  const Clock::time_point end = start + kDuration;
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back(RunClient, c, address, std::cref(trees[c % kTrees]), end, &counters);
  }
  for (std::thread& t : clients) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  std::lock_guard<std::mutex> lock(counters.mu);
  EXPECT_EQ(counters.error_count, 0)
      << "first errors: " << (counters.errors.empty() ? "" : counters.errors[0]);
  for (const std::string& e : counters.errors) ADD_FAILURE() << e;
  EXPECT_EQ(counters.streams_completed.load(), counters.streams_started.load());
  EXPECT_GE(counters.streams_completed.load(), kClients);  // every client finished some
  std::printf("load: %d clients, %d trees, %.1f s: %lld streams, %lld tokens, %lld unary calls\n",
              kClients, kTrees, seconds, static_cast<long long>(counters.streams_completed.load()),
              static_cast<long long>(counters.tokens.load()),
              static_cast<long long>(counters.unary_calls.load()));

  // Every child was pruned: the pool holds the 16 roots again, and nothing once they are gone.
  EXPECT_EQ(engine->free_blocks(), baseline_free);
  for (const pb::CreateTreeResponse& t : trees) {
    pb::DeleteTreeRequest del;
    del.set_tree_id(t.tree_id());
    pb::DeleteTreeResponse deleted;
    grpc::ClientContext ctx;
    EXPECT_TRUE(stub->DeleteTree(&ctx, del, &deleted).ok());
  }
  for (int i = 0; i < 200 && engine->free_blocks() != engine->total_blocks(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(engine->free_blocks(), engine->total_blocks());
}

}  // namespace
}  // namespace deft::server
