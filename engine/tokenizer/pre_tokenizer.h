// Pre-tokenizers of byte-level BPE models: hand-written scanners equivalent to the split regexes of
// Hugging Face tokenizers / llama.cpp (std::regex is slow and has no \p{L}). Each splits UTF-8
// text into pieces that BPE then merges independently; concatenating the pieces gives the input
// back. Bytes that are not well-formed UTF-8 count as "other" characters (neither letter, number
// nor space).
//
// Thread safety: stateless.
#pragma once

#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace deft {

enum class PreTokenizer {
  // GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2,
  // SmolLM / StarCoder: every \p{N} character is its own piece first (HF Digits with
  // individual_digits, llama.cpp's "\p{N}" split), then GPT-2 on the text between.
  kSmolLm,
  // Llama 3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
  //          ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  kLlama3,
};

// The pre-tokenizer a GGUF names in tokenizer.ggml.pre (llama.cpp's names). INVALID_ARGUMENT for
// names whose split this file does not implement.
absl::StatusOr<PreTokenizer> PreTokenizerFromGgufName(std::string_view name);

// Appends the pieces of `text` to *pieces (views into `text`).
void PreTokenize(PreTokenizer kind, std::string_view text, std::vector<std::string_view>* pieces);

}  // namespace deft
