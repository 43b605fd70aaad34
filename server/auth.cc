// Bearer API keys; see auth.h.
#include "server/auth.h"

#include <cctype>
#include <charconv>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace deft {
namespace {

// Debian's Abseil has its own string_view; StrCat takes that one.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r'; }

bool ValidKeyId(std::string_view id) {
  for (char c : id) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '.' && c != '-') {
      return false;
    }
  }
  return !id.empty();
}

bool ValidSecretChars(std::string_view s) {
  for (char c : s) {
    if (c <= ' ' || c > '~') return false;
  }
  return true;
}

// Whitespace-separated tokens of a line, up to a comment.
std::vector<std::string_view> Tokenize(std::string_view line) {
  std::vector<std::string_view> tokens;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && IsSpace(line[i])) ++i;
    if (i == line.size() || line[i] == '#') break;
    size_t j = i;
    while (j < line.size() && !IsSpace(line[j])) ++j;
    tokens.push_back(line.substr(i, j - i));
    i = j;
  }
  return tokens;
}

std::optional<int64_t> ParseCount(std::string_view s) {
  int64_t v = 0;
  if (s.empty()) return std::nullopt;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < 0) return std::nullopt;
  return v;
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

grpc::Status CheckAdd(const ApiKey& key, const std::optional<int64_t>& max, const char* name,
                      int64_t current, int64_t additional) {
  if (!max || additional <= *max - current) return grpc::Status::OK;  // no overflow
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                      absl::StrCat("API key \"", key.id, "\" would exceed its ", name, " quota (",
                                   current, " + ", additional, " > ", *max, ")"));
}

}  // namespace

bool SecretEquals(std::string_view presented, std::string_view secret) {
  // Every byte of `presented` is compared (against secret bytes cycled when lengths differ), and
  // the length difference folds into the same accumulator.
  unsigned diff = presented.size() == secret.size() ? 0u : 1u;
  if (secret.empty()) return presented.empty();
  for (size_t i = 0; i < presented.size(); ++i) {
    diff |= static_cast<unsigned char>(presented[i]) ^
            static_cast<unsigned char>(secret[i % secret.size()]);
  }
  return diff == 0;
}

absl::StatusOr<ApiKeys> ApiKeys::LoadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read API key file ", path));
  std::stringstream text;
  text << in.rdbuf();
  return Parse(text.str(), path);
}

absl::StatusOr<ApiKeys> ApiKeys::Parse(std::string_view text, std::string_view source) {
  ApiKeys result;
  absl::flat_hash_map<std::string, int> id_line;      // key id -> line
  absl::flat_hash_map<std::string, int> secret_line;  // secret -> line
  int line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string_view::npos) eol = text.size();
    const std::string_view line = text.substr(pos, eol - pos);
    pos = eol + 1;
    ++line_no;
    const std::vector<std::string_view> tokens = Tokenize(line);
    if (tokens.empty()) continue;
    auto error = [&](std::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat(Av(source), ":", line_no, ": ", Av(what)));
    };
    if (tokens.size() < 2) return error("expected \"<key-id> <secret> [options]\"");
    ApiKey key;
    key.id = std::string(tokens[0]);
    key.secret = std::string(tokens[1]);
    if (!ValidKeyId(key.id)) {
      return error(absl::StrCat("invalid key id \"", key.id, "\" (allowed: A-Z a-z 0-9 _ . -)"));
    }
    if (!ValidSecretChars(key.secret)) {
      return error("secret has characters other than printable non-space ASCII");
    }
    if (key.secret.size() < kMinSecretLength) {
      return error(absl::StrCat("secret of key \"", key.id, "\" is shorter than ", kMinSecretLength,
                                " characters"));
    }
    for (size_t t = 2; t < tokens.size(); ++t) {
      const std::string_view opt = tokens[t];
      if (opt == "readonly") {
        if (key.readonly) return error("option \"readonly\" given twice");
        key.readonly = true;
        continue;
      }
      const size_t eq = opt.find('=');
      const std::string_view name = opt.substr(0, eq);
      std::optional<int64_t>* field = nullptr;
      if (name == "trees") field = &key.max_trees;
      if (name == "nodes") field = &key.max_nodes;
      if (name == "kv_blocks") field = &key.max_kv_blocks;
      if (field == nullptr) {
        return error(absl::StrCat("unknown option \"", Av(opt),
                                  "\" (expected trees=N, nodes=N, kv_blocks=N or readonly)"));
      }
      if (eq == std::string_view::npos) {
        return error(absl::StrCat("option \"", Av(name), "\" needs a value: ", Av(name), "=N"));
      }
      if (field->has_value()) return error(absl::StrCat("option \"", Av(name), "\" given twice"));
      *field = ParseCount(opt.substr(eq + 1));
      if (!field->has_value()) {
        return error(absl::StrCat("option \"", Av(name), "\": \"", Av(opt.substr(eq + 1)),
                                  "\" is not a non-negative integer"));
      }
    }
    if (auto [it, inserted] = id_line.emplace(key.id, line_no); !inserted) {
      return error(
          absl::StrCat("duplicate key id \"", key.id, "\" (first on line ", it->second, ")"));
    }
    if (auto [it, inserted] = secret_line.emplace(key.secret, line_no); !inserted) {
      return error(absl::StrCat("key \"", key.id, "\" reuses the secret of line ", it->second));
    }
    result.keys_.push_back(std::move(key));
  }
  if (result.keys_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(Av(source), ": no API keys"));
  }
  return result;
}

const ApiKey* ApiKeys::Find(std::string_view id) const {
  for (const ApiKey& k : keys_) {
    if (k.id == id) return &k;
  }
  return nullptr;
}

grpc::Status ApiKeys::Authenticate(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata, const ApiKey** key) const {
  auto [begin, end] = metadata.equal_range("authorization");
  if (begin == end) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing authorization metadata (expected \"authorization: Bearer "
                        "<api key>\")");
  }
  if (std::next(begin) != end) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "more than one authorization metadata entry");
  }
  const std::string_view value(begin->second.data(), begin->second.size());
  constexpr std::string_view kScheme = "Bearer";
  std::string_view presented;
  if (value.size() > kScheme.size() && EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme) &&
      value[kScheme.size()] == ' ') {
    presented = value.substr(kScheme.size());
    while (!presented.empty() && presented.front() == ' ') presented.remove_prefix(1);
    while (!presented.empty() && presented.back() == ' ') presented.remove_suffix(1);
  }
  if (presented.empty()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "malformed authorization metadata (expected \"Bearer <api key>\")");
  }
  const ApiKey* found = nullptr;
  for (const ApiKey& k : keys_) {  // no early exit: every key costs the same
    if (SecretEquals(presented, k.secret) && found == nullptr) found = &k;
  }
  if (found == nullptr) return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid API key");
  *key = found;
  return grpc::Status::OK;
}

grpc::Status ApiKeys::CheckMayMutate(const ApiKey& key, std::string_view method) {
  if (!key.readonly) return grpc::Status::OK;
  return grpc::Status(
      grpc::StatusCode::PERMISSION_DENIED,
      absl::StrCat("API key \"", key.id, "\" is read-only and may not call ", Av(method)));
}

grpc::Status ApiKeys::CheckTreeQuota(const ApiKey& key, int64_t current_trees) {
  if (!key.max_trees || current_trees < *key.max_trees) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                      absl::StrCat("API key \"", key.id, "\" is at its trees quota (",
                                   current_trees, " of ", *key.max_trees, ")"));
}

grpc::Status ApiKeys::CheckNodeQuota(const ApiKey& key, int64_t current, int64_t additional) {
  return CheckAdd(key, key.max_nodes, "nodes", current, additional);
}

grpc::Status ApiKeys::CheckKvBlockQuota(const ApiKey& key, int64_t current, int64_t additional) {
  return CheckAdd(key, key.max_kv_blocks, "kv_blocks", current, additional);
}

}  // namespace deft
