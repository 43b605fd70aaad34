// A fixed pool of worker threads for data-parallel loops. ParallelFor splits [0, n) into one
// contiguous range per thread; the calling thread runs the first range itself. Workers spin
// briefly between jobs (a decode step issues hundreds of small jobs, and a condition-variable
// wake-up costs more than the job), then sleep.
//
// Thread safety: ParallelFor may be called from several threads; calls are serialized.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace deft {

class ThreadPool {
 public:
  // num_threads <= 0: one per available core. The pool owns num_threads - 1 workers.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(thread_index, begin, end) on disjoint ranges covering [0, n), ranges rounded to
  // multiples of `grain` (except the last), and returns when all are done.
  void ParallelFor(int64_t n, int64_t grain,
                   const std::function<void(int thread, int64_t begin, int64_t end)>& fn);

  static int DefaultThreadCount();

 private:
  void WorkerLoop(int index);
  void RunRange(int thread);

  int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex call_mutex_;  // serializes ParallelFor callers

  // Current job, published by bumping epoch_.
  const std::function<void(int, int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0;
  int64_t job_grain_ = 1;
  int job_parts_ = 1;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
  std::atomic<int> sleepers_{0};
};

}  // namespace deft
