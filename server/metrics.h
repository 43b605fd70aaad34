// Server metrics: a prometheus-cpp Registry with every deft_* metric, plain thread-safe methods to
// record them, a sampler that copies engine statistics into them, and a small HTTP server that
// serves GET /metrics in the Prometheus text format 0.0.4.
//
// /metrics is served by cpp-httplib + prometheus::TextSerializer, never by prometheus-cpp-pull's
// Exposer: civetweb cannot start its threads in a process that links cuBLASLt.
//
// Thread safety: every ServerMetrics method may be called from any thread concurrently
// (prometheus-cpp metrics are atomic or locked; label lookups go through the Family's mutex).
// MetricsHttpServer: Start and Stop from one owning thread; scrapes are served on its own thread.
#pragma once

#include <grpcpp/support/status_code_enum.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace httplib {
class Server;
}

namespace deft {

class TreeEngine;

// The Content-Type of a /metrics response.
inline constexpr char kPrometheusTextContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// "OK", "CANCELLED", ... "UNAUTHENTICATED" (the names of grpc/status.h); "UNKNOWN_CODE_<n>" for
// a value outside the enum.
std::string StatusCodeName(grpc::StatusCode code);

// Values the sampler reads from the engine. Totals are monotonic since engine start.
struct EngineSample {
  int64_t trees = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_free = 0;
  std::optional<int64_t> kv_blocks_shared =
      std::nullopt;            // unset: not reachable, gauge left as it is
  int64_t kv_bytes_read = 0;   // StepStats::kv_bytes_read
  int64_t kv_bytes_floor = 0;  // StepStats::kv_bytes_floor
};

// Reads an EngineSample from a live engine (locks it briefly).
EngineSample SampleEngine(const TreeEngine& engine);

class ServerMetrics {
 public:
  // Label value used by RecordVerifyAccepted for depths >= 9.
  static constexpr int kMaxDepthLabel = 8;

  ServerMetrics();
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  prometheus::Registry& registry() { return *registry_; }
  // The whole registry in text format 0.0.4.
  std::string Serialize() const;

  // Latencies, in seconds.
  void RecordTimeToFirstToken(double seconds);
  void RecordTimePerOutputToken(double seconds);
  void RecordQueueWait(double seconds);
  // method: the RPC's short name ("Generate"); phase: "prefill", "decode", "verify", ...
  void RecordRequestDuration(const std::string& method, double seconds);
  void RecordStepDuration(const std::string& phase, double seconds);

  // One finished RPC: code is the grpc::StatusCode name, e.g. "OK", "RESOURCE_EXHAUSTED".
  void RecordRequest(const std::string& method, const std::string& code);
  void RecordRequest(const std::string& method, grpc::StatusCode code) {
    RecordRequest(method, StatusCodeName(code));
  }
  void AddGeneratedTokens(int64_t n);
  // One speculative verification that accepted `accepted` draft tokens at tree depth `depth`
  // (1-based; depths > 8 go to label "9+"). Adds `accepted` to that depth's counter.
  // REQUIRES: accepted >= 0. depth < 1 is counted as "1".
  void RecordVerifyAccepted(int depth, int64_t accepted);

  // Branches currently generating, maintained by the server: +n when a Generate starts n
  // branches, -1 when each finishes (any reason).
  void AddActiveBranches(int64_t delta);

  // Copies an engine sample into the gauges, and adds the growth of the engine's monotonic
  // totals since the previous call to the counters (a total that went down, e.g. after an engine
  // restart, is taken as a fresh start: its new value is added). Meant to be called periodically
  // by the server (e.g. every second from one thread, and once right before serving a scrape);
  // concurrent calls are serialized.
  void UpdateFromEngine(const EngineSample& sample);

 private:
  std::shared_ptr<prometheus::Registry> registry_;

  prometheus::Histogram* ttft_;
  prometheus::Histogram* tpot_;
  prometheus::Histogram* queue_wait_;
  prometheus::Family<prometheus::Histogram>* request_duration_;
  prometheus::Family<prometheus::Histogram>* step_duration_;

  prometheus::Gauge* trees_;
  prometheus::Gauge* branches_active_;
  prometheus::Gauge* kv_blocks_used_;
  prometheus::Gauge* kv_blocks_total_;
  prometheus::Gauge* kv_blocks_shared_;

  prometheus::Counter* generated_tokens_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Counter* verify_accepted_[kMaxDepthLabel + 1];  // [0] is depth 1, [8] is "9+"
  prometheus::Counter* kv_bytes_read_;
  prometheus::Counter* kv_bytes_floor_;

  std::mutex sample_mu_;
  int64_t last_kv_bytes_read_ = 0;   // GUARDED_BY(sample_mu_)
  int64_t last_kv_bytes_floor_ = 0;  // GUARDED_BY(sample_mu_)
};

// GET /metrics over HTTP on its own thread. Other paths: 404.
class MetricsHttpServer {
 public:
  // `metrics` must outlive the server. `before_scrape`, if set, runs on the HTTP thread before
  // each scrape is serialized (e.g. to sample the engine so gauges are fresh).
  explicit MetricsHttpServer(ServerMetrics* metrics, std::function<void()> before_scrape = {});
  ~MetricsHttpServer();  // Stop()s
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Binds host:port (port 0: any free port) and starts serving. Returns the bound port.
  // UNAVAILABLE when the address cannot be bound; FAILED_PRECONDITION when already started.
  absl::StatusOr<int> Start(const std::string& host, int port);
  // Stops serving and joins the thread. Idempotent; no-op when not started.
  void Stop();

 private:
  ServerMetrics* metrics_;
  std::function<void()> before_scrape_;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
};

}  // namespace deft
