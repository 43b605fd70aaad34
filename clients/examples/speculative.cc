// speculative: speculative decoding against deft-server with a prompt-lookup draft tree.
//
// Each step drafts a token tree from earlier occurrences of the context's last n-gram
// (prompt_lookup.h), sends it to Verify on the tree's leaf, and appends what the server commits
// (the accepted draft tokens and the model's bonus token). Prints the acceptance length per step
// and tokens/s, then generates the same number of tokens with plain greedy Generate on a fresh
// tree and checks that the outputs are identical (exit 1 if not): greedy verification accepts a
// draft token only where greedy decoding would have produced it.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "clients/examples/example_common.h"
#include "clients/examples/prompt_lookup.h"

ABSL_FLAG(std::string, prompt,
          "Rename the variable total to result in this Python function and print the whole "
          "function.\n\ndef sum_of_squares(numbers):\n    total = 0\n    for n in numbers:\n"
          "        total += n * n\n    return total\n",
          "Prompt (sent as a user message through the chat template unless --raw)");
ABSL_FLAG(bool, raw, false, "Send --prompt as raw text instead of a chat message");
ABSL_FLAG(int32_t, max_tokens, 64, "Tokens to generate");
ABSL_FLAG(int32_t, max_ngram, 3, "Longest n-gram looked up in the context");
ABSL_FLAG(int32_t, candidates, 8, "Continuations merged into the draft tree");
ABSL_FLAG(int32_t, draft_depth, 6, "Tokens per continuation");
ABSL_FLAG(int32_t, draft_size, 32, "Most tokens in a draft tree");
ABSL_FLAG(bool, quiet, false, "Do not print every step");

namespace {

namespace pb = deft::v1;
using deft::examples::Fail;
constexpr char kProgram[] = "speculative";

double Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

absl::StatusOr<pb::CreateTreeResponse> CreatePromptTree(const deft::client::DeftClient& c) {
  const std::string prompt = absl::GetFlag(FLAGS_prompt);
  if (absl::GetFlag(FLAGS_raw)) return c.CreateTreeFromText(prompt);
  return c.CreateTreeFromChat({{"user", prompt}});
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Speculative decoding with prompt-lookup draft token trees, verified by deft-server's "
      "Verify; checks the output against greedy Generate.\n  speculative [--server HOST:PORT] "
      "[--prompt TEXT] [--max_tokens N] [--draft_size N] ...");
  absl::ParseCommandLine(argc, argv);
  const int32_t max_tokens = absl::GetFlag(FLAGS_max_tokens);
  deft::examples::DraftOptions draft_options;
  draft_options.max_ngram = absl::GetFlag(FLAGS_max_ngram);
  draft_options.max_candidates = absl::GetFlag(FLAGS_candidates);
  draft_options.depth = absl::GetFlag(FLAGS_draft_depth);
  draft_options.max_nodes = absl::GetFlag(FLAGS_draft_size);
  if (max_tokens < 1 || draft_options.max_ngram < 1 || draft_options.max_candidates < 1 ||
      draft_options.depth < 1 || draft_options.max_nodes < 1) {
    std::fprintf(stderr,
                 "%s: --max_tokens, --max_ngram, --candidates, --draft_depth and --draft_size "
                 "must be >= 1\n",
                 kProgram);
    return 2;
  }
  auto client = deft::examples::ConnectFromFlags();
  if (!client.ok()) return Fail(kProgram, "connect", client.status());
  const deft::client::DeftClient& c = **client;
  auto info = c.GetModelInfo();
  if (!info.ok()) return Fail(kProgram, "GetModelInfo", info.status());
  const std::vector<int32_t> eos(info->end_of_generation_token_ids().begin(),
                                 info->end_of_generation_token_ids().end());

  auto tree = CreatePromptTree(c);
  if (!tree.ok()) return Fail(kProgram, "CreateTree", tree.status());
  auto root = c.GetTree(tree->tree_id(), false, /*include_tokens=*/true);
  if (!root.ok()) return Fail(kProgram, "GetTree", root.status());
  std::vector<int32_t> context(root->nodes(0).tokens().begin(), root->nodes(0).tokens().end());
  const size_t prompt_len = context.size();
  const int32_t leaf = tree->root_node_id();

  // The speculative loop: draft, verify, commit.
  std::vector<int32_t> out;
  int steps = 0, drafted = 0, accepted_total = 0;
  bool hit_eos = false;
  const auto start = std::chrono::steady_clock::now();
  while (static_cast<int32_t>(out.size()) < max_tokens && !hit_eos) {
    deft::examples::DraftTree draft =
        deft::examples::BuildPromptLookupDraft(context, draft_options);
    if (draft.tokens.empty()) {  // no n-gram matched: guess the last token repeats
      draft.tokens = {context.back()};
      draft.parents = {-1};
    }
    auto v = c.Verify(tree->tree_id(), leaf, draft.tokens, draft.parents);
    if (!v.ok()) return Fail(kProgram, "Verify", v.status());
    ++steps;
    drafted += static_cast<int>(draft.tokens.size());
    accepted_total += v->accepted_indices_size();
    for (int32_t t : v->tokens()) {
      if (static_cast<int32_t>(out.size()) == max_tokens || hit_eos) break;
      out.push_back(t);
      context.push_back(t);
      hit_eos = std::find(eos.begin(), eos.end(), t) != eos.end();
    }
    if (!absl::GetFlag(FLAGS_quiet)) {
      std::printf("step %3d: draft %2zu tokens from %d candidates, accepted %d + 1 bonus\n", steps,
                  draft.tokens.size(), draft.candidates, v->accepted_indices_size());
    }
  }
  const double spec_seconds = Since(start);
  auto spec_text = c.Detokenize(out, /*skip_special=*/false);
  if (!spec_text.ok()) return Fail(kProgram, "Detokenize", spec_text.status());

  // Plain greedy decoding of as many tokens on a fresh tree of the same prompt.
  auto greedy_tree = CreatePromptTree(c);
  if (!greedy_tree.ok()) return Fail(kProgram, "CreateTree", greedy_tree.status());
  pb::GenerateRequest request;
  request.set_tree_id(greedy_tree->tree_id());
  pb::Branch* b = request.add_branches();
  b->set_node_id(greedy_tree->root_node_id());
  *b->mutable_sampling() =
      deft::examples::Sampling(0, 0, static_cast<int32_t>(std::max<size_t>(out.size(), 1)));
  b->mutable_sampling()->set_ignore_eos(true);  // `out` ends at an EOS token, if it has one
  const auto greedy_start = std::chrono::steady_clock::now();
  b->mutable_sampling()->set_top_logprobs(3);  // to explain a mismatch, should there be one
  auto greedy = c.GenerateCollected(request, /*keep_events=*/true);
  const double greedy_seconds = Since(greedy_start);
  if (!greedy.ok()) return Fail(kProgram, "Generate", greedy.status());
  const std::vector<int32_t>& greedy_tokens = (*greedy)[greedy_tree->root_node_id()].tokens;
  for (const std::string& id : {tree->tree_id(), greedy_tree->tree_id()}) {
    if (absl::Status s = c.DeleteTree(id); !s.ok()) return Fail(kProgram, "DeleteTree", s);
  }

  std::printf("--- output (%zu tokens after a %zu-token prompt) ---\n%s\n---\n", out.size(),
              prompt_len, spec_text->c_str());
  std::printf(
      "speculative: %zu tokens in %d verify steps (mean acceptance %.2f draft tokens of %.1f "
      "drafted per step; %.2f tokens per step), %.2fs, %.1f tokens/s\n",
      out.size(), steps, static_cast<double>(accepted_total) / steps,
      static_cast<double>(drafted) / steps, static_cast<double>(out.size()) / steps, spec_seconds,
      out.size() / std::max(spec_seconds, 1e-9));
  std::printf("greedy Generate: %zu tokens, %.2fs, %.1f tokens/s\n", greedy_tokens.size(),
              greedy_seconds, greedy_tokens.size() / std::max(greedy_seconds, 1e-9));
  if (greedy_tokens != out) {
    // Where they part, and how close greedy's top choices were there (a near-tie flips when the
    // batched verify pass rounds differently from the one-token decode step).
    size_t i = 0;
    while (i < out.size() && i < greedy_tokens.size() && out[i] == greedy_tokens[i]) ++i;
    std::string alternatives;
    const std::vector<pb::TokenEvent>& events = (*greedy)[greedy_tree->root_node_id()].events;
    size_t token_index = 0;
    for (const pb::TokenEvent& e : events) {
      if (e.token_id() < 0) continue;
      if (token_index++ != i) continue;
      for (const pb::TokenLogprob& alt : e.top_logprobs()) {
        absl::StrAppend(&alternatives, " ", alt.token_id(), " (logprob ", alt.logprob(), ")");
      }
    }
    std::printf(
        "MISMATCH: the speculative output differs from greedy Generate at token %zu: speculative "
        "%d, greedy %d; greedy's top choices there:%s\n  speculative: %s\n  greedy:      %s\n",
        i, i < out.size() ? out[i] : -1, i < greedy_tokens.size() ? greedy_tokens[i] : -1,
        alternatives.c_str(), absl::StrJoin(out, ",").c_str(),
        absl::StrJoin(greedy_tokens, ",").c_str());
    return 1;
  }
  std::printf("output equals greedy Generate: yes\n");
  return 0;
}
