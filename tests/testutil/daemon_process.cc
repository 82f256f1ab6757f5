// DaemonProcess: fork/exec of the real mnemod with a test-owned notify socket.
#include "tests/testutil/daemon_process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "tests/testutil/tiny_model.h"

#ifndef MNEMO_BINARY_DIR
#define MNEMO_BINARY_DIR "."
#endif
#ifndef MNEMO_SOURCE_DIR
#define MNEMO_SOURCE_DIR "."
#endif

extern char** environ;

namespace mnemo::testutil {

std::string MnemodPath() { return std::string(MNEMO_BINARY_DIR) + "/daemon/mnemod"; }
std::string MnemoCliPath() { return std::string(MNEMO_BINARY_DIR) + "/client/mnemo"; }
std::string DefaultModelPath() {
  return std::string(MNEMO_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

DaemonProcess::DaemonProcess() {
  dir_ = TempDir();
  // Other uids (tenancy tests) must reach the socket.
  ::chmod(dir_.c_str(), 0755);
  socket_path_ = dir_ + "/mnemod.sock";
  data_dir_ = dir_ + "/data";
  notify_path_ = dir_ + "/notify";
  log_path_ = dir_ + "/mnemod.log";
  notify_fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  strncpy(addr.sun_path, notify_path_.c_str(), sizeof(addr.sun_path) - 1);
  if (::bind(notify_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    error_ = std::string("bind notify socket: ") + strerror(errno);
}

DaemonProcess::~DaemonProcess() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &status_, 0);
  }
  if (notify_fd_ >= 0) ::close(notify_fd_);
  // T2 slab files are preallocated: leaving them behind fills the disk.
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

bool DaemonProcess::Spawn(const std::vector<std::string>& args, const std::vector<std::string>& extra_env) {
  // A new life: forget what the previous one announced.
  notes_.clear();
  char drain[4096];
  while (::recv(notify_fd_, drain, sizeof(drain), MSG_DONTWAIT) > 0) {
  }
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    if (strncmp(*e, "NOTIFY_SOCKET=", 14) == 0 || strncmp(*e, "LISTEN_", 7) == 0) continue;
    env.emplace_back(*e);
  }
  env.push_back("NOTIFY_SOCKET=" + notify_path_);
  for (const auto& e : extra_env) env.push_back(e);
  std::vector<char*> argv, envp;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  const int log_fd = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  pid_ = ::fork();
  if (pid_ == 0) {
    // Only async-signal-safe calls until exec.
    ::dup2(log_fd, 2);
    ::dup2(log_fd, 1);
    ::execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  ::close(log_fd);
  if (pid_ < 0) {
    error_ = std::string("fork: ") + strerror(errno);
    return false;
  }
  return true;
}

bool DaemonProcess::Start(const std::vector<std::string>& extra_args, std::chrono::seconds timeout) {
  std::vector<std::string> args = {MnemodPath(),     "--model",     DefaultModelPath(), "--socket",
                                   socket_path_,     "--data-dir",  data_dir_,          "--threads",
                                   "2",              "--log-level", "debug",            "--t2-budget",
                                   "128M",           "--t1-budget", "32M"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  if (!Spawn(args)) return false;
  if (!WaitNotify("READY=1", timeout)) {
    error_ += "; log:\n" + log();
    return false;
  }
  return true;
}

bool DaemonProcess::WaitNotify(const std::string& line, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (const auto& n : notes_)
    if (n.find(line) != std::string::npos) return true;
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{notify_fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) > 0) {
      char buf[4096];
      const ssize_t n = ::recv(notify_fd_, buf, sizeof(buf), 0);
      if (n > 0) {
        notes_.emplace_back(buf, static_cast<size_t>(n));
        if (notes_.back().find(line) != std::string::npos) return true;
      }
      continue;
    }
    if (!running()) {
      error_ = "mnemod exited (status " + std::to_string(status_) + ") before " + line;
      return false;
    }
  }
  error_ = "timed out waiting for " + line;
  return false;
}

bool DaemonProcess::running() {
  if (pid_ <= 0) return false;
  const pid_t r = ::waitpid(pid_, &status_, WNOHANG);
  if (r == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

int DaemonProcess::Wait(std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (!running()) return status_;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

int DaemonProcess::Stop(int sig, std::chrono::seconds timeout) {
  if (pid_ <= 0) return status_;
  ::kill(pid_, sig);
  return Wait(timeout);
}

std::string DaemonProcess::log() const {
  std::ifstream f(log_path_);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace mnemo::testutil
