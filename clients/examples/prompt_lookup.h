// Prompt-lookup drafting for speculative decoding: the draft token tree for the next step is
// built from earlier occurrences of the context's last n-gram. Each occurrence proposes the
// tokens that followed it; the candidates are merged into a token tree (a trie: candidates that
// share a prefix share its nodes), the shape of the Medusa trees in
// shared/workloads/speculative/APPS_tree_size*.json (several candidates at the first level,
// narrowing with depth).
//
// Candidates are taken longest n-gram first (from max_ngram down to min_ngram), most recent
// occurrence first, and each adds its tokens until the tree holds max_nodes. A pure function,
// no I/O; safe from any thread.
#pragma once

#include <cstdint>
#include <vector>

namespace deft::examples {

struct DraftOptions {
  int max_ngram = 3;       // longest suffix n-gram looked up
  int min_ngram = 1;       // shortest
  int max_candidates = 8;  // distinct continuations merged
  int depth = 6;           // tokens per continuation
  int max_nodes = 32;      // tokens in the draft tree
};

// A draft token tree in VerifyRequest's layout: parents[i] is -1 for a child of the current
// leaf, else an earlier index.
struct DraftTree {
  std::vector<int32_t> tokens;
  std::vector<int32_t> parents;
  int candidates = 0;  // continuations found (0: no n-gram matched; the tree is empty)
};

DraftTree BuildPromptLookupDraft(const std::vector<int32_t>& context, const DraftOptions& options);

}  // namespace deft::examples
