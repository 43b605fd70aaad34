// Byte-level BPE (GPT-2 style: SmolLM2, Llama 3): text -> special-token split -> pre-tokenizer ->
// bytes mapped to GPT-2's printable byte alphabet -> merges by rank. Internal to engine/tokenizer;
// the public entry points are Tokenizer::FromGguf / FromTokenizerJson.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/vocab.h"

namespace deft {

// `merges`: token text pairs, best (rank 0) first. `ignore_merges`: a pre-token that is itself in
// the vocabulary becomes that token without merging (HF's BPE.ignore_merges, Llama 3).
// INVALID_ARGUMENT when a merge names a token the vocabulary lacks.
absl::StatusOr<std::unique_ptr<Tokenizer>> CreateBpeTokenizer(
    VocabData vocab, const std::vector<std::pair<std::string, std::string>>& merges,
    PreTokenizer pre_tokenizer, bool ignore_merges);

}  // namespace deft
