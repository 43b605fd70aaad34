// Prompt-lookup draft trees (clients/examples/prompt_lookup.h): candidates from n-gram matches,
// merged into a trie in VerifyRequest's parent layout, within the size limits.
#include "clients/examples/prompt_lookup.h"

#include <gtest/gtest.h>

namespace deft::examples {
namespace {

TEST(PromptLookupTest, MergesContinuationsOfEveryMatchIntoATrie) {
  // Last token 1 occurred twice before: followed by 2,3 and by 2,4 (most recent first).
  const std::vector<int32_t> context = {1, 2, 3, 9, 1, 2, 4, 9, 1};
  DraftOptions o;
  o.max_ngram = 1;
  o.depth = 3;
  DraftTree d = BuildPromptLookupDraft(context, o);
  // Most recent match (index 4): 2,4,9. Then index 0: 2,3,9 shares the 2.
  EXPECT_EQ(d.tokens, (std::vector<int32_t>{2, 4, 9, 3, 9}));
  EXPECT_EQ(d.parents, (std::vector<int32_t>{-1, 0, 1, 0, 3}));
  EXPECT_EQ(d.candidates, 2);
}

TEST(PromptLookupTest, LongerNgramsComeFirstAndDuplicatesAddNothing) {
  const std::vector<int32_t> context = {5, 6, 7, 8, 6, 7, 9, 5, 6, 7};
  DraftOptions o;
  o.max_ngram = 3;
  o.depth = 1;
  DraftTree d = BuildPromptLookupDraft(context, o);
  // 3-gram 5,6,7 -> 8; 2-gram 6,7 -> 9 (index 4), then 8 again (index 1, no new node);
  // 1-gram 7 -> 9, 8 (nothing new).
  EXPECT_EQ(d.tokens, (std::vector<int32_t>{8, 9}));
  EXPECT_EQ(d.parents, (std::vector<int32_t>{-1, -1}));
  EXPECT_EQ(d.candidates, 2);
}

TEST(PromptLookupTest, RespectsTheSizeLimitsAndEmptyContexts) {
  std::vector<int32_t> context;
  for (int r = 0; r < 20; ++r) {
    for (int t = 0; t < 5; ++t) context.push_back(r * 10 + t);
    context.push_back(1000);
  }
  DraftOptions o;
  o.max_ngram = 1;
  o.depth = 4;
  o.max_nodes = 10;
  o.max_candidates = 100;
  DraftTree d = BuildPromptLookupDraft(context, o);
  EXPECT_EQ(d.tokens.size(), 10u);
  for (size_t i = 0; i < d.parents.size(); ++i) {
    EXPECT_GE(d.parents[i], -1);
    EXPECT_LT(d.parents[i], static_cast<int32_t>(i));
  }
  o.max_candidates = 1;
  EXPECT_EQ(BuildPromptLookupDraft(context, o).tokens.size(), 4u);
  EXPECT_TRUE(BuildPromptLookupDraft({}, o).tokens.empty());
  EXPECT_TRUE(BuildPromptLookupDraft({3}, o).tokens.empty());
  EXPECT_TRUE(BuildPromptLookupDraft({1, 2, 3}, o).tokens.empty());  // no repeat
}

}  // namespace
}  // namespace deft::examples
