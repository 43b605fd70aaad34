// Request validation at the boundary: each check's code and message, naming the field.
#include "server/validation.h"

#include <gtest/gtest.h>

namespace deft::server {
namespace {

RequestLimits Limits() {
  RequestLimits l;
  l.max_branches = 4;
  l.max_tokens_limit = 100;
  l.vocab_size = 1000;
  l.context_length = 64;
  return l;
}

TEST(ValidationTest, InvalidUtf8IsInvalidArgumentNamingTheField) {
  absl::Status s = CheckUtf8("messages.messages[1].content", std::string("a\xc3", 2));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "messages.messages[1].content is not valid UTF-8");
  EXPECT_TRUE(CheckUtf8("text", "caf\xc3\xa9 \xf0\x9f\x8c\xb3").ok());
}

TEST(ValidationTest, TokenIdsOutsideTheVocabulary) {
  std::vector<int32_t> ids = {0, 999, 1000};
  absl::Status s = CheckTokenIds("tokens.ids", ids, 1000);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "tokens.ids[2]: 1000 is outside the vocabulary [0, 1000)");
  ids = {-1};
  EXPECT_EQ(CheckTokenIds("draft_tokens", ids, 1000).message(),
            "draft_tokens[0]: -1 is outside the vocabulary [0, 1000)");
}

TEST(ValidationTest, PromptMustLeaveRoomInTheContext) {
  EXPECT_TRUE(CheckPromptLength(63, 64).ok());
  absl::Status s = CheckPromptLength(64, 64);
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(s.message(), "the prompt has 64 tokens; the model's context holds 64");
}

TEST(ValidationTest, BranchesNameTheBadSamplingField) {
  deft::v1::GenerateRequest req;
  for (int i = 0; i < 3; ++i) {
    deft::v1::Branch* b = req.add_branches();
    b->set_node_id(i);
    b->mutable_sampling()->set_max_tokens(10);
  }
  ASSERT_TRUE(ToBranches(req, Limits()).ok());
  EXPECT_EQ((*ToBranches(req, Limits()))[2].params.top_p, 1.f);  // unset optional: default

  req.mutable_branches(2)->mutable_sampling()->set_top_p(1.5f);
  EXPECT_EQ(ToBranches(req, Limits()).status().message(),
            "branches[2].sampling.top_p must be in (0, 1], got 1.5");
  req.mutable_branches(2)->mutable_sampling()->clear_top_p();
  req.mutable_branches(1)->mutable_sampling()->set_max_tokens(101);
  EXPECT_EQ(ToBranches(req, Limits()).status().message(),
            "branches[1].sampling.max_tokens must be in [1, 100], got 101");
  req.mutable_branches(1)->mutable_sampling()->set_max_tokens(10);
  req.mutable_branches(1)->mutable_sampling()->add_stop(std::string("\xff", 1));
  EXPECT_EQ(ToBranches(req, Limits()).status().message(),
            "branches[1].sampling.stop[0] is not valid UTF-8");
  req.mutable_branches(1)->mutable_sampling()->clear_stop();
  req.mutable_branches(1)->set_node_id(0);
  EXPECT_EQ(ToBranches(req, Limits()).status().message(),
            "branches[1].node_id: node 0 is listed twice");
  req.mutable_branches(1)->set_node_id(1);
  for (int i = 3; i < 5; ++i) req.add_branches()->set_node_id(i);
  EXPECT_EQ(ToBranches(req, Limits()).status().message(),
            "branches: 5 requested, at most 4 per call");
  req.clear_branches();
  EXPECT_EQ(ToBranches(req, Limits()).status().message(), "branches: at least one is required");
}

TEST(ValidationTest, DraftTreeParentsComeFirst) {
  deft::v1::VerifyRequest req;
  for (int32_t p : {-1, 0, 0}) {
    req.add_draft_tokens(5);
    req.add_draft_parents(p);
  }
  EXPECT_TRUE(CheckDraft(req, Limits()).ok());
  req.set_draft_parents(1, -2);
  EXPECT_EQ(CheckDraft(req, Limits()).message(),
            "draft_parents[1] must be -1 or an earlier index (< 1), got -2");
  req.set_draft_parents(1, 0);
  req.add_draft_tokens(7);
  EXPECT_EQ(CheckDraft(req, Limits()).message(), "draft_parents has 3 entries; draft_tokens has 4");
}

TEST(ValidationTest, RepairUtf8ReplacesEachBadByte) {
  EXPECT_EQ(RepairUtf8("ok"), "ok");
  EXPECT_EQ(RepairUtf8(std::string("a\xff"
                                   "b\xe2\x82",
                                   5)),
            "a\xEF\xBF\xBD"
            "b\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(RepairUtf8("\xe2\x82\xac"), "\xe2\x82\xac");
}

TEST(ValidationTest, GrpcStatusKeepsCodeAndMessage) {
  grpc::Status s = ToGrpcStatus(absl::OutOfRangeError("offset 9 is outside node 0"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::OUT_OF_RANGE);
  EXPECT_EQ(s.error_message(), "offset 9 is outside node 0");
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
}

}  // namespace
}  // namespace deft::server
