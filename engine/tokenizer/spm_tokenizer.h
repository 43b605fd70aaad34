// SentencePiece-style BPE (Llama 2: tokenizer.ggml.model == "llama"): spaces become U+2581, a
// space is prefixed to each text fragment that starts the input or follows a special token (as
// llama.cpp does), adjacent pieces merge best score first, and characters without a piece fall
// back to <0xXX> byte tokens (or the unknown token). Internal to engine/tokenizer.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "engine/tokenizer/vocab.h"

namespace deft {

// REQUIRES: vocab.scores has one score per token (or is empty: all scores 0).
absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSpmTokenizer(VocabData vocab,
                                                              bool add_space_prefix);

}  // namespace deft
