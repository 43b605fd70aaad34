#include "engine/attention/workload_forest.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace deft {
namespace {

absl::StatusOr<nlohmann::json> ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in.good()) return absl::NotFoundError(absl::StrCat("cannot open workload file ", path));
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, " is not valid JSON"));
  return j;
}

std::string Basename(const std::string& path) {
  return std::filesystem::path(path).stem().string();
}

}  // namespace

int32_t WorkloadForest::Add(int32_t parent_segment, int32_t tokens) {
  parent.push_back(parent_segment);
  length.push_back(tokens);
  return static_cast<int32_t>(parent.size()) - 1;
}

int64_t WorkloadForest::total_tokens() const {
  int64_t n = 0;
  for (int32_t l : length) n += l;
  return n;
}

std::vector<PlanSegment> WorkloadForest::Segments(
    const std::vector<std::vector<int32_t>>& slots_of) const {
  std::vector<PlanSegment> segments(parent.size());
  for (size_t i = 0; i < parent.size(); ++i) segments[i] = {parent[i], slots_of[i]};
  return segments;
}

std::vector<std::vector<int32_t>> WorkloadForest::ContiguousSlots(int32_t first_slot) const {
  std::vector<std::vector<int32_t>> slots(length.size());
  int32_t next = first_slot;
  for (size_t i = 0; i < length.size(); ++i) {
    slots[i].resize(length[i]);
    for (int32_t& s : slots[i]) s = next++;
  }
  return slots;
}

absl::StatusOr<int32_t> CountReasoningTrees(const std::string& path) {
  absl::StatusOr<nlohmann::json> j = ReadJson(path);
  if (!j.ok()) return j.status();
  if (!j->is_array()) return absl::InvalidArgumentError(absl::StrCat(path, ": not a list of trees"));
  return static_cast<int32_t>(j->size());
}

absl::StatusOr<WorkloadForest> LoadReasoningForest(const std::string& path, int32_t tree_index,
                                                   int32_t prompt_tokens,
                                                   int32_t max_node_tokens) {
  absl::StatusOr<nlohmann::json> j = ReadJson(path);
  if (!j.ok()) return j.status();
  if (!j->is_array() || tree_index < 0 || tree_index >= static_cast<int32_t>(j->size())) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": no tree ", tree_index, " (", j->is_array() ? j->size() : 0,
                     " trees)"));
  }
  const nlohmann::json& data = (*j)[tree_index].value("data", nlohmann::json());
  if (!data.is_object() || !data.contains("0")) {
    return absl::InvalidArgumentError(absl::StrCat(path, " tree ", tree_index, ": no node 0"));
  }
  WorkloadForest f;
  f.name = absl::StrCat(Basename(path), " tree ", tree_index);
  std::vector<std::pair<std::string, int32_t>> stack = {{"0", -1}};
  while (!stack.empty()) {
    const auto [id, parent] = stack.back();
    stack.pop_back();
    if (!data.contains(id) || f.parent.size() > data.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, " tree ", tree_index, ": bad child id ", id));
    }
    const nlohmann::json& node = data.at(id);
    int32_t len = node.value("value", 0);
    if (id == "0" && prompt_tokens > 0) len = prompt_tokens;
    if (id != "0" && max_node_tokens > 0) len = std::min(len, max_node_tokens);
    const int32_t s = f.Add(parent, len);
    const nlohmann::json children = node.value("children", nlohmann::json::array());
    if (children.empty()) f.queries.push_back({s, len});
    for (auto it = children.rbegin(); it != children.rend(); ++it) {
      stack.push_back({std::to_string(it->get<int>()), s});
    }
  }
  return f;
}

absl::StatusOr<WorkloadForest> LoadSpeculativeForest(const std::string& path,
                                                     int32_t prefix_tokens) {
  absl::StatusOr<nlohmann::json> j = ReadJson(path);
  if (!j.ok()) return j.status();
  if (!j->contains("Token_Tree_size") || !j->contains("Tree_Structure")) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": needs Token_Tree_size and Tree_Structure"));
  }
  WorkloadForest f;
  f.name = absl::StrCat(Basename(path), ", prefix ", prefix_tokens);
  f.queries.push_back({f.Add(-1, prefix_tokens), prefix_tokens});
  std::map<std::vector<int>, int32_t> segment_of;
  const int size = j->at("Token_Tree_size").get<int>();
  const nlohmann::json& paths = j->at("Tree_Structure");
  for (int i = 0; i + 1 < size && i < static_cast<int>(paths.size()); ++i) {
    const std::vector<int> p = paths[i].get<std::vector<int>>();
    int32_t parent = 0;
    if (p.size() > 1) {
      const auto it = segment_of.find(std::vector<int>(p.begin(), p.end() - 1));
      if (it == segment_of.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": path ", i, " comes before its parent"));
      }
      parent = it->second;
    }
    const int32_t s = f.Add(parent, 1);
    segment_of[p] = s;
    f.queries.push_back({s, 1});
  }
  return f;
}

WorkloadForest FewShotForest(int32_t prompt_tokens, int32_t branches, int32_t branch_tokens) {
  WorkloadForest f;
  f.name = absl::StrCat("few-shot: prompt ", prompt_tokens, ", ", branches, " branches x ",
                        branch_tokens);
  f.Add(-1, prompt_tokens);
  for (int32_t b = 0; b < branches; ++b) f.queries.push_back({f.Add(0, branch_tokens), branch_tokens});
  return f;
}

WorkloadForest ChainForest(int32_t tokens) {
  WorkloadForest f;
  f.name = absl::StrCat("chain of ", tokens);
  f.queries.push_back({f.Add(-1, tokens), tokens});
  return f;
}

WorkloadForest SiblingsForest(int32_t prompt_tokens, int32_t count) {
  WorkloadForest f;
  f.name = absl::StrCat(count, " one-token siblings under ", prompt_tokens);
  f.queries.push_back({f.Add(-1, prompt_tokens), prompt_tokens});
  for (int32_t i = 0; i < count; ++i) f.queries.push_back({f.Add(0, 1), 1});
  return f;
}

std::string WorkloadsDir(const std::string& fallback) {
  const char* env = std::getenv("DEFT_WORKLOADS_DIR");
  if (env != nullptr && *env != '\0') return env;
  return fallback;
}

}  // namespace deft
