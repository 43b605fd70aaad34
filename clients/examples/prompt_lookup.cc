// Prompt-lookup draft trees; see prompt_lookup.h.
#include "clients/examples/prompt_lookup.h"

#include <algorithm>
#include <map>
#include <utility>

namespace deft::examples {

DraftTree BuildPromptLookupDraft(const std::vector<int32_t>& context, const DraftOptions& options) {
  DraftTree draft;
  // (parent index, token) -> index: the trie's edges.
  std::map<std::pair<int32_t, int32_t>, int32_t> child;
  const int64_t len = static_cast<int64_t>(context.size());
  for (int n = std::min<int64_t>(options.max_ngram, len - 1); n >= std::max(1, options.min_ngram);
       --n) {
    const int32_t* suffix = context.data() + len - n;
    // Occurrences ending before the suffix itself, most recent first.
    for (int64_t start = len - n - 1; start >= 0; --start) {
      if (draft.candidates >= options.max_candidates) return draft;
      if (!std::equal(suffix, suffix + n, context.data() + start)) continue;
      const int64_t from = start + n;
      const int64_t to = std::min<int64_t>(from + options.depth, len);
      int32_t parent = -1;
      bool added = false;
      for (int64_t i = from; i < to; ++i) {
        auto [it, inserted] = child.try_emplace({parent, context[i]}, 0);
        if (inserted) {
          if (static_cast<int>(draft.tokens.size()) >= options.max_nodes) {
            child.erase(it);
            break;
          }
          it->second = static_cast<int32_t>(draft.tokens.size());
          draft.tokens.push_back(context[i]);
          draft.parents.push_back(parent);
          added = true;
        }
        parent = it->second;
      }
      if (added) ++draft.candidates;
      if (static_cast<int>(draft.tokens.size()) >= options.max_nodes) return draft;
    }
  }
  return draft;
}

}  // namespace deft::examples
