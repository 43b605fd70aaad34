// TreeRegistry: unguessable ids, owners isolated (NOT_FOUND, not PERMISSION_DENIED), idle expiry
// that spares trees in use.
#include "server/tree_registry.h"

#include <gtest/gtest.h>

#include <set>

namespace deft::server {
namespace {

TEST(TreeRegistryTest, IdsAre128BitHexAndDistinct) {
  TreeRegistry r;
  std::set<std::string> ids;
  for (int i = 0; i < 1000; ++i) {
    std::string id = r.Add(i, "");
    EXPECT_EQ(id.size(), 32u);
    EXPECT_EQ(id.find_first_not_of("0123456789abcdef"), std::string::npos) << id;
    ids.insert(id);
  }
  EXPECT_EQ(ids.size(), 1000u);
}

TEST(TreeRegistryTest, AnotherOwnerGetsNotFound) {
  TreeRegistry r;
  const std::string id = r.Add(7, "alice");
  ASSERT_TRUE(r.Find(id, "alice").ok());
  EXPECT_EQ(*r.Find(id, "alice"), 7);
  auto other = r.Find(id, "bob");
  EXPECT_EQ(other.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(other.status().message(), "tree \"" + id + "\" not found");
  EXPECT_EQ(r.Remove(id, "bob").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(r.List("bob").size(), 0u);
  ASSERT_EQ(r.List("alice").size(), 1u);
  EXPECT_EQ(*r.Remove(id, "alice"), 7);
  EXPECT_EQ(r.Find(id, "alice").status().code(), absl::StatusCode::kNotFound);
}

TEST(TreeRegistryTest, SweepDeletesIdleTreesButNotTreesInUse) {
  TreeRegistry r;
  std::vector<TreeId> deleted;
  r.StartSweeper(std::chrono::seconds(10), std::chrono::hours(1),
                 [&](TreeId t) { deleted.push_back(t); });
  const std::string idle = r.Add(1, "");
  const std::string busy = r.Add(2, "");
  r.Acquire(busy);
  const auto now = TreeRegistry::Clock::now();
  EXPECT_EQ(r.SweepIdle(now + std::chrono::seconds(5)), 0);
  EXPECT_EQ(r.SweepIdle(now + std::chrono::seconds(11)), 1);
  EXPECT_EQ(deleted, std::vector<TreeId>{1});
  EXPECT_EQ(r.Find(idle, "").status().code(), absl::StatusCode::kNotFound);
  r.Release(busy);
  EXPECT_EQ(r.SweepIdle(TreeRegistry::Clock::now() + std::chrono::seconds(11)), 1);
  EXPECT_EQ(deleted, (std::vector<TreeId>{1, 2}));
  EXPECT_EQ(r.size(), 0u);
}

TEST(TreeRegistryTest, BackgroundSweeperExpiresUntouchedTrees) {
  TreeRegistry r;
  std::atomic<int> deleted{0};
  r.StartSweeper(std::chrono::milliseconds(50), std::chrono::milliseconds(10),
                 [&](TreeId) { ++deleted; });
  r.Add(1, "");
  for (int i = 0; i < 200 && deleted == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(deleted, 1);
  EXPECT_EQ(r.size(), 0u);
}

}  // namespace
}  // namespace deft::server
