// SampleEngine + ServerMetrics::UpdateFromEngine on a real TreeEngine (the test model): after a
// tree with forked branches has generated, the scraped gauges and counters equal what the engine
// reports, and deleting the tree shows in the next sample.
#include <gtest/gtest.h>

#include <future>
#include <map>
#include <string>

#include "engine/scheduler/tree_engine.h"
#include "server/metrics.h"

namespace deft {
namespace {

std::map<std::string, double> ParseSamples(const std::string& text) {
  std::map<std::string, double> samples;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    const std::string line = text.substr(pos, eol - pos);
    pos = eol + 1;
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    samples[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return samples;
}

TEST(EngineSamplerTest, GaugesAndCountersFollowTheEngine) {
  auto loaded = LoadGgufModel(DEFT_TEST_MODEL, {});
  ASSERT_TRUE(loaded.ok()) << loaded.status() << " (run scripts/fetch_model.sh)";
  auto model = LlamaModel::Create(std::move(*loaded), {});
  ASSERT_TRUE(model.ok()) << model.status();
  EngineOptions options;
  options.mode = AttentionMode::kFlatten;
  options.kv_pool_bytes = int64_t{16} << 20;
  auto engine_or = TreeEngine::Create(std::move(*model), options);
  ASSERT_TRUE(engine_or.ok()) << engine_or.status();
  TreeEngine& engine = **engine_or;

  ServerMetrics metrics;
  metrics.UpdateFromEngine(SampleEngine(engine));
  std::map<std::string, double> s = ParseSamples(metrics.Serialize());
  EXPECT_EQ(s.at("deft_trees"), 0);
  EXPECT_EQ(s.at("deft_kv_blocks_used"), 0);
  EXPECT_GT(s.at("deft_kv_blocks_capacity"), 0);
  EXPECT_EQ(s.at("deft_kv_blocks_capacity"), engine.total_blocks());

  std::vector<int32_t> prompt = engine.model().tokenizer().Encode(
      "Two branches share this prompt, and the attention reads its KV once for both of them.",
      false, false);
  auto tree = engine.CreateTree(prompt);
  ASSERT_TRUE(tree.ok()) << tree.status();
  auto kids = engine.Fork(*tree, 0, static_cast<int64_t>(prompt.size()), 2);
  ASSERT_TRUE(kids.ok()) << kids.status();
  std::vector<BranchRequest> branches;
  for (NodeId kid : *kids) {
    BranchRequest r;
    r.node = kid;
    r.params.temperature = 0;
    r.params.max_tokens = 6;
    r.params.ignore_eos = true;
    branches.push_back(r);
  }
  std::promise<absl::Status> done;
  GenerateCallbacks cb;
  cb.on_done = [&done](const absl::Status& status) { done.set_value(status); };
  ASSERT_TRUE(engine.Generate(*tree, branches, cb).ok());
  ASSERT_TRUE(done.get_future().get().ok());

  const StepStats stats = engine.stats();
  ASSERT_GT(stats.kv_bytes_floor, 0);
  metrics.UpdateFromEngine(SampleEngine(engine));
  s = ParseSamples(metrics.Serialize());
  EXPECT_EQ(s.at("deft_trees"), 1);
  EXPECT_EQ(s.at("deft_kv_blocks_used"), engine.total_blocks() - engine.free_blocks());
  EXPECT_GT(s.at("deft_kv_blocks_used"), 0);
  EXPECT_EQ(s.at("deft_kv_bytes_read_total"), static_cast<double>(stats.kv_bytes_read));
  EXPECT_EQ(s.at("deft_kv_bytes_floor_total"), static_cast<double>(stats.kv_bytes_floor));

  ASSERT_TRUE(engine.DeleteTree(*tree).ok());
  metrics.UpdateFromEngine(SampleEngine(engine));
  s = ParseSamples(metrics.Serialize());
  EXPECT_EQ(s.at("deft_trees"), 0);
  EXPECT_EQ(s.at("deft_kv_blocks_used"), 0);
  // No steps ran since: the counters did not move.
  EXPECT_EQ(s.at("deft_kv_bytes_read_total"), static_cast<double>(stats.kv_bytes_read));
}

}  // namespace
}  // namespace deft
