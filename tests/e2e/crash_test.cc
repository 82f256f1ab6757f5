// Crash consistency of the real daemon: 50 multi-turn runs, each killed with
// SIGKILL at a random moment (start-up, session creation, prefill, decode,
// persisting), then restarted on the same data directory. Every turn the
// daemon acknowledged as persisted must be there, the history must be
// exactly a committed prefix, and continuing must produce exactly what an
// uninterrupted run produced, prefilling only the new message.
#include <signal.h>
#include <sys/wait.h>

#include <filesystem>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "mnemo/client.h"
#include "tests/testutil/daemon_process.h"

namespace mnemo {
namespace {

using namespace std::chrono_literals;
using client::Client;
using testutil::DaemonProcess;

constexpr int kTurns = 4;
const char* const kMessages[kTurns] = {"Name a fruit.", "Name a color.", "Name an animal.", "Name a city."};

client::GenerateRequest Turn(int k) {
  client::GenerateRequest g;
  g.session = "s";
  g.messages = {{"user", kMessages[k]}};
  g.max_tokens = 10;
  g.sampling.temperature = 0;
  return g;
}

Result<Client> Connect(const DaemonProcess& d) {
  client::ConnectOptions o;
  o.socket_path = d.socket_path();
  o.connect_timeout = 10s;
  return Client::Connect(o);
}

struct Reference {
  std::vector<std::vector<int32_t>> ids;  // per turn
  std::vector<uint32_t> prompt_tokens;    // per turn
  std::vector<uint32_t> tokens_after;     // session length after turn k (index 0: before any)
};

TEST(CrashTest, KillNineAtRandomMomentsLosesNoCommittedTurn) {
  if (!std::filesystem::exists(testutil::MnemodPath())) GTEST_SKIP() << "mnemod not built";
  if (!std::filesystem::exists(testutil::DefaultModelPath()))
    GTEST_SKIP() << "default model not fetched (scripts/fetch-model)";
  const std::vector<std::string> args = {"--t1-budget", "0", "--t2-budget", "64M"};
  Reference ref;
  {
    DaemonProcess d;
    ASSERT_TRUE(d.Start(args)) << d.error();
    auto c = Connect(d);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    ASSERT_TRUE(c->CreateSession("s").ok());
    ref.tokens_after.push_back(0);
    for (int k = 0; k < kTurns; ++k) {
      auto r = c->GenerateText(Turn(k));
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      ASSERT_TRUE(r->done.persisted);
      ref.ids.push_back(r->token_ids);
      ref.prompt_tokens.push_back(r->done.prompt_tokens);
      auto info = c->GetSession("s");
      ASSERT_TRUE(info.ok());
      ref.tokens_after.push_back(info->tokens);
    }
  }

  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  SCOPED_TRACE("seed " + std::to_string(seed));
  int killed_mid_turn = 0, killed_before_ready = 0;
  for (int run = 0; run < 50; ++run) {
    SCOPED_TRACE("run " + std::to_string(run));
    DaemonProcess d;
    const int kill_after_ms = static_cast<int>(rng() % 2500);
    ASSERT_TRUE(d.Spawn([&] {
      std::vector<std::string> a = {testutil::MnemodPath(), "--model", testutil::DefaultModelPath(), "--socket",
                                    d.socket_path(), "--data-dir", d.data_dir(), "--threads", "2"};
      a.insert(a.end(), args.begin(), args.end());
      return a;
    }()));
    std::thread killer([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(kill_after_ms));
      ::kill(d.pid(), SIGKILL);
    });
    bool created = false;
    int acked = 0;  // turns acknowledged as persisted
    if (d.WaitNotify("READY=1", 5s)) {
      if (auto c = Connect(d); c.ok()) {
        created = c->CreateSession("s").ok();
        for (int k = 0; created && k < kTurns; ++k) {
          auto r = c->GenerateText(Turn(k));
          if (!r.ok()) {
            ++killed_mid_turn;
            break;
          }
          ASSERT_EQ(r->token_ids, ref.ids[k]);
          if (r->done.persisted) acked = k + 1;
        }
      }
    } else {
      ++killed_before_ready;
    }
    killer.join();
    d.Wait(30s);

    // Restart on the same data directory.
    ASSERT_TRUE(d.Start(args)) << d.error();
    auto c = Connect(d);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    auto info = c->GetSession("s");
    if (!info.ok()) {
      ASSERT_EQ(info.status().code(), StatusCode::kNotFound) << info.status().ToString();
      ASSERT_FALSE(created) << "an acknowledged session was lost";
      ASSERT_TRUE(c->CreateSession("s").ok());
      info = c->GetSession("s");
      ASSERT_TRUE(info.ok());
    }
    const int turns = static_cast<int>(info->turns);
    ASSERT_GE(turns, acked) << "an acknowledged turn was lost";
    ASSERT_LE(turns, kTurns);
    ASSERT_EQ(info->tokens, ref.tokens_after[turns]) << "history is not a committed prefix";
    for (int k = turns; k < kTurns; ++k) {
      auto r = c->GenerateText(Turn(k));
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      EXPECT_EQ(r->token_ids, ref.ids[k]) << "turn " << k << " after recovery";
      EXPECT_EQ(r->done.prompt_tokens, ref.prompt_tokens[k]) << "turn " << k << " recomputed history";
      EXPECT_TRUE(r->done.persisted);
    }
    EXPECT_EQ(d.Stop(SIGTERM), 0);
  }
  // The random moments covered both ends.
  RecordProperty("killed_mid_turn", killed_mid_turn);
  RecordProperty("killed_before_ready", killed_before_ready);
  EXPECT_GT(killed_mid_turn, 0);
}

}  // namespace
}  // namespace mnemo
