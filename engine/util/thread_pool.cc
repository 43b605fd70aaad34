#include "engine/util/thread_pool.h"

#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#define DEFT_CPU_RELAX() _mm_pause()
#else
#define DEFT_CPU_RELAX() std::this_thread::yield()
#endif

namespace deft {
namespace {
// About 50-100 us of spinning before a worker sleeps: longer than the gap between the jobs of
// one forward pass, much shorter than the gap between requests.
constexpr int kSpinIterations = 20000;
}  // namespace

int ThreadPool::DefaultThreadCount() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

ThreadPool::ThreadPool(int num_threads)
    : num_threads_(num_threads <= 0 ? DefaultThreadCount() : num_threads) {
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    epoch_.fetch_add(1);
  }
  sleep_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::RunRange(int thread) {
  if (thread >= job_parts_) return;
  int64_t blocks = (job_n_ + job_grain_ - 1) / job_grain_;
  int64_t per = blocks / job_parts_, extra = blocks % job_parts_;
  int64_t b0 = thread * per + std::min<int64_t>(thread, extra);
  int64_t b1 = b0 + per + (thread < extra ? 1 : 0);
  int64_t begin = b0 * job_grain_, end = std::min(job_n_, b1 * job_grain_);
  if (begin < end) (*job_)(thread, begin, end);
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  while (true) {
    int spins = 0;
    uint64_t e;
    while ((e = epoch_.load(std::memory_order_acquire)) == seen) {
      if (++spins < kSpinIterations) {
        DEFT_CPU_RELAX();
        continue;
      }
      std::unique_lock<std::mutex> lock(sleep_mutex_);
      sleepers_.fetch_add(1);
      sleep_cv_.wait(lock, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
      sleepers_.fetch_sub(1);
      spins = 0;
    }
    seen = e;
    if (stop_.load()) return;
    RunRange(index);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int, int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int64_t blocks = (n + grain - 1) / grain;
  if (num_threads_ == 1 || blocks == 1) {
    fn(0, 0, n);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  job_ = &fn;
  job_n_ = n;
  job_grain_ = grain;
  job_parts_ = static_cast<int>(std::min<int64_t>(blocks, num_threads_));
  pending_.store(num_threads_ - 1, std::memory_order_relaxed);
  {
    // Taking the lock orders the epoch bump against a worker that is about to sleep.
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    epoch_.fetch_add(1, std::memory_order_release);
  }
  if (sleepers_.load() > 0) sleep_cv_.notify_all();
  RunRange(0);
  // Spin while the workers are likely running; yield once they may have been descheduled (more
  // runnable threads than cores), so that they get the core back.
  for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < kSpinIterations) {
      DEFT_CPU_RELAX();
    } else {
      std::this_thread::yield();
    }
  }
  job_ = nullptr;
}

}  // namespace deft
