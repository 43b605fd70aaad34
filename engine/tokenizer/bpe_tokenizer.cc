// Byte-level BPE; see bpe_tokenizer.h.
//
// Merging follows HF tokenizers' BPE exactly: each byte of a pre-token starts as its own symbol
// (a byte with no token in the vocabulary is dropped, as HF does without an unk token); a min-heap
// holds (rank, position) of adjacent pairs that have a merge; the lowest rank merges first, ties
// going to the leftmost pair; stale heap entries are skipped when popped. O(n log n) per pre-token.
#include "engine/tokenizer/bpe_tokenizer.h"

#include <algorithm>
#include <array>
#include <functional>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/unicode.h"

namespace deft {
namespace {

struct ByteMaps {
  std::array<uint32_t, 256> to_unicode;
  absl::flat_hash_map<uint32_t, uint8_t> to_byte;
  ByteMaps() {
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      to_unicode[b] = printable ? static_cast<uint32_t>(b) : next++;
      to_byte[to_unicode[b]] = static_cast<uint8_t>(b);
    }
  }
};

const ByteMaps& GetByteMaps() {
  static const ByteMaps* maps = new ByteMaps();
  return *maps;
}

// The raw bytes a byte-level token text stands for; characters outside the byte alphabet (which
// a well-formed vocabulary does not have) are kept as their UTF-8.
std::string ByteLevelDecode(std::string_view text) {
  const ByteMaps& maps = GetByteMaps();
  std::string out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t len = 1;
    const uint32_t cp = DecodeUtf8(text, pos, &len);
    auto it = maps.to_byte.find(cp);
    if (it != maps.to_byte.end()) {
      out.push_back(static_cast<char>(it->second));
    } else {
      out.append(text.substr(pos, len));
    }
    pos += len;
  }
  return out;
}

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

struct Merge {
  int32_t rank;
  int32_t new_id;
};

class BpeTokenizer final : public VocabTokenizer {
 public:
  BpeTokenizer(PreTokenizer pre, bool ignore_merges)
      : pre_tokenizer_(pre), ignore_merges_(ignore_merges) {}

  absl::Status Init(VocabData vocab,
                    const std::vector<std::pair<std::string, std::string>>& merges);

  std::vector<int32_t> Encode(std::string_view text, bool add_bos,
                              bool parse_special) const override;

 private:
  struct Symbol {
    int32_t id;  // -1 once merged into its left neighbour
    int32_t prev, next;
  };
  struct Candidate {
    int32_t rank, pos, new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  struct Scratch {
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
    std::string mapped;
    std::vector<std::string_view> pieces;
    std::vector<Fragment> fragments;
  };

  void EncodePiece(std::string_view piece, Scratch* s, std::vector<int32_t>* out) const;
  const Merge* FindMerge(int32_t left, int32_t right) const {
    auto it = merges_.find(PairKey(left, right));
    return it == merges_.end() ? nullptr : &it->second;
  }

  PreTokenizer pre_tokenizer_;
  bool ignore_merges_;
  std::array<int32_t, 256> byte_ids_;  // token of each single byte, -1 if none
  absl::flat_hash_map<uint64_t, Merge> merges_;
};

absl::Status BpeTokenizer::Init(VocabData vocab,
                                const std::vector<std::pair<std::string, std::string>>& merges) {
  std::vector<std::string> bytes(vocab.texts.size());
  for (size_t id = 0; id < vocab.texts.size(); ++id) {
    const TokenType type = id < vocab.types.size() ? vocab.types[id] : TokenType::kNormal;
    // Control and user-defined tokens are stored as plain text, the rest in the byte alphabet.
    bytes[id] = (type == TokenType::kControl || type == TokenType::kUserDefined)
                    ? vocab.texts[id]
                    : ByteLevelDecode(vocab.texts[id]);
  }
  if (absl::Status s = InitVocab(std::move(vocab), std::move(bytes)); !s.ok()) return s;

  const ByteMaps& maps = GetByteMaps();
  for (int b = 0; b < 256; ++b) {
    std::string text;
    AppendUtf8(maps.to_unicode[b], &text);
    auto it = text_to_id_.find(text);
    byte_ids_[b] = it == text_to_id_.end() ? -1 : it->second;
  }

  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [left, right] = merges[rank];
    auto l = text_to_id_.find(left);
    auto r = text_to_id_.find(right);
    auto m = text_to_id_.find(absl::StrCat(left, right));
    if (l == text_to_id_.end() || r == text_to_id_.end() || m == text_to_id_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("merge ", rank, " '", left, " ", right,
                                                     "' names a token not in the vocabulary"));
    }
    // A repeated pair keeps its first (best) rank, as llama.cpp does (HF keeps the last).
    merges_.try_emplace(PairKey(l->second, r->second),
                        Merge{static_cast<int32_t>(rank), m->second});
  }
  return absl::OkStatus();
}

void BpeTokenizer::EncodePiece(std::string_view piece, Scratch* s,
                               std::vector<int32_t>* out) const {
  if (ignore_merges_) {
    s->mapped.clear();
    for (char c : piece) AppendUtf8(GetByteMaps().to_unicode[static_cast<uint8_t>(c)], &s->mapped);
    if (auto it = text_to_id_.find(s->mapped); it != text_to_id_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  std::vector<Symbol>& symbols = s->symbols;
  symbols.clear();
  for (char c : piece) {
    const int32_t id = byte_ids_[static_cast<uint8_t>(c)];
    if (id < 0) continue;  // no token for this byte: HF drops it
    const int32_t n = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, n - 1, -1});
    if (n > 0) symbols[n - 1].next = n;
  }
  if (symbols.empty()) return;

  // A min-heap (by rank, then position) kept in the scratch vector to reuse its storage.
  std::vector<Candidate>& heap = s->heap;
  heap.clear();
  const auto cmp = std::greater<Candidate>();
  const auto push_pair = [&](int32_t pos) {
    if (pos < 0) return;
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    if (const Merge* m = FindMerge(symbols[pos].id, symbols[next].id)) {
      heap.push_back({m->rank, pos, m->new_id});
      std::push_heap(heap.begin(), heap.end(), cmp);
    }
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) push_pair(i);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), cmp);
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[top.pos];
    if (left.id < 0 || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    const Merge* m = FindMerge(left.id, right.id);
    if (m == nullptr || m->new_id != top.new_id) continue;  // stale: a neighbour changed
    left.id = top.new_id;
    right.id = -1;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    push_pair(left.prev);
    push_pair(top.pos);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) out->push_back(symbols[i].id);
}

std::vector<int32_t> BpeTokenizer::Encode(std::string_view text, bool add_bos,
                                          bool parse_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && vocab_.add_bos && vocab_.bos >= 0) out.push_back(vocab_.bos);
  Scratch scratch;
  SplitSpecial(text, parse_special, &scratch.fragments);
  for (const Fragment& f : scratch.fragments) {
    if (f.id >= 0) {
      out.push_back(f.id);
      continue;
    }
    scratch.pieces.clear();
    PreTokenize(pre_tokenizer_, f.text, &scratch.pieces);
    for (std::string_view piece : scratch.pieces) EncodePiece(piece, &scratch, &out);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateBpeTokenizer(
    VocabData vocab, const std::vector<std::pair<std::string, std::string>>& merges,
    PreTokenizer pre_tokenizer, bool ignore_merges) {
  auto tok = std::make_unique<BpeTokenizer>(pre_tokenizer, ignore_merges);
  if (absl::Status s = tok->Init(std::move(vocab), merges); !s.ok()) return s;
  return tok;
}

}  // namespace deft
