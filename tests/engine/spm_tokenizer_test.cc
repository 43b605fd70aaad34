// SentencePiece-style tokenizer (tokenizer.ggml.model == "llama") against SentencePiece itself:
// tests/reference/make_spm_reference.py trains a tiny byte-fallback BPE model, writes its
// vocabulary as tests/data/tokenizer/spm_tiny.gguf and records sentencepiece's encodings.
#include <memory>
#include <string>
#include <vector>

#include "engine/gguf/gguf_file.h"
#include "engine/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/engine/tokenizer_test_util.h"

namespace deft {
namespace {

using nlohmann::json;
using test::Ids;
using test::Printable;

class SpmTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto file = GgufFile::Open(std::string(DEFT_TEST_DATA_DIR) + "/tokenizer/spm_tiny.gguf");
    ASSERT_TRUE(file.ok()) << file.status();
    gguf_ = std::move(*file);
    auto tok = Tokenizer::FromGguf(*gguf_);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = std::move(*tok);
    ref_ = test::ReadReference("spm_reference.json");
    ASSERT_FALSE(ref_.is_discarded()) << "spm_reference.json is missing or not JSON";
  }

  std::unique_ptr<GgufFile> gguf_;
  std::unique_ptr<Tokenizer> tok_;
  json ref_;
};

TEST_F(SpmTokenizerTest, IdsMatchSentencePiece) {
  ASSERT_GT(ref_["cases"].size(), 50u);
  for (const json& c : ref_["cases"]) {
    const std::string text = c["text"];
    EXPECT_EQ(tok_->Encode(text, /*add_bos=*/false, /*parse_special=*/false), Ids(c["ids"]))
        << "text: " << Printable(text) << " pieces: " << c["pieces"].dump();
  }
}

TEST_F(SpmTokenizerTest, ParsedSpecialTokensRestartTheSpacePrefix) {
  for (const json& c : ref_["cases"]) {
    const std::string text = c["text"];
    EXPECT_EQ(tok_->Encode(text, false, /*parse_special=*/true), Ids(c["ids_special"]))
        << "text: " << Printable(text);
  }
}

TEST_F(SpmTokenizerTest, DecodeGivesTextBackAfterThePrefixSpace) {
  // Decode concatenates token bytes, so the space the encoder prefixed stays; SentencePiece's
  // own decode drops it.
  for (const json& c : ref_["cases"]) {
    const std::string text = c["text"];
    const std::string sp_decoded = c["decoded"];
    EXPECT_EQ(sp_decoded, text);
    std::string expected;
    if (!text.empty()) expected.append(" ").append(sp_decoded);
    EXPECT_EQ(tok_->Decode(tok_->Encode(text, false, false), false), expected) << Printable(text);
  }
}

TEST_F(SpmTokenizerTest, UnknownCharactersFallBackToBytesAndStreamBack) {
  const std::string text = "unseen: \xE4\xBD\xA0\xE5\xA5\xBD \xF0\x9F\x91\x8B";  // 你好 👋
  const std::vector<int32_t> ids = tok_->Encode(text, false, false);
  StreamingDetokenizer detok(*tok_);
  std::string joined;
  int byte_tokens = 0;
  for (int32_t id : ids) {
    if (tok_->TokenBytes(id).size() == 1 && static_cast<uint8_t>(tok_->TokenBytes(id)[0]) >= 0x80) {
      ++byte_tokens;
    }
    const std::string piece = detok.Push(id);
    EXPECT_TRUE(IsValidUtf8(piece)) << Printable(piece);
    joined += piece;
  }
  EXPECT_EQ(byte_tokens, 10);  // 3 + 3 + 4 bytes
  EXPECT_EQ(joined + detok.Flush(), " " + text);
}

TEST_F(SpmTokenizerTest, VocabularyFlagsAndBos) {
  EXPECT_EQ(tok_->vocab_size(), ref_["vocab_size"].get<int32_t>());
  EXPECT_EQ(tok_->bos_id(), ref_["bos_id"].get<int32_t>());
  EXPECT_EQ(tok_->eos_id(), ref_["eos_id"].get<int32_t>());
  // No add_bos_token key: SentencePiece vocabularies add BOS by default (llama.cpp, HF).
  EXPECT_TRUE(tok_->add_bos_by_default());
  EXPECT_EQ(tok_->Encode("hi", /*add_bos=*/true, false)[0], tok_->bos_id());
  EXPECT_EQ(tok_->end_of_generation_ids(), (std::vector<int32_t>{ref_["eos_id"].get<int32_t>()}));
  const int32_t unk = ref_["unk_id"];
  EXPECT_TRUE(tok_->IsSpecial(unk));
  EXPECT_TRUE(tok_->IsSpecial(tok_->bos_id()));
  EXPECT_EQ(tok_->TokenBytes(tok_->bos_id()), "<s>");
  EXPECT_EQ(tok_->Decode(tok_->Encode("<s>a</s>", true, true), /*skip_special=*/true), " a");
}

TEST_F(SpmTokenizerTest, Llama2ChatTemplateRendersLikeHf) {
  ASSERT_EQ(tok_->chat_template_kind(), ChatTemplateKind::kLlama2);
  const json ref = test::ReadReference("smollm2_reference.json");
  ASSERT_FALSE(ref.is_discarded());
  int checked = 0;
  for (const json& other : ref["other_chat_templates"]) {
    if (other["kind"] != "llama2") continue;
    for (const json& r : other["renders"]) {
      std::vector<ChatMessage> messages;
      for (const json& m : r["messages"]) messages.push_back({m["role"], m["content"]});
      auto rendered = tok_->ApplyChatTemplate(messages, r["add_generation_prompt"]);
      ++checked;
      if (r.contains("error")) {
        EXPECT_EQ(rendered.status().code(), absl::StatusCode::kInvalidArgument) << r.dump();
      } else {
        ASSERT_TRUE(rendered.ok()) << rendered.status() << r.dump();
        EXPECT_EQ(*rendered, r["text"].get<std::string>()) << r.dump();
      }
    }
  }
  EXPECT_GT(checked, 5);
}

}  // namespace
}  // namespace deft
