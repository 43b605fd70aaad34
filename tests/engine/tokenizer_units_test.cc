// Tokenizer building blocks on their own: the pre-tokenizer scanners against HF tokenizers' own
// pre-tokenizers (splits recorded by tests/reference/make_tokenizer_reference.py), the Unicode
// tables, UTF-8 validation, and the Llama 3 / 3.1 chat renderers against HF's Jinja rendering.
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/pre_tokenizer.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "gtest/gtest.h"
#include "tests/engine/tokenizer_test_util.h"

namespace deft {
namespace {

using nlohmann::json;
using test::Printable;

std::vector<std::string> Split(PreTokenizer kind, const std::string& text) {
  std::vector<std::string_view> pieces;
  PreTokenize(kind, text, &pieces);
  return std::vector<std::string>(pieces.begin(), pieces.end());
}

TEST(PreTokenizerTest, SplitsLikeHfTokenizers) {
  const json ref = test::ReadReference("smollm2_reference.json");
  ASSERT_FALSE(ref.is_discarded());
  ASSERT_GT(ref["cases"].size(), 50u);
  for (const json& c : ref["cases"]) {
    const std::string text = c["text"];
    EXPECT_EQ(Split(PreTokenizer::kGpt2, text), c["pre_gpt2"].get<std::vector<std::string>>())
        << Printable(text);
    EXPECT_EQ(Split(PreTokenizer::kSmolLm, text), c["pre_smollm"].get<std::vector<std::string>>())
        << Printable(text);
    EXPECT_EQ(Split(PreTokenizer::kLlama3, text), c["pre_llama3"].get<std::vector<std::string>>())
        << Printable(text);
  }
}

TEST(PreTokenizerTest, InvalidUtf8IsKeptAndCountsAsOther) {
  const std::string text = "ab\xFF\xFE cd\xC3";
  for (PreTokenizer kind : {PreTokenizer::kGpt2, PreTokenizer::kSmolLm, PreTokenizer::kLlama3}) {
    std::string joined;
    for (const std::string& p : Split(kind, text)) joined += p;
    EXPECT_EQ(joined, text);
  }
  EXPECT_EQ(Split(PreTokenizer::kGpt2, text),
            (std::vector<std::string>{"ab", "\xFF\xFE", " cd", "\xC3"}));
}

TEST(PreTokenizerTest, GgufNames) {
  EXPECT_EQ(*PreTokenizerFromGgufName("smollm"), PreTokenizer::kSmolLm);
  EXPECT_EQ(*PreTokenizerFromGgufName("gpt-2"), PreTokenizer::kGpt2);
  EXPECT_EQ(*PreTokenizerFromGgufName("llama-bpe"), PreTokenizer::kLlama3);
  auto unknown = PreTokenizerFromGgufName("qwen2");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("'qwen2'"), std::string::npos);
}

TEST(UnicodeTest, AsciiFastPathAgreesWithTheTable) {
  for (uint32_t cp = 0; cp < 128; ++cp) {
    uint8_t from_table = 0;
    for (int i = 0; i < unicode_internal::kNumCodepointRanges; ++i) {
      const auto& r = unicode_internal::kCodepointRanges[i];
      if (cp >= r.first && cp <= r.last) from_table = static_cast<uint8_t>(r.flags);
    }
    EXPECT_EQ(UnicodeFlags(cp), from_table) << cp;
  }
}

TEST(UnicodeTest, Classes) {
  EXPECT_EQ(UnicodeFlags(U'é'), kUnicodeLetter);
  EXPECT_EQ(UnicodeFlags(U'中'), kUnicodeLetter);
  EXPECT_EQ(UnicodeFlags(U'½'), kUnicodeNumber);
  EXPECT_EQ(UnicodeFlags(U'٣'), kUnicodeNumber);
  EXPECT_EQ(UnicodeFlags(0x3000), kUnicodeRegexSpace | kUnicodePythonSpace);
  EXPECT_EQ(UnicodeFlags(0x1F), kUnicodePythonSpace);  // Python strips it, regex \s does not
  EXPECT_EQ(UnicodeFlags(0x0301), 0);                  // combining mark
  EXPECT_EQ(UnicodeFlags(0x1F44B), 0);                 // emoji
  EXPECT_EQ(UnicodeFlags(0x10FFFF), 0);
}

TEST(Utf8Test, ValidationFollowsTheUnicodeTable) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("a\xC2\x80\xE0\xA0\x80\xED\x9F\xBF\xF0\x90\x80\x80\xF4\x8F\xBF\xBF"));
  for (std::string_view bad :
       {"\x80", "\xC0\x80", "\xC1\xBF", "\xE0\x80\x80", "\xED\xA0\x80", "\xF0\x80\x80\x80",
        "\xF4\x90\x80\x80", "\xF5\x80\x80\x80", "\xFF", "\xE2\x82", "a\xF0\x9F\x91"}) {
    EXPECT_FALSE(IsValidUtf8(bad)) << Printable(std::string(bad));
  }
  // One U+FFFD per maximal subpart, as Python's errors="replace".
  EXPECT_EQ(SanitizeUtf8("a\xE2\x82"
                         "b\xFF\xF0\x9F\x91"),
            "a\xEF\xBF\xBD"
            "b\xEF\xBF\xBD\xEF\xBF\xBD");
}

ChatTemplate Detect(const json& other) {
  return DetectChatTemplate(other["template"].get<std::string>(), other["bos_token"],
                            other["eos_token"]);
}

TEST(ChatTemplateTest, LlamaTemplatesRenderLikeHf) {
  const json ref = test::ReadReference("smollm2_reference.json");
  ASSERT_FALSE(ref.is_discarded());
  int checked = 0;
  for (const json& other : ref["other_chat_templates"]) {
    const ChatTemplate tmpl = Detect(other);
    const std::string kind = other["kind"];
    EXPECT_EQ(tmpl.kind, kind == "llama2" ? ChatTemplateKind::kLlama2 : ChatTemplateKind::kLlama3)
        << kind;
    for (const json& r : other["renders"]) {
      std::vector<ChatMessage> messages;
      for (const json& m : r["messages"]) messages.push_back({m["role"], m["content"]});
      auto rendered = RenderChat(tmpl, messages, r["add_generation_prompt"]);
      ++checked;
      if (r.contains("error")) {
        EXPECT_EQ(rendered.status().code(), absl::StatusCode::kInvalidArgument)
            << kind << " " << r.dump();
      } else {
        ASSERT_TRUE(rendered.ok()) << kind << " " << rendered.status();
        EXPECT_EQ(*rendered, r["text"].get<std::string>()) << kind << " " << r.dump();
      }
    }
  }
  EXPECT_EQ(checked, 30);
}

TEST(ChatTemplateTest, ChatMlDefaultSystemOnlyFromOneLiteral) {
  // Escaped newline in the Jinja literal, as some tokenizer_config.json files write it.
  const ChatTemplate escaped = DetectChatTemplate(
      "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' "
      "}}{% endif %}{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
      "'<|im_end|>\\n'}}{% endfor %}",
      "", "");
  EXPECT_EQ(escaped.kind, ChatTemplateKind::kChatMl);
  EXPECT_EQ(escaped.default_system, "Be brief.");
  // A system turn built from the messages is not a default.
  const ChatTemplate plain = DetectChatTemplate(
      "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
      "'<|im_end|>\\n'}}{% endfor %}{{ '<|im_start|>system\\n' + x + '<|im_end|>' }}",
      "", "");
  EXPECT_EQ(plain.kind, ChatTemplateKind::kChatMl);
  EXPECT_EQ(plain.default_system, "");
  auto rendered = RenderChat(plain, {{"user", "hi"}}, true);
  ASSERT_TRUE(rendered.ok());
  EXPECT_EQ(*rendered, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, UnknownTemplateIsFailedPrecondition) {
  for (std::string_view jinja : {"", "{{ messages[0]['content'] }}"}) {
    const ChatTemplate t = DetectChatTemplate(jinja, "", "");
    EXPECT_EQ(t.kind, ChatTemplateKind::kNone);
    EXPECT_EQ(RenderChat(t, {{"user", "hi"}}, true).status().code(),
              absl::StatusCode::kFailedPrecondition);
  }
}

}  // namespace
}  // namespace deft
