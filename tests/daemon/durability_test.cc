// Durable sessions through the scheduler with a real TierManager (io_uring
// page store, RocksDB index) on a tiny model: persist at turn end, resume
// after a restart without re-prefill and with the uninterrupted output,
// fork/delete, model mismatch, ENOSPC/EIO while persisting, a corrupt page
// or a torn write failing only its session, and power loss in the middle of
// a turn's persist.
#include <gtest/gtest.h>

#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>

#include "daemon/scheduler.h"
#include "kernels/backend.h"
#include "tests/testutil/daemon_process.h"
#include "tests/testutil/tiny_model.h"
#include "tiering/fault_page_store.h"

#include <xxhash.h>

namespace mnemo::daemon {
namespace {

using namespace std::chrono_literals;
using protocol::ResponseBody;

// The terminal reply of one request and the token ids streamed before it.
struct Reply {
  ResponseBody last;
  std::vector<int32_t> tokens;
};

class Node {
 public:
  // One daemon's worth of state over `dir` with the model at `model`.
  // `configure` (optional) adjusts the tier options last.
  Node(const std::string& model, const std::string& dir, uint64_t t2_budget = 32u << 20,
       tiering::FaultInjectingPageStore** fault = nullptr, size_t t0_budget = 64u << 20,
       bool pipelined_resume = true, const std::function<void(tiering::TierOptions*)>& configure = nullptr) {
    model::EngineOptions eo;
    eo.model_path = model;
    eo.threads = 2;
    eo.kv_budget_bytes = t0_budget;
    auto e = model::Engine::Open(eo);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    engine = std::move(e).value();
    const model::LlamaConfig& c = engine->model().config();
    tiering::TierOptions to;
    to.data_dir = dir;
    to.t1_budget_bytes = 0;  // every resume reads T2
    to.t2_budget_bytes = t2_budget;
    to.model_fingerprint = engine->model().fingerprint();
    to.kv = tiering::KvGeometry{c.n_layers, engine->pool().layout().page_tokens, c.n_kv_heads, c.head_dim,
                                tiering::KvDtype::kF16};
    to.page_bytes = engine->pool().page_bytes();
    if (fault) {
      to.wrap_store = [fault](std::unique_ptr<tiering::PageStore> inner) {
        auto f = std::make_unique<tiering::FaultInjectingPageStore>(std::move(inner));
        *fault = f.get();
        return std::unique_ptr<tiering::PageStore>(std::move(f));
      };
    }
    if (configure) configure(&to);
    auto t = tiering::TierManager::Open(to);
    open_status = t.status();
    if (!t.ok()) return;
    tier = std::move(t).value();
    SchedulerOptions so;
    so.tier = tier.get();
    so.pipelined_resume = pipelined_resume;
    sched = std::make_unique<Scheduler>(engine.get(), so, nullptr);
    open_status = sched->Recover();
    sched->Start();
  }
  ~Node() {
    if (sched) sched->Shutdown(10s);
  }

  Reply Call(protocol::RequestBody body, uid_t uid = 1000) {
    std::mutex mu;
    std::condition_variable cv;
    Reply r;
    bool done = false;
    sched->Submit(Job{1, next_id++, uid, std::move(body), [&](ResponseBody b) {
                        std::lock_guard<std::mutex> lock(mu);
                        if (auto* c = std::get_if<protocol::TokenChunk>(&b)) {
                          r.tokens.insert(r.tokens.end(), c->token_ids.begin(), c->token_ids.end());
                          return;
                        }
                        if (std::holds_alternative<protocol::PrefillProgress>(b)) return;
                        r.last = std::move(b);
                        done = true;
                        cv.notify_all();
                      }});
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, 120s, [&] { return done; }));
    return r;
  }

  std::unique_ptr<model::Engine> engine;
  std::unique_ptr<tiering::TierManager> tier;
  std::unique_ptr<Scheduler> sched;
  Status open_status;
  uint64_t next_id = 1;
};

template <typename T>
T As(const ResponseBody& b) {
  if (auto* e = std::get_if<protocol::ErrorReply>(&b)) {
    ADD_FAILURE() << "error reply: " << e->ToStatus().ToString();
    return T{};
  }
  EXPECT_TRUE(std::holds_alternative<T>(b)) << "reply type " << b.index();
  return std::holds_alternative<T>(b) ? std::get<T>(b) : T{};
}

StatusCode CodeOf(const ResponseBody& b) {
  auto* e = std::get_if<protocol::ErrorReply>(&b);
  return e ? e->code : StatusCode::kOk;
}

protocol::GenerateRequest Turn(const std::string& session, const std::string& text, uint32_t max_tokens = 12) {
  protocol::GenerateRequest g;
  g.session = session;
  g.messages = {{"user", text}};
  g.max_tokens = max_tokens;
  g.sampling.temperature = 0;
  return g;
}

class DurabilityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    testutil::TinyModelSpec spec;
    spec.n_layers = 3;
    spec.context_length = 2048;
    model_ = testutil::WriteTinyModel(spec);
    dir_ = Dir();
  }
  void TearDown() override {
    // T2 slab files are preallocated: do not leave them behind.
    std::error_code ec;
    for (const auto& d : dirs_) std::filesystem::remove_all(d, ec);
  }
  std::string Dir() {
    dirs_.push_back(testutil::TempDir());
    return dirs_.back();
  }
  std::string model_, dir_;
  std::vector<std::string> dirs_;
};

TEST_F(DurabilityTest, TurnsPersistAndResumeAfterRestartWithoutRecompute) {
  std::vector<int32_t> uninterrupted;
  {
    // Reference: three turns in one life.
    Node ref(model_, Dir());
    ASSERT_TRUE(ref.open_status.ok()) << ref.open_status.ToString();
    As<protocol::SessionInfo>(ref.Call(protocol::CreateSessionRequest{"s"}).last);
    As<protocol::Done>(ref.Call(Turn("s", "first message, a long one to fill some pages of KV")).last);
    As<protocol::Done>(ref.Call(Turn("s", "second")).last);
    uninterrupted = ref.Call(Turn("s", "third")).tokens;
  }
  uint32_t tokens_before = 0;
  {
    Node a(model_, dir_);
    ASSERT_TRUE(a.open_status.ok()) << a.open_status.ToString();
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
    auto d1 = As<protocol::Done>(a.Call(Turn("s", "first message, a long one to fill some pages of KV")).last);
    EXPECT_TRUE(d1.persisted);
    auto d2 = As<protocol::Done>(a.Call(Turn("s", "second")).last);
    EXPECT_TRUE(d2.persisted) << d2.persist_error;
    auto info = As<protocol::SessionInfo>(a.Call(protocol::GetSessionRequest{"s"}).last);
    EXPECT_TRUE(info.persisted);
    EXPECT_GT(info.t2_pages, 0u);
    tokens_before = info.tokens;
  }
  Node b(model_, dir_);
  ASSERT_TRUE(b.open_status.ok()) << b.open_status.ToString();
  auto info = As<protocol::SessionInfo>(b.Call(protocol::GetSessionRequest{"s"}).last);
  EXPECT_EQ(info.tokens, tokens_before);
  EXPECT_EQ(info.turns, 2u);
  EXPECT_EQ(info.t0_pages, 0u) << "KV should still be on T2 only";
  EXPECT_GT(info.t2_pages, 0u);
  Reply r = b.Call(Turn("s", "third"));
  auto d3 = As<protocol::Done>(r.last);
  EXPECT_LT(d3.prompt_tokens, 40u) << "the history was recomputed";
  EXPECT_EQ(r.tokens, uninterrupted) << "resumed continuation differs from the uninterrupted one";
  EXPECT_TRUE(d3.persisted);
  // Other uids still cannot see it after recovery.
  EXPECT_EQ(CodeOf(b.Call(protocol::GetSessionRequest{"s"}, 2000).last), StatusCode::kNotFound);
}

TEST_F(DurabilityTest, TierStatsCountResidentHitsAndResumeStalls) {
  uint64_t t2_pages = 0;
  {
    Node a(model_, dir_);
    ASSERT_TRUE(a.open_status.ok()) << a.open_status.ToString();
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
    ASSERT_TRUE(As<protocol::Done>(a.Call(Turn("s", "first message, a long one to fill some pages of KV")).last)
                    .persisted);
    // A first turn has no history to find: neither hit nor miss.
    tiering::TierStats t = a.tier->stats();
    EXPECT_EQ(t.t0_hits + t.t0_misses, 0u);
    EXPECT_GT(t.bytes_written, 0u);
    EXPECT_EQ(t.t2_write_latency.count, t.bytes_written / t.block_bytes) << "one timed write per block";
    EXPECT_GE(t.t2_sync_latency.count, 1u);
    EXPECT_EQ(t.t0_bytes_read, t.bytes_written / t.block_bytes * t.n_layers * a.engine->pool().page_bytes());
    ASSERT_TRUE(As<protocol::Done>(a.Call(Turn("s", "second")).last).persisted);
    // The second turn found the KV resident: a hit, every page ready.
    t = a.tier->stats();
    EXPECT_EQ(t.t0_hits, 1u);
    EXPECT_EQ(t.t0_misses, 0u);
    EXPECT_GT(t.prefetch_hits, 0u);
    EXPECT_EQ(t.prefetch_stalls, 0u);
    EXPECT_EQ(t.prefetch_stall_ns, 0u);
    EXPECT_EQ(t.bytes_read, 0u);
    t2_pages = As<protocol::SessionInfo>(a.Call(protocol::GetSessionRequest{"s"}).last).t2_pages;
    ASSERT_GT(t2_pages, 0u);
  }
  Node b(model_, dir_);
  ASSERT_TRUE(b.open_status.ok()) << b.open_status.ToString();
  ASSERT_TRUE(As<protocol::Done>(b.Call(Turn("s", "third")).last).persisted);
  // The resumed turn missed T0 and waited for every page it loaded from T2
  // (T1 is off in these nodes).
  const tiering::TierStats t = b.tier->stats();
  EXPECT_EQ(t.t0_hits, 0u);
  EXPECT_EQ(t.t0_misses, 1u);
  // The resume ran pipelined (alone): each layer's pages were either ready
  // when its step reached them or waited for; only waits take time.
  EXPECT_EQ(t.prefetch_hits + t.prefetch_stalls, t2_pages);
  EXPECT_EQ(t.prefetch_stalls % (t2_pages / t.n_layers), 0u) << "counted per layer";
  EXPECT_EQ(t.prefetch_stalls > 0, t.prefetch_stall_ns > 0);
  EXPECT_EQ(t.t0_bytes_written, t2_pages * b.engine->pool().page_bytes());
  EXPECT_EQ(t.bytes_read, t2_pages / t.n_layers * t.block_bytes);
  EXPECT_EQ(t.t2_read_latency.count, t2_pages / t.n_layers);
  EXPECT_GT(t.t2_read_latency.sum_ns, 0u);
  EXPECT_EQ(t.t1_hits, 0u);
  EXPECT_EQ(t.t1_misses, t2_pages / t.n_layers);
}

// The same resume with the whole session loaded before the step (as when
// other requests run) and computed on its layers as they arrive: the same
// continuation, and the whole load counts every page as waited for.
TEST_F(DurabilityTest, PipelinedAndWholeResumeGiveTheSameContinuation) {
  {
    Node a(model_, dir_);
    ASSERT_TRUE(a.open_status.ok()) << a.open_status.ToString();
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
    As<protocol::Done>(a.Call(Turn("s", "a first message long enough to span several KV pages of the model")).last);
    auto f = As<protocol::SessionInfo>(a.Call(protocol::ForkSessionRequest{"s", "t"}).last);
    EXPECT_TRUE(f.persisted);
  }
  std::vector<int32_t> whole, pipelined;
  uint64_t t2_pages = 0;
  {
    Node b(model_, dir_, 32u << 20, nullptr, 64u << 20, /*pipelined_resume=*/false);
    ASSERT_TRUE(b.open_status.ok()) << b.open_status.ToString();
    t2_pages = As<protocol::SessionInfo>(b.Call(protocol::GetSessionRequest{"s"}).last).t2_pages;
    Reply r = b.Call(Turn("s", "continue"));
    EXPECT_LT(As<protocol::Done>(r.last).prompt_tokens, 40u) << "the history was recomputed";
    whole = r.tokens;
    const tiering::TierStats t = b.tier->stats();
    EXPECT_EQ(t.prefetch_hits, 0u);
    EXPECT_EQ(t.prefetch_stalls, t2_pages);
  }
  {
    Node c(model_, dir_);
    ASSERT_TRUE(c.open_status.ok()) << c.open_status.ToString();
    Reply r = c.Call(Turn("t", "continue"));  // the fork: same history, same pages
    EXPECT_LT(As<protocol::Done>(r.last).prompt_tokens, 40u) << "the history was recomputed";
    pipelined = r.tokens;
    const tiering::TierStats t = c.tier->stats();
    EXPECT_EQ(t.prefetch_hits + t.prefetch_stalls, t2_pages);
  }
  ASSERT_FALSE(whole.empty());
  EXPECT_EQ(whole, pipelined);
}

// A session larger than T0 decodes by streaming its committed pages through
// a ring of layer slots: the same continuation as a daemon that holds it
// whole, alone and beside another session, turn after turn.
TEST_F(DurabilityTest, SessionLargerThanT0StreamsWithTheSameOutput) {
  // The real model: a tiny random one hardly depends on its history.
  const std::string model = testutil::DefaultModelPath();
  auto turn = [](const std::string& session, const std::string& text) { return Turn(session, text, 16); };
  std::string long_text;
  for (int i = 0; i < 48; ++i) long_text += "The quick brown fox jumps over the lazy dog, again and again. ";
  {
    Node a(model, dir_);
    ASSERT_TRUE(a.open_status.ok()) << a.open_status.ToString();
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
    As<protocol::Done>(a.Call(Turn("s", long_text)).last);
    As<protocol::SessionInfo>(a.Call(protocol::ForkSessionRequest{"s", "t"}).last);
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"other"}).last);
    As<protocol::Done>(a.Call(Turn("other", "a short one")).last);
  }
  // Reference: a T0 that holds everything.
  std::vector<int32_t> ref2, ref3, ref_other;
  uint64_t t2_pages = 0;
  {
    Node big(model, dir_);
    ASSERT_TRUE(big.open_status.ok());
    t2_pages = As<protocol::SessionInfo>(big.Call(protocol::GetSessionRequest{"s"}).last).t2_pages;
    ref2 = big.Call(turn("s", "second")).tokens;
    ref3 = big.Call(turn("s", "third")).tokens;
    ref_other = big.Call(turn("other", "more")).tokens;
  }
  ASSERT_GT(t2_pages, 300u);  // ten blocks or more
  // T0 of 75% of the session's pages: "t" (the fork, same history) streams
  // through a ring of a few of its 30 layers.
  const size_t page_bytes = size_t{768} * kernels::kDefaultPageTokens;  // 3 kv heads x 64 dims x K,V x fp16
  Node small(model, dir_, 32u << 20, nullptr, (t2_pages * 3 / 4) * page_bytes);
  ASSERT_TRUE(small.open_status.ok()) << small.open_status.ToString();
  ASSERT_EQ(small.engine->pool().page_bytes(), page_bytes);
  Reply r2 = small.Call(turn("t", "second"));
  auto d2 = As<protocol::Done>(r2.last);
  EXPECT_LT(d2.prompt_tokens, 40u) << "the history was recomputed";
  EXPECT_TRUE(d2.persisted) << d2.persist_error;
  EXPECT_EQ(r2.tokens, ref2) << "streamed continuation differs";
  tiering::TierStats st = small.tier->stats();
  EXPECT_GT(st.prefetch_hits + st.prefetch_stalls, 3 * t2_pages) << "pages were not streamed step after step";
  auto info = As<protocol::SessionInfo>(small.Call(protocol::GetSessionRequest{"t"}).last);
  EXPECT_EQ(info.t0_pages, 0u) << "a streamed session leaves T0 after its turn";
  // Next turn streams again, beside a session decoding at the same time.
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  Reply other;
  small.sched->Submit(Job{2, 999, 1000, turn("other", "more"), [&](protocol::ResponseBody b) {
                            std::lock_guard<std::mutex> lock(mu);
                            if (auto* c = std::get_if<protocol::TokenChunk>(&b)) {
                              other.tokens.insert(other.tokens.end(), c->token_ids.begin(), c->token_ids.end());
                              return;
                            }
                            if (std::holds_alternative<protocol::PrefillProgress>(b)) return;
                            other.last = std::move(b);
                            ++done;
                            cv.notify_all();
                          }});
  Reply r3 = small.Call(turn("t", "third"));
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, 120s, [&] { return done == 1; }));
  }
  As<protocol::Done>(r3.last);
  As<protocol::Done>(other.last);
  EXPECT_EQ(r3.tokens, ref3);
  EXPECT_EQ(other.tokens, ref_other);
}

// A session that outgrows T0 while the daemon runs (its KV fit before this
// turn; with this turn's prompt and reply it cannot) streams its committed
// KV from T2 from that turn on, without a restart, with the continuation of
// a daemon that holds it whole. Before, the turn failed for want of pages.
TEST_F(DurabilityTest, SessionOutgrowingT0StreamsFromThatTurnOn) {
  const std::string model = testutil::DefaultModelPath();
  auto turn = [](const std::string& session, const std::string& text) { return Turn(session, text, 16); };
  std::string first, second;
  for (int i = 0; i < 12; ++i) first += "The quick brown fox jumps over the lazy dog, again and again. ";
  for (int i = 0; i < 12; ++i) second += "A slow green turtle walks under the busy bridge, over and over. ";
  std::vector<int32_t> ref1, ref2, ref3;
  {
    Node big(model, Dir());
    ASSERT_TRUE(big.open_status.ok()) << big.open_status.ToString();
    As<protocol::SessionInfo>(big.Call(protocol::CreateSessionRequest{"s"}).last);
    ref1 = big.Call(turn("s", first)).tokens;
    ref2 = big.Call(turn("s", second)).tokens;
    ref3 = big.Call(turn("s", "third")).tokens;
  }
  const size_t page_bytes = 12288;
  Node small(model, dir_, 32u << 20, nullptr, 600 * page_bytes);
  ASSERT_TRUE(small.open_status.ok()) << small.open_status.ToString();
  const uint64_t capacity = small.engine->pool().capacity_pages();
  As<protocol::SessionInfo>(small.Call(protocol::CreateSessionRequest{"s"}).last);
  Reply r1 = small.Call(turn("s", first));
  As<protocol::Done>(r1.last);
  EXPECT_EQ(r1.tokens, ref1);
  auto info1 = As<protocol::SessionInfo>(small.Call(protocol::GetSessionRequest{"s"}).last);
  ASSERT_GT(info1.t0_pages, 0u) << "the session should be in T0 after its first turn";
  // The second turn about doubles the session: more than T0 holds.
  ASSERT_LT(info1.t0_pages, capacity);
  ASSERT_GT(2 * info1.t0_pages, capacity) << "turn 2 would fit T0: the test proves nothing";
  Reply r2 = small.Call(turn("s", second));
  auto d2 = As<protocol::Done>(r2.last);
  EXPECT_LT(d2.prompt_tokens, 220u) << "the history was recomputed";
  EXPECT_TRUE(d2.persisted) << d2.persist_error;
  EXPECT_EQ(r2.tokens, ref2) << "streamed continuation differs";
  auto info2 = As<protocol::SessionInfo>(small.Call(protocol::GetSessionRequest{"s"}).last);
  EXPECT_EQ(info2.t0_pages, 0u) << "a streamed session leaves T0 after its turn";
  EXPECT_GT(info2.t2_pages, capacity) << "the session is larger than T0 now";
  Reply r3 = small.Call(turn("s", "third"));
  As<protocol::Done>(r3.last);
  EXPECT_EQ(r3.tokens, ref3);
  // A first prompt that alone is more than T0 holds is refused up front,
  // with what it needs and what T0 holds; the daemon serves on.
  As<protocol::SessionInfo>(small.Call(protocol::CreateSessionRequest{"huge"}).last);
  Reply huge = small.Call(turn("huge", first + second + first));
  ASSERT_EQ(CodeOf(huge.last), StatusCode::kResourceExhausted);
  const std::string msg = std::get<protocol::ErrorReply>(huge.last).message;
  EXPECT_NE(msg.find("more than T0 holds in all (" + std::to_string(capacity) + " pages"), std::string::npos) << msg;
  EXPECT_TRUE(huge.tokens.empty());
  EXPECT_EQ(As<protocol::SessionInfo>(small.Call(protocol::GetSessionRequest{"huge"}).last).tokens, 0u);
  As<protocol::Done>(small.Call(turn("s", "fourth")).last);
}

TEST_F(DurabilityTest, ForkAndDeleteSurviveRestartAndFreeSpace) {
  {
    Node a(model_, dir_);
    ASSERT_TRUE(a.open_status.ok());
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"p"}).last);
    As<protocol::Done>(a.Call(Turn("p", "a parent message with enough text for a few pages")).last);
    auto f = As<protocol::SessionInfo>(a.Call(protocol::ForkSessionRequest{"p", "f"}).last);
    EXPECT_TRUE(f.persisted);
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"gone"}).last);
    As<protocol::Done>(a.Call(Turn("gone", "to be deleted")).last);
    As<protocol::Ack>(a.Call(protocol::DeleteSessionRequest{"gone"}).last);
  }
  Node b(model_, dir_);
  ASSERT_TRUE(b.open_status.ok());
  auto list = As<protocol::SessionList>(b.Call(protocol::ListSessionsRequest{}).last);
  ASSERT_EQ(list.sessions.size(), 2u);
  const uint64_t blocks_shared = b.tier->stats().t2_blocks;
  auto rp = b.Call(Turn("p", "next"));
  auto rf = b.Call(Turn("f", "next"));
  As<protocol::Done>(rp.last);
  As<protocol::Done>(rf.last);
  EXPECT_EQ(rp.tokens, rf.tokens);
  // Deleting both frees every block.
  As<protocol::Ack>(b.Call(protocol::DeleteSessionRequest{"p"}).last);
  As<protocol::Ack>(b.Call(protocol::DeleteSessionRequest{"f"}).last);
  EXPECT_GT(blocks_shared, 0u);
  EXPECT_EQ(b.tier->stats().t2_blocks, 0u);
}

TEST_F(DurabilityTest, ResumeUnderAnotherModelIsRefused) {
  {
    Node a(model_, dir_);
    ASSERT_TRUE(a.open_status.ok());
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
    As<protocol::Done>(a.Call(Turn("s", "hello")).last);
  }
  testutil::TinyModelSpec other;
  other.n_layers = 3;
  other.context_length = 4096;  // another file: another fingerprint, same KV geometry
  Node b(testutil::WriteTinyModel(other), dir_);
  ASSERT_TRUE(b.open_status.ok());
  As<protocol::SessionInfo>(b.Call(protocol::GetSessionRequest{"s"}).last);  // still listed
  auto r = b.Call(Turn("s", "again"));
  ASSERT_EQ(CodeOf(r.last), StatusCode::kFailedPrecondition);
  EXPECT_NE(std::get<protocol::ErrorReply>(r.last).message.find("another model"), std::string::npos);
}

TEST_F(DurabilityTest, EnospcWhilePersistingKeepsTheSessionAndEarlierTurns) {
  uint32_t turns_committed = 0;
  std::vector<int32_t> tokens_committed;
  {
    tiering::FaultInjectingPageStore* fault = nullptr;
    Node a(model_, dir_, 32u << 20, &fault);
    ASSERT_TRUE(a.open_status.ok());
    ASSERT_NE(fault, nullptr);
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
    auto d1 = As<protocol::Done>(a.Call(Turn("s", "first turn")).last);
    ASSERT_TRUE(d1.persisted);
    turns_committed = 1;
    fault->AddFault({.action = tiering::FaultRule::Action::kEnospc, .op = tiering::IoOp::kWrite, .times = 0});
    auto d2 = As<protocol::Done>(a.Call(Turn("s", "second turn fails to persist")).last);
    EXPECT_FALSE(d2.persisted);
    EXPECT_EQ(d2.persist_error_code, StatusCode::kResourceExhausted);
    EXPECT_FALSE(d2.persist_error.empty());
    // Still usable in memory, and persisting again once space is back.
    fault->ClearFaults();
    fault->AddFault({.action = tiering::FaultRule::Action::kEio, .op = tiering::IoOp::kWrite, .times = 0});
    auto d3 = As<protocol::Done>(a.Call(Turn("s", "third, EIO")).last);
    EXPECT_FALSE(d3.persisted);
    EXPECT_EQ(d3.persist_error_code, StatusCode::kIOError);
    fault->ClearFaults();
    auto d4 = As<protocol::Done>(a.Call(Turn("s", "fourth")).last);
    EXPECT_TRUE(d4.persisted) << d4.persist_error;
    turns_committed = 4;
    tokens_committed.clear();
    auto info = As<protocol::SessionInfo>(a.Call(protocol::GetSessionRequest{"s"}).last);
    EXPECT_EQ(info.turns, 4u);
  }
  Node b(model_, dir_);
  ASSERT_TRUE(b.open_status.ok());
  auto info = As<protocol::SessionInfo>(b.Call(protocol::GetSessionRequest{"s"}).last);
  EXPECT_EQ(info.turns, turns_committed);
  auto d = As<protocol::Done>(b.Call(Turn("s", "fifth")).last);
  EXPECT_LT(d.prompt_tokens, 40u);
}

TEST_F(DurabilityTest, T2BudgetExhaustedIsReportedNotPersisted) {
  Node a(model_, dir_, /*t2_budget=*/2 * 3 * 4096 * 4);  // a handful of blocks
  ASSERT_TRUE(a.open_status.ok()) << a.open_status.ToString();
  As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
  auto d = As<protocol::Done>(a.Call(Turn("s", std::string(600, 'x'), 4)).last);
  EXPECT_FALSE(d.persisted);
  EXPECT_EQ(d.persist_error_code, StatusCode::kResourceExhausted);
  // The daemon keeps serving.
  As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"t"}).last);
}

TEST_F(DurabilityTest, CorruptPageFailsOnlyItsSession) {
  {
    Node a(model_, dir_);
    ASSERT_TRUE(a.open_status.ok());
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"victim"}).last);
    As<protocol::Done>(a.Call(Turn("victim", "this session's first block gets damaged")).last);
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"bystander"}).last);
    As<protocol::Done>(a.Call(Turn("bystander", "this one stays intact")).last);
  }
  // Slot 0 holds the victim's first block: flip a byte of its layer-0 page.
  std::string slab;
  for (const auto& e : std::filesystem::directory_iterator(dir_ + "/pages"))
    if (e.is_regular_file() && e.file_size() > 4096 && (slab.empty() || e.path().string() < slab))
      slab = e.path().string();
  ASSERT_FALSE(slab.empty());
  {
    std::fstream f(slab, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(100);
    char c;
    f.read(&c, 1);
    c ^= 0x5a;
    f.seekp(100);
    f.write(&c, 1);
  }
  Node b(model_, dir_);
  ASSERT_TRUE(b.open_status.ok());
  auto r = b.Call(Turn("victim", "resume"));
  ASSERT_EQ(CodeOf(r.last), StatusCode::kCorruption);
  EXPECT_NE(std::get<protocol::ErrorReply>(r.last).message.find("victim"), std::string::npos);
  As<protocol::Done>(b.Call(Turn("bystander", "resume")).last);
}

// --- export / import ----------------------------------------------------------

struct Exported {
  ResponseBody last;  // ExportDone or an error
  std::string file;
};

// Exports `name` as `uid` the way the server does: a flow window whose
// credit comes back as each chunk is "written".
Exported ExportFrom(Node& n, const std::string& name, uid_t uid = 1000) {
  std::mutex mu;
  std::condition_variable cv;
  Exported out;
  bool done = false;
  auto window = std::make_shared<FlowWindow>(1u << 20, 10s);
  Job job{1, n.next_id++, uid, protocol::ExportSessionRequest{name}, [&, window](ResponseBody b) {
            std::lock_guard<std::mutex> lock(mu);
            if (auto* c = std::get_if<protocol::ExportChunk>(&b)) {
              EXPECT_EQ(c->offset, out.file.size());
              out.file += c->data;
              window->Release(c->data.size());
              return;
            }
            out.last = std::move(b);
            done = true;
            cv.notify_all();
          }};
  job.window = window;
  n.sched->Submit(std::move(job));
  std::unique_lock<std::mutex> lock(mu);
  EXPECT_TRUE(cv.wait_for(lock, 120s, [&] { return done; }));
  return out;
}

// Imports `file` as `uid` the way the server does: pieces to an ImportJob,
// then the scheduler commits it.
ResponseBody ImportInto(Node& n, std::string_view file, std::optional<std::string> name, uid_t uid = 1000,
                        size_t piece = 5000) {
  std::mutex mu;
  std::condition_variable cv;
  ResponseBody last;
  bool done = false;
  auto finish = [&](ResponseBody b) {
    std::lock_guard<std::mutex> lock(mu);
    if (done) return;
    last = std::move(b);
    done = true;
    cv.notify_all();
  };
  std::shared_ptr<tiering::ImportJob> job = n.tier->StartImport("test import");
  for (size_t at = 0; at < file.size(); at += piece)
    job->Feed(std::string(file.substr(at, piece)), [](Status) {});
  job->Finish([&, job](Result<tiering::Manifest> m) {
    if (!m.ok()) {
      finish(protocol::ErrorReply::FromStatus(m.status()));
      return;
    }
    ImportCommit c;
    c.conn = 1;
    c.id = n.next_id;
    c.uid = uid;
    c.name = name;
    c.job = job;
    c.manifest = std::move(m).value();
    c.reply = finish;
    n.sched->CommitImport(std::move(c));
  });
  std::unique_lock<std::mutex> lock(mu);
  EXPECT_TRUE(cv.wait_for(lock, 120s, [&] { return done; }));
  return last;
}

TEST_F(DurabilityTest, ExportedSessionImportsElsewhereAndContinuesExactly) {
  Node a(model_, Dir());
  ASSERT_TRUE(a.open_status.ok()) << a.open_status.ToString();
  As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
  As<protocol::Done>(a.Call(Turn("s", "first message, a long one to fill some pages of KV")).last);
  As<protocol::Done>(a.Call(Turn("s", "second")).last);
  As<protocol::SessionInfo>(a.Call(protocol::ForkSessionRequest{"s", "ref"}).last);
  Reply ref = a.Call(Turn("ref", "third"));
  const auto ref_done = As<protocol::Done>(ref.last);
  const auto info_a = As<protocol::SessionInfo>(a.Call(protocol::GetSessionRequest{"s"}).last);

  EXPECT_EQ(CodeOf(ExportFrom(a, "s", 2000).last), StatusCode::kNotFound) << "another uid's session";
  EXPECT_EQ(CodeOf(ExportFrom(a, "nope").last), StatusCode::kNotFound);
  Exported e = ExportFrom(a, "s");
  const auto done = As<protocol::ExportDone>(e.last);
  EXPECT_EQ(done.bytes, e.file.size());
  EXPECT_EQ(done.checksum, XXH3_64bits(e.file.data(), e.file.size()));

  Node b(model_, Dir());
  ASSERT_TRUE(b.open_status.ok());
  auto imported = As<protocol::SessionInfo>(ImportInto(b, e.file, std::nullopt));
  EXPECT_EQ(imported.name, "s");
  EXPECT_EQ(imported.tokens, info_a.tokens);
  EXPECT_EQ(imported.turns, info_a.turns);
  EXPECT_EQ(imported.t2_pages, info_a.t2_pages);
  EXPECT_EQ(CodeOf(ImportInto(b, e.file, std::nullopt)), StatusCode::kAlreadyExists);
  // Another uid may hold the same name: it owns its own copy.
  As<protocol::SessionInfo>(ImportInto(b, e.file, std::nullopt, 2000));
  Reply r = b.Call(Turn("s", "third"));
  auto d = As<protocol::Done>(r.last);
  EXPECT_EQ(r.tokens, ref.tokens) << "the imported session diverged from the uninterrupted one";
  EXPECT_EQ(d.prompt_tokens, ref_done.prompt_tokens) << "the import recomputed history";
  EXPECT_TRUE(d.persisted);
  Reply r2 = b.Call(Turn("s", "third"), 2000);
  EXPECT_EQ(r2.tokens, ref.tokens);
  // Exported again after a turn on the importing side: still exact.
  Exported e2 = ExportFrom(b, "s");
  As<protocol::ExportDone>(e2.last);
  As<protocol::SessionInfo>(ImportInto(a, e2.file, std::string("back")));
  auto back = As<protocol::SessionInfo>(a.Call(protocol::GetSessionRequest{"back"}).last);
  EXPECT_EQ(back.tokens, As<protocol::SessionInfo>(b.Call(protocol::GetSessionRequest{"s"}).last).tokens);
}

TEST_F(DurabilityTest, ExportOfAnUnpersistedTurnIsRefused) {
  tiering::FaultInjectingPageStore* fault = nullptr;
  Node a(model_, dir_, 32u << 20, &fault);
  ASSERT_TRUE(a.open_status.ok());
  As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
  As<protocol::Done>(a.Call(Turn("s", "first turn")).last);
  fault->AddFault({.action = tiering::FaultRule::Action::kEio, .op = tiering::IoOp::kWrite, .times = 0});
  EXPECT_FALSE(As<protocol::Done>(a.Call(Turn("s", "second turn fails to persist")).last).persisted);
  fault->ClearFaults();
  Exported e = ExportFrom(a, "s");
  ASSERT_EQ(CodeOf(e.last), StatusCode::kFailedPrecondition);
  EXPECT_NE(std::get<protocol::ErrorReply>(e.last).message.find("not persisted"), std::string::npos);
  EXPECT_TRUE(As<protocol::Done>(a.Call(Turn("s", "third")).last).persisted);
  As<protocol::ExportDone>(ExportFrom(a, "s").last);
}

TEST_F(DurabilityTest, ImportUnderAnotherModelIsRefusedAndLeavesNothing) {
  std::string file;
  {
    Node a(model_, Dir());
    ASSERT_TRUE(a.open_status.ok());
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
    As<protocol::Done>(a.Call(Turn("s", "hello there, some pages")).last);
    file = ExportFrom(a, "s").file;
  }
  testutil::TinyModelSpec other;
  other.n_layers = 3;
  other.context_length = 4096;  // another file: another fingerprint
  Node b(testutil::WriteTinyModel(other), dir_);
  ASSERT_TRUE(b.open_status.ok());
  ResponseBody r = ImportInto(b, file, std::nullopt);
  ASSERT_EQ(CodeOf(r), StatusCode::kFailedPrecondition);
  EXPECT_NE(std::get<protocol::ErrorReply>(r).message.find("another model file"), std::string::npos);
  EXPECT_TRUE(As<protocol::SessionList>(b.Call(protocol::ListSessionsRequest{}).last).sessions.empty());
}

TEST_F(DurabilityTest, FailedImportsReleaseTheirBlocks) {
  std::string file;
  {
    Node a(model_, Dir());
    ASSERT_TRUE(a.open_status.ok());
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
    As<protocol::Done>(a.Call(Turn("s", std::string(200, 'y'))).last);
    file = ExportFrom(a, "s").file;
  }
  tiering::FaultInjectingPageStore* fault = nullptr;
  Node b(model_, dir_, 32u << 20, &fault);
  ASSERT_TRUE(b.open_status.ok());
  const uint64_t free0 = b.tier->stats().t2_blocks;
  fault->AddFault({.action = tiering::FaultRule::Action::kEio, .op = tiering::IoOp::kWrite, .times = 0});
  EXPECT_EQ(CodeOf(ImportInto(b, file, std::nullopt)), StatusCode::kIOError);
  fault->ClearFaults();
  std::string bad = file;
  bad[bad.size() / 2] ^= 1;
  EXPECT_EQ(CodeOf(ImportInto(b, bad, std::nullopt)), StatusCode::kCorruption);
  EXPECT_EQ(CodeOf(ImportInto(b, std::string_view(file).substr(0, file.size() - 1), std::nullopt)),
            StatusCode::kCorruption);
  // A job dropped midway (the client went away) frees what it reserved.
  {
    auto job = b.tier->StartImport("abandoned");
    job->Feed(file.substr(0, file.size() / 2), [](Status) {});
    job->Abort();
  }
  EXPECT_TRUE(As<protocol::SessionList>(b.Call(protocol::ListSessionsRequest{}).last).sessions.empty());
  EXPECT_EQ(b.tier->stats().t2_blocks, free0);
  // The store still takes imports (queued behind the abort's release).
  for (int i = 0; i < 3; ++i)
    As<protocol::SessionInfo>(ImportInto(b, file, "copy" + std::to_string(i)));
  EXPECT_EQ(b.tier->stats().t2_reserved_blocks, 0u) << "a failed import kept its reservation";
}

// --- power loss and torn writes ------------------------------------------------

// Stops a persist at one stage (TierOptions::persist_hook) once armed, until
// the test lets it go on with a status. Thread-safe.
class PersistGate {
 public:
  void Arm(tiering::PersistStage stage) {
    std::lock_guard<std::mutex> lock(mu_);
    armed_ = true;
    stage_ = stage;
  }
  // The hook: runs on the tier manager's persist worker.
  Status At(tiering::PersistStage stage) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!armed_ || stage != stage_) return Status::Ok();
    armed_ = false;
    reached_ = true;
    cv_.notify_all();
    cv_.wait(lock, [&] { return released_; });
    return release_status_;
  }
  bool WaitReached(std::chrono::seconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return reached_; });
  }
  // Idempotent: the first status wins.
  void Release(Status status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (released_) return;
    release_status_ = std::move(status);
    released_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool armed_ = false, reached_ = false, released_ = false;
  tiering::PersistStage stage_ = tiering::PersistStage::kBlocksWritten;
  Status release_status_;
};

// Records the slots of the writes a FaultInjectingPageStore sees from now on
// (a rule that never fires). The set is read once those writes completed.
void RecordWrites(tiering::FaultInjectingPageStore* fault, std::set<tiering::BlockSlot>* slots) {
  tiering::FaultRule rule;
  rule.op = tiering::IoOp::kWrite;
  rule.times = 0;
  rule.match = [slots](const tiering::IoRequest& r) {
    slots->insert(r.slot);
    return false;
  };
  fault->AddFault(std::move(rule));
}

class PowerLossTest : public DurabilityTest, public ::testing::WithParamInterface<tiering::PersistStage> {};

// The power fails while turn 3 of "s" persists: after its new blocks were
// written but before they were synced, or after the sync but before the
// manifest commit. What the disks hold at that moment is copied and the
// whole stack restarts on the copy, as when the power comes back: the page
// store with every write not covered by a sync dropped (SimulatePowerLoss),
// and the index as it is, since every index mutation is a synced RocksDB
// write and none is in flight then. Every committed turn of every session is
// there, the lost turn's blocks are free again (and are what the retried
// turn gets), and every continuation equals the uninterrupted run's.
TEST_P(PowerLossTest, CommittedTurnsSurviveAndTheLostTurnIsReclaimed) {
  const tiering::PersistStage stage = GetParam();
  const std::string first = "first message, a long one to fill some pages of KV";
  const std::string lost_text = "third, the turn the power loss takes";
  // Reference: the same requests, uninterrupted.
  Reply ref_s3, ref_s4, ref_f2, ref_b2;
  {
    Node ref(model_, Dir());
    ASSERT_TRUE(ref.open_status.ok()) << ref.open_status.ToString();
    As<protocol::SessionInfo>(ref.Call(protocol::CreateSessionRequest{"s"}).last);
    As<protocol::SessionInfo>(ref.Call(protocol::CreateSessionRequest{"b"}).last);
    As<protocol::Done>(ref.Call(Turn("s", first)).last);
    As<protocol::SessionInfo>(ref.Call(protocol::ForkSessionRequest{"s", "f"}).last);
    As<protocol::Done>(ref.Call(Turn("s", "second")).last);
    As<protocol::Done>(ref.Call(Turn("b", "a bystander's committed turn")).last);
    ref_s3 = ref.Call(Turn("s", lost_text));
    ref_s4 = ref.Call(Turn("s", "fourth"));
    ref_f2 = ref.Call(Turn("f", "the fork goes on"));
    ref_b2 = ref.Call(Turn("b", "and the bystander too"));
  }
  ASSERT_FALSE(ref_s3.tokens.empty());
  ASSERT_FALSE(ref_s4.tokens.empty());
  // A resume prefills only the new message, as the uninterrupted run did.
  auto expect_same = [](const Reply& got, const Reply& want) {
    const auto d = As<protocol::Done>(got.last);
    EXPECT_TRUE(d.persisted) << d.persist_error;
    EXPECT_EQ(d.prompt_tokens, As<protocol::Done>(want.last).prompt_tokens) << "the history was recomputed";
    EXPECT_EQ(got.tokens, want.tokens) << "the continuation differs from the uninterrupted one";
  };

  const std::string after_dir = Dir();  // the disks as the power loss left them
  std::map<std::string, protocol::SessionInfo> before;
  std::set<tiering::BlockSlot> lost_slots;
  uint64_t committed_blocks = 0;
  {
    PersistGate gate;
    tiering::FaultInjectingPageStore* fault = nullptr;
    Node a(model_, dir_, 32u << 20, &fault, 64u << 20, true, [&gate](tiering::TierOptions* to) {
      to->persist_hook = [&gate](tiering::PersistStage st) { return gate.At(st); };
    });
    ASSERT_TRUE(a.open_status.ok()) << a.open_status.ToString();
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"s"}).last);
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"b"}).last);
    ASSERT_TRUE(As<protocol::Done>(a.Call(Turn("s", first)).last).persisted);
    As<protocol::SessionInfo>(a.Call(protocol::ForkSessionRequest{"s", "f"}).last);
    ASSERT_TRUE(As<protocol::Done>(a.Call(Turn("s", "second")).last).persisted);
    ASSERT_TRUE(As<protocol::Done>(a.Call(Turn("b", "a bystander's committed turn")).last).persisted);
    for (const char* name : {"s", "f", "b"})
      before[name] = As<protocol::SessionInfo>(a.Call(protocol::GetSessionRequest{name}).last);
    committed_blocks = a.tier->stats().t2_blocks;
    ASSERT_GT(committed_blocks, 0u);
    ASSERT_EQ(fault->unsynced_pages(), 0u);

    RecordWrites(fault, &lost_slots);
    gate.Arm(stage);
    Reply lost;
    std::jthread turn([&] { lost = a.Call(Turn("s", lost_text)); });
    struct Releaser {  // lets the persist go on (and `turn` end) on every way out
      PersistGate& gate;
      ~Releaser() { gate.Release(Status::Unavailable("power lost")); }
    } releaser{gate};
    ASSERT_TRUE(gate.WaitReached(120s)) << "the persist never reached the stage";
    ASSERT_FALSE(lost_slots.empty()) << "the lost turn wrote no block";
    const size_t unsynced = fault->unsynced_pages();
    if (stage == tiering::PersistStage::kBlocksWritten) {
      EXPECT_GT(unsynced, 0u);
    } else {
      EXPECT_EQ(unsynced, 0u) << "the turn's blocks should be synced before its commit";
    }
    Result<size_t> reverted = fault->SimulatePowerLoss();
    ASSERT_TRUE(reverted.ok()) << reverted.status().ToString();
    EXPECT_EQ(*reverted, unsynced);
    std::filesystem::copy(dir_, after_dir, std::filesystem::copy_options::recursive);
    gate.Release(Status::Unavailable("power lost"));
    turn.join();
    const auto d = As<protocol::Done>(lost.last);
    EXPECT_FALSE(d.persisted);
  }

  {
    tiering::FaultInjectingPageStore* fault = nullptr;
    Node b(model_, after_dir, 32u << 20, &fault);
    ASSERT_TRUE(b.open_status.ok()) << b.open_status.ToString();
    const tiering::TierStats st = b.tier->stats();
    EXPECT_EQ(st.t2_blocks, committed_blocks);
    EXPECT_EQ(st.t2_reserved_blocks, 0u);
    EXPECT_EQ(b.tier->recovery().slots_free, st.t2_budget_bytes / st.block_bytes - committed_blocks)
        << "the lost turn's blocks are not free again";
    for (const char* name : {"s", "f", "b"}) {
      SCOPED_TRACE(name);
      const auto info = As<protocol::SessionInfo>(b.Call(protocol::GetSessionRequest{name}).last);
      EXPECT_EQ(info.tokens, before[name].tokens);
      EXPECT_EQ(info.turns, before[name].turns);
      EXPECT_EQ(info.t2_pages, before[name].t2_pages);
      EXPECT_TRUE(info.persisted);
    }
    // The turn the power loss took, again: it resumes the committed history
    // and lands in the reclaimed blocks.
    std::set<tiering::BlockSlot> written;
    RecordWrites(fault, &written);
    expect_same(b.Call(Turn("s", lost_text)), ref_s3);
    EXPECT_EQ(written, lost_slots) << "the retried turn did not reuse the reclaimed blocks";
    fault->ClearFaults();
    expect_same(b.Call(Turn("f", "the fork goes on")), ref_f2);
  }
  // Once more from disk: the blocks written into the reclaimed slots resume.
  Node c(model_, after_dir);
  ASSERT_TRUE(c.open_status.ok()) << c.open_status.ToString();
  expect_same(c.Call(Turn("s", "fourth")), ref_s4);
  expect_same(c.Call(Turn("b", "and the bystander too")), ref_b2);
}

INSTANTIATE_TEST_SUITE_P(Stages, PowerLossTest,
                         ::testing::Values(tiering::PersistStage::kBlocksWritten,
                                           tiering::PersistStage::kBeforeCommit),
                         [](const ::testing::TestParamInfo<tiering::PersistStage>& p) {
                           return p.param == tiering::PersistStage::kBlocksWritten ? std::string("WrittenNotSynced")
                                                                                    : std::string("SyncedNotCommitted");
                         });

// A write the device tears but reports complete (only its first 4 KiB reach
// the medium: kTornWrite) gets past the sync and the commit, so the turn is
// reported persisted; nothing above the device could tell. The first read of
// the block must: an export on the same daemon, and after a restart every
// resume of that session, fail with Corruption naming it, while the other
// session resumes exactly, nothing else is lost and the failed resume leaks
// neither T0 pages nor T2 blocks.
TEST_F(DurabilityTest, TornWriteReportedDoneFailsOnlyItsSessionAtResume) {
  std::vector<int32_t> ref_bystander;
  {
    Node ref(model_, Dir());
    ASSERT_TRUE(ref.open_status.ok()) << ref.open_status.ToString();
    As<protocol::SessionInfo>(ref.Call(protocol::CreateSessionRequest{"bystander"}).last);
    As<protocol::Done>(ref.Call(Turn("bystander", "this one stays intact, across a few pages of KV")).last);
    ref_bystander = ref.Call(Turn("bystander", "resume")).tokens;
  }
  uint64_t blocks = 0;
  {
    tiering::FaultInjectingPageStore* fault = nullptr;
    Node a(model_, dir_, 32u << 20, &fault);
    ASSERT_TRUE(a.open_status.ok()) << a.open_status.ToString();
    ASSERT_GT(a.tier->layout().block_bytes, tiering::kDirectIoAlignment) << "a torn block needs several 4 KiB pages";
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"victim"}).last);
    As<protocol::SessionInfo>(a.Call(protocol::CreateSessionRequest{"bystander"}).last);
    ASSERT_TRUE(As<protocol::Done>(a.Call(Turn("victim", "a first turn that reaches the disk whole")).last).persisted);
    const Reply first_b = a.Call(Turn("bystander", "this one stays intact, across a few pages of KV"));
    ASSERT_TRUE(As<protocol::Done>(first_b.last).persisted);
    tiering::FaultRule torn;
    torn.action = tiering::FaultRule::Action::kTornWrite;
    torn.op = tiering::IoOp::kWrite;
    torn.torn_bytes = tiering::kDirectIoAlignment;
    fault->AddFault(torn);
    const auto d = As<protocol::Done>(a.Call(Turn("victim", "the second turn's first block gets torn")).last);
    EXPECT_TRUE(d.persisted) << "the device reported the write done: " << d.persist_error;
    ASSERT_EQ(fault->faults_fired(), 1u);
    // An export reads the blocks back from T2 (T1 is off) and verifies them.
    Exported e = ExportFrom(a, "victim");
    ASSERT_EQ(CodeOf(e.last), StatusCode::kCorruption);
    EXPECT_NE(std::get<protocol::ErrorReply>(e.last).message.find("victim"), std::string::npos)
        << std::get<protocol::ErrorReply>(e.last).message;
    As<protocol::ExportDone>(ExportFrom(a, "bystander").last);
    blocks = a.tier->stats().t2_blocks;
  }
  Node b(model_, dir_);
  ASSERT_TRUE(b.open_status.ok()) << b.open_status.ToString();
  const uint64_t free_pages = b.engine->pool().free_pages();
  for (int attempt = 0; attempt < 2; ++attempt) {
    SCOPED_TRACE("attempt " + std::to_string(attempt));
    Reply r = b.Call(Turn("victim", "resume"));
    ASSERT_EQ(CodeOf(r.last), StatusCode::kCorruption);
    const std::string& msg = std::get<protocol::ErrorReply>(r.last).message;
    EXPECT_NE(msg.find("victim"), std::string::npos) << msg;
    EXPECT_NE(msg.find("checksum"), std::string::npos) << msg;
    EXPECT_EQ(b.engine->pool().free_pages(), free_pages) << "the failed resume kept T0 pages";
  }
  // Still listed with every committed turn; no block was dropped.
  auto info = As<protocol::SessionInfo>(b.Call(protocol::GetSessionRequest{"victim"}).last);
  EXPECT_EQ(info.turns, 2u);
  EXPECT_EQ(b.tier->stats().t2_blocks, blocks);
  Reply rb = b.Call(Turn("bystander", "resume"));
  const auto db = As<protocol::Done>(rb.last);
  EXPECT_TRUE(db.persisted);
  EXPECT_LT(db.prompt_tokens, 40u) << "the history was recomputed";
  EXPECT_EQ(rb.tokens, ref_bystander);
  // The daemon keeps serving new sessions.
  As<protocol::SessionInfo>(b.Call(protocol::CreateSessionRequest{"new"}).last);
  EXPECT_TRUE(As<protocol::Done>(b.Call(Turn("new", "hello")).last).persisted);
}

}  // namespace
}  // namespace mnemo::daemon
