// Renders a deft.v1.Tree (GetTree's answer) as an indented drawing, one node per line:
//
//   tree 5f0e... : 4 nodes, 31 unique tokens, 3 KV blocks (sequence-per-branch layout: 52 tokens)
//   0 [12 tokens] "<|im_start|>user\nName a tree.<|im_end|>\n"
//   |- 1 [9 tokens] "Oak is a tree"
//   |  `- 3 [2 tokens, 1 computed] " with" (generating)
//   `- 2 [8 tokens] "Pine"
//
// Text is escaped (\n, \t, \", \\, other control bytes as \xNN) and cut to `text_width`
// characters (UTF-8 code points; 0: no limit) with "..." marking a cut. Nodes without text (the
// tree was fetched without include_text) show no text. A node missing from `nodes` but named as
// a child is drawn as "(missing)", so a malformed answer cannot crash the drawing.
#pragma once

#include <string>

#include "deft/v1/tree_service.pb.h"

namespace deft::cli {

std::string DrawTree(const deft::v1::Tree& tree, int text_width);

// `text` escaped as described above and cut to `width` code points (0: no limit).
std::string EscapeForDisplay(const std::string& text, int width);

}  // namespace deft::cli
