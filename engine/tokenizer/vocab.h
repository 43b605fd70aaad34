// The vocabulary both tokenizer algorithms share: token texts and types, special ids, the
// special-token matcher used before pre-tokenization, and the parts of the Tokenizer interface
// that only need the vocabulary (decoding, special ids, chat template). Internal to
// engine/tokenizer.
//
// Thread safety: immutable after construction.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"

namespace deft {

// Debian's Abseil has its own string_view type (not std::string_view), so heterogeneous lookups
// with std::string_view keys need these.
struct StringViewHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
struct StringViewEq {
  using is_transparent = void;
  bool operator()(std::string_view a, std::string_view b) const { return a == b; }
};
using TextToIdMap = absl::flat_hash_map<std::string, int32_t, StringViewHash, StringViewEq>;

// llama.cpp's token types (tokenizer.ggml.token_type).
enum class TokenType : uint8_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

struct VocabData {
  std::vector<std::string> texts;  // as the model spells them (byte-level alphabet, U+2581 ...)
  std::vector<TokenType> types;
  std::vector<float> scores;  // SentencePiece merge priorities; empty for BPE
  // Added tokens from a tokenizer.json may absorb whitespace around them (HF AddedToken flags).
  std::vector<int32_t> lstrip_ids, rstrip_ids;
  int32_t bos = -1, eos = -1, eot = -1, eom = -1, unk = -1, pad = -1;
  bool add_bos = false;
  std::string chat_template;  // Jinja source, may be empty
};

// One piece of input after special tokens are cut out: either text or a special token id.
struct Fragment {
  std::string_view text;
  int32_t id = -1;  // >= 0: a special token
};

class VocabTokenizer : public Tokenizer {
 public:
  // `token_bytes`: the raw bytes each token stands for (same size as vocab.texts).
  // Errors: INVALID_ARGUMENT when sizes disagree or a special id is out of range.
  absl::Status InitVocab(VocabData vocab, std::vector<std::string> token_bytes);

  std::string Decode(std::span<const int32_t> ids, bool skip_special) const override;
  std::string TokenBytes(int32_t id) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(vocab_.texts.size()); }
  int32_t bos_id() const override { return vocab_.bos; }
  int32_t eos_id() const override { return vocab_.eos; }
  const std::vector<int32_t>& end_of_generation_ids() const override { return eog_ids_; }
  bool IsSpecial(int32_t id) const override;
  bool add_bos_by_default() const override { return vocab_.add_bos; }
  ChatTemplateKind chat_template_kind() const override { return chat_template_.kind; }
  absl::StatusOr<std::string> ApplyChatTemplate(const std::vector<ChatMessage>& messages,
                                                bool add_generation_prompt) const override;

 protected:
  // Cuts `text` into fragments at special tokens: user-defined tokens always, control tokens only
  // when `parse_special`; at each position the longest token wins (HF's leftmost-longest).
  void SplitSpecial(std::string_view text, bool parse_special, std::vector<Fragment>* out) const;
  bool InVocab(int32_t id) const { return id >= 0 && id < vocab_size(); }

  VocabData vocab_;
  std::vector<std::string> token_bytes_;
  TextToIdMap text_to_id_;

 private:
  // Candidate special tokens by first byte, longest first.
  std::array<std::vector<int32_t>, 256> special_by_first_byte_;
  std::vector<uint8_t> strip_flags_;  // per id: 1 lstrip, 2 rstrip
  std::vector<int32_t> eog_ids_;
  ChatTemplate chat_template_;
};

}  // namespace deft
