// ServingState: what the gRPC services share: the engine (absent until the model has loaded), the
// request limits, the tree registry, the nodes now generating, how a call's owner is found, the
// API keys whose nodes/kv_blocks quotas the handlers enforce (server/quota.h), and whether the
// server is shutting down (every new call refused).
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <grpcpp/server_context.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/scheduler/tree_engine.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/quota.h"
#include "server/tree_registry.h"
#include "server/validation.h"

namespace deft::server {

// Admits a call to `method` (the RPC's short name, e.g. "Fork"): OK with *owner set to the owner
// of the caller's trees (the API key id; "" when auth is off), or the status to answer instead
// (UNAUTHENTICATED, PERMISSION_DENIED, ...). Runs on gRPC's threads, concurrently.
using AuthorizeFn = std::function<grpc::Status(const grpc::CallbackServerContext& context,
                                               const std::string& method, std::string* owner)>;

// Bench/test hook: called on the engine's scheduler thread when a Generate stream receives a
// token from the engine, before the server builds, queues and writes its event (so a client's
// receive time minus this call's time is the server's per-token overhead; bench/server_load).
using TokenObserver = std::function<void(TreeId tree, NodeId node)>;

class ServingState {
 public:
  struct Ready {
    std::shared_ptr<TreeEngine> engine;
    RequestLimits limits;  // vocab_size and context_length filled in
  };
  struct Call : Ready {
    std::string owner;
    // The owner's API key when keys are installed (SetApiKeys) and it names one; else null.
    const ApiKey* key = nullptr;
    // Whether the handlers must count this call against a nodes or kv_blocks quota.
    bool has_usage_quota() const {
      return key != nullptr && (key->max_nodes.has_value() || key->max_kv_blocks.has_value());
    }
  };

  // `metrics` may be null (no metrics); it must outlive the services.
  ServingState(std::string attention_mode, RequestLimits limits, AuthorizeFn authorize,
               ServerMetrics* metrics = nullptr)
      : attention_mode_(std::move(attention_mode)),
        limits_(limits),
        authorize_(std::move(authorize)),
        metrics_(metrics) {}

  // Installs the engine once the model has loaded.
  void SetEngine(std::shared_ptr<TreeEngine> engine) {
    std::lock_guard<std::mutex> lock(mu_);
    limits_.vocab_size = engine->model().config().vocab_size;
    limits_.context_length = engine->model().config().context_length;
    engine_ = std::move(engine);
  }
  // The API keys whose quotas apply to the owners the authorizer names (set before serving).
  void SetApiKeys(std::shared_ptr<const ApiKeys> keys) {
    std::lock_guard<std::mutex> lock(mu_);
    api_keys_ = std::move(keys);
  }
  // Takes the engine out (shutdown); later calls answer UNAVAILABLE.
  std::shared_ptr<TreeEngine> TakeEngine() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(engine_, nullptr);
  }
  // The engine and limits, or UNAVAILABLE while the model is loading.
  absl::StatusOr<Ready> GetReady() const {
    std::lock_guard<std::mutex> lock(mu_);
    if (engine_ == nullptr) return absl::UnavailableError("the model is not loaded yet");
    return Ready{engine_, limits_};
  }

  // Shutdown has begun (DeftServer::Shutdown): Begin refuses every call from now on.
  void StartDraining() {
    std::lock_guard<std::mutex> lock(mu_);
    draining_ = true;
  }

  // Admits a call: UNAVAILABLE once draining, else as the authorizer says (see AuthorizeFn;
  // without one every call is admitted with owner ""), then the engine as GetReady.
  absl::StatusOr<Call> Begin(const grpc::CallbackServerContext& context,
                             const std::string& method) const {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (draining_) return absl::UnavailableError("server is shutting down");
    }
    Call call;
    if (authorize_) {
      grpc::Status s = authorize_(context, method, &call.owner);
      if (!s.ok()) {
        return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
      }
    }
    auto ready = GetReady();
    if (!ready.ok()) return ready.status();
    static_cast<Ready&>(call) = std::move(*ready);
    std::lock_guard<std::mutex> lock(mu_);
    if (api_keys_ != nullptr) call.key = api_keys_->Find(call.owner);
    return call;
  }
  const std::string& attention_mode() const { return attention_mode_; }
  ServerMetrics* metrics() const { return metrics_; }
  // Set before serving (not synchronized with running streams).
  void SetTokenObserver(TokenObserver observer) { token_observer_ = std::move(observer); }
  const TokenObserver& token_observer() const { return token_observer_; }
  // Counts one finished RPC in deft_requests_total (no-op without metrics).
  void RecordRequest(const std::string& method, grpc::StatusCode code) const {
    if (metrics_ != nullptr) metrics_->RecordRequest(method, StatusCodeName(code));
  }
  TreeRegistry& registry() { return registry_; }
  QuotaLedger& quotas() { return quotas_; }

  // Nodes that are the tip of a running branch (for Node.generating). Counted, so that a
  // request the engine refuses can undo its marks without clearing another stream's.
  void SetGenerating(TreeId tree, NodeId node, bool generating) {
    std::lock_guard<std::mutex> lock(mu_);
    auto key = std::make_pair(tree, node);
    if (generating) {
      ++generating_[key];
    } else if (auto it = generating_.find(key); it != generating_.end() && --it->second <= 0) {
      generating_.erase(it);
    }
  }
  bool IsGenerating(TreeId tree, NodeId node) const {
    std::lock_guard<std::mutex> lock(mu_);
    return generating_.contains(std::make_pair(tree, node));
  }

 private:
  const std::string attention_mode_;
  mutable std::mutex mu_;
  RequestLimits limits_;
  std::shared_ptr<TreeEngine> engine_;
  bool draining_ = false;
  absl::flat_hash_map<std::pair<TreeId, NodeId>, int> generating_;
  AuthorizeFn authorize_;
  ServerMetrics* metrics_;
  TokenObserver token_observer_;
  std::shared_ptr<const ApiKeys> api_keys_;
  TreeRegistry registry_;
  QuotaLedger quotas_;
};

}  // namespace deft::server
