// SentencePiece-style BPE; see spm_tokenizer.h.
//
// The merge loop is SentencePiece's bpe_model.cc algorithm: symbols start as UTF-8 characters; a
// max-heap holds adjacent pairs whose concatenation is a piece (normal, user-defined or unused),
// keyed by that piece's score, ties to the leftmost pair; a merge that produced an unused piece is
// undone at the end (split back into the two pieces it came from). A final symbol that is not a
// piece becomes its bytes' <0xXX> tokens, or the unknown token where one is missing.
#include "engine/tokenizer/spm_tokenizer.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <functional>

#include "absl/container/flat_hash_map.h"
#include "engine/tokenizer/unicode.h"

namespace deft {
namespace {

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581

std::string ReplaceAll(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  for (size_t hit = s.find(from); hit != std::string_view::npos; hit = s.find(from, pos)) {
    out.append(s.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(s.substr(pos));
  return out;
}

// "<0x41>" -> 0x41; -1 when `text` is not a byte token's text.
int ParseByteToken(std::string_view text) {
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return -1;
  int value = 0;
  for (char c : text.substr(3, 2)) {
    value <<= 4;
    if (c >= '0' && c <= '9') {
      value |= c - '0';
    } else if (c >= 'A' && c <= 'F') {
      value |= c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      value |= c - 'a' + 10;
    } else {
      return -1;
    }
  }
  return value;
}

// Merged unused piece -> the two pieces it was made of.
using RevMerge =
    absl::flat_hash_map<std::string_view, std::pair<std::string_view, std::string_view>,
                        StringViewHash, StringViewEq>;

class SpmTokenizer final : public VocabTokenizer {
 public:
  explicit SpmTokenizer(bool add_space_prefix) : add_space_prefix_(add_space_prefix) {}

  absl::Status Init(VocabData vocab);

  std::vector<int32_t> Encode(std::string_view text, bool add_bos,
                              bool parse_special) const override;

 private:
  struct Symbol {
    uint32_t begin, len;  // bytes of the escaped text; len == 0 once merged away
    int32_t prev, next;
  };
  struct Candidate {
    float score;
    int32_t left, right;
    uint32_t len;  // combined length when pushed, to detect stale entries
    bool operator<(const Candidate& o) const {  // max-heap: best score, then leftmost
      return score != o.score ? score < o.score : left > o.left;
    }
  };

  void EncodeText(std::string_view escaped, std::vector<int32_t>* out) const;
  void Emit(std::string_view piece, const RevMerge& rev_merge, std::vector<int32_t>* out) const;
  // The id of `piece` if it may be a merge result (normal, user-defined or unused), else -1.
  int32_t MergeableId(std::string_view piece) const;

  bool add_space_prefix_;
  std::array<int32_t, 256> byte_ids_;
};

absl::Status SpmTokenizer::Init(VocabData vocab) {
  std::vector<std::string> bytes(vocab.texts.size());
  for (size_t id = 0; id < vocab.texts.size(); ++id) {
    const std::string& text = vocab.texts[id];
    const TokenType type = id < vocab.types.size() ? vocab.types[id] : TokenType::kNormal;
    const int byte = type == TokenType::kByte ? ParseByteToken(text) : -1;
    if (byte >= 0) {
      bytes[id] = std::string(1, static_cast<char>(byte));
    } else if (type == TokenType::kNormal || type == TokenType::kUserDefined ||
               type == TokenType::kUnused) {
      bytes[id] = ReplaceAll(text, kSpaceMarker, " ");
    } else {
      bytes[id] = text;  // control / unknown: their text ("<s>", "<unk>")
    }
  }
  if (vocab.scores.empty()) vocab.scores.assign(vocab.texts.size(), 0.0f);
  if (absl::Status s = InitVocab(std::move(vocab), std::move(bytes)); !s.ok()) return s;
  byte_ids_.fill(-1);
  for (int32_t id = 0; id < vocab_size(); ++id) {
    if (vocab_.types[id] != TokenType::kByte) continue;
    const int byte = ParseByteToken(vocab_.texts[id]);
    if (byte >= 0 && byte_ids_[byte] < 0) byte_ids_[byte] = id;
  }
  return absl::OkStatus();
}

int32_t SpmTokenizer::MergeableId(std::string_view piece) const {
  auto it = text_to_id_.find(piece);
  if (it == text_to_id_.end()) return -1;
  const TokenType type = vocab_.types[it->second];
  return (type == TokenType::kNormal || type == TokenType::kUserDefined ||
          type == TokenType::kUnused)
             ? it->second
             : -1;
}

void SpmTokenizer::Emit(std::string_view piece, const RevMerge& rev_merge,
                        std::vector<int32_t>* out) const {
  auto it = text_to_id_.find(piece);
  if (it != text_to_id_.end()) {
    if (vocab_.types[it->second] != TokenType::kUnused) {
      out->push_back(it->second);
      return;
    }
    // An unused piece is only a stepping stone: emit the two pieces it was merged from.
    if (auto rev = rev_merge.find(piece); rev != rev_merge.end()) {
      Emit(rev->second.first, rev_merge, out);
      Emit(rev->second.second, rev_merge, out);
      return;
    }
  }
  for (char c : piece) {
    const int32_t id = byte_ids_[static_cast<uint8_t>(c)];
    if (id >= 0) {
      out->push_back(id);
    } else if (vocab_.unk >= 0) {
      out->push_back(vocab_.unk);
    }
  }
}

void SpmTokenizer::EncodeText(std::string_view text, std::vector<int32_t>* out) const {
  std::vector<Symbol> symbols;
  symbols.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    size_t len = 1;
    DecodeUtf8(text, pos, &len);  // an ill-formed byte is a symbol of its own
    const int32_t n = static_cast<int32_t>(symbols.size());
    symbols.push_back({static_cast<uint32_t>(pos), static_cast<uint32_t>(len), n - 1, -1});
    if (n > 0) symbols[n - 1].next = n;
    pos += len;
  }
  if (symbols.empty()) return;

  std::vector<Candidate> heap;
  RevMerge rev_merge;
  const auto piece_of = [&](const Symbol& s) { return text.substr(s.begin, s.len); };
  const auto push_pair = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const uint32_t len = symbols[left].len + symbols[right].len;
    const std::string_view merged = text.substr(symbols[left].begin, len);
    const int32_t id = MergeableId(merged);
    if (id < 0) return;
    heap.push_back({vocab_.scores[id], left, right, len});
    std::push_heap(heap.begin(), heap.end());
    if (vocab_.types[id] == TokenType::kUnused) {
      rev_merge[merged] = {piece_of(symbols[left]), piece_of(symbols[right])};
    }
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) push_pair(i, i + 1);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[top.left];
    Symbol& right = symbols[top.right];
    // Stale when either side was merged since (length changed or symbol gone).
    if (left.len == 0 || right.len == 0 || left.len + right.len != top.len ||
        left.next != top.right) {
      continue;
    }
    left.len += right.len;
    right.len = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.left;
    push_pair(left.prev, top.left);
    push_pair(top.left, left.next);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) Emit(piece_of(symbols[i]), rev_merge, out);
}

std::vector<int32_t> SpmTokenizer::Encode(std::string_view text, bool add_bos,
                                          bool parse_special) const {
  std::vector<int32_t> out;
  if (add_bos && vocab_.add_bos && vocab_.bos >= 0) out.push_back(vocab_.bos);
  std::vector<Fragment> fragments;
  SplitSpecial(text, parse_special, &fragments);
  bool after_special = true;  // the input's start counts as following a special token
  std::string escaped;
  for (const Fragment& f : fragments) {
    if (f.id >= 0) {
      out.push_back(f.id);
      after_special = true;
      continue;
    }
    escaped.clear();
    if (add_space_prefix_ && after_special) escaped += kSpaceMarker;
    escaped += ReplaceAll(f.text, " ", kSpaceMarker);
    EncodeText(escaped, &out);
    after_special = false;
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSpmTokenizer(VocabData vocab,
                                                              bool add_space_prefix) {
  auto tok = std::make_unique<SpmTokenizer>(add_space_prefix);
  if (absl::Status s = tok->Init(std::move(vocab)); !s.ok()) return s;
  return tok;
}

}  // namespace deft
