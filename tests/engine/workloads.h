// The shared DeFT workloads (../shared/workloads, see its README.md) as plain trees, for tests:
// reasoning traces (reasoning/*.json, a list of trees of nodes with recorded token counts) and
// Medusa token trees (speculative/APPS_tree_size*.json). Engine-independent: a tree here is only
// parents and lengths, and each test turns it into what it needs (a planner forest, a TreeEngine
// tree).
//
// DEFT_WORKLOADS_DIR (a compile definition, set by tests/CMakeLists.txt) is where files are read.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace deft::workloads {

// Nodes in depth-first preorder, children in their recorded order: node 0 is the root and a
// parent always comes before its children.
struct WorkloadTree {
  std::vector<int32_t> parent;  // -1 for the root
  std::vector<int64_t> length;  // tokens of the node (reasoning: `value`; the root is the prompt)
  size_t size() const { return parent.size(); }
  std::vector<int32_t> Leaves() const {
    std::vector<bool> inner(parent.size(), false);
    for (int32_t p : parent) {
      if (p >= 0) inner[p] = true;
    }
    std::vector<int32_t> leaves;
    for (size_t i = 0; i < parent.size(); ++i) {
      if (!inner[i]) leaves.push_back(static_cast<int32_t>(i));
    }
    return leaves;
  }
};

inline std::string WorkloadPath(const std::string& relative) {
  return std::string(DEFT_WORKLOADS_DIR) + "/" + relative;
}

// NOT_FOUND when the file cannot be opened, INVALID_ARGUMENT when it is not JSON.
inline absl::StatusOr<nlohmann::json> LoadWorkloadJson(const std::string& relative) {
  const std::string path = WorkloadPath(relative);
  std::ifstream in(path);
  if (!in.good()) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  nlohmann::json json = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not JSON"));
  return json;
}

// One reasoning tree (an element of a reasoning/*.json list): the nodes reachable from "0".
// INVALID_ARGUMENT when a child id names no node or a node is unreachable.
inline absl::StatusOr<WorkloadTree> ReasoningTree(const nlohmann::json& recorded) {
  const nlohmann::json& data = recorded.at("data");
  WorkloadTree tree;
  std::vector<std::pair<std::string, int32_t>> stack = {{"0", -1}};
  while (!stack.empty()) {
    const auto [id, parent] = stack.back();
    stack.pop_back();
    if (!data.contains(id)) return absl::InvalidArgumentError(absl::StrCat("no node ", id));
    const nlohmann::json& node = data.at(id);
    tree.parent.push_back(parent);
    tree.length.push_back(node.at("value").get<int64_t>());
    const int32_t self = static_cast<int32_t>(tree.parent.size()) - 1;
    const nlohmann::json& children = node.at("children");
    for (auto it = children.rbegin(); it != children.rend(); ++it) {
      stack.push_back({std::to_string(it->get<int>()), self});
    }
  }
  if (tree.size() != data.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(tree.size(), " of ", data.size(), " nodes are reachable from node 0"));
  }
  return tree;
}

// Every tree of a reasoning file.
inline absl::StatusOr<std::vector<WorkloadTree>> LoadReasoningTrees(const std::string& relative) {
  auto json = LoadWorkloadJson(relative);
  if (!json.ok()) return json.status();
  if (!json->is_array()) return absl::InvalidArgumentError(relative + ": not a list of trees");
  std::vector<WorkloadTree> trees;
  for (size_t t = 0; t < json->size(); ++t) {
    auto tree = ReasoningTree((*json)[t]);
    if (!tree.ok())
      return absl::InvalidArgumentError(
          absl::StrCat(relative, " tree ", t, ": ", tree.status().message()));
    trees.push_back(std::move(*tree));
  }
  return trees;
}

// A Medusa token tree of Token_Tree_size nodes: node 0 is the implicit root (the last accepted
// token, length `root_length`: the prefix it ends), then the first size - 1 paths of
// Tree_Structure, one token each. INVALID_ARGUMENT when a path comes before its parent path.
inline absl::StatusOr<WorkloadTree> SpeculativeTree(const nlohmann::json& spec,
                                                    int64_t root_length) {
  WorkloadTree tree;
  tree.parent.push_back(-1);
  tree.length.push_back(root_length);
  std::map<std::vector<int>, int32_t> node_of = {{{}, 0}};
  const int size = spec.at("Token_Tree_size").get<int>();
  const nlohmann::json& paths = spec.at("Tree_Structure");
  for (int i = 0; i + 1 < size && i < static_cast<int>(paths.size()); ++i) {
    const std::vector<int> path = paths[i].get<std::vector<int>>();
    const auto parent = node_of.find(std::vector<int>(path.begin(), path.end() - 1));
    if (path.empty() || parent == node_of.end()) {
      return absl::InvalidArgumentError(absl::StrCat("path ", i, " comes before its parent"));
    }
    node_of[path] = static_cast<int32_t>(tree.size());
    tree.parent.push_back(parent->second);
    tree.length.push_back(1);
  }
  return tree;
}

// speculative/APPS_tree_size<size>.json.
inline absl::StatusOr<WorkloadTree> LoadSpeculativeTree(int size, int64_t root_length) {
  const std::string file = absl::StrCat("speculative/APPS_tree_size", size, ".json");
  auto json = LoadWorkloadJson(file);
  if (!json.ok()) return json.status();
  auto tree = SpeculativeTree(*json, root_length);
  if (!tree.ok())
    return absl::InvalidArgumentError(absl::StrCat(file, ": ", tree.status().message()));
  return tree;
}

// Few-shot prompting (no file): one prompt shared by `branches` children of `branch_length`.
inline WorkloadTree FewShotTree(int64_t prompt, int32_t branches, int64_t branch_length) {
  WorkloadTree tree;
  tree.parent.push_back(-1);
  tree.length.push_back(prompt);
  for (int32_t b = 0; b < branches; ++b) {
    tree.parent.push_back(0);
    tree.length.push_back(branch_length);
  }
  return tree;
}

constexpr const char* kReasoningFiles[] = {"reasoning/sorting128ToT.json",
                                           "reasoning/docmergeToT.json"};
constexpr int kSpeculativeSizes[] = {5, 10, 32, 64, 128};

}  // namespace deft::workloads
