// StreamingDetokenizer: emits only whole UTF-8 characters; see tokenizer.h.
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"

namespace deft {

std::string StreamingDetokenizer::Push(int32_t id) {
  if (skip_special_ && tokenizer_.IsSpecial(id)) return "";
  pending_ += tokenizer_.TokenBytes(id);
  // Emit everything up to a trailing sequence that more bytes could still complete; bytes that
  // can never become a character are replaced now, so every piece returned is valid UTF-8.
  std::string out;
  size_t pos = 0;
  while (pos < pending_.size()) {
    size_t full = 0;
    const size_t n = Utf8ValidPrefix(pending_, pos, &full);
    if (full != 0 && n == full) {
      out.append(pending_, pos, n);
      pos += n;
    } else if (full != 0 && pos + n == pending_.size()) {
      break;  // an incomplete character at the end: hold it
    } else {
      out += "\xEF\xBF\xBD";
      pos += n > 0 ? n : 1;
    }
  }
  pending_.erase(0, pos);
  return out;
}

std::string StreamingDetokenizer::Flush() {
  std::string out = SanitizeUtf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace deft
