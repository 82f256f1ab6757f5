// mnemod's option parsing: sizes, precedence (flags > file > defaults),
// typed errors that name the option, environment-based defaults, --help.
#include "daemon/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace mnemo::daemon {
namespace {

using ::testing::HasSubstr;

// Clears the variables the defaults read and restores them afterwards, so
// the tests see the same environment under systemd, CI or a shell.
class ConfigTest : public ::testing::Test {
 protected:
  static constexpr const char* kVars[] = {"RUNTIME_DIRECTORY", "STATE_DIRECTORY", "XDG_RUNTIME_DIR",
                                          "XDG_DATA_HOME",     "MNEMO_MODEL",     "HOME"};

  void SetUp() override {
    for (const char* v : kVars) {
      const char* value = std::getenv(v);
      saved_[v] = value ? std::optional<std::string>(value) : std::nullopt;
      unsetenv(v);
    }
    char tmpl[] = "/tmp/mnemo-config-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    for (const auto& [k, v] : saved_) {
      if (v) {
        setenv(k.c_str(), v->c_str(), 1);
      } else {
        unsetenv(k.c_str());
      }
    }
    std::string cmd = "rm -rf '" + dir_ + "'";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }

  static Result<ParsedArgs> Parse(std::vector<std::string> args) {
    args.insert(args.begin(), "mnemod");
    std::vector<const char*> argv;
    for (const auto& a : args) argv.push_back(a.c_str());
    return ParseDaemonArgs(static_cast<int>(argv.size()), argv.data());
  }

  std::string WriteFile(const std::string& name, const std::string& text) {
    std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }

  // Parses a config file holding `text` (and any extra flags).
  Result<ParsedArgs> ParseFile(const std::string& text, std::vector<std::string> flags = {}) {
    flags.insert(flags.begin(), {"--config", WriteFile("mnemod.toml", text)});
    return Parse(flags);
  }

  std::map<std::string, std::optional<std::string>> saved_;
  std::string dir_;
};

// Asserts `r` failed with InvalidArgument and a message containing `needle`.
template <typename T>
void ExpectInvalid(const Result<T>& r, const std::string& needle) {
  ASSERT_FALSE(r.ok()) << "expected an error naming " << needle;
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().ToString();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(needle));
}

// ------------------------------------------------------------------ sizes

TEST(ParseByteSizeTest, AcceptsBytesAndBinaryUnits) {
  const std::pair<const char*, uint64_t> cases[] = {
      {"0", 0},
      {"1024", 1024},
      {"64k", 64ull << 10},
      {"64K", 64ull << 10},
      {"64KB", 64ull << 10},
      {"64kib", 64ull << 10},
      {"512M", 512ull << 20},
      {"512MiB", 512ull << 20},
      {"4G", 4ull << 30},
      {"4gb", 4ull << 30},
      {"1.5GiB", 3ull << 29},
      {"1.5 G", 3ull << 29},
      {" 2T ", 2ull << 40},
      {"1P", 1ull << 50},
      {"0.5k", 512},
      {"0.3k", 307},  // fractions round down to whole bytes
      {"7B", 7},
      {"18446744073709551615", UINT64_MAX},
      {"15.999999999999999999P", (16ull << 50) - 1},
  };
  for (const auto& [text, bytes] : cases) {
    auto r = ParseByteSize(text);
    ASSERT_TRUE(r.ok()) << text << ": " << r.status().ToString();
    EXPECT_EQ(*r, bytes) << text;
  }
}

TEST(ParseByteSizeTest, RejectsNegativeOverflowAndGarbage) {
  for (const char* text : {"", " ", "-1", "-1G", "abc", "G", "1.5", "1.", ".5k", "1e9", "1 2", "4X", "4GG",
                           "4Gi", "4iB", "0x10", "+5", "18446744073709551616", "16384P", "17179869184G",
                           "1.0000000000000000001k", "nan", "inf"}) {
    auto r = ParseByteSize(text);
    EXPECT_FALSE(r.ok()) << "'" << text << "' parsed as " << (r.ok() ? *r : 0);
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    }
  }
}

// --------------------------------------------------------------- defaults

TEST_F(ConfigTest, NoArgumentsGiveTheDocumentedDefaults) {
  auto r = Parse({});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r->exit_now);
  const DaemonConfig& c = r->config;
  const DaemonConfig d;  // the header's defaults
  EXPECT_EQ(c.model_path, DefaultModelPath());
  EXPECT_EQ(c.data_dir, DefaultDataDir());
  EXPECT_EQ(c.socket_path, DefaultSocketPath());
  EXPECT_EQ(c.socket_mode, 0660u);
  EXPECT_EQ(c.config_path, "");
  EXPECT_EQ(c.threads, d.threads);
  EXPECT_EQ(c.page_tokens, 64);
  EXPECT_FALSE(c.page_tokens_given);  // a data directory's own size may replace it
  EXPECT_EQ(c.t0_budget_bytes, 1ull << 30);
  EXPECT_EQ(c.t1_budget_bytes, 4ull << 30);
  EXPECT_EQ(c.t2_budget_bytes, 64ull << 30);
  EXPECT_EQ(c.max_batch, 16);
  EXPECT_EQ(c.step_tokens, 256);
  EXPECT_EQ(c.prefill_chunk, 512);
  EXPECT_EQ(c.default_max_tokens, 512u);
  EXPECT_EQ(c.max_connections, d.max_connections);
  EXPECT_EQ(c.max_frame_bytes, d.max_frame_bytes);
  EXPECT_EQ(c.max_sessions_per_uid, d.max_sessions_per_uid);
  EXPECT_EQ(c.max_context_tokens, d.max_context_tokens);
  EXPECT_EQ(c.max_queued_requests, d.max_queued_requests);
  EXPECT_EQ(c.max_requests_per_connection, d.max_requests_per_connection);
  EXPECT_EQ(c.idle_timeout_s, d.idle_timeout_s);
  EXPECT_EQ(c.shutdown_grace_s, d.shutdown_grace_s);
  EXPECT_EQ(c.metrics_listen, "");
  EXPECT_EQ(c.log_level, "info");
}

TEST_F(ConfigTest, SocketPathDefaults) {
  setenv("RUNTIME_DIRECTORY", "/run/mnemo", 1);
  setenv("XDG_RUNTIME_DIR", "/run/user/1000", 1);
  EXPECT_EQ(DefaultSocketPath(), "/run/mnemo/mnemod.sock");
  // systemd lists several RuntimeDirectory= paths separated by colons.
  setenv("RUNTIME_DIRECTORY", "/run/first:/run/second", 1);
  EXPECT_EQ(DefaultSocketPath(), "/run/first/mnemod.sock");
  unsetenv("RUNTIME_DIRECTORY");
  EXPECT_EQ(DefaultSocketPath(), "/run/user/1000/mnemo/mnemod.sock");
  setenv("XDG_RUNTIME_DIR", "relative/dir", 1);  // XDG says: ignore
  const std::string fallback =
      getuid() == 0 ? "/run/mnemo/mnemod.sock" : "/tmp/mnemo-" + std::to_string(getuid()) + "/mnemod.sock";
  EXPECT_EQ(DefaultSocketPath(), fallback);
  unsetenv("XDG_RUNTIME_DIR");
  EXPECT_EQ(DefaultSocketPath(), fallback);

  setenv("RUNTIME_DIRECTORY", "/run/x", 1);
  auto r = Parse({});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->config.socket_path, "/run/x/mnemod.sock");
}

TEST_F(ConfigTest, DataDirDefaults) {
  setenv("STATE_DIRECTORY", "/var/lib/mnemo:/var/lib/other", 1);
  setenv("XDG_DATA_HOME", "/home/u/.data", 1);
  setenv("HOME", "/home/u", 1);
  EXPECT_EQ(DefaultDataDir(), "/var/lib/mnemo");
  unsetenv("STATE_DIRECTORY");
  EXPECT_EQ(DefaultDataDir(), "/home/u/.data/mnemo");
  unsetenv("XDG_DATA_HOME");
  EXPECT_EQ(DefaultDataDir(), getuid() == 0 ? "/var/lib/mnemo" : "/home/u/.local/share/mnemo");

  setenv("STATE_DIRECTORY", "/srv/state", 1);
  auto r = Parse({});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->config.data_dir, "/srv/state");
}

TEST_F(ConfigTest, ModelDefault) {
  const std::string built_in = DefaultModelPath();
  EXPECT_FALSE(built_in.empty());
  setenv("MNEMO_MODEL", "/models/x.gguf", 1);
  EXPECT_EQ(DefaultModelPath(), "/models/x.gguf");
  auto r = Parse({});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->config.model_path, "/models/x.gguf");
  setenv("MNEMO_MODEL", "", 1);  // empty counts as unset
  EXPECT_EQ(DefaultModelPath(), built_in);
}

// ------------------------------------------------------------------ flags

TEST_F(ConfigTest, EveryFlagSetsItsField) {
  auto r = Parse({"--model", "/m.gguf", "--data-dir", "/d", "--socket", "/s.sock", "--socket-mode", "0600",
                  "--threads", "3", "--page-tokens", "32", "--t0-budget", "512M", "--t0-reserve", "256M",
                  "--t1-budget", "1.5GiB", "--t2-budget", "0", "--max-batch", "8", "--step-tokens", "8", "--prefill-chunk", "256",
                  "--default-max-tokens", "100", "--max-connections", "10", "--max-frame-bytes", "64k",
                  "--max-sessions-per-uid", "5", "--max-context", "8192", "--max-queued", "0",
                  "--max-requests-per-connection", "4", "--idle-timeout", "5m", "--shutdown-grace", "250ms",
                  "--metrics-listen", "127.0.0.1:9464", "--log-level", "debug"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const DaemonConfig& c = r->config;
  EXPECT_EQ(c.model_path, "/m.gguf");
  EXPECT_EQ(c.data_dir, "/d");
  EXPECT_EQ(c.socket_path, "/s.sock");
  EXPECT_EQ(c.socket_mode, 0600u);
  EXPECT_EQ(c.threads, 3);
  EXPECT_EQ(c.page_tokens, 32);
  EXPECT_TRUE(c.page_tokens_given);
  EXPECT_EQ(c.t0_budget_bytes, 512ull << 20);
  EXPECT_EQ(c.t0_reserve_bytes, 256ull << 20);
  EXPECT_EQ(c.t1_budget_bytes, 3ull << 29);
  EXPECT_EQ(c.t2_budget_bytes, 0u);
  EXPECT_EQ(c.max_batch, 8);
  EXPECT_EQ(c.step_tokens, 8);
  EXPECT_EQ(c.prefill_chunk, 256);
  EXPECT_EQ(c.default_max_tokens, 100u);
  EXPECT_EQ(c.max_connections, 10u);
  EXPECT_EQ(c.max_frame_bytes, 65536u);
  EXPECT_EQ(c.max_sessions_per_uid, 5u);
  EXPECT_EQ(c.max_context_tokens, 8192u);
  EXPECT_EQ(c.max_queued_requests, 0u);
  EXPECT_EQ(c.max_requests_per_connection, 4u);
  EXPECT_DOUBLE_EQ(c.idle_timeout_s, 300);
  EXPECT_DOUBLE_EQ(c.shutdown_grace_s, 0.25);
  EXPECT_EQ(c.metrics_listen, "127.0.0.1:9464");
  EXPECT_EQ(c.log_level, "debug");
}

TEST_F(ConfigTest, EqualsFormAndLastRepeatWins) {
  auto r = Parse({"--max-batch=4", "--max-batch", "2", "--metrics-listen=[::1]:0"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->config.max_batch, 2);
  EXPECT_EQ(r->config.metrics_listen, "[::1]:0");
}

struct BadFlag {
  const char* flag;
  const char* value;
};

TEST_F(ConfigTest, EveryMalformedOrOutOfRangeFlagNamesTheFlag) {
  const std::string long_socket = "/tmp/" + std::string(103, 's');  // sun_path holds 107 bytes and a NUL
  const BadFlag cases[] = {
      {"--model", ""},
      {"--data-dir", ""},
      {"--socket", ""},
      {"--socket", long_socket.c_str()},
      {"--socket-mode", "0888"},
      {"--socket-mode", "01777"},
      {"--socket-mode", "rw"},
      {"--threads", "-1"},
      {"--threads", "two"},
      {"--threads", "100000"},
      {"--page-tokens", "0"},
      {"--page-tokens", "512"},
      {"--page-tokens", "16.5"},
      {"--t0-budget", "0"},
      {"--t0-budget", "-1G"},
      {"--t0-budget", "lots"},
      {"--t0-budget", "99999999999P"},
      {"--t0-reserve", "-1"},
      {"--t1-budget", "1.5"},
      {"--t2-budget", "16E"},
      {"--max-batch", "0"},
      {"--max-batch", "257"},
      {"--max-batch", "9999999999999999999999"},
      {"--step-tokens", "0"},
      {"--step-tokens", "x"},
      {"--prefill-chunk", "0"},
      {"--prefill-chunk", "100000"},
      {"--stream-window", "-1"},
      {"--default-max-tokens", "0"},
      {"--max-connections", "0"},
      {"--max-frame-bytes", "1k"},
      {"--max-frame-bytes", "1G"},
      {"--max-sessions-per-uid", "0"},
      {"--max-context", "-5"},
      {"--max-context", "999999999"},
      {"--max-queued", "65537"},
      {"--max-requests-per-connection", "0"},
      {"--idle-timeout", "0"},
      {"--idle-timeout", "-1"},
      {"--idle-timeout", "soon"},
      {"--idle-timeout", "5 fortnights"},
      {"--idle-timeout", "30d"},
      {"--shutdown-grace", "2h"},
      {"--shutdown-grace", "nan"},
      {"--metrics-listen", "9464"},
      {"--metrics-listen", "localhost:9464"},
      {"--metrics-listen", "127.0.0.1:65536"},
      {"--metrics-listen", "127.0.0.1:"},
      {"--metrics-listen", "[::1:9464"},
      {"--log-level", "verbose"},
      {"--log-level", "INFO"},
  };
  for (const auto& [flag, value] : cases) {
    SCOPED_TRACE(std::string(flag) + " " + value);
    ExpectInvalid(Parse({flag, value}), flag);
  }
}

TEST_F(ConfigTest, LongestSocketPathFits) {
  const std::string longest = "/tmp/" + std::string(102, 's');
  auto r = Parse({"--socket", longest});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->config.socket_path, longest);
}

TEST_F(ConfigTest, StepTokensBelowMaxBatchIsRejected) {
  ExpectInvalid(Parse({"--max-batch", "32", "--step-tokens", "16"}), "--step-tokens");
  EXPECT_TRUE(Parse({"--max-batch", "32", "--step-tokens", "32"}).ok());
}

TEST_F(ConfigTest, UnknownFlagsAndStrayArgumentsAreErrors) {
  ExpectInvalid(Parse({"--max-batchh", "4"}), "--max-batchh");
  ExpectInvalid(Parse({"stray"}), "stray");
  ExpectInvalid(Parse({"--max-batch"}), "--max-batch");  // value missing
}

// ---------------------------------------------------------------- --help

TEST_F(ConfigTest, HelpListsEveryOptionWithItsDefault) {
  ::testing::internal::CaptureStdout();
  auto r = Parse({"--help"});
  const std::string out = ::testing::internal::GetCapturedStdout();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->exit_now);
  EXPECT_EQ(r->exit_code, 0);
  for (const char* flag :
       {"--config", "--model", "--data-dir", "--socket", "--socket-mode", "--threads", "--page-tokens",
        "--t0-budget", "--t0-reserve", "--t1-budget", "--t2-budget", "--max-batch", "--step-tokens", "--prefill-chunk", "--stream-window",
        "--default-max-tokens", "--max-connections", "--max-frame-bytes", "--max-sessions-per-uid",
        "--max-context", "--max-queued", "--max-requests-per-connection", "--idle-timeout", "--shutdown-grace",
        "--metrics-listen", "--log-level", "--version", "--help"}) {
    EXPECT_THAT(out, HasSubstr(flag));
  }
  for (const char* shown : {"1G", "4G", "64G", "0660", "600s", "10s", "info", "512"}) {
    EXPECT_THAT(out, HasSubstr(shown));
  }
  EXPECT_THAT(out, HasSubstr(DefaultSocketPath()));
}

TEST_F(ConfigTest, VersionPrintsAndExits) {
  ::testing::internal::CaptureStdout();
  auto r = Parse({"--version"});
  const std::string out = ::testing::internal::GetCapturedStdout();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->exit_now);
  EXPECT_EQ(r->exit_code, 0);
  EXPECT_THAT(out, ::testing::MatchesRegex("[0-9]+\\.[0-9]+\\.[0-9]+\n"));
}

// ------------------------------------------------------------ config file

TEST_F(ConfigTest, FileWinsOverDefaultsAndFlagsWinOverFile) {
  auto r = ParseFile(R"(
    model = "/file/model.gguf"
    t0_budget = "512M"
    max-batch = 8
    step_tokens = 128
    socket_mode = 0o600
    idle_timeout = 30
    shutdown_grace = 2.5
    log_level = "warn"
  )",
                     {"--max-batch", "4", "--log-level", "error"});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const DaemonConfig& c = r->config;
  EXPECT_EQ(c.config_path, dir_ + "/mnemod.toml");
  EXPECT_EQ(c.model_path, "/file/model.gguf");
  EXPECT_EQ(c.t0_budget_bytes, 512ull << 20);
  EXPECT_EQ(c.max_batch, 4);        // flag
  EXPECT_EQ(c.step_tokens, 128);    // file
  EXPECT_EQ(c.prefill_chunk, 512);  // default
  EXPECT_EQ(c.socket_mode, 0600u);
  EXPECT_DOUBLE_EQ(c.idle_timeout_s, 30);
  EXPECT_DOUBLE_EQ(c.shutdown_grace_s, 2.5);
  EXPECT_EQ(c.log_level, "error");
}

TEST_F(ConfigTest, FileAcceptsSectionTables) {
  auto r = ParseFile(R"(
    [paths]
    socket = "/run/x/mnemod.sock"
    socket_mode = "0640"
    [engine]
    t1_budget = 1073741824
    page-tokens = 32
    [scheduling]
    max_batch = 4
    step_tokens = 4
    [limits]
    max_queued = 3
    idle_timeout = "1h"
    [observability]
    metrics_listen = "127.0.0.1:9000"
  )");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const DaemonConfig& c = r->config;
  EXPECT_EQ(c.socket_path, "/run/x/mnemod.sock");
  EXPECT_EQ(c.socket_mode, 0640u);
  EXPECT_EQ(c.t1_budget_bytes, 1ull << 30);
  EXPECT_EQ(c.page_tokens, 32);
  EXPECT_TRUE(c.page_tokens_given);  // from the file, as from the flag
  EXPECT_EQ(c.max_batch, 4);
  EXPECT_EQ(c.max_queued_requests, 3u);
  EXPECT_DOUBLE_EQ(c.idle_timeout_s, 3600);
  EXPECT_EQ(c.metrics_listen, "127.0.0.1:9000");
}

TEST_F(ConfigTest, FileErrorsNameTheKey) {
  const std::pair<const char*, const char*> cases[] = {
      {"max_batchh = 4", "max_batchh"},
      {"[limits]\nmax_batch = 4", "limits.max_batch"},  // wrong section
      {"[tuning]\nmax_batch = 4", "[tuning]"},
      {"max_batch = 4\nmax-batch = 5", "max-batch"},
      {"max_batch = 4\n[scheduling]\nmax_batch = 5", "scheduling.max_batch"},
      {"config = \"/etc/other.toml\"", "config"},
      {"max_batch = 0", "max_batch"},
      {"max_batch = \"many\"", "max_batch"},
      {"max_batch = true", "max_batch"},
      {"max_batch = 1.5", "max_batch"},
      {"max_batch = [1]", "max_batch"},
      {"model = 5", "model"},
      {"model = \"\"", "model"},
      {"t0_budget = -1", "t0_budget"},
      {"t0_budget = \"-1G\"", "t0_budget"},
      {"t0_budget = \"4 apples\"", "t0_budget"},
      {"socket_mode = 660", "socket_mode"},  // decimal 660 is not 0660
      {"idle_timeout = -3", "idle_timeout"},
      {"idle_timeout = \"forever\"", "idle_timeout"},
      {"metrics_listen = \"nowhere\"", "metrics_listen"},
      {"log_level = \"loud\"", "log_level"},
      {"step_tokens = 4", "--step-tokens"},  // below the default max_batch of 16
  };
  for (const auto& [text, needle] : cases) {
    SCOPED_TRACE(text);
    ExpectInvalid(ParseFile(text), needle);
  }
}

TEST_F(ConfigTest, FileSyntaxErrorNamesFileAndLine) {
  auto r = ParseFile("max_batch = 4\nthis is not toml\n");
  ExpectInvalid(r, dir_ + "/mnemod.toml:2");
}

TEST_F(ConfigTest, MissingConfigFileIsNotFound) {
  auto r = Parse({"--config", dir_ + "/absent.toml"});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("absent.toml"));
}

TEST_F(ConfigTest, ConfigThatIsADirectoryIsAnError) {
  auto r = Parse({"--config", dir_});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(dir_));
}

TEST_F(ConfigTest, EmptyFileChangesNothing) {
  auto r = ParseFile("# nothing\n");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->config.max_batch, 16);
}

}  // namespace
}  // namespace mnemo::daemon
