// Per-key nodes and kv_blocks quotas over loopback with the real model (server/quota.h): each
// operation that would pass a quota gets RESOURCE_EXHAUSTED naming it, a Generate stream that
// reaches the kv_blocks quota finishes its branches with FINISH_REASON_KV_QUOTA at exactly the
// token the quota allows, concurrent branches share the headroom, and another key is unaffected.
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include <map>
#include <thread>

#include "deft/v1/tree_service.grpc.pb.h"
#include "server/deft_server.h"

namespace deft::server {
namespace {

namespace pb = deft::v1;

constexpr char kNodesSecret[] = "nodes-secret-0123456789";
constexpr char kBlocksSecret[] = "blocks-secret-0123456789";
constexpr char kFreeSecret[] = "free-secret-0123456789";
constexpr int kBlockTokens = 16;  // EngineOptions::block_tokens

struct Streamed {
  std::map<int32_t, int> tokens;  // per node
  std::map<int32_t, pb::FinishReason> finish;
  grpc::Status status;
};

class QuotaTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto keys = ApiKeys::Parse(std::string("nodes ") + kNodesSecret + " nodes=3\n" + "blocks " +
                                   kBlocksSecret + " kv_blocks=4\n" + "free " + kFreeSecret + "\n",
                               "test keys");
    ASSERT_TRUE(keys.ok()) << keys.status();
    ServerOptions o;
    o.listen = "127.0.0.1:0";
    o.load_model = ModelFromPath(DEFT_TEST_MODEL, /*exact=*/false);
    o.engine.kv_pool_bytes = int64_t{32} << 20;
    o.engine.block_tokens = kBlockTokens;
    o.tree_ttl = std::chrono::seconds(0);
    o.api_keys = std::make_shared<const ApiKeys>(std::move(*keys));
    auto s = DeftServer::Start(std::move(o));
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = s->release();
    ASSERT_TRUE(server_->WaitUntilLoaded().ok());
    stub_ =
        pb::TreeService::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                                     grpc::InsecureChannelCredentials()))
            .release();
  }
  static void TearDownTestSuite() {
    delete stub_;
    delete server_;
  }
  void TearDown() override {
    for (const char* secret : {kNodesSecret, kBlocksSecret, kFreeSecret}) {
      pb::ListTreesResponse list;
      ASSERT_TRUE(stub_->ListTrees(As(secret).get(), pb::ListTreesRequest(), &list).ok());
      for (const pb::TreeSummary& t : list.trees()) DeleteTree(secret, t.tree_id());
    }
  }

  static std::unique_ptr<grpc::ClientContext> As(const std::string& secret) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->AddMetadata("authorization", "Bearer " + secret);
    return ctx;
  }
  // A tree whose prompt is `n` token ids (no BOS added), or the error.
  static grpc::Status CreateTree(const std::string& secret, int n, pb::CreateTreeResponse* out) {
    pb::CreateTreeRequest req;
    for (int i = 0; i < n; ++i) req.mutable_tokens()->add_ids(100 + i % 50);
    return stub_->CreateTree(As(secret).get(), req, out);
  }
  static grpc::Status Fork(const std::string& secret, const std::string& tree, int32_t node,
                           int64_t offset, int count, std::vector<int32_t>* children = nullptr) {
    pb::ForkRequest req;
    req.set_tree_id(tree);
    req.set_node_id(node);
    req.set_offset(offset);
    req.set_count(count);
    pb::ForkResponse resp;
    grpc::Status s = stub_->Fork(As(secret).get(), req, &resp);
    if (children != nullptr) children->assign(resp.node_ids().begin(), resp.node_ids().end());
    return s;
  }
  static grpc::Status Extend(const std::string& secret, const std::string& tree, int32_t node,
                             int n) {
    pb::ExtendRequest req;
    req.set_tree_id(tree);
    req.set_node_id(node);
    for (int i = 0; i < n; ++i) req.mutable_tokens()->add_ids(200 + i % 50);
    pb::ExtendResponse resp;
    return stub_->Extend(As(secret).get(), req, &resp);
  }
  static grpc::Status Prune(const std::string& secret, const std::string& tree, int32_t node) {
    pb::PruneRequest req;
    req.set_tree_id(tree);
    req.set_node_id(node);
    pb::PruneResponse resp;
    return stub_->Prune(As(secret).get(), req, &resp);
  }
  static void DeleteTree(const std::string& secret, const std::string& tree) {
    pb::DeleteTreeRequest req;
    req.set_tree_id(tree);
    pb::DeleteTreeResponse resp;
    EXPECT_TRUE(stub_->DeleteTree(As(secret).get(), req, &resp).ok());
  }
  static pb::Tree GetTree(const std::string& secret, const std::string& tree) {
    pb::GetTreeRequest req;
    req.set_tree_id(tree);
    pb::Tree resp;
    EXPECT_TRUE(stub_->GetTree(As(secret).get(), req, &resp).ok());
    return resp;
  }
  // Greedy, EOS ignored, `max_tokens` on each of `nodes`.
  static Streamed Generate(const std::string& secret, const std::string& tree,
                           const std::vector<int32_t>& nodes, int max_tokens) {
    pb::GenerateRequest req;
    req.set_tree_id(tree);
    for (int32_t n : nodes) {
      pb::Branch* b = req.add_branches();
      b->set_node_id(n);
      b->mutable_sampling()->set_max_tokens(max_tokens);
      b->mutable_sampling()->set_ignore_eos(true);
    }
    Streamed out;
    auto ctx = As(secret);
    auto reader = stub_->Generate(ctx.get(), req);
    pb::GenerateEvent e;
    while (reader->Read(&e)) {
      if (e.has_token() && e.token().token_id() >= 0) ++out.tokens[e.token().node_id()];
      if (e.has_finish()) out.finish[e.finish().node_id()] = e.finish().reason();
    }
    out.status = reader->Finish();
    return out;
  }

  static DeftServer* server_;
  static pb::TreeService::Stub* stub_;
};

DeftServer* QuotaTest::server_ = nullptr;
pb::TreeService::Stub* QuotaTest::stub_ = nullptr;

void ExpectExhausted(const grpc::Status& s, const std::string& message) {
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_EQ(s.error_message(), message);
}

TEST_F(QuotaTest, NodesQuotaCountsCreateForkSplitAndBeamSearch) {
  pb::CreateTreeResponse tree;
  ASSERT_TRUE(CreateTree(kNodesSecret, 10, &tree).ok());  // 1 node
  const std::string id = tree.tree_id();
  const int32_t root = tree.root_node_id();
  std::vector<int32_t> kids;
  ASSERT_TRUE(Fork(kNodesSecret, id, root, 10, 2, &kids).ok());  // 3 nodes
  ExpectExhausted(Fork(kNodesSecret, id, root, 10, 1),
                  "API key \"nodes\" would exceed its nodes quota (3 + 1 > 3)");
  // Another tree is one more node: over the quota too.
  pb::CreateTreeResponse second;
  ExpectExhausted(CreateTree(kNodesSecret, 5, &second),
                  "API key \"nodes\" would exceed its nodes quota (3 + 1 > 3)");
  ASSERT_TRUE(Prune(kNodesSecret, id, kids[1]).ok());  // 2 nodes
  // A fork inside a node splits it: the head is one more node.
  ExpectExhausted(Fork(kNodesSecret, id, root, 4, 1),
                  "API key \"nodes\" would exceed its nodes quota (2 + 2 > 3)");
  // Beam search is admitted on its worst case, width * max_tokens new nodes.
  pb::BeamSearchRequest beam;
  beam.set_tree_id(id);
  beam.set_node_id(kids[0]);
  beam.set_width(2);
  beam.set_max_tokens(3);
  pb::BeamSearchResponse beams;
  ExpectExhausted(stub_->BeamSearch(As(kNodesSecret).get(), beam, &beams),
                  "API key \"nodes\" would exceed its nodes quota (2 + 6 > 3)");
  EXPECT_EQ(GetTree(kNodesSecret, id).nodes_size(), 2);
  // The freed node can be used again; the key without quotas forks freely meanwhile.
  EXPECT_TRUE(Fork(kNodesSecret, id, root, 10, 1).ok());
  pb::CreateTreeResponse free_tree;
  ASSERT_TRUE(CreateTree(kFreeSecret, 10, &free_tree).ok());
  EXPECT_TRUE(Fork(kFreeSecret, free_tree.tree_id(), free_tree.root_node_id(), 4, 20).ok());
  EXPECT_EQ(GetTree(kFreeSecret, free_tree.tree_id()).nodes_size(), 22);
}

TEST_F(QuotaTest, KvBlocksQuotaRefusesPromptsAndExtensionsThatWouldPassIt) {
  pb::CreateTreeResponse tree;
  // 4 blocks of 16 tokens: a 65-token prompt needs 5.
  ExpectExhausted(CreateTree(kBlocksSecret, 4 * kBlockTokens + 1, &tree),
                  "API key \"blocks\" would exceed its kv_blocks quota (0 + 5 > 4)");
  ASSERT_TRUE(CreateTree(kBlocksSecret, 20, &tree).ok());  // 2 blocks
  ExpectExhausted(Extend(kBlocksSecret, tree.tree_id(), tree.root_node_id(), 45),
                  "API key \"blocks\" would exceed its kv_blocks quota (2 + 3 > 4)");
  EXPECT_EQ(GetTree(kBlocksSecret, tree.tree_id()).nodes(0).num_tokens(), 20);
  ASSERT_TRUE(Extend(kBlocksSecret, tree.tree_id(), tree.root_node_id(), 44).ok());  // 64: 4
  pb::CreateTreeResponse second;
  ExpectExhausted(CreateTree(kBlocksSecret, 1, &second),
                  "API key \"blocks\" would exceed its kv_blocks quota (4 + 1 > 4)");
  // Verify is admitted on its worst case: ceil((3 + 1) / 16) + 2 = 3 blocks.
  pb::VerifyRequest verify;
  verify.set_tree_id(tree.tree_id());
  verify.set_node_id(tree.root_node_id());
  for (int i = 0; i < 3; ++i) {
    verify.add_draft_tokens(300 + i);
    verify.add_draft_parents(i - 1);
  }
  pb::VerifyResponse verified;
  ExpectExhausted(stub_->Verify(As(kBlocksSecret).get(), verify, &verified),
                  "API key \"blocks\" would exceed its kv_blocks quota (4 + 3 > 4)");
  // The quota is the key's: the key without one creates a large tree meanwhile.
  pb::CreateTreeResponse free_tree;
  EXPECT_TRUE(CreateTree(kFreeSecret, 40 * kBlockTokens, &free_tree).ok());
  // Deleting gives the blocks back.
  DeleteTree(kBlocksSecret, tree.tree_id());
  EXPECT_TRUE(CreateTree(kBlocksSecret, 4 * kBlockTokens, &second).ok());
}

TEST_F(QuotaTest, GenerateFinishesBranchesAtTheKvBlocksQuota) {
  pb::CreateTreeResponse tree;
  ASSERT_TRUE(CreateTree(kBlocksSecret, 20, &tree).ok());  // 2 of 4 blocks
  const std::string id = tree.tree_id();
  const int32_t root = tree.root_node_id();
  // Another key's long stream runs at the same time and is not capped.
  pb::CreateTreeResponse free_tree;
  ASSERT_TRUE(CreateTree(kFreeSecret, 20, &free_tree).ok());
  Streamed free_streamed;
  std::thread free_stream([&] {
    free_streamed = Generate(kFreeSecret, free_tree.tree_id(), {free_tree.root_node_id()}, 100);
  });

  // The root grows to 4 * 16 = 64 tokens: 44 new tokens, then the quota.
  Streamed s = Generate(kBlocksSecret, id, {root}, 100);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.tokens[root], 4 * kBlockTokens - 20);
  EXPECT_EQ(s.finish[root], pb::FINISH_REASON_KV_QUOTA);
  pb::Tree t = GetTree(kBlocksSecret, id);
  EXPECT_EQ(t.nodes(0).num_tokens(), 4 * kBlockTokens);
  EXPECT_LE(t.kv_blocks(), 4);
  // Not even one more token fits: refused up front, nothing streamed.
  s = Generate(kBlocksSecret, id, {root}, 10);
  ExpectExhausted(s.status, "API key \"blocks\" would exceed its kv_blocks quota (4 + 1 > 4)");
  EXPECT_TRUE(s.tokens.empty());

  free_stream.join();
  ASSERT_TRUE(free_streamed.status.ok()) << free_streamed.status.error_message();
  EXPECT_EQ(free_streamed.tokens[free_tree.root_node_id()], 100);
  EXPECT_EQ(free_streamed.finish[free_tree.root_node_id()], pb::FINISH_REASON_LENGTH);

  // A stream that fits keeps its own finish reason.
  DeleteTree(kBlocksSecret, id);
  ASSERT_TRUE(CreateTree(kBlocksSecret, 20, &tree).ok());
  s = Generate(kBlocksSecret, tree.tree_id(), {tree.root_node_id()}, 10);
  EXPECT_EQ(s.tokens[tree.root_node_id()], 10);
  EXPECT_EQ(s.finish[tree.root_node_id()], pb::FINISH_REASON_LENGTH);
}

TEST_F(QuotaTest, ConcurrentBranchesShareTheKvBlocksHeadroom) {
  pb::CreateTreeResponse tree;
  ASSERT_TRUE(CreateTree(kBlocksSecret, 20, &tree).ok());  // 2 of 4 blocks
  const std::string id = tree.tree_id();
  std::vector<int32_t> kids;
  // Children start in fresh blocks: one block (16 tokens) each is all that is left.
  ASSERT_TRUE(Fork(kBlocksSecret, id, tree.root_node_id(), 20, 2, &kids).ok());
  Streamed a;
  std::thread first([&] { a = Generate(kBlocksSecret, id, {kids[0]}, 100); });
  Streamed b = Generate(kBlocksSecret, id, {kids[1]}, 100);
  first.join();
  // Whichever stream starts first is granted both free blocks; the other cannot get a first
  // token and is refused, so together they never pass the quota.
  ASSERT_NE(a.status.ok(), b.status.ok()) << a.status.error_message() << b.status.error_message();
  const Streamed& ran = a.status.ok() ? a : b;
  const Streamed& refused = a.status.ok() ? b : a;
  const int32_t ran_node = a.status.ok() ? kids[0] : kids[1];
  EXPECT_EQ(ran.tokens.at(ran_node), 2 * kBlockTokens);
  EXPECT_EQ(ran.finish.at(ran_node), pb::FINISH_REASON_KV_QUOTA);
  ExpectExhausted(refused.status,
                  "API key \"blocks\" would exceed its kv_blocks quota (4 + 1 > 4)");
  EXPECT_LE(GetTree(kBlocksSecret, id).kv_blocks(), 4);

  // Both branches in one request get one block each, round robin.
  DeleteTree(kBlocksSecret, id);
  ASSERT_TRUE(CreateTree(kBlocksSecret, 20, &tree).ok());
  ASSERT_TRUE(Fork(kBlocksSecret, tree.tree_id(), tree.root_node_id(), 20, 2, &kids).ok());
  Streamed both = Generate(kBlocksSecret, tree.tree_id(), kids, 100);
  ASSERT_TRUE(both.status.ok()) << both.status.error_message();
  for (int32_t k : kids) {
    EXPECT_EQ(both.tokens[k], kBlockTokens) << k;
    EXPECT_EQ(both.finish[k], pb::FINISH_REASON_KV_QUOTA) << k;
  }
  EXPECT_LE(GetTree(kBlocksSecret, tree.tree_id()).kv_blocks(), 4);
}

}  // namespace
}  // namespace deft::server
