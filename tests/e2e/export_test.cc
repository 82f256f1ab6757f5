// Session export and import between two real mnemod processes with
// different data directories, through the real client and CLI: the
// imported session continues exactly as the uninterrupted one would,
// prefilling only the new message; a damaged or truncated file is refused
// with Corruption and leaves nothing behind; a taken name is AlreadyExists;
// a daemon without T2 storage refuses both; another client is served
// meanwhile. An export is a snapshot (the session takes turns and is
// deleted while it streams), an export asked for during a turn waits for it
// and holds it, a client holds at most its bound of the export unread, and
// Stats counts every export and import.
#include <sys/wait.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <condition_variable>
#include <iterator>
#include <map>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "mnemo/client.h"
#include "tests/testutil/daemon_process.h"
#include "tests/testutil/tiny_model.h"

namespace mnemo {
namespace {

using namespace std::chrono_literals;
using client::Client;
using testutil::DaemonProcess;

const std::vector<std::string> kArgs = {"--t1-budget", "0", "--t2-budget", "64M"};
const char* const kMessages[3] = {"Name a fruit.", "Name a color.", "Name an animal."};

// Long enough that the export (~23 KiB of KV per token) is several times
// mnemod's 4 MiB export window: the stream is flow-controlled.
std::string LongContext() {
  std::string s = "Here is a list of things to remember:";
  for (int i = 0; i < 120; ++i) s += " item " + std::to_string(i) + " is a " + (i % 2 ? "red" : "blue") + " box;";
  return s;
}

client::GenerateRequest Turn(const std::string& session, int k, uint32_t max_tokens = 10) {
  client::GenerateRequest g;
  g.session = session;
  g.messages = {{"user", k == 0 && session == "s" ? LongContext() + " " + kMessages[k] : kMessages[k]}};
  g.max_tokens = max_tokens;
  g.sampling.temperature = 0;
  return g;
}

Client Connect(const DaemonProcess& d) {
  client::ConnectOptions o;
  o.socket_path = d.socket_path();
  o.connect_timeout = 10s;
  auto c = Client::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return std::move(c).value();
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteFile(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Runs the CLI against `d`; returns (exit status, stdout and stderr).
std::pair<int, std::string> RunCli(const DaemonProcess& d, const std::string& args) {
  const std::string cmd = testutil::MnemoCliPath() + " --socket " + d.socket_path() + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

class ExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(testutil::MnemodPath())) GTEST_SKIP() << "mnemod not built";
    if (!std::filesystem::exists(testutil::DefaultModelPath()))
      GTEST_SKIP() << "default model not fetched (scripts/fetch-model)";
    dir_ = testutil::TempDir();
  }
  void TearDown() override {
    std::error_code ec;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
  }
  std::string dir_;
};

TEST_F(ExportTest, SessionMovesToAnotherDaemonAndContinuesExactly) {
  const std::string file = dir_ + "/s.mnemo";
  std::vector<int32_t> ref_ids;
  uint32_t ref_prompt_tokens = 0;
  uint32_t tokens_before = 0;
  {
    DaemonProcess a;
    ASSERT_TRUE(a.Start(kArgs)) << a.error();
    Client c = Connect(a);
    ASSERT_TRUE(c.CreateSession("s").ok());
    for (int k = 0; k < 2; ++k) {
      auto r = c.GenerateText(Turn("s", k));
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      ASSERT_TRUE(r->done.persisted);
    }
    // The uninterrupted continuation: a fork shares the history and KV.
    ASSERT_TRUE(c.ForkSession("s", "ref").ok());
    auto r = c.GenerateText(Turn("ref", 2));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ref_ids = r->token_ids;
    ref_prompt_tokens = r->done.prompt_tokens;
    auto info = c.GetSession("s");
    ASSERT_TRUE(info.ok());
    tokens_before = info->tokens;
    ASSERT_LT(ref_prompt_tokens, tokens_before) << "the reference turn recomputed its history";

    auto missing = c.ExportSessionToFile("nope", file);
    EXPECT_EQ(missing.status().code(), StatusCode::kNotFound) << missing.status().ToString();
    EXPECT_FALSE(std::filesystem::exists(file + ".tmp"));
    auto done = c.ExportSessionToFile("s", file);
    ASSERT_TRUE(done.ok()) << done.status().ToString();
    EXPECT_EQ(done->bytes, std::filesystem::file_size(file));
    EXPECT_FALSE(std::filesystem::exists(file + ".tmp"));
    // The CLI writes the same bytes.
    auto [rc, out] = RunCli(a, "--json export s " + dir_ + "/cli.mnemo");
    ASSERT_EQ(rc, 0) << out;
    auto j = nlohmann::json::parse(out);
    EXPECT_EQ(j["bytes"].get<uint64_t>(), done->bytes);
    EXPECT_EQ(ReadFile(dir_ + "/cli.mnemo"), ReadFile(file));

    // A client that buffers little: a sink that stalls on its first piece
    // (long enough for mnemod to push out a whole flow window, and for an
    // unbounded reader to take all of it) never finds more than its bound
    // queued, and the export still arrives whole.
    {
      client::ConnectOptions o;
      o.socket_path = a.socket_path();
      o.max_export_buffered_bytes = 2 * protocol::kTransferChunkBytes;
      auto small = Client::Connect(o);
      ASSERT_TRUE(small.ok()) << small.status().ToString();
      std::string got;
      client::ExportStats stats;
      auto e = small->ExportSession("s", [&](std::string_view piece) -> Status {
        if (got.empty()) std::this_thread::sleep_for(1s);
        got.append(piece);
        return Status::Ok();
      }, &stats);
      ASSERT_TRUE(e.ok()) << e.status().ToString();
      EXPECT_EQ(got, ReadFile(file));
      EXPECT_GT(stats.peak_buffered_bytes, 0u);
      EXPECT_LE(stats.peak_buffered_bytes, o.max_export_buffered_bytes);
      EXPECT_GT(got.size(), 8 * o.max_export_buffered_bytes) << "the bound was never put to the test";
    }

    // Every export so far is counted: NotFound, then three whole ones.
    auto st = c.Stats(/*prometheus=*/true);
    ASSERT_TRUE(st.ok()) << st.status().ToString();
    EXPECT_EQ(st->exports.started, 4u);
    EXPECT_EQ(st->exports.completed, 3u);
    EXPECT_EQ(st->exports.failed, (std::vector<std::pair<StatusCode, uint64_t>>{{StatusCode::kNotFound, 1}}));
    EXPECT_EQ(st->exports.bytes, 3 * done->bytes);
    EXPECT_EQ(st->imports.started, 0u);
    EXPECT_NE(st->prometheus_text.find("mnemo_exports_completed_total 3"), std::string::npos);
    EXPECT_NE(st->prometheus_text.find("mnemo_export_bytes_total " + std::to_string(3 * done->bytes)),
              std::string::npos)
        << st->prometheus_text;
    auto [src, sout] = RunCli(a, "stats");
    EXPECT_EQ(src, 0) << sout;
    EXPECT_NE(sout.find("4 started, 3 completed, 1 failed (1 NotFound)"), std::string::npos) << sout;
    auto [jrc, jout] = RunCli(a, "--json stats");
    ASSERT_EQ(jrc, 0) << jout;
    auto js = nlohmann::json::parse(jout);
    EXPECT_EQ(js["exports"]["completed"].get<uint64_t>(), 3u);
    EXPECT_EQ(js["exports"]["failed"]["NotFound"].get<uint64_t>(), 1u);

    // An export is a snapshot of the committed session. While one is held
    // up mid-stream by a client that stops taking pieces (mnemod has read
    // only its first window of 32 blocks), the session takes a turn that
    // rewrites its partial last block, it and its fork are deleted, and a
    // new session as long as it takes free slots; the file is still the
    // state at the export's start, byte for byte.
    {
      client::ConnectOptions o;
      o.socket_path = a.socket_path();
      o.max_export_buffered_bytes = protocol::kTransferChunkBytes;
      auto slow = Client::Connect(o);
      ASSERT_TRUE(slow.ok()) << slow.status().ToString();
      std::mutex mu;
      std::condition_variable cv;
      bool started = false, go = false;
      std::string got;
      std::thread exporter([&] {
        auto e = slow->ExportSession("s", [&](std::string_view piece) -> Status {
          if (got.empty()) {
            std::unique_lock<std::mutex> lock(mu);
            started = true;
            cv.notify_all();
            cv.wait(lock, [&] { return go; });
          }
          got.append(piece);
          return Status::Ok();
        });
        EXPECT_TRUE(e.ok()) << e.status().ToString();
      });
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return started; });
      }
      auto t = c.GenerateText(Turn("s", 2));
      EXPECT_TRUE(t.ok()) << "a turn during an export: " << t.status().ToString();
      EXPECT_TRUE(t.ok() && t->done.persisted);
      auto del = c.DeleteSession("s");
      EXPECT_TRUE(del.ok()) << "a delete during an export: " << del.ToString();
      EXPECT_TRUE(c.DeleteSession("ref").ok());
      // As long as "s": were the dropped blocks free, it would take the
      // slots of the export's later windows, not yet read.
      EXPECT_TRUE(c.CreateSession("scratch").ok());
      client::GenerateRequest g = Turn("scratch", 1, 4);
      g.messages[0].content = LongContext() + " " + kMessages[1];
      auto u = c.GenerateText(g);
      EXPECT_TRUE(u.ok() && u->done.persisted) << u.status().ToString();
      {
        std::lock_guard<std::mutex> lock(mu);
        go = true;
      }
      cv.notify_all();
      exporter.join();
      EXPECT_TRUE(got == ReadFile(file)) << "the export is not the state at its start (" << got.size() << " bytes)";
    }
    EXPECT_EQ(a.Stop(SIGTERM), 0);
  }

  DaemonProcess b;  // another data directory: another host
  ASSERT_TRUE(b.Start(kArgs)) << b.error();
  Client c = Connect(b);
  // Another client keeps being served while imports run.
  ASSERT_TRUE(c.CreateSession("other").ok());
  std::thread other([&] {
    Client o = Connect(b);
    for (int k = 0; k < 3; ++k) {
      auto r = o.GenerateText(Turn("other", k, 16));
      EXPECT_TRUE(r.ok()) << r.status().ToString();
    }
  });

  const std::string good = ReadFile(file);
  ASSERT_GT(good.size(), 12u << 20) << "the export should span several flow-control windows";
  // A flipped byte anywhere (header, manifest, KV, trailer) and a truncated
  // file are refused, and no session appears.
  for (size_t at : {size_t{10}, size_t{100}, good.size() / 2, good.size() - 3}) {
    std::string bad = good;
    bad[at] ^= 0x5a;
    WriteFile(dir_ + "/bad.mnemo", bad);
    auto r = c.ImportSessionFromFile(dir_ + "/bad.mnemo");
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << "byte " << at << ": " << r.status().ToString();
  }
  WriteFile(dir_ + "/short.mnemo", std::string_view(good).substr(0, good.size() - 100));
  auto truncated = c.ImportSessionFromFile(dir_ + "/short.mnemo");
  EXPECT_EQ(truncated.status().code(), StatusCode::kCorruption) << truncated.status().ToString();
  EXPECT_EQ(c.GetSession("s").status().code(), StatusCode::kNotFound);

  // A client that goes away midway leaves nothing behind either.
  {
    Client quitter = Connect(b);
    size_t at = 0;
    auto r = quitter.ImportSession([&]() -> Result<std::string> {
      if (at >= 2 * protocol::kTransferChunkBytes) quitter.Close();
      std::string piece = good.substr(at, protocol::kTransferChunkBytes);
      at += piece.size();
      return piece;
    }, std::string("half"));
    EXPECT_EQ(r.status().code(), StatusCode::kUnavailable) << r.status().ToString();
  }
  EXPECT_EQ(c.GetSession("half").status().code(), StatusCode::kNotFound);

  auto imported = c.ImportSessionFromFile(file);
  ASSERT_TRUE(imported.ok()) << imported.status().ToString();
  EXPECT_EQ(imported->name, "s");
  EXPECT_EQ(imported->tokens, tokens_before);
  EXPECT_EQ(imported->turns, 2u);
  EXPECT_TRUE(imported->persisted);
  EXPECT_GT(imported->t2_pages, 0u);
  auto twice = c.ImportSessionFromFile(file);
  EXPECT_EQ(twice.status().code(), StatusCode::kAlreadyExists) << twice.status().ToString();
  // Under another name through the CLI.
  auto [rc, out] = RunCli(b, "--json import " + file + " --name s.copy");
  ASSERT_EQ(rc, 0) << out;
  EXPECT_EQ(nlohmann::json::parse(out)["name"], "s.copy");

  auto r = c.GenerateText(Turn("s", 2));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->token_ids, ref_ids) << "the imported session diverged from the uninterrupted one";
  EXPECT_EQ(r->done.prompt_tokens, ref_prompt_tokens) << "the import recomputed history";
  EXPECT_TRUE(r->done.persisted);
  auto r2 = c.GenerateText(Turn("s.copy", 2));
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  EXPECT_EQ(r2->token_ids, ref_ids);
  other.join();

  // Imports: five damaged or truncated files, the client that quit (its
  // connection closed: Cancelled), two imported and one name taken.
  auto st = c.Stats();
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->imports.started, 9u);
  EXPECT_EQ(st->imports.completed, 2u);
  std::map<StatusCode, uint64_t> failed(st->imports.failed.begin(), st->imports.failed.end());
  EXPECT_EQ(failed, (std::map<StatusCode, uint64_t>{
                        {StatusCode::kCorruption, 5}, {StatusCode::kAlreadyExists, 1}, {StatusCode::kCancelled, 1}}));
  EXPECT_GE(st->imports.bytes, 3 * good.size());
  EXPECT_EQ(st->exports.started, 0u);

  // The imported sessions survive a restart (the index verifies every
  // block reference at start-up) and the failed imports left nothing.
  EXPECT_EQ(b.Stop(SIGTERM), 0);
  ASSERT_TRUE(b.Start(kArgs)) << b.error();
  Client c2 = Connect(b);
  auto list = c2.ListSessions();
  ASSERT_TRUE(list.ok());
  std::vector<std::string> names;
  for (const auto& s : *list) names.push_back(s.name);
  EXPECT_EQ(names, (std::vector<std::string>{"other", "s", "s.copy"}));
  EXPECT_EQ(b.Stop(SIGTERM), 0);
}

TEST_F(ExportTest, RefusedWithoutStorageOrWhileUnpersisted) {
  DaemonProcess d;
  ASSERT_TRUE(d.Start({"--t2-budget", "0"})) << d.error();
  Client c = Connect(d);
  ASSERT_TRUE(c.CreateSession("s").ok());
  auto e = c.ExportSessionToFile("s", dir_ + "/x.mnemo");
  EXPECT_EQ(e.status().code(), StatusCode::kUnsupported) << e.status().ToString();
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/x.mnemo"));
  WriteFile(dir_ + "/junk.mnemo", std::string(1000, 'j'));
  auto i = c.ImportSessionFromFile(dir_ + "/junk.mnemo");
  EXPECT_EQ(i.status().code(), StatusCode::kUnsupported) << i.status().ToString();
  auto [rc, out] = RunCli(d, "export s " + dir_ + "/x.mnemo");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("Unsupported"), std::string::npos) << out;
  // The connection still works.
  EXPECT_TRUE(c.GetSession("s").ok());
}

// An export asked for while the session's turn runs waits for that turn (and
// its persist) and then holds it: the file imports to the session as it is
// after the turn. Before, it was refused with FailedPrecondition.
TEST_F(ExportTest, ExportDuringATurnWaitsForItAndHoldsIt) {
  DaemonProcess d;
  ASSERT_TRUE(d.Start(kArgs)) << d.error();
  Client a = Connect(d);
  Client b = Connect(d);
  ASSERT_TRUE(a.CreateSession("s").ok());
  ASSERT_TRUE(a.GenerateText(Turn("s", 1)).ok());  // a persisted turn first
  // A raw-text turn that counts on for a while (no end of sequence in sight).
  client::GenerateRequest g;
  g.session = "s";
  g.text = " Counting: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";
  g.max_tokens = 160;
  g.sampling.temperature = 0;
  std::mutex mu;
  std::condition_variable cv;
  bool streaming = false;
  std::atomic<bool> export_sent{false};
  std::atomic<int> chunks_after_export{0};
  Result<client::Done> done = Status::Internal("not run");
  std::thread turn([&] {
    client::Callbacks cb;
    cb.on_chunk = [&](const client::TokenChunk&) {
      if (export_sent) ++chunks_after_export;
      std::lock_guard<std::mutex> l(mu);
      streaming = true;
      cv.notify_all();
      return true;
    };
    done = a.Generate(g, cb);
  });
  {
    std::unique_lock<std::mutex> l(mu);
    ASSERT_TRUE(cv.wait_for(l, 60s, [&] { return streaming; }));
  }
  export_sent = true;
  auto e = b.ExportSessionToFile("s", dir_ + "/s.mnemo");
  turn.join();
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  EXPECT_TRUE(done->persisted);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  // The turn was still streaming after the export was asked for.
  EXPECT_GT(chunks_after_export.load(), 0) << "the turn ended before the export was sent: nothing waited";
  auto after = a.GetSession("s");
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  auto copy = b.ImportSessionFromFile(dir_ + "/s.mnemo", std::string("s.copy"));
  ASSERT_TRUE(copy.ok()) << copy.status().ToString();
  EXPECT_EQ(copy->tokens, after->tokens);
  EXPECT_EQ(copy->turns, after->turns);
  EXPECT_EQ(d.Stop(SIGTERM), 0);
}

// A page whose checksum fails fails the export with Corruption naming the
// session, counted once in the error totals (not once by the scheduler and
// again when the reply is sent); the daemon serves on.
TEST_F(ExportTest, ExportOfACorruptPageFailsAndCountsOnce) {
  DaemonProcess d;
  ASSERT_TRUE(d.Start(kArgs)) << d.error();
  Client c = Connect(d);
  ASSERT_TRUE(c.CreateSession("s").ok());
  ASSERT_TRUE(c.GenerateText(Turn("s", 1)).ok());
  std::string slab;
  for (const auto& e : std::filesystem::recursive_directory_iterator(d.data_dir()))
    if (e.path().filename() == "slab-000000") slab = e.path();
  ASSERT_FALSE(slab.empty()) << "no slab file under " << d.data_dir();
  {
    std::fstream f(slab, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(100);
    char b = 0;
    f.read(&b, 1);
    b = static_cast<char>(b ^ 0x5a);
    f.seekp(100);
    f.write(&b, 1);
  }
  auto e = c.ExportSessionToFile("s", dir_ + "/s.mnemo");
  ASSERT_EQ(e.status().code(), StatusCode::kCorruption) << e.status().ToString();
  EXPECT_NE(e.status().message().find("session 's'"), std::string_view::npos) << e.status().ToString();
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/s.mnemo"));
  auto st = c.Stats(/*prometheus=*/false);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  std::map<StatusCode, uint64_t> errors(st->errors.begin(), st->errors.end());
  EXPECT_EQ(errors[StatusCode::kCorruption], 1u);
  EXPECT_EQ(st->exports.failed, (std::vector<std::pair<StatusCode, uint64_t>>{{StatusCode::kCorruption, 1}}));
  ASSERT_TRUE(c.CreateSession("t").ok());
  EXPECT_TRUE(c.GenerateText(Turn("t", 2)).ok());
  EXPECT_EQ(d.Stop(SIGTERM), 0);
}

TEST_F(ExportTest, SmallFrameLimitStillTransfers) {
  std::vector<std::string> args = kArgs;
  args.insert(args.end(), {"--max-frame-bytes", "8K"});
  DaemonProcess d;
  ASSERT_TRUE(d.Start(args)) << d.error();
  Client c = Connect(d);
  ASSERT_TRUE(c.CreateSession("t").ok());
  auto r = c.GenerateText(Turn("t", 0));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto e = c.ExportSessionToFile("t", dir_ + "/t.mnemo");
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  auto i = c.ImportSessionFromFile(dir_ + "/t.mnemo", std::string("t2"));
  ASSERT_TRUE(i.ok()) << i.status().ToString();
  EXPECT_EQ(i->tokens, c.GetSession("t")->tokens);
  EXPECT_EQ(d.Stop(SIGTERM), 0);
}

TEST_F(ExportTest, ImportOfAnotherFileTypeIsCorruptionAndCancelDropsIt) {
  DaemonProcess d;
  ASSERT_TRUE(d.Start(kArgs)) << d.error();
  Client c = Connect(d);
  WriteFile(dir_ + "/junk.mnemo", std::string(600000, 'j'));
  auto i = c.ImportSessionFromFile(dir_ + "/junk.mnemo");
  EXPECT_EQ(i.status().code(), StatusCode::kCorruption) << i.status().ToString();
  EXPECT_NE(i.status().message().find("not a mnemo session export"), std::string_view::npos);
  // A source failing midway abandons the import; the connection goes on.
  int calls = 0;
  auto failing = c.ImportSession([&]() -> Result<std::string> {
    // Shorter than a header: mnemod cannot have judged it yet.
    if (++calls == 1) return std::string("MNEX");
    if (calls == 2) return std::string("\x01\x00", 2);
    return Status::IOError("disk gone");
  });
  EXPECT_EQ(failing.status().code(), StatusCode::kIOError);
  auto list = c.ListSessions();
  ASSERT_TRUE(list.ok()) << list.status().ToString();
  EXPECT_TRUE(list->empty());
  EXPECT_EQ(d.Stop(SIGTERM), 0);
}

}  // namespace
}  // namespace mnemo
