// Pre-tokenizer scanners; see pre_tokenizer.h. Each Match* function returns where the regex's
// leftmost-first match starting at code point `i` ends, with `end` bounding look-ahead the way the
// end of the string does for the regex (HF runs the regex on each piece of an earlier split).
#include "engine/tokenizer/pre_tokenizer.h"

#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer/unicode.h"

namespace deft {
namespace {

enum CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

// The text as code points, with each one's class and byte offset (offsets has one extra entry:
// the text's length).
struct Codepoints {
  std::vector<uint32_t> cps;
  std::vector<uint8_t> cls;
  std::vector<size_t> offsets;

  explicit Codepoints(std::string_view text) {
    cps.reserve(text.size());
    cls.reserve(text.size());
    offsets.reserve(text.size() + 1);
    size_t pos = 0;
    while (pos < text.size()) {
      size_t len = 1;
      const uint32_t cp = DecodeUtf8(text, pos, &len);
      const uint8_t f = cp == kInvalidCodepoint ? 0 : UnicodeFlags(cp);
      cps.push_back(cp);
      cls.push_back((f & kUnicodeLetter)       ? kLetter
                    : (f & kUnicodeNumber)     ? kNumber
                    : (f & kUnicodeRegexSpace) ? kSpace
                                               : kOther);
      offsets.push_back(pos);
      pos += len;
    }
    offsets.push_back(text.size());
  }
  size_t size() const { return cps.size(); }
};

bool IsContractionLetter(uint32_t c) { return c == 's' || c == 't' || c == 'm' || c == 'd'; }
bool IsContractionPair(uint32_t a, uint32_t b) {
  return (a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l');
}
uint32_t AsciiLower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c; }

// 's 't 're 've 'm 'll 'd at i: returns the end, or i when there is none. (Llama 3 matches them
// case-insensitively; like HF we fold ASCII only, which is all these letters need.)
size_t MatchContraction(const Codepoints& t, size_t i, size_t end, bool ignore_case) {
  if (t.cps[i] != '\'' || i + 1 >= end) return i;
  const auto fold = [&](size_t k) { return ignore_case ? AsciiLower(t.cps[k]) : t.cps[k]; };
  if (IsContractionLetter(fold(i + 1))) return i + 2;
  if (i + 2 < end && IsContractionPair(fold(i + 1), fold(i + 2))) return i + 3;
  return i;
}

// \s+(?!\S) falling back to \s+, for the whitespace run starting at i.
size_t MatchTrailingSpace(const Codepoints& t, size_t i, size_t end) {
  size_t j = i;
  while (j < end && t.cls[j] == kSpace) ++j;
  if (j == end) return j;        // the run reaches the end: all of it
  if (j - i >= 2) return j - 1;  // leave the last space to prefix the next word
  return j;                      // a single space before a non-space: \s+
}

size_t MatchGpt2(const Codepoints& t, size_t i, size_t end) {
  if (size_t j = MatchContraction(t, i, end, /*ignore_case=*/false); j != i) return j;
  // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': an optional ' ' then a run of one class.
  size_t k = i;
  if (t.cps[i] == ' ' && i + 1 < end && t.cls[i + 1] != kSpace) k = i + 1;
  const uint8_t c = t.cls[k];
  if (c != kSpace) {
    size_t j = k + 1;
    while (j < end && t.cls[j] == c) ++j;
    return j;
  }
  return MatchTrailingSpace(t, i, end);
}

size_t MatchLlama3(const Codepoints& t, size_t i, size_t end) {
  if (size_t j = MatchContraction(t, i, end, /*ignore_case=*/true); j != i) return j;
  const uint32_t c = t.cps[i];
  const uint8_t cls = t.cls[i];
  // [^\r\n\p{L}\p{N}]?\p{L}+
  size_t k = end;
  if (cls == kLetter) {
    k = i;
  } else if (cls != kNumber && c != '\r' && c != '\n' && i + 1 < end && t.cls[i + 1] == kLetter) {
    k = i + 1;
  }
  if (k != end) {
    size_t j = k + 1;
    while (j < end && t.cls[j] == kLetter) ++j;
    return j;
  }
  // \p{N}{1,3}
  if (cls == kNumber) {
    size_t j = i + 1;
    while (j < end && j < i + 3 && t.cls[j] == kNumber) ++j;
    return j;
  }
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  k = end;
  if (cls == kOther) {
    k = i;
  } else if (c == ' ' && i + 1 < end && t.cls[i + 1] == kOther) {
    k = i + 1;
  }
  if (k != end) {
    size_t j = k + 1;
    while (j < end && t.cls[j] == kOther) ++j;
    while (j < end && (t.cps[j] == '\r' || t.cps[j] == '\n')) ++j;
    return j;
  }
  // \s*[\r\n]+ : the whitespace run up to and including its last line break.
  size_t j = i;
  size_t after_break = i;
  while (j < end && t.cls[j] == kSpace) {
    if (t.cps[j] == '\r' || t.cps[j] == '\n') after_break = j + 1;
    ++j;
  }
  if (after_break != i) return after_break;
  return MatchTrailingSpace(t, i, end);
}

void Emit(std::string_view text, const Codepoints& t, size_t i, size_t j,
          std::vector<std::string_view>* pieces) {
  pieces->push_back(text.substr(t.offsets[i], t.offsets[j] - t.offsets[i]));
}

template <typename MatchFn>
void Scan(std::string_view text, const Codepoints& t, size_t begin, size_t end, MatchFn match,
          std::vector<std::string_view>* pieces) {
  size_t i = begin;
  while (i < end) {
    const size_t j = match(t, i, end);
    Emit(text, t, i, j, pieces);
    i = j;
  }
}

}  // namespace

absl::StatusOr<PreTokenizer> PreTokenizerFromGgufName(std::string_view name) {
  // llama.cpp's names (src/llama-vocab.cpp) for the three splits implemented here.
  for (std::string_view n : {"gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais"}) {
    if (name == n) return PreTokenizer::kGpt2;
  }
  for (std::string_view n :
       {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}) {
    if (name == n) return PreTokenizer::kSmolLm;
  }
  for (std::string_view n : {"llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"}) {
    if (name == n) return PreTokenizer::kLlama3;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported pre-tokenizer tokenizer.ggml.pre='", std::string(name), "'"));
}

void PreTokenize(PreTokenizer kind, std::string_view text, std::vector<std::string_view>* pieces) {
  if (text.empty()) return;
  const Codepoints t(text);
  switch (kind) {
    case PreTokenizer::kGpt2:
      Scan(text, t, 0, t.size(), MatchGpt2, pieces);
      return;
    case PreTokenizer::kLlama3:
      Scan(text, t, 0, t.size(), MatchLlama3, pieces);
      return;
    case PreTokenizer::kSmolLm: {
      size_t begin = 0;
      for (size_t i = 0; i < t.size(); ++i) {
        if (t.cls[i] != kNumber) continue;
        Scan(text, t, begin, i, MatchGpt2, pieces);
        Emit(text, t, i, i + 1, pieces);
        begin = i + 1;
      }
      Scan(text, t, begin, t.size(), MatchGpt2, pieces);
      return;
    }
  }
}

}  // namespace deft
