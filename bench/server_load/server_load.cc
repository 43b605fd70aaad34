// bench/server_load: the gRPC server's per-token overhead over the engine, at N concurrent
// Generate streams on loopback, with the real model.
//
//   server_load [--model PATH] [--streams 1,64,1000] [--tokens 16] [--trees 16] [--channels 4]
//               [--engine_threads N]
//
// Setup: a DeftServer in this process (CPU engine on --engine_threads threads, default one per
// core but one, so that the gRPC threads have a core while the engine computes its next step;
// int8 path, flatten attention) on 127.0.0.1:<free port>; `--trees` trees with their prompts
// computed; per stream a fresh child forked off its tree's root (streams spread round robin over
// the trees). The clients run in a child process (this binary with --client), so that client
// and server share no gRPC threads or locks: it connects `--channels` channels, then starts all N
// streams at once, one blocking reader thread each, each one Generate of `--tokens` greedy
// tokens (EOS ignored) on its child, and reports every token's receive time.
//
// What is measured, per streamed token (both clocks are CLOCK_MONOTONIC, shared by processes):
//  - emit: steady_clock when the server's Generate stream receives the token from the engine
//    (ServerOptions::token_observer, called first thing in the engine's on_token callback, on the
//    scheduler thread, after the engine's step has produced the token);
//  - receive: steady_clock in the client when Read() returns the token's event.
//  latency = receive - emit: the server's work on the token (event proto, queueing, the write,
//  serialization, HTTP/2, loopback TCP) plus the client's read and wake-up. The engine hands a
//  whole step's tokens over in one burst, so at N streams a token also waits behind the burst's
//  other tokens. "drain / token" divides each burst's span (first emit to last receive) by its
//  tokens: the server's cost per token under that load. "callback / token" is the mean gap
//  between consecutive emits of a burst: the time the engine's scheduler thread spends in the
//  server's callback per token (before it can start the next step). Bursts are told apart by
//  gaps of more than 1 ms between emits (an engine step takes far longer). The first burst of
//  every stream is counted like the others.
// Output: one markdown row per N, then "check:" lines for the 50 us target of PERFORMANCE.md
// section 4 (latency p50 at 1 stream; drain/token p50 at every N).
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <pthread.h>
#include <spawn.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "deft/v1/tree_service.grpc.pb.h"
#include "server/deft_server.h"

extern char** environ;

namespace {

namespace pb = deft::v1;
using Clock = std::chrono::steady_clock;
using deft::NodeId;
using deft::TreeId;

struct Args {
  std::string model;
  std::vector<int> streams = {1, 64, 1000};
  int tokens = 16;
  int trees = 16;
  int channels = 4;
  int engine_threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) - 1);
};

void Die(const std::string& what) {
  std::fprintf(stderr, "server_load: %s\n", what.c_str());
  std::exit(1);
}

void Check(const grpc::Status& s, const char* what) {
  if (!s.ok()) Die(std::string(what) + ": " + s.error_message());
}

int64_t Nanos(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

std::vector<std::unique_ptr<pb::TreeService::Stub>> Connect(const std::string& address,
                                                            int channels) {
  std::vector<std::unique_ptr<pb::TreeService::Stub>> stubs;
  for (int c = 0; c < channels; ++c) {
    grpc::ChannelArguments channel_args;
    channel_args.SetInt("deft.bench.channel", c);  // distinct args: a connection of its own
    stubs.push_back(pb::TreeService::NewStub(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), channel_args)));
  }
  return stubs;
}

// --- the client process -------------------------------------------------------------------

// Requests: one line per stream, "<tree id> <node id> <max tokens>". Output: one line per
// stream, "<status code> <finish events> <tokens> <receive ns>...".
int ClientMain(const std::string& address, const std::string& requests_path,
               const std::string& out_path, int channels) {
  std::vector<pb::GenerateRequest> requests;
  std::ifstream in(requests_path);
  std::string tree_id;
  int node = 0, max_tokens = 0;
  while (in >> tree_id >> node >> max_tokens) {
    pb::GenerateRequest& r = requests.emplace_back();
    r.set_tree_id(tree_id);
    pb::Branch* b = r.add_branches();
    b->set_node_id(node);
    b->mutable_sampling()->set_max_tokens(max_tokens);
    b->mutable_sampling()->set_ignore_eos(true);
  }
  auto stubs = Connect(address, channels);
  for (auto& stub : stubs) {  // connect every channel before the clock matters
    grpc::ClientContext ctx;
    pb::ListTreesResponse list;
    Check(stub->ListTrees(&ctx, pb::ListTreesRequest(), &list), "ListTrees");
  }
  struct Result {
    std::vector<int64_t> receive;
    int finishes = 0;
    grpc::StatusCode code = grpc::StatusCode::UNKNOWN;
  };
  std::vector<Result> results(requests.size());
  std::mutex mu;
  std::condition_variable cv;
  bool go = false;
  std::vector<std::thread> readers;
  for (size_t i = 0; i < requests.size(); ++i) {
    readers.emplace_back([&, i] {
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return go; });
      }
      grpc::ClientContext ctx;
      auto reader = stubs[i % stubs.size()]->Generate(&ctx, requests[i]);
      pb::GenerateEvent e;
      Result& r = results[i];
      r.receive.reserve(requests[i].branches(0).sampling().max_tokens() + 1);
      while (reader->Read(&e)) {
        const Clock::time_point now = Clock::now();
        if (e.has_token() && e.token().token_id() >= 0) r.receive.push_back(Nanos(now));
        if (e.has_finish()) ++r.finishes;
      }
      r.code = reader->Finish().error_code();
    });
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    go = true;
  }
  cv.notify_all();
  for (std::thread& t : readers) t.join();
  std::ofstream out(out_path);
  for (const Result& r : results) {
    out << static_cast<int>(r.code) << ' ' << r.finishes << ' ' << r.receive.size();
    for (int64_t t : r.receive) out << ' ' << t;
    out << '\n';
  }
  return out ? 0 : 1;
}

// --- the server process -------------------------------------------------------------------

// Emit times of one stream, written by the engine's scheduler thread.
struct Slot {
  std::vector<int64_t> emit;
  std::vector<int64_t> receive;
};
// Keyed by (engine tree, node); built before the streams start, read-only while they run.
using SlotMap = absl::flat_hash_map<std::pair<TreeId, NodeId>, Slot*>;
SlotMap* g_slots = nullptr;
// The engine's scheduler thread (the observer runs on it): with --engine_threads 1 it does all of
// the engine's computing, so the process's CPU time minus its CPU time is the server's (gRPC,
// handlers, the stream writer).
std::atomic<bool> g_have_scheduler{false};
pthread_t g_scheduler;

double ThreadCpuSeconds(pthread_t thread) {
  clockid_t clock;
  timespec ts{};
  if (pthread_getcpuclockid(thread, &clock) != 0 || clock_gettime(clock, &ts) != 0) return 0;
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

double ProcessCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

// Runs the client process on `requests_path`; returns its output's path.
std::string RunClientProcess(const std::string& address, const std::string& requests_path,
                             int channels) {
  const std::string out_path = requests_path + ".out";
  char exe[4096];
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len <= 0) Die("cannot find this executable");
  exe[len] = '\0';
  std::vector<std::string> argv_s = {exe,           "--client", address,
                                     requests_path, out_path,   std::to_string(channels)};
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, exe, nullptr, nullptr, argv.data(), environ) != 0) {
    Die("cannot start the client process");
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) Die("the client process failed");
  return out_path;
}

struct Row {
  int streams = 0;
  int64_t tokens = 0;
  int64_t bursts = 0;
  double ms_per_burst = 0;
  double latency_p50 = 0, latency_p99 = 0;
  double drain_p50 = 0, drain_p99 = 0, drain_mean = 0;
  double callback_mean = 0;  // us per token, bursts of more than one token
  double server_cpu = -1;    // us per token; -1 unless the engine runs on one thread
};

Row RunOnce(deft::server::DeftServer& server, pb::TreeService::Stub& stub,
            const std::string& address, const std::vector<pb::CreateTreeResponse>& trees,
            int streams, int tokens, int channels, int engine_threads) {
  std::vector<Slot> slots(streams);
  SlotMap map;
  std::vector<std::pair<std::string, int32_t>> children(streams);
  char requests_path[] = "/tmp/server_load_XXXXXX";
  const int fd = mkstemp(requests_path);
  if (fd < 0) Die("cannot create a temporary file");
  close(fd);
  std::ofstream requests(requests_path);
  for (int i = 0; i < streams; ++i) {
    const pb::CreateTreeResponse& tree = trees[i % trees.size()];
    pb::ForkRequest fork;
    fork.set_tree_id(tree.tree_id());
    fork.set_node_id(tree.root_node_id());
    fork.set_offset(tree.prompt_tokens());
    fork.set_count(1);
    pb::ForkResponse forked;
    grpc::ClientContext ctx;
    Check(stub.Fork(&ctx, fork, &forked), "Fork");
    const NodeId child = forked.node_ids(0);
    children[i] = {tree.tree_id(), child};
    auto engine_tree = server.state().registry().Find(tree.tree_id(), "");
    if (!engine_tree.ok()) Die("tree not in the registry");
    slots[i].emit.reserve(tokens + 1);
    map[{*engine_tree, child}] = &slots[i];
    requests << tree.tree_id() << ' ' << child << ' ' << tokens << '\n';
  }
  requests.close();
  g_slots = &map;
  const bool cpu_split = g_have_scheduler.load() && engine_threads == 1;
  const double cpu0 = ProcessCpuSeconds();
  const double engine0 = cpu_split ? ThreadCpuSeconds(g_scheduler) : 0;
  const Clock::time_point start = Clock::now();
  const std::string out_path = RunClientProcess(address, requests_path, channels);
  const double wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  const double server_cpu_s =
      (ProcessCpuSeconds() - cpu0) - (cpu_split ? ThreadCpuSeconds(g_scheduler) - engine0 : 0);
  g_slots = nullptr;
  std::ifstream results(out_path);
  for (int i = 0; i < streams; ++i) {
    int code = -1, finishes = 0;
    size_t n = 0;
    if (!(results >> code >> finishes >> n)) Die("short client output");
    slots[i].receive.resize(n);
    for (size_t k = 0; k < n; ++k) results >> slots[i].receive[k];
    if (code != 0 || finishes != 1 || static_cast<int>(n) != tokens || slots[i].emit.size() != n) {
      Die("stream " + std::to_string(i) + ": status " + std::to_string(code) + ", " +
          std::to_string(n) + " of " + std::to_string(tokens) + " tokens, " +
          std::to_string(slots[i].emit.size()) + " emitted, " + std::to_string(finishes) +
          " finishes");
    }
  }
  std::remove(requests_path);
  std::remove(out_path.c_str());

  Row row;
  row.streams = streams;
  std::vector<double> latency;
  std::vector<std::pair<int64_t, int64_t>> all;  // (emit, receive) ns
  for (const Slot& s : slots) {
    for (size_t k = 0; k < s.emit.size(); ++k) {
      latency.push_back(static_cast<double>(s.receive[k] - s.emit[k]) / 1e3);
      all.emplace_back(s.emit[k], s.receive[k]);
    }
  }
  row.tokens = static_cast<int64_t>(all.size());
  row.latency_p50 = Percentile(latency, 0.5);
  row.latency_p99 = Percentile(latency, 0.99);
  // Bursts: emits more than 1 ms apart start a new one.
  std::sort(all.begin(), all.end());
  std::vector<double> drain;
  double span_sum = 0, callback_sum = 0;
  int64_t callback_gaps = 0;
  for (size_t i = 0; i < all.size();) {
    size_t j = i + 1;
    int64_t last_receive = all[i].second;
    while (j < all.size() && all[j].first - all[j - 1].first <= 1'000'000) {
      last_receive = std::max(last_receive, all[j].second);
      ++j;
    }
    const double span = static_cast<double>(last_receive - all[i].first) / 1e3;
    drain.push_back(span / static_cast<double>(j - i));
    span_sum += span;
    callback_sum += static_cast<double>(all[j - 1].first - all[i].first) / 1e3;
    callback_gaps += static_cast<int64_t>(j - i - 1);
    i = j;
  }
  row.bursts = static_cast<int64_t>(drain.size());
  row.drain_p50 = Percentile(drain, 0.5);
  row.drain_p99 = Percentile(drain, 0.99);
  row.drain_mean = span_sum / static_cast<double>(row.tokens);
  row.callback_mean = callback_gaps > 0 ? callback_sum / static_cast<double>(callback_gaps) : 0;
  row.ms_per_burst = 1e3 * wall_s / static_cast<double>(std::max<int64_t>(1, row.bursts));
  if (cpu_split) row.server_cpu = 1e6 * server_cpu_s / static_cast<double>(row.tokens);

  // Prune the children: the trees are back to their roots for the next run.
  for (const auto& [tree_id, child] : children) {
    pb::PruneRequest prune;
    prune.set_tree_id(tree_id);
    prune.set_node_id(child);
    pb::PruneResponse pruned;
    grpc::ClientContext ctx;
    Check(stub.Prune(&ctx, prune, &pruned), "Prune");
  }
  return row;
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  const char* env = std::getenv("DEFT_MODEL");
  const char* home = std::getenv("HOME");
  a.model = env != nullptr ? env
                           : std::string(home != nullptr ? home : "") +
                                 "/.cache/deft/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) Die("missing value for " + flag);
    const std::string value = argv[++i];
    auto number = [&] {
      char* end = nullptr;
      const long v = std::strtol(value.c_str(), &end, 10);
      if (end == value.c_str() || *end != '\0' || v < 1) Die(flag + " needs a positive integer");
      return static_cast<int>(v);
    };
    if (flag == "--model") {
      a.model = value;
    } else if (flag == "--tokens") {
      a.tokens = number();
    } else if (flag == "--trees") {
      a.trees = number();
    } else if (flag == "--channels") {
      a.channels = number();
    } else if (flag == "--engine_threads") {
      a.engine_threads = number();
    } else if (flag == "--streams") {
      a.streams.clear();
      std::stringstream list(value);
      std::string item;
      while (std::getline(list, item, ',')) {
        const int n = std::atoi(item.c_str());
        if (n < 1) Die("--streams needs positive integers, comma-separated");
        a.streams.push_back(n);
      }
    } else {
      Die("unknown flag " + flag +
          " (--model, --streams, --tokens, --trees, --channels, --engine_threads)");
    }
  }
  if (a.streams.empty()) Die("--streams is empty");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 6 && std::string(argv[1]) == "--client") {
    return ClientMain(argv[2], argv[3], argv[4], std::atoi(argv[5]));
  }
  const Args args = ParseArgs(argc, argv);
  const int max_streams = *std::max_element(args.streams.begin(), args.streams.end());
  deft::server::ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.load_model = deft::server::ModelFromPath(args.model, /*exact=*/false, args.engine_threads);
  // Every branch's decode token fits one step; a child needs ceil(tokens / 16) blocks, +1 spare.
  o.engine.step_token_budget = std::max(512, max_streams + 64);
  const int64_t blocks_per_child = (args.tokens + 15) / 16 + 1;
  o.engine.kv_pool_bytes = std::max<int64_t>(
      int64_t{256} << 20, (max_streams * blocks_per_child + 64 * args.trees) * int64_t{16} * 46080);
  o.max_tokens_limit = std::max(4096, args.tokens);
  o.tree_ttl = std::chrono::seconds(0);
  o.token_observer = [](TreeId tree, NodeId node) {
    const int64_t now = Nanos(Clock::now());
    if (!g_have_scheduler.load(std::memory_order_relaxed)) {
      g_scheduler = pthread_self();
      g_have_scheduler.store(true);
    }
    if (g_slots == nullptr) return;
    auto it = g_slots->find(std::make_pair(tree, node));
    if (it != g_slots->end()) it->second->emit.push_back(now);
  };
  auto server = deft::server::DeftServer::Start(std::move(o));
  if (!server.ok()) Die(std::string(server.status().message()));
  absl::Status loaded = (*server)->WaitUntilLoaded();
  if (!loaded.ok()) Die(std::string(loaded.message()));
  const std::string address = "127.0.0.1:" + std::to_string((*server)->port());
  auto stub =
      pb::TreeService::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));

  // Trees with their prompts computed (the warm-up run: one token on a child per tree).
  std::vector<pb::CreateTreeResponse> trees(args.trees);
  for (int t = 0; t < args.trees; ++t) {
    pb::CreateTreeRequest create;
    create.set_text("Tree " + std::to_string(t) + ": the roots of the old forest reach down");
    grpc::ClientContext ctx;
    Check(stub->CreateTree(&ctx, create, &trees[t]), "CreateTree");
  }
  RunOnce(**server, *stub, address, trees, args.trees, 1, args.channels, args.engine_threads);

  std::printf(
      "| streams | tokens | bursts | ms / burst | latency p50 us | latency p99 us | "
      "drain/token p50 us | drain/token p99 us | drain/token mean us | "
      "callback/token us | server CPU/token us |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  std::vector<std::string> checks;
  for (int n : args.streams) {
    const Row r = RunOnce(**server, *stub, address, trees, n, args.tokens, args.channels,
                          args.engine_threads);
    char cpu[32] = "n/a";
    if (r.server_cpu >= 0) std::snprintf(cpu, sizeof(cpu), "%.1f", r.server_cpu);
    std::printf("| %d | %lld | %lld | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %s |\n",
                r.streams, static_cast<long long>(r.tokens), static_cast<long long>(r.bursts),
                r.ms_per_burst, r.latency_p50, r.latency_p99, r.drain_p50, r.drain_p99,
                r.drain_mean, r.callback_mean, cpu);
    std::fflush(stdout);
    char line[160];
    if (n == 1) {
      std::snprintf(line, sizeof(line), "check: latency p50 at 1 stream <= 50 us: %s (%.1f us)",
                    r.latency_p50 <= 50 ? "PASS" : "FAIL", r.latency_p50);
      checks.push_back(line);
    }
    std::snprintf(line, sizeof(line), "check: drain/token p50 at %d streams <= 50 us: %s (%.1f us)",
                  n, r.drain_p50 <= 50 ? "PASS" : "FAIL", r.drain_p50);
    checks.push_back(line);
  }
  for (const std::string& c : checks) std::printf("%s\n", c.c_str());
  (*server)->Shutdown(std::chrono::milliseconds(0));
  return 0;
}
