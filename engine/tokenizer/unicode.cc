// UTF-8 decoding and character class lookup; see unicode.h.
#include "engine/tokenizer/unicode.h"

#include <algorithm>

#include "engine/tokenizer/tokenizer.h"

namespace deft {

namespace {

constexpr uint8_t AsciiFlags(uint32_t c) {
  uint8_t f = 0;
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) f |= kUnicodeLetter;
  if (c >= '0' && c <= '9') f |= kUnicodeNumber;
  if ((c >= 0x09 && c <= 0x0D) || c == ' ') f |= kUnicodeRegexSpace | kUnicodePythonSpace;
  if (c >= 0x1C && c <= 0x1F) f |= kUnicodePythonSpace;
  return f;
}

struct AsciiTable {
  uint8_t flags[128];
  constexpr AsciiTable() : flags() {
    for (uint32_t c = 0; c < 128; ++c) flags[c] = AsciiFlags(c);
  }
};
constexpr AsciiTable kAscii;

}  // namespace

uint8_t UnicodeFlags(uint32_t cp) {
  if (cp < 128) return kAscii.flags[cp];
  using unicode_internal::CodepointRange;
  const CodepointRange* begin = unicode_internal::kCodepointRanges;
  const CodepointRange* end = begin + unicode_internal::kNumCodepointRanges;
  // First range whose last code point is >= cp.
  const CodepointRange* it = std::lower_bound(
      begin, end, cp, [](const CodepointRange& r, uint32_t value) { return r.last < value; });
  if (it == end || it->first > cp) return 0;
  return static_cast<uint8_t>(it->flags);
}

size_t Utf8ValidPrefix(std::string_view s, size_t pos, size_t* full_length) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(s[i]); };
  const uint8_t b0 = byte(pos);
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 < 0x80) {
    *full_length = 1;
    return 1;
  } else if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;  // no overlong forms
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;  // no overlong forms
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    *full_length = 0;
    return 0;
  }
  *full_length = need;
  size_t n = 1;
  while (n < need && pos + n < s.size()) {
    const uint8_t b = byte(pos + n);
    const bool ok = n == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) break;
    ++n;
  }
  return n;
}

uint32_t DecodeUtf8(std::string_view s, size_t pos, size_t* len) {
  const uint8_t b0 = static_cast<uint8_t>(s[pos]);
  if (b0 < 0x80) {
    *len = 1;
    return b0;
  }
  size_t full = 0;
  const size_t n = Utf8ValidPrefix(s, pos, &full);
  if (full == 0 || n != full) {
    *len = 1;
    return kInvalidCodepoint;
  }
  uint32_t cp = b0 & (full == 2 ? 0x1F : full == 3 ? 0x0F : 0x07);
  for (size_t i = 1; i < full; ++i) cp = (cp << 6) | (static_cast<uint8_t>(s[pos + i]) & 0x3F);
  *len = full;
  return cp;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string SanitizeUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (pos < s.size()) {
    size_t full = 0;
    const size_t n = Utf8ValidPrefix(s, pos, &full);
    if (full != 0 && n == full) {
      out.append(s.substr(pos, n));
      pos += n;
    } else {
      out.append("\xEF\xBF\xBD");  // U+FFFD for the maximal subpart
      pos += std::max<size_t>(n, 1);
    }
  }
  return out;
}

bool IsValidUtf8(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    if (static_cast<uint8_t>(s[pos]) < 0x80) {
      ++pos;
      continue;
    }
    size_t full = 0;
    const size_t n = Utf8ValidPrefix(s, pos, &full);
    if (full == 0 || n != full) return false;
    pos += n;
  }
  return true;
}

}  // namespace deft
