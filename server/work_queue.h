// WorkQueue: a few server-owned threads that run handler work which may block on the engine's
// lock. TreeEngine holds its lock for a whole scheduler step (a forward pass: milliseconds to
// seconds), so a handler that reads or changes the trees can wait that long; run on gRPC's
// callback threads it would hold up every other call's I/O, writes of Generate streams
// included (their OnWriteDone runs there). Handlers post such work here and return at once.
//
// Thread safety: Post may be called from any thread. The destructor runs what is queued, then
// joins the threads; nothing may be posted after it starts.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace deft::server {

class WorkQueue {
 public:
  explicit WorkQueue(int num_threads) {
    for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { Loop(); });
  }
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;
  ~WorkQueue() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  void Post(std::function<void()> work) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(work));
    }
    cv_.notify_one();
  }

 private:
  void Loop() {
    while (true) {
      std::function<void()> work;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, and nothing left
        work = std::move(queue_.front());
        queue_.pop_front();
      }
      work();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace deft::server
