// WaitIndicator: output to stdout/stderr with a wait indicator. While nothing has been written for
// `idle`, a spinner line "<label>... 3.4s" (time since the indicator started) shows on stderr and
// is erased before the next write, so streamed text and the spinner never mix. The spinner only
// shows when stderr is a terminal; otherwise the writes go straight through.
//
// Thread safety: Write and set_label may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include "absl/strings/string_view.h"

namespace deft::cli {

class WaitIndicator {
 public:
  explicit WaitIndicator(std::string label,
                         std::chrono::milliseconds idle = std::chrono::milliseconds(500));
  ~WaitIndicator();  // erases the spinner
  WaitIndicator(const WaitIndicator&) = delete;
  WaitIndicator& operator=(const WaitIndicator&) = delete;

  // Writes `text` to `out` (stdout or stderr) and flushes; restarts the idle time.
  void Write(std::FILE* out, absl::string_view text);
  void set_label(std::string label);

 private:
  void Run();
  void EraseLocked();

  std::mutex mu_;
  std::condition_variable cv_;
  std::string label_;
  const std::chrono::milliseconds idle_;
  const std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_write_;
  bool shown_ = false;
  bool done_ = false;
  std::thread thread_;
};

}  // namespace deft::cli
