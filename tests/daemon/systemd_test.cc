// systemd integration against a fake service manager: a datagram socket
// standing in for NOTIFY_SOCKET, and sockets placed at fd 3 for LISTEN_FDS.
#include "daemon/systemd.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string>

namespace mnemo::daemon::systemd {
namespace {

using ::testing::HasSubstr;

class SystemdTest : public ::testing::Test {
 protected:
  static constexpr const char* kVars[] = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                          "LISTEN_FDS",    "LISTEN_PID",    "LISTEN_FDNAMES"};

  void SetUp() override {
    for (const char* v : kVars) {
      const char* value = std::getenv(v);
      saved_env_[v] = value ? std::optional<std::string>(value) : std::nullopt;
      unsetenv(v);
    }
    char tmpl[] = "/tmp/mnemo-sd-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    // fd 3 is where socket activation puts its first socket; park whatever
    // the test runner has there and put it back afterwards.
    if (fcntl(3, F_GETFD) != -1) {
      saved_fd3_ = fcntl(3, F_DUPFD_CLOEXEC, 10);
      ASSERT_GE(saved_fd3_, 0);
    }
  }

  void TearDown() override {
    if (notify_fd_ >= 0) close(notify_fd_);
    if (saved_fd3_ >= 0) {
      ASSERT_EQ(dup2(saved_fd3_, 3), 3);
      close(saved_fd3_);
    } else {
      close(3);
    }
    for (const auto& [k, v] : saved_env_) {
      if (v) {
        setenv(k.c_str(), v->c_str(), 1);
      } else {
        unsetenv(k.c_str());
      }
    }
    std::string cmd = "rm -rf '" + dir_ + "'";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }

  // Binds the fake service manager's socket and points NOTIFY_SOCKET at it.
  void ListenForNotifications() {
    notify_fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(notify_fd_, 0);
    const std::string path = dir_ + "/notify";
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(bind(notify_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << strerror(errno);
    setenv("NOTIFY_SOCKET", path.c_str(), 1);
  }

  // The next datagram, or "" after a second without one.
  std::string Receive() {
    pollfd p{notify_fd_, POLLIN, 0};
    if (poll(&p, 1, 1000) != 1) return {};
    char buf[4096];
    ssize_t n = recv(notify_fd_, buf, sizeof buf, 0);
    return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
  }

  // Puts `fd` at fd 3 and announces it as socket activation would.
  void PassAsListenFd(int fd) {
    if (fd != 3) {  // with fd 3 free, socket() or open() returns 3 itself
      ASSERT_EQ(dup2(fd, 3), 3);
      close(fd);
    }
    setenv("LISTEN_FDS", "1", 1);
    setenv("LISTEN_PID", std::to_string(getpid()).c_str(), 1);
  }

  int UnixStreamSocket(bool listening) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    EXPECT_GE(fd, 0);
    const std::string path = dir_ + "/listen.sock";
    unlink(path.c_str());
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << strerror(errno);
    if (listening) EXPECT_EQ(listen(fd, 4), 0);
    return fd;
  }

  std::map<std::string, std::optional<std::string>> saved_env_;
  std::string dir_;
  int notify_fd_ = -1;
  int saved_fd3_ = -1;
};

TEST_F(SystemdTest, NotifyReadySendsReadyAndStatus) {
  ListenForNotifications();
  NotifyReady("x");
  const std::string msg = Receive();
  EXPECT_THAT(msg, HasSubstr("READY=1"));
  EXPECT_THAT(msg, HasSubstr("STATUS=x"));
}

TEST_F(SystemdTest, StatusStoppingAndWatchdogMessages) {
  ListenForNotifications();
  NotifyStatus("loading model\nREADY=1");  // a newline must not forge a second assignment
  EXPECT_EQ(Receive(), "STATUS=loading model READY=1");
  NotifyStopping("draining 3 requests");
  EXPECT_EQ(Receive(), "STOPPING=1\nSTATUS=draining 3 requests");
  NotifyWatchdog();
  EXPECT_EQ(Receive(), "WATCHDOG=1");
}

TEST_F(SystemdTest, WithoutNotifySocketEverythingIsANoOp) {
  NotifyReady("ready");
  NotifyStatus("status");
  NotifyStopping("stopping");
  NotifyWatchdog();
  EXPECT_EQ(WatchdogInterval(), std::nullopt);
  auto fds = ListenFds();
  ASSERT_TRUE(fds.ok()) << fds.status().ToString();
  EXPECT_TRUE(fds->empty());
}

TEST_F(SystemdTest, WatchdogIntervalIsHalfTheDeadline) {
  setenv("WATCHDOG_USEC", "30000000", 1);
  setenv("WATCHDOG_PID", std::to_string(getpid()).c_str(), 1);
  EXPECT_EQ(WatchdogInterval(), std::chrono::microseconds(15000000));
  // Without WATCHDOG_PID the deadline applies to this process too.
  unsetenv("WATCHDOG_PID");
  EXPECT_EQ(WatchdogInterval(), std::chrono::microseconds(15000000));
  // A deadline meant for another process is not ours.
  setenv("WATCHDOG_PID", std::to_string(getpid() + 1).c_str(), 1);
  EXPECT_EQ(WatchdogInterval(), std::nullopt);
  setenv("WATCHDOG_PID", std::to_string(getpid()).c_str(), 1);
  setenv("WATCHDOG_USEC", "0", 1);
  EXPECT_EQ(WatchdogInterval(), std::nullopt);
}

TEST_F(SystemdTest, ListenFdsReturnsAListeningUnixSocket) {
  PassAsListenFd(UnixStreamSocket(/*listening=*/true));
  auto fds = ListenFds();
  ASSERT_TRUE(fds.ok()) << fds.status().ToString();
  EXPECT_EQ(*fds, std::vector<int>{3});
  // Unset so that children do not believe they were activated.
  EXPECT_EQ(std::getenv("LISTEN_FDS"), nullptr);
  EXPECT_EQ(std::getenv("LISTEN_PID"), nullptr);
  EXPECT_NE(fcntl(3, F_GETFD) & FD_CLOEXEC, 0);
}

TEST_F(SystemdTest, ListenFdsForAnotherProcessAreIgnored) {
  PassAsListenFd(UnixStreamSocket(/*listening=*/true));
  setenv("LISTEN_PID", std::to_string(getpid() + 1).c_str(), 1);
  auto fds = ListenFds();
  ASSERT_TRUE(fds.ok()) << fds.status().ToString();
  EXPECT_TRUE(fds->empty());
}

TEST_F(SystemdTest, ListenFdsRejectsANonSocket) {
  int fd = open("/dev/null", O_RDONLY);
  ASSERT_GE(fd, 0);
  PassAsListenFd(fd);
  auto fds = ListenFds();
  ASSERT_FALSE(fds.ok());
  EXPECT_EQ(fds.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(fds.status().message()), HasSubstr("fd 3"));
}

TEST_F(SystemdTest, ListenFdsRejectsANonListeningUnixSocket) {
  PassAsListenFd(UnixStreamSocket(/*listening=*/false));
  auto fds = ListenFds();
  ASSERT_FALSE(fds.ok());
  EXPECT_EQ(fds.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(SystemdTest, ListenFdsRejectsATcpSocket) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(listen(fd, 1), 0);
  PassAsListenFd(fd);
  auto fds = ListenFds();
  ASSERT_FALSE(fds.ok());
  EXPECT_EQ(fds.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(SystemdTest, ListenFdsRejectsAClosedDescriptor) {
  close(3);
  setenv("LISTEN_FDS", "1", 1);
  setenv("LISTEN_PID", std::to_string(getpid()).c_str(), 1);
  auto fds = ListenFds();
  ASSERT_FALSE(fds.ok());
  EXPECT_EQ(fds.status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mnemo::daemon::systemd
