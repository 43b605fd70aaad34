// TreeService over the gRPC callback API: every RPC of deft.v1.TreeService, translated to
// TreeEngine calls on the tree the caller owns.
//
// Unary RPCs validate (server/validation.h), resolve the public tree id through the registry
// (another owner's tree is NOT_FOUND), call the engine and answer; that work runs on the
// service's WorkQueue, never on gRPC's callback threads, because the engine holds its lock for
// whole scheduler steps (Verify and BeamSearch, which run the model themselves, get a thread
// each). Generate is a server-streaming
// reactor fed by the engine's callbacks: they run on the engine's scheduler thread, so they only
// queue events; the reactor writes one event at a time from the queue. A client cancellation
// (or a broken stream) cancels the engine generation and ends the stream with CANCELLED; the
// call's deadline is passed to the engine, whose branches then finish with DEADLINE_EXCEEDED and
// the stream ends with DEADLINE_EXCEEDED.
//
// Thread safety: handlers run concurrently on gRPC's threads; all shared state is in
// ServingState.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>

#include "deft/v1/tree_service.grpc.pb.h"
#include "server/serving_state.h"
#include "server/work_queue.h"

namespace deft::server {

// Where the events of Generate streams are written from: the first of a burst inline on the
// engine's scheduler thread (TakeInlineWrite), the others on `queue`'s thread.
struct EventWriter {
  static constexpr std::chrono::microseconds kInlineGap{1000};
  WorkQueue queue{1};
  std::atomic<int64_t> last_inline_us{0};

  // True (and the clock restarted) when no event was written inline in the last kInlineGap.
  bool TakeInlineWrite() {
    const int64_t now = std::chrono::duration_cast<std::chrono::microseconds>(
                            std::chrono::steady_clock::now().time_since_epoch())
                            .count();
    int64_t last = last_inline_us.load(std::memory_order_relaxed);
    return now - last >= kInlineGap.count() && last_inline_us.compare_exchange_strong(last, now);
  }
};

class TreeServiceImpl final : public deft::v1::TreeService::CallbackService {
 public:
  explicit TreeServiceImpl(std::shared_ptr<ServingState> state) : state_(std::move(state)) {}

  grpc::ServerUnaryReactor* CreateTree(grpc::CallbackServerContext* context,
                                       const deft::v1::CreateTreeRequest* request,
                                       deft::v1::CreateTreeResponse* response) override;
  grpc::ServerUnaryReactor* Fork(grpc::CallbackServerContext* context,
                                 const deft::v1::ForkRequest* request,
                                 deft::v1::ForkResponse* response) override;
  grpc::ServerUnaryReactor* Extend(grpc::CallbackServerContext* context,
                                   const deft::v1::ExtendRequest* request,
                                   deft::v1::ExtendResponse* response) override;
  grpc::ServerWriteReactor<deft::v1::GenerateEvent>* Generate(
      grpc::CallbackServerContext* context, const deft::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Verify(grpc::CallbackServerContext* context,
                                   const deft::v1::VerifyRequest* request,
                                   deft::v1::VerifyResponse* response) override;
  grpc::ServerUnaryReactor* BeamSearch(grpc::CallbackServerContext* context,
                                       const deft::v1::BeamSearchRequest* request,
                                       deft::v1::BeamSearchResponse* response) override;
  grpc::ServerUnaryReactor* Prune(grpc::CallbackServerContext* context,
                                  const deft::v1::PruneRequest* request,
                                  deft::v1::PruneResponse* response) override;
  grpc::ServerUnaryReactor* GetTree(grpc::CallbackServerContext* context,
                                    const deft::v1::GetTreeRequest* request,
                                    deft::v1::Tree* response) override;
  grpc::ServerUnaryReactor* DeleteTree(grpc::CallbackServerContext* context,
                                       const deft::v1::DeleteTreeRequest* request,
                                       deft::v1::DeleteTreeResponse* response) override;
  grpc::ServerUnaryReactor* ListTrees(grpc::CallbackServerContext* context,
                                      const deft::v1::ListTreesRequest* request,
                                      deft::v1::ListTreesResponse* response) override;

 private:
  // Threads for handler work that may wait for the engine's lock (work_queue.h).
  static constexpr int kWorkThreads = 4;

  // Runs `work` on work_ and finishes the call with its status (counted under `method`).
  grpc::ServerUnaryReactor* Deferred(grpc::CallbackServerContext* context, const char* method,
                                     std::function<absl::Status()> work);

  std::shared_ptr<ServingState> state_;
  WorkQueue work_{kWorkThreads};
  EventWriter writer_;
};

}  // namespace deft::server
