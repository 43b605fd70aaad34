// few_shot: self-consistency voting. One few-shot prompt becomes one tree; W children forked at
// its end each sample an answer with their own seed, all W generated in one Generate call (they
// share the prompt's KV cache on the server); the numbers after "The answer is" are extracted
// and the majority wins.
#include <algorithm>
#include <cstdio>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "clients/examples/example_common.h"

ABSL_FLAG(std::string, question,
          "A baker makes 4 trays of cookies with 6 cookies on each tray. He sells 10 cookies. "
          "How many cookies are left?",
          "The question to answer");
ABSL_FLAG(int32_t, samples, 8, "W: samples drawn (branches)");
ABSL_FLAG(double, temperature, 0.7, "Sampling temperature");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the first sample (sample i uses seed + i)");
ABSL_FLAG(int32_t, max_tokens, 48, "Tokens per sample at most");

namespace {

namespace pb = deft::v1;
using deft::examples::Fail;
constexpr char kProgram[] = "few_shot";

constexpr char kShots[] =
    "Q: Tom has 3 apples and buys 5 more. How many apples does he have?\n"
    "A: Tom has 3 + 5 = 8 apples. The answer is 8.\n\n"
    "Q: A box holds 12 pencils. Anna takes 4 pencils out. How many pencils are in the box?\n"
    "A: 12 - 4 = 8 pencils are left. The answer is 8.\n\n"
    "Q: There are 3 bags with 7 marbles in each bag. How many marbles are there?\n"
    "A: 3 * 7 = 21 marbles. The answer is 21.\n\n";

// The number after "answer is", else the last number in the text.
std::optional<std::string> ExtractAnswer(const std::string& text) {
  static const std::regex kAnswer(R"(answer is\s*\$?(-?[0-9][0-9,]*))", std::regex::icase);
  static const std::regex kNumber(R"(-?[0-9][0-9,]*)");
  std::smatch m;
  if (std::regex_search(text, m, kAnswer)) return absl::StrReplaceAll(m[1].str(), {{",", ""}});
  std::optional<std::string> last;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), kNumber);
       it != std::sregex_iterator(); ++it) {
    last = absl::StrReplaceAll(it->str(), {{",", ""}});
  }
  return last;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Few-shot self-consistency: W samples of one few-shot prompt (forked branches of one tree, "
      "different seeds), majority vote over their answers.\n  few_shot [--server HOST:PORT] "
      "[--question TEXT] [--samples W] [--temperature T]");
  absl::ParseCommandLine(argc, argv);
  const int32_t samples = absl::GetFlag(FLAGS_samples);
  if (samples < 1) {
    std::fprintf(stderr, "%s: --samples must be >= 1\n", kProgram);
    return 2;
  }
  auto client = deft::examples::ConnectFromFlags();
  if (!client.ok()) return Fail(kProgram, "connect", client.status());
  const deft::client::DeftClient& c = **client;

  const std::string prompt = absl::StrCat(kShots, "Q: ", absl::GetFlag(FLAGS_question), "\nA:");
  auto tree = c.CreateTreeFromText(prompt);
  if (!tree.ok()) return Fail(kProgram, "CreateTree", tree.status());
  auto forked = c.Fork(tree->tree_id(), tree->root_node_id(), tree->prompt_tokens(), samples);
  if (!forked.ok()) return Fail(kProgram, "Fork", forked.status());

  pb::GenerateRequest request;
  request.set_tree_id(tree->tree_id());
  for (int i = 0; i < samples; ++i) {
    pb::Branch* b = request.add_branches();
    b->set_node_id(forked->node_ids(i));
    *b->mutable_sampling() =
        deft::examples::Sampling(static_cast<float>(absl::GetFlag(FLAGS_temperature)),
                                 absl::GetFlag(FLAGS_seed) + i, absl::GetFlag(FLAGS_max_tokens));
    b->mutable_sampling()->add_stop(std::string(1, '\n'));
  }
  auto outputs = c.GenerateCollected(request);
  if (!outputs.ok()) return Fail(kProgram, "Generate", outputs.status());
  auto shape = c.GetTree(tree->tree_id(), false, false);
  if (!shape.ok()) return Fail(kProgram, "GetTree", shape.status());

  std::map<std::string, int> votes;
  std::vector<std::string> first_seen;
  for (int i = 0; i < samples; ++i) {
    const std::string& text = (*outputs)[forked->node_ids(i)].text;
    std::optional<std::string> answer = ExtractAnswer(text);
    std::printf("sample %2d (seed %llu): %-10s|%s\n", i,
                static_cast<unsigned long long>(absl::GetFlag(FLAGS_seed) + i),
                answer ? answer->c_str() : "(none)", text.c_str());
    if (!answer) continue;
    if (votes[*answer]++ == 0) first_seen.push_back(*answer);
  }
  if (absl::Status s = c.DeleteTree(tree->tree_id()); !s.ok()) {
    return Fail(kProgram, "DeleteTree", s);
  }
  std::printf("tree: %lld KV blocks for %lld unique tokens (sequence-per-branch layout: %lld)\n",
              static_cast<long long>(shape->kv_blocks()),
              static_cast<long long>(shape->unique_tokens()),
              static_cast<long long>(shape->sequence_layout_tokens()));
  if (first_seen.empty()) {
    std::printf("no sample gave an answer\n");
    return 1;
  }
  // Most votes; ties go to the answer seen first.
  const std::string best = *std::max_element(
      first_seen.begin(), first_seen.end(),
      [&](const std::string& a, const std::string& b) { return votes[a] < votes[b]; });
  std::printf("majority answer: %s (%d of %d votes)\n", best.c_str(), votes[best], samples);
  return 0;
}
