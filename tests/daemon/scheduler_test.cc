// The scheduler driven in-process: session lifecycle and tenancy, streaming,
// multi-turn reuse of KV, cancellation, limits, memory pressure, shutdown,
// and batch invariance of greedy output on the real model.
#include "daemon/scheduler.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <filesystem>
#include <mutex>

#include "tests/testutil/tiny_model.h"

namespace mnemo::daemon {
namespace {

using namespace std::chrono_literals;
using protocol::ResponseBody;

// Collects every response of one request.
class Collector {
 public:
  ReplyFn Fn() {
    return [this](ResponseBody b) {
      std::lock_guard<std::mutex> lock(mu_);
      const bool terminal = !std::holds_alternative<protocol::TokenChunk>(b) &&
                            !std::holds_alternative<protocol::PrefillProgress>(b);
      bodies_.push_back(std::move(b));
      if (terminal) done_ = true;
      cv_.notify_all();
    };
  }
  // Waits for the terminal response and returns it.
  ResponseBody Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    EXPECT_TRUE(cv_.wait_for(lock, 120s, [&] { return done_; })) << "no terminal response";
    return done_ ? bodies_.back() : ResponseBody(protocol::ErrorReply{});
  }
  // Waits until at least n token chunks arrived.
  void WaitChunks(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, 120s, [&] { return done_ || Chunks() >= n; });
  }
  std::vector<int32_t> Tokens() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<int32_t> t;
    for (auto& b : bodies_)
      if (auto* c = std::get_if<protocol::TokenChunk>(&b)) t.insert(t.end(), c->token_ids.begin(), c->token_ids.end());
    return t;
  }
  std::string Text() {
    std::lock_guard<std::mutex> lock(mu_);
    std::string t;
    for (auto& b : bodies_)
      if (auto* c = std::get_if<protocol::TokenChunk>(&b)) t += c->text;
    return t;
  }
  size_t Count() {
    std::lock_guard<std::mutex> lock(mu_);
    return bodies_.size();
  }
  std::vector<ResponseBody> Bodies() {
    std::lock_guard<std::mutex> lock(mu_);
    return bodies_;
  }

 private:
  size_t Chunks() const {
    size_t n = 0;
    for (auto& b : bodies_) n += std::holds_alternative<protocol::TokenChunk>(b);
    return n;
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<ResponseBody> bodies_;
  bool done_ = false;
};

template <typename T>
T As(const ResponseBody& b) {
  if (auto* e = std::get_if<protocol::ErrorReply>(&b)) {
    ADD_FAILURE() << "error reply: " << e->ToStatus().ToString();
    return T{};
  }
  EXPECT_TRUE(std::holds_alternative<T>(b)) << "unexpected reply type " << b.index();
  return std::holds_alternative<T>(b) ? std::get<T>(b) : T{};
}

StatusCode ErrorCode(const ResponseBody& b) {
  auto* e = std::get_if<protocol::ErrorReply>(&b);
  return e ? e->code : StatusCode::kOk;
}

class SchedulerTest : public ::testing::Test {
 protected:
  void Open(const std::string& path, SchedulerOptions so = {}, size_t kv_budget = 64u << 20,
            int32_t max_context = 0) {
    model::EngineOptions eo;
    eo.model_path = path;
    eo.threads = 2;
    eo.kv_budget_bytes = kv_budget;
    eo.max_context = max_context;
    auto e = model::Engine::Open(eo);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    engine_ = std::move(e).value();
    sched_ = std::make_unique<Scheduler>(engine_.get(), so, &metrics_);
    sched_->Start();
  }
  void OpenTiny(SchedulerOptions so = {}, size_t kv_budget = 64u << 20, int32_t max_context = 0) {
    testutil::TinyModelSpec spec;
    Open(testutil::WriteTinyModel(spec), so, kv_budget, max_context);
  }
  void TearDown() override {
    if (sched_) sched_->Shutdown(0ms);
  }

  ResponseBody Call(protocol::RequestBody body, uid_t uid = 1000, uint64_t conn = 1) {
    Collector c;
    sched_->Submit(Job{conn, next_id_++, uid, std::move(body), c.Fn()});
    return c.Wait();
  }
  // Starts a request; the collector receives its replies.
  uint64_t Start(Collector* c, protocol::RequestBody body, uid_t uid = 1000, uint64_t conn = 1) {
    const uint64_t id = next_id_++;
    sched_->Submit(Job{conn, id, uid, std::move(body), c->Fn()});
    return id;
  }
  static protocol::GenerateRequest Raw(std::string session, std::string text, uint32_t max_tokens) {
    protocol::GenerateRequest g;
    g.session = std::move(session);
    g.text = std::move(text);
    g.max_tokens = max_tokens;
    g.sampling.temperature = 0;
    return g;
  }
  static protocol::GenerateRequest Chat(std::string session, std::string user, uint32_t max_tokens) {
    protocol::GenerateRequest g;
    g.session = std::move(session);
    g.messages = {{"user", std::move(user)}};
    g.max_tokens = max_tokens;
    g.sampling.temperature = 0;
    return g;
  }

  Metrics metrics_;
  std::unique_ptr<model::Engine> engine_;
  std::unique_ptr<Scheduler> sched_;
  uint64_t next_id_ = 1;
};

TEST_F(SchedulerTest, SessionLifecycleAndTenancy) {
  OpenTiny();
  auto info = As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"alpha"}));
  EXPECT_EQ(info.name, "alpha");
  EXPECT_EQ(info.tokens, 0u);
  EXPECT_EQ(ErrorCode(Call(protocol::CreateSessionRequest{"alpha"})), StatusCode::kAlreadyExists);
  // Another uid neither sees nor touches it, and may use the same name.
  EXPECT_EQ(ErrorCode(Call(protocol::GetSessionRequest{"alpha"}, 2000)), StatusCode::kNotFound);
  EXPECT_EQ(ErrorCode(Call(protocol::DeleteSessionRequest{"alpha"}, 2000)), StatusCode::kNotFound);
  EXPECT_EQ(ErrorCode(Call(protocol::ForkSessionRequest{"alpha", "beta"}, 2000)), StatusCode::kNotFound);
  EXPECT_EQ(ErrorCode(Call(Raw("alpha", "hi", 2), 2000)), StatusCode::kNotFound);
  EXPECT_TRUE(As<protocol::SessionList>(Call(protocol::ListSessionsRequest{}, 2000)).sessions.empty());
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"alpha"}, 2000));
  // An unnamed session gets a fresh name.
  auto anon = As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{}));
  EXPECT_FALSE(anon.name.empty());
  auto list = As<protocol::SessionList>(Call(protocol::ListSessionsRequest{}));
  ASSERT_EQ(list.sessions.size(), 2u);
  As<protocol::Ack>(Call(protocol::DeleteSessionRequest{"alpha"}));
  EXPECT_EQ(ErrorCode(Call(protocol::GetSessionRequest{"alpha"})), StatusCode::kNotFound);
  // uid 2000's "alpha" is untouched.
  As<protocol::SessionInfo>(Call(protocol::GetSessionRequest{"alpha"}, 2000));
}

TEST_F(SchedulerTest, SessionsPerUidLimit) {
  SchedulerOptions so;
  so.max_sessions_per_uid = 2;
  OpenTiny(so);
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"a"}));
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"b"}));
  EXPECT_EQ(ErrorCode(Call(protocol::CreateSessionRequest{"c"})), StatusCode::kResourceExhausted);
  EXPECT_EQ(ErrorCode(Call(protocol::ForkSessionRequest{"a", "c"})), StatusCode::kResourceExhausted);
  // Other uids have their own allowance.
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"c"}, 2000));
}

TEST_F(SchedulerTest, GenerateStreamsAndLaterTurnsPrefillOnlyNewTokens) {
  OpenTiny();
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"s"}));
  Collector c1;
  Start(&c1, Chat("s", "hello there", 8));
  auto d1 = As<protocol::Done>(c1.Wait());
  EXPECT_GT(d1.prompt_tokens, 5u);
  EXPECT_GE(d1.generated_tokens, 1u);
  EXPECT_LE(d1.generated_tokens, 8u);
  EXPECT_EQ(c1.Tokens().size(), d1.generated_tokens);
  auto info1 = As<protocol::SessionInfo>(Call(protocol::GetSessionRequest{"s"}));
  EXPECT_EQ(info1.turns, 1u);
  EXPECT_GT(info1.kv_pages, 0u);

  Collector c2;
  Start(&c2, Chat("s", "again", 8));
  auto d2 = As<protocol::Done>(c2.Wait());
  // Only the new message (plus the last sampled token) is prefilled.
  EXPECT_LT(d2.prompt_tokens, info1.tokens);
  EXPECT_LE(d2.prompt_tokens, 40u);
  auto info2 = As<protocol::SessionInfo>(Call(protocol::GetSessionRequest{"s"}));
  EXPECT_EQ(info2.turns, 2u);
  EXPECT_GT(info2.tokens, info1.tokens + d2.prompt_tokens - 2);
}

TEST_F(SchedulerTest, PromptOverContextLimitIsOutOfRangeAndLeavesSessionIntact) {
  OpenTiny({}, 64u << 20, /*max_context=*/64);
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"s"}));
  std::string long_text(400, 'x');
  EXPECT_EQ(ErrorCode(Call(Raw("s", long_text, 4))), StatusCode::kOutOfRange);
  EXPECT_EQ(As<protocol::SessionInfo>(Call(protocol::GetSessionRequest{"s"})).tokens, 0u);
  // Generation that reaches the limit ends with ContextFull.
  auto d = As<protocol::Done>(Call(Raw("s", "abc", 500)));
  EXPECT_TRUE(d.finish_reason == protocol::FinishReason::kContextFull ||
              d.finish_reason == protocol::FinishReason::kEos);
  EXPECT_LE(As<protocol::SessionInfo>(Call(protocol::GetSessionRequest{"s"})).tokens, 65u);
}

// A short turn that arrives while a long prompt is prefilled gets rows of
// the same steps (the shortest prompts go first, the oldest keeps a share):
// it is answered before the long prompt's first token.
TEST_F(SchedulerTest, AShortTurnIsNotHeldBehindALongPrompt) {
  OpenTiny({}, 256u << 20, /*max_context=*/32768);
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"long"}));
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"short"}));
  Collector a;
  Start(&a, Raw("long", std::string(6000, 'x'), 1));
  // Its first chunk is done (PrefillProgress) and dozens remain.
  while (a.Count() == 0) std::this_thread::sleep_for(1ms);
  ASSERT_TRUE(std::holds_alternative<protocol::PrefillProgress>(a.Bodies().front()));
  Collector b;
  Start(&b, Raw("short", "hello", 1));
  const auto db = As<protocol::Done>(b.Wait());
  EXPECT_EQ(db.generated_tokens, 1u);
  size_t long_tokens = 0;
  for (const ResponseBody& body : a.Bodies()) long_tokens += std::holds_alternative<protocol::TokenChunk>(body);
  EXPECT_EQ(long_tokens, 0u) << "the short turn waited for the long prompt";
  const auto da = As<protocol::Done>(a.Wait());
  EXPECT_GT(da.prompt_tokens, 2000u);
}

TEST_F(SchedulerTest, CancelEndsTheStreamWithCancelled) {
  OpenTiny();
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"s"}));
  Collector c;
  protocol::GenerateRequest g = Raw("s", "tell me", 100000);
  g.sampling.temperature = 1.0f;  // keep going: EOG is unlikely to stop it
  const uint64_t id = Start(&c, g);
  c.WaitChunks(3);
  As<protocol::Ack>(Call(protocol::CancelRequest{id}));
  auto d = c.Wait();
  if (std::holds_alternative<protocol::Done>(d) &&
      std::get<protocol::Done>(d).finish_reason != protocol::FinishReason::kEos) {
    EXPECT_EQ(std::get<protocol::Done>(d).finish_reason, protocol::FinishReason::kCancelled);
  }
  // The session is usable again.
  As<protocol::Done>(Call(Raw("s", "more", 2)));
}

TEST_F(SchedulerTest, DisconnectCancelsAndDropsReplies) {
  OpenTiny();
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"s"}, 1000, 7));
  Collector c;
  protocol::GenerateRequest g = Raw("s", "tell me", 100000);
  g.sampling.temperature = 1.0f;
  Start(&c, g, 1000, 7);
  c.WaitChunks(2);
  sched_->CancelConnection(7);
  // The session becomes free again once the request is gone.
  for (int i = 0; i < 200; ++i) {
    if (sched_->running() == 0) break;
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(sched_->running(), 0u);
  const size_t seen = c.Count();
  As<protocol::Done>(Call(Raw("s", "x", 2), 1000, 8));
  EXPECT_EQ(c.Count(), seen) << "replies after disconnect";
}

TEST_F(SchedulerTest, BusySessionRefusesSecondGenerateDeleteAndFork) {
  OpenTiny();
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"s"}));
  Collector c;
  protocol::GenerateRequest g = Raw("s", "tell me", 100000);
  g.sampling.temperature = 1.0f;
  const uint64_t id = Start(&c, g);
  c.WaitChunks(1);
  EXPECT_EQ(ErrorCode(Call(Raw("s", "x", 2))), StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrorCode(Call(protocol::DeleteSessionRequest{"s"})), StatusCode::kFailedPrecondition);
  EXPECT_EQ(ErrorCode(Call(protocol::ForkSessionRequest{"s", "t"})), StatusCode::kFailedPrecondition);
  Call(protocol::CancelRequest{id});
  c.Wait();
}

TEST_F(SchedulerTest, QueueLimitIsResourceExhausted) {
  SchedulerOptions so;
  so.max_batch = 1;
  so.max_queued = 1;
  OpenTiny(so);
  for (const char* n : {"a", "b", "c"}) As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{n}));
  Collector a, b;
  protocol::GenerateRequest g = Raw("a", "tell me", 100000);
  g.sampling.temperature = 1.0f;
  const uint64_t ida = Start(&a, g);
  a.WaitChunks(1);
  g.session = "b";
  const uint64_t idb = Start(&b, g);  // waits for the batch slot
  for (int i = 0; i < 200 && sched_->waiting() == 0; ++i) std::this_thread::sleep_for(5ms);
  EXPECT_EQ(ErrorCode(Call(Raw("c", "x", 2))), StatusCode::kResourceExhausted);
  Call(protocol::CancelRequest{idb});
  Call(protocol::CancelRequest{ida});
  a.Wait();
  b.Wait();
}

TEST_F(SchedulerTest, ForkSharesPagesAndDiverges) {
  OpenTiny();
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"p"}));
  As<protocol::Done>(Call(Raw("p", std::string(100, 'a'), 4)));
  const size_t used_before = engine_->pool().used_pages();
  auto f = As<protocol::SessionInfo>(Call(protocol::ForkSessionRequest{"p", "f"}));
  EXPECT_EQ(f.parent, "p");
  auto p = As<protocol::SessionInfo>(Call(protocol::GetSessionRequest{"p"}));
  EXPECT_EQ(f.tokens, p.tokens);
  EXPECT_EQ(f.kv_pages, p.kv_pages);
  EXPECT_EQ(engine_->pool().used_pages(), used_before) << "fork copied KV";
  // Both continue independently, and the same greedy continuation.
  auto dp = Call(Raw("p", "zz", 6));
  auto df = Call(Raw("f", "zz", 6));
  As<protocol::Done>(dp);
  As<protocol::Done>(df);
  EXPECT_EQ(As<protocol::SessionInfo>(Call(protocol::GetSessionRequest{"p"})).tokens,
            As<protocol::SessionInfo>(Call(protocol::GetSessionRequest{"f"})).tokens);
}

TEST_F(SchedulerTest, MemoryPressureDropsIdleKvAndTheSessionStillContinues) {
  // Room for about one long session's KV.
  testutil::TinyModelSpec spec;
  const size_t per_token = static_cast<size_t>(spec.n_layers) * 2 * spec.n_kv_heads * (spec.dim / spec.n_heads) * 2;
  OpenTiny({}, per_token * 16 * 24);  // 24 pages of 16 tokens per layer set
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"a"}));
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"b"}));
  As<protocol::Done>(Call(Raw("a", std::string(250, 'a'), 2)));
  As<protocol::Done>(Call(Raw("b", std::string(250, 'b'), 2)));  // evicts a's KV
  EXPECT_EQ(As<protocol::SessionInfo>(Call(protocol::GetSessionRequest{"a"})).kv_pages, 0u);
  auto d = As<protocol::Done>(Call(Raw("a", "c", 2)));
  EXPECT_GT(d.prompt_tokens, 200u) << "a's history is recomputed";
  // A request that cannot fit at all is a typed error.
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"c"}));
  EXPECT_EQ(ErrorCode(Call(Raw("c", std::string(450, 'q'), 2))), StatusCode::kResourceExhausted);
  // Nothing of the failed turn stays.
  EXPECT_EQ(As<protocol::SessionInfo>(Call(protocol::GetSessionRequest{"c"})).tokens, 0u);
}

TEST_F(SchedulerTest, ShutdownEndsRunningRequestsWithUnavailable) {
  OpenTiny();
  As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{"s"}));
  Collector c;
  protocol::GenerateRequest g = Raw("s", "tell me", 100000);
  g.sampling.temperature = 1.0f;
  Start(&c, g);
  c.WaitChunks(1);
  sched_->Shutdown(0ms);
  auto last = c.Wait();
  if (!std::holds_alternative<protocol::Done>(last)) EXPECT_EQ(ErrorCode(last), StatusCode::kUnavailable);
  // Later requests are refused.
  EXPECT_EQ(ErrorCode(Call(protocol::CreateSessionRequest{"t"})), StatusCode::kUnavailable);
}

// Greedy output of a session is the same alone and batched with 15 others,
// on the real model (the daemon's batch invariance).
TEST_F(SchedulerTest, GreedyOutputIsBatchInvariant) {
  const std::string model = std::string(MNEMO_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(model)) GTEST_SKIP() << "default model not fetched (scripts/fetch-model): " << model;
  Open(model);
  const std::vector<std::string> prompts = {
      "What is the capital of France?", "Write a haiku about rain.", "List three prime numbers.",
      "Explain photosynthesis briefly.", "Who wrote Hamlet?", "What is 12 times 12?",
      "Name a large mammal.", "Describe the color blue.", "Give me a synonym for happy.",
      "What does a CPU do?", "Translate 'hello' to Spanish.", "Why is the sky blue?",
      "Suggest a name for a cat.", "What is the boiling point of water?", "Tell me a fun fact.",
      "How many legs does a spider have?"};
  const uint32_t kTokens = 24;
  std::vector<std::vector<int32_t>> alone(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string name = "alone" + std::to_string(i);
    As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{name}));
    Collector c;
    Start(&c, Chat(name, prompts[i], kTokens));
    As<protocol::Done>(c.Wait());
    alone[i] = c.Tokens();
  }
  std::vector<std::unique_ptr<Collector>> cs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string name = "batch" + std::to_string(i);
    As<protocol::SessionInfo>(Call(protocol::CreateSessionRequest{name}));
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    cs.push_back(std::make_unique<Collector>());
    Start(cs.back().get(), Chat("batch" + std::to_string(i), prompts[i], kTokens));
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    As<protocol::Done>(cs[i]->Wait());
    EXPECT_EQ(cs[i]->Tokens(), alone[i]) << "prompt " << i << ": " << prompts[i];
  }
}

}  // namespace
}  // namespace mnemo::daemon
