// The files under systemd/: units that systemd-analyze accepts without a
// word, a hardening score that stays low, sysusers/tmpfiles snippets that
// create what the units expect, and an example config and docs that agree
// with mnemod's options.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "daemon/config.h"

namespace mnemo {
namespace {

using ::testing::HasSubstr;

const std::string kSourceDir = MNEMO_SOURCE_DIR;
const std::string kUnitsDir = kSourceDir + "/systemd";

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

CommandResult RunCommand(const std::string& command) {
  CommandResult r;
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string Replace(std::string s, const std::string& from, const std::string& to) {
  for (size_t pos = 0; (pos = s.find(from, pos)) != std::string::npos; pos += to.size())
    s.replace(pos, from.size(), to);
  return s;
}

bool Executable(const std::string& path) { return access(path.c_str(), X_OK) == 0; }

// The value of the first `key=` line of a unit file.
std::string UnitValue(const std::string& unit_text, const std::string& key) {
  std::smatch m;
  if (std::regex_search(unit_text, m, std::regex("(^|\n)" + key + "=([^\n]*)"))) return m[2];
  return {};
}

class UnitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/mnemo-units-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { RunCommand("rm -rf '" + dir_ + "'"); }

  // Writes mnemod.service (ExecStart pointing at the built mnemod, or at a
  // stand-in when it is not built: verify only checks that it exists) and
  // mnemod.socket into dir_; returns the service's path.
  std::string StageUnits(bool with_nvidia_dropin) {
    std::string mnemod = std::string(MNEMO_BINARY_DIR) + "/daemon/mnemod";
    if (!Executable(mnemod)) {
      std::cerr << "note: " << mnemod << " is not built; verifying against a stand-in executable\n";
      mnemod = dir_ + "/mnemod";
      WriteFile(mnemod, "#!/bin/sh\nexit 0\n");
      chmod(mnemod.c_str(), 0755);
    }
    std::string service = ReadFile(kUnitsDir + "/mnemod.service.in");
    service = Replace(service, "@MNEMOD@", mnemod);
    service = Replace(service, "@CONFIG@", kUnitsDir + "/mnemod.toml");
    EXPECT_FALSE(std::regex_search(service, std::regex("@[A-Z_]+@"))) << "unsubstituted placeholder";
    WriteFile(dir_ + "/mnemod.service", service);
    WriteFile(dir_ + "/mnemod.socket", ReadFile(kUnitsDir + "/mnemod.socket"));
    if (with_nvidia_dropin) {
      mkdir((dir_ + "/mnemod.service.d").c_str(), 0755);
      WriteFile(dir_ + "/mnemod.service.d/nvidia.conf", ReadFile(kUnitsDir + "/nvidia.conf"));
    }
    return dir_ + "/mnemod.service";
  }

  // systemd-analyze verify on the staged units. Lines about the host's own
  // units (pulled in as dependencies, e.g. multi-user.target) are not ours
  // to fix; any other line is a finding.
  void ExpectVerifyClean() {
    CommandResult r =
        RunCommand("systemd-analyze verify --man=no '" + dir_ + "/mnemod.service' '" + dir_ + "/mnemod.socket'");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    std::istringstream lines(r.output);
    for (std::string line; std::getline(lines, line);) {
      if (line.empty()) continue;
      const bool host_unit = line.rfind("/lib/", 0) == 0 || line.rfind("/usr/", 0) == 0 ||
                             line.rfind("/etc/", 0) == 0 || line.rfind("/run/", 0) == 0;
      EXPECT_TRUE(host_unit && line.find("mnemo") == std::string::npos) << "systemd-analyze verify: " << line;
    }
  }

  // The exposure score systemd-analyze security gives the staged service.
  double Exposure() {
    CommandResult r = RunCommand("systemd-analyze security --offline=yes '" + dir_ + "/mnemod.service'");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    std::smatch m;
    if (!std::regex_search(r.output, m, std::regex("Overall exposure level for mnemod.service: ([0-9.]+)"))) {
      ADD_FAILURE() << r.output;
      return 100;
    }
    return std::stod(m[1]);
  }

  std::string dir_;
};

bool HaveTool(const char* tool) { return RunCommand(std::string("command -v ") + tool).exit_code == 0; }

#define SKIP_WITHOUT(tool) \
  if (!HaveTool(tool)) GTEST_SKIP() << tool << " is not installed"

TEST_F(UnitsTest, VerifyAcceptsTheUnits) {
  SKIP_WITHOUT("systemd-analyze");
  StageUnits(/*with_nvidia_dropin=*/false);
  ExpectVerifyClean();
}

TEST_F(UnitsTest, VerifyAcceptsTheNvidiaDropIn) {
  SKIP_WITHOUT("systemd-analyze");
  StageUnits(/*with_nvidia_dropin=*/true);
  ExpectVerifyClean();
}

// The check above must be able to fail: a misspelt key is only a warning
// (exit 0), which is why ExpectVerifyClean reads the output.
TEST_F(UnitsTest, VerifyReportsAMisspeltKey) {
  SKIP_WITHOUT("systemd-analyze");
  const std::string service = StageUnits(/*with_nvidia_dropin=*/false);
  WriteFile(service, Replace(ReadFile(service), "NoNewPrivileges=yes", "NoNewPrivilege=yes"));
  CommandResult r = RunCommand("systemd-analyze verify --man=no '" + service + "' '" + dir_ + "/mnemod.socket'");
  EXPECT_THAT(r.output, HasSubstr("NoNewPrivilege"));
}

TEST_F(UnitsTest, HardeningKeepsExposureLow) {
  SKIP_WITHOUT("systemd-analyze");
  StageUnits(/*with_nvidia_dropin=*/false);
  EXPECT_LE(Exposure(), 2.0);
  StageUnits(/*with_nvidia_dropin=*/true);
  EXPECT_LE(Exposure(), 2.0);
}

TEST_F(UnitsTest, SysusersAndTmpfilesCreateWhatTheUnitsExpect) {
  SKIP_WITHOUT("systemd-sysusers");
  SKIP_WITHOUT("systemd-tmpfiles");
  if (geteuid() != 0) GTEST_SKIP() << "creating files owned by another user needs root";
  const std::string root = dir_ + "/root";
  ASSERT_EQ(RunCommand("mkdir -p '" + root + "/etc'").exit_code, 0);
  CommandResult users = RunCommand("systemd-sysusers --root='" + root + "' '" + kUnitsDir + "/mnemo.sysusers.conf'");
  ASSERT_EQ(users.exit_code, 0) << users.output;
  std::smatch m;
  const std::string passwd = ReadFile(root + "/etc/passwd");
  ASSERT_TRUE(std::regex_search(passwd, m, std::regex("(^|\n)mnemo:x:([0-9]+):([0-9]+):[^:]*:/var/lib/mnemo:")))
      << passwd;
  const uid_t uid = static_cast<uid_t>(std::stoul(m[2]));
  const gid_t gid = static_cast<gid_t>(std::stoul(m[3]));
  EXPECT_LT(uid, 1000u) << "a system user";

  CommandResult tmp =
      RunCommand("systemd-tmpfiles --root='" + root + "' --create '" + kUnitsDir + "/mnemo.tmpfiles.conf'");
  ASSERT_EQ(tmp.exit_code, 0) << tmp.output;
  const std::string service = ReadFile(kUnitsDir + "/mnemod.service.in");
  const std::pair<std::string, std::string> dirs[] = {
      {"/run/mnemo", UnitValue(service, "RuntimeDirectoryMode")},
      {"/var/lib/mnemo", UnitValue(service, "StateDirectoryMode")},
  };
  for (const auto& [path, mode] : dirs) {
    struct stat st;
    ASSERT_EQ(stat((root + path).c_str(), &st), 0) << path;
    EXPECT_TRUE(S_ISDIR(st.st_mode)) << path;
    EXPECT_EQ(st.st_uid, uid) << path;
    EXPECT_EQ(st.st_gid, gid) << path;
    // The same mode whether tmpfiles or the service made the directory.
    EXPECT_EQ(st.st_mode & 07777, std::stoul(mode, nullptr, 8)) << path;
  }
}

TEST(UnitFilesTest, SocketUnitAndServiceAgreeOnTheSocket) {
  const std::string socket = ReadFile(kUnitsDir + "/mnemod.socket");
  const std::string listen = UnitValue(socket, "ListenStream");
  EXPECT_EQ(listen, "/run/mnemo/mnemod.sock");
  // Without socket activation mnemod binds $RUNTIME_DIRECTORY/mnemod.sock,
  // which must be the same path.
  const char* saved = std::getenv("RUNTIME_DIRECTORY");
  const std::string saved_value = saved ? saved : "";
  setenv("RUNTIME_DIRECTORY", "/run/mnemo", 1);
  EXPECT_EQ(daemon::DefaultSocketPath(), listen);
  saved ? setenv("RUNTIME_DIRECTORY", saved_value.c_str(), 1) : unsetenv("RUNTIME_DIRECTORY");

  const std::string service = ReadFile(kUnitsDir + "/mnemod.service.in");
  EXPECT_EQ(UnitValue(service, "RuntimeDirectory"), "mnemo");
  EXPECT_EQ(UnitValue(service, "RuntimeDirectoryPreserve"), "yes");
  EXPECT_EQ(UnitValue(socket, "SocketMode"), "0660");
  // systemd's SIGKILL must not cut the drain short.
  EXPECT_GT(std::stod(UnitValue(service, "TimeoutStopSec")), daemon::DaemonConfig{}.shutdown_grace_s);
}

// Every option of `mnemod --help`, as flag names.
std::vector<std::string> DaemonFlags() {
  const char* argv[] = {"mnemod", "--help"};
  ::testing::internal::CaptureStdout();
  auto r = daemon::ParseDaemonArgs(2, argv);
  const std::string help = ::testing::internal::GetCapturedStdout();
  EXPECT_TRUE(r.ok() && r->exit_now);
  std::vector<std::string> flags;
  const std::regex flag_re("--([a-z0-9][a-z0-9-]*)");
  for (auto it = std::sregex_iterator(help.begin(), help.end(), flag_re); it != std::sregex_iterator(); ++it) {
    const std::string f = (*it)[1];
    if (f == "help" || f == "version" || f == "config") continue;
    if (std::find(flags.begin(), flags.end(), f) == flags.end()) flags.push_back(f);
  }
  EXPECT_GE(flags.size(), 20u);
  return flags;
}

TEST(UnitFilesTest, ExampleConfigParsesAndNamesEveryOption) {
  const std::string path = kUnitsDir + "/mnemod.toml";
  const char* argv[] = {"mnemod", "--config", path.c_str()};
  auto r = daemon::ParseDaemonArgs(3, argv);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->config.model_path, "/var/lib/mnemo/models/SmolLM2-135M-Instruct.Q4_1.gguf");

  // Uncommenting any line must give a valid file too.
  const std::string text = ReadFile(path);
  const std::string uncommented = std::regex_replace(text, std::regex("(^|\n)# ([a-z_0-9]+ = )"), "$1$2");
  const std::string copy = "/tmp/mnemo-example-" + std::to_string(getpid()) + ".toml";
  WriteFile(copy, uncommented);
  const char* argv2[] = {"mnemod", "--config", copy.c_str()};
  auto r2 = daemon::ParseDaemonArgs(3, argv2);
  unlink(copy.c_str());
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  EXPECT_EQ(r2->config.socket_path, "/run/mnemo/mnemod.sock");
  EXPECT_EQ(r2->config.metrics_listen, "127.0.0.1:9464");

  for (const std::string& flag : DaemonFlags()) {
    EXPECT_THAT(uncommented, HasSubstr("\n" + Replace(flag, "-", "_") + " = ")) << "mnemod.toml lacks " << flag;
  }
}

TEST(UnitFilesTest, OperationsDocDescribesEveryOption) {
  const std::string doc = ReadFile(kSourceDir + "/docs/operations.md");
  for (const std::string& flag : DaemonFlags()) {
    EXPECT_THAT(doc, HasSubstr("`--" + flag)) << "docs/operations.md lacks --" << flag;
  }
}

}  // namespace
}  // namespace mnemo
