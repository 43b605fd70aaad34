// Chat formats: recognises a model's Jinja chat template by its text and renders messages the way
// that template does, without a Jinja engine. Supported:
//  - ChatML ("<|im_start|>role\ncontent<|im_end|>\n"), including a default system message that
//    the template writes as one literal when the conversation has none (SmolLM2's "You are a
//    helpful AI assistant named SmolLM, trained by Hugging Face");
//  - Llama 3 (header ids, trimmed content, BOS text first; the 3.1+ system preamble with
//    "Cutting Knowledge Date" when the template has one);
//  - Llama 2 ("[INST] ... [/INST]" with a <<SYS>> block; roles must alternate).
//
// Thread safety: stateless functions; ChatTemplate is a plain value.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/tokenizer/tokenizer.h"

namespace deft {

struct ChatTemplate {
  ChatTemplateKind kind = ChatTemplateKind::kNone;
  // ChatML: the system message written when messages[0] is not a system message ("" = none).
  std::string default_system;
  // Llama 3.1+: the "Cutting Knowledge Date ... Today Date ..." system preamble is written.
  bool llama31_preamble = false;
  std::string knowledge_date;      // "December 2023"
  std::string today_date;          // the template's default date_string, "26 Jul 2024"
  std::string bos_text, eos_text;  // what the template's bos_token / eos_token print
};

// Recognises `jinja` (empty: kNone). `bos_text`/`eos_text`: the texts of the BOS/EOS tokens.
ChatTemplate DetectChatTemplate(std::string_view jinja, std::string bos_text, std::string eos_text);

// FAILED_PRECONDITION for kNone; INVALID_ARGUMENT for an empty conversation (as transformers) or
// one the template rejects
// (Llama 2: roles not alternating user/assistant after an optional system message).
absl::StatusOr<std::string> RenderChat(const ChatTemplate& tmpl,
                                       const std::vector<ChatMessage>& messages,
                                       bool add_generation_prompt);

}  // namespace deft
