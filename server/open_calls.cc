#include "server/open_calls.h"

#include <string_view>
#include <utility>

namespace deft::server {

// One per counted call: counts it open for as long as gRPC keeps it (the call's ServerRpcInfo owns
// it). Every batch of the call passes through Intercept, which lets it on unchanged.
class OpenCalls::Counter final : public grpc::experimental::Interceptor {
 public:
  explicit Counter(std::shared_ptr<OpenCalls> calls) : calls_(std::move(calls)) {}
  ~Counter() override { calls_->Close(); }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    methods->Proceed();
  }

 private:
  std::shared_ptr<OpenCalls> calls_;
};

class OpenCalls::Factory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit Factory(std::shared_ptr<OpenCalls> calls) : calls_(std::move(calls)) {}
  // Method names are "/package.Service/Method": ours are "/deft.v1.TreeService/Generate", ....
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    const std::string_view method = info->method() != nullptr ? info->method() : "";
    if (method.substr(0, 6) != "/deft." || !calls_->Open()) return nullptr;
    return new Counter(calls_);
  }

 private:
  std::shared_ptr<OpenCalls> calls_;
};

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> OpenCalls::CountInto(
    std::shared_ptr<OpenCalls> calls) {
  return std::make_unique<Factory>(std::move(calls));
}

bool OpenCalls::Open() {
  std::lock_guard<std::mutex> lock(mu_);
  if (draining_) return false;
  ++open_;
  return true;
}

void OpenCalls::Close() {
  std::lock_guard<std::mutex> lock(mu_);
  --open_;
  last_ended_ = Clock::now();
  ended_.notify_all();
}

void OpenCalls::Drain(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  draining_ = true;
  ended_.wait_until(lock, deadline, [this] { return open_ == 0; });
}

OpenCalls::Clock::time_point OpenCalls::last_ended() const {
  std::lock_guard<std::mutex> lock(mu_);
  return last_ended_;
}

}  // namespace deft::server
