// DeftServer's life cycle with the real model (int8 path): graceful shutdown lets open streams
// finish within the grace period (every one ending OK, however close to the drain's end) and
// cancels them past it, refusing new calls meanwhile; idle trees expire after the TTL.
#include <grpc/grpc.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <future>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "deft/v1/model_service.grpc.pb.h"
#include "deft/v1/tree_service.grpc.pb.h"
#include "server/deft_server.h"

namespace deft::server {
namespace {

namespace pb = deft::v1;
using std::chrono::milliseconds;

std::unique_ptr<DeftServer> StartServer(std::chrono::seconds ttl) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.load_model = ModelFromPath(DEFT_TEST_MODEL, /*exact=*/false);
  o.engine.kv_pool_bytes = int64_t{64} << 20;
  o.tree_ttl = ttl;
  // Every scheduler step takes at least 3 ms, so that a long generation outlasts the
  // deadlines and graces these tests set whatever the backend's speed (on the H100 SmolLM2
  // decodes 256 tokens in ~0.4 s).
  o.engine.before_unlocked_forward = [] { std::this_thread::sleep_for(std::chrono::milliseconds(3)); };
  auto s = DeftServer::Start(std::move(o));
  EXPECT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE((*s)->WaitUntilLoaded().ok());
  return std::move(*s);
}

// `own_connection`: a TCP connection of its own (channels with equal arguments share one).
std::shared_ptr<grpc::Channel> Channel(const DeftServer& server, bool own_connection = false) {
  grpc::ChannelArguments args;
  if (own_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(server.port()),
                                   grpc::InsecureChannelCredentials(), args);
}

std::unique_ptr<pb::TreeService::Stub> Connect(const DeftServer& server) {
  return pb::TreeService::NewStub(Channel(server));
}

pb::CreateTreeResponse CreateTree(pb::TreeService::Stub& stub) {
  pb::CreateTreeRequest req;
  req.set_text("Once upon a time");
  pb::CreateTreeResponse resp;
  grpc::ClientContext ctx;
  EXPECT_TRUE(stub.CreateTree(&ctx, req, &resp).ok());
  return resp;
}

pb::GenerateRequest GreedyRequest(const pb::CreateTreeResponse& tree, int max_tokens) {
  pb::GenerateRequest req;
  req.set_tree_id(tree.tree_id());
  pb::Branch* b = req.add_branches();
  b->set_node_id(tree.root_node_id());
  b->mutable_sampling()->set_temperature(0);
  b->mutable_sampling()->set_max_tokens(max_tokens);
  b->mutable_sampling()->set_ignore_eos(true);
  return req;
}

TEST(ServerLifecycleTest, ShutdownLetsOpenStreamsFinishWithinTheGrace) {
  constexpr int kTokens = 24;
  auto server = StartServer(std::chrono::seconds(0));
  auto stub = Connect(*server);
  pb::CreateTreeResponse tree = CreateTree(*stub);
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, GreedyRequest(tree, kTokens));
  pb::GenerateEvent e;
  ASSERT_TRUE(reader->Read(&e));
  int tokens = e.has_token();
  std::thread shutdown([&] { server->Shutdown(std::chrono::seconds(30)); });
  bool finished = false;
  while (reader->Read(&e)) {
    tokens += e.has_token() && e.token().token_id() >= 0;
    finished |= e.has_finish() && e.finish().reason() == pb::FINISH_REASON_LENGTH;
  }
  grpc::Status s = reader->Finish();
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(tokens, kTokens);
  EXPECT_TRUE(finished);
  shutdown.join();
  // No longer accepting calls.
  pb::ListTreesResponse list;
  grpc::ClientContext lctx;
  lctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  EXPECT_FALSE(stub->ListTrees(&lctx, pb::ListTreesRequest(), &list).ok());
}

// Streams on connections of their own, ending one engine step after another while Shutdown
// drains: each client must get all its tokens, the finish event and then OK. (grpc::Server's own
// drain closed each connection as soon as its last call's trailers were handed to the transport,
// racing the client's receipt of them: UNAVAILABLE "Broken pipe" after a complete stream.)
TEST(ServerLifecycleTest, StreamsEndingDuringTheDrainAllEndOk) {
  constexpr int kStreams = 32;
  auto server = StartServer(std::chrono::seconds(0));
  struct Stream {
    std::unique_ptr<pb::TreeService::Stub> stub;
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReader<pb::GenerateEvent>> reader;
    int max_tokens = 0;
    int tokens = 0;
    bool finished = false;
    grpc::Status status;
  };
  std::vector<Stream> streams(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    Stream& s = streams[i];
    s.stub = pb::TreeService::NewStub(Channel(*server, /*own_connection=*/true));
    s.max_tokens = 2 + i / 2;  // two streams end at each engine step
    s.reader = s.stub->Generate(&s.ctx, GreedyRequest(CreateTree(*s.stub), s.max_tokens));
  }
  std::vector<std::thread> readers;
  std::atomic<int> started{0};
  for (Stream& s : streams) {
    readers.emplace_back([&s, &started] {
      pb::GenerateEvent e;
      bool first = true;
      while (s.reader->Read(&e)) {
        if (std::exchange(first, false)) started.fetch_add(1);
        s.tokens += e.has_token() && e.token().token_id() >= 0;
        s.finished |= e.has_finish() && e.finish().reason() == pb::FINISH_REASON_LENGTH;
      }
      if (first) started.fetch_add(1);
      s.status = s.reader->Finish();
    });
  }
  while (started.load() < kStreams) std::this_thread::sleep_for(milliseconds(1));
  const auto start = std::chrono::steady_clock::now();
  server->Shutdown(std::chrono::seconds(30));
  const auto shutdown_took = std::chrono::steady_clock::now() - start;
  for (std::thread& t : readers) t.join();
  for (int i = 0; i < kStreams; ++i) {
    const Stream& s = streams[i];
    EXPECT_TRUE(s.status.ok()) << "stream " << i << ": " << s.status.error_code() << " "
                               << s.status.error_message();
    EXPECT_EQ(s.tokens, s.max_tokens) << "stream " << i;
    EXPECT_TRUE(s.finished) << "stream " << i;
  }
  // The drain ended with the streams, not at the grace's end.
  EXPECT_LT(shutdown_took, std::chrono::seconds(10));
}

// How the server answers a call that arrives while it shuts down.
void ExpectShuttingDown(const grpc::Status& s, const char* call) {
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << call;
  EXPECT_EQ(s.error_message(), "server is shutting down") << call;
}

// A call that arrives while Shutdown drains open streams is refused at once with UNAVAILABLE, on
// every service, while the open stream goes on until the grace ends.
TEST(ServerLifecycleTest, CallsArrivingDuringTheDrainAreUnavailable) {
  auto server = StartServer(std::chrono::seconds(0));
  std::shared_ptr<grpc::Channel> channel = Channel(*server);
  auto stub = pb::TreeService::NewStub(channel);
  auto model = pb::ModelService::NewStub(channel);
  pb::CreateTreeResponse tree = CreateTree(*stub);
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, GreedyRequest(tree, 1000));
  pb::GenerateEvent e;
  ASSERT_TRUE(reader->Read(&e));
  std::thread shutdown([&] { server->Shutdown(std::chrono::seconds(2)); });
  // Each call below must be answered well before its deadline (no hang).
  auto deadline = [] { return std::chrono::system_clock::now() + std::chrono::seconds(2); };
  grpc::Status list_status;
  for (int i = 0; i < 200 && list_status.ok(); ++i) {
    pb::ListTreesResponse list;
    grpc::ClientContext lctx;
    lctx.set_deadline(deadline());
    list_status = stub->ListTrees(&lctx, pb::ListTreesRequest(), &list);
    if (list_status.ok()) std::this_thread::sleep_for(milliseconds(10));
  }
  ExpectShuttingDown(list_status, "ListTrees");

  grpc::ClientContext gctx;
  gctx.set_deadline(deadline());
  auto second = stub->Generate(&gctx, GreedyRequest(tree, 4));
  EXPECT_FALSE(second->Read(&e));
  ExpectShuttingDown(second->Finish(), "Generate");

  pb::ModelInfo info;
  grpc::ClientContext mctx;
  mctx.set_deadline(deadline());
  ExpectShuttingDown(model->GetModelInfo(&mctx, pb::GetModelInfoRequest(), &info), "GetModelInfo");

  // The open stream is still generating, then cancelled at the grace's end.
  int tokens = 0;
  while (reader->Read(&e)) tokens += e.has_token();
  EXPECT_GT(tokens, 0);
  EXPECT_FALSE(reader->Finish().ok());
  shutdown.join();
}

TEST(ServerLifecycleTest, ShutdownCancelsStreamsStillOpenAfterTheGrace) {
  auto server = StartServer(std::chrono::seconds(0));
  auto stub = Connect(*server);
  pb::CreateTreeResponse tree = CreateTree(*stub);
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, GreedyRequest(tree, 1000));
  pb::GenerateEvent e;
  ASSERT_TRUE(reader->Read(&e));
  const auto start = std::chrono::steady_clock::now();
  std::thread shutdown([&] { server->Shutdown(milliseconds(200)); });
  int tokens = 0;
  while (reader->Read(&e)) tokens += e.has_token();
  grpc::Status s = reader->Finish();
  shutdown.join();
  EXPECT_FALSE(s.ok());
  EXPECT_LT(tokens, 999);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(ServerLifecycleTest, IdleTreesExpireAfterTheTtl) {
  auto server = StartServer(std::chrono::seconds(1));
  auto stub = Connect(*server);
  const int64_t free_before = server->engine()->free_blocks();
  pb::CreateTreeResponse tree = CreateTree(*stub);
  pb::GenerateRequest req = GreedyRequest(tree, 4);
  {
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, req);
    pb::GenerateEvent e;
    while (reader->Read(&e)) {
    }
    ASSERT_TRUE(reader->Finish().ok());
  }
  EXPECT_LT(server->engine()->free_blocks(), free_before);
  pb::GetTreeRequest get;
  get.set_tree_id(tree.tree_id());
  grpc::Status s;
  for (int i = 0; i < 100; ++i) {
    pb::Tree t;
    grpc::ClientContext ctx;
    s = stub->GetTree(&ctx, get, &t);
    if (!s.ok()) break;
    std::this_thread::sleep_for(milliseconds(i < 3 ? 100 : 50));  // touches while < 1 s
    if (i == 2) std::this_thread::sleep_for(milliseconds(1500));  // then goes idle
  }
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), "tree \"" + tree.tree_id() + "\" not found");
  EXPECT_EQ(server->engine()->free_blocks(), free_before);
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(ServerLifecycleTest, ServesTlsWithTheGivenCertificate) {
  // A fresh self-signed certificate for "localhost" (openssl ships with Debian's base system).
  const std::string dir = ::testing::TempDir() + "deft_tls_" + std::to_string(getpid());
  ASSERT_EQ(std::system(("mkdir -p " + dir +
                         " && openssl req -x509 -newkey rsa:2048 -nodes "
                         "-subj /CN=localhost -addext subjectAltName=DNS:localhost -days 1 "
                         "-keyout " +
                         dir + "/key.pem -out " + dir + "/cert.pem 2>/dev/null")
                            .c_str()),
            0);
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({ReadAll(dir + "/key.pem"), ReadAll(dir + "/cert.pem")});
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.credentials = grpc::SslServerCredentials(ssl);
  o.load_model = ModelFromPath(DEFT_TEST_MODEL, /*exact=*/false);
  o.engine.kv_pool_bytes = int64_t{16} << 20;
  auto server = DeftServer::Start(std::move(o));
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->WaitUntilLoaded().ok());
  const std::string target = "localhost:" + std::to_string((*server)->port());

  grpc::SslCredentialsOptions trust;
  trust.pem_root_certs = ReadAll(dir + "/cert.pem");
  auto secure = pb::TreeService::NewStub(grpc::CreateChannel(target, grpc::SslCredentials(trust)));
  pb::ListTreesResponse list;
  grpc::ClientContext ctx;
  grpc::Status s = secure->ListTrees(&ctx, pb::ListTreesRequest(), &list);
  EXPECT_TRUE(s.ok()) << s.error_message();

  // A plaintext client cannot talk to it.
  auto plain =
      pb::TreeService::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext pctx;
  pctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  EXPECT_EQ(plain->ListTrees(&pctx, pb::ListTreesRequest(), &list).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  std::system(("rm -rf " + dir).c_str());
}

}  // namespace
}  // namespace deft::server
