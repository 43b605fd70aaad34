// deftctl tree generate TREE [NODE...] [--branches N] [sampling flags]: generates on leaves of a
// tree and streams the text as it arrives. One branch: its text goes to stdout unchanged. Several:
// each completed line is printed as "[node N] <line>" as soon as it is complete (so branches
// interleave line by line), the rest when the branch finishes. Finish reasons, token counts and
// the time to first token go to stderr.
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "clients/deftctl/flags.h"
#include "clients/deftctl/progress.h"
#include "clients/deftctl/remote.h"

ABSL_FLAG(int32_t, branches, 1,
          "tree generate: fork this many children at the end of each node and generate on them "
          "(1: generate on the nodes themselves)");
ABSL_FLAG(bool, ignore_eos, false, "tree generate: keep going past end-of-generation tokens");

namespace deft::cli {

namespace {

namespace pb = deft::v1;

std::string FinishName(pb::FinishReason reason) {
  std::string name(absl::StripPrefix(pb::FinishReason_Name(reason), "FINISH_REASON_"));
  absl::AsciiStrToLower(&name);
  return name;
}

pb::SamplingParams SamplingFromFlags(uint64_t seed_offset) {
  pb::SamplingParams p;
  p.set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  p.set_top_k(absl::GetFlag(FLAGS_top_k));
  p.set_top_p(static_cast<float>(absl::GetFlag(FLAGS_top_p)));
  p.set_min_p(static_cast<float>(absl::GetFlag(FLAGS_min_p)));
  p.set_repetition_penalty(static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty)));
  p.set_seed(absl::GetFlag(FLAGS_seed) + seed_offset);
  p.set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  p.set_ignore_eos(absl::GetFlag(FLAGS_ignore_eos));
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_stop), ',', absl::SkipEmpty())) {
    p.add_stop(std::string(s));
  }
  return p;
}

// Prints branches' text: unchanged for one branch, line by line with a node tag for several.
class BranchPrinter {
 public:
  BranchPrinter(WaitIndicator* out, bool tagged) : out_(out), tagged_(tagged) {}

  void Text(int32_t node, const std::string& text) {
    if (!tagged_) {
      out_->Write(stdout, text);
      return;
    }
    std::string& pending = pending_[node];
    pending += text;
    size_t newline;
    while ((newline = pending.find('\n')) != std::string::npos) {
      out_->Write(stdout, absl::StrCat("[node ", node, "] ", pending.substr(0, newline + 1)));
      pending.erase(0, newline + 1);
    }
  }

  void Finish(const pb::FinishEvent& f) {
    std::string& pending = pending_[f.node_id()];
    if (tagged_ && !pending.empty()) {
      out_->Write(stdout, absl::StrCat("[node ", f.node_id(), "] ", pending, "\n"));
    } else if (!tagged_) {
      out_->Write(stdout, "\n");
    }
    pending.clear();
    out_->Write(stderr,
                absl::StrFormat("[node %d] finish: %s, %d tokens, first token after %.2fs\n",
                                f.node_id(), FinishName(f.reason()), f.usage().completion_tokens(),
                                f.usage().time_to_first_token_seconds()));
  }

 private:
  WaitIndicator* out_;
  bool tagged_;
  std::map<int32_t, std::string> pending_;
};

}  // namespace

int RunGenerateCommand(const client::DeftClient& c, const std::vector<std::string>& args) {
  if (args.size() < 2) return UsageError("usage: deftctl tree generate TREE [NODE...] [flags]");
  const std::string& tree_id = args[1];
  const int32_t branches = absl::GetFlag(FLAGS_branches);
  if (branches < 1) return UsageError("--branches must be >= 1");
  std::vector<int32_t> nodes;
  for (size_t i = 2; i < args.size(); ++i) {
    auto v = ParseInt32(args[i], "NODE");
    if (!v.ok()) return UsageError(v.status().message());
    nodes.push_back(*v);
  }
  const client::CallOptions call = CallFromFlags();
  // The tree gives the leaves (no nodes named) and the nodes' lengths (forking at their ends).
  if (nodes.empty() || branches > 1) {
    auto tree = c.GetTree(tree_id, false, false, call);
    if (!tree.ok()) return Failed("GetTree", tree.status());
    std::map<int32_t, int32_t> length;
    for (const pb::Node& n : tree->nodes()) {
      length[n.node_id()] = n.num_tokens();
      if (n.children_size() == 0 && !n.generating() && args.size() == 2) {
        nodes.push_back(n.node_id());
      }
    }
    if (nodes.empty()) {
      return Failed("generate", absl::FailedPreconditionError(
                                    absl::StrCat("tree ", tree_id, " has no idle leaf")));
    }
    if (branches > 1) {
      std::vector<int32_t> children;
      for (int32_t node : nodes) {
        auto it = length.find(node);
        const int64_t offset = it == length.end() ? 0 : it->second;  // unknown: the server says
        auto forked = c.Fork(tree_id, node, offset, branches, call);
        if (!forked.ok()) return Failed("Fork", forked.status());
        children.insert(children.end(), forked->node_ids().begin(), forked->node_ids().end());
      }
      nodes = std::move(children);
    }
  }
  pb::GenerateRequest request;
  request.set_tree_id(tree_id);
  for (size_t i = 0; i < nodes.size(); ++i) {
    pb::Branch* b = request.add_branches();
    b->set_node_id(nodes[i]);
    *b->mutable_sampling() = SamplingFromFlags(i);
  }

  WaitIndicator wait("generating");
  BranchPrinter printer(&wait, nodes.size() > 1);
  int64_t tokens = 0;
  const auto start = std::chrono::steady_clock::now();
  auto finished = c.Generate(
      request,
      [&](const pb::GenerateEvent& e) {
        if (e.has_token()) {
          if (e.token().token_id() >= 0) ++tokens;
          printer.Text(e.token().node_id(), e.token().text());
        } else {
          printer.Finish(e.finish());
        }
        return true;
      },
      call);
  if (!finished.ok()) {
    wait.Write(stdout, "\n");
    return Failed("Generate", finished.status());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  wait.Write(stderr, absl::StrFormat("%d branch%s, %d tokens in %.2fs (%.1f tokens/s)\n",
                                     nodes.size(), nodes.size() == 1 ? "" : "es", tokens, seconds,
                                     tokens / std::max(seconds, 1e-9)));
  return 0;
}

}  // namespace deft::cli
