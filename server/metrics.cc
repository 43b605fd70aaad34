// Server metrics and the /metrics HTTP endpoint; see metrics.h.
#include "server/metrics.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <iterator>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/scheduler/tree_engine.h"
#include "prometheus/text_serializer.h"

namespace deft {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

// Bucket upper bounds, in seconds. First token includes prefill of a long prompt under load
// (1ms..60s); a decode token or step is usually 1-100ms but a CPU step of a wide tree can take
// seconds (100us..10s); a whole request may run for a minute (1ms..60s); queueing is either
// immediate (100us) or waits for KV blocks (up to 60s).
const Histogram::BucketBoundaries kTtftBuckets = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
const Histogram::BucketBoundaries kTokenBuckets = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10};
const Histogram::BucketBoundaries kRequestBuckets = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                     0.5,   1,     2.5,  5,     10,   30,  60};
const Histogram::BucketBoundaries kQueueBuckets = {0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1,
                                                   0.5,    1,      5,     10,    30,   60};

// Growth of a monotonic total since `*last`; a total that went down restarted from 0.
int64_t Delta(int64_t now, int64_t* last) {
  const int64_t d = now >= *last ? now - *last : now;
  *last = now;
  return d;
}

}  // namespace

std::string StatusCodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  if (i >= 0 && i < static_cast<int>(std::size(kNames))) return kNames[i];
  return absl::StrCat("UNKNOWN_CODE_", i);
}

EngineSample SampleEngine(const TreeEngine& engine) {
  EngineSample s;
  engine.WithTrees(
      [&](const TreeKvCache& cache) { s.trees = static_cast<int64_t>(cache.ListTrees().size()); });
  s.kv_blocks_total = engine.total_blocks();
  s.kv_blocks_free = engine.free_blocks();
  s.kv_blocks_shared = engine.shared_blocks();
  const StepStats stats = engine.stats();
  s.kv_bytes_read = stats.kv_bytes_read;
  s.kv_bytes_floor = stats.kv_bytes_floor;
  return s;
}

ServerMetrics::ServerMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  prometheus::Registry& r = *registry_;
  ttft_ = &BuildHistogram()
               .Name("deft_time_to_first_token_seconds")
               .Help("Time from a Generate request to its first streamed token, per branch.")
               .Register(r)
               .Add({}, kTtftBuckets);
  tpot_ = &BuildHistogram()
               .Name("deft_time_per_output_token_seconds")
               .Help("Time between consecutive output tokens of a branch.")
               .Register(r)
               .Add({}, kTokenBuckets);
  queue_wait_ = &BuildHistogram()
                     .Name("deft_queue_wait_seconds")
                     .Help("Time a request waited before the engine admitted it.")
                     .Register(r)
                     .Add({}, kQueueBuckets);
  request_duration_ = &BuildHistogram()
                           .Name("deft_request_duration_seconds")
                           .Help("Duration of an RPC, by method.")
                           .Register(r);
  step_duration_ = &BuildHistogram()
                        .Name("deft_step_duration_seconds")
                        .Help("Duration of one engine step, by phase.")
                        .Register(r);

  trees_ = &BuildGauge().Name("deft_trees").Help("Live decoding trees.").Register(r).Add({});
  branches_active_ = &BuildGauge()
                          .Name("deft_branches_active")
                          .Help("Branches currently generating.")
                          .Register(r)
                          .Add({});
  kv_blocks_used_ =
      &BuildGauge().Name("deft_kv_blocks_used").Help("KV pool blocks in use.").Register(r).Add({});
  kv_blocks_total_ = &BuildGauge()
                          .Name("deft_kv_blocks_capacity")
                          .Help("KV pool blocks in all (named _capacity: _total is for counters).")
                          .Register(r)
                          .Add({});
  kv_blocks_shared_ = &BuildGauge()
                           .Name("deft_kv_blocks_shared")
                           .Help("KV pool blocks referenced more than once (shared prefixes).")
                           .Register(r)
                           .Add({});

  generated_tokens_ = &BuildCounter()
                           .Name("deft_generated_tokens_total")
                           .Help("Tokens generated (streamed to clients).")
                           .Register(r)
                           .Add({});
  requests_ = &BuildCounter()
                   .Name("deft_requests_total")
                   .Help("Finished RPCs, by method and gRPC status code.")
                   .Register(r);
  auto& accepted = BuildCounter()
                       .Name("deft_verify_accepted_tokens_total")
                       .Help("Draft tokens accepted by speculative verification, by tree depth.")
                       .Register(r);
  for (int i = 0; i <= kMaxDepthLabel; ++i) {
    const std::string depth =
        i < kMaxDepthLabel ? std::to_string(i + 1) : absl::StrCat(kMaxDepthLabel + 1, "+");
    verify_accepted_[i] = &accepted.Add({{"depth", depth}});
  }
  kv_bytes_read_ = &BuildCounter()
                        .Name("deft_kv_bytes_read_total")
                        .Help("KV cache bytes read by attention.")
                        .Register(r)
                        .Add({});
  kv_bytes_floor_ = &BuildCounter()
                         .Name("deft_kv_bytes_floor_total")
                         .Help(
                             "KV bytes attention must read at least (each unique KV once); "
                             "read/floor is the IO DeFT saves or wastes.")
                         .Register(r)
                         .Add({});
}

std::string ServerMetrics::Serialize() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

void ServerMetrics::RecordTimeToFirstToken(double seconds) { ttft_->Observe(seconds); }
void ServerMetrics::RecordTimePerOutputToken(double seconds) { tpot_->Observe(seconds); }
void ServerMetrics::RecordQueueWait(double seconds) { queue_wait_->Observe(seconds); }

void ServerMetrics::RecordRequestDuration(const std::string& method, double seconds) {
  request_duration_->Add({{"method", method}}, kRequestBuckets).Observe(seconds);
}

void ServerMetrics::RecordStepDuration(const std::string& phase, double seconds) {
  step_duration_->Add({{"phase", phase}}, kTokenBuckets).Observe(seconds);
}

void ServerMetrics::RecordRequest(const std::string& method, const std::string& code) {
  requests_->Add({{"method", method}, {"code", code}}).Increment();
}

void ServerMetrics::AddGeneratedTokens(int64_t n) {
  generated_tokens_->Increment(static_cast<double>(n));
}

void ServerMetrics::RecordVerifyAccepted(int depth, int64_t accepted) {
  const int i = std::clamp(depth, 1, kMaxDepthLabel + 1) - 1;
  verify_accepted_[i]->Increment(static_cast<double>(accepted));
}

void ServerMetrics::AddActiveBranches(int64_t delta) {
  branches_active_->Increment(static_cast<double>(delta));
}

void ServerMetrics::UpdateFromEngine(const EngineSample& sample) {
  std::lock_guard<std::mutex> lock(sample_mu_);
  trees_->Set(static_cast<double>(sample.trees));
  kv_blocks_total_->Set(static_cast<double>(sample.kv_blocks_total));
  kv_blocks_used_->Set(static_cast<double>(sample.kv_blocks_total - sample.kv_blocks_free));
  if (sample.kv_blocks_shared)
    kv_blocks_shared_->Set(static_cast<double>(*sample.kv_blocks_shared));
  kv_bytes_read_->Increment(static_cast<double>(Delta(sample.kv_bytes_read, &last_kv_bytes_read_)));
  kv_bytes_floor_->Increment(
      static_cast<double>(Delta(sample.kv_bytes_floor, &last_kv_bytes_floor_)));
}

MetricsHttpServer::MetricsHttpServer(ServerMetrics* metrics, std::function<void()> before_scrape)
    : metrics_(metrics), before_scrape_(std::move(before_scrape)) {}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

absl::StatusOr<int> MetricsHttpServer::Start(const std::string& host, int port) {
  if (http_ != nullptr) return absl::FailedPreconditionError("metrics server already started");
  auto http = std::make_unique<httplib::Server>();
  // SO_REUSEADDR only: httplib's default adds SO_REUSEPORT, which lets a second server bind the
  // same port and silently take half of the scrapes instead of failing to start.
  http->set_socket_options([](int sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  http->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    if (before_scrape_) before_scrape_();
    res.set_content(metrics_->Serialize(), kPrometheusTextContentType);
  });
  int bound = port;
  if (port == 0) {
    bound = http->bind_to_any_port(host);
    if (bound < 0) return absl::UnavailableError(absl::StrCat("metrics: cannot bind ", host, ":0"));
  } else if (!http->bind_to_port(host, port)) {
    return absl::UnavailableError(absl::StrCat("metrics: cannot bind ", host, ":", port));
  }
  http_ = std::move(http);
  auto listen_returned = std::make_shared<std::atomic<bool>>(false);
  thread_ = std::thread([server = http_.get(), listen_returned] {
    server->listen_after_bind();
    listen_returned->store(true);
  });
  // httplib's stop() is a no-op until the listen loop runs; wait for it so that Stop() right
  // after Start() cannot leave the thread listening forever.
  while (!http_->is_running() && !listen_returned->load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (listen_returned->load()) {
    thread_.join();
    http_.reset();
    return absl::UnavailableError(absl::StrCat("metrics: listen failed on ", host, ":", bound));
  }
  return bound;
}

void MetricsHttpServer::Stop() {
  if (http_ == nullptr) return;
  http_->stop();
  if (thread_.joinable()) thread_.join();
  http_.reset();
}

}  // namespace deft
