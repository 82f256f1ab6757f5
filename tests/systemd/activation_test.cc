// The real mnemod under a stand-in service manager: socket activation by
// systemd-socket-activate, readiness/watchdog/stopping datagrams on a fake
// NOTIFY_SOCKET, and the exit statuses mnemod.service relies on
// (RestartPreventExitStatus=2).
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "protocol/framing.h"
#include "protocol/messages.h"

namespace mnemo {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using Clock = std::chrono::steady_clock;

const std::string kMnemod = std::string(MNEMO_BINARY_DIR) + "/daemon/mnemod";
const std::string kModel = std::string(MNEMO_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
constexpr auto kStartTimeout = std::chrono::seconds(120);  // 2 shared cores, cold page cache

bool Exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

std::string FindTool(const char* name) {
  for (const char* dir : {"/usr/bin", "/bin", "/usr/local/bin"}) {
    std::string p = std::string(dir) + "/" + name;
    if (access(p.c_str(), X_OK) == 0) return p;
  }
  return {};
}

class ActivationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (access(kMnemod.c_str(), X_OK) != 0) GTEST_SKIP() << kMnemod << " is not built";
    if (!Exists(kModel)) GTEST_SKIP() << kModel << " is missing (scripts/fetch-model)";
    char tmpl[] = "/tmp/mnemo-act-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    notify_fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(notify_fd_, 0);
    notify_path_ = dir_ + "/notify";
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, notify_path_.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(bind(notify_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << strerror(errno);
  }

  void TearDown() override {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (client_fd_ >= 0) close(client_fd_);
    if (notify_fd_ >= 0) close(notify_fd_);
    if (HasFailure() && !dir_.empty()) {
      std::ifstream log(dir_ + "/mnemod.log");
      std::cerr << "--- mnemod's output:\n" << log.rdbuf() << "\n---\n";
    }
    if (!dir_.empty()) (void)std::system(("rm -rf '" + dir_ + "'").c_str());
  }

  // Starts argv with `env` added to the environment and output in
  // dir_/mnemod.log.
  void Spawn(const std::vector<std::string>& argv, const std::vector<std::string>& env) {
    const std::string log = dir_ + "/mnemod.log";
    pid_ = fork();
    ASSERT_GE(pid_, 0);
    if (pid_ == 0) {
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      for (const auto& e : env) putenv(const_cast<char*>(e.c_str()));
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
  }

  // Collects notify datagrams until one contains `needle` or `timeout`
  // passes; true when found.
  bool WaitForNotification(const std::string& needle, Clock::duration timeout) {
    for (const auto& m : notifications_) {
      if (m.find(needle) != std::string::npos) return true;
    }
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      pollfd p{notify_fd_, POLLIN, 0};
      if (poll(&p, 1, 100) != 1) continue;
      char buf[4096];
      ssize_t n = recv(notify_fd_, buf, sizeof buf, 0);
      if (n <= 0) continue;
      notifications_.emplace_back(buf, static_cast<size_t>(n));
      if (notifications_.back().find(needle) != std::string::npos) return true;
    }
    return false;
  }

  std::string AllNotifications() const {
    std::string s;
    for (const auto& m : notifications_) s += "[" + m + "] ";
    return s;
  }

  // Waits for the child to exit; its exit status, or -1 on a signal or
  // timeout.
  int WaitExit(Clock::duration timeout) {
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      int status = 0;
      pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -1;
  }

  std::string dir_;
  std::string notify_path_;
  int notify_fd_ = -1;
  int client_fd_ = -1;
  pid_t pid_ = -1;
  std::vector<std::string> notifications_;
};

int ConnectUnix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Reads frames from fd until a complete response arrives or `timeout`.
Result<protocol::Response> ReadResponse(int fd, Clock::duration timeout) {
  protocol::FrameDecoder decoder;
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 100) != 1) continue;
    char buf[4096];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return Status::IOError("connection closed before a reply");
    decoder.Feed(std::string_view(buf, static_cast<size_t>(n)));
    MNEMO_ASSIGN_OR_RETURN(std::optional<protocol::FrameView> frame, decoder.Next());
    if (frame) return protocol::ParseResponse(frame->frame);
  }
  return Status::Unavailable("no reply in time");
}

TEST_F(ActivationTest, SocketActivatedMnemodServesTheFirstConnectionAndTalksToSystemd) {
  const std::string tool = FindTool("systemd-socket-activate");
  if (tool.empty()) GTEST_SKIP() << "systemd-socket-activate is not installed";
  const std::string socket_path = dir_ + "/mnemod.sock";
  const std::string own_socket = dir_ + "/own.sock";  // must stay unused
  // systemd-socket-activate passes only LISTEN_* and -E variables on.
  Spawn({tool, "-l", socket_path, "-E", "NOTIFY_SOCKET=" + notify_path_, "-E", "WATCHDOG_USEC=2000000", kMnemod,
         "--model", kModel, "--data-dir", dir_ + "/data", "--socket", own_socket, "--threads", "1"},
        {});
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (!Exists(socket_path) && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(Exists(socket_path)) << "systemd-socket-activate did not listen";

  // Connect before mnemod exists: the connection that starts it is served.
  client_fd_ = ConnectUnix(socket_path);
  ASSERT_GE(client_fd_, 0) << strerror(errno);
  protocol::HelloRequest hello;
  hello.client_name = "activation_test";
  const std::string frame = protocol::EncodeRequest(1, hello);
  ASSERT_EQ(send(client_fd_, frame.data(), frame.size(), MSG_NOSIGNAL), static_cast<ssize_t>(frame.size()));

  ASSERT_TRUE(WaitForNotification("READY=1", kStartTimeout)) << AllNotifications();
  EXPECT_THAT(AllNotifications(), HasSubstr("STATUS=loading model"));
  EXPECT_THAT(AllNotifications(), HasSubstr("STATUS=serving"));
  auto reply = ReadResponse(client_fd_, std::chrono::seconds(30));
  ASSERT_TRUE(reply.ok()) << reply.status().ToString();
  const auto* hello_reply = std::get_if<protocol::HelloReply>(&reply->body);
  ASSERT_NE(hello_reply, nullptr);
  EXPECT_EQ(reply->id, 1u);
  EXPECT_FALSE(hello_reply->model_name.empty());
  EXPECT_FALSE(Exists(own_socket)) << "mnemod bound its own socket despite LISTEN_FDS";

  // WATCHDOG_USEC=2 s: pings every second.
  notifications_.clear();
  EXPECT_TRUE(WaitForNotification("WATCHDOG=1", std::chrono::seconds(5))) << AllNotifications();

  ASSERT_EQ(kill(pid_, SIGTERM), 0);
  EXPECT_TRUE(WaitForNotification("STOPPING=1", std::chrono::seconds(10))) << AllNotifications();
  EXPECT_EQ(WaitExit(std::chrono::seconds(30)), 0);
  // The socket belongs to the service manager: mnemod leaves it in place.
  EXPECT_TRUE(Exists(socket_path));
}

TEST_F(ActivationTest, ConfigErrorExitsWithStatus2) {
  Spawn({kMnemod, "--model", kModel, "--max-batch", "0"}, {"NOTIFY_SOCKET=" + notify_path_});
  EXPECT_EQ(WaitExit(std::chrono::seconds(30)), 2);
  EXPECT_FALSE(WaitForNotification("READY=1", std::chrono::milliseconds(200)));
  std::ifstream log(dir_ + "/mnemod.log");
  std::stringstream ss;
  ss << log.rdbuf();
  EXPECT_THAT(ss.str(), HasSubstr("--max-batch"));
}

TEST_F(ActivationTest, MissingModelFailsWithAStatusLine) {
  Spawn({kMnemod, "--model", dir_ + "/absent.gguf", "--data-dir", dir_ + "/data", "--socket", dir_ + "/s.sock"},
        {"NOTIFY_SOCKET=" + notify_path_});
  EXPECT_EQ(WaitExit(kStartTimeout), 1);
  EXPECT_TRUE(WaitForNotification("STATUS=failed", std::chrono::seconds(1))) << AllNotifications();
  EXPECT_THAT(AllNotifications(), HasSubstr("absent.gguf"));
  EXPECT_THAT(AllNotifications(), Not(HasSubstr("READY=1")));
}

}  // namespace
}  // namespace mnemo
