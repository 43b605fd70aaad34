#include "server/tree_registry.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace deft::server {

std::string UnknownTreeMessage(const std::string& id) {
  return absl::StrCat("tree \"", id, "\" not found");
}

TreeRegistry::~TreeRegistry() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  if (sweeper_.joinable()) sweeper_.join();
}

std::string TreeRegistry::NewId() {
  // std::random_device reads the OS entropy source; 4 x 32 bits = 128 bits.
  std::random_device rd;
  std::string id;
  for (int i = 0; i < 4; ++i) absl::StrAppend(&id, absl::StrFormat("%08x", rd()));
  return id;
}

std::string TreeRegistry::Add(TreeId engine_tree, const std::string& owner) {
  std::lock_guard<std::mutex> lock(mu_);
  std::string id;
  do {
    id = NewId();
  } while (trees_.contains(id));
  trees_[id] = Entry{engine_tree, owner, Clock::now(), 0};
  return id;
}

absl::StatusOr<TreeId> TreeRegistry::Find(const std::string& id, const std::string& owner) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = trees_.find(id);
  if (it == trees_.end() || it->second.owner != owner) {
    return absl::NotFoundError(UnknownTreeMessage(id));
  }
  it->second.last_used = Clock::now();
  return it->second.engine_tree;
}

absl::StatusOr<TreeId> TreeRegistry::Remove(const std::string& id, const std::string& owner) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = trees_.find(id);
  if (it == trees_.end() || it->second.owner != owner) {
    return absl::NotFoundError(UnknownTreeMessage(id));
  }
  const TreeId t = it->second.engine_tree;
  trees_.erase(it);
  return t;
}

std::vector<std::pair<std::string, TreeId>> TreeRegistry::List(const std::string& owner) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::pair<std::string, TreeId>> out;
  for (const auto& [id, e] : trees_) {
    if (e.owner == owner) out.emplace_back(id, e.engine_tree);
  }
  return out;
}

void TreeRegistry::Acquire(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = trees_.find(id);
  if (it == trees_.end()) return;
  ++it->second.uses;
  it->second.last_used = Clock::now();
}

void TreeRegistry::Release(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = trees_.find(id);
  if (it == trees_.end()) return;
  if (it->second.uses > 0) --it->second.uses;
  it->second.last_used = Clock::now();
}

void TreeRegistry::StartSweeper(std::chrono::milliseconds ttl, std::chrono::milliseconds period,
                                std::function<void(TreeId)> delete_tree) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ttl_ = ttl;
    delete_tree_ = std::move(delete_tree);
  }
  if (ttl.count() <= 0 || sweeper_.joinable()) return;
  sweeper_ = std::thread([this, period] {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_cv_.wait_for(lock, period, [this] { return stop_; })) {
      lock.unlock();
      SweepIdle(Clock::now());
      lock.lock();
    }
  });
}

int TreeRegistry::SweepIdle(Clock::time_point now) {
  std::vector<TreeId> expired;
  std::function<void(TreeId)> del;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ttl_.count() <= 0 || !delete_tree_) return 0;
    for (auto it = trees_.begin(); it != trees_.end();) {
      if (it->second.uses == 0 && now - it->second.last_used >= ttl_) {
        expired.push_back(it->second.engine_tree);
        trees_.erase(it++);
      } else {
        ++it;
      }
    }
    del = delete_tree_;
  }
  for (TreeId t : expired) del(t);
  return static_cast<int>(expired.size());
}

size_t TreeRegistry::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return trees_.size();
}

}  // namespace deft::server
