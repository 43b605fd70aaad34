// deftctl tree {create, fork, extend, verify, beam, prune, show, delete, list}: one TreeService
// call each (generate lives in remote_generate.cc).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "clients/deftctl/flags.h"
#include "clients/deftctl/progress.h"
#include "clients/deftctl/remote.h"
#include "clients/deftctl/tree_drawing.h"

ABSL_FLAG(bool, chat, false,
          "tree create: send the prompt as a user message through the model's chat template "
          "(with --system)");
ABSL_FLAG(std::string, tokens, "", "Comma-separated token ids (tree create/extend/verify)");
ABSL_FLAG(std::string, parents, "",
          "tree verify: comma-separated parent index of each draft token (-1: child of the node); "
          "write it as --parents=-1,0,1");
ABSL_FLAG(int64_t, offset, -1, "tree fork: token offset inside the node (-1: its end)");
ABSL_FLAG(int32_t, count, 1, "tree fork: children to create");
ABSL_FLAG(int32_t, width, 4, "tree beam: beams kept");
ABSL_FLAG(int32_t, text_width, 60, "tree show: characters of text shown per node (0: all)");

namespace deft::cli {

namespace {

namespace pb = deft::v1;

constexpr char kTreeUsage[] =
    "usage: deftctl tree <command> ...\n"
    "  create [TEXT] [--prompt TEXT] [--chat [--system S]] [--tokens IDS]   prints the tree id\n"
    "  fork TREE NODE [--offset N] [--count N]      prints the new node ids\n"
    "  extend TREE NODE [TEXT] [--tokens IDS]       prints the node's length\n"
    "  generate TREE [NODE...] [--branches N] [--max_tokens N] [--temperature T] [--seed S] ...\n"
    "  verify TREE NODE --tokens IDS --parents=IDS  verifies a draft token tree\n"
    "  beam TREE NODE [--width N] [--max_tokens N]  beam search\n"
    "  prune TREE NODE | delete TREE | show TREE [--text_width N] | list";

// Checks the positional argument count: `want` required, up to `max` in all.
bool ArgsOk(const std::vector<std::string>& args, size_t want, size_t max, int* rc) {
  if (args.size() - 1 < want || args.size() - 1 > max) {
    *rc = UsageError(absl::StrCat("tree ", args[0], ": wrong number of arguments\n", kTreeUsage));
    return false;
  }
  return true;
}

// The text of `positional` or --prompt (exactly one of them), or --tokens.
struct PromptArg {
  std::string text;
  std::vector<int32_t> tokens;
  bool has_tokens = false;
};

absl::StatusOr<PromptArg> TextOrTokens(const std::vector<std::string>& args, size_t index,
                                       bool allow_prompt_flag) {
  PromptArg p;
  const bool positional = args.size() > index;
  const std::string flag = allow_prompt_flag ? absl::GetFlag(FLAGS_prompt) : "";
  const std::string tokens = absl::GetFlag(FLAGS_tokens);
  const int given = int{positional} + int{!flag.empty()} + int{!tokens.empty()};
  if (given != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("tree ", args[0], ": give exactly one of the text",
                     allow_prompt_flag ? ", --prompt" : "", " or --tokens"));
  }
  if (!tokens.empty()) {
    auto ids = ParseIntList(tokens, "--tokens");
    if (!ids.ok()) return ids.status();
    p.tokens = std::move(*ids);
    p.has_tokens = true;
  } else {
    p.text = positional ? args[index] : flag;
  }
  return p;
}

int Create(const client::DeftClient& c, const std::vector<std::string>& args) {
  int rc = 0;
  if (!ArgsOk(args, 0, 1, &rc)) return rc;
  auto prompt = TextOrTokens(args, 1, /*allow_prompt_flag=*/true);
  if (!prompt.ok()) return UsageError(prompt.status().message());
  absl::StatusOr<pb::CreateTreeResponse> r;
  if (prompt->has_tokens) {
    if (absl::GetFlag(FLAGS_chat))
      return UsageError("tree create: --chat takes text, not --tokens");
    r = c.CreateTreeFromTokens(prompt->tokens, CallFromFlags());
  } else if (absl::GetFlag(FLAGS_chat)) {
    std::vector<std::pair<std::string, std::string>> messages;
    if (std::string sys = absl::GetFlag(FLAGS_system); !sys.empty()) {
      messages.emplace_back("system", sys);
    }
    messages.emplace_back("user", prompt->text);
    r = c.CreateTreeFromChat(messages, /*add_generation_prompt=*/true, CallFromFlags());
  } else {
    r = c.CreateTreeFromText(prompt->text, CallFromFlags());
  }
  if (!r.ok()) return Failed("CreateTree", r.status());
  std::printf("%s\n", r->tree_id().c_str());
  std::fprintf(stderr, "root node %d, %d prompt tokens\n", r->root_node_id(), r->prompt_tokens());
  return 0;
}

// Parses args[index] as a node id.
bool NodeArg(const std::vector<std::string>& args, size_t index, int32_t* node, int* rc) {
  auto v = ParseInt32(args[index], "NODE");
  if (!v.ok()) {
    *rc = UsageError(v.status().message());
    return false;
  }
  *node = *v;
  return true;
}

int Fork(const client::DeftClient& c, const std::vector<std::string>& args) {
  int rc = 0;
  int32_t node = 0;
  if (!ArgsOk(args, 2, 2, &rc) || !NodeArg(args, 2, &node, &rc)) return rc;
  int64_t offset = absl::GetFlag(FLAGS_offset);
  if (offset == -1) {  // the node's end: its length, from the server
    auto tree = c.GetTree(args[1], false, false, CallFromFlags());
    if (!tree.ok()) return Failed("GetTree", tree.status());
    offset = -2;
    for (const pb::Node& n : tree->nodes()) {
      if (n.node_id() == node) offset = n.num_tokens();
    }
    if (offset == -2) {
      return Failed("fork",
                    absl::NotFoundError(absl::StrCat("no node ", node, " in tree ", args[1])));
    }
  }
  auto r = c.Fork(args[1], node, offset, absl::GetFlag(FLAGS_count), CallFromFlags());
  if (!r.ok()) return Failed("Fork", r.status());
  std::printf("%s\n", absl::StrJoin(r->node_ids(), " ").c_str());
  std::fprintf(stderr, "children of node %d\n", r->parent_node_id());
  return 0;
}

int Extend(const client::DeftClient& c, const std::vector<std::string>& args) {
  int rc = 0;
  int32_t node = 0;
  if (!ArgsOk(args, 2, 3, &rc) || !NodeArg(args, 2, &node, &rc)) return rc;
  auto content = TextOrTokens(args, 3, /*allow_prompt_flag=*/false);
  if (!content.ok()) return UsageError(content.status().message());
  auto r = content->has_tokens ? c.ExtendTokens(args[1], node, content->tokens, CallFromFlags())
                               : c.ExtendText(args[1], node, content->text, CallFromFlags());
  if (!r.ok()) return Failed("Extend", r.status());
  std::printf("%d\n", *r);
  return 0;
}

int Verify(const client::DeftClient& c, const std::vector<std::string>& args) {
  int rc = 0;
  int32_t node = 0;
  if (!ArgsOk(args, 2, 2, &rc) || !NodeArg(args, 2, &node, &rc)) return rc;
  auto tokens = ParseIntList(absl::GetFlag(FLAGS_tokens), "--tokens");
  if (!tokens.ok()) return UsageError(tokens.status().message());
  auto parents = ParseIntList(absl::GetFlag(FLAGS_parents), "--parents");
  if (!parents.ok()) return UsageError(parents.status().message());
  pb::SamplingParams sampling;
  sampling.set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  sampling.set_seed(absl::GetFlag(FLAGS_seed));
  WaitIndicator wait("verifying");
  auto r = c.Verify(args[1], node, *tokens, *parents, &sampling, CallFromFlags());
  if (!r.ok()) return Failed("Verify", r.status());
  wait.Write(stdout,
             absl::StrCat("accepted draft indices: ", absl::StrJoin(r->accepted_indices(), ","),
                          "\ncommitted tokens: ", absl::StrJoin(r->tokens(), ","),
                          "\ntext: ", r->text(), "\n"));
  return 0;
}

int Beam(const client::DeftClient& c, const std::vector<std::string>& args) {
  int rc = 0;
  int32_t node = 0;
  if (!ArgsOk(args, 2, 2, &rc) || !NodeArg(args, 2, &node, &rc)) return rc;
  pb::BeamSearchRequest request;
  request.set_tree_id(args[1]);
  request.set_node_id(node);
  request.set_width(absl::GetFlag(FLAGS_width));
  request.set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  WaitIndicator wait("beam search");
  auto r = c.BeamSearch(request, CallFromFlags());
  if (!r.ok()) return Failed("BeamSearch", r.status());
  std::string out;
  for (const pb::Beam& b : r->beams()) {
    absl::StrAppend(&out, "[node ", b.node_id(), "] score ", b.score(), " logprob ", b.logprob(),
                    b.finished() ? " finished" : "", ": ", b.text(), "\n");
  }
  wait.Write(stdout, out);
  return 0;
}

int Show(const client::DeftClient& c, const std::vector<std::string>& args) {
  int rc = 0;
  if (!ArgsOk(args, 1, 1, &rc)) return rc;
  if (absl::GetFlag(FLAGS_text_width) < 0) return UsageError("--text_width must be >= 0");
  auto tree = c.GetTree(args[1], /*include_text=*/true, /*include_tokens=*/false, CallFromFlags());
  if (!tree.ok()) return Failed("GetTree", tree.status());
  std::fputs(DrawTree(*tree, absl::GetFlag(FLAGS_text_width)).c_str(), stdout);
  return 0;
}

int List(const client::DeftClient& c, const std::vector<std::string>& args) {
  int rc = 0;
  if (!ArgsOk(args, 0, 0, &rc)) return rc;
  auto trees = c.ListTrees(CallFromFlags());
  if (!trees.ok()) return Failed("ListTrees", trees.status());
  for (const pb::TreeSummary& t : *trees) {
    std::printf("%s  %d nodes  %lld unique tokens\n", t.tree_id().c_str(), t.nodes(),
                static_cast<long long>(t.unique_tokens()));
  }
  if (trees->empty()) std::fprintf(stderr, "no trees\n");
  return 0;
}

}  // namespace

int RunTreeCommand(const client::DeftClient& c, const std::vector<std::string>& args) {
  if (args.empty()) return UsageError(kTreeUsage);
  const std::string& cmd = args[0];
  int rc = 0;
  int32_t node = 0;
  if (cmd == "create") return Create(c, args);
  if (cmd == "fork") return Fork(c, args);
  if (cmd == "extend") return Extend(c, args);
  if (cmd == "generate") return RunGenerateCommand(c, args);
  if (cmd == "verify") return Verify(c, args);
  if (cmd == "beam") return Beam(c, args);
  if (cmd == "show") return Show(c, args);
  if (cmd == "list") return List(c, args);
  if (cmd == "prune") {
    if (!ArgsOk(args, 2, 2, &rc) || !NodeArg(args, 2, &node, &rc)) return rc;
    absl::Status s = c.Prune(args[1], node, CallFromFlags());
    return s.ok() ? 0 : Failed("Prune", s);
  }
  if (cmd == "delete") {
    if (!ArgsOk(args, 1, 1, &rc)) return rc;
    absl::Status s = c.DeleteTree(args[1], CallFromFlags());
    return s.ok() ? 0 : Failed("DeleteTree", s);
  }
  return UsageError(absl::StrCat("unknown tree command '", cmd, "'\n", kTreeUsage));
}

}  // namespace deft::cli
