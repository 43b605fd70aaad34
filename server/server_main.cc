// deft-server: serves deft.v1.TreeService and deft.v1.ModelService over gRPC (plus
// grpc.health.v1 and server reflection). Listens at once with health NOT_SERVING, loads the model
// on a thread, then turns SERVING. SIGTERM/SIGINT: refuse new calls (UNAVAILABLE), let open
// streams drain for --shutdown_grace_seconds, then exit (DeftServer::Shutdown).
#include <grpcpp/security/server_credentials.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "engine/attention/partition_plan.h"
#include "server/deft_server.h"

#ifdef DEFT_GPU_BACKEND
#include "engine/gpu/attach_backend.h"
#endif

namespace {

std::string DefaultModelPath() {
  if (const char* env = std::getenv("DEFT_MODEL"); env != nullptr && *env != '\0') return env;
  const char* home = std::getenv("HOME");
  return std::string(home != nullptr ? home : ".") +
         "/.cache/deft/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace

ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "Address to listen on (host:port)");
ABSL_FLAG(std::string, model, DefaultModelPath(),
          "GGUF file or Hugging Face model directory (default: $DEFT_MODEL or the cached "
          "SmolLM2-135M-Instruct)");
ABSL_FLAG(bool, exact, false,
          "Dequantize the weights to fp32 at load; on the GPU, batch-invariant steps (a branch "
          "decodes the same alone or beside others, at a cost in speed)");
ABSL_FLAG(bool, cpu, false,
          "Run the model on the CPU even when a CUDA device is present (builds without CUDA always "
          "do)");
ABSL_FLAG(double, gpu_kv_fraction, 0.85,
          "GPU backend: fraction of the free device memory (after the weights) the KV pool takes");
ABSL_FLAG(int32_t, threads, 0, "Threads the model computes on (0: one per core)");
ABSL_FLAG(std::string, attention_mode, "flatten", "Attention mode: seq, tree, node or flatten");
ABSL_FLAG(int64_t, kv_pool_mb, 512, "KV pool size in MiB");
ABSL_FLAG(int32_t, step_token_budget, 512, "Tokens fed per scheduler step");
ABSL_FLAG(int32_t, max_branches, 64, "Most branches per Generate call");
ABSL_FLAG(int32_t, max_tokens_limit, 4096, "Upper bound of SamplingParams.max_tokens");
ABSL_FLAG(int64_t, tree_ttl_seconds, 3600, "Trees untouched this long are deleted (0: never)");
ABSL_FLAG(int32_t, metrics_port, 0, "Port of the Prometheus /metrics endpoint (0: off)");
ABSL_FLAG(std::string, metrics_host, "0.0.0.0", "Address the /metrics endpoint binds");
ABSL_FLAG(std::string, api_keys, "",
          "API key file (format in server/auth.h); calls must then carry 'authorization: Bearer "
          "<secret>'. Empty: no authentication, every tree owned by \"\"");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain (with --tls_key: serve TLS)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key (with --tls_cert)");
ABSL_FLAG(int64_t, shutdown_grace_seconds, 30,
          "On SIGTERM/SIGINT, how long open streams may run before they are cancelled");

namespace {

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "deft-server: %s\n", message.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("deft-server: gRPC server for tree-structured LLM decoding");
  absl::ParseCommandLine(argc, argv);

  deft::server::ServerOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  if (!deft::ParseAttentionMode(absl::GetFlag(FLAGS_attention_mode), &options.engine.mode)) {
    return Fail("--attention_mode must be seq, tree, node or flatten, got \"" +
                absl::GetFlag(FLAGS_attention_mode) + "\"");
  }
  options.attention_mode = absl::GetFlag(FLAGS_attention_mode);
  if (absl::GetFlag(FLAGS_kv_pool_mb) < 1) return Fail("--kv_pool_mb must be >= 1");
  options.engine.kv_pool_bytes = absl::GetFlag(FLAGS_kv_pool_mb) << 20;
  if (absl::GetFlag(FLAGS_step_token_budget) < 1) return Fail("--step_token_budget must be >= 1");
  options.engine.step_token_budget = absl::GetFlag(FLAGS_step_token_budget);
  if (absl::GetFlag(FLAGS_max_branches) < 1) return Fail("--max_branches must be >= 1");
  options.max_branches = absl::GetFlag(FLAGS_max_branches);
  options.engine.max_branches_per_generate = options.max_branches;
  if (absl::GetFlag(FLAGS_max_tokens_limit) < 1) return Fail("--max_tokens_limit must be >= 1");
  options.max_tokens_limit = absl::GetFlag(FLAGS_max_tokens_limit);
  if (absl::GetFlag(FLAGS_tree_ttl_seconds) < 0) return Fail("--tree_ttl_seconds must be >= 0");
  options.tree_ttl = std::chrono::seconds(absl::GetFlag(FLAGS_tree_ttl_seconds));
  const int32_t metrics_port = absl::GetFlag(FLAGS_metrics_port);
  if (metrics_port < 0 || metrics_port > 65535) return Fail("--metrics_port must be in [0, 65535]");
  deft::ServerMetrics metrics;
  if (metrics_port > 0) options.metrics = &metrics;
  if (absl::GetFlag(FLAGS_shutdown_grace_seconds) < 0) {
    return Fail("--shutdown_grace_seconds must be >= 0");
  }
  const std::string cert_path = absl::GetFlag(FLAGS_tls_cert);
  const std::string key_path = absl::GetFlag(FLAGS_tls_key);
  if (cert_path.empty() != key_path.empty()) {
    return Fail("--tls_cert and --tls_key must be given together");
  }
  if (!cert_path.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
    if (!ReadFile(cert_path, &pair.cert_chain)) return Fail("cannot read --tls_cert " + cert_path);
    if (!ReadFile(key_path, &pair.private_key)) return Fail("cannot read --tls_key " + key_path);
    ssl.pem_key_cert_pairs.push_back(std::move(pair));
    options.credentials = grpc::SslServerCredentials(ssl);
  }
  if (const std::string keys_path = absl::GetFlag(FLAGS_api_keys); !keys_path.empty()) {
    auto keys = deft::ApiKeys::LoadFile(keys_path);
    if (!keys.ok()) return Fail("--api_keys: " + std::string(keys.status().message()));
    options.api_keys = std::make_shared<const deft::ApiKeys>(std::move(*keys));
  }
  // The CPU here; the GPU backend is attached below by the flags (not by DEFT_BACKEND).
  options.load_model = deft::server::ModelFromPath(
      absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_exact), absl::GetFlag(FLAGS_threads),
      deft::server::ComputeBackend::kCpu);
  const double kv_fraction = absl::GetFlag(FLAGS_gpu_kv_fraction);
  if (!(kv_fraction > 0 && kv_fraction <= 1)) return Fail("--gpu_kv_fraction must be in (0, 1]");
#ifdef DEFT_GPU_BACKEND
  // The GPU backend when a device is present (weights dequantized onto it at load; the KV pool in
  // device memory), unless --cpu.
  options.load_model = [load = std::move(options.load_model), cpu = absl::GetFlag(FLAGS_cpu),
                        kv_fraction, exact = absl::GetFlag(FLAGS_exact)]() -> absl::StatusOr<std::unique_ptr<deft::LlamaModel>> {
    auto model = load();
    if (!model.ok()) return model.status();
    deft::gpu::GpuBackendOptions gpu_options;
    gpu_options.kv_memory_fraction = kv_fraction;
    gpu_options.batch_invariant = exact;
    auto backend = deft::gpu::AttachStepBackend(**model, cpu, gpu_options);
    if (!backend.ok()) return backend.status();
    std::fprintf(stderr, "deft-server: the model runs on the %s\n", backend->c_str());
    return model;
  };
#endif

  // Block the shutdown signals in every thread (gRPC's included); one thread waits for them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto server = deft::server::DeftServer::Start(std::move(options));
  if (!server.ok()) return Fail(std::string(server.status().message()));
  std::fprintf(stderr, "deft-server: listening on port %d; loading %s\n", (*server)->port(),
               absl::GetFlag(FLAGS_model).c_str());
  deft::server::DeftServer* srv = server->get();
  // Each scrape first copies the engine's gauges and totals (once the model has loaded).
  deft::MetricsHttpServer metrics_http(&metrics, [&metrics, srv] {
    if (auto engine = srv->engine()) metrics.UpdateFromEngine(deft::SampleEngine(*engine));
  });
  if (metrics_port > 0) {
    auto bound = metrics_http.Start(absl::GetFlag(FLAGS_metrics_host), metrics_port);
    if (!bound.ok()) {
      (*server)->Shutdown(std::chrono::milliseconds(0));
      return Fail("--metrics_port: " + std::string(bound.status().message()));
    }
    std::fprintf(stderr, "deft-server: metrics on port %d\n", *bound);
  }

  const std::chrono::seconds grace(absl::GetFlag(FLAGS_shutdown_grace_seconds));
  std::thread signal_waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    std::fprintf(stderr, "deft-server: signal %d; draining for up to %llds\n", sig,
                 static_cast<long long>(grace.count()));
    (*server)->Shutdown(grace);
  });

  absl::Status loaded = (*server)->WaitUntilLoaded();
  if (!loaded.ok()) {
    std::fprintf(stderr, "deft-server: cannot load the model: %s\n",
                 std::string(loaded.message()).c_str());
    // Wake the signal waiter so it shuts the server down.
    kill(getpid(), SIGTERM);
    signal_waiter.join();
    return 1;
  }
  std::fprintf(stderr, "deft-server: serving\n");
  (*server)->Wait();
  signal_waiter.join();
  metrics_http.Stop();
  std::fprintf(stderr, "deft-server: stopped\n");
  return 0;
}
