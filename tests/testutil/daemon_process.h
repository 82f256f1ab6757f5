// Runs the real mnemod binary for end-to-end tests: a private socket and
// data directory, readiness through a NOTIFY_SOCKET the test owns (so READY=1
// is observed exactly as systemd would see it), stderr captured to a log.
//
// Thread-compatible.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace mnemo::testutil {

// Path of the built mnemod / mnemo binaries and the default model.
std::string MnemodPath();
std::string MnemoCliPath();
std::string DefaultModelPath();

class DaemonProcess {
 public:
  DaemonProcess();
  ~DaemonProcess();  // SIGKILLs a daemon still running, removes dir()

  // Starts mnemod with the private socket/data dir, the default model, a
  // small T2 budget (128M) and `extra_args` (later flags win), and waits
  // for READY=1. False (with a reason in error())
  // when it exits or does not become ready in time.
  bool Start(const std::vector<std::string>& extra_args = {},
             std::chrono::seconds timeout = std::chrono::seconds(120));
  // Starts without waiting for readiness.
  bool Spawn(const std::vector<std::string>& args, const std::vector<std::string>& extra_env = {});
  // Waits for a notify datagram containing `line` (e.g. "READY=1").
  bool WaitNotify(const std::string& line, std::chrono::milliseconds timeout);
  // Sends `sig` and waits for exit; returns the exit status (as from
  // waitpid) or -1 on timeout.
  int Stop(int sig = 15, std::chrono::seconds timeout = std::chrono::seconds(60));
  // Waits for the process to exit by itself; -1 on timeout.
  int Wait(std::chrono::seconds timeout);
  bool running();

  const std::string& dir() const { return dir_; }
  const std::string& socket_path() const { return socket_path_; }
  const std::string& data_dir() const { return data_dir_; }
  std::string log() const;  // what the daemon wrote to stderr
  const std::string& error() const { return error_; }
  const std::vector<std::string>& notifications() const { return notes_; }
  pid_t pid() const { return pid_; }

 private:
  std::string dir_, socket_path_, data_dir_, notify_path_, log_path_;
  int notify_fd_ = -1;
  pid_t pid_ = -1;
  int status_ = 0;
  std::string error_;
  std::vector<std::string> notes_;
};

}  // namespace mnemo::testutil
