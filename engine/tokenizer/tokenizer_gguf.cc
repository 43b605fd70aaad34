// Tokenizer::FromGguf: reads llama.cpp's tokenizer.ggml.* metadata.
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/gguf/gguf_file.h"
#include "engine/tokenizer/bpe_tokenizer.h"
#include "engine/tokenizer/spm_tokenizer.h"
#include "engine/tokenizer/tokenizer.h"

namespace deft {
namespace {

// An optional integer key: `fallback` when absent, the error when present with a bad type.
absl::StatusOr<int64_t> OptionalInt(const GgufFile& gguf, std::string_view key, int64_t fallback) {
  if (gguf.Find(key) == nullptr) return fallback;
  return gguf.GetInt(key);
}

absl::Status ReadVocab(const GgufFile& gguf, VocabData* v) {
  absl::StatusOr<std::vector<std::string>> tokens = gguf.GetStringArray("tokenizer.ggml.tokens");
  if (!tokens.ok()) return tokens.status();
  v->texts = std::move(*tokens);
  const size_t n = v->texts.size();

  v->types.assign(n, TokenType::kNormal);
  if (gguf.Find("tokenizer.ggml.token_type") != nullptr) {
    absl::StatusOr<std::vector<int64_t>> types = gguf.GetIntArray("tokenizer.ggml.token_type");
    if (!types.ok()) return types.status();
    if (types->size() != n) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.token_type has ",
                                                     types->size(), " entries for ", n, " tokens"));
    }
    for (size_t i = 0; i < n; ++i) {
      const int64_t t = (*types)[i];
      if (t < 0 || t > static_cast<int64_t>(TokenType::kByte)) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.ggml.token_type[", i, "] = ", t, " is not a token type"));
      }
      v->types[i] = static_cast<TokenType>(t);
    }
  }
  if (gguf.Find("tokenizer.ggml.scores") != nullptr) {
    absl::StatusOr<std::vector<double>> scores = gguf.GetFloatArray("tokenizer.ggml.scores");
    if (!scores.ok()) return scores.status();
    if (scores->size() != n) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.scores has ", scores->size(),
                                                     " entries for ", n, " tokens"));
    }
    v->scores.assign(scores->begin(), scores->end());
  }

  const std::pair<const char*, int32_t*> ids[] = {
      {"tokenizer.ggml.bos_token_id", &v->bos},     {"tokenizer.ggml.eos_token_id", &v->eos},
      {"tokenizer.ggml.eot_token_id", &v->eot},     {"tokenizer.ggml.eom_token_id", &v->eom},
      {"tokenizer.ggml.unknown_token_id", &v->unk}, {"tokenizer.ggml.padding_token_id", &v->pad},
  };
  for (const auto& [key, out] : ids) {
    absl::StatusOr<int64_t> id = OptionalInt(gguf, key, -1);
    if (!id.ok()) return id.status();
    if (*id < -1 || *id >= static_cast<int64_t>(n)) {
      return absl::InvalidArgumentError(
          absl::StrCat(key, " = ", *id, " is outside the vocabulary of ", n, " tokens"));
    }
    *out = static_cast<int32_t>(*id);
  }
  if (gguf.Find("tokenizer.chat_template") != nullptr) {
    absl::StatusOr<std::string> tmpl = gguf.GetString("tokenizer.chat_template");
    if (!tmpl.ok()) return tmpl.status();
    v->chat_template = std::move(*tmpl);
  }
  return absl::OkStatus();
}

// llama.cpp sets BPE's ignore_merges for the Llama 3 pre-tokenizer (HF's tokenizer.json for
// Llama 3 has "ignore_merges": true); the other users of the same regex merge as usual.
bool GgufIgnoresMerges(std::string_view pre) {
  return pre == "llama3" || pre == "llama-v3" || pre == "llama-bpe" || pre == "falcon3";
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& gguf) {
  absl::StatusOr<std::string> model = gguf.GetString("tokenizer.ggml.model");
  if (!model.ok()) return model.status();
  VocabData vocab;
  if (absl::Status s = ReadVocab(gguf, &vocab); !s.ok()) return s;

  if (*model == "gpt2") {
    absl::StatusOr<int64_t> add_bos = OptionalInt(gguf, "tokenizer.ggml.add_bos_token", 0);
    if (!add_bos.ok()) return add_bos.status();
    vocab.add_bos = *add_bos != 0;
    std::string pre_name = "gpt-2";
    if (gguf.Find("tokenizer.ggml.pre") != nullptr) {
      absl::StatusOr<std::string> pre = gguf.GetString("tokenizer.ggml.pre");
      if (!pre.ok()) return pre.status();
      pre_name = *pre;
    }
    absl::StatusOr<PreTokenizer> pre = PreTokenizerFromGgufName(pre_name);
    if (!pre.ok()) return pre.status();
    absl::StatusOr<std::vector<std::string>> merge_texts =
        gguf.GetStringArray("tokenizer.ggml.merges");
    if (!merge_texts.ok()) return merge_texts.status();
    std::vector<std::pair<std::string, std::string>> merges;
    merges.reserve(merge_texts->size());
    for (size_t i = 0; i < merge_texts->size(); ++i) {
      const std::string& m = (*merge_texts)[i];
      const size_t space = m.find(' ');
      if (space == std::string::npos || space == 0 || space + 1 == m.size() ||
          m.find(' ', space + 1) != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.ggml.merges[", i, "] = '", m, "' is not two tokens"));
      }
      merges.emplace_back(m.substr(0, space), m.substr(space + 1));
    }
    return CreateBpeTokenizer(std::move(vocab), merges, *pre, GgufIgnoresMerges(pre_name));
  }
  if (*model == "llama") {
    // llama.cpp and HF both add BOS and a space prefix to SentencePiece vocabularies that do not
    // say otherwise.
    absl::StatusOr<int64_t> add_bos = OptionalInt(gguf, "tokenizer.ggml.add_bos_token", 1);
    if (!add_bos.ok()) return add_bos.status();
    vocab.add_bos = *add_bos != 0;
    absl::StatusOr<int64_t> add_space = OptionalInt(gguf, "tokenizer.ggml.add_space_prefix", 1);
    if (!add_space.ok()) return add_space.status();
    return CreateSpmTokenizer(std::move(vocab), *add_space != 0);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported tokenizer.ggml.model '", *model, "' (supported: gpt2, llama)"));
}

}  // namespace deft
