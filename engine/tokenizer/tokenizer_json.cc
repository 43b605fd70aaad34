// Tokenizer::FromTokenizerJson: Hugging Face tokenizer.json (byte-level BPE models) plus the
// optional tokenizer_config.json (bos/eos tokens, add_bos_token, chat_template).
//
// Supported: model.type "BPE" with vocab and merges ("a b" strings or [a, b] pairs), no
// normalizer, and one of the pre-tokenizers SmolLM2, GPT-2 and Llama 3 use (see PreTokenizerOf).
// Anything else is INVALID_ARGUMENT naming what is unsupported rather than a silently different
// tokenization.
#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer/bpe_tokenizer.h"
#include "engine/tokenizer/tokenizer.h"

namespace deft {
namespace {

using Json = nlohmann::json;

constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

absl::StatusOr<Json> ReadJson(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream buf;
  buf << in.rdbuf();
  Json j = Json::parse(buf.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  return j;
}

bool IsByteLevel(const Json& p, bool use_regex) {
  return p.is_object() && p.value("type", "") == "ByteLevel" &&
         !p.value("add_prefix_space", false) && p.value("use_regex", true) == use_regex;
}

// ByteLevel(use_regex)                         -> GPT-2
// Sequence[Digits(individual), ByteLevel]      -> SmolLM2 (StarCoder tokenizer)
// Sequence[Split(regex, Isolated), ByteLevel(use_regex=false)] with the GPT-2 or Llama 3 regex
absl::StatusOr<PreTokenizer> PreTokenizerOf(const Json& p) {
  if (IsByteLevel(p, true)) return PreTokenizer::kGpt2;
  if (p.is_object() && p.value("type", "") == "Sequence" && p.contains("pretokenizers") &&
      p["pretokenizers"].is_array() && p["pretokenizers"].size() == 2) {
    const Json& first = p["pretokenizers"][0];
    const Json& second = p["pretokenizers"][1];
    if (first.value("type", "") == "Digits" && first.value("individual_digits", false) &&
        IsByteLevel(second, true)) {
      return PreTokenizer::kSmolLm;
    }
    if (first.value("type", "") == "Split" && first.value("behavior", "") == "Isolated" &&
        !first.value("invert", false) && first.contains("pattern") &&
        first["pattern"].is_object() && first["pattern"].contains("Regex") &&
        IsByteLevel(second, false)) {
      const std::string regex = first["pattern"]["Regex"].get<std::string>();
      if (regex == kLlama3Regex) return PreTokenizer::kLlama3;
      if (regex == kGpt2Regex) return PreTokenizer::kGpt2;
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported pre_tokenizer ", p.dump().substr(0, 300)));
}

// A token given as "text" or {"content": "text", ...} (tokenizer_config.json's bos/eos).
std::string TokenContent(const Json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) {
    return j["content"].get<std::string>();
  }
  return "";
}

// The special token a TemplateProcessing post-processor puts before the text, if any: that is
// how tokenizer.json alone says "add BOS" (Llama 3).
const Json* FindTemplateProcessing(const Json& p) {
  if (!p.is_object()) return nullptr;
  if (p.value("type", "") == "TemplateProcessing") return &p;
  if (p.value("type", "") == "Sequence" && p.contains("processors")) {
    for (const Json& q : p["processors"]) {
      if (const Json* t = FindTemplateProcessing(q)) return t;
    }
  }
  return nullptr;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Build(const Json& tj, const Json* config) {
  const Json& model = tj.at("model");
  if (model.value("type", "BPE") != "BPE") {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported model.type '", model.value("type", ""), "'"));
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && model[key].is_string() && !model[key].get<std::string>().empty()) {
      return absl::InvalidArgumentError(absl::StrCat("unsupported model.", key));
    }
  }
  if (model.value("byte_fallback", false)) {
    return absl::InvalidArgumentError("unsupported model.byte_fallback in a byte-level BPE");
  }
  if (tj.contains("normalizer") && !tj["normalizer"].is_null()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported normalizer ", tj["normalizer"].dump().substr(0, 300)));
  }
  absl::StatusOr<PreTokenizer> pre = PreTokenizerOf(tj.value("pre_tokenizer", Json()));
  if (!pre.ok()) return pre.status();

  // Vocabulary: model.vocab, then added_tokens (which may add ids or mark existing ones).
  VocabData vocab;
  const Json& jvocab = model.at("vocab");
  int64_t size = 0;
  for (const auto& [text, id] : jvocab.items())
    size = std::max<int64_t>(size, id.get<int64_t>() + 1);
  const Json added = tj.value("added_tokens", Json::array());
  for (const Json& a : added) size = std::max<int64_t>(size, a.at("id").get<int64_t>() + 1);
  if (size <= 0 || size > INT32_MAX) return absl::InvalidArgumentError("bad vocabulary size");
  vocab.texts.assign(size, "");
  vocab.types.assign(size, TokenType::kUnused);  // ids nothing defines stay unused
  for (const auto& [text, jid] : jvocab.items()) {
    const int64_t id = jid.get<int64_t>();
    if (id < 0) return absl::InvalidArgumentError(absl::StrCat("negative id for '", text, "'"));
    vocab.texts[id] = text;
    vocab.types[id] = TokenType::kNormal;
  }
  for (const Json& a : added) {
    const int64_t id = a.at("id").get<int64_t>();
    if (id < 0) return absl::InvalidArgumentError("negative added token id");
    vocab.texts[id] = a.at("content").get<std::string>();
    vocab.types[id] = a.value("special", false) ? TokenType::kControl : TokenType::kUserDefined;
    if (a.value("lstrip", false)) vocab.lstrip_ids.push_back(static_cast<int32_t>(id));
    if (a.value("rstrip", false)) vocab.rstrip_ids.push_back(static_cast<int32_t>(id));
  }
  const auto id_of = [&](const std::string& text) -> int32_t {
    if (text.empty()) return -1;
    for (int32_t id = static_cast<int32_t>(size) - 1; id >= 0; --id) {
      if (vocab.texts[id] == text) return id;
    }
    return -1;
  };
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    vocab.unk = id_of(model["unk_token"].get<std::string>());
  }

  // BOS: tokenizer_config.json's add_bos_token/bos_token, else the post-processor's template.
  const Json post_processor = tj.value("post_processor", Json());
  if (const Json* tp = FindTemplateProcessing(post_processor)) {
    const Json single = tp->value("single", Json::array());
    if (!single.empty() && single[0].contains("SpecialToken")) {
      vocab.bos = id_of(single[0]["SpecialToken"].value("id", ""));
      vocab.add_bos = vocab.bos >= 0;
    }
  }
  if (config != nullptr) {
    if (config->contains("bos_token")) {
      if (int32_t id = id_of(TokenContent((*config)["bos_token"])); id >= 0) vocab.bos = id;
    }
    if (config->contains("eos_token")) vocab.eos = id_of(TokenContent((*config)["eos_token"]));
    if (config->contains("add_bos_token") && (*config)["add_bos_token"].is_boolean()) {
      vocab.add_bos = (*config)["add_bos_token"].get<bool>();
    }
    if (config->contains("chat_template")) {
      const Json& ct = (*config)["chat_template"];
      if (ct.is_string()) {
        vocab.chat_template = ct.get<std::string>();
      } else if (ct.is_array()) {  // [{"name": "default", "template": ...}, ...]
        for (const Json& named : ct) {
          if (named.value("name", "") == "default")
            vocab.chat_template = named.value("template", "");
        }
      }
    }
  }

  std::vector<std::pair<std::string, std::string>> merges;
  const Json& jmerges = model.at("merges");
  merges.reserve(jmerges.size());
  for (const Json& m : jmerges) {
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat("merge '", s, "' is not two tokens"));
      }
      merges.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else if (m.is_array() && m.size() == 2) {
      merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      return absl::InvalidArgumentError(absl::StrCat("bad merge ", m.dump()));
    }
  }
  return CreateBpeTokenizer(std::move(vocab), merges, *pre, model.value("ignore_merges", false));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromTokenizerJson(
    const std::string& tokenizer_json, const std::string& tokenizer_config_json) {
  absl::StatusOr<Json> tj = ReadJson(tokenizer_json);
  if (!tj.ok()) return tj.status();
  std::optional<Json> config;
  if (!tokenizer_config_json.empty()) {
    absl::StatusOr<Json> c = ReadJson(tokenizer_config_json);
    if (!c.ok()) return c.status();
    config = std::move(*c);
  }
  try {
    absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Build(*tj, config ? &*config : nullptr);
    if (!tok.ok()) {
      return absl::Status(tok.status().code(),
                          absl::StrCat(tokenizer_json, ": ", tok.status().message()));
    }
    return tok;
  } catch (const Json::exception& e) {  // a missing key or a value of the wrong type
    return absl::InvalidArgumentError(absl::StrCat(tokenizer_json, ": ", e.what()));
  }
}

}  // namespace deft
