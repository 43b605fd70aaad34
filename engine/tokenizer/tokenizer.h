// Text <-> token ids for Llama-family models, built from a GGUF's own vocabulary
// (tokenizer.ggml.*) or from a Hugging Face tokenizer.json. Two algorithms:
//  - byte-level BPE (GPT-2 style: SmolLM2, Llama 3), with the pre-tokenizer regex the model names
//    (tokenizer.ggml.pre), merges by rank;
//  - SentencePiece-style (Llama 2: tokenizer.ggml.model == "llama"), score-based merges with
//    <0xXX> byte fallback and the U+2581 space marker.
// Special (control) tokens are matched in input text only when `parse_special` is set.
//
// Thread safety: a Tokenizer is immutable after construction and safe to share across threads.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace deft {

class GgufFile;

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

enum class ChatTemplateKind { kNone, kChatMl, kLlama3, kLlama2 };

class Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& gguf);
  // `tokenizer_json`: path of a HF tokenizer.json; `tokenizer_config_json`: optional path of
  // tokenizer_config.json (bos/eos, add_bos_token, chat_template), may be empty.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromTokenizerJson(
      const std::string& tokenizer_json, const std::string& tokenizer_config_json);
  virtual ~Tokenizer() = default;

  // add_bos: prepend BOS when the model wants one (add_bos_token); parse_special: text such as
  // "<|im_start|>" becomes its special token instead of being split as plain text.
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_bos,
                                      bool parse_special) const = 0;
  // Concatenated bytes of the tokens (may end in a partial UTF-8 character if the ids do).
  // skip_special drops control tokens' text.
  virtual std::string Decode(std::span<const int32_t> ids, bool skip_special) const = 0;
  // The raw bytes this single token stands for ("" for an out-of-range id).
  virtual std::string TokenBytes(int32_t id) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 when none
  virtual int32_t eos_id() const = 0;  // -1 when none
  // Ids that end generation: eos, eot, <|im_end|>, <|eot_id|> ... as the vocabulary defines.
  virtual const std::vector<int32_t>& end_of_generation_ids() const = 0;
  virtual bool IsSpecial(int32_t id) const = 0;
  virtual bool add_bos_by_default() const = 0;

  virtual ChatTemplateKind chat_template_kind() const = 0;
  // Renders `messages` in the model's chat format, identically to the model's own Jinja template
  // for the supported kinds (ChatML including SmolLM2's default system prompt, Llama 3, Llama 2).
  // FAILED_PRECONDITION when the model has no recognised template; INVALID_ARGUMENT for an empty
  // conversation or one the template rejects (Llama 2: roles must alternate). Encode the result
  // with parse_special = true; Llama 2/3 templates write the BOS text themselves, so pass
  // add_bos = false for those (SmolLM2 has no BOS either way).
  virtual absl::StatusOr<std::string> ApplyChatTemplate(const std::vector<ChatMessage>& messages,
                                                        bool add_generation_prompt) const = 0;
};

// Turns a stream of token ids into text, never emitting half a UTF-8 character: bytes of an
// incomplete character are held until the rest arrives (or Flush()).
class StreamingDetokenizer {
 public:
  explicit StreamingDetokenizer(const Tokenizer& tokenizer, bool skip_special = true)
      : tokenizer_(tokenizer), skip_special_(skip_special) {}
  // Returns the text completed by this token (possibly empty).
  std::string Push(int32_t id);
  // Returns whatever is held (invalid bytes become U+FFFD) and resets.
  std::string Flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::string pending_;
};

// True when `s` is well-formed UTF-8.
bool IsValidUtf8(std::string_view s);

}  // namespace deft
