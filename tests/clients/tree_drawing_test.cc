// deftctl's tree drawing (clients/deftctl/tree_drawing.h): layout, escaping, UTF-8-aware cutting
// and malformed answers.
#include "clients/deftctl/tree_drawing.h"

#include <gtest/gtest.h>

namespace deft::cli {
namespace {

namespace pb = deft::v1;

pb::Node* AddNode(pb::Tree* t, int32_t id, int32_t parent, int32_t tokens,
                  const std::string& text) {
  pb::Node* n = t->add_nodes();
  n->set_node_id(id);
  n->set_parent_node_id(parent);
  n->set_num_tokens(tokens);
  n->set_num_computed(tokens);
  n->set_text(text);
  return n;
}

TEST(TreeDrawingTest, DrawsNestedBranchesWithCountsAndText) {
  pb::Tree t;
  t.set_tree_id("ab12");
  t.set_root_node_id(0);
  t.set_kv_blocks(3);
  t.set_unique_tokens(31);
  t.set_sequence_layout_tokens(52);
  pb::Node* root = AddNode(&t, 0, -1, 12, "Name a tree.\n");
  root->add_children(1);
  root->add_children(2);
  pb::Node* one = AddNode(&t, 1, 0, 9, "Oak is a tree");
  one->add_children(3);
  AddNode(&t, 2, 0, 1, "Pine");
  pb::Node* three = AddNode(&t, 3, 1, 2, " with");
  three->set_num_computed(1);
  three->set_generating(true);
  EXPECT_EQ(DrawTree(t, 60),
            "tree ab12: 4 nodes, 31 unique tokens, 3 KV blocks (sequence-per-branch layout: 52 "
            "tokens)\n"
            "0 [12 tokens] \"Name a tree.\\n\"\n"
            "|- 1 [9 tokens] \"Oak is a tree\"\n"
            "|  `- 3 [2 tokens, 1 computed] \" with\" (generating)\n"
            "`- 2 [1 token] \"Pine\"\n");
}

TEST(TreeDrawingTest, EscapesControlBytesAndCutsAtCodePoints) {
  EXPECT_EQ(EscapeForDisplay("a\tb\"c\\d\x01", 0), "a\\tb\\\"c\\\\d\\x01");
  // "é" is two bytes, "木" three: a cut after 2 code points keeps them whole.
  EXPECT_EQ(EscapeForDisplay("é木xyz", 2), "é木...");
  EXPECT_EQ(EscapeForDisplay("abc", 3), "abc");
  // A truncated UTF-8 sequence at the end is copied byte by byte, never read past the end.
  EXPECT_EQ(EscapeForDisplay(std::string("a\xE6\x9C", 3), 0), std::string("a\xE6\x9C", 3));
}

TEST(TreeDrawingTest, MissingChildAndCycleDoNotCrash) {
  pb::Tree t;
  t.set_tree_id("x");
  pb::Node* root = AddNode(&t, 0, -1, 1, "");
  root->add_children(7);  // not in nodes
  root->add_children(0);  // a cycle back to the root
  EXPECT_EQ(DrawTree(t, 10),
            "tree x: 1 node, 0 unique tokens, 0 KV blocks (sequence-per-branch layout: 0 "
            "tokens)\n"
            "0 [1 token]\n"
            "|- 7 (missing)\n"
            "`- 0 (missing)\n");
}

}  // namespace
}  // namespace deft::cli
