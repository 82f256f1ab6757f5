// End-to-end: the real mnemod binary driven through the real client library
// (and raw sockets for malformed input), on the default model.
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>

#include "kernels/cpu/interleaved.h"
#include "mnemo/client.h"
#include "protocol/messages.h"
#include "tests/testutil/daemon_process.h"

namespace mnemo {
namespace {

using namespace std::chrono_literals;
using client::Client;
using testutil::DaemonProcess;

// Raw protocol access for malformed-input cases.
class RawConn {
 public:
  explicit RawConn(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    ok_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  ~RawConn() { Close(); }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  bool ok() const { return ok_; }
  bool Send(std::string_view bytes) {
    while (!bytes.empty()) {
      const ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      bytes.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }
  // Reads responses until one is terminal for `id` (or any error with id 0
  // when id is 0), EOF, or the timeout. Sets *eof when the daemon closed.
  std::vector<protocol::Response> ReadUntil(uint64_t id, bool* eof, std::chrono::milliseconds timeout = 30s) {
    std::vector<protocol::Response> out;
    *eof = false;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      for (;;) {
        auto next = decoder_.Next();
        if (!next.ok() || !next->has_value()) break;
        auto r = protocol::ParseResponse((*next)->frame);
        if (!r.ok()) break;
        out.push_back(*r);
        const bool terminal = !std::holds_alternative<protocol::TokenChunk>(r->body) &&
                              !std::holds_alternative<protocol::PrefillProgress>(r->body);
        if (terminal && r->id == id) return out;
      }
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      char buf[65536];
      const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) {
        *eof = true;
        return out;
      }
      decoder_.Feed(std::string_view(buf, static_cast<size_t>(n)));
    }
    return out;
  }

 private:
  int fd_ = -1;
  bool ok_ = false;
  protocol::FrameDecoder decoder_{protocol::DecoderLimits{.max_frame_bytes = 64u << 20}};
};

std::optional<StatusCode> ErrorOf(const std::vector<protocol::Response>& rs, uint64_t id) {
  for (const auto& r : rs)
    if (r.id == id)
      if (auto* e = std::get_if<protocol::ErrorReply>(&r.body)) return e->code;
  return std::nullopt;
}

client::GenerateRequest Chat(std::string session, std::string text, uint32_t max_tokens) {
  client::GenerateRequest g;
  g.session = std::move(session);
  g.messages = {{"user", std::move(text)}};
  g.max_tokens = max_tokens;
  g.sampling.temperature = 0;
  return g;
}

// Raw text keeps the small model writing (no end-of-turn marker to emit).
client::GenerateRequest Story(std::string session, uint32_t max_tokens) {
  client::GenerateRequest g;
  g.session = std::move(session);
  g.text = "Once upon a time, in a kingdom far away, there lived";
  g.max_tokens = max_tokens;
  g.sampling.temperature = 0;
  return g;
}

class DaemonE2ETest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(testutil::MnemodPath())) GTEST_SKIP() << "mnemod not built";
    if (!std::filesystem::exists(testutil::DefaultModelPath()))
      GTEST_SKIP() << "default model not fetched (scripts/fetch-model): " << testutil::DefaultModelPath();
  }
  void StartDaemon(std::vector<std::string> args = {}) {
    ASSERT_TRUE(d_.Start(args)) << d_.error();
  }
  Client Connect() {
    client::ConnectOptions o;
    o.socket_path = d_.socket_path();
    auto c = Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    if (!c.ok()) std::abort();
    return std::move(c).value();
  }
  // Another client still gets full service.
  void ExpectOthersServed() {
    Client c = Connect();
    auto h = c.Health();
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    EXPECT_EQ(h->status, client::HealthStatus::kServing);
    const std::string name = "probe" + std::to_string(probe_++);
    ASSERT_TRUE(c.CreateSession(name).ok());
    auto r = c.GenerateText(Chat(name, "Say hi.", 4));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_GT(r->done.generated_tokens, 0u);
  }
  void TearDown() override {
    if (HasFailure()) fprintf(stderr, "---- mnemod log ----\n%s\n", d_.log().c_str());
  }

  DaemonProcess d_;
  int probe_ = 0;
};

TEST_F(DaemonE2ETest, ReadyOnlyAfterModelLoadAndHelloReportsTheModel) {
  StartDaemon();
  // READY=1 came: the socket must already accept and the model be loaded.
  Client c = Connect();
  EXPECT_EQ(c.hello().protocol_version, protocol::kProtocolVersion);
  EXPECT_FALSE(c.hello().model_name.empty());
  EXPECT_EQ(c.hello().context_limit, 8192u);
  // mnemod's default arithmetic: fast where the CPU has AVX-512 VNNI.
  EXPECT_EQ(c.hello().math, kernels::cpu::CpuHasAvx512Vnni() ? "fast" : "exact");
  auto h = c.Health();
  ASSERT_TRUE(h.ok());
  EXPECT_TRUE(h->model_loaded);
  bool saw_status = false;
  for (const auto& n : d_.notifications()) saw_status |= n.find("STATUS=") != std::string::npos;
  EXPECT_TRUE(saw_status);
  // Socket mode 0660 by default.
  struct stat st;
  ASSERT_EQ(::stat(d_.socket_path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  // SIGTERM: STOPPING=1, exit 0, socket removed.
  EXPECT_EQ(d_.Stop(SIGTERM), 0);
  EXPECT_TRUE(d_.WaitNotify("STOPPING=1", 1s));
  EXPECT_FALSE(std::filesystem::exists(d_.socket_path()));
}

TEST_F(DaemonE2ETest, NoReadyWhenTheModelCannotLoad) {
  const std::string bad = d_.dir() + "/truncated.gguf";
  FILE* f = fopen(bad.c_str(), "wb");
  fwrite("GGUF\x03\x00\x00\x00", 1, 8, f);
  fclose(f);
  ASSERT_TRUE(d_.Spawn({testutil::MnemodPath(), "--model", bad, "--socket", d_.socket_path(), "--data-dir",
                        d_.data_dir()}));
  EXPECT_FALSE(d_.WaitNotify("READY=1", 20s));
  const int st = d_.Wait(20s);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) != 0) << st;
  EXPECT_NE(d_.log().find("truncated.gguf"), std::string::npos) << d_.log();
  EXPECT_FALSE(std::filesystem::exists(d_.socket_path()));
}

TEST_F(DaemonE2ETest, StreamingChatAndMultiTurnPrefillsOnlyNewTokens) {
  StartDaemon();
  Client c = Connect();
  ASSERT_TRUE(c.CreateSession("agent").ok());
  std::string streamed;
  int chunks = 0;
  client::Callbacks cb;
  cb.on_chunk = [&](const client::TokenChunk& ch) {
    streamed += ch.text;
    ++chunks;
    return true;
  };
  auto d1 = c.Generate(Chat("agent", "Give me three tips for better sleep.", 48), cb);
  ASSERT_TRUE(d1.ok()) << d1.status().ToString();
  EXPECT_GT(chunks, 1);
  EXPECT_FALSE(streamed.empty());
  EXPECT_GT(d1->prompt_tokens, 20u);  // system prompt + message
  EXPECT_GT(d1->ttft_ms, 0);
  auto info1 = c.GetSession("agent");
  ASSERT_TRUE(info1.ok());

  auto d2 = c.GenerateText(Chat("agent", "Thanks!", 16));
  ASSERT_TRUE(d2.ok()) << d2.status().ToString();
  // Only the new message is prefilled, not the history.
  EXPECT_LT(d2->done.prompt_tokens, 20u);
  EXPECT_LT(d2->done.prompt_tokens, info1->tokens);
  auto info2 = c.GetSession("agent");
  ASSERT_TRUE(info2.ok());
  EXPECT_EQ(info2->turns, 2u);
  EXPECT_GT(info2->tokens, info1->tokens);
}

TEST_F(DaemonE2ETest, SixteenConcurrentClientsGetTheirAloneOutput) {
  StartDaemon();
  const std::vector<std::string> prompts = {"What is the capital of France?", "Name three colors.",
                                            "Write a haiku about the sea.", "What is 7 times 8?"};
  std::vector<std::vector<int32_t>> alone(prompts.size());
  {
    Client c = Connect();
    for (size_t i = 0; i < prompts.size(); ++i) {
      ASSERT_TRUE(c.CreateSession("alone" + std::to_string(i)).ok());
      auto r = c.GenerateText(Chat("alone" + std::to_string(i), prompts[i], 24));
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      alone[i] = r->token_ids;
    }
  }
  std::vector<std::thread> ts;
  std::vector<std::vector<int32_t>> got(16);
  std::atomic<int> failures{0};
  for (int k = 0; k < 16; ++k) {
    ts.emplace_back([&, k] {
      client::ConnectOptions o;
      o.socket_path = d_.socket_path();
      auto c = Client::Connect(o);
      if (!c.ok()) return (void)++failures;
      const std::string name = "c" + std::to_string(k);
      if (!c->CreateSession(name).ok()) return (void)++failures;
      auto r = c->GenerateText(Chat(name, prompts[k % prompts.size()], 24));
      if (!r.ok()) return (void)++failures;
      got[k] = r->token_ids;
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(failures.load(), 0);
  for (int k = 0; k < 16; ++k) EXPECT_EQ(got[k], alone[k % prompts.size()]) << "client " << k;
  Client c = Connect();
  auto st = c.Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_GE(st->generated_tokens_total, 16u * 10);
  EXPECT_GT(st->ttft_ms_p50, 0);
}

TEST_F(DaemonE2ETest, CancelMidStream) {
  StartDaemon();
  Client c = Connect();
  ASSERT_TRUE(c.CreateSession("s").ok());
  auto stream = c.StartGenerate(Story("s", 2000));
  ASSERT_TRUE(stream.ok());
  int chunks = 0;
  while (chunks < 3) {
    auto ev = stream->Next();
    ASSERT_TRUE(ev.ok()) << ev.status().ToString();
    if (std::holds_alternative<client::TokenChunk>(*ev)) ++chunks;
    ASSERT_FALSE(std::holds_alternative<client::Done>(*ev));
  }
  ASSERT_TRUE(stream->Cancel().ok());
  for (;;) {
    auto ev = stream->Next();
    if (!ev.ok()) {
      EXPECT_EQ(ev.status().code(), StatusCode::kCancelled) << ev.status().ToString();
      break;
    }
    if (auto* d = std::get_if<client::Done>(&*ev)) {
      EXPECT_EQ(d->finish_reason, client::FinishReason::kCancelled);
      EXPECT_LT(d->generated_tokens, 2000u);
      break;
    }
  }
  // The session continues.
  auto r = c.GenerateText(Chat("s", "Hello", 4));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
}

TEST_F(DaemonE2ETest, ClientDisconnectMidStreamFreesTheRequest) {
  StartDaemon();
  {
    Client c = Connect();
    ASSERT_TRUE(c.CreateSession("s").ok());
  }
  RawConn raw(d_.socket_path());
  ASSERT_TRUE(raw.ok());
  protocol::GenerateRequest g = Story("s", 5000);
  ASSERT_TRUE(raw.Send(protocol::EncodeRequest(1, g)));
  bool eof = false;
  // Wait for the first chunks, then vanish.
  auto rs = raw.ReadUntil(99, &eof, 3s);
  ASSERT_FALSE(rs.empty());
  raw.Close();
  Client c = Connect();
  bool idle = false;
  for (int i = 0; i < 200 && !idle; ++i) {
    auto st = c.Stats();
    ASSERT_TRUE(st.ok());
    idle = st->requests_running == 0 && st->requests_waiting == 0;
    if (!idle) std::this_thread::sleep_for(50ms);
  }
  EXPECT_TRUE(idle) << "the abandoned generation still runs";
  // The session is free again.
  auto r = c.GenerateText(Chat("s", "Hi", 4));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
}

TEST_F(DaemonE2ETest, MalformedFramesGetErrorsAndDisturbNoOne) {
  StartDaemon({"--max-frame-bytes", "65536"});
  // A concurrent generation on another connection must run to the end.
  Client bystander = Connect();
  ASSERT_TRUE(bystander.CreateSession("b").ok());
  auto stream = bystander.StartGenerate(Story("b", 64));
  ASSERT_TRUE(stream.ok());

  struct Case {
    const char* name;
    std::string bytes;
    bool closes;
  };
  std::vector<Case> cases;
  cases.push_back({"garbage", std::string("\x10\x00\x00\x00garbage-garbage!", 20), true});
  {
    std::string f = protocol::EncodeRequest(5, protocol::HealthRequest{});
    f.resize(f.size() - 3);  // truncated, then the client goes away
    cases.push_back({"truncated", f, false});
  }
  cases.push_back({"oversize length", std::string("\xff\xff\xff\x7f", 4), true});
  cases.push_back({"zero length", std::string("\x00\x00\x00\x00", 4), true});
  {
    // A verified frame whose union type this daemon does not know.
    flatbuffers::FlatBufferBuilder fbb;
    auto body = protocol::wire::CreateHealth(fbb);
    auto frame = protocol::wire::CreateFrame(fbb, 7, static_cast<protocol::wire::Message>(200), body.Union());
    protocol::wire::FinishFrameBuffer(fbb, frame);
    cases.push_back({"unknown message type", protocol::EncodeFrame(fbb), false});
  }
  {
    protocol::GenerateRequest g = Chat("b", "x", 4);
    g.sampling.temperature = -3;
    cases.push_back({"bad field value", protocol::EncodeRequest(8, g), false});
  }
  {
    protocol::GenerateRequest g = Chat("../etc", "x", 4);
    cases.push_back({"bad session name", protocol::EncodeRequest(9, g), false});
  }
  cases.push_back({"request id 0", protocol::EncodeRequest(0, protocol::HealthRequest{}), false});
  cases.push_back({"a response sent as request", protocol::EncodeResponse(10, protocol::Ack{}), false});
  cases.push_back({"frame over the limit",
                   protocol::EncodeRequest(11, Chat("b", std::string(100000, 'a'), 4)), true});

  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    RawConn raw(d_.socket_path());
    ASSERT_TRUE(raw.ok());
    ASSERT_TRUE(raw.Send(k.bytes));
    if (std::string(k.name) == "truncated") {
      raw.Close();
    } else {
      // Follow with a valid request: on a surviving connection it is served.
      raw.Send(protocol::EncodeRequest(77, protocol::HealthRequest{}));
      bool eof = false;
      auto rs = raw.ReadUntil(77, &eof, 10s);
      bool any_error = false;
      for (const auto& r : rs) any_error |= std::holds_alternative<protocol::ErrorReply>(r.body);
      EXPECT_TRUE(any_error) << "no error reply";
      bool served = false;
      for (const auto& r : rs) served |= r.id == 77 && std::holds_alternative<protocol::HealthReply>(r.body);
      if (k.closes) {
        EXPECT_TRUE(eof || !served) << "connection should be closed";
      } else {
        EXPECT_TRUE(served) << "connection should survive";
      }
    }
    ExpectOthersServed();
  }
  // The bystander's stream completed normally.
  for (;;) {
    auto ev = stream->Next();
    ASSERT_TRUE(ev.ok()) << ev.status().ToString();
    if (auto* d = std::get_if<client::Done>(&*ev)) {
      EXPECT_EQ(d->finish_reason, client::FinishReason::kLength);
      break;
    }
  }
  EXPECT_TRUE(d_.running());
}

TEST_F(DaemonE2ETest, TwoUidsCannotSeeEachOthersSessions) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run a client under another uid";
  if (!std::filesystem::exists(testutil::MnemoCliPath())) GTEST_SKIP() << "mnemo CLI not built";
  StartDaemon({"--socket-mode", "0666"});
  Client c = Connect();
  ASSERT_TRUE(c.CreateSession("secret").ok());
  ASSERT_TRUE(c.GenerateText(Chat("secret", "Remember the word apple.", 4)).ok());

  // Runs the CLI as uid/gid 65534 and returns (exit status, stdout).
  auto run_as_nobody = [&](std::vector<std::string> args) {
    int pipefd[2];
    EXPECT_EQ(::pipe(pipefd), 0);
    std::vector<std::string> full = {testutil::MnemoCliPath(), "--socket", d_.socket_path()};
    full.insert(full.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : full) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::dup2(pipefd[1], 1);
      ::dup2(pipefd[1], 2);
      ::close(pipefd[0]);
      if (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0) _exit(99);
      char* envp[] = {const_cast<char*>("HOME=/"), nullptr};
      ::execve(argv[0], argv.data(), envp);
      _exit(98);
    }
    ::close(pipefd[1]);
    std::string out;
    char buf[4096];
    ssize_t n;
    while ((n = ::read(pipefd[0], buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
    ::close(pipefd[0]);
    int st = 0;
    ::waitpid(pid, &st, 0);
    return std::make_pair(st, out);
  };
  auto [st_list, list] = run_as_nobody({"--json", "sessions"});
  EXPECT_EQ(st_list, 0) << list;
  EXPECT_EQ(list.find("secret"), std::string::npos) << list;
  for (auto args : std::vector<std::vector<std::string>>{
           {"show", "secret"}, {"rm", "secret"}, {"fork", "secret", "mine"}, {"gen", "--raw", "secret", "x"}}) {
    // gen creates a session of its own named "secret" for uid 65534: that is
    // allowed and must not touch root's.
    auto [st, out] = run_as_nobody(args);
    if (args[0] == "gen") continue;
    EXPECT_NE(st, 0) << out;
    EXPECT_NE(out.find("NotFound"), std::string::npos) << args[0] << ": " << out;
  }
  // Root's session is intact and private.
  auto info = c.GetSession("secret");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->turns, 1u);
  auto mine = c.ListSessions();
  ASSERT_TRUE(mine.ok());
  EXPECT_EQ(mine->size(), 1u);
}

TEST_F(DaemonE2ETest, LimitsAreTypedErrorsAndOthersKeepBeingServed) {
  StartDaemon({"--max-connections", "4", "--max-sessions-per-uid", "3", "--max-context", "256",
               "--max-batch", "1", "--max-queued", "1", "--max-requests-per-connection", "2"});
  Client a = Connect();
  // Sessions per uid.
  ASSERT_TRUE(a.CreateSession("s1").ok());
  ASSERT_TRUE(a.CreateSession("s2").ok());
  ASSERT_TRUE(a.CreateSession("s3").ok());
  auto over = a.CreateSession("s4");
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), StatusCode::kResourceExhausted);
  // Context tokens per session.
  std::string long_msg;
  for (int i = 0; i < 100; ++i) long_msg += "word number " + std::to_string(i) + ", ";
  auto too_long = a.GenerateText(Chat("s1", long_msg, 4));
  ASSERT_FALSE(too_long.ok());
  EXPECT_EQ(too_long.status().code(), StatusCode::kOutOfRange) << too_long.status().ToString();
  // Queued requests: one runs, one waits, the third is refused.
  auto g1 = a.StartGenerate(Story("s1", 3000));
  ASSERT_TRUE(g1.ok());
  auto first = g1->Next();  // running
  ASSERT_TRUE(first.ok());
  Client b = Connect();
  auto g2 = b.StartGenerate(Story("s2", 8));
  ASSERT_TRUE(g2.ok());
  std::this_thread::sleep_for(200ms);
  Client c2 = Connect();
  auto g3 = c2.GenerateText(Story("s3", 8));
  ASSERT_FALSE(g3.ok());
  EXPECT_EQ(g3.status().code(), StatusCode::kResourceExhausted) << g3.status().ToString();
  // Requests per connection: a has g1 in flight; two more exceed 2.
  auto h1 = a.StartGenerate(Story("s2", 8));  // s2 busy -> error, but counts while in flight
  (void)h1;
  // Connections: a, b, c2 open; the fourth is fine, the fifth refused.
  Client d = Connect();
  client::ConnectOptions o;
  o.socket_path = d_.socket_path();
  auto e = Client::Connect(o);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kResourceExhausted) << e.status().ToString();
  d.Close();
  ASSERT_TRUE(g1->Cancel().ok());
  for (;;) {
    auto ev = g1->Next();
    if (!ev.ok() || std::holds_alternative<client::Done>(*ev)) break;
  }
  for (;;) {
    auto ev = g2->Next();
    ASSERT_TRUE(ev.ok()) << ev.status().ToString();
    if (std::holds_alternative<client::Done>(*ev)) break;
  }
  // After the limits were hit, everyone is served again.
  std::this_thread::sleep_for(100ms);
  auto h = c2.Health();
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  auto ok = c2.GenerateText(Story("s3", 4));
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
}

TEST_F(DaemonE2ETest, RequestsPerConnectionLimit) {
  StartDaemon({"--max-requests-per-connection", "2"});
  Client a = Connect();
  for (const char* n : {"x", "y", "z"}) ASSERT_TRUE(a.CreateSession(n).ok());
  auto s1 = a.StartGenerate(Story("x", 2000));
  auto s2 = a.StartGenerate(Story("y", 2000));
  ASSERT_TRUE(s1.ok() && s2.ok());
  auto s3 = a.GenerateText(Story("z", 4));
  ASSERT_FALSE(s3.ok());
  EXPECT_EQ(s3.status().code(), StatusCode::kResourceExhausted) << s3.status().ToString();
  ASSERT_TRUE(s1->Cancel().ok());
  ASSERT_TRUE(s2->Cancel().ok());
}

TEST_F(DaemonE2ETest, IdleConnectionsAreClosed) {
  StartDaemon({"--idle-timeout", "1s"});
  Client a = Connect();
  ASSERT_TRUE(a.Health().ok());
  std::this_thread::sleep_for(2500ms);
  auto h = a.Health();
  ASSERT_FALSE(h.ok());
  EXPECT_TRUE(h.status().code() == StatusCode::kUnavailable ||
              h.status().code() == StatusCode::kResourceExhausted)
      << h.status().ToString();
  ExpectOthersServed();
}

// Runs the mnemo CLI against `socket` as this user; (exit status, stdout).
std::pair<int, std::string> RunCli(const std::string& socket, const std::string& args) {
  const std::string cmd = "'" + testutil::MnemoCliPath() + "' --socket '" + socket + "' " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return {-1, ""};
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  return {::pclose(p), out};
}

const protocol::TierUsage* TierOf(const client::StatsReply& s, const std::string& tier) {
  for (const auto& t : s.tiers)
    if (t.tier == tier) return &t;
  return nullptr;
}

const protocol::IoLatency* OpOf(const protocol::TierUsage& t, const std::string& op) {
  for (const auto& h : t.io_latency)
    if (h.op == op) return &h;
  return nullptr;
}

TEST_F(DaemonE2ETest, TierStatsAfterPersistRestartAndResume) {
  if (!std::filesystem::exists(testutil::MnemoCliPath())) GTEST_SKIP() << "mnemo CLI not built";
  StartDaemon();
  {
    Client c = Connect();
    ASSERT_TRUE(c.CreateSession("obs").ok());
    auto r = c.GenerateText(Chat("obs", "Tell me about the sea.", 8));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_TRUE(r->done.persisted);
    auto st = c.Stats();
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    const protocol::TierUsage* t2 = TierOf(*st, "T2");
    ASSERT_NE(t2, nullptr);
    EXPECT_GT(t2->bytes_written, 0u);
    ASSERT_NE(OpOf(*t2, "write"), nullptr);
    EXPECT_GT(OpOf(*t2, "write")->count, 0u);
    ASSERT_NE(OpOf(*t2, "sync"), nullptr);
    EXPECT_GT(OpOf(*t2, "sync")->count, 0u);
  }
  ASSERT_EQ(d_.Stop(SIGTERM), 0);
  StartDaemon();  // same data directory: the session's KV is only on T2
  Client c = Connect();
  auto before = c.GetSession("obs");
  ASSERT_TRUE(before.ok()) << before.status().ToString();
  EXPECT_EQ(before->t0_pages, 0u);
  EXPECT_GT(before->t2_pages, 0u);
  auto r = c.GenerateText(Chat("obs", "And the mountains?", 4));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto st = c.Stats();
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  const protocol::TierUsage* t0 = TierOf(*st, "T0");
  const protocol::TierUsage* t2 = TierOf(*st, "T2");
  ASSERT_NE(t0, nullptr);
  ASSERT_NE(t2, nullptr);
  EXPECT_EQ(t0->misses, 1u) << "the resumed request found its KV only on T2";
  EXPECT_EQ(t0->hits, 0u);
  // Resumed alone, it computed on its pages as they loaded: each page was
  // ready when its layer came (hit) or waited for (stall).
  EXPECT_EQ(t0->prefetch_hits + t0->prefetch_stalls, before->t2_pages) << "every loaded page counted once";
  EXPECT_EQ(t0->prefetch_stalls > 0, t0->prefetch_stall_s > 0);
  EXPECT_GT(t0->bytes_written, 0u);
  EXPECT_GT(t2->bytes_read, 0u);
  EXPECT_GT(t2->budget_bytes, 0u);
  EXPECT_GT(t2->pages, 0u);
  const protocol::IoLatency* reads = OpOf(*t2, "read");
  ASSERT_NE(reads, nullptr);
  EXPECT_GT(reads->count, 0u);
  uint64_t in_buckets = 0;
  for (uint64_t n : reads->bucket_counts) in_buckets += n;
  EXPECT_EQ(in_buckets, reads->count);
  EXPECT_GT(reads->max_s, 0);
  EXPECT_GT(reads->QuantileS(0.5), 0);

  // The CLI shows the same: human, JSON and Prometheus text.
  auto [rc_prom, prom] = RunCli(d_.socket_path(), "stats --prometheus");
  EXPECT_EQ(rc_prom, 0) << prom;
  for (const char* series : {
           "mnemo_tier_io_seconds_bucket{op=\"read\",tier=\"T2\",le=\"+Inf\"} ",
           "mnemo_tier_io_seconds_count{op=\"write\",tier=\"T2\"} ",
           "mnemo_tier_io_seconds_count{op=\"sync\",tier=\"T2\"} ",
           "mnemo_tier_misses_total{tier=\"T0\"} 1",
           "mnemo_tier_hits_total{tier=\"T1\"} ",
           "mnemo_tier_read_bytes_total{tier=\"T2\"} ",
           "mnemo_tier_written_bytes_total{tier=\"T2\"} ",
           "mnemo_prefetch_stalls_total{tier=\"T0\"} ",
           "mnemo_prefetch_stall_seconds_total{tier=\"T0\"} ",
           "mnemo_kv_budget_bytes{tier=\"T2\"} ",
       }) {
    EXPECT_NE(prom.find(series), std::string::npos) << series << " missing from:\n" << prom;
  }
  EXPECT_EQ(prom.find("mnemo_tier_read_bytes_total{tier=\"T2\"} 0\n"), std::string::npos);
  auto [rc_human, human] = RunCli(d_.socket_path(), "stats");
  EXPECT_EQ(rc_human, 0) << human;
  for (const char* part : {"tier T0", "tier T2", "prefetch", "read ", "misses"})
    EXPECT_NE(human.find(part), std::string::npos) << part << " missing from:\n" << human;
  auto [rc_json, js] = RunCli(d_.socket_path(), "--json stats");
  EXPECT_EQ(rc_json, 0) << js;
  for (const char* key : {"\"prefetch_stall_s\"", "\"io_latency\"", "\"bucket_counts\"", "\"p99_s\""})
    EXPECT_NE(js.find(key), std::string::npos) << key << " missing from:\n" << js;
  // mnemo show: the session's pages per tier, now loaded into T0.
  auto [rc_show, show] = RunCli(d_.socket_path(), "show obs");
  EXPECT_EQ(rc_show, 0) << show;
  EXPECT_NE(show.find("pages:      T0 "), std::string::npos) << show;
  auto after = c.GetSession("obs");
  ASSERT_TRUE(after.ok());
  EXPECT_GT(after->t0_pages, 0u);
  EXPECT_GT(after->t2_pages, 0u);
  EXPECT_NE(show.find("T0 " + std::to_string(after->t0_pages) + " "), std::string::npos) << show;
}

TEST_F(DaemonE2ETest, ForkSharesHistory) {
  StartDaemon();
  Client c = Connect();
  ASSERT_TRUE(c.CreateSession("root").ok());
  ASSERT_TRUE(c.GenerateText(Chat("root", "My name is Ada. Remember it.", 16)).ok());
  auto f = c.ForkSession("root", "branch");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  auto r = c.GetSession("root");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(f->tokens, r->tokens);
  EXPECT_EQ(f->parent, "root");
  EXPECT_EQ(f->kv_pages, r->kv_pages);
  // Same greedy continuation from both, each prefilling only the new message.
  auto a = c.GenerateText(Chat("root", "What is my name?", 12));
  auto b = c.GenerateText(Chat("branch", "What is my name?", 12));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->token_ids, b->token_ids);
  EXPECT_EQ(a->done.prompt_tokens, b->done.prompt_tokens);
  EXPECT_LT(b->done.prompt_tokens, 20u);
  ASSERT_TRUE(c.DeleteSession("root").ok());
  EXPECT_TRUE(c.GetSession("branch").ok());
  EXPECT_EQ(c.GetSession("root").status().code(), StatusCode::kNotFound);
}

TEST_F(DaemonE2ETest, SigtermDuringGenerationDrainsAndExitsZero) {
  StartDaemon({"--shutdown-grace", "500ms"});
  Client c = Connect();
  ASSERT_TRUE(c.CreateSession("s").ok());
  auto stream = c.StartGenerate(Story("s", 5000));
  ASSERT_TRUE(stream.ok());
  for (int chunks = 0; chunks < 3;) {
    auto ev = stream->Next();
    ASSERT_TRUE(ev.ok());
    chunks += std::holds_alternative<client::TokenChunk>(*ev);
  }
  ::kill(d_.pid(), SIGTERM);
  bool ended = false;
  for (;;) {
    auto ev = stream->Next();
    if (!ev.ok()) {
      EXPECT_EQ(ev.status().code(), StatusCode::kUnavailable) << ev.status().ToString();
      EXPECT_NE(ev.status().message().find("shutting down"), std::string::npos) << ev.status().ToString();
      ended = true;
      break;
    }
    if (std::holds_alternative<client::Done>(*ev)) {
      ended = true;
      break;
    }
  }
  EXPECT_TRUE(ended);
  const int st = d_.Wait(30s);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << st;
}

TEST_F(DaemonE2ETest, StaleSocketIsReplacedAndALiveDaemonIsRefused) {
  // A socket file left by a dead process.
  {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    strncpy(addr.sun_path, d_.socket_path().c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ::close(fd);
  }
  StartDaemon();
  ASSERT_TRUE(Connect().Health().ok());
  // A second daemon on the same socket is refused, and so is one on the
  // same data directory.
  DaemonProcess second;
  ASSERT_TRUE(second.Spawn({testutil::MnemodPath(), "--model", testutil::DefaultModelPath(), "--socket",
                            d_.socket_path(), "--data-dir", second.data_dir()}));
  int st = second.Wait(60s);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) != 0);
  EXPECT_NE(second.log().find("already serving"), std::string::npos) << second.log();
  DaemonProcess third;
  ASSERT_TRUE(third.Spawn({testutil::MnemodPath(), "--model", testutil::DefaultModelPath(), "--socket",
                           third.socket_path(), "--data-dir", d_.data_dir()}));
  st = third.Wait(60s);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) != 0);
  EXPECT_NE(third.log().find("data directory"), std::string::npos) << third.log();
  // The first one is unaffected.
  ExpectOthersServed();
}

TEST_F(DaemonE2ETest, SocketActivationBySystemdSocketActivate) {
  const char* activate = "/usr/bin/systemd-socket-activate";
  if (!std::filesystem::exists(activate)) GTEST_SKIP() << "systemd-socket-activate not installed";
  ASSERT_TRUE(d_.Spawn({activate, "-l", d_.socket_path(), testutil::MnemodPath(), "--model",
                        testutil::DefaultModelPath(), "--data-dir", d_.data_dir(), "--threads", "2",
                        "--socket", d_.dir() + "/unused.sock"}));
  // systemd-socket-activate listens first; mnemod starts on the first
  // connection and takes the socket over.
  for (int i = 0; i < 200 && !std::filesystem::exists(d_.socket_path()); ++i) std::this_thread::sleep_for(20ms);
  client::ConnectOptions o;
  o.socket_path = d_.socket_path();
  o.connect_timeout = 60s;
  auto c = Client::Connect(o);
  ASSERT_TRUE(c.ok()) << c.status().ToString() << "\n" << d_.log();
  ASSERT_TRUE(c->CreateSession("act").ok());
  auto r = c->GenerateText(Chat("act", "Say hello.", 8));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_GT(r->done.generated_tokens, 0u);
  EXPECT_FALSE(std::filesystem::exists(d_.dir() + "/unused.sock")) << "bound its own socket";
  EXPECT_NE(d_.log().find("socket passed by systemd"), std::string::npos) << d_.log();
}

}  // namespace
}  // namespace mnemo
