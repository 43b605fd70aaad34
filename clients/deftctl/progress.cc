// WaitIndicator; see progress.h.
#include "clients/deftctl/progress.h"

#include <unistd.h>

namespace deft::cli {

WaitIndicator::WaitIndicator(std::string label, std::chrono::milliseconds idle)
    : label_(std::move(label)),
      idle_(idle),
      start_(std::chrono::steady_clock::now()),
      last_write_(start_) {
  if (isatty(STDERR_FILENO)) thread_ = std::thread([this] { Run(); });
}

WaitIndicator::~WaitIndicator() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    EraseLocked();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void WaitIndicator::Write(std::FILE* out, absl::string_view text) {
  std::lock_guard<std::mutex> lock(mu_);
  EraseLocked();
  std::fwrite(text.data(), 1, text.size(), out);
  std::fflush(out);
  last_write_ = std::chrono::steady_clock::now();
}

void WaitIndicator::set_label(std::string label) {
  std::lock_guard<std::mutex> lock(mu_);
  label_ = std::move(label);
}

void WaitIndicator::EraseLocked() {
  if (!shown_) return;
  std::fputs("\0338\033[K", stderr);  // back to the saved cursor, erase to the end of line
  std::fflush(stderr);
  shown_ = false;
}

void WaitIndicator::Run() {
  static constexpr char kFrames[] = "|/-\\";
  std::unique_lock<std::mutex> lock(mu_);
  for (int frame = 0; !done_; ++frame) {
    cv_.wait_for(lock, std::chrono::milliseconds(100));
    if (done_) break;
    const auto now = std::chrono::steady_clock::now();
    if (now - last_write_ < idle_) continue;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    // Streamed text may have left a partial line: the spinner goes after it, between a saved
    // cursor position (ESC 7) and the erase back to it (ESC 8, ESC [K).
    if (shown_) std::fputs("\0338\033[K", stderr);
    std::fprintf(stderr, "\0337 %c %s... %.1fs", kFrames[frame % 4], label_.c_str(), seconds);
    std::fflush(stderr);
    shown_ = true;
  }
}

}  // namespace deft::cli
