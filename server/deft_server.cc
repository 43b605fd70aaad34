#include "server/deft_server.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "engine/model/model_loader.h"
#ifdef DEFT_GPU_BACKEND
#include "engine/gpu/attach_backend.h"
#endif
#include "server/model_service.h"
#include "server/tree_service.h"

namespace deft::server {
namespace {

constexpr const char* kServices[] = {"", "deft.v1.TreeService", "deft.v1.ModelService"};

// How long Shutdown keeps the connections up after the last open call ended. grpc::Server's own
// Shutdown closes a connection as soon as its last call's status is handed to the transport, and
// the client can then fail the connection's calls before it has read what is already in its
// socket (presumably a write of its own, an HTTP/2 ping or window update, meeting the closed
// socket: EPIPE): UNAVAILABLE "Broken pipe" after every token but before the finish event and
// the OK. With grpc::Server's drain alone, StreamsEndingDuringTheDrainAllEndOk
// (tests/server/server_lifecycle_test.cc) failed so in 4 runs of 300 on 2 busy cores.
constexpr std::chrono::milliseconds kLinger{200};
// How far the linger may run past the grace's end (so that even Shutdown(0) lets the statuses of
// calls that ended just before it out).
constexpr std::chrono::milliseconds kLingerPastGrace{20};

void SetServing(grpc::Server& server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server.GetHealthCheckService();
  if (health == nullptr) return;
  for (const char* name : kServices) health->SetServingStatus(name, serving);
}

}  // namespace

ComputeBackend BackendFromEnvironment() {
  const char* env = std::getenv("DEFT_BACKEND");
  return env != nullptr && std::string_view(env) == "gpu" ? ComputeBackend::kGpuIfPresent
                                                          : ComputeBackend::kCpu;
}

std::function<absl::StatusOr<std::unique_ptr<LlamaModel>>()> ModelFromPath(
    std::string path, bool exact, int num_threads, ComputeBackend backend) {
  return [path, exact, num_threads, backend]() -> absl::StatusOr<std::unique_ptr<LlamaModel>> {
    LoadOptions options;
    options.dequantize_to_f32 = exact;
    auto loaded = deft::LoadModel(path, options);
    if (!loaded.ok()) return loaded.status();
    ModelOptions model_options;
    model_options.num_threads = num_threads;
    auto model = LlamaModel::Create(std::move(*loaded), model_options);
    if (!model.ok() || backend == ComputeBackend::kCpu) return model;
#ifdef DEFT_GPU_BACKEND
    // Exact serving on the GPU: batch-invariant steps (a branch decodes the same alone or
    // beside others, as on the CPU reference).
    gpu::GpuBackendOptions gpu_options;
    gpu_options.batch_invariant = exact;
    auto attached = gpu::AttachStepBackend(**model, /*force_cpu=*/false, gpu_options);
    if (!attached.ok()) return attached.status();
    std::fprintf(stderr, "deft: the model runs on the %s backend\n", attached->c_str());
#endif
    return model;
  };
}

AuthorizeFn ApiKeyAuthorizer(std::shared_ptr<const ApiKeys> keys,
                             std::function<int64_t(const std::string& owner)> trees_owned) {
  return [keys = std::move(keys), trees_owned = std::move(trees_owned)](
             const grpc::CallbackServerContext& context, const std::string& method,
             std::string* owner) {
    const ApiKey* key = nullptr;
    grpc::Status s = keys->Authenticate(context, &key);
    if (!s.ok()) return s;
    static const absl::flat_hash_set<std::string> kReadOnly = {
        "GetTree", "ListTrees", "GetModelInfo", "Tokenize", "Detokenize"};
    if (!kReadOnly.contains(method)) {
      s = ApiKeys::CheckMayMutate(*key, method);
      if (!s.ok()) return s;
    }
    if (method == "CreateTree") {
      s = ApiKeys::CheckTreeQuota(*key, trees_owned(key->id));
      if (!s.ok()) return s;
    }
    *owner = key->id;
    return grpc::Status::OK;
  };
}

absl::StatusOr<std::unique_ptr<DeftServer>> DeftServer::Start(ServerOptions options) {
  if (!options.load_model) return absl::InvalidArgumentError("no model loader");
  std::unique_ptr<DeftServer> s(new DeftServer());
  s->options_ = std::move(options);
  const ServerOptions& o = s->options_;
  RequestLimits limits;
  limits.max_branches = o.max_branches;
  limits.max_tokens_limit = o.max_tokens_limit;
  AuthorizeFn authorize = o.authorize;
  // The key authorizer counts trees in the state's registry; the state outlives every call.
  std::shared_ptr<ServingState*> state_slot = std::make_shared<ServingState*>(nullptr);
  if (!authorize && o.api_keys != nullptr) {
    authorize = ApiKeyAuthorizer(o.api_keys, [state_slot](const std::string& owner) {
      return static_cast<int64_t>((*state_slot)->registry().List(owner).size());
    });
  }
  s->state_ = std::make_shared<ServingState>(o.attention_mode, limits, authorize, o.metrics);
  *state_slot = s->state_.get();
  if (o.api_keys != nullptr) s->state_->SetApiKeys(o.api_keys);
  if (o.token_observer) s->state_->SetTokenObserver(o.token_observer);
  s->tree_service_ = std::make_unique<TreeServiceImpl>(s->state_);
  s->model_service_ = std::make_unique<ModelServiceImpl>(s->state_);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(
      o.listen, o.credentials ? o.credentials : grpc::InsecureServerCredentials(), &s->port_);
  builder.RegisterService(s->tree_service_.get());
  builder.RegisterService(s->model_service_.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(OpenCalls::CountInto(s->open_calls_));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", o.listen));
  }
  SetServing(*s->server_, false);
  s->loader_ = std::thread([p = s.get()] { p->LoadModel(); });
  return s;
}

void DeftServer::LoadModel() {
  absl::Status status;
  auto model = options_.load_model();
  if (!model.ok()) {
    status = model.status();
  } else {
    auto engine = TreeEngine::Create(std::move(*model), options_.engine);
    if (!engine.ok()) {
      status = engine.status();
    } else {
      std::shared_ptr<TreeEngine> shared = std::move(*engine);
      state_->SetEngine(shared);
      std::weak_ptr<TreeEngine> weak = shared;
      state_->registry().StartSweeper(
          options_.tree_ttl,
          std::chrono::milliseconds(std::clamp<int64_t>(
              std::chrono::duration_cast<std::chrono::milliseconds>(options_.tree_ttl).count() / 4,
              10, 10000)),
          [weak](TreeId tree) {
            if (auto e = weak.lock()) e->DeleteTree(tree).IgnoreError();
          });
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (status.ok() && !shutdown_started_) SetServing(*server_, true);
  load_status_ = status;
  cv_.notify_all();
}

absl::Status DeftServer::WaitUntilLoaded() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return load_status_.has_value(); });
  return *load_status_;
}

std::shared_ptr<TreeEngine> DeftServer::engine() {
  auto ready = state_->GetReady();
  return ready.ok() ? ready->engine : nullptr;
}

void DeftServer::Shutdown(std::chrono::milliseconds grace) {
  const auto deadline = std::chrono::steady_clock::now() + grace;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shutdown_started_) return;
    shutdown_started_ = true;
  }
  // Health first, so load balancers stop sending; the services refuse new calls from now on.
  server_->GetHealthCheckService()->Shutdown();
  state_->StartDraining();
  // The open calls run on until they end or the grace does; then, if one ended lately, the
  // connections stay up a little longer (kLinger) so that its status reaches the client.
  open_calls_->Drain(deadline);
  std::this_thread::sleep_until(
      std::min(open_calls_->last_ended() + kLinger,
               std::max(deadline, std::chrono::steady_clock::now() + kLingerPastGrace)));
  // Calls still open are cancelled; their reactors cancel their generations.
  const auto left = std::max(deadline - std::chrono::steady_clock::now(),
                             std::chrono::steady_clock::duration::zero());
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::chrono::duration_cast<std::chrono::system_clock::duration>(left));
  if (loader_.joinable()) loader_.join();
  // The engine's destructor stops the scheduler; the registry's sweeper stops with the state.
  state_->TakeEngine();
  std::lock_guard<std::mutex> lock(mu_);
  shutdown_done_ = true;
  cv_.notify_all();
}

void DeftServer::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return shutdown_done_; });
}

DeftServer::~DeftServer() { Shutdown(std::chrono::milliseconds(0)); }

}  // namespace deft::server
