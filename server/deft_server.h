// DeftServer: the whole gRPC server as one object, used by deft-server's main() and, in-process,
// by the end-to-end tests. Start() listens at once (health NOT_SERVING) and loads the model on a
// thread; once the engine is up, health turns SERVING and the services answer (UNAVAILABLE
// before). Services: deft.v1.TreeService, deft.v1.ModelService, grpc.health.v1.Health and server
// reflection.
//
// Shutdown(grace): health turns NOT_SERVING and new calls are refused (UNAVAILABLE "server is
// shutting down"); the calls already open (Generate streams) run on for up to `grace`; once they
// have all ended the connections stay up a little longer (kLinger, server/deft_server.cc) so that
// their final statuses reach the clients; then the gRPC server stops, cancelling the calls still
// open (their engine generations are cancelled).
//
// Thread safety: Shutdown and Wait may be called from any thread; the accessors too.
#pragma once

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "engine/scheduler/tree_engine.h"
#include "server/auth.h"
#include "server/open_calls.h"
#include "server/serving_state.h"

namespace deft::server {

struct ServerOptions {
  std::string listen = "0.0.0.0:50051";  // "127.0.0.1:0" picks a free port (see port())
  std::shared_ptr<grpc::ServerCredentials> credentials;  // null: insecure
  // Loads the model; runs on the loader thread after the server listens.
  std::function<absl::StatusOr<std::unique_ptr<LlamaModel>>()> load_model;
  EngineOptions engine;
  std::string attention_mode = "flatten";  // reported by GetModelInfo; engine.mode must match
  int32_t max_branches = 64;
  int32_t max_tokens_limit = 4096;
  std::chrono::seconds tree_ttl{3600};  // 0: trees never expire
  AuthorizeFn authorize;                // null: every call is admitted, owner ""
  // When set (and `authorize` is not), calls are admitted by API key: see ApiKeyAuthorizer.
  std::shared_ptr<const ApiKeys> api_keys;
  ServerMetrics* metrics = nullptr;  // not owned; must outlive the server. null: none
  TokenObserver token_observer;      // bench/test hook (serving_state.h). null: none
};

// Where a loaded model computes: the CPU reference, or the GPU backend (engine/gpu) when the
// build has CUDA and a device is present (the CPU otherwise).
enum class ComputeBackend { kCpu, kGpuIfPresent };
// The environment's choice for in-process servers (the end-to-end tests): DEFT_BACKEND=gpu gives
// kGpuIfPresent; unset or "cpu" gives kCpu. deft-server itself decides by its flags (--cpu).
ComputeBackend BackendFromEnvironment();

// A loader for ServerOptions::load_model: the GGUF file or Hugging Face directory at `path`;
// the model computes on `num_threads` threads (0: one per core), on `backend`. `exact`: weights
// dequantized to fp32 at load, and on the GPU batch-invariant steps (GpuBackendOptions).
std::function<absl::StatusOr<std::unique_ptr<LlamaModel>>()> ModelFromPath(
    std::string path, bool exact, int num_threads = 0,
    ComputeBackend backend = BackendFromEnvironment());

// Admits calls by API key (server/auth.h): the "authorization: Bearer <secret>" metadata names
// the key, whose id owns the caller's trees; a read-only key may call only GetTree, ListTrees and
// the ModelService RPCs (PERMISSION_DENIED otherwise); CreateTree honours the key's trees quota,
// counting with `trees_owned(key id)`. The nodes and kv_blocks quotas are enforced by the
// handlers (server/quota.h) when ServerOptions::api_keys is set.
AuthorizeFn ApiKeyAuthorizer(std::shared_ptr<const ApiKeys> keys,
                             std::function<int64_t(const std::string& owner)> trees_owned);

class DeftServer {
 public:
  // Listening when it returns; the model is loading.
  static absl::StatusOr<std::unique_ptr<DeftServer>> Start(ServerOptions options);
  ~DeftServer();  // Shutdown with no grace (open calls cancelled at once) if still running

  // The port it listens on.
  int port() const { return port_; }
  // Blocks until the model has loaded (OK) or failed to load (its error).
  absl::Status WaitUntilLoaded();
  void Shutdown(std::chrono::milliseconds grace);
  // Blocks until Shutdown has completed.
  void Wait();

  // Test hooks: the engine (null before the model has loaded or after shutdown), the state.
  std::shared_ptr<TreeEngine> engine();
  ServingState& state() { return *state_; }

 private:
  DeftServer() = default;
  void LoadModel();

  ServerOptions options_;
  std::shared_ptr<ServingState> state_;
  std::unique_ptr<grpc::Service> tree_service_;
  std::unique_ptr<grpc::Service> model_service_;
  std::shared_ptr<OpenCalls> open_calls_ = std::make_shared<OpenCalls>();
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::thread loader_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<absl::Status> load_status_;
  bool shutdown_started_ = false;
  bool shutdown_done_ = false;
};

}  // namespace deft::server
