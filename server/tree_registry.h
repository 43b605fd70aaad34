// TreeRegistry: the server's map from public tree ids to engine trees.
//
// Public ids are 128 random bits from std::random_device, as 32 lowercase hex digits, so a client
// cannot guess another client's tree. Every tree has an owner (the caller's API key id, "" when
// auth is off); a lookup by any other owner answers NOT_FOUND exactly as for an unknown id, so
// ids do not leak across keys.
//
// Idle expiry: every lookup touches the tree. A background sweep (started by StartSweeper) deletes
// trees untouched for `ttl` through the `delete_tree` callback, skipping trees that are in use
// (an open Generate stream holds a use; see Acquire/Release).
//
// Thread safety: all methods may be called from any thread. `delete_tree` is called without the
// registry lock held.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/tree/tree_kv_cache.h"

namespace deft::server {

class TreeRegistry {
 public:
  using Clock = std::chrono::steady_clock;

  TreeRegistry() = default;
  TreeRegistry(const TreeRegistry&) = delete;
  TreeRegistry& operator=(const TreeRegistry&) = delete;
  ~TreeRegistry();  // stops the sweeper

  // Registers an engine tree for `owner`; returns its new public id.
  std::string Add(TreeId engine_tree, const std::string& owner);
  // The engine tree behind `id` when `owner` owns it (and touches it); NOT_FOUND otherwise.
  absl::StatusOr<TreeId> Find(const std::string& id, const std::string& owner);
  // Removes `id` (owned by `owner`); returns the engine tree it named, NOT_FOUND otherwise.
  absl::StatusOr<TreeId> Remove(const std::string& id, const std::string& owner);
  // Public ids owned by `owner`, with their engine trees, in no particular order.
  std::vector<std::pair<std::string, TreeId>> List(const std::string& owner) const;

  // A use keeps the tree from expiring until the matching Release (both touch it).
  void Acquire(const std::string& id);
  void Release(const std::string& id);

  // Deletes idle trees every `period` (trees idle for `ttl` or longer); ttl <= 0 disables expiry.
  void StartSweeper(std::chrono::milliseconds ttl, std::chrono::milliseconds period,
                    std::function<void(TreeId)> delete_tree);
  // One sweep now, as of `now`; returns how many trees it deleted. Used by the sweeper and tests.
  int SweepIdle(Clock::time_point now);

  size_t size() const;

 private:
  struct Entry {
    TreeId engine_tree = 0;
    std::string owner;
    Clock::time_point last_used;
    int uses = 0;
  };
  static std::string NewId();

  mutable std::mutex mu_;
  absl::flat_hash_map<std::string, Entry> trees_;
  std::chrono::milliseconds ttl_{0};
  std::function<void(TreeId)> delete_tree_;
  std::condition_variable stop_cv_;
  bool stop_ = false;
  std::thread sweeper_;
};

// Message of the NOT_FOUND answer for a tree id (shared by every handler).
std::string UnknownTreeMessage(const std::string& id);

}  // namespace deft::server
