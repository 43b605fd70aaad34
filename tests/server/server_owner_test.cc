// Trees belong to the caller that created them: with an authorizer that names the owner (as the
// API-key layer does), another owner's requests on a tree get NOT_FOUND, exactly as for an unknown
// id, and its ListTrees does not show it; a rejected call gets the authorizer's status.
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <gtest/gtest.h>

#include "deft/v1/tree_service.grpc.pb.h"
#include "server/deft_server.h"

namespace deft::server {
namespace {

namespace pb = deft::v1;

// Test authorizer: the owner is the "x-test-owner" metadata value; without it, UNAUTHENTICATED.
grpc::Status TestAuthorize(const grpc::CallbackServerContext& context, const std::string& method,
                           std::string* owner) {
  auto it = context.client_metadata().find("x-test-owner");
  if (it == context.client_metadata().end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "no owner for " + method);
  }
  owner->assign(it->second.data(), it->second.size());
  return grpc::Status::OK;
}

class OwnerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions o;
    o.listen = "127.0.0.1:0";
    o.load_model = ModelFromPath(DEFT_TEST_MODEL, /*exact=*/false);
    o.engine.kv_pool_bytes = int64_t{32} << 20;
    o.authorize = TestAuthorize;
    auto s = DeftServer::Start(std::move(o));
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    ASSERT_TRUE(server_->WaitUntilLoaded().ok());
    stub_ = pb::TreeService::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(server_->port()), grpc::InsecureChannelCredentials()));
  }
  std::unique_ptr<grpc::ClientContext> As(const std::string& owner) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (!owner.empty()) ctx->AddMetadata("x-test-owner", owner);
    return ctx;
  }

  std::unique_ptr<DeftServer> server_;
  std::unique_ptr<pb::TreeService::Stub> stub_;
};

TEST_F(OwnerTest, AnotherOwnersTreeIsNotFound) {
  pb::CreateTreeRequest create;
  create.set_text("Alice's tree");
  pb::CreateTreeResponse alice_tree;
  ASSERT_TRUE(stub_->CreateTree(As("alice").get(), create, &alice_tree).ok());
  const std::string id = alice_tree.tree_id();
  const std::string not_found = "tree \"" + id + "\" not found";

  pb::GetTreeRequest get;
  get.set_tree_id(id);
  pb::Tree tree;
  ASSERT_TRUE(stub_->GetTree(As("alice").get(), get, &tree).ok());
  const std::string alice_view = tree.SerializeAsString();

  grpc::Status s = stub_->GetTree(As("bob").get(), get, &tree);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), not_found);

  pb::ForkRequest fork;
  fork.set_tree_id(id);
  fork.set_node_id(alice_tree.root_node_id());
  fork.set_offset(1);
  fork.set_count(1);
  pb::ForkResponse forked;
  s = stub_->Fork(As("bob").get(), fork, &forked);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), not_found);

  pb::GenerateRequest gen;
  gen.set_tree_id(id);
  pb::Branch* b = gen.add_branches();
  b->set_node_id(alice_tree.root_node_id());
  b->mutable_sampling()->set_max_tokens(2);
  auto bob_ctx = As("bob");
  auto reader = stub_->Generate(bob_ctx.get(), gen);
  pb::GenerateEvent e;
  EXPECT_FALSE(reader->Read(&e));
  s = reader->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), not_found);

  pb::DeleteTreeRequest del;
  del.set_tree_id(id);
  pb::DeleteTreeResponse deleted;
  s = stub_->DeleteTree(As("bob").get(), del, &deleted);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), not_found);

  pb::ListTreesResponse list;
  ASSERT_TRUE(stub_->ListTrees(As("bob").get(), pb::ListTreesRequest(), &list).ok());
  EXPECT_EQ(list.trees_size(), 0);
  ASSERT_TRUE(stub_->ListTrees(As("alice").get(), pb::ListTreesRequest(), &list).ok());
  ASSERT_EQ(list.trees_size(), 1);
  EXPECT_EQ(list.trees(0).tree_id(), id);

  // Alice's tree is as she left it, and still hers to delete.
  ASSERT_TRUE(stub_->GetTree(As("alice").get(), get, &tree).ok());
  EXPECT_EQ(tree.SerializeAsString(), alice_view);
  EXPECT_TRUE(stub_->DeleteTree(As("alice").get(), del, &deleted).ok());
}

TEST_F(OwnerTest, RejectedCallsGetTheAuthorizersStatus) {
  pb::CreateTreeRequest create;
  create.set_text("nobody's tree");
  pb::CreateTreeResponse resp;
  grpc::Status s = stub_->CreateTree(As("").get(), create, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(s.error_message(), "no owner for CreateTree");
  EXPECT_EQ(server_->engine()->free_blocks(), server_->engine()->total_blocks());
  pb::ListTreesResponse list;
  ASSERT_TRUE(stub_->ListTrees(As("carol").get(), pb::ListTreesRequest(), &list).ok());
  EXPECT_EQ(list.trees_size(), 0);
}

TEST(ApiKeyOwnerTest, KeysOwnTreesWithPermissionsAndQuotas) {
  auto keys = ApiKeys::Parse(
      "alice alice-secret-0123456789 trees=1\n"
      "reader reader-secret-0123456789 readonly\n",
      "test keys");
  ASSERT_TRUE(keys.ok()) << keys.status();
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.load_model = ModelFromPath(DEFT_TEST_MODEL, /*exact=*/false);
  o.engine.kv_pool_bytes = int64_t{32} << 20;
  o.api_keys = std::make_shared<const ApiKeys>(std::move(*keys));
  auto server = DeftServer::Start(std::move(o));
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->WaitUntilLoaded().ok());
  auto stub = pb::TreeService::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string((*server)->port()), grpc::InsecureChannelCredentials()));
  auto as = [](const std::string& secret) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (!secret.empty()) ctx->AddMetadata("authorization", "Bearer " + secret);
    return ctx;
  };
  pb::CreateTreeRequest create;
  create.set_text("keyed tree");
  pb::CreateTreeResponse created;

  grpc::Status s = stub->CreateTree(as("").get(), create, &created);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  s = stub->CreateTree(as("not-a-key-0123456789").get(), create, &created);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(s.error_message(), "invalid API key");

  ASSERT_TRUE(stub->CreateTree(as("alice-secret-0123456789").get(), create, &created).ok());
  pb::CreateTreeResponse second;
  s = stub->CreateTree(as("alice-secret-0123456789").get(), create, &second);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(s.error_message(), "API key \"alice\" is at its trees quota (1 of 1)");

  s = stub->CreateTree(as("reader-secret-0123456789").get(), create, &second);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(s.error_message(), "API key \"reader\" is read-only and may not call CreateTree");

  pb::GetTreeRequest get;
  get.set_tree_id(created.tree_id());
  pb::Tree tree;
  s = stub->GetTree(as("reader-secret-0123456789").get(), get, &tree);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(stub->GetTree(as("alice-secret-0123456789").get(), get, &tree).ok());
  pb::ListTreesResponse list;
  ASSERT_TRUE(
      stub->ListTrees(as("reader-secret-0123456789").get(), pb::ListTreesRequest(), &list).ok());
  EXPECT_EQ(list.trees_size(), 0);

  // Deleting frees the quota.
  pb::DeleteTreeRequest del;
  del.set_tree_id(created.tree_id());
  pb::DeleteTreeResponse deleted;
  ASSERT_TRUE(stub->DeleteTree(as("alice-secret-0123456789").get(), del, &deleted).ok());
  EXPECT_TRUE(stub->CreateTree(as("alice-secret-0123456789").get(), create, &second).ok());
}

}  // namespace
}  // namespace deft::server
