// Chat template recognition and rendering; see chat_template.h. Each Render* function follows its
// Jinja template line by line; the comments quote the template's decisions they reproduce.
#include "engine/tokenizer/chat_template.h"

#include <ctime>
#include <initializer_list>

#include "engine/tokenizer/unicode.h"

namespace deft {
namespace {

void Append(std::string* out, std::initializer_list<std::string_view> parts) {
  for (std::string_view p : parts) out->append(p);
}

bool Contains(std::string_view s, std::string_view part) {
  return s.find(part) != std::string_view::npos;
}

bool IsPythonSpaceAt(std::string_view s, size_t pos, size_t* len) {
  const uint32_t cp = DecodeUtf8(s, pos, len);
  return cp != kInvalidCodepoint && (UnicodeFlags(cp) & kUnicodePythonSpace);
}

// Python's str.strip() / Jinja's `trim`: drops leading and trailing whitespace (str.isspace()).
std::string_view Strip(std::string_view s) {
  size_t begin = 0, len = 1;
  while (begin < s.size() && IsPythonSpaceAt(s, begin, &len)) begin += len;
  size_t end = s.size();
  while (end > begin) {
    size_t start = end - 1;  // back up to the start of the last character
    while (start > begin && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80 && end - start < 4) {
      --start;
    }
    if (!IsPythonSpaceAt(s, start, &len) || start + len != end) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

// Undoes Jinja string-literal escapes (\n \t \r \\ \' \").
std::string UnescapeJinja(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out.push_back(s[i]);
      continue;
    }
    const char c = s[++i];
    switch (c) {
      case 'n':
        out.push_back('\n');
        break;
      case 't':
        out.push_back('\t');
        break;
      case 'r':
        out.push_back('\r');
        break;
      default:
        out.push_back(c);
        break;
    }
  }
  return out;
}

// A ChatML default system message is one string literal of the form
//   '<|im_start|>system\n' TEXT '<|im_end|>' ...
// (SmolLM2 writes it under `if loop.first and messages[0]['role'] != 'system'`). Templates that
// build the system turn from messages[0] have no literal TEXT there and yield "".
std::string FindChatMlDefaultSystem(std::string_view jinja) {
  constexpr std::string_view kHead = "<|im_start|>system";
  constexpr std::string_view kEnd = "<|im_end|>";
  for (size_t pos = jinja.find(kHead); pos != std::string_view::npos;
       pos = jinja.find(kHead, pos + 1)) {
    if (pos == 0) continue;
    const char quote = jinja[pos - 1];
    if (quote != '\'' && quote != '"') continue;
    size_t text = pos + kHead.size();
    if (jinja.substr(text).starts_with("\n")) {
      text += 1;
    } else if (jinja.substr(text).starts_with("\\n")) {
      text += 2;
    } else {
      continue;
    }
    const size_t end = jinja.find(kEnd, text);
    if (end == std::string_view::npos || end == text) continue;
    // The text must stay inside the literal: no unescaped closing quote before <|im_end|>.
    bool inside = true;
    for (size_t i = text; i < end; ++i) {
      if (jinja[i] == '\\') {
        ++i;
      } else if (jinja[i] == quote) {
        inside = false;
        break;
      }
    }
    if (inside) return UnescapeJinja(jinja.substr(text, end - text));
  }
  return "";
}

// The text of a Jinja literal following `key` up to `terminator`, e.g. the knowledge date after
// "Cutting Knowledge Date: " (up to an escaped or real newline).
std::string LiteralAfter(std::string_view jinja, std::string_view key,
                         std::string_view terminators) {
  const size_t pos = jinja.find(key);
  if (pos == std::string_view::npos) return "";
  const size_t begin = pos + key.size();
  const size_t end = jinja.find_first_of(terminators, begin);
  if (end == std::string_view::npos) return "";
  return std::string(jinja.substr(begin, end - begin));
}

std::string RenderChatMl(const ChatTemplate& t, const std::vector<ChatMessage>& messages,
                         bool add_generation_prompt) {
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    // {% if loop.first and messages[0]['role'] != 'system' %}{{ default system turn }}
    if (i == 0 && m.role != "system" && !t.default_system.empty()) {
      Append(&out, {"<|im_start|>system\n", t.default_system, "<|im_end|>\n"});
    }
    Append(&out, {"<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n"});
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

void AppendLlama3Turn(std::string_view role, std::string_view content, std::string* out) {
  // '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + content | trim + '<|eot_id|>'
  Append(out, {"<|start_header_id|>", role, "<|end_header_id|>\n\n", Strip(content), "<|eot_id|>"});
}

std::string TodayDate() {
  // Jinja's strftime_now("%d %b %Y") in HF: the local date.
  const std::time_t now = std::time(nullptr);
  std::tm local = {};
  localtime_r(&now, &local);
  char buf[32];
  const size_t n = std::strftime(buf, sizeof(buf), "%d %b %Y", &local);
  return std::string(buf, n);
}

absl::StatusOr<std::string> RenderLlama3(const ChatTemplate& t,
                                         const std::vector<ChatMessage>& messages,
                                         bool add_generation_prompt) {
  std::string out;
  if (!t.llama31_preamble) {
    // Llama 3.0: bos_token before the first turn only.
    for (size_t i = 0; i < messages.size(); ++i) {
      if (i == 0) out += t.bos_text;
      AppendLlama3Turn(messages[i].role, messages[i].content, &out);
    }
  } else {
    // Llama 3.1+: always a system turn with the dates, then messages[0]'s content if it is a
    // system message; tool results go in "ipython" turns, untrimmed.
    size_t first = 0;
    std::string_view system_message;
    if (messages[0].role == "system") {
      system_message = Strip(messages[0].content);
      first = 1;
    }
    const std::string date = t.today_date.empty() ? TodayDate() : t.today_date;
    Append(&out, {t.bos_text, "<|start_header_id|>system<|end_header_id|>\n\n",
                  "Cutting Knowledge Date: ", t.knowledge_date, "\n", "Today Date: ", date, "\n\n",
                  system_message, "<|eot_id|>"});
    for (size_t i = first; i < messages.size(); ++i) {
      const ChatMessage& m = messages[i];
      if (m.role == "ipython" || m.role == "tool") {
        Append(&out, {"<|start_header_id|>ipython<|end_header_id|>\n\n", m.content, "<|eot_id|>"});
      } else {
        AppendLlama3Turn(m.role, m.content, &out);
      }
    }
  }
  if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

absl::StatusOr<std::string> RenderLlama2(const ChatTemplate& t,
                                         const std::vector<ChatMessage>& messages) {
  // {% if messages[0]['role'] == 'system' %} loop_messages = messages[1:], system_message = ...
  size_t first = 0;
  const std::string* system_message = nullptr;
  if (messages[0].role == "system") {
    system_message = &messages[0].content;
    first = 1;
  }
  std::string out;
  for (size_t i = first; i < messages.size(); ++i) {
    const size_t index0 = i - first;
    const ChatMessage& m = messages[i];
    if ((m.role == "user") != (index0 % 2 == 0)) {
      return absl::InvalidArgumentError(
          "Conversation roles must alternate user/assistant/user/assistant/...");
    }
    std::string content = index0 == 0 && system_message != nullptr
                              ? "<<SYS>>\n" + *system_message + "\n<</SYS>>\n\n" + m.content
                              : m.content;
    if (m.role == "user") {
      Append(&out, {t.bos_text, "[INST] ", Strip(content), " [/INST]"});
    } else if (m.role == "assistant") {
      Append(&out, {" ", Strip(content), " ", t.eos_text});
    }
  }
  return out;  // the template has no generation prompt: "[/INST]" already ends the prompt
}

}  // namespace

ChatTemplate DetectChatTemplate(std::string_view jinja, std::string bos_text,
                                std::string eos_text) {
  ChatTemplate t;
  t.bos_text = std::move(bos_text);
  t.eos_text = std::move(eos_text);
  if (Contains(jinja, "<|im_start|>")) {
    t.kind = ChatTemplateKind::kChatMl;
    t.default_system = FindChatMlDefaultSystem(jinja);
  } else if (Contains(jinja, "<|start_header_id|>")) {
    t.kind = ChatTemplateKind::kLlama3;
    if (Contains(jinja, "Cutting Knowledge Date: ")) {
      t.llama31_preamble = true;
      t.knowledge_date = LiteralAfter(jinja, "Cutting Knowledge Date: ", "\\\n\"'");
      // Llama 3.2 asks HF for today's date (strftime_now); 3.1 and 3.3 default to a literal.
      if (!Contains(jinja, "strftime_now")) {
        t.today_date = LiteralAfter(jinja, "set date_string = \"", "\"");
      }
    }
  } else if (Contains(jinja, "[INST]") && Contains(jinja, "<<SYS>>")) {
    t.kind = ChatTemplateKind::kLlama2;
  }
  return t;
}

absl::StatusOr<std::string> RenderChat(const ChatTemplate& tmpl,
                                       const std::vector<ChatMessage>& messages,
                                       bool add_generation_prompt) {
  if (tmpl.kind == ChatTemplateKind::kNone) {
    return absl::FailedPreconditionError("the model has no recognised chat template");
  }
  // As transformers' apply_chat_template.
  if (messages.empty()) {
    return absl::InvalidArgumentError("cannot apply a chat template to an empty conversation");
  }
  switch (tmpl.kind) {
    case ChatTemplateKind::kChatMl:
      return RenderChatMl(tmpl, messages, add_generation_prompt);
    case ChatTemplateKind::kLlama3:
      return RenderLlama3(tmpl, messages, add_generation_prompt);
    case ChatTemplateKind::kLlama2:
      return RenderLlama2(tmpl, messages);
    case ChatTemplateKind::kNone:
      break;
  }
  return absl::FailedPreconditionError("the model has no recognised chat template");
}

}  // namespace deft
