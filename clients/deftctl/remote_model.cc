// deftctl model info | tokenize TEXT | detokenize IDS: the ModelService calls.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "clients/deftctl/remote.h"

ABSL_FLAG(bool, parse_special, false, "tokenize: \"<|im_start|>\" becomes its special token");
ABSL_FLAG(bool, add_bos, false, "tokenize: prepend the BOS token");
ABSL_FLAG(bool, skip_special, false, "detokenize: leave special tokens out of the text");

namespace deft::cli {

int RunModelCommand(const client::DeftClient& c, const std::string& command,
                    const std::vector<std::string>& args) {
  if (command == "model") {
    if (args.size() != 1 || args[0] != "info") return UsageError("usage: deftctl model info");
    auto info = c.GetModelInfo(CallFromFlags());
    if (!info.ok()) return Failed("GetModelInfo", info.status());
    std::printf(
        "name: %s\narchitecture: %s\nvocab_size: %lld\ncontext_length: %lld\nlayers: %lld\n"
        "hidden_size: %lld\nheads: %lld (kv heads: %lld)\nattention_mode: %s\nbackend: %s\n"
        "kv_pool: %lld blocks of %d tokens\nend_of_generation_token_ids: %s\n",
        info->name().c_str(), info->architecture().c_str(),
        static_cast<long long>(info->vocab_size()), static_cast<long long>(info->context_length()),
        static_cast<long long>(info->num_layers()), static_cast<long long>(info->hidden_size()),
        static_cast<long long>(info->num_heads()), static_cast<long long>(info->num_kv_heads()),
        info->attention_mode().c_str(), info->backend().c_str(),
        static_cast<long long>(info->kv_pool_blocks()), info->kv_block_tokens(),
        absl::StrJoin(info->end_of_generation_token_ids(), ",").c_str());
    return 0;
  }
  if (command == "tokenize") {
    if (args.size() != 1) return UsageError("usage: deftctl tokenize TEXT [--parse_special]");
    auto ids = c.Tokenize(args[0], absl::GetFlag(FLAGS_parse_special), absl::GetFlag(FLAGS_add_bos),
                          CallFromFlags());
    if (!ids.ok()) return Failed("Tokenize", ids.status());
    std::printf("%s\n", absl::StrJoin(*ids, ",").c_str());
    std::fprintf(stderr, "%zu tokens\n", ids->size());
    return 0;
  }
  // detokenize: ids as one comma-separated argument or several arguments.
  if (args.empty()) return UsageError("usage: deftctl detokenize IDS (e.g. 1,2,3)");
  std::vector<int32_t> ids;
  for (const std::string& a : args) {
    auto part = ParseIntList(a, "IDS");
    if (!part.ok()) return UsageError(part.status().message());
    ids.insert(ids.end(), part->begin(), part->end());
  }
  auto text = c.Detokenize(ids, absl::GetFlag(FLAGS_skip_special), CallFromFlags());
  if (!text.ok()) return Failed("Detokenize", text.status());
  std::printf("%s\n", text->c_str());
  return 0;
}

}  // namespace deft::cli
