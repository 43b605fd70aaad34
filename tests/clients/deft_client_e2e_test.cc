// DeftClient end to end: a DeftServer in this process on 127.0.0.1 (a free port) with the real
// model, driven through the client library over loopback. Every RPC; the server's status codes
// and messages arrive unchanged; Generate streams, stops when its callback says so, is cancelled
// from another thread, and honours deadlines; API keys travel as "authorization: Bearer"; TLS with
// given root certificates.
//
// The model runs on the exact path (fp32 weights), as tests/server/server_e2e_test.cc explains:
// verify-vs-greedy comparisons must not flip near-ties.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <thread>

#include "clients/lib/deft_client.h"
#include "server/deft_server.h"

namespace deft::client {
namespace {

using ::deft::server::DeftServer;
using ::deft::server::ServerOptions;
using std::chrono::milliseconds;

constexpr char kPrompt[] = "The oldest trees in the forest";
constexpr int kMaxTokensLimit = 256;

ServerOptions BaseOptions(bool exact) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.load_model = ::deft::server::ModelFromPath(DEFT_TEST_MODEL, exact);
  o.engine.kv_pool_bytes = int64_t{64} << 20;
  o.engine.max_branches_per_generate = 8;
  o.max_branches = 8;
  o.max_tokens_limit = kMaxTokensLimit;
  o.tree_ttl = std::chrono::seconds(0);
  // Every scheduler step takes at least 3 ms, so that a long generation outlasts the
  // deadlines and graces these tests set whatever the backend's speed (on the H100 SmolLM2
  // decodes 256 tokens in ~0.4 s).
  o.engine.before_unlocked_forward = [] { std::this_thread::sleep_for(std::chrono::milliseconds(3)); };
  return o;
}

std::unique_ptr<DeftClient> MustConnect(const ClientOptions& options) {
  auto c = DeftClient::Connect(options);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

pb::SamplingParams Greedy(int max_tokens) {
  pb::SamplingParams p;
  p.set_max_tokens(max_tokens);
  p.set_ignore_eos(true);
  return p;
}

pb::GenerateRequest OneBranch(const std::string& tree, int32_t node, const pb::SamplingParams& p) {
  pb::GenerateRequest r;
  r.set_tree_id(tree);
  pb::Branch* b = r.add_branches();
  b->set_node_id(node);
  *b->mutable_sampling() = p;
  return r;
}

#define ASSERT_OK_AND_ASSIGN(lhs, expr)            \
  auto lhs##_or = (expr);                          \
  ASSERT_TRUE(lhs##_or.ok()) << lhs##_or.status(); \
  auto& lhs = *lhs##_or

class ClientE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto s = DeftServer::Start(BaseOptions(/*exact=*/true));
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = s->release();
    ASSERT_TRUE(server_->WaitUntilLoaded().ok());
  }
  static void TearDownTestSuite() { delete server_; }

  void SetUp() override {
    ClientOptions o;
    o.address = "127.0.0.1:" + std::to_string(server_->port());
    client_ = MustConnect(o);
    ASSERT_NE(client_, nullptr);
  }

  // Waits until no node of `tree` is generating (the engine has processed a cancel).
  void WaitIdle(const std::string& tree) {
    for (int i = 0; i < 500; ++i) {
      auto t = client_->GetTree(tree, false, false);
      ASSERT_TRUE(t.ok()) << t.status();
      bool generating = false;
      for (const pb::Node& n : t->nodes()) generating |= n.generating();
      if (!generating) return;
      std::this_thread::sleep_for(milliseconds(10));
    }
    ADD_FAILURE() << "tree " << tree << " is still generating";
  }

  static DeftServer* server_;
  std::unique_ptr<DeftClient> client_;
};

DeftServer* ClientE2eTest::server_ = nullptr;

TEST_F(ClientE2eTest, ModelServiceCallsAnswer) {
  ASSERT_OK_AND_ASSIGN(info, client_->GetModelInfo());
  EXPECT_EQ(info.vocab_size(), 49152);
  EXPECT_EQ(info.backend(), "cpu");
  EXPECT_FALSE(info.end_of_generation_token_ids().empty());
  ASSERT_OK_AND_ASSIGN(ids, client_->Tokenize(kPrompt, false, false));
  ASSERT_GT(ids.size(), 3u);
  ASSERT_OK_AND_ASSIGN(text, client_->Detokenize(ids, false));
  EXPECT_EQ(text, kPrompt);
  ASSERT_OK_AND_ASSIGN(special, client_->Tokenize("<|im_start|>", /*parse_special=*/true, false));
  EXPECT_EQ(special.size(), 1u);
}

TEST_F(ClientE2eTest, EveryTreeRpcAnswers) {
  ASSERT_OK_AND_ASSIGN(prompt_ids, client_->Tokenize(kPrompt, false, /*add_bos=*/true));
  ASSERT_OK_AND_ASSIGN(created, client_->CreateTreeFromText(kPrompt));
  EXPECT_EQ(created.tree_id().size(), 32u);
  EXPECT_EQ(created.prompt_tokens(), static_cast<int32_t>(prompt_ids.size()));
  const std::string id = created.tree_id();
  const int32_t root = created.root_node_id();

  // The same prompt as tokens and as a chat both create trees too.
  ASSERT_OK_AND_ASSIGN(from_tokens, client_->CreateTreeFromTokens(prompt_ids));
  EXPECT_EQ(from_tokens.prompt_tokens(), created.prompt_tokens());
  ASSERT_OK_AND_ASSIGN(from_chat, client_->CreateTreeFromChat({{"user", kPrompt}}));
  EXPECT_GT(from_chat.prompt_tokens(), created.prompt_tokens());

  ASSERT_OK_AND_ASSIGN(length, client_->ExtendText(id, root, " of the north"));
  EXPECT_GT(length, created.prompt_tokens());
  ASSERT_OK_AND_ASSIGN(forked, client_->Fork(id, root, length, 2));
  ASSERT_EQ(forked.node_ids_size(), 2);
  EXPECT_EQ(forked.parent_node_id(), root);
  ASSERT_OK_AND_ASSIGN(branch_len, client_->ExtendTokens(id, forked.node_ids(1), {prompt_ids[1]}));
  EXPECT_EQ(branch_len, 1);

  // Two branches in one Generate: events for both, a finish each.
  pb::GenerateRequest g = OneBranch(id, forked.node_ids(0), Greedy(5));
  pb::Branch* second = g.add_branches();
  second->set_node_id(forked.node_ids(1));
  *second->mutable_sampling() = Greedy(3);
  ASSERT_OK_AND_ASSIGN(out, client_->GenerateCollected(g));
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[forked.node_ids(0)].tokens.size(), 5u);
  EXPECT_EQ(out[forked.node_ids(1)].tokens.size(), 3u);
  ASSERT_TRUE(out[forked.node_ids(0)].finish.has_value());
  EXPECT_EQ(out[forked.node_ids(0)].finish->reason(), pb::FINISH_REASON_LENGTH);
  EXPECT_EQ(out[forked.node_ids(1)].finish->usage().completion_tokens(), 3);
  ASSERT_OK_AND_ASSIGN(branch_text, client_->Detokenize(out[forked.node_ids(0)].tokens, false));
  EXPECT_EQ(branch_text, out[forked.node_ids(0)].text);

  ASSERT_OK_AND_ASSIGN(tree, client_->GetTree(id, true, true));
  EXPECT_EQ(tree.nodes_size(), 3);
  EXPECT_EQ(tree.root_node_id(), root);
  EXPECT_GT(tree.sequence_layout_tokens(), tree.unique_tokens());
  for (const pb::Node& n : tree.nodes()) {
    if (n.node_id() == forked.node_ids(0)) {
      EXPECT_EQ(n.text(), out[n.node_id()].text);
      EXPECT_EQ(n.num_tokens(), 5);
    }
  }

  // Beam search from the second branch leaves `width` beams in the tree.
  pb::BeamSearchRequest beam;
  beam.set_tree_id(id);
  beam.set_node_id(forked.node_ids(1));
  beam.set_width(2);
  beam.set_max_tokens(3);
  ASSERT_OK_AND_ASSIGN(beams, client_->BeamSearch(beam));
  ASSERT_EQ(beams.beams_size(), 2);
  EXPECT_GE(beams.beams(0).score(), beams.beams(1).score());

  // Prune the first branch: its node is gone.
  ASSERT_TRUE(client_->Prune(id, forked.node_ids(0)).ok());
  ASSERT_OK_AND_ASSIGN(pruned, client_->GetTree(id, false, false));
  for (const pb::Node& n : pruned.nodes()) EXPECT_NE(n.node_id(), forked.node_ids(0));

  ASSERT_OK_AND_ASSIGN(listed, client_->ListTrees());
  int found = 0;
  for (const pb::TreeSummary& s : listed) found += s.tree_id() == id;
  EXPECT_EQ(found, 1);
  for (const std::string& t : {id, from_tokens.tree_id(), from_chat.tree_id()}) {
    ASSERT_TRUE(client_->DeleteTree(t).ok());
  }
  EXPECT_EQ(client_->GetTree(id, false, false).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ClientE2eTest, VerifyOfTheGreedyChainCommitsItPlusTheBonus) {
  constexpr int kTokens = 5;
  ASSERT_OK_AND_ASSIGN(g, client_->CreateTreeFromText(kPrompt));
  ASSERT_OK_AND_ASSIGN(out, client_->GenerateCollected(
                                OneBranch(g.tree_id(), g.root_node_id(), Greedy(kTokens + 1))));
  const std::vector<int32_t> greedy = out[g.root_node_id()].tokens;
  ASSERT_EQ(greedy.size(), static_cast<size_t>(kTokens + 1));

  // The chain plus a wrong sibling of its first token.
  ASSERT_OK_AND_ASSIGN(v, client_->CreateTreeFromText(kPrompt));
  std::vector<int32_t> tokens, parents;
  for (int i = 0; i < kTokens; ++i) {
    tokens.push_back(greedy[i]);
    parents.push_back(i - 1);
  }
  tokens.push_back((greedy[0] + 1) % 49152);
  parents.push_back(-1);
  ASSERT_OK_AND_ASSIGN(r, client_->Verify(v.tree_id(), v.root_node_id(), tokens, parents));
  EXPECT_EQ(std::vector<int32_t>(r.accepted_indices().begin(), r.accepted_indices().end()),
            (std::vector<int32_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(std::vector<int32_t>(r.tokens().begin(), r.tokens().end()), greedy);
  ASSERT_TRUE(client_->DeleteTree(g.tree_id()).ok());
  ASSERT_TRUE(client_->DeleteTree(v.tree_id()).ok());
}

TEST_F(ClientE2eTest, ServerErrorsArriveWithTheirCodeAndMessage) {
  const std::string unknown(32, '0');
  absl::Status s = client_->GetTree(unknown, false, false).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.message(), "tree \"" + unknown + "\" not found");
  EXPECT_EQ(StatusText(s), "NOT_FOUND: tree \"" + unknown + "\" not found");

  ASSERT_OK_AND_ASSIGN(t, client_->CreateTreeFromText(kPrompt));
  s = client_->Fork(t.tree_id(), t.root_node_id(), 0, 0).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "count must be in [1, 4096], got 0");

  s = client_->Fork(t.tree_id(), t.root_node_id(), t.prompt_tokens() + 1, 1).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(s.message(), "offset " + std::to_string(t.prompt_tokens() + 1) + " is outside node " +
                             std::to_string(t.root_node_id()) + ", which has " +
                             std::to_string(t.prompt_tokens()) + " tokens");

  s = client_->Verify(t.tree_id(), t.root_node_id(), {1, 2}, {-1}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "draft_parents has 1 entries; draft_tokens has 2");

  s = client_->Detokenize({5, 49152}, false).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "token_ids[1]: 49152 is outside the vocabulary [0, 49152)");

  pb::SamplingParams too_many = Greedy(kMaxTokensLimit + 1);
  s = client_->Generate(OneBranch(t.tree_id(), t.root_node_id(), too_many), nullptr).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "branches[0].sampling.max_tokens must be in [1, 256], got 257");
  ASSERT_TRUE(client_->DeleteTree(t.tree_id()).ok());
}

TEST_F(ClientE2eTest, GenerateCallbackReturningFalseCancelsTheStream) {
  ASSERT_OK_AND_ASSIGN(t, client_->CreateTreeFromText(kPrompt));
  int tokens = 0;
  auto r = client_->Generate(OneBranch(t.tree_id(), t.root_node_id(), Greedy(200)),
                             [&](const pb::GenerateEvent& e) {
                               if (e.has_token()) ++tokens;
                               return tokens < 2;
                             });
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(r.status().message(), "Generate cancelled by the caller");
  EXPECT_EQ(tokens, 2);
  WaitIdle(t.tree_id());
  ASSERT_OK_AND_ASSIGN(tree, client_->GetTree(t.tree_id(), false, false));
  EXPECT_LT(tree.nodes(0).num_tokens(), t.prompt_tokens() + 200);
  ASSERT_TRUE(client_->DeleteTree(t.tree_id()).ok());
}

TEST_F(ClientE2eTest, CancellationFromAnotherThreadEndsTheCall) {
  ASSERT_OK_AND_ASSIGN(t, client_->CreateTreeFromText(kPrompt));
  auto cancellation = std::make_shared<Cancellation>();
  CallOptions call;
  call.cancellation = cancellation;
  std::atomic<int> tokens{0};
  std::thread canceller([&] {
    while (tokens.load() == 0) std::this_thread::sleep_for(milliseconds(5));
    cancellation->Cancel();
  });
  auto r = client_->Generate(
      OneBranch(t.tree_id(), t.root_node_id(), Greedy(200)),
      [&](const pb::GenerateEvent& e) {
        if (e.has_token()) ++tokens;
        return true;
      },
      call);
  canceller.join();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_LT(tokens.load(), 200);
  // A cancelled Cancellation refuses later calls before they are sent.
  absl::Status later = client_->ListTrees(call).status();
  EXPECT_EQ(later.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(later.message(), "cancelled before the call started");
  WaitIdle(t.tree_id());
  ASSERT_TRUE(client_->DeleteTree(t.tree_id()).ok());
}

TEST_F(ClientE2eTest, DeadlinesEndCallsWithDeadlineExceeded) {
  ASSERT_OK_AND_ASSIGN(t, client_->CreateTreeFromText(kPrompt));
  CallOptions call;
  call.timeout = milliseconds(300);
  auto r = client_->Generate(OneBranch(t.tree_id(), t.root_node_id(), Greedy(kMaxTokensLimit)),
                             nullptr, call);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();

  // The client's default timeout applies to calls without their own; zero turns it off.
  ClientOptions o = client_->options();
  o.default_timeout = milliseconds(300);
  std::unique_ptr<DeftClient> hasty = MustConnect(o);
  WaitIdle(t.tree_id());
  r = hasty->Generate(OneBranch(t.tree_id(), t.root_node_id(), Greedy(kMaxTokensLimit)), nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  WaitIdle(t.tree_id());
  CallOptions unlimited;
  unlimited.timeout = milliseconds(0);
  r = hasty->Generate(OneBranch(t.tree_id(), t.root_node_id(), Greedy(2)), nullptr, unlimited);
  EXPECT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(client_->DeleteTree(t.tree_id()).ok());
}

TEST(ClientConnectTest, BadOptionsAreRejectedBeforeAnyCall) {
  ClientOptions o;
  o.address = "";
  EXPECT_EQ(DeftClient::Connect(o).status().message(), "address: empty");
  o.address = "127.0.0.1:1";
  o.api_key = "two words";
  absl::Status s = DeftClient::Connect(o).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "api_key: must be printable ASCII without spaces or line breaks");
}

TEST(ClientConnectTest, UnreachableServerIsUnavailableAndWaitTimesOut) {
  ClientOptions o;
  o.address = "127.0.0.1:1";  // nothing listens on port 1
  std::unique_ptr<DeftClient> c = MustConnect(o);
  EXPECT_EQ(c->ListTrees().status().code(), absl::StatusCode::kUnavailable);
  absl::Status s = c->WaitUntilServing(milliseconds(300));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(ClientAuthTest, ApiKeyTravelsAsBearerMetadata) {
  constexpr char kSecret[] = "s3cret-key-0123456789";
  auto keys = ApiKeys::Parse(std::string("alice ") + kSecret + "\n", "keys");
  ASSERT_TRUE(keys.ok()) << keys.status();
  ServerOptions so = BaseOptions(/*exact=*/false);
  so.engine.kv_pool_bytes = int64_t{16} << 20;
  so.api_keys = std::make_shared<const ApiKeys>(std::move(*keys));
  auto server = DeftServer::Start(std::move(so));
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->WaitUntilLoaded().ok());
  ClientOptions o;
  o.address = "127.0.0.1:" + std::to_string((*server)->port());

  absl::Status s = MustConnect(o)->ListTrees().status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(s.message(),
            "missing authorization metadata (expected \"authorization: Bearer <api key>\")");
  o.api_key = "wrong-key-0123456789";
  s = MustConnect(o)->ListTrees().status();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(s.message(), "invalid API key");
  o.api_key = kSecret;
  std::unique_ptr<DeftClient> alice = MustConnect(o);
  ASSERT_OK_AND_ASSIGN(t, alice->CreateTreeFromText(kPrompt));
  ASSERT_OK_AND_ASSIGN(listed, alice->ListTrees());
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].tree_id(), t.tree_id());
}

TEST(ClientTlsTest, TrustsTheGivenRootCertificate) {
  const std::string dir = ::testing::TempDir() + "deft_client_tls_" + std::to_string(getpid());
  ASSERT_EQ(std::system(("mkdir -p " + dir +
                         " && openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost "
                         "-addext subjectAltName=DNS:localhost -days 1 -keyout " +
                         dir + "/key.pem -out " + dir + "/cert.pem 2>/dev/null")
                            .c_str()),
            0);
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({ReadAll(dir + "/key.pem"), ReadAll(dir + "/cert.pem")});
  ServerOptions so = BaseOptions(/*exact=*/false);
  so.engine.kv_pool_bytes = int64_t{16} << 20;
  so.credentials = grpc::SslServerCredentials(ssl);
  auto server = DeftServer::Start(std::move(so));
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->WaitUntilLoaded().ok());

  ClientOptions o;
  o.address = "localhost:" + std::to_string((*server)->port());
  o.tls_root_certs = ReadAll(dir + "/cert.pem");
  EXPECT_TRUE(MustConnect(o)->GetModelInfo().ok());
  // The same address in plaintext cannot talk to it.
  o.tls_root_certs.clear();
  CallOptions call;
  call.timeout = milliseconds(2000);
  EXPECT_EQ(MustConnect(o)->GetModelInfo(call).status().code(), absl::StatusCode::kUnavailable);
  std::system(("rm -rf " + dir).c_str());
}

}  // namespace
}  // namespace deft::client
