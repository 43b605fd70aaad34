// UTF-8 decoding and the few Unicode character classes tokenization needs (letters, numbers,
// regex whitespace, Python whitespace), looked up in generated range tables
// (unicode_tables.cc, from gen_unicode_tables.py).
//
// Thread safety: stateless functions over constant tables.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace deft {

// Character class bits.
inline constexpr uint8_t kUnicodeLetter = 1;       // \p{L}
inline constexpr uint8_t kUnicodeNumber = 2;       // \p{N}
inline constexpr uint8_t kUnicodeRegexSpace = 4;   // \s (Oniguruma / llama.cpp)
inline constexpr uint8_t kUnicodePythonSpace = 8;  // Python str.isspace()

namespace unicode_internal {
struct CodepointRange {
  uint32_t first;
  uint32_t last;
  uint32_t flags;
};
extern const CodepointRange kCodepointRanges[];
extern const int kNumCodepointRanges;
}  // namespace unicode_internal

// The class bits of code point `cp` (0 for anything unassigned or outside the classes).
uint8_t UnicodeFlags(uint32_t cp);

// Decodes one UTF-8 character of `s` starting at `pos`. Returns its code point and sets *len to
// its byte length. An ill-formed sequence (bad lead byte, missing continuation, overlong form,
// surrogate, > U+10FFFF) decodes as the single byte at `pos`: code point kInvalidCodepoint,
// *len = 1. REQUIRES: pos < s.size().
inline constexpr uint32_t kInvalidCodepoint = 0xFFFFFFFF;
uint32_t DecodeUtf8(std::string_view s, size_t pos, size_t* len);

// Appends the UTF-8 encoding of `cp` (REQUIRES: cp <= 0x10FFFF, not a surrogate).
void AppendUtf8(uint32_t cp, std::string* out);

// How many bytes at s[pos..] begin a well-formed UTF-8 character. Sets *full_length to the length
// the character's lead byte announces (0 when s[pos] cannot start a character). The result equals
// *full_length for a complete character; it is shorter when the input ends or breaks early (the
// "maximal subpart" that Unicode replaces with one U+FFFD). REQUIRES: pos < s.size().
size_t Utf8ValidPrefix(std::string_view s, size_t pos, size_t* full_length);

// Replaces every ill-formed sequence of `s` with U+FFFD (one per maximal subpart, as Python's
// errors="replace" and Rust's from_utf8_lossy do).
std::string SanitizeUtf8(std::string_view s);

}  // namespace deft
