// Flow control for a reply stream produced off the io thread (a session
// export): the producer acquires credit for each frame's bytes before
// queuing it, the connection gives the credit back once the frame is
// written to the socket, so a client that reads slowly slows the producer
// down instead of growing the daemon's output queue.
//
// Thread-safe.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>

#include "common/status.h"

namespace mnemo::daemon {

class FlowWindow {
 public:
  // `window_bytes`: most bytes queued and unwritten at once. `stall`: how
  // long Acquire waits without any credit coming back before giving up.
  FlowWindow(size_t window_bytes, std::chrono::milliseconds stall)
      : window_bytes_(window_bytes), stall_(stall) {}

  // Blocks until `bytes` more fit in the window (a piece larger than the
  // window waits for an empty one). Cancelled (or the status given to
  // Cancel) once cancelled; Unavailable after `stall` without progress.
  Status Acquire(size_t bytes) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (!cancelled_.ok()) return cancelled_;
      if (in_flight_ == 0 || in_flight_ + bytes <= window_bytes_) break;
      const uint64_t seen = released_;
      if (!cv_.wait_for(lock, stall_, [&] { return !cancelled_.ok() || released_ != seen; }))
        return Status::Unavailable("client stopped reading the export for " +
                                   std::to_string(stall_.count() / 1000) + " s");
    }
    in_flight_ += bytes;
    return Status::Ok();
  }

  void Release(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    in_flight_ -= std::min(bytes, in_flight_);
    ++released_;
    cv_.notify_all();
  }

  // Makes every Acquire (waiting or later) return `why`. First call wins.
  void Cancel(Status why) {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_.ok()) cancelled_ = std::move(why);
    cv_.notify_all();
  }

 private:
  const size_t window_bytes_;
  const std::chrono::milliseconds stall_;
  std::mutex mu_;
  std::condition_variable cv_;
  size_t in_flight_ = 0;   // guarded by mu_
  uint64_t released_ = 0;  // guarded by mu_
  Status cancelled_;       // guarded by mu_
};

}  // namespace mnemo::daemon
