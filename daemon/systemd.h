// The daemon's side of systemd: socket activation (LISTEN_FDS), readiness,
// status, watchdog and stopping notifications (sd_notify). Everything is a
// no-op when the process was not started by systemd (no NOTIFY_SOCKET).
//
// Thread-safe.
#pragma once

#include <chrono>
#include <optional>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace mnemo::daemon::systemd {

// Listening sockets passed by socket activation, each checked to be a
// listening AF_UNIX stream socket (InvalidArgument otherwise); empty when
// none were passed. Unsets LISTEN_* so children do not inherit them; call
// it once at start-up, before other threads run (unsetenv is not
// thread-safe).
Result<std::vector<int>> ListenFds();

// READY=1 with a STATUS= line; send only once the model is loaded and the
// socket accepts.
void NotifyReady(std::string_view status);
void NotifyStatus(std::string_view status);
void NotifyStopping(std::string_view status);
// Half of WatchdogSec when the service manager expects WATCHDOG=1 pings
// from this process; nullopt otherwise.
std::optional<std::chrono::microseconds> WatchdogInterval();
void NotifyWatchdog();

}  // namespace mnemo::daemon::systemd
