// ServerMetrics + MetricsHttpServer: values recorded through the API are the values a scrape of
// GET /metrics over loopback HTTP returns, and the exposition passes `promtool check metrics`.
#include "server/metrics.h"

#include <gtest/gtest.h>
#include <httplib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace deft {
namespace {

// Parses text format 0.0.4 sample lines into "name{labels}" -> value (labels as written).
std::map<std::string, double> ParseSamples(const std::string& text) {
  std::map<std::string, double> samples;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    samples[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return samples;
}

std::string Scrape(int port, std::string* content_type = nullptr) {
  httplib::Client client("127.0.0.1", port);
  auto res = client.Get("/metrics");
  EXPECT_TRUE(res) << "GET /metrics failed: " << httplib::to_string(res.error());
  if (!res) return "";
  EXPECT_EQ(res->status, 200);
  if (content_type != nullptr) *content_type = res->get_header_value("Content-Type");
  return res->body;
}

// Full path of promtool on PATH, or "" when absent.
std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path != nullptr ? path : "");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::filesystem::path p = std::filesystem::path(dir.empty() ? "." : dir) / name;
    if (access(p.c_str(), X_OK) == 0) return p.string();
  }
  return "";
}

TEST(ServerMetricsTest, ScrapeOverHttpReturnsRecordedValues) {
  ServerMetrics metrics;
  metrics.RecordTimeToFirstToken(0.003);
  metrics.RecordTimeToFirstToken(2.0);
  metrics.RecordTimePerOutputToken(0.0002);
  metrics.RecordQueueWait(0.7);
  metrics.RecordRequestDuration("Generate", 1.5);
  metrics.RecordStepDuration("decode", 0.02);
  metrics.RecordRequest("Generate", "OK");
  metrics.RecordRequest("Generate", "OK");
  metrics.RecordRequest("Fork", "NOT_FOUND");
  metrics.AddGeneratedTokens(40);
  metrics.AddGeneratedTokens(2);
  metrics.RecordVerifyAccepted(1, 3);
  metrics.RecordVerifyAccepted(8, 1);
  metrics.RecordVerifyAccepted(9, 2);
  metrics.RecordVerifyAccepted(30, 5);
  metrics.AddActiveBranches(5);
  metrics.AddActiveBranches(-2);
  metrics.UpdateFromEngine({.trees = 4,
                            .kv_blocks_total = 100,
                            .kv_blocks_free = 70,
                            .kv_blocks_shared = 12,
                            .kv_bytes_read = 5000,
                            .kv_bytes_floor = 2000});

  MetricsHttpServer server(&metrics);
  absl::StatusOr<int> port = server.Start("127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status();
  ASSERT_GT(*port, 0);
  std::string content_type;
  const std::map<std::string, double> s = ParseSamples(Scrape(*port, &content_type));
  EXPECT_EQ(content_type, "text/plain; version=0.0.4; charset=utf-8");

  EXPECT_EQ(s.at("deft_time_to_first_token_seconds_count"), 2);
  EXPECT_DOUBLE_EQ(s.at("deft_time_to_first_token_seconds_sum"), 2.003);
  EXPECT_EQ(s.at("deft_time_to_first_token_seconds_bucket{le=\"0.005\"}"), 1);
  EXPECT_EQ(s.at("deft_time_to_first_token_seconds_bucket{le=\"1\"}"), 1);
  EXPECT_EQ(s.at("deft_time_to_first_token_seconds_bucket{le=\"2.5\"}"), 2);
  EXPECT_EQ(s.at("deft_time_to_first_token_seconds_bucket{le=\"+Inf\"}"), 2);
  EXPECT_EQ(s.at("deft_time_per_output_token_seconds_bucket{le=\"0.0001\"}"), 0);
  EXPECT_EQ(s.at("deft_time_per_output_token_seconds_bucket{le=\"0.00025\"}"), 1);
  EXPECT_EQ(s.at("deft_queue_wait_seconds_count"), 1);
  EXPECT_EQ(s.at("deft_request_duration_seconds_count{method=\"Generate\"}"), 1);
  EXPECT_DOUBLE_EQ(s.at("deft_request_duration_seconds_sum{method=\"Generate\"}"), 1.5);
  EXPECT_EQ(s.at("deft_step_duration_seconds_count{phase=\"decode\"}"), 1);

  EXPECT_EQ(s.at("deft_requests_total{code=\"OK\",method=\"Generate\"}"), 2);
  EXPECT_EQ(s.at("deft_requests_total{code=\"NOT_FOUND\",method=\"Fork\"}"), 1);
  EXPECT_EQ(s.at("deft_generated_tokens_total"), 42);
  EXPECT_EQ(s.at("deft_verify_accepted_tokens_total{depth=\"1\"}"), 3);
  EXPECT_EQ(s.at("deft_verify_accepted_tokens_total{depth=\"2\"}"), 0);
  EXPECT_EQ(s.at("deft_verify_accepted_tokens_total{depth=\"8\"}"), 1);
  EXPECT_EQ(s.at("deft_verify_accepted_tokens_total{depth=\"9+\"}"), 7);

  EXPECT_EQ(s.at("deft_branches_active"), 3);
  EXPECT_EQ(s.at("deft_trees"), 4);
  EXPECT_EQ(s.at("deft_kv_blocks_capacity"), 100);
  EXPECT_EQ(s.at("deft_kv_blocks_used"), 30);
  EXPECT_EQ(s.at("deft_kv_blocks_shared"), 12);
  EXPECT_EQ(s.at("deft_kv_bytes_read_total"), 5000);
  EXPECT_EQ(s.at("deft_kv_bytes_floor_total"), 2000);
  server.Stop();
}

TEST(ServerMetricsTest, StatusCodesAreLabelledByTheirGrpcNames) {
  EXPECT_EQ(StatusCodeName(grpc::StatusCode::OK), "OK");
  EXPECT_EQ(StatusCodeName(grpc::StatusCode::NOT_FOUND), "NOT_FOUND");
  EXPECT_EQ(StatusCodeName(grpc::StatusCode::RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
  EXPECT_EQ(StatusCodeName(grpc::StatusCode::UNAUTHENTICATED), "UNAUTHENTICATED");
  EXPECT_EQ(StatusCodeName(static_cast<grpc::StatusCode>(99)), "UNKNOWN_CODE_99");
  ServerMetrics metrics;
  metrics.RecordRequest("Prune", grpc::StatusCode::FAILED_PRECONDITION);
  const std::map<std::string, double> s = ParseSamples(metrics.Serialize());
  EXPECT_EQ(s.at("deft_requests_total{code=\"FAILED_PRECONDITION\",method=\"Prune\"}"), 1);
}

TEST(ServerMetricsTest, EngineTotalsAreAddedByDelta) {
  ServerMetrics metrics;
  EngineSample sample{.kv_bytes_read = 1000, .kv_bytes_floor = 400};
  metrics.UpdateFromEngine(sample);
  metrics.UpdateFromEngine(sample);  // unchanged totals add nothing
  sample.kv_bytes_read = 1600;
  sample.kv_bytes_floor = 500;
  metrics.UpdateFromEngine(sample);
  std::map<std::string, double> s = ParseSamples(metrics.Serialize());
  EXPECT_EQ(s.at("deft_kv_bytes_read_total"), 1600);
  EXPECT_EQ(s.at("deft_kv_bytes_floor_total"), 500);

  // An engine restart: the totals fall to 300/100 and count again from zero.
  sample.kv_bytes_read = 300;
  sample.kv_bytes_floor = 100;
  metrics.UpdateFromEngine(sample);
  s = ParseSamples(metrics.Serialize());
  EXPECT_EQ(s.at("deft_kv_bytes_read_total"), 1900);
  EXPECT_EQ(s.at("deft_kv_bytes_floor_total"), 600);
}

TEST(ServerMetricsTest, UnsetSharedBlocksLeavesGaugeUnchanged) {
  ServerMetrics metrics;
  metrics.UpdateFromEngine({.kv_blocks_shared = 7});
  metrics.UpdateFromEngine({.trees = 1});
  const std::map<std::string, double> s = ParseSamples(metrics.Serialize());
  EXPECT_EQ(s.at("deft_kv_blocks_shared"), 7);
  EXPECT_EQ(s.at("deft_trees"), 1);
}

TEST(ServerMetricsTest, ConcurrentRecordingLosesNothing) {
  ServerMetrics metrics;
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&metrics, t] {
      for (int i = 0; i < kPerThread; ++i) {
        metrics.AddGeneratedTokens(1);
        metrics.RecordRequest(t % 2 == 0 ? "Generate" : "Verify", "OK");
        metrics.RecordTimePerOutputToken(0.001);
      }
    });
  }
  for (auto& th : threads) th.join();
  const std::map<std::string, double> s = ParseSamples(metrics.Serialize());
  EXPECT_EQ(s.at("deft_generated_tokens_total"), kThreads * kPerThread);
  EXPECT_EQ(s.at("deft_requests_total{code=\"OK\",method=\"Generate\"}"), 2 * kPerThread);
  EXPECT_EQ(s.at("deft_requests_total{code=\"OK\",method=\"Verify\"}"), 2 * kPerThread);
  EXPECT_EQ(s.at("deft_time_per_output_token_seconds_count"), kThreads * kPerThread);
}

TEST(ServerMetricsTest, ScrapePassesPromtoolCheckMetrics) {
  const std::string promtool = FindOnPath("promtool");
  ASSERT_FALSE(promtool.empty())
      << "promtool not found on PATH; install the Debian package `prometheus` "
         "(scripts/install_deps.sh does)";
  ServerMetrics metrics;
  metrics.RecordTimeToFirstToken(0.1);
  metrics.RecordRequestDuration("Generate", 0.5);
  metrics.RecordStepDuration("prefill", 0.05);
  metrics.RecordRequest("Generate", "OK");
  metrics.RecordVerifyAccepted(2, 1);
  MetricsHttpServer server(&metrics);
  absl::StatusOr<int> port = server.Start("127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status();
  const std::string body = Scrape(*port);
  ASSERT_FALSE(body.empty());

  const std::filesystem::path file =
      std::filesystem::temp_directory_path() / ("deft_metrics_" + std::to_string(getpid()));
  std::ofstream(file) << body;
  const std::string cmd = promtool + " check metrics < " + file.string() + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  char buf[512];
  while (size_t n = fread(buf, 1, sizeof(buf), pipe)) out.append(buf, n);
  const int rc = pclose(pipe);
  std::filesystem::remove(file);
  ASSERT_TRUE(WIFEXITED(rc)) << out;
  EXPECT_EQ(WEXITSTATUS(rc), 0) << "promtool check metrics:\n" << out << "\non:\n" << body;
  EXPECT_EQ(out, "") << "promtool reported lint problems:\n" << out;
}

TEST(MetricsHttpServerTest, OtherPathsAre404AndStopEndsServing) {
  ServerMetrics metrics;
  MetricsHttpServer server(&metrics);
  absl::StatusOr<int> port = server.Start("127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status();
  {
    httplib::Client client("127.0.0.1", *port);
    auto res = client.Get("/");
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 404);
  }
  server.Stop();
  server.Stop();  // idempotent
  httplib::Client client("127.0.0.1", *port);
  client.set_connection_timeout(1);
  EXPECT_FALSE(client.Get("/metrics"));
}

TEST(MetricsHttpServerTest, StartTwiceAndBusyPortFail) {
  ServerMetrics metrics;
  MetricsHttpServer server(&metrics);
  absl::StatusOr<int> port = server.Start("127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_EQ(server.Start("127.0.0.1", 0).status().code(), absl::StatusCode::kFailedPrecondition);

  MetricsHttpServer other(&metrics);
  absl::StatusOr<int> busy = other.Start("127.0.0.1", *port);
  EXPECT_EQ(busy.status().code(), absl::StatusCode::kUnavailable) << busy.status();
}

TEST(MetricsHttpServerTest, BeforeScrapeRunsOnEachScrape) {
  ServerMetrics metrics;
  int64_t trees = 0;
  MetricsHttpServer server(&metrics, [&] { metrics.UpdateFromEngine({.trees = ++trees}); });
  absl::StatusOr<int> port = server.Start("127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_EQ(ParseSamples(Scrape(*port)).at("deft_trees"), 1);
  EXPECT_EQ(ParseSamples(Scrape(*port)).at("deft_trees"), 2);
}

}  // namespace
}  // namespace deft
