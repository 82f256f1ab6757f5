// systemd integration through libsystemd's sd-daemon calls: the one place
// that reads LISTEN_FDS, NOTIFY_SOCKET and WATCHDOG_USEC.
#include "daemon/systemd.h"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>

#include <cstring>
#include <string>

namespace mnemo::daemon::systemd {
namespace {

// mnemod.socket passes one socket; anything near this many is a unit error.
constexpr int kMaxListenFds = 16;

// STATUS= is one line of the notify datagram: a newline in the text would
// start a new (bogus) assignment.
std::string OneLine(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return out;
}

void Notify(const std::string& state) {
  // sd_notify returns 0 without NOTIFY_SOCKET (not under systemd): a no-op.
  const int r = sd_notify(0, state.c_str());
  if (r < 0) {
    spdlog::warn("sd_notify({}): {}", state.substr(0, state.find('\n')), std::strerror(-r));
  }
}

}  // namespace

Result<std::vector<int>> ListenFds() {
  const int n = sd_listen_fds(/*unset_environment=*/1);
  // -EINVAL (malformed LISTEN_FDS) or -EBADF (a passed fd is not open):
  // either way the unit passed something unusable.
  if (n < 0) return Status::InvalidArgument(std::string("socket activation: LISTEN_FDS: ") + std::strerror(-n));
  if (n > kMaxListenFds) {
    return Status::InvalidArgument("socket activation passed " + std::to_string(n) + " sockets; mnemod takes at most " +
                                   std::to_string(kMaxListenFds));
  }
  std::vector<int> fds;
  for (int fd = SD_LISTEN_FDS_START; fd < SD_LISTEN_FDS_START + n; ++fd) {
    const int r = sd_is_socket_unix(fd, SOCK_STREAM, /*listening=*/1, nullptr, 0);
    if (r < 0) {
      return Status::InvalidArgument("socket activation: fd " + std::to_string(fd) + ": " + std::strerror(-r));
    }
    if (r == 0) {
      return Status::InvalidArgument("socket activation: fd " + std::to_string(fd) +
                                     " is not a listening AF_UNIX stream socket (check ListenStream= in "
                                     "mnemod.socket)");
    }
    fds.push_back(fd);
  }
  return fds;
}

void NotifyReady(std::string_view status) { Notify("READY=1\nSTATUS=" + OneLine(status)); }

void NotifyStatus(std::string_view status) { Notify("STATUS=" + OneLine(status)); }

void NotifyStopping(std::string_view status) { Notify("STOPPING=1\nSTATUS=" + OneLine(status)); }

std::optional<std::chrono::microseconds> WatchdogInterval() {
  uint64_t usec = 0;
  // > 0 only when WATCHDOG_USEC is set and WATCHDOG_PID (if set) is us.
  if (sd_watchdog_enabled(/*unset_environment=*/0, &usec) <= 0 || usec == 0) return std::nullopt;
  // Half the deadline, as sd_watchdog_enabled(3) recommends: a ping that
  // is late by one scheduling hiccup still arrives in time.
  return std::chrono::microseconds(usec / 2);
}

void NotifyWatchdog() { Notify("WATCHDOG=1"); }

}  // namespace mnemo::daemon::systemd
