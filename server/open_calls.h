// OpenCalls: the deft.* calls a server has open, counted by a gRPC server interceptor, so that
// DeftServer::Shutdown can let them end before it closes the connections. An interceptor object
// lives exactly as long as its call: made when the call arrives, before any handler runs, and
// destroyed once the handler's reactor is done (its status handed to the transport, OnDone run),
// so every RPC of every deft service counts, whatever its handler does.
//
// Only the deft.* services count: grpc.health.v1 Watch streams and reflection streams stay open
// as long as their clients like, and must not hold a drain for its whole grace. Calls arriving
// once Drain has begun are not counted (the services refuse them; ServingState::StartDraining).
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

namespace deft::server {

class OpenCalls {
 public:
  using Clock = std::chrono::steady_clock;

  // The interceptor factory for ServerBuilder::experimental().SetInterceptorCreators that counts
  // the server's calls into `calls`.
  static std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> CountInto(
      std::shared_ptr<OpenCalls> calls);

  // Stops counting new calls, then blocks until the counted ones have all ended or `deadline`
  // passes.
  void Drain(Clock::time_point deadline);
  // When a counted call last ended (Clock::time_point() if none has).
  Clock::time_point last_ended() const;

 private:
  class Counter;
  class Factory;

  // Counts a call that arrives now; false (not counted) once Drain has begun.
  bool Open();
  void Close();

  mutable std::mutex mu_;
  std::condition_variable ended_;
  int64_t open_ = 0;
  bool draining_ = false;
  Clock::time_point last_ended_;
};

}  // namespace deft::server
