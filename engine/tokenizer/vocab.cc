// VocabTokenizer: the vocabulary-only half of the Tokenizer interface; see vocab.h.
#include "engine/tokenizer/vocab.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer/unicode.h"

namespace deft {
namespace {

// Token texts that end a turn when the vocabulary marks them as control tokens (the list
// llama.cpp uses to build its end-of-generation set, for the model families supported here).
constexpr std::string_view kEndOfGenerationTexts[] = {
    "<|eot_id|>",    "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
    "<end_of_turn>", "</s>",       "<EOT>",
};

constexpr uint8_t kLstrip = 1, kRstrip = 2;

bool IsSpaceAt(std::string_view s, size_t pos, size_t* len) {
  const uint32_t cp = DecodeUtf8(s, pos, len);
  return cp != kInvalidCodepoint && (UnicodeFlags(cp) & kUnicodeRegexSpace);
}

}  // namespace

absl::Status VocabTokenizer::InitVocab(VocabData vocab, std::vector<std::string> token_bytes) {
  const size_t n = vocab.texts.size();
  if (n == 0) return absl::InvalidArgumentError("the vocabulary is empty");
  if (n > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError("the vocabulary has too many tokens");
  }
  if (vocab.types.size() != n || token_bytes.size() != n ||
      (!vocab.scores.empty() && vocab.scores.size() != n)) {
    return absl::InvalidArgumentError(absl::StrCat("token arrays disagree in length: ", n,
                                                   " texts, ", vocab.types.size(), " types, ",
                                                   vocab.scores.size(), " scores"));
  }
  const int32_t size = static_cast<int32_t>(n);
  for (auto [name, id] : {std::pair<const char*, int32_t>{"bos", vocab.bos},
                          {"eos", vocab.eos},
                          {"eot", vocab.eot},
                          {"eom", vocab.eom},
                          {"unknown", vocab.unk},
                          {"padding", vocab.pad}}) {
    if (id < -1 || id >= size) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " token id ", id, " is outside the vocabulary of ", size));
    }
  }
  vocab_ = std::move(vocab);
  token_bytes_ = std::move(token_bytes);

  text_to_id_.reserve(n);
  for (int32_t id = 0; id < size; ++id) text_to_id_[vocab_.texts[id]] = id;  // last one wins

  strip_flags_.assign(n, 0);
  for (int32_t id : vocab_.lstrip_ids) {
    if (InVocab(id)) strip_flags_[id] |= kLstrip;
  }
  for (int32_t id : vocab_.rstrip_ids) {
    if (InVocab(id)) strip_flags_[id] |= kRstrip;
  }
  for (int32_t id = 0; id < size; ++id) {
    const TokenType type = vocab_.types[id];
    const std::string& text = vocab_.texts[id];
    if ((type == TokenType::kControl || type == TokenType::kUserDefined) && !text.empty()) {
      special_by_first_byte_[static_cast<uint8_t>(text[0])].push_back(id);
    }
  }
  for (auto& candidates : special_by_first_byte_) {
    std::stable_sort(candidates.begin(), candidates.end(), [&](int32_t a, int32_t b) {
      return vocab_.texts[a].size() > vocab_.texts[b].size();
    });
  }

  for (int32_t id : {vocab_.eos, vocab_.eot, vocab_.eom}) {
    if (id >= 0) eog_ids_.push_back(id);
  }
  for (int32_t id = 0; id < size; ++id) {
    if (vocab_.types[id] != TokenType::kControl) continue;
    for (std::string_view text : kEndOfGenerationTexts) {
      if (vocab_.texts[id] == text) eog_ids_.push_back(id);
    }
  }
  std::sort(eog_ids_.begin(), eog_ids_.end());
  eog_ids_.erase(std::unique(eog_ids_.begin(), eog_ids_.end()), eog_ids_.end());

  chat_template_ =
      DetectChatTemplate(vocab_.chat_template, vocab_.bos >= 0 ? vocab_.texts[vocab_.bos] : "",
                         vocab_.eos >= 0 ? vocab_.texts[vocab_.eos] : "");
  return absl::OkStatus();
}

void VocabTokenizer::SplitSpecial(std::string_view text, bool parse_special,
                                  std::vector<Fragment>* out) const {
  size_t start = 0;  // start of the pending plain-text fragment
  size_t pos = 0;
  while (pos < text.size()) {
    int32_t match = -1;
    for (int32_t id : special_by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      if (!parse_special && vocab_.types[id] == TokenType::kControl) continue;
      const std::string& t = vocab_.texts[id];
      if (text.compare(pos, t.size(), t) == 0) {
        match = id;
        break;  // candidates are sorted longest first
      }
    }
    if (match < 0) {
      ++pos;
      continue;
    }
    size_t text_end = pos;
    size_t after = pos + vocab_.texts[match].size();
    size_t len = 1;
    if (strip_flags_[match] & kLstrip) {
      // Drop whitespace that precedes the token (a character at a time, from the right).
      while (text_end > start) {
        size_t back = text_end - 1;
        while (back > start && (static_cast<uint8_t>(text[back]) & 0xC0) == 0x80) --back;
        if (!IsSpaceAt(text, back, &len) || back + len != text_end) break;
        text_end = back;
      }
    }
    if (strip_flags_[match] & kRstrip) {
      while (after < text.size() && IsSpaceAt(text, after, &len)) after += len;
    }
    if (text_end > start) out->push_back({text.substr(start, text_end - start), -1});
    out->push_back({std::string_view(), match});
    start = pos = after;
  }
  if (start < text.size()) out->push_back({text.substr(start), -1});
}

std::string VocabTokenizer::Decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    if (!InVocab(id)) continue;
    if (skip_special && IsSpecial(id)) continue;
    out += token_bytes_[id];
  }
  return out;
}

std::string VocabTokenizer::TokenBytes(int32_t id) const {
  return InVocab(id) ? token_bytes_[id] : std::string();
}

bool VocabTokenizer::IsSpecial(int32_t id) const {
  if (!InVocab(id)) return false;
  const TokenType type = vocab_.types[id];
  return type == TokenType::kControl || type == TokenType::kUnknown;
}

absl::StatusOr<std::string> VocabTokenizer::ApplyChatTemplate(
    const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  return RenderChat(chat_template_, messages, add_generation_prompt);
}

}  // namespace deft
