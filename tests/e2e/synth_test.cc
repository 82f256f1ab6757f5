// End-to-end: `mnemo-bench synth` writes a session straight into a data
// directory; the real mnemod started on it lists the session and resumes it
// through the real client, prefilling only the new message.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "mnemo/client.h"
#include "kernels/backend.h"
#include "model/engine.h"
#include "tests/testutil/daemon_process.h"

namespace mnemo {
namespace {

using client::Client;
using testutil::DaemonProcess;

std::string BenchPath() { return std::string(MNEMO_BINARY_DIR) + "/bench/mnemo-bench"; }

struct SynthRun {
  int exit_code = -1;
  std::string out, err;
};

// Runs mnemo-bench synth on `data_dir`; stdout and stderr captured.
SynthRun Synth(const DaemonProcess& d, const std::string& session, int tokens, const std::string& extra = "") {
  const std::string err_path = d.dir() + "/synth.err";
  const std::string cmd = BenchPath() + " synth --model " + testutil::DefaultModelPath() + " --data-dir " +
                          d.data_dir() + " --t2-budget 128M --session " + session + " --tokens " +
                          std::to_string(tokens) + " --json " + extra + " 2>" + err_path;
  SynthRun r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (FILE* f = std::fopen(err_path.c_str(), "r")) {
    while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) r.err.append(buf, n);
    std::fclose(f);
  }
  return r;
}

class SynthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(testutil::MnemodPath())) GTEST_SKIP() << "mnemod not built";
    if (!std::filesystem::exists(BenchPath())) GTEST_SKIP() << "mnemo-bench not built";
    if (!std::filesystem::exists(testutil::DefaultModelPath()))
      GTEST_SKIP() << "default model not fetched (scripts/fetch-model): " << testutil::DefaultModelPath();
  }
  Client Connect() {
    client::ConnectOptions o;
    o.socket_path = d_.socket_path();
    auto c = Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    if (!c.ok()) std::abort();
    return std::move(c).value();
  }
  DaemonProcess d_;  // removes its directory (the data dir included) at the end
};

TEST_F(SynthTest, SyntheticSessionIsListedAndResumesWithoutRecompute) {
  constexpr int kTokens = 300;
  const SynthRun synth = Synth(d_, "synth", kTokens);
  ASSERT_EQ(synth.exit_code, 0) << synth.err;
  EXPECT_NE(synth.out.find("\"tokens\":300"), std::string::npos) << synth.out;

  ASSERT_TRUE(d_.Start()) << d_.error();
  Client c = Connect();
  auto list = c.ListSessions();
  ASSERT_TRUE(list.ok()) << list.status().ToString();
  ASSERT_EQ(list->size(), 1u);
  const client::SessionInfo& s = list->front();
  EXPECT_EQ(s.name, "synth");
  EXPECT_EQ(s.tokens, static_cast<uint32_t>(kTokens));
  EXPECT_TRUE(s.persisted);
  EXPECT_EQ(s.t0_pages, 0u);  // on T2 only until a request needs it
  EXPECT_GT(s.t2_pages, 0u);
  constexpr int kPageTokens = kernels::kDefaultPageTokens;
  EXPECT_EQ(s.t2_pages % ((kTokens + kPageTokens - 1) / kPageTokens), 0u);  // whole blocks: every layer of each span

  // The message as the scheduler tokenizes it after a closed assistant turn.
  const std::string message = "Summarize what you said in one sentence.";
  model::EngineOptions eo;
  eo.model_path = testutil::DefaultModelPath();
  eo.threads = 1;
  eo.kv_budget_bytes = 1 << 20;
  auto engine = model::Engine::Open(eo);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  const std::vector<model::ChatMessage> msgs = {{"user", message}};
  auto text = (*engine)->chat_template().RenderAppend(msgs, true);
  ASSERT_TRUE(text.ok());
  const size_t fresh = (*engine)->tokenizer().Encode(*text, false, true).size();

  client::GenerateRequest g;
  g.session = "synth";
  g.messages = {{"user", message}};
  g.max_tokens = 4;
  g.sampling.temperature = 0;
  auto r = c.GenerateText(g);
  ASSERT_TRUE(r.ok()) << r.status().ToString() << "\n" << d_.log();
  // Only the new message was prefilled: the 300 tokens came from T2.
  EXPECT_EQ(r->done.prompt_tokens, fresh);
  // Synthetic KV is noise to the model, which may well end its reply at
  // once; the turn still samples, ends normally and is committed.
  const bool eos = r->done.finish_reason == client::FinishReason::kEos;
  EXPECT_TRUE(eos || r->done.finish_reason == client::FinishReason::kLength)
      << client::FinishReasonName(r->done.finish_reason);
  EXPECT_TRUE(r->done.persisted) << r->done.persist_error;
  auto after = c.GetSession("synth");
  ASSERT_TRUE(after.ok());
  // The history grew by the message and the sampled tokens (an end marker
  // is kept in the history but not counted as generated).
  EXPECT_EQ(after->tokens, kTokens + fresh + r->done.generated_tokens + (eos ? 1 : 0));
  EXPECT_EQ(after->turns, s.turns + 1);
}

TEST_F(SynthTest, RefusesARunningDaemonsDirectoryAndAnExistingSession) {
  const SynthRun first = Synth(d_, "taken", 64);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  const SynthRun again = Synth(d_, "taken", 64);
  EXPECT_NE(again.exit_code, 0);
  EXPECT_NE(again.err.find("already exists"), std::string::npos) << again.err;

  ASSERT_TRUE(d_.Start()) << d_.error();
  const SynthRun busy = Synth(d_, "other", 64);
  EXPECT_NE(busy.exit_code, 0);
  EXPECT_NE(busy.err.find("another mnemod is using the data directory"), std::string::npos) << busy.err;
  // The daemon still serves the session synth wrote before it started.
  Client c = Connect();
  auto s = c.GetSession("taken");
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->tokens, 64u);
}

TEST_F(SynthTest, TooFewTokensForAChatTurnIsAClearError) {
  const SynthRun r = Synth(d_, "tiny", 3);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("cannot hold one chat turn"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace mnemo
