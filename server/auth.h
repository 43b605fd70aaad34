// Bearer API keys: the key file, authentication of a call's "authorization" metadata, and
// per-key quotas and permissions.
//
// Key file: one key per line, `<key-id> <secret> [trees=N] [nodes=N] [kv_blocks=N] [readonly]`.
// A `#` at the start of a line or after whitespace starts a comment; blank lines are skipped.
// key-id: [A-Za-z0-9_.-]+; secret: at least kMinSecretLength printable non-space ASCII
// characters. A quota absent from the line is unlimited; N is a non-negative integer. `readonly`
// keys may call only non-mutating RPCs (the server decides which are mutating).
//
// Errors: a malformed line, an unknown option, a repeated option, a duplicate key id or secret
// give INVALID_ARGUMENT "<path>:<line>: ..." (a secret is never echoed); a file with no keys
// gives INVALID_ARGUMENT "<path>: no API keys"; an unreadable file gives NOT_FOUND.
//
// Secrets are compared in constant time (for a given presented length) against every key, so
// the time taken does not tell how much of a secret matched, or which key.
//
// Thread safety: an ApiKeys is immutable after loading; all const methods may be called from any
// thread.
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace deft {

struct ApiKey {
  std::string id;
  std::string secret;
  std::optional<int64_t> max_trees;  // live trees owned by the key
  // nodes and kv_blocks are counted and enforced as server/quota.h says.
  std::optional<int64_t> max_nodes;      // nodes over all of the key's trees
  std::optional<int64_t> max_kv_blocks;  // KV blocks referenced by the key's trees
  bool readonly = false;
};

// Constant-time for a given `presented` length: no early exit on the first differing byte.
bool SecretEquals(std::string_view presented, std::string_view secret);

class ApiKeys {
 public:
  static constexpr size_t kMinSecretLength = 16;

  static absl::StatusOr<ApiKeys> LoadFile(const std::string& path);
  // `source` names the text in error messages (the path, for LoadFile).
  static absl::StatusOr<ApiKeys> Parse(std::string_view text, std::string_view source);

  const std::vector<ApiKey>& keys() const { return keys_; }
  // nullptr for an unknown id.
  const ApiKey* Find(std::string_view id) const;

  // Authenticates a call from its client metadata ("authorization: Bearer <secret>"; the scheme
  // is case-insensitive). On OK sets *key (valid while this ApiKeys lives). Errors, all
  // UNAUTHENTICATED: "missing authorization metadata ...", "more than one authorization
  // metadata entry", "malformed authorization metadata ..." (not Bearer, or no secret),
  // "invalid API key" (no key has that secret).
  grpc::Status Authenticate(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                            const ApiKey** key) const;
  grpc::Status Authenticate(const grpc::CallbackServerContext& context, const ApiKey** key) const {
    return Authenticate(context.client_metadata(), key);
  }

  // PERMISSION_DENIED `API key "<id>" is read-only and may not call <method>` for readonly keys.
  static grpc::Status CheckMayMutate(const ApiKey& key, std::string_view method);

  // May `key`, owning `current_trees` trees now, create one more? RESOURCE_EXHAUSTED
  // `API key "<id>" is at its trees quota (<current> of <max>)` otherwise.
  static grpc::Status CheckTreeQuota(const ApiKey& key, int64_t current_trees);
  // May `key`, with `current` nodes (KV blocks) in its trees, add `additional` more?
  // RESOURCE_EXHAUSTED `API key "<id>" would exceed its nodes quota (<current> + <additional>
  // > <max>)` otherwise (kv_blocks likewise).
  static grpc::Status CheckNodeQuota(const ApiKey& key, int64_t current, int64_t additional);
  static grpc::Status CheckKvBlockQuota(const ApiKey& key, int64_t current, int64_t additional);

 private:
  std::vector<ApiKey> keys_;
};

}  // namespace deft
