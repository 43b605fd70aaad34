// tree_of_thought: Tree-of-Thoughts search on one deft-server tree.
//
// The problem is a chat prompt (the tree's root). At each depth every kept node forks k children
// at its end and all of them are generated in one Generate call (one "thought" each: sampled up to
// a newline, own seed). The model then scores each thought: a separate short chat asks whether
// the last step is correct and useful, and the score is P(yes) / (P(yes) + P(no)) read from the
// top log-probabilities of its first answer token (the scoring calls run concurrently; the server
// batches them). The `beam` best thoughts are kept; the others are pruned from the tree. After
// `depth` levels the best path (highest mean score) is printed.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <future>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "clients/examples/example_common.h"

ABSL_FLAG(std::string, problem,
          "A farmer has 3 fields. Each field has 12 apple trees, and each tree gives 40 apples. "
          "How many apples does the farmer get in total?",
          "The problem to solve");
ABSL_FLAG(int32_t, k, 3, "Thoughts expanded per kept node");
ABSL_FLAG(int32_t, beam, 2, "Thoughts kept per depth");
ABSL_FLAG(int32_t, depth, 3, "Depth of the search (steps)");
ABSL_FLAG(int32_t, step_tokens, 40, "Tokens per thought at most");
ABSL_FLAG(double, temperature, 0.8, "Sampling temperature of the thoughts");
ABSL_FLAG(uint64_t, seed, 1, "Base seed");
ABSL_FLAG(bool, keep_tree, false, "Leave the tree on the server (prints its id)");

namespace {

namespace pb = deft::v1;
using deft::client::DeftClient;
using deft::examples::Fail;
constexpr char kProgram[] = "tree_of_thought";

struct Thought {
  int32_t node = 0;
  std::vector<std::string> steps;  // the path's steps, root first
  double score_sum = 0;            // over the path's steps
  double last_score = 0;
  bool rated = false;  // yes or no appeared among the top log-probabilities
  double mean() const { return steps.empty() ? 0 : score_sum / steps.size(); }
};

// P(yes) / (P(yes) + P(no)) from the first answer token's alternatives; nullopt-like `rated`
// false when neither word is among them.
absl::Status Rate(const DeftClient& c, const std::string& problem, Thought* t) {
  std::string steps;
  for (size_t i = 0; i < t->steps.size(); ++i)
    absl::StrAppend(&steps, i + 1, ". ", t->steps[i], "\n");
  auto tree = c.CreateTreeFromChat(
      {{"user", absl::StrCat("Problem: ", problem, "\nSteps so far:\n", steps,
                             "Is the last step correct and useful for solving the problem? "
                             "Answer yes or no.")}});
  if (!tree.ok()) return tree.status();
  pb::GenerateRequest request;
  request.set_tree_id(tree->tree_id());
  pb::Branch* b = request.add_branches();
  b->set_node_id(tree->root_node_id());
  *b->mutable_sampling() = deft::examples::Sampling(0, 0, 1);
  b->mutable_sampling()->set_top_logprobs(20);
  auto out = c.GenerateCollected(request, /*keep_events=*/true);
  absl::Status deleted = c.DeleteTree(tree->tree_id());
  if (!out.ok()) return out.status();
  if (!deleted.ok()) return deleted;
  double yes = 0, no = 0;
  for (const pb::TokenEvent& e : (*out)[tree->root_node_id()].events) {
    for (const pb::TokenLogprob& alt : e.top_logprobs()) {
      const std::string word = absl::AsciiStrToLower(absl::StripAsciiWhitespace(alt.text()));
      if (word == "yes") yes += std::exp(alt.logprob());
      if (word == "no") no += std::exp(alt.logprob());
    }
    break;  // the first token only
  }
  t->rated = yes + no > 0;
  t->last_score = t->rated ? yes / (yes + no) : 0;
  t->score_sum += t->last_score;
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Tree-of-Thoughts search: expand k thoughts per node, let the model rate them, keep the "
      "best `beam`, prune the rest, repeat `depth` times; prints the best path.\n"
      "  tree_of_thought [--server HOST:PORT] [--problem TEXT] [--k 3] [--beam 2] [--depth 3]");
  absl::ParseCommandLine(argc, argv);
  const int32_t k = absl::GetFlag(FLAGS_k), beam = absl::GetFlag(FLAGS_beam);
  const int32_t depth = absl::GetFlag(FLAGS_depth);
  if (k < 1 || beam < 1 || depth < 1 || absl::GetFlag(FLAGS_step_tokens) < 1) {
    std::fprintf(stderr, "%s: --k, --beam, --depth and --step_tokens must be >= 1\n", kProgram);
    return 2;
  }
  const std::string problem = absl::GetFlag(FLAGS_problem);
  auto client = deft::examples::ConnectFromFlags();
  if (!client.ok()) return Fail(kProgram, "connect", client.status());
  const DeftClient& c = **client;

  auto tree = c.CreateTreeFromChat(
      {{"system", "Solve the problem step by step. Write one short step per line."},
       {"user", problem}});
  if (!tree.ok()) return Fail(kProgram, "CreateTree", tree.status());
  const std::string id = tree->tree_id();
  std::vector<Thought> frontier(1);
  frontier[0].node = tree->root_node_id();

  for (int32_t d = 1; d <= depth; ++d) {
    // Lengths of the kept nodes (children fork at their ends).
    auto shape = c.GetTree(id, false, false);
    if (!shape.ok()) return Fail(kProgram, "GetTree", shape.status());
    std::map<int32_t, int32_t> length;
    for (const pb::Node& n : shape->nodes()) length[n.node_id()] = n.num_tokens();

    std::vector<Thought> candidates;
    pb::GenerateRequest request;
    request.set_tree_id(id);
    for (const Thought& parent : frontier) {
      auto forked = c.Fork(id, parent.node, length[parent.node], k);
      if (!forked.ok()) return Fail(kProgram, "Fork", forked.status());
      for (int32_t child : forked->node_ids()) {
        Thought t = parent;
        t.node = child;
        candidates.push_back(t);
        pb::Branch* b = request.add_branches();
        b->set_node_id(child);
        *b->mutable_sampling() =
            deft::examples::Sampling(static_cast<float>(absl::GetFlag(FLAGS_temperature)),
                                     absl::GetFlag(FLAGS_seed) + 1000 * d + candidates.size(),
                                     absl::GetFlag(FLAGS_step_tokens));
        b->mutable_sampling()->add_stop(std::string(1, '\n'));
      }
    }
    auto outputs = c.GenerateCollected(request);
    if (!outputs.ok()) return Fail(kProgram, "Generate", outputs.status());
    for (Thought& t : candidates) {
      t.steps.push_back(std::string(absl::StripAsciiWhitespace((*outputs)[t.node].text)));
    }

    // Rate every candidate concurrently.
    std::vector<std::future<absl::Status>> ratings;
    for (Thought& t : candidates) {
      ratings.push_back(
          std::async(std::launch::async, [&c, &problem, &t] { return Rate(c, problem, &t); }));
    }
    for (auto& r : ratings) {
      if (absl::Status s = r.get(); !s.ok()) return Fail(kProgram, "rating", s);
    }

    std::stable_sort(candidates.begin(), candidates.end(),
                     [](const Thought& a, const Thought& b) { return a.mean() > b.mean(); });
    std::printf("depth %d:\n", d);
    for (size_t i = 0; i < candidates.size(); ++i) {
      const Thought& t = candidates[i];
      const bool kept = static_cast<int32_t>(i) < beam;
      std::printf("  [node %3d] %s  score %.2f%s  mean %.2f  %s\n", t.node,
                  kept ? "keep " : "prune", t.last_score, t.rated ? "" : " (no yes/no)", t.mean(),
                  t.steps.back().c_str());
      if (kept) continue;
      if (absl::Status s = c.Prune(id, t.node); !s.ok()) return Fail(kProgram, "Prune", s);
    }
    candidates.resize(std::min<size_t>(candidates.size(), beam));
    // The next thought starts on a new line (the stop string "\n" is not part of the output).
    for (const Thought& t : candidates) {
      auto extended = c.ExtendText(id, t.node, "\n");
      if (!extended.ok()) return Fail(kProgram, "Extend", extended.status());
    }
    frontier = std::move(candidates);
  }

  const Thought& best = frontier.front();
  std::printf("\nbest path (mean score %.2f):\n", best.mean());
  for (size_t i = 0; i < best.steps.size(); ++i) {
    std::printf("  %zu. %s\n", i + 1, best.steps[i].c_str());
  }
  auto shape = c.GetTree(id, false, false);
  if (!shape.ok()) return Fail(kProgram, "GetTree", shape.status());
  std::printf("tree: %d nodes, %lld KV blocks, %lld unique tokens (sequence-per-branch: %lld)\n",
              shape->nodes_size(), static_cast<long long>(shape->kv_blocks()),
              static_cast<long long>(shape->unique_tokens()),
              static_cast<long long>(shape->sequence_layout_tokens()));
  if (absl::GetFlag(FLAGS_keep_tree)) {
    std::printf("tree id: %s\n", id.c_str());
  } else if (absl::Status s = c.DeleteTree(id); !s.ok()) {
    return Fail(kProgram, "DeleteTree", s);
  }
  return 0;
}
