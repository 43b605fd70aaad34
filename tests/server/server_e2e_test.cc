// deft-server end to end: a DeftServer in this process on 127.0.0.1 (a free port), with the real
// model, driven by gRPC clients over loopback. Every RPC; forked branches generated together
// equal the same branches generated alone; verify against greedy decoding; health and
// reflection; every bad input answered with its exact code and message while other clients'
// trees stay intact; a cancelled stream and an expired deadline leave the KV pool as it was.
//
// The model runs on the exact path (fp32 weights): with int8 activations the split order of the
// tree attention changes activation roundings, so tree-vs-alone comparisons could flip
// near-ties (see tests/engine/tree_engine_test.cc).
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include <future>
#include <map>
#include <thread>

#include "deft/v1/model_service.grpc.pb.h"
#include "deft/v1/tree_service.grpc.pb.h"
#include "server/deft_server.h"

namespace deft::server {
namespace {

namespace pb = deft::v1;
using std::chrono::milliseconds;

constexpr int kMaxBranches = 8;
constexpr int kMaxTokensLimit = 256;
constexpr char kPrompt[] = "The oldest trees in the forest";

ServerOptions TestOptions() {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.load_model = ModelFromPath(DEFT_TEST_MODEL, /*exact=*/true);
  o.engine.kv_pool_bytes = int64_t{64} << 20;
  o.engine.max_branches_per_generate = kMaxBranches;
  o.max_branches = kMaxBranches;
  o.max_tokens_limit = kMaxTokensLimit;
  o.tree_ttl = std::chrono::seconds(0);
  // Every scheduler step takes at least 3 ms, so that a long generation outlasts the
  // deadlines and graces these tests set whatever the backend's speed (on the H100 SmolLM2
  // decodes 256 tokens in ~0.4 s).
  o.engine.before_unlocked_forward = [] { std::this_thread::sleep_for(std::chrono::milliseconds(3)); };
  static ServerMetrics metrics;
  o.metrics = &metrics;
  return o;
}

struct Streamed {
  std::map<int32_t, std::vector<int32_t>> tokens;
  std::map<int32_t, std::string> text;
  std::map<int32_t, pb::FinishReason> finish;
  grpc::Status status;
};

class ServerE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto s = DeftServer::Start(TestOptions());
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = s->release();
    ASSERT_TRUE(server_->WaitUntilLoaded().ok());
    channel_ = new std::shared_ptr<grpc::Channel>(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(server_->port()), grpc::InsecureChannelCredentials()));
  }
  static void TearDownTestSuite() {
    delete channel_;
    delete server_;
  }

  void SetUp() override {
    trees_ = pb::TreeService::NewStub(*channel_);
    models_ = pb::ModelService::NewStub(*channel_);
  }

  pb::CreateTreeResponse CreateTree(const std::string& text) {
    pb::CreateTreeRequest req;
    req.set_text(text);
    pb::CreateTreeResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = trees_->CreateTree(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }
  std::vector<int32_t> Fork(const std::string& tree, int32_t node, int64_t offset, int count) {
    pb::ForkRequest req;
    req.set_tree_id(tree);
    req.set_node_id(node);
    req.set_offset(offset);
    req.set_count(count);
    pb::ForkResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = trees_->Fork(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return {resp.node_ids().begin(), resp.node_ids().end()};
  }
  pb::Tree GetTree(const std::string& tree, grpc::Status* status = nullptr) {
    pb::GetTreeRequest req;
    req.set_tree_id(tree);
    req.set_include_tokens(true);
    req.set_include_text(true);
    pb::Tree resp;
    grpc::ClientContext ctx;
    grpc::Status s = trees_->GetTree(&ctx, req, &resp);
    if (status != nullptr) {
      *status = s;
    } else {
      EXPECT_TRUE(s.ok()) << s.error_message();
    }
    return resp;
  }
  void DeleteTree(const std::string& tree) {
    pb::DeleteTreeRequest req;
    req.set_tree_id(tree);
    pb::DeleteTreeResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = trees_->DeleteTree(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
  }
  Streamed Generate(const pb::GenerateRequest& req, grpc::ClientContext* ctx) {
    Streamed out;
    auto reader = trees_->Generate(ctx, req);
    pb::GenerateEvent e;
    while (reader->Read(&e)) {
      if (e.has_token()) {
        if (e.token().token_id() >= 0)
          out.tokens[e.token().node_id()].push_back(e.token().token_id());
        out.text[e.token().node_id()] += e.token().text();
      } else {
        out.finish[e.finish().node_id()] = e.finish().reason();
      }
    }
    out.status = reader->Finish();
    return out;
  }
  static pb::SamplingParams Sampling(float temperature, uint64_t seed, int max_tokens) {
    pb::SamplingParams p;
    p.set_temperature(temperature);
    p.set_seed(seed);
    p.set_max_tokens(max_tokens);
    p.set_ignore_eos(true);
    return p;
  }
  // Waits until no node of `tree` is generating (the engine has processed a cancel).
  void WaitIdle(const std::string& tree) {
    for (int i = 0; i < 500; ++i) {
      pb::Tree t = GetTree(tree);
      bool generating = false;
      for (const pb::Node& n : t.nodes()) generating |= n.generating();
      if (!generating) return;
      std::this_thread::sleep_for(milliseconds(10));
    }
    ADD_FAILURE() << "tree " << tree << " is still generating";
  }

  static DeftServer* server_;
  static std::shared_ptr<grpc::Channel>* channel_;
  std::unique_ptr<pb::TreeService::Stub> trees_;
  std::unique_ptr<pb::ModelService::Stub> models_;
};

DeftServer* ServerE2eTest::server_ = nullptr;
std::shared_ptr<grpc::Channel>* ServerE2eTest::channel_ = nullptr;

TEST_F(ServerE2eTest, EveryRpcAnswers) {
  const int64_t free_before = server_->engine()->free_blocks();
  pb::ModelInfo info;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(models_->GetModelInfo(&ctx, pb::GetModelInfoRequest(), &info).ok());
  }
  EXPECT_EQ(info.vocab_size(), 49152);
  EXPECT_EQ(info.attention_mode(), "flatten");
  EXPECT_EQ(info.backend(), "cpu");
  EXPECT_EQ(info.kv_pool_blocks(), server_->engine()->total_blocks());
  EXPECT_FALSE(info.end_of_generation_token_ids().empty());

  pb::TokenizeRequest treq;
  treq.set_text(kPrompt);
  pb::TokenizeResponse tok;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(models_->Tokenize(&ctx, treq, &tok).ok());
  }
  ASSERT_GT(tok.token_ids_size(), 3);
  pb::DetokenizeRequest dreq;
  *dreq.mutable_token_ids() = tok.token_ids();
  pb::DetokenizeResponse detok;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(models_->Detokenize(&ctx, dreq, &detok).ok());
  }
  EXPECT_EQ(detok.text(), kPrompt);

  pb::CreateTreeResponse created = CreateTree(kPrompt);
  EXPECT_EQ(created.tree_id().size(), 32u);
  EXPECT_EQ(created.prompt_tokens(), tok.token_ids_size());
  const std::string id = created.tree_id();

  pb::ExtendRequest ereq;
  ereq.set_tree_id(id);
  ereq.set_node_id(created.root_node_id());
  ereq.set_text(" of the north");
  pb::ExtendResponse eresp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(trees_->Extend(&ctx, ereq, &eresp).ok());
  }
  EXPECT_GT(eresp.node_tokens(), created.prompt_tokens());

  // Fork inside the root: the head takes the first 2 tokens, the root keeps the rest.
  pb::ForkRequest freq;
  freq.set_tree_id(id);
  freq.set_node_id(created.root_node_id());
  freq.set_offset(2);
  freq.set_count(1);
  pb::ForkResponse fresp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(trees_->Fork(&ctx, freq, &fresp).ok());
  }
  ASSERT_EQ(fresp.node_ids_size(), 1);
  EXPECT_NE(fresp.parent_node_id(), created.root_node_id());
  const int32_t side = fresp.node_ids(0);

  pb::GenerateRequest greq;
  greq.set_tree_id(id);
  for (int32_t node : {created.root_node_id(), side}) {
    pb::Branch* b = greq.add_branches();
    b->set_node_id(node);
    *b->mutable_sampling() = Sampling(0, 0, 4);
  }
  grpc::ClientContext gctx;
  Streamed g = Generate(greq, &gctx);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.tokens[created.root_node_id()].size(), 4u);
  EXPECT_EQ(g.tokens[side].size(), 4u);
  EXPECT_EQ(g.finish[side], pb::FINISH_REASON_LENGTH);

  pb::Tree tree = GetTree(id);
  EXPECT_EQ(tree.tree_id(), id);
  EXPECT_EQ(tree.nodes_size(), 3);
  EXPECT_EQ(tree.nodes(0).parent_node_id(), -1);
  EXPECT_EQ(tree.root_node_id(), fresp.parent_node_id());
  EXPECT_GT(tree.kv_blocks(), 0);
  EXPECT_GT(tree.sequence_layout_tokens(), tree.unique_tokens());
  std::string root_path_text = tree.nodes(0).text();
  for (const pb::Node& n : tree.nodes()) {
    if (n.node_id() == created.root_node_id()) root_path_text += n.text();
  }
  EXPECT_EQ(root_path_text.substr(0, std::string(kPrompt).size() + 13),
            std::string(kPrompt) + " of the north");

  pb::VerifyRequest vreq;
  vreq.set_tree_id(id);
  vreq.set_node_id(side);
  vreq.add_draft_tokens(tok.token_ids(0));
  vreq.add_draft_parents(-1);
  pb::VerifyResponse vresp;
  {
    grpc::ClientContext ctx;
    grpc::Status s = trees_->Verify(&ctx, vreq, &vresp);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_EQ(vresp.tokens_size(), vresp.accepted_indices_size() + 1);
  EXPECT_EQ(vresp.logprobs_size(), vresp.tokens_size());

  pb::BeamSearchRequest breq;
  breq.set_tree_id(id);
  breq.set_node_id(side);
  breq.set_width(2);
  breq.set_max_tokens(3);
  pb::BeamSearchResponse bresp;
  {
    grpc::ClientContext ctx;
    grpc::Status s = trees_->BeamSearch(&ctx, breq, &bresp);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  ASSERT_EQ(bresp.beams_size(), 2);
  EXPECT_GE(bresp.beams(0).score(), bresp.beams(1).score());

  pb::PruneRequest preq;
  preq.set_tree_id(id);
  preq.set_node_id(side);
  pb::PruneResponse presp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(trees_->Prune(&ctx, preq, &presp).ok());
  }
  EXPECT_EQ(GetTree(id).nodes_size(), 2);

  pb::ListTreesResponse list;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(trees_->ListTrees(&ctx, pb::ListTreesRequest(), &list).ok());
  }
  bool listed = false;
  for (const pb::TreeSummary& t : list.trees()) listed |= t.tree_id() == id && t.nodes() == 2;
  EXPECT_TRUE(listed);

  DeleteTree(id);
  grpc::Status gone;
  GetTree(id, &gone);
  EXPECT_EQ(gone.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(gone.error_message(), "tree \"" + id + "\" not found");
  EXPECT_EQ(server_->engine()->free_blocks(), free_before);
}

// The value of an unlabelled sample line "name value" in Prometheus text, or -1.
double SampleValue(const std::string& text, const std::string& name) {
  const size_t at = text.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + name.size() + 2));
}

// Waits until the metrics text contains `sample` (the server records a stream when it ends).
bool EventuallyInMetrics(ServerMetrics& metrics, const std::string& sample) {
  for (int i = 0; i < 200; ++i) {
    if (metrics.Serialize().find(sample) != std::string::npos) return true;
    std::this_thread::sleep_for(milliseconds(10));
  }
  return false;
}

TEST_F(ServerE2eTest, MetricsCountRequestsAndGeneratedTokens) {
  ServerMetrics& metrics = *TestOptions().metrics;
  const double tokens_before = SampleValue(metrics.Serialize(), "deft_generated_tokens_total");
  pb::CreateTreeResponse t = CreateTree(kPrompt);
  pb::GenerateRequest req;
  req.set_tree_id(t.tree_id());
  pb::Branch* b = req.add_branches();
  b->set_node_id(t.root_node_id());
  *b->mutable_sampling() = Sampling(0, 0, 3);
  grpc::ClientContext ctx;
  ASSERT_TRUE(Generate(req, &ctx).status.ok());
  grpc::Status missing;
  GetTree(std::string(32, 'f'), &missing);
  DeleteTree(t.tree_id());
  const std::string text = metrics.Serialize();
  EXPECT_EQ(SampleValue(text, "deft_generated_tokens_total"), std::max(tokens_before, 0.0) + 3);
  EXPECT_EQ(SampleValue(text, "deft_branches_active"), 0);
  EXPECT_NE(text.find("deft_requests_total{code=\"OK\",method=\"Generate\"}"), std::string::npos);
  EXPECT_NE(text.find("deft_requests_total{code=\"NOT_FOUND\",method=\"GetTree\"}"),
            std::string::npos);
  EXPECT_NE(text.find("deft_requests_total{code=\"OK\",method=\"CreateTree\"}"), std::string::npos);
}

TEST_F(ServerE2eTest, ForkedBranchesGenerateLikeIndependentOnes) {
  constexpr int kBranches = 4;
  constexpr int kTokens = 8;
  pb::CreateTreeResponse created = CreateTree(kPrompt);
  std::vector<int32_t> leaves =
      Fork(created.tree_id(), created.root_node_id(), created.prompt_tokens(), kBranches);
  ASSERT_EQ(leaves.size(), static_cast<size_t>(kBranches));
  pb::GenerateRequest together;
  together.set_tree_id(created.tree_id());
  for (int i = 0; i < kBranches; ++i) {
    pb::Branch* b = together.add_branches();
    b->set_node_id(leaves[i]);
    *b->mutable_sampling() = Sampling(0.9f, 100 + i, kTokens);
  }
  grpc::ClientContext ctx;
  Streamed t = Generate(together, &ctx);
  ASSERT_TRUE(t.status.ok()) << t.status.error_message();

  for (int i = 0; i < kBranches; ++i) {
    pb::CreateTreeResponse alone = CreateTree(kPrompt);
    pb::GenerateRequest req;
    req.set_tree_id(alone.tree_id());
    pb::Branch* b = req.add_branches();
    b->set_node_id(alone.root_node_id());
    *b->mutable_sampling() = Sampling(0.9f, 100 + i, kTokens);
    grpc::ClientContext actx;
    Streamed a = Generate(req, &actx);
    ASSERT_TRUE(a.status.ok()) << a.status.error_message();
    EXPECT_EQ(t.tokens[leaves[i]], a.tokens[alone.root_node_id()]) << "branch " << i;
    EXPECT_EQ(t.text[leaves[i]], a.text[alone.root_node_id()]) << "branch " << i;
    EXPECT_EQ(a.tokens[alone.root_node_id()].size(), static_cast<size_t>(kTokens));
    DeleteTree(alone.tree_id());
  }
  // Different seeds gave different samples (the comparison above is not vacuous).
  EXPECT_NE(t.tokens[leaves[0]], t.tokens[leaves[1]]);
  DeleteTree(created.tree_id());
}

TEST_F(ServerE2eTest, VerifyAcceptsTheGreedyContinuation) {
  constexpr int kTokens = 6;
  pb::CreateTreeResponse g = CreateTree(kPrompt);
  pb::GenerateRequest req;
  req.set_tree_id(g.tree_id());
  pb::Branch* b = req.add_branches();
  b->set_node_id(g.root_node_id());
  *b->mutable_sampling() = Sampling(0, 0, kTokens + 1);
  grpc::ClientContext ctx;
  Streamed s = Generate(req, &ctx);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  const std::vector<int32_t>& greedy = s.tokens[g.root_node_id()];
  ASSERT_EQ(greedy.size(), static_cast<size_t>(kTokens + 1));

  // The greedy chain plus a wrong sibling of its second token: all of the chain is accepted and
  // the bonus is the next greedy token.
  pb::CreateTreeResponse v = CreateTree(kPrompt);
  pb::VerifyRequest vreq;
  vreq.set_tree_id(v.tree_id());
  vreq.set_node_id(v.root_node_id());
  for (int i = 0; i < kTokens; ++i) {
    vreq.add_draft_tokens(greedy[i]);
    vreq.add_draft_parents(i - 1);
  }
  vreq.add_draft_tokens((greedy[1] + 1) % 49152);
  vreq.add_draft_parents(0);
  pb::VerifyResponse vresp;
  grpc::ClientContext vctx;
  grpc::Status st = trees_->Verify(&vctx, vreq, &vresp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  std::vector<int32_t> accepted(vresp.accepted_indices().begin(), vresp.accepted_indices().end());
  EXPECT_EQ(accepted, (std::vector<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(std::vector<int32_t>(vresp.tokens().begin(), vresp.tokens().end()), greedy);
  DeleteTree(g.tree_id());
  DeleteTree(v.tree_id());
}

// One bad request: what it does, and the exact status it must get.
struct BadCase {
  std::string name;
  std::function<grpc::Status()> call;
  grpc::StatusCode code;
  std::string message;
};

TEST_F(ServerE2eTest, BadInputGetsExactErrorsAndLeavesOtherTreesIntact) {
  // Another client's tree, generated on, must not change while the bad requests come in.
  pb::CreateTreeResponse other = CreateTree("A different client's prompt");
  std::vector<int32_t> other_leaves = Fork(other.tree_id(), other.root_node_id(), 2, 2);
  pb::GenerateRequest og;
  og.set_tree_id(other.tree_id());
  pb::Branch* ob = og.add_branches();
  ob->set_node_id(other_leaves[0]);
  *ob->mutable_sampling() = Sampling(0, 0, 3);
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(Generate(og, &ctx).status.ok());
  }
  const std::string other_before = GetTree(other.tree_id()).SerializeAsString();

  pb::CreateTreeResponse a = CreateTree(kPrompt);  // a single root node
  pb::CreateTreeResponse b = CreateTree(kPrompt);
  std::vector<int32_t> b_leaves = Fork(b.tree_id(), b.root_node_id(), b.prompt_tokens(), 3);
  const int64_t free_before = server_->engine()->free_blocks();
  const std::string a_id = a.tree_id();
  const int32_t root = a.root_node_id();
  const int plen = a.prompt_tokens();

  auto generate = [&](std::vector<pb::SamplingParams> params) {
    pb::GenerateRequest req;
    req.set_tree_id(b.tree_id());
    for (size_t i = 0; i < params.size(); ++i) {
      pb::Branch* br = req.add_branches();
      br->set_node_id(i < b_leaves.size() ? b_leaves[i] : 1000 + static_cast<int>(i));
      *br->mutable_sampling() = params[i];
    }
    grpc::ClientContext ctx;
    return Generate(req, &ctx).status;
  };
  auto fork = [&](const std::string& tree, int32_t node, int64_t offset, int count) {
    pb::ForkRequest req;
    req.set_tree_id(tree);
    req.set_node_id(node);
    req.set_offset(offset);
    req.set_count(count);
    pb::ForkResponse resp;
    grpc::ClientContext ctx;
    return trees_->Fork(&ctx, req, &resp);
  };
  auto create_tokens = [&](std::vector<int32_t> ids) {
    pb::CreateTreeRequest req;
    req.mutable_tokens()->mutable_ids()->Add(ids.begin(), ids.end());
    pb::CreateTreeResponse resp;
    grpc::ClientContext ctx;
    return trees_->CreateTree(&ctx, req, &resp);
  };
  pb::SamplingParams good = Sampling(0.5f, 1, 4);
  auto with = [&](std::function<void(pb::SamplingParams*)> f) {
    pb::SamplingParams p = good;
    f(&p);
    return p;
  };
  const std::string unknown = std::string(32, '0');

  std::vector<BadCase> cases = {
      {"unknown tree",
       [&] {
         grpc::Status s;
         GetTree(unknown, &s);
         return s;
       },
       grpc::StatusCode::NOT_FOUND, "tree \"" + unknown + "\" not found"},
      {"node from another tree", [&] { return fork(a_id, b_leaves[2], 0, 1); },
       grpc::StatusCode::NOT_FOUND,
       "tree \"" + a_id + "\" has no node " + std::to_string(b_leaves[2])},
      {"fork offset past the node", [&] { return fork(a_id, root, plen + 1, 1); },
       grpc::StatusCode::OUT_OF_RANGE,
       "offset " + std::to_string(plen + 1) + " is outside node " + std::to_string(root) +
           ", which has " + std::to_string(plen) + " tokens"},
      {"fork count 0", [&] { return fork(a_id, root, plen, 0); },
       grpc::StatusCode::INVALID_ARGUMENT, "count must be in [1, 4096], got 0"},
      {"max_tokens 0", [&] { return generate({with([](auto* p) { p->set_max_tokens(0); })}); },
       grpc::StatusCode::INVALID_ARGUMENT,
       "branches[0].sampling.max_tokens must be in [1, 256], got 0"},
      {"max_tokens huge",
       [&] {
         return generate({good, with([](auto* p) { p->set_max_tokens(1000000); })});
       },
       grpc::StatusCode::INVALID_ARGUMENT,
       "branches[1].sampling.max_tokens must be in [1, 256], got 1000000"},
      {"temperature < 0",
       [&] { return generate({with([](auto* p) { p->set_temperature(-0.5f); })}); },
       grpc::StatusCode::INVALID_ARGUMENT,
       "branches[0].sampling.temperature must be >= 0, got -0.5"},
      {"top_p above 1",
       [&] {
         return generate({good, good, with([](auto* p) { p->set_top_p(1.5f); })});
       },
       grpc::StatusCode::INVALID_ARGUMENT, "branches[2].sampling.top_p must be in (0, 1], got 1.5"},
      {"top_p 0", [&] { return generate({with([](auto* p) { p->set_top_p(0.f); })}); },
       grpc::StatusCode::INVALID_ARGUMENT, "branches[0].sampling.top_p must be in (0, 1], got 0"},
      {"too many branches",
       [&] { return generate(std::vector<pb::SamplingParams>(kMaxBranches + 1, good)); },
       grpc::StatusCode::INVALID_ARGUMENT, "branches: 9 requested, at most 8 per call"},
      {"generate on an unknown node",
       [&] {
         pb::GenerateRequest req;
         req.set_tree_id(a_id);
         pb::Branch* br = req.add_branches();
         br->set_node_id(77);
         *br->mutable_sampling() = good;
         grpc::ClientContext ctx;
         return Generate(req, &ctx).status;
       },
       grpc::StatusCode::NOT_FOUND, "branches[0].node_id: tree \"" + a_id + "\" has no node 77"},
      {"prompt over the context length",
       [&] { return create_tokens(std::vector<int32_t>(8192, 28)); },
       grpc::StatusCode::OUT_OF_RANGE,
       "the prompt has 8192 tokens; the model's context holds 8192"},
      {"token id outside the vocabulary",
       [&] {
         return create_tokens({1, 49152});
       },
       grpc::StatusCode::INVALID_ARGUMENT,
       "tokens.ids[1]: 49152 is outside the vocabulary [0, 49152)"},
      {"negative token id",
       [&] {
         pb::DetokenizeRequest req;
         req.add_token_ids(-3);
         pb::DetokenizeResponse resp;
         grpc::ClientContext ctx;
         return models_->Detokenize(&ctx, req, &resp);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "token_ids[0]: -3 is outside the vocabulary [0, 49152)"},
      {"token tree with a bad parent",
       [&] {
         pb::VerifyRequest req;
         req.set_tree_id(a_id);
         req.set_node_id(root);
         for (int32_t parent : {-1, 0, 2}) {
           req.add_draft_tokens(28);
           req.add_draft_parents(parent);
         }
         pb::VerifyResponse resp;
         grpc::ClientContext ctx;
         return trees_->Verify(&ctx, req, &resp);
       },
       grpc::StatusCode::INVALID_ARGUMENT,
       "draft_parents[2] must be -1 or an earlier index (< 2), got 2"},
      {"prune the root",
       [&] {
         pb::PruneRequest req;
         req.set_tree_id(a_id);
         req.set_node_id(root);
         pb::PruneResponse resp;
         grpc::ClientContext ctx;
         return trees_->Prune(&ctx, req, &resp);
       },
       grpc::StatusCode::FAILED_PRECONDITION,
       "node " + std::to_string(root) + " is the root; delete the tree instead"},
  };
  // Raw invalid UTF-8 on the wire in every text input (bytes fields documented as UTF-8 text,
  // so the request reaches the handler, which names the field).
  const std::string bad_utf8("ok \xff\xfe", 5);
  auto extend_text = [&](const std::string& text) {
    pb::ExtendRequest req;
    req.set_tree_id(a_id);
    req.set_node_id(root);
    req.set_text(text);
    pb::ExtendResponse resp;
    grpc::ClientContext ctx;
    return trees_->Extend(&ctx, req, &resp);
  };
  auto create_chat = [&](const std::string& role, const std::string& content) {
    pb::CreateTreeRequest req;
    pb::ChatMessage* m = req.mutable_messages()->add_messages();
    m->set_role("system");
    m->set_content("You are brief.");
    m = req.mutable_messages()->add_messages();
    m->set_role(role);
    m->set_content(content);
    pb::CreateTreeResponse resp;
    grpc::ClientContext ctx;
    return trees_->CreateTree(&ctx, req, &resp);
  };
  const std::string a_before = GetTree(a_id).SerializeAsString();
  const size_t trees_before = server_->state().registry().size();
  std::vector<BadCase> utf8_cases = {
      {"invalid UTF-8 prompt text",
       [&] {
         pb::CreateTreeRequest req;
         req.set_text(bad_utf8);
         pb::CreateTreeResponse resp;
         grpc::ClientContext ctx;
         return trees_->CreateTree(&ctx, req, &resp);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "text is not valid UTF-8"},
      {"invalid UTF-8 chat content", [&] { return create_chat("user", bad_utf8); },
       grpc::StatusCode::INVALID_ARGUMENT, "messages.messages[1].content is not valid UTF-8"},
      {"invalid UTF-8 chat role", [&] { return create_chat(bad_utf8, "hi"); },
       grpc::StatusCode::INVALID_ARGUMENT,
       "messages.messages[1].role must be system, user or assistant, got \"ok "
       "\xEF\xBF\xBD\xEF\xBF\xBD\""},
      {"invalid UTF-8 extend text", [&] { return extend_text(bad_utf8); },
       grpc::StatusCode::INVALID_ARGUMENT, "text is not valid UTF-8"},
      {"truncated UTF-8 sequence", [&] { return extend_text("caf\xC3"); },
       grpc::StatusCode::INVALID_ARGUMENT, "text is not valid UTF-8"},
      {"invalid UTF-8 stop string",
       [&] {
         return generate({good, with([&](auto* p) {
                            p->add_stop("fine");
                            p->add_stop(bad_utf8);
                          })});
       },
       grpc::StatusCode::INVALID_ARGUMENT, "branches[1].sampling.stop[1] is not valid UTF-8"},
      {"invalid UTF-8 tokenize text",
       [&] {
         pb::TokenizeRequest req;
         req.set_text(bad_utf8);
         pb::TokenizeResponse resp;
         grpc::ClientContext ctx;
         return models_->Tokenize(&ctx, req, &resp);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "text is not valid UTF-8"},
  };
  cases.insert(cases.end(), utf8_cases.begin(), utf8_cases.end());
  for (const BadCase& c : cases) {
    grpc::Status s = c.call();
    EXPECT_EQ(s.error_code(), c.code) << c.name << ": " << s.error_message();
    EXPECT_EQ(s.error_message(), c.message) << c.name;
    EXPECT_EQ(GetTree(other.tree_id()).SerializeAsString(), other_before) << c.name;
    EXPECT_EQ(server_->engine()->free_blocks(), free_before) << c.name;
  }
  // The bad requests changed nothing: tree a as it was, no tree created, valid text still works.
  EXPECT_EQ(GetTree(a_id).SerializeAsString(), a_before);
  EXPECT_EQ(server_->state().registry().size(), trees_before);
  EXPECT_TRUE(extend_text("caf\xC3\xA9").ok());
  DeleteTree(a_id);
  DeleteTree(b.tree_id());
  DeleteTree(other.tree_id());
}

TEST_F(ServerE2eTest, CancelledStreamLeavesThePoolAsBefore) {
  const int64_t free_before = server_->engine()->free_blocks();
  pb::CreateTreeResponse t = CreateTree(kPrompt);
  std::vector<int32_t> leaves = Fork(t.tree_id(), t.root_node_id(), t.prompt_tokens(), 2);
  pb::GenerateRequest req;
  req.set_tree_id(t.tree_id());
  for (int32_t leaf : leaves) {
    pb::Branch* b = req.add_branches();
    b->set_node_id(leaf);
    *b->mutable_sampling() = Sampling(0.7f, leaf, kMaxTokensLimit);
  }
  grpc::ClientContext ctx;
  auto reader = trees_->Generate(&ctx, req);
  pb::GenerateEvent e;
  int tokens = 0;
  while (tokens < 4 && reader->Read(&e)) tokens += e.has_token();
  ASSERT_EQ(tokens, 4);
  // A second stream on a generating leaf is refused, and the first keeps its mark.
  {
    grpc::ClientContext ctx2;
    pb::GenerateRequest again;
    again.set_tree_id(t.tree_id());
    *again.add_branches() = req.branches(0);
    Streamed refused = Generate(again, &ctx2);
    EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_EQ(refused.status.error_message(),
              "branches[0]: node " + std::to_string(leaves[0]) + " is already generating");
    bool marked = false;
    const pb::Tree now = GetTree(t.tree_id());
    for (const pb::Node& n : now.nodes()) {
      marked |= n.node_id() == leaves[0] && n.generating();
    }
    EXPECT_TRUE(marked);
  }
  ctx.TryCancel();
  while (reader->Read(&e)) {
  }
  grpc::Status s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << s.error_message();
  WaitIdle(t.tree_id());
  EXPECT_TRUE(EventuallyInMetrics(*TestOptions().metrics,
                                  "deft_requests_total{code=\"CANCELLED\",method=\"Generate\"}"));
  // The engine stopped: the tree no longer grows, and far fewer than max_tokens were generated.
  const int64_t stopped = GetTree(t.tree_id()).unique_tokens();
  std::this_thread::sleep_for(milliseconds(200));
  EXPECT_EQ(GetTree(t.tree_id()).unique_tokens(), stopped);
  EXPECT_LT(stopped, t.prompt_tokens() + 2 * kMaxTokensLimit);
  DeleteTree(t.tree_id());
  EXPECT_EQ(server_->engine()->free_blocks(), free_before);
}

TEST_F(ServerE2eTest, CancellingOneStreamLeavesConcurrentStreamsRunning) {
  constexpr int kClients = 3;
  constexpr int kTokens = 12;
  std::vector<pb::CreateTreeResponse> t;
  for (int i = 0; i < kClients; ++i) t.push_back(CreateTree(kPrompt));
  // Client 0 cancels after its first tokens; the others (started at the same time, so their
  // Generate calls race with client 0's) must finish untouched.
  std::vector<grpc::Status> status(kClients);
  std::vector<int> tokens(kClients, 0);
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.emplace_back([&, i] {
      auto stub = pb::TreeService::NewStub(*channel_);
      pb::GenerateRequest req;
      req.set_tree_id(t[i].tree_id());
      pb::Branch* b = req.add_branches();
      b->set_node_id(t[i].root_node_id());
      *b->mutable_sampling() = Sampling(0, 0, i == 0 ? kMaxTokensLimit : kTokens);
      grpc::ClientContext ctx;
      auto reader = stub->Generate(&ctx, req);
      pb::GenerateEvent e;
      while (reader->Read(&e)) {
        tokens[i] += e.has_token() && e.token().token_id() >= 0;
        if (i == 0 && tokens[i] == 2) ctx.TryCancel();
      }
      status[i] = reader->Finish();
    });
  }
  for (std::thread& c : clients) c.join();
  EXPECT_EQ(status[0].error_code(), grpc::StatusCode::CANCELLED);
  for (int i = 1; i < kClients; ++i) {
    EXPECT_TRUE(status[i].ok()) << i << ": " << status[i].error_message();
    EXPECT_EQ(tokens[i], kTokens) << i;
  }
  WaitIdle(t[0].tree_id());
  for (const auto& tree : t) DeleteTree(tree.tree_id());
}

TEST_F(ServerE2eTest, ExpiredDeadlineLeavesThePoolAsBefore) {
  const int64_t free_before = server_->engine()->free_blocks();
  pb::CreateTreeResponse t = CreateTree(kPrompt);
  pb::GenerateRequest req;
  req.set_tree_id(t.tree_id());
  pb::Branch* b = req.add_branches();
  b->set_node_id(t.root_node_id());
  *b->mutable_sampling() = Sampling(0.7f, 5, kMaxTokensLimit);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + milliseconds(400));
  Streamed s = Generate(req, &ctx);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.status.error_message();
  WaitIdle(t.tree_id());
  // The server, too, ended the stream as past its deadline (not as a client cancel).
  EXPECT_TRUE(
      EventuallyInMetrics(*TestOptions().metrics,
                          "deft_requests_total{code=\"DEADLINE_EXCEEDED\",method=\"Generate\"}"));
  const int64_t stopped = GetTree(t.tree_id()).unique_tokens();
  std::this_thread::sleep_for(milliseconds(200));
  EXPECT_EQ(GetTree(t.tree_id()).unique_tokens(), stopped);
  EXPECT_LT(stopped, t.prompt_tokens() + kMaxTokensLimit);
  DeleteTree(t.tree_id());
  EXPECT_EQ(server_->engine()->free_blocks(), free_before);
}

// grpc.health.v1.Health/Check and reflection's ListServices, spoken with raw protobuf bytes
// (neither proto ships with Debian's gRPC).
grpc::Status CallRaw(grpc::Channel* channel, const std::string& method, const std::string& request,
                     std::string* response) {
  grpc::GenericStub stub(std::shared_ptr<grpc::Channel>(channel, [](grpc::Channel*) {}));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::Slice slice(request);
  grpc::ByteBuffer req(&slice, 1), resp;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &req, &resp,
                 [&](grpc::Status s) { done.set_value(s); });
  grpc::Status s = done.get_future().get();
  std::vector<grpc::Slice> slices;
  if (s.ok() && resp.Dump(&slices).ok()) {
    for (const grpc::Slice& sl : slices) {
      response->append(reinterpret_cast<const char*>(sl.begin()), sl.size());
    }
  }
  return s;
}

// ServingStatus of the whole server: 1 SERVING, 2 NOT_SERVING (field 1, varint).
int HealthStatus(grpc::Channel* channel) {
  std::string resp;
  grpc::Status s = CallRaw(channel, "/grpc.health.v1.Health/Check", "", &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  if (resp.size() != 2 || resp[0] != 0x08) return -1;
  return resp[1];
}

TEST_F(ServerE2eTest, ReflectionListsTheServices) {
  grpc::GenericStub stub(*channel_);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::CompletionQueue cq;
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  // ServerReflectionRequest{list_services = ""}: field 7, length-delimited, empty.
  grpc::Slice slice(std::string("\x3a\x00", 2));
  grpc::ByteBuffer req(&slice, 1), resp;
  call->Write(req, reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  call->Read(&resp, reinterpret_cast<void*>(3));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  std::string bytes;
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(resp.Dump(&slices).ok());
  for (const grpc::Slice& sl : slices)
    bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  EXPECT_NE(bytes.find("deft.v1.TreeService"), std::string::npos);
  EXPECT_NE(bytes.find("deft.v1.ModelService"), std::string::npos);
  EXPECT_NE(bytes.find("grpc.health.v1.Health"), std::string::npos);
  call->WritesDone(reinterpret_cast<void*>(4));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(HealthStatus(channel_->get()), 1);
}

TEST(ServerHealthTest, NotServingUntilTheModelHasLoaded) {
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  ServerOptions o = TestOptions();
  auto load = ModelFromPath(DEFT_TEST_MODEL, /*exact=*/false);
  o.load_model = [load, released]() {
    released.wait();
    return load();
  };
  auto server = DeftServer::Start(std::move(o));
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string((*server)->port()),
                                     grpc::InsecureChannelCredentials());
  EXPECT_EQ(HealthStatus(channel.get()), 2);
  auto stub = pb::ModelService::NewStub(channel);
  {
    grpc::ClientContext ctx;
    pb::ModelInfo info;
    grpc::Status s = stub->GetModelInfo(&ctx, pb::GetModelInfoRequest(), &info);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(s.error_message(), "the model is not loaded yet");
  }
  release.set_value();
  ASSERT_TRUE((*server)->WaitUntilLoaded().ok());
  EXPECT_EQ(HealthStatus(channel.get()), 1);
  (*server)->Shutdown(milliseconds(0));
}

}  // namespace
}  // namespace deft::server
