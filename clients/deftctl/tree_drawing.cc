// DrawTree; see tree_drawing.h.
#include "clients/deftctl/tree_drawing.h"

#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace deft::cli {

namespace {

// Length of the UTF-8 sequence starting with byte `c` (1 for stray continuation bytes).
int Utf8Length(unsigned char c) {
  if (c >= 0xF0 && c <= 0xF4) return 4;
  if (c >= 0xE0) return c <= 0xEF ? 3 : 1;
  if (c >= 0xC2 && c <= 0xDF) return 2;
  return 1;
}

struct Drawer {
  const std::map<int32_t, const deft::v1::Node*>& nodes;
  int text_width;
  std::string out;
  std::set<int32_t> drawn;  // guards against a cycle in a malformed answer

  void Draw(int32_t id, const std::string& prefix, const std::string& branch, bool last) {
    auto it = nodes.find(id);
    if (it == nodes.end() || !drawn.insert(id).second) {
      absl::StrAppend(&out, prefix, branch, id, " (missing)\n");
      return;
    }
    const deft::v1::Node& n = *it->second;
    absl::StrAppend(&out, prefix, branch, n.node_id(), " [", n.num_tokens(),
                    n.num_tokens() == 1 ? " token" : " tokens");
    if (n.num_computed() != n.num_tokens())
      absl::StrAppend(&out, ", ", n.num_computed(), " computed");
    absl::StrAppend(&out, "]");
    if (!n.text().empty())
      absl::StrAppend(&out, " \"", EscapeForDisplay(n.text(), text_width), "\"");
    if (n.generating()) absl::StrAppend(&out, " (generating)");
    out += '\n';
    const std::string child_prefix =
        branch.empty() ? prefix : absl::StrCat(prefix, last ? "   " : "|  ");
    for (int i = 0; i < n.children_size(); ++i) {
      const bool child_last = i + 1 == n.children_size();
      Draw(n.children(i), child_prefix, child_last ? "`- " : "|- ", child_last);
    }
  }
};

}  // namespace

std::string EscapeForDisplay(const std::string& text, int width) {
  std::string out;
  int chars = 0;
  for (size_t i = 0; i < text.size();) {
    if (width > 0 && chars == width) return out + "...";
    const unsigned char c = static_cast<unsigned char>(text[i]);
    int len = Utf8Length(c);
    if (i + len > text.size()) len = 1;
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7F) {
      out += absl::StrFormat("\\x%02x", c);
    } else {
      out.append(text, i, len);
    }
    i += len;
    ++chars;
  }
  return out;
}

std::string DrawTree(const deft::v1::Tree& tree, int text_width) {
  std::map<int32_t, const deft::v1::Node*> nodes;
  for (const deft::v1::Node& n : tree.nodes()) nodes[n.node_id()] = &n;
  Drawer drawer{nodes, text_width, "", {}};
  absl::StrAppend(&drawer.out, "tree ", tree.tree_id(), ": ", tree.nodes_size(),
                  tree.nodes_size() == 1 ? " node, " : " nodes, ", tree.unique_tokens(),
                  " unique tokens, ", tree.kv_blocks(),
                  " KV blocks (sequence-per-branch layout: ", tree.sequence_layout_tokens(),
                  " tokens)\n");
  drawer.Draw(tree.root_node_id(), "", "", true);
  return drawer.out;
}

}  // namespace deft::cli
