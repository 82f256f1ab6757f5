// The client against a scripted fake mnemod: a server thread in the test that
// listens on a temporary Unix socket, decodes the client's frames and answers
// with whatever each test scripts, including malformed bytes and dropped
// connections.
#include "mnemo/client.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "protocol/messages.h"

namespace mnemo::client {
namespace {

using namespace std::chrono_literals;
using protocol::Ack;
using protocol::ErrorReply;
using protocol::Request;

constexpr int kServerTimeoutMs = 5000;

// The server side of one accepted connection. Confined to the server thread.
class Peer {
 public:
  explicit Peer(int fd) : fd_(fd) {}
  ~Peer() { Close(); }

  // The next request, or an error after kServerTimeoutMs / EOF / bad frame.
  Result<Request> Read() {
    for (;;) {
      auto next = decoder_.Next();
      if (!next.ok()) return next.status();
      if (next->has_value()) return protocol::ParseRequest((*next)->frame);
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, kServerTimeoutMs) <= 0) return Status::Unavailable("server: no request in time");
      char buf[4096];
      const ssize_t n = ::read(fd_, buf, sizeof(buf));
      if (n <= 0) return Status::Unavailable("server: client closed");
      decoder_.Feed(std::string_view(buf, static_cast<size_t>(n)));
    }
  }

  // Reads the next request and checks it is a T.
  template <class T>
  std::pair<uint64_t, T> Expect() {
    auto r = Read();
    if (!r.ok()) {
      ADD_FAILURE() << "server expected a request: " << r.status().ToString();
      return {0, T{}};
    }
    const T* body = std::get_if<T>(&r->body);
    if (body == nullptr) {
      ADD_FAILURE() << "server got request variant index " << r->body.index();
      return {r->id, T{}};
    }
    return {r->id, *body};
  }

  void Send(uint64_t id, const protocol::ResponseBody& body) { SendRaw(protocol::EncodeResponse(id, body)); }
  void SendRaw(std::string_view bytes) {
    while (!bytes.empty()) {
      const ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n <= 0) return;
      bytes.remove_prefix(static_cast<size_t>(n));
    }
  }

  // True when the client closes its end within the timeout.
  bool SeesEof() {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, kServerTimeoutMs) <= 0) return false;
    char c;
    return ::read(fd_, &c, 1) == 0;
  }

  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
  protocol::FrameDecoder decoder_;
};

HelloReply TestHello() {
  HelloReply h;
  h.protocol_version = protocol::kProtocolVersion;
  h.daemon_version = "0.1.0-test";
  h.model_name = "tiny-test";
  h.context_limit = 2048;
  h.max_frame_bytes = 1u << 20;
  h.math = "exact";
  return h;
}

// Listens on a socket in a fresh temporary directory; Serve() runs a script
// on a server thread against the next accepted connection.
class FakeServer {
 public:
  explicit FakeServer(bool listen = true) {
    char tmpl[] = "/tmp/mnemo-client-test-XXXXXX";
    MNEMO_CHECK(::mkdtemp(tmpl) != nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/mnemod.sock";
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    MNEMO_CHECK(fd_ >= 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path_.c_str(), path_.size());
    MNEMO_CHECK(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
    if (listen) MNEMO_CHECK(::listen(fd_, 16) == 0);
  }
  ~FakeServer() {
    Join();
    ::close(fd_);
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
  }

  const std::string& path() const { return path_; }

  // `script` runs on the server thread; with `hello`, after answering Hello.
  void Serve(std::function<void(Peer&)> script, bool hello = true) {
    thread_ = std::thread([this, script = std::move(script), hello] {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, kServerTimeoutMs) <= 0) {
        ADD_FAILURE() << "server: no connection";
        return;
      }
      Peer peer(::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC));
      if (hello) {
        auto [id, req] = peer.Expect<protocol::HelloRequest>();
        EXPECT_EQ(req.protocol_version, protocol::kProtocolVersion);
        hello_client_name = req.client_name;
        peer.Send(id, TestHello());
      }
      script(peer);
    });
  }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }

  std::string hello_client_name;  // written by the server thread before Join()

 private:
  std::string dir_;
  std::string path_;
  int fd_ = -1;
  std::thread thread_;
};

ConnectOptions Options(const FakeServer& s) {
  ConnectOptions o;
  o.socket_path = s.path();
  o.connect_timeout = 2000ms;
  o.client_name = "client-test";
  return o;
}

SessionInfo Info(std::string name, uint32_t tokens = 0) {
  SessionInfo s;
  s.name = std::move(name);
  s.tokens = tokens;
  s.turns = 1;
  s.kv_pages = 3;
  s.kv_bytes = 3 * 12288;
  s.created_unix_ms = 1700000000000;
  s.last_used_unix_ms = 1700000001000;
  s.persisted = true;
  return s;
}

GenerateRequest Chat(std::string session, std::string text) {
  GenerateRequest g;
  g.session = std::move(session);
  g.messages = {{"user", std::move(text)}};
  g.sampling.temperature = 0;
  g.max_tokens = 16;
  return g;
}

TokenChunk Chunk(std::string text, std::vector<int32_t> ids) { return TokenChunk{std::move(text), std::move(ids)}; }

Done DoneWith(FinishReason reason, uint32_t generated) {
  Done d;
  d.finish_reason = reason;
  d.prompt_tokens = 7;
  d.generated_tokens = generated;
  d.ttft_ms = 12.5;
  d.decode_tokens_per_s = 80;
  d.persisted = true;
  return d;
}

// ------------------------------------------------------------------ connect

TEST(ClientConnect, HelloExchangeKeepsTheDaemonsReply) {
  FakeServer server;
  server.Serve([](Peer& p) { EXPECT_TRUE(p.SeesEof()); });
  {
    auto c = Client::Connect(Options(server));
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_EQ(c->hello(), TestHello());
    EXPECT_EQ(c->socket_path(), server.path());
    EXPECT_TRUE(c->connected());
  }  // closing the client closes the socket
  server.Join();
  EXPECT_EQ(server.hello_client_name, "client-test");
}

TEST(ClientConnect, MissingSocketIsNotFound) {
  ConnectOptions o;
  o.socket_path = "/nonexistent-dir-for-mnemo-test/mnemod.sock";
  auto c = Client::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find("/nonexistent-dir-for-mnemo-test/mnemod.sock"), std::string_view::npos);
}

TEST(ClientConnect, SocketWithoutListenerIsUnavailable) {
  FakeServer server(/*listen=*/false);  // bound, never listening: refused
  auto c = Client::Connect(Options(server));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kUnavailable) << c.status().ToString();
}

TEST(ClientConnect, SilentDaemonTimesOutAsUnavailable) {
  FakeServer server;  // listens, never accepts nor answers Hello
  ConnectOptions o = Options(server);
  o.connect_timeout = 200ms;
  const auto start = std::chrono::steady_clock::now();
  auto c = Client::Connect(o);
  const auto waited = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(c.status().message().find("did not answer Hello"), std::string_view::npos) << c.status().ToString();
  EXPECT_GE(waited, 200ms);
  EXPECT_LT(waited, 3s);
}

TEST(ClientConnect, RefusedHelloKeepsTheDaemonsCode) {
  FakeServer server;
  server.Serve(
      [](Peer& p) {
        auto [id, req] = p.Expect<protocol::HelloRequest>();
        p.Send(id, ErrorReply{StatusCode::kResourceExhausted, "too many connections"});
      },
      /*hello=*/false);
  auto c = Client::Connect(Options(server));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(c.status().message(), "too many connections");
}

TEST(ClientConnect, OtherProtocolVersionIsUnsupported) {
  FakeServer server;
  server.Serve(
      [](Peer& p) {
        auto [id, req] = p.Expect<protocol::HelloRequest>();
        HelloReply h = TestHello();
        h.protocol_version = protocol::kProtocolVersion + 1;
        p.Send(id, h);
      },
      /*hello=*/false);
  auto c = Client::Connect(Options(server));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kUnsupported);
}

TEST(ClientConnect, DefaultSocketPathFollowsTheEnvironment) {
  const char* old_sock = std::getenv("MNEMO_SOCKET");
  const char* old_xdg = std::getenv("XDG_RUNTIME_DIR");
  const std::string saved_sock = old_sock ? old_sock : "";
  const std::string saved_xdg = old_xdg ? old_xdg : "";
  ::setenv("MNEMO_SOCKET", "/x/y.sock", 1);
  EXPECT_EQ(DefaultSocketPath(), "/x/y.sock");
  ::unsetenv("MNEMO_SOCKET");
  ::setenv("XDG_RUNTIME_DIR", "/run/user/1234", 1);
  EXPECT_EQ(DefaultSocketPath(), "/run/user/1234/mnemo/mnemod.sock");
  ::unsetenv("XDG_RUNTIME_DIR");
  EXPECT_EQ(DefaultSocketPath(), ::getuid() == 0 ? std::string("/run/mnemo/mnemod.sock")
                                                 : "/tmp/mnemo-" + std::to_string(::getuid()) + "/mnemod.sock");
  if (old_sock) ::setenv("MNEMO_SOCKET", saved_sock.c_str(), 1);
  if (old_xdg) ::setenv("XDG_RUNTIME_DIR", saved_xdg.c_str(), 1);
}

// -------------------------------------------------------------------- calls

TEST(ClientCalls, EveryCallSendsItsRequestAndReturnsItsReply) {
  FakeServer server;
  StatsReply stats;
  stats.requests_running = 2;
  stats.sessions = 5;
  stats.generated_tokens_total = 1234;
  stats.tiers = {{"T0", 10, 122880, 1 << 30, 3, 1, 4096, 8192, {}, 5, 6, 0.5}};
  stats.errors = {{StatusCode::kNotFound, 3}};
  stats.prometheus_text = "mnemo_sessions 5\n";
  HealthReply health{HealthStatus::kServing, true, 42.5, "ok"};
  server.Serve([&](Peer& p) {
    {
      auto [id, req] = p.Expect<protocol::CreateSessionRequest>();
      EXPECT_EQ(req.name, std::optional<std::string>("alpha"));
      p.Send(id, Info("alpha"));
    }
    {
      auto [id, req] = p.Expect<protocol::CreateSessionRequest>();
      EXPECT_FALSE(req.name.has_value());
      p.Send(id, Info("s-1"));
    }
    {
      auto [id, req] = p.Expect<protocol::ListSessionsRequest>();
      p.Send(id, protocol::SessionList{{Info("alpha"), Info("s-1")}});
    }
    {
      auto [id, req] = p.Expect<protocol::GetSessionRequest>();
      EXPECT_EQ(req.session, "alpha");
      p.Send(id, Info("alpha", 99));
    }
    {
      auto [id, req] = p.Expect<protocol::ForkSessionRequest>();
      EXPECT_EQ(req.src, "alpha");
      EXPECT_EQ(req.dst, "beta");
      SessionInfo b = Info("beta", 99);
      b.parent = "alpha";
      p.Send(id, b);
    }
    {
      // A daemon that only acknowledges the fork: the client asks for it.
      auto [id, req] = p.Expect<protocol::ForkSessionRequest>();
      p.Send(id, Ack{});
      auto [gid, get] = p.Expect<protocol::GetSessionRequest>();
      EXPECT_EQ(get.session, "gamma");
      p.Send(gid, Info("gamma", 99));
    }
    {
      auto [id, req] = p.Expect<protocol::DeleteSessionRequest>();
      EXPECT_EQ(req.session, "beta");
      p.Send(id, Ack{});
    }
    {
      auto [id, req] = p.Expect<protocol::StatsRequest>();
      EXPECT_TRUE(req.prometheus);
      p.Send(id, stats);
    }
    {
      auto [id, req] = p.Expect<protocol::HealthRequest>();
      p.Send(id, health);
    }
    {
      auto [id, req] = p.Expect<protocol::CancelRequest>();
      EXPECT_EQ(req.target_id, 77u);
      p.Send(id, Ack{});
    }
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok()) << c.status().ToString();

  auto created = c->CreateSession("alpha");
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  EXPECT_EQ(*created, Info("alpha"));
  auto unnamed = c->CreateSession();
  ASSERT_TRUE(unnamed.ok());
  EXPECT_EQ(unnamed->name, "s-1");
  auto list = c->ListSessions();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[1].name, "s-1");
  auto got = c->GetSession("alpha");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->tokens, 99u);
  auto forked = c->ForkSession("alpha", "beta");
  ASSERT_TRUE(forked.ok());
  EXPECT_EQ(forked->parent, "alpha");
  auto forked2 = c->ForkSession("alpha", "gamma");
  ASSERT_TRUE(forked2.ok()) << forked2.status().ToString();
  EXPECT_EQ(forked2->name, "gamma");
  EXPECT_TRUE(c->DeleteSession("beta").ok());
  auto st = c->Stats(/*prometheus=*/true);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(*st, stats);
  auto h = c->Health();
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(*h, health);
  EXPECT_TRUE(c->Cancel(77).ok());
  server.Join();
}

TEST(ClientCalls, DaemonErrorsKeepTheirCodeAndMessage) {
  FakeServer server;
  const std::vector<StatusCode> codes = {StatusCode::kNotFound, StatusCode::kAlreadyExists,
                                         StatusCode::kPermissionDenied, StatusCode::kResourceExhausted,
                                         StatusCode::kOutOfRange};
  server.Serve([&](Peer& p) {
    for (StatusCode code : codes) {
      auto r = p.Read();
      ASSERT_TRUE(r.ok());
      p.Send(r->id, ErrorReply{code, "scripted " + std::string(StatusCodeName(code))});
    }
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  Status s1 = c->GetSession("nope").status();
  EXPECT_EQ(s1.code(), StatusCode::kNotFound);
  EXPECT_EQ(s1.message(), "scripted NotFound");
  EXPECT_EQ(c->CreateSession("dup").status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(c->DeleteSession("theirs").code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(c->ForkSession("a", "b").status().code(), StatusCode::kResourceExhausted);
  auto gen = c->GenerateText(Chat("a", "too long"));
  EXPECT_EQ(gen.status().code(), StatusCode::kOutOfRange);
  server.Join();
}

TEST(ClientCalls, InvalidRequestsFailLocallyWithoutARoundTrip) {
  FakeServer server;
  server.Serve([](Peer& p) {
    // The only request that reaches the daemon is the valid one at the end.
    auto [id, req] = p.Expect<protocol::GetSessionRequest>();
    EXPECT_EQ(req.session, "fine");
    p.Send(id, Info("fine"));
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->GetSession("has space").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->CreateSession(".hidden").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->ForkSession("a", "a").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->DeleteSession("").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c->Cancel(0).code(), StatusCode::kInvalidArgument);
  GenerateRequest both = Chat("s", "hi");
  both.text = "raw too";
  EXPECT_EQ(c->StartGenerate(both).status().code(), StatusCode::kInvalidArgument);
  GenerateRequest hot = Chat("s", "hi");
  hot.sampling.temperature = -1;
  EXPECT_EQ(c->GenerateText(hot).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(c->GetSession("fine").ok());
  server.Join();
}

TEST(ClientCalls, RequestOverTheDaemonsFrameLimitIsResourceExhausted) {
  FakeServer server;
  server.Serve([](Peer& p) { EXPECT_TRUE(p.SeesEof()); });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  auto r = c->GenerateText(Chat("s", std::string(2u << 20, 'x')));  // hello says 1 MiB
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted) << r.status().ToString();
  EXPECT_TRUE(c->connected());
  c->Close();
  server.Join();
}

TEST(ClientCalls, WrongReplyTypeIsCorruption) {
  FakeServer server;
  server.Serve([](Peer& p) {
    auto [id, req] = p.Expect<protocol::GetSessionRequest>();
    p.Send(id, Ack{});
    auto [id2, req2] = p.Expect<protocol::ListSessionsRequest>();
    p.Send(id2, Chunk("stray", {1}));  // a stream event for a unary request
    auto [id3, req3] = p.Expect<protocol::HealthRequest>();
    p.Send(id3, HealthReply{});
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->GetSession("a").status().code(), StatusCode::kCorruption);
  EXPECT_EQ(c->ListSessions().status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(c->Health().ok());  // the connection itself is still fine
  server.Join();
}

// --------------------------------------------------------------- generation

TEST(ClientGenerate, CallbacksSeeEventsInStreamOrder) {
  FakeServer server;
  server.Serve([](Peer& p) {
    auto [id, req] = p.Expect<protocol::GenerateRequest>();
    EXPECT_EQ(req, Chat("s", "hello"));
    p.Send(id, PrefillProgress{0, 10});
    p.Send(id, PrefillProgress{10, 10});
    p.Send(id, Chunk("Hel", {1, 2}));
    p.Send(id, Chunk("lo", {3}));
    p.Send(id, DoneWith(FinishReason::kStop, 3));
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  std::vector<std::string> seen;
  const auto caller = std::this_thread::get_id();
  Callbacks cb;
  cb.on_chunk = [&](const TokenChunk& t) {
    EXPECT_EQ(std::this_thread::get_id(), caller);
    seen.push_back("chunk:" + t.text);
    return true;
  };
  cb.on_progress = [&](const PrefillProgress& pp) {
    seen.push_back("progress:" + std::to_string(pp.processed) + "/" + std::to_string(pp.total));
  };
  auto done = c->Generate(Chat("s", "hello"), cb);
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  EXPECT_EQ(*done, DoneWith(FinishReason::kStop, 3));
  EXPECT_EQ(seen, (std::vector<std::string>{"progress:0/10", "progress:10/10", "chunk:Hel", "chunk:lo"}));
  server.Join();
}

TEST(ClientGenerate, GenerateTextConcatenatesAndStreamPullsInOrder) {
  FakeServer server;
  server.Serve([](Peer& p) {
    for (int turn = 0; turn < 2; ++turn) {
      auto [id, req] = p.Expect<protocol::GenerateRequest>();
      p.Send(id, PrefillProgress{4, 4});
      p.Send(id, Chunk("one ", {11}));
      p.Send(id, Chunk("two", {12, 13}));
      p.Send(id, DoneWith(FinishReason::kLength, 3));
    }
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  auto r = c->GenerateText(Chat("s", "count"));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->text, "one two");
  EXPECT_EQ(r->token_ids, (std::vector<int32_t>{11, 12, 13}));
  EXPECT_EQ(r->done.finish_reason, FinishReason::kLength);

  auto stream = c->StartGenerate(Chat("s", "count"));
  ASSERT_TRUE(stream.ok());
  EXPECT_NE(stream->id(), 0u);
  std::vector<size_t> kinds;
  for (;;) {
    auto ev = stream->Next();
    ASSERT_TRUE(ev.ok()) << ev.status().ToString();
    kinds.push_back(ev->index());
    if (std::holds_alternative<Done>(*ev)) break;
  }
  EXPECT_EQ(kinds, (std::vector<size_t>{1, 0, 0, 2}));
  EXPECT_TRUE(stream->finished());
  EXPECT_EQ(stream->Next().status().code(), StatusCode::kFailedPrecondition);
  server.Join();
}

TEST(ClientGenerate, DaemonErrorEndsTheStream) {
  FakeServer server;
  server.Serve([](Peer& p) {
    auto [id, req] = p.Expect<protocol::GenerateRequest>();
    p.Send(id, Chunk("partial", {5}));
    p.Send(id, ErrorReply{StatusCode::kOutOfRange, "context full"});
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  auto stream = c->StartGenerate(Chat("s", "x"));
  ASSERT_TRUE(stream.ok());
  auto first = stream->Next();
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(std::get<TokenChunk>(*first).text, "partial");
  auto second = stream->Next();
  EXPECT_EQ(second.status().code(), StatusCode::kOutOfRange);
  EXPECT_EQ(second.status().message(), "context full");
  EXPECT_TRUE(stream->finished());
  server.Join();
}

TEST(ClientGenerate, ChunkCallbackReturningFalseSendsCancel) {
  FakeServer server;
  uint64_t cancel_target = 0;
  uint64_t generate_id = 0;
  server.Serve([&](Peer& p) {
    auto [id, req] = p.Expect<protocol::GenerateRequest>();
    generate_id = id;
    p.Send(id, Chunk("a", {1}));
    auto [cid, cancel] = p.Expect<protocol::CancelRequest>();
    cancel_target = cancel.target_id;
    p.Send(id, Chunk("b", {2}));  // already in flight when the cancel arrived
    p.Send(cid, Ack{});
    p.Send(id, DoneWith(FinishReason::kCancelled, 2));
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  int chunks = 0;
  Callbacks cb;
  cb.on_chunk = [&](const TokenChunk&) {
    ++chunks;
    return false;
  };
  auto done = c->Generate(Chat("s", "x"), cb);
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  EXPECT_EQ(done->finish_reason, FinishReason::kCancelled);
  EXPECT_EQ(chunks, 1);
  server.Join();
  EXPECT_NE(generate_id, 0u);
  EXPECT_EQ(cancel_target, generate_id);
}

TEST(ClientGenerate, CancelledErrorAfterCancelIsReturned) {
  FakeServer server;
  server.Serve([&](Peer& p) {
    auto [id, req] = p.Expect<protocol::GenerateRequest>();
    p.Send(id, Chunk("a", {1}));
    auto [cid, cancel] = p.Expect<protocol::CancelRequest>();
    EXPECT_EQ(cancel.target_id, id);
    p.Send(cid, Ack{});
    p.Send(id, ErrorReply{StatusCode::kCancelled, "cancelled by the client"});
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  Callbacks cb;
  cb.on_chunk = [](const TokenChunk&) { return false; };
  auto done = c->Generate(Chat("s", "x"), cb);
  EXPECT_EQ(done.status().code(), StatusCode::kCancelled);
  server.Join();
}

TEST(ClientGenerate, CancelFromAnotherThreadWhileNextBlocks) {
  FakeServer server;
  server.Serve([&](Peer& p) {
    auto [id, req] = p.Expect<protocol::GenerateRequest>();
    auto [cid, cancel] = p.Expect<protocol::CancelRequest>();
    EXPECT_EQ(cancel.target_id, id);
    p.Send(cid, Ack{});
    p.Send(id, DoneWith(FinishReason::kCancelled, 0));
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  auto stream = c->StartGenerate(Chat("s", "x"));
  ASSERT_TRUE(stream.ok());
  std::thread canceller([&] {
    std::this_thread::sleep_for(50ms);
    EXPECT_TRUE(stream->Cancel().ok());
  });
  auto ev = stream->Next();
  canceller.join();
  ASSERT_TRUE(ev.ok()) << ev.status().ToString();
  EXPECT_EQ(std::get<Done>(*ev).finish_reason, FinishReason::kCancelled);
  server.Join();
}

TEST(ClientGenerate, DroppingAnUnfinishedStreamCancelsIt) {
  FakeServer server;
  server.Serve([&](Peer& p) {
    auto [id, req] = p.Expect<protocol::GenerateRequest>();
    p.Send(id, Chunk("a", {1}));
    auto [cid, cancel] = p.Expect<protocol::CancelRequest>();
    EXPECT_EQ(cancel.target_id, id);
    p.Send(cid, Ack{});
    p.Send(id, DoneWith(FinishReason::kCancelled, 1));
    // The connection goes on serving other requests.
    auto [hid, health] = p.Expect<protocol::HealthRequest>();
    p.Send(hid, HealthReply{});
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  {
    auto stream = c->StartGenerate(Chat("s", "x"));
    ASSERT_TRUE(stream.ok());
    ASSERT_TRUE(stream->Next().ok());
  }
  EXPECT_TRUE(c->Health().ok());
  server.Join();
}

TEST(ClientGenerate, ConcurrentRequestsOnOneConnectionAreRoutedById) {
  FakeServer server;
  std::promise<void> both_read;
  server.Serve([&](Peer& p) {
    auto [id_a, a] = p.Expect<protocol::GenerateRequest>();
    auto [id_b, b] = p.Expect<protocol::GenerateRequest>();
    both_read.set_value();
    ASSERT_NE(id_a, id_b);
    // Whichever thread sent first, each session gets its own words back.
    auto word = [](const protocol::GenerateRequest& r) { return r.session == "left" ? "L" : "R"; };
    for (int i = 0; i < 20; ++i) {
      p.Send(id_b, Chunk(word(b), {i}));
      p.Send(id_a, Chunk(word(a), {i}));
    }
    p.Send(id_a, DoneWith(FinishReason::kLength, 20));
    auto [hid, h] = p.Expect<protocol::HealthRequest>();  // a unary call while one stream is still open
    p.Send(hid, HealthReply{});
    p.Send(id_b, DoneWith(FinishReason::kLength, 20));
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  Result<GenerateResult> left = Status::Internal("unset");
  Result<GenerateResult> right = Status::Internal("unset");
  std::thread tl([&] { left = c->GenerateText(Chat("left", "go")); });
  std::thread tr([&] { right = c->GenerateText(Chat("right", "go")); });
  ASSERT_EQ(both_read.get_future().wait_for(5s), std::future_status::ready);
  EXPECT_TRUE(c->Health().ok());
  tl.join();
  tr.join();
  ASSERT_TRUE(left.ok()) << left.status().ToString();
  ASSERT_TRUE(right.ok()) << right.status().ToString();
  EXPECT_EQ(left->text, std::string(20, 'L'));
  EXPECT_EQ(right->text, std::string(20, 'R'));
  EXPECT_EQ(left->token_ids.size(), 20u);
  server.Join();
}

TEST(ClientGenerate, SlowConsumerGetsResourceExhaustedAndTheRequestIsCancelled) {
  FakeServer server;
  std::atomic<bool> sent{false};
  server.Serve([&](Peer& p) {
    auto [id, req] = p.Expect<protocol::GenerateRequest>();
    for (int i = 0; i < 10; ++i) p.Send(id, Chunk("x", {i}));
    auto [hid, h] = p.Expect<protocol::HealthRequest>();  // all chunks are read once this is answered
    p.Send(hid, HealthReply{});
    auto [cid, cancel] = p.Expect<protocol::CancelRequest>();
    EXPECT_EQ(cancel.target_id, id);
    p.Send(cid, Ack{});
    p.Send(id, DoneWith(FinishReason::kCancelled, 10));
  });
  ConnectOptions o = Options(server);
  o.max_queued_events = 4;
  auto c = Client::Connect(o);
  ASSERT_TRUE(c.ok());
  auto stream = c->StartGenerate(Chat("s", "x"));
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE(c->Health().ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(stream->Next().ok()) << i;
  auto overflow = stream->Next();
  EXPECT_EQ(overflow.status().code(), StatusCode::kResourceExhausted) << overflow.status().ToString();
  server.Join();
}

// ---------------------------------------------------------- broken daemons

TEST(ClientFailure, DaemonClosingMidStreamIsUnavailable) {
  FakeServer server;
  server.Serve([](Peer& p) {
    auto [id, req] = p.Expect<protocol::GenerateRequest>();
    p.Send(id, Chunk("half", {1}));
    p.Close();
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  auto stream = c->StartGenerate(Chat("s", "x"));
  ASSERT_TRUE(stream.ok());
  auto first = stream->Next();
  ASSERT_TRUE(first.ok());
  auto lost = stream->Next();
  EXPECT_EQ(lost.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(lost.status().message().find("connection to mnemod lost"), std::string_view::npos)
      << lost.status().ToString();
  server.Join();
  EXPECT_FALSE(c->connected());
  // Every later call fails the same way, at once.
  EXPECT_EQ(c->Health().status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(c->StartGenerate(Chat("s", "x")).status().code(), StatusCode::kUnavailable);
}

TEST(ClientFailure, EveryWaitingCallLearnsOfTheDrop) {
  FakeServer server;
  server.Serve([](Peer& p) {
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(p.Read().ok());
    p.Close();
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  std::vector<Status> results(3);
  std::vector<std::thread> threads;
  threads.emplace_back([&] { results[0] = c->GetSession("a").status(); });
  threads.emplace_back([&] { results[1] = c->Stats().status(); });
  threads.emplace_back([&] { results[2] = c->GenerateText(Chat("s", "x")).status(); });
  for (auto& t : threads) t.join();
  for (const Status& s : results) EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  server.Join();
}

TEST(ClientFailure, CloseWakesWaitingCalls) {
  FakeServer server;
  server.Serve([](Peer& p) {
    ASSERT_TRUE(p.Read().ok());
    EXPECT_TRUE(p.SeesEof());
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  Status waited;
  std::thread t([&] { waited = c->GetSession("a").status(); });
  std::this_thread::sleep_for(50ms);
  c->Close();
  t.join();
  EXPECT_EQ(waited.code(), StatusCode::kUnavailable);
  server.Join();
}

TEST(ClientFailure, GarbageFromTheDaemonIsCorruption) {
  FakeServer server;
  server.Serve([](Peer& p) {
    auto [id, req] = p.Expect<protocol::GetSessionRequest>();
    std::string garbage = "\x20\x00\x00\x00";  // 32 bytes follow, not a FlatBuffer
    garbage.resize(4);
    garbage.append(32, '\xab');
    p.SendRaw(garbage);
    EXPECT_TRUE(p.SeesEof());  // the client hangs up on a broken stream
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  auto r = c->GetSession("a");
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << r.status().ToString();
  server.Join();
}

TEST(ClientFailure, OversizedFrameIsCorruptionWithoutAllocating) {
  FakeServer server;
  server.Serve([](Peer& p) {
    auto [id, req] = p.Expect<protocol::GenerateRequest>();
    p.Send(id, Chunk("ok", {1}));
    p.SendRaw(std::string("\xf0\xff\xff\xff", 4));  // ~4 GiB announced
    EXPECT_TRUE(p.SeesEof());
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  auto stream = c->StartGenerate(Chat("s", "x"));
  ASSERT_TRUE(stream.ok());
  EXPECT_TRUE(stream->Next().ok());
  auto bad = stream->Next();
  EXPECT_EQ(bad.status().code(), StatusCode::kCorruption) << bad.status().ToString();
  server.Join();
}

TEST(ClientFailure, InvalidReplyFailsOnlyItsCall) {
  FakeServer server;
  server.Serve([](Peer& p) {
    auto [id, req] = p.Expect<protocol::GenerateRequest>();
    p.Send(id, PrefillProgress{9, 3});  // verified frame, invalid content
    auto [hid, h] = p.Expect<protocol::HealthRequest>();
    p.Send(hid, HealthReply{});
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  auto r = c->GenerateText(Chat("s", "x"));
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << r.status().ToString();
  EXPECT_TRUE(c->Health().ok());
  server.Join();
}

TEST(ClientFailure, ConnectionLevelErrorReachesEveryWaitingCall) {
  FakeServer server;
  server.Serve([](Peer& p) {
    ASSERT_TRUE(p.Read().ok());
    p.Send(0, ErrorReply{StatusCode::kUnavailable, "mnemod is shutting down"});
    EXPECT_TRUE(p.SeesEof());
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  auto r = c->GenerateText(Chat("s", "x"));
  EXPECT_EQ(r.status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(r.status().message(), "mnemod is shutting down");
  c->Close();
  server.Join();
}

TEST(ClientFailure, ReasonTheDaemonGaveForClosingIsKept) {
  FakeServer server;
  server.Serve([](Peer& p) {
    p.Send(0, ErrorReply{StatusCode::kResourceExhausted, "connection idle for longer than the limit; closed"});
    p.Close();
  });
  auto c = Client::Connect(Options(server));
  ASSERT_TRUE(c.ok());
  server.Join();
  for (int i = 0; i < 500 && c->connected(); ++i) std::this_thread::sleep_for(10ms);
  EXPECT_FALSE(c->connected());
  Status s = c->Health().status();
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("connection to mnemod lost"), std::string_view::npos) << s.ToString();
  EXPECT_NE(s.message().find("idle for longer"), std::string_view::npos) << s.ToString();
}

}  // namespace
}  // namespace mnemo::client
