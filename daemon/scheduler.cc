// Continuous batching over LlamaModel::Forward: admission, step composition,
// sampling, stop handling and turn bookkeeping of every session.
#include "daemon/scheduler.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <random>

#include <spdlog/spdlog.h>

#include "common/thread_name.h"
#include "model/sampler.h"
#include "model/stop.h"

namespace mnemo::daemon {
namespace {

using Clock = std::chrono::steady_clock;

double NowSeconds() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

uint64_t UnixMs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

// Prompts longer than this report PrefillProgress after each chunk.
constexpr size_t kProgressMinTokens = 64;

protocol::FinishReason ToWire(model::FinishReason r) {
  return static_cast<protocol::FinishReason>(static_cast<uint8_t>(r));
}

}  // namespace

// A resume load's progress, shared by the load thread and the scheduler.
struct LoadState {
  std::mutex mu;
  std::condition_variable cv;
  int32_t layers_ready = 0;  // guarded by mu
  bool done = false;         // guarded by mu
  Status status;             // guarded by mu; final once done
  // Scheduler thread only: a pipelined step took the pages over, so the
  // posted completion has nothing left to do.
  bool consumed = false;
};

// Forward's view of a load in progress: waits for each layer, counting
// the layers that were ready (prefetch hits) and the time spent waiting.
class LoadGate : public model::KvLayerGate {
 public:
  explicit LoadGate(LoadState* load) : load_(load) {}
  Status WaitLayer(int32_t layer) override {
    std::unique_lock<std::mutex> lock(load_->mu);
    if (load_->layers_ready > layer) {
      ++hits_;
      return Status::Ok();
    }
    ++stalls_;
    const auto t0 = std::chrono::steady_clock::now();
    load_->cv.wait(lock, [&] { return load_->layers_ready > layer || load_->done; });
    stall_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (load_->layers_ready > layer) return Status::Ok();
    return load_->status.ok() ? Status::Internal("KV load ended before layer " + std::to_string(layer))
                              : load_->status;
  }
  int32_t hits() const { return hits_; }
  int32_t stalls() const { return stalls_; }
  double stall_seconds() const { return stall_s_; }

 private:
  LoadState* const load_;
  int32_t hits_ = 0, stalls_ = 0;
  double stall_s_ = 0;
};

// Forward's view of a session streamed through a ring of pages.
class StreamGate : public model::KvLayerGate {
 public:
  explicit StreamGate(tiering::KvStream* stream) : stream_(stream) {}
  Status WaitLayer(int32_t layer) override { return stream_->WaitLayer(layer); }
  void LayerDone(int32_t layer) override { stream_->LayerDone(layer); }

 private:
  tiering::KvStream* const stream_;
};

struct ActiveRequest {
  uint64_t conn = 0;
  uint64_t id = 0;
  uid_t uid = 0;
  Session* session = nullptr;
  ReplyFn reply;
  model::Sampler sampler;
  model::StopMatcher stop;
  uint32_t max_tokens = 0;
  bool chat = false;
  // The session as it was before this turn, to roll back to.
  size_t tokens0 = 0;
  int64_t kv0 = 0;
  std::string close_text0;
  bool chat_open0 = false;
  bool persisted0 = false;
  uint32_t prompt_tokens = 0;   // tokens prefilled by this turn
  uint32_t generated = 0;
  double t_arrive = 0, t_first = 0, t_last = 0;
  bool cancelled = false;
  bool detached = false;  // the connection is gone: replies are dropped
  bool loading = false;   // the session's KV is being read from T2
  std::shared_ptr<LoadState> load;                      // while loading
  std::vector<std::vector<attention::PageId>> load_pages;  // their destination
  Clock::time_point load_start{};  // when the load began (its wait is a prefetch stall)
  uint64_t load_page_count = 0;    // layer pages the load brings into T0
  // Larger than T0: the session's committed KV streams through a ring.
  bool streamed = false;
  int32_t stream_window = 0;
  uint64_t stream_cold = 0;  // streamed blocks (pages per layer visit)
  std::vector<std::vector<attention::PageId>> stream_ring;  // [window][cold block]
  std::unique_ptr<tiering::KvStream> stream;                 // while it runs
  tiering::KvStreamStats stream_counted;                     // already in the tier stats
  protocol::Done done;    // built at the end of the turn, sent once persisted

  ActiveRequest(model::Sampler s, model::StopMatcher m) : sampler(std::move(s)), stop(std::move(m)) {}
  void Reply(protocol::ResponseBody body) {
    if (!detached && reply) reply(std::move(body));
  }
};

Scheduler::Scheduler(model::Engine* engine, SchedulerOptions options, Metrics* metrics)
    : engine_(engine),
      options_(options),
      metrics_(metrics),
      sessions_(options.max_sessions_per_uid),
      pacer_(PrefillPacer::Options{.initial_rows = static_cast<double>(options.step_tokens),
                                   .max_rows = static_cast<double>(options.prefill_chunk)}) {}

Scheduler::~Scheduler() { Shutdown(std::chrono::milliseconds(0)); }

Status Scheduler::Recover() {
  if (!options_.tier) return Status::Ok();
  MNEMO_ASSIGN_OR_RETURN(std::vector<tiering::Manifest> manifests, options_.tier->LoadManifests());
  size_t incompatible = 0;
  for (tiering::Manifest& m : manifests) {
    Session* s = sessions_.Restore(m.owner_uid, m.name);
    s->parent = m.parent;
    s->tokens = std::move(m.tokens);
    s->close_text = m.close_text;
    s->chat_open = m.chat_open;
    s->turns = m.turns;
    s->created_unix_ms = m.created_unix_ms;
    s->last_used_unix_ms = m.last_used_unix_ms;
    s->t2 = tiering::CommittedKv{m.kv_tokens, std::move(m.blocks), m.turn_seq};
    s->persisted = true;
    s->resume_error = options_.tier->CheckCompatible(m);
    incompatible += !s->resume_error.ok();
  }
  session_count_.store(static_cast<uint32_t>(sessions_.size()));
  if (!manifests.empty())
    spdlog::info("recovered {} sessions ({} under another model or KV layout, kept but not resumable)",
                 manifests.size(), incompatible);
  return Status::Ok();
}

void Scheduler::Start() {
  heartbeat_.store(Clock::now().time_since_epoch().count());
  thread_ = std::thread([this] {
    SetThreadName("mnemo-sched");
    Run();
  });
}

void Scheduler::Submit(Job job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!draining_) {
      inbox_.push_back(std::move(job));
      cv_.notify_one();
      return;
    }
  }
  if (job.reply) job.reply(protocol::ErrorReply::FromStatus(Status::Unavailable("mnemod is shutting down")));
}

void Scheduler::CommitImport(ImportCommit c) {
  auto shared = std::make_shared<ImportCommit>(std::move(c));
  Post([this, shared] { DoCommitImport(*shared); });
}

void Scheduler::CancelConnection(uint64_t conn) {
  std::lock_guard<std::mutex> lock(mu_);
  dead_conns_.push_back(conn);
  cv_.notify_one();
}

void Scheduler::Shutdown(std::chrono::milliseconds grace) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!draining_) {
      draining_ = true;
      drain_deadline_ = Clock::now() + grace;
    } else {
      drain_deadline_ = std::min(drain_deadline_, Clock::now() + grace);
    }
    cv_.notify_one();
  }
  if (thread_.joinable()) thread_.join();
}

void Scheduler::Run() {
  for (;;) {
    std::deque<Job> jobs;
    std::vector<uint64_t> dead;
    std::deque<std::function<void()>> posted;
    bool draining;
    Clock::time_point deadline;
    bool runnable = !running_.empty();
    for (const auto& r : waiting_) runnable |= !r->loading;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::seconds(1), [&] {
        return !inbox_.empty() || !dead_conns_.empty() || !posted_.empty() || (draining_ && !draining_local_) ||
               runnable;
      });
      jobs.swap(inbox_);
      dead.swap(dead_conns_);
      posted.swap(posted_);
      draining = draining_;
      deadline = drain_deadline_;
    }
    heartbeat_.store(Clock::now().time_since_epoch().count());
    for (auto& fn : posted) fn();
    for (uint64_t conn : dead) {
      auto mark = [&](auto& list) {
        for (auto& r : list)
          if (r->conn == conn) r->cancelled = r->detached = true;
      };
      mark(running_);
      mark(waiting_);
      for (auto& [key, window] : exports_)
        if (key.first == conn) window->Cancel(Status::Cancelled("connection closed"));
      std::erase_if(deferred_exports_, [conn](const Job& j) { return j.conn == conn; });
    }
    RunDeferredExports();
    for (Job& job : jobs) Handle(std::move(job));
    if (draining && !draining_local_) {
      draining_local_ = true;
      for (auto& [key, window] : exports_) window->Cancel(Status::Unavailable("mnemod is shutting down"));
      for (Job& j : deferred_exports_)
        j.reply(protocol::ErrorReply::FromStatus(Status::Unavailable("mnemod is shutting down")));
      deferred_exports_.clear();
      // Queued requests have not started: refuse them now (those loading
      // KV end when their load completes).
      for (size_t i = 0; i < waiting_.size();) {
        if (waiting_[i]->loading) {
          waiting_[i]->cancelled = true;
          ++i;
        } else {
          Fail(waiting_[i].get(), Status::Unavailable("mnemod is shutting down"));
        }
      }
    }
    if (draining && Clock::now() >= deadline) {
      while (!running_.empty())
        Fail(running_.front().get(),
             Status::Unavailable("mnemod is shutting down: generation ended before completion"));
    }
    if (draining && running_.empty() && waiting_.empty() && persisting_.empty() && exports_.empty()) break;
    Admit();
    if (!running_.empty()) Step();
    PublishGauges();
  }
  PublishGauges();
}

void Scheduler::Post(std::function<void()> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  posted_.push_back(std::move(fn));
  cv_.notify_one();
}

void Scheduler::PublishGauges() {
  running_count_.store(static_cast<uint32_t>(running_.size() + persisting_.size()));
  waiting_count_.store(static_cast<uint32_t>(waiting_.size()));
  session_count_.store(static_cast<uint32_t>(sessions_.size()));
  if (!metrics_) return;
  metrics_->SetRequests(running_count_.load(), waiting_count_.load());
  metrics_->SetSessions(session_count_.load());
  const attention::PagePool& pool = engine_->pool();
  t0_pages_.store(pool.used_pages());
  t0_bytes_.store(pool.used_pages() * pool.page_bytes());
  t0_budget_bytes_.store(pool.capacity_pages() * pool.page_bytes());
  metrics_->SetTier("T0", t0_pages_.load(), t0_bytes_.load(), t0_budget_bytes_.load());
  if (Clock::now() - tier_stats_at_ > std::chrono::milliseconds(500)) {
    tier_stats_at_ = Clock::now();
    PublishTiers();
  }
}

void Scheduler::PublishTiers() {
  if (!metrics_) return;
  std::lock_guard<std::mutex> lock(publish_mu_);
  protocol::TierUsage t0;
  t0.tier = "T0";
  t0.pages = t0_pages_.load();
  t0.bytes = t0_bytes_.load();
  t0.budget_bytes = t0_budget_bytes_.load();
  if (!options_.tier) {
    metrics_->SetTierUsage(t0);
    return;
  }
  const tiering::TierStats t = options_.tier->stats();
  t0.hits = t.t0_hits;
  t0.misses = t.t0_misses;
  t0.bytes_read = t.t0_bytes_read;
  t0.bytes_written = t.t0_bytes_written;
  t0.prefetch_hits = t.prefetch_hits;
  t0.prefetch_stalls = t.prefetch_stalls;
  t0.prefetch_stall_s = static_cast<double>(t.prefetch_stall_ns) / 1e9;
  protocol::TierUsage t1;
  t1.tier = "T1";
  t1.pages = t.t1_blocks * t.n_layers;
  t1.bytes = t.t1_bytes;
  t1.budget_bytes = t.t1_budget_bytes;
  t1.hits = t.t1_hits;
  t1.misses = t.t1_misses;
  t1.bytes_read = t.t1_bytes_read;
  t1.bytes_written = t.t1_bytes_written;
  protocol::TierUsage t2;
  t2.tier = "T2";
  t2.pages = t.t2_blocks * t.n_layers;
  t2.bytes = t.t2_bytes;
  t2.budget_bytes = t.t2_budget_bytes;
  t2.bytes_read = t.bytes_read;
  t2.bytes_written = t.bytes_written;
  t2.io_latency = {ToIoLatency("read", t.t2_read_latency), ToIoLatency("write", t.t2_write_latency),
                   ToIoLatency("sync", t.t2_sync_latency)};
  metrics_->SetTierUsage(t0);
  metrics_->SetTierUsage(t1);
  metrics_->SetTierUsage(t2);
}

protocol::SessionInfo Scheduler::Info(const Session& s) const {
  protocol::SessionInfo info;
  info.name = s.name;
  info.parent = s.parent;
  info.tokens = static_cast<uint32_t>(s.tokens.size());
  info.turns = s.turns;
  if (s.seq != 0) {
    if (const attention::SeqKv* kv = engine_->kv().Get(s.seq)) {
      for (const auto& layer : kv->layers) info.t0_pages += static_cast<uint32_t>(layer.size());
    }
  }
  const uint32_t n_layers = static_cast<uint32_t>(engine_->model().config().n_layers);
  info.t2_pages = static_cast<uint32_t>(s.t2.blocks.size()) * n_layers;
  if (options_.tier) info.t1_pages = options_.tier->CountT1(s.t2.blocks) * n_layers;
  // The session's KV, wherever it is.
  info.kv_pages = s.seq != 0 ? info.t0_pages : info.t2_pages;
  info.kv_bytes = static_cast<uint64_t>(info.kv_pages) * engine_->pool().page_bytes();
  info.created_unix_ms = s.created_unix_ms;
  info.last_used_unix_ms = s.last_used_unix_ms;
  info.persisted = s.persisted;
  return info;
}

void Scheduler::Handle(Job job) {
  using namespace protocol;
  auto reply_error = [&](const Status& s) { job.reply(ErrorReply::FromStatus(s)); };
  if (auto* req = std::get_if<GenerateRequest>(&job.body)) {
    (void)req;
    HandleGenerate(std::move(job));
    return;
  }
  if (auto* req = std::get_if<CancelRequest>(&job.body)) {
    for (auto& r : running_)
      if (r->conn == job.conn && r->id == req->target_id) r->cancelled = true;
    // Queued requests end at once.
    for (size_t i = 0; i < waiting_.size(); ++i) {
      if (waiting_[i]->conn == job.conn && waiting_[i]->id == req->target_id) {
        if (waiting_[i]->loading) {
          waiting_[i]->cancelled = true;  // ends when the load completes
        } else {
          Finish(waiting_[i].get(), model::FinishReason::kCancelled);
        }
        break;
      }
    }
    if (auto it = exports_.find({job.conn, req->target_id}); it != exports_.end())
      it->second->Cancel(Status::Cancelled("export cancelled"));
    // Idempotent: cancelling a finished or unknown request is not an error,
    // since the race between a request ending and its cancel is inherent.
    job.reply(Ack{});
    return;
  }
  if (draining_local_) {
    if (metrics_ && std::holds_alternative<ExportSessionRequest>(job.body)) {
      metrics_->TransferStarted(Metrics::Transfer::kExport);
      metrics_->TransferEnded(Metrics::Transfer::kExport, StatusCode::kUnavailable);
    }
    reply_error(Status::Unavailable("mnemod is shutting down"));
    return;
  }
  if (auto* req = std::get_if<CreateSessionRequest>(&job.body)) {
    Result<Session*> s = sessions_.Create(job.uid, req->name, UnixMs());
    if (!s.ok()) return reply_error(s.status());
    if (options_.tier) {
      // Durable from creation: the session survives a restart even before
      // its first turn.
      tiering::Manifest m = ManifestOf(**s);
      m.turn_seq = 1;
      if (Status st = options_.tier->CommitManifest(m); !st.ok()) {
        sessions_.Erase(job.uid, (*s)->name);
        return reply_error(st.WithContext("creating session"));
      }
      (*s)->t2.turn_seq = 1;
      (*s)->persisted = true;
    }
    job.reply(Info(**s));
    return;
  }
  if (std::holds_alternative<ListSessionsRequest>(job.body)) {
    SessionList list;
    for (Session* s : sessions_.List(job.uid)) list.sessions.push_back(Info(*s));
    job.reply(std::move(list));
    return;
  }
  if (auto* req = std::get_if<GetSessionRequest>(&job.body)) {
    Result<Session*> s = sessions_.Find(job.uid, req->session);
    if (!s.ok()) return reply_error(s.status());
    job.reply(Info(**s));
    return;
  }
  if (auto* req = std::get_if<ForkSessionRequest>(&job.body)) {
    ForkSessionRequest copy = *req;
    HandleFork(job, copy);
    return;
  }
  if (auto* req = std::get_if<DeleteSessionRequest>(&job.body)) {
    Result<Session*> s = sessions_.Find(job.uid, req->session);
    if (!s.ok()) return reply_error(s.status());
    if ((*s)->active)
      return reply_error(Status::FailedPrecondition("session '" + req->session +
                                                    "' has a generation running; cancel it first"));
    if (options_.tier && (*s)->t2.turn_seq > 0) {
      Status st = options_.tier->Delete(job.uid, req->session);
      if (!st.ok() && st.code() != StatusCode::kNotFound) return reply_error(st.WithContext("deleting session"));
    }
    if ((*s)->seq != 0) (void)engine_->kv().FreeSeq((*s)->seq);
    sessions_.Erase(job.uid, req->session);
    job.reply(Ack{});
    return;
  }
  if (std::holds_alternative<ExportSessionRequest>(job.body)) {
    HandleExport(std::move(job));
    return;
  }
  reply_error(Status::InvalidArgument("request type not handled by the scheduler"));
}

const Session* Scheduler::ExportWaits(const Job& job) {
  Result<Session*> s = sessions_.Find(job.uid, std::get<protocol::ExportSessionRequest>(job.body).session);
  return s.ok() && (*s)->active ? *s : nullptr;
}

void Scheduler::RunDeferredExports() {
  if (deferred_exports_.empty()) return;
  std::vector<Job> ready;
  std::erase_if(deferred_exports_, [&](Job& j) {
    if (ExportWaits(j)) return false;
    ready.push_back(std::move(j));
    return true;
  });
  for (Job& j : ready) HandleExport(std::move(j));
}

void Scheduler::HandleExport(Job job) {
  using namespace protocol;
  using Transfer = Metrics::Transfer;
  if (options_.tier && !draining_local_) {
    // A turn is running (or its pages are being persisted): export once it
    // has ended, so the file holds it too. Its Done reports whether it was
    // persisted; an export after a turn that was not is refused below.
    if (const Session* busy = ExportWaits(job)) {
      spdlog::debug("export of session '{}' waits for its running turn", busy->name);
      deferred_exports_.push_back(std::move(job));
      return;
    }
  }
  if (metrics_) metrics_->TransferStarted(Transfer::kExport);
  auto reply_error = [&](const Status& s) {
    if (metrics_) metrics_->TransferEnded(Transfer::kExport, s.code());
    job.reply(ErrorReply::FromStatus(s));
  };
  const std::string name = std::get<ExportSessionRequest>(job.body).session;
  if (!options_.tier)
    return reply_error(Status::Unsupported(
        "session export needs durable sessions: this mnemod runs without T2 storage (--t2-budget 0)"));
  Result<Session*> found = sessions_.Find(job.uid, name);
  if (!found.ok()) return reply_error(found.status());
  Session* s = *found;
  if (s->active)
    return reply_error(
        Status::FailedPrecondition("session '" + name + "' has a generation running; export it after"));
  if (!s->resume_error.ok()) return reply_error(s->resume_error);
  if (!s->persisted || s->t2.turn_seq == 0)
    return reply_error(Status::FailedPrecondition("the latest turn of session '" + name +
                                                  "' is not persisted; export it after a turn that is"));
  if (!job.window) return reply_error(Status::Internal("export without a flow window"));
  tiering::Manifest m = ManifestOf(*s);
  m.kv_tokens = s->t2.kv_tokens;
  m.blocks = s->t2.blocks;
  m.turn_seq = s->t2.turn_seq;
  const auto key = std::make_pair(job.conn, job.id);
  exports_[key] = job.window;
  auto offset = std::make_shared<uint64_t>(0);
  ReplyFn reply = job.reply;
  std::shared_ptr<FlowWindow> window = job.window;
  // Runs on the tier manager's transfer thread: waits for credit, never
  // for the scheduler.
  Metrics* metrics = metrics_;
  tiering::ExportSink sink = [window, reply, offset, metrics](std::string_view piece) -> Status {
    MNEMO_RETURN_IF_ERROR(window->Acquire(piece.size()));
    reply(ExportChunk{*offset, std::string(piece)});
    *offset += piece.size();
    if (metrics) metrics->TransferBytes(Transfer::kExport, piece.size());
    return Status::Ok();
  };
  options_.tier->Export("session '" + name + "'", std::move(m), std::move(sink), kTransferChunkBytes,
                        [this, key, reply](Result<tiering::ExportSummary> r) {
                          Post([this, key, reply, r = std::move(r)] {
                            exports_.erase(key);
                            if (metrics_) metrics_->TransferEnded(Transfer::kExport, r.status().code());
                            if (r.ok()) {
                              reply(ExportDone{r->bytes, r->checksum});
                            } else {
                              reply(ErrorReply::FromStatus(r.status()));  // counted as it is sent
                            }
                          });
                        });
}

void Scheduler::DoCommitImport(ImportCommit& c) {
  using namespace protocol;
  auto fail = [&](const Status& st) {
    c.job->Abort();
    c.reply(ErrorReply::FromStatus(st));
  };
  if (draining_local_) return fail(Status::Unavailable("mnemod is shutting down"));
  const std::string name = c.name ? *c.name : c.manifest.name;
  if (Status st = ValidateSessionName(name); !st.ok())
    return fail(Status::InvalidArgument("the imported session's name '" + name + "' is not usable here (" +
                                        std::string(st.message()) + "); import it under another name"));
  const size_t limit = static_cast<size_t>(engine_->max_context());
  if (c.manifest.tokens.size() >= limit)
    return fail(Status::OutOfRange("the imported session holds " + std::to_string(c.manifest.tokens.size()) +
                                   " tokens; this mnemod's context limit is " + std::to_string(limit)));
  Result<Session*> created = sessions_.Create(c.uid, name, UnixMs());
  if (!created.ok()) return fail(created.status());
  Session* s = *created;
  if (Status st = c.job->Commit(c.uid, name); !st.ok()) {
    sessions_.Erase(c.uid, name);
    return fail(st);
  }
  const tiering::Manifest& m = c.manifest;
  s->parent = m.parent;
  s->tokens = m.tokens;
  s->close_text = m.close_text;
  s->chat_open = m.chat_open;
  s->turns = m.turns;
  s->created_unix_ms = m.created_unix_ms;
  s->t2 = tiering::CommittedKv{m.kv_tokens, m.blocks, 1};
  s->persisted = true;
  session_count_.store(static_cast<uint32_t>(sessions_.size()));
  spdlog::info("imported session '{}' of uid {}: {} tokens, {} KV blocks", name, c.uid, m.tokens.size(),
               m.blocks.size());
  c.reply(Info(*s));
}

void Scheduler::HandleFork(Job& job, const protocol::ForkSessionRequest& req) {
  auto reply_error = [&](const Status& s) { job.reply(protocol::ErrorReply::FromStatus(s)); };
  Result<Session*> src = sessions_.Find(job.uid, req.src);
  if (!src.ok()) return reply_error(src.status());
  if ((*src)->active)
    return reply_error(
        Status::FailedPrecondition("session '" + req.src + "' has a generation running; fork it after"));
  attention::SeqId seq = 0;
  if ((*src)->seq != 0) {
    Result<attention::SeqId> f = engine_->kv().Fork((*src)->seq);
    if (!f.ok()) return reply_error(f.status());
    seq = *f;
  }
  Result<Session*> dst = sessions_.Create(job.uid, req.dst, UnixMs());
  if (!dst.ok()) {
    if (seq != 0) (void)engine_->kv().FreeSeq(seq);
    return reply_error(dst.status());
  }
  Session& d = **dst;
  const Session& s = **src;
  d.parent = s.name;
  d.tokens = s.tokens;
  d.seq = seq;
  d.close_text = s.close_text;
  d.chat_open = s.chat_open;
  d.turns = s.turns;
  d.resume_error = s.resume_error;
  if (options_.tier && s.t2.turn_seq > 0) {
    d.t2 = tiering::CommittedKv{s.t2.kv_tokens, s.t2.blocks, 1};
    tiering::Manifest m = ManifestOf(d);
    m.kv_tokens = d.t2.kv_tokens;
    m.blocks = d.t2.blocks;
    m.turn_seq = 1;
    if (Status st = options_.tier->Fork(job.uid, s.name, m); !st.ok()) {
      if (d.seq != 0) (void)engine_->kv().FreeSeq(d.seq);
      sessions_.Erase(job.uid, d.name);
      return reply_error(st.WithContext("forking session"));
    }
    d.persisted = s.persisted;
  }
  job.reply(Info(d));
}

void Scheduler::HandleGenerate(Job job) {
  using namespace protocol;
  auto reply_error = [&](const Status& s) { job.reply(ErrorReply::FromStatus(s)); };
  GenerateRequest& req = std::get<GenerateRequest>(job.body);
  if (draining_local_) return reply_error(Status::Unavailable("mnemod is shutting down"));
  Result<Session*> found = sessions_.Find(job.uid, req.session);
  if (!found.ok()) return reply_error(found.status());
  Session* s = *found;
  if (s->active)
    return reply_error(Status::FailedPrecondition("session '" + req.session +
                                                  "' already has a generation running"));
  if (!s->resume_error.ok()) return reply_error(s->resume_error);
  if (waiting_.size() >= options_.max_queued)
    return reply_error(Status::ResourceExhausted("request queue full: " +
                                                 std::to_string(options_.max_queued) +
                                                 " requests waiting; retry later"));

  model::SamplingParams sp = options_.default_sampling;
  const SamplingOptions& o = req.sampling;
  if (o.temperature) sp.temperature = *o.temperature;
  if (o.top_k) sp.top_k = *o.top_k;
  if (o.top_p) sp.top_p = *o.top_p;
  if (o.min_p) sp.min_p = *o.min_p;
  if (o.repeat_penalty) sp.repeat_penalty = *o.repeat_penalty;
  if (o.repeat_last_n) sp.repeat_last_n = *o.repeat_last_n;
  if (o.presence_penalty) sp.presence_penalty = *o.presence_penalty;
  if (o.frequency_penalty) sp.frequency_penalty = *o.frequency_penalty;
  if (o.seed) {
    sp.seed = *o.seed;
  } else {
    static std::mt19937_64 seeder(std::random_device{}());
    sp.seed = seeder();
  }
  Result<model::Sampler> sampler = model::Sampler::Create(sp, engine_->model().config().vocab_size);
  if (!sampler.ok()) return reply_error(sampler.status());
  Result<model::StopMatcher> stop = model::StopMatcher::Create(req.stop);
  if (!stop.ok()) return reply_error(stop.status());

  // The new tokens of this turn.
  const model::Tokenizer& tok = engine_->tokenizer();
  const model::ChatTemplate& tmpl = engine_->chat_template();
  const bool first = s->tokens.empty();
  std::vector<int32_t> fresh;
  const bool chat = !req.messages.empty();
  if (chat) {
    std::vector<model::ChatMessage> msgs;
    msgs.reserve(req.messages.size());
    for (const auto& m : req.messages) msgs.push_back({m.role, m.content});
    Result<std::string> text = first ? tmpl.Render(msgs, true) : tmpl.RenderAppend(msgs, true);
    if (!text.ok()) return reply_error(text.status());
    std::string full = (first ? std::string() : s->close_text) + *text;
    tok.EncodeAppend(full, /*add_special=*/first, /*parse_special=*/true, &fresh);
  } else if (req.text && !req.text->empty()) {
    tok.EncodeAppend(*req.text, /*add_special=*/first, /*parse_special=*/true, &fresh);
  }
  if (first && fresh.empty()) return reply_error(Status::InvalidArgument("empty prompt for an empty session"));
  const size_t limit = static_cast<size_t>(engine_->max_context());
  if (s->tokens.size() + fresh.size() >= limit)
    return reply_error(Status::OutOfRange(
        "prompt of " + std::to_string(fresh.size()) + " tokens after " + std::to_string(s->tokens.size()) +
        " in session '" + s->name + "' leaves no room in the context limit of " + std::to_string(limit) +
        " tokens"));

  const uint32_t max_tokens = req.max_tokens ? req.max_tokens : options_.default_max_tokens;
  if (options_.tier && options_.max_stream_window > 0 && s->seq != 0 && s->t2.kv_tokens > 0 && KvWholeOnT2(*s) &&
      ExceedsT0(s->tokens.size() + fresh.size() + max_tokens)) {
    // Its KV and this turn's cannot all be in T0 at once, even with every
    // idle session evicted, and its KV in T0 is all on T2 too: this turn
    // streams it from there, as after a restart, rather than fail for want
    // of pages.
    spdlog::info("session '{}' has outgrown T0 ({} tokens with this turn): its KV streams from T2", s->name,
                 s->tokens.size() + fresh.size() + max_tokens);
    (void)engine_->kv().FreeSeq(s->seq);
    s->seq = 0;
  }
  const bool streamable = options_.tier && options_.max_stream_window > 0 && s->seq == 0 && s->t2.kv_tokens > 0;
  if (!streamable && ExceedsT0(s->tokens.size() + fresh.size())) {
    // Its whole history goes through T0 this turn (new, resident, or to be
    // recomputed): refused now rather than after prefilling what fits.
    const attention::PagePool& pool = engine_->pool();
    return reply_error(Status::ResourceExhausted(
        "session '" + s->name + "': this turn brings it to " + std::to_string(s->tokens.size() + fresh.size()) +
        " tokens, whose KV is more than T0 holds in all (" + std::to_string(pool.capacity_pages()) + " pages of " +
        std::to_string(pool.page_bytes()) + " bytes, --t0-budget); a session larger than T0 can only stream " +
        "committed turns from T2"));
  }
  auto r = std::make_unique<ActiveRequest>(std::move(sampler).value(), std::move(stop).value());
  r->conn = job.conn;
  r->id = job.id;
  r->uid = job.uid;
  r->session = s;
  r->reply = std::move(job.reply);
  r->max_tokens = max_tokens;
  r->chat = chat;
  r->t_arrive = NowSeconds();
  r->tokens0 = s->tokens.size();
  r->close_text0 = s->close_text;
  r->chat_open0 = s->chat_open;
  r->kv0 = 0;
  if (s->seq != 0) {
    Result<int64_t> len = engine_->kv().Length(s->seq);
    r->kv0 = len.ok() ? *len : 0;
  }
  s->tokens.insert(s->tokens.end(), fresh.begin(), fresh.end());
  if (chat) {
    s->close_text.clear();
    s->chat_open = true;
  }
  s->active = r.get();
  s->last_used_unix_ms = UnixMs();
  r->persisted0 = s->persisted;
  s->persisted = false;
  if (options_.tier && r->tokens0 > 0) {
    // Tier accounting: a turn on a session with history hits T0 when its
    // KV is resident; each resident layer page was ready when needed.
    if (s->seq != 0) {
      options_.tier->RecordT0Access(true);
      uint64_t resident = 0;
      if (const attention::SeqKv* kv = engine_->kv().Get(s->seq))
        for (const auto& layer : kv->layers) resident += layer.size();
      options_.tier->RecordPrefetch(resident, 0, 0);
    } else {
      options_.tier->RecordT0Access(false);  // loaded below, or recomputed
    }
  }
  if (options_.tier && s->seq == 0 && s->t2.kv_tokens > 0) {
    // The KV is on T2 (restart, or dropped from T0): read it back rather
    // than recompute the history.
    if (Status st = StartLoad(r.get()); !st.ok()) {
      RollBack(r.get());
      s->active = nullptr;
      r->Reply(ErrorReply::FromStatus(st));
      return;
    }
  } else {
    FinalizePrompt(r.get());
  }
  waiting_.push_back(std::move(r));
}

void Scheduler::FinalizePrompt(ActiveRequest* r) {
  Session* s = r->session;
  // Nothing new and the KV already covers the history ("continue" right
  // after a fork of a fully fed session): recompute the last token to get
  // logits to sample from.
  if (s->seq != 0 && r->kv0 >= static_cast<int64_t>(s->tokens.size())) {
    (void)engine_->kv().Truncate(s->seq, static_cast<int64_t>(s->tokens.size()) - 1);
    r->kv0 = static_cast<int64_t>(s->tokens.size()) - 1;
  }
  int64_t kv_now = 0;
  if (s->seq != 0) kv_now = *engine_->kv().Length(s->seq);
  r->prompt_tokens = static_cast<uint32_t>(s->tokens.size() - kv_now);
  if (metrics_) metrics_->AddPromptTokens(r->prompt_tokens);
}

bool Scheduler::KvWholeOnT2(const Session& s) const {
  Result<int64_t> len = engine_->kv().Length(s.seq);
  return s.persisted && len.ok() && static_cast<uint64_t>(*len) <= s.t2.kv_tokens;
}

bool Scheduler::ExceedsT0(uint64_t tokens) const {
  const attention::PagePool& pool = engine_->pool();
  const uint64_t pages = tiering::BlocksForTokens(tokens, pool.layout().page_tokens) *
                         static_cast<uint64_t>(engine_->model().config().n_layers);
  return pages > pool.capacity_pages();
}

Status Scheduler::StartLoad(ActiveRequest* r) {
  Session* s = r->session;
  attention::PagePool& pool = engine_->pool();
  const int32_t n_layers = engine_->model().config().n_layers;
  const uint64_t per_layer = tiering::BlocksForTokens(s->t2.kv_tokens, pool.layout().page_tokens);
  const uint64_t need = per_layer * static_cast<uint64_t>(n_layers);
  // Its new pages this turn: the prompt's tokens and at most max_tokens
  // replies. If those cannot fit T0 beside its KV, it streams even when the
  // KV alone would load.
  const uint64_t growth = s->tokens.size() - s->t2.kv_tokens + r->max_tokens;
  const bool outgrown = options_.max_stream_window > 0 && ExceedsT0(s->t2.kv_tokens + growth);
  while (!outgrown && pool.free_pages() < need && EvictIdle()) {
  }
  if ((outgrown || pool.free_pages() < need) && options_.max_stream_window > 0 && per_layer > 1) {
    return StartStream(r, growth);
  }
  if (pool.free_pages() < need)
    return Status::ResourceExhausted("session '" + s->name + "' needs " + std::to_string(need) +
                                     " KV pages to resume; " + std::to_string(pool.free_pages()) + " of " +
                                     std::to_string(pool.capacity_pages()) + " are free");
  std::vector<std::vector<attention::PageId>> pages(n_layers);
  std::vector<std::vector<void*>> dst(n_layers);
  for (int32_t l = 0; l < n_layers; ++l) {
    for (uint64_t p = 0; p < per_layer; ++p) {
      Result<attention::PageId> id = pool.Allocate();
      if (!id.ok()) {
        for (auto& layer : pages)
          for (attention::PageId q : layer) pool.Unref(q);
        return id.status();
      }
      pages[l].push_back(*id);
      dst[l].push_back(pool.Data(*id));
    }
  }
  r->loading = true;
  r->load = std::make_shared<LoadState>();
  r->load_pages = pages;
  r->load_start = Clock::now();
  r->load_page_count = per_layer * static_cast<uint64_t>(n_layers);
  const std::string label = "session '" + s->name + "'";
  std::shared_ptr<LoadState> load = r->load;
  options_.tier->Load(
      label, s->t2.blocks, s->t2.kv_tokens, std::move(dst),
      [this, r, load, pages = std::move(pages)](Status st) mutable {
        {
          std::lock_guard<std::mutex> lock(load->mu);
          load->done = true;
          load->status = st;
          load->cv.notify_all();
        }
        Post([this, r, load, st = std::move(st), pages = std::move(pages)]() mutable {
          if (load->consumed) return;  // a pipelined step finished it (r may be gone)
          LoadDone(r, std::move(st), std::move(pages));
        });
      },
      [load](int32_t layers) {
        std::lock_guard<std::mutex> lock(load->mu);
        load->layers_ready = layers;
        load->cv.notify_all();
      });
  return Status::Ok();
}

Status Scheduler::StartStream(ActiveRequest* r, uint64_t growth_tokens) {
  Session* s = r->session;
  attention::PagePool& pool = engine_->pool();
  const int32_t n_layers = engine_->model().config().n_layers;
  const int32_t pt = pool.layout().page_tokens;
  const uint64_t spans = tiering::BlocksForTokens(s->t2.kv_tokens, pt);
  // Every block but the last streams; the last one (which this turn's
  // tokens extend) stays in dedicated pages with the turn's new pages.
  const uint64_t cold = spans - 1;
  const uint64_t tail_tokens = s->t2.kv_tokens - cold * static_cast<uint64_t>(pt);
  const uint64_t hot = tiering::BlocksForTokens(tail_tokens + growth_tokens, pt) * static_cast<uint64_t>(n_layers);
  // Pages the other requests may still add this turn (their prompts and
  // replies): the ring leaves them room.
  uint64_t others = 0;
  auto add_growth = [&](const std::unique_ptr<ActiveRequest>& o) {
    if (o.get() == r) return;
    const Session* os = o->session;
    const int64_t kv_len = os->seq != 0 ? *engine_->kv().Length(os->seq) : 0;
    const uint64_t todo = os->tokens.size() - std::min<uint64_t>(os->tokens.size(), kv_len) +
                          (o->max_tokens - std::min(o->max_tokens, o->generated));
    others += tiering::BlocksForTokens(todo + static_cast<uint64_t>(pt), pt) * static_cast<uint64_t>(n_layers);
  };
  for (const auto& o : running_) add_growth(o);
  for (const auto& o : waiting_) add_growth(o);
  // The largest ring that divides the layers (so layer l always uses slot
  // l % window and the page table stays fixed) and fits beside them; one
  // slot if only that fits.
  const uint64_t free = pool.free_pages();
  int32_t window = 0;
  for (int32_t w = std::min(options_.max_stream_window, n_layers); w >= 1 && window == 0; --w) {
    const uint64_t ring = static_cast<uint64_t>(w) * cold;
    if (n_layers % w == 0 && hot + ring <= free && (w == 1 || hot + ring + others <= free)) window = w;
  }
  if (window == 0)
    return Status::ResourceExhausted(
        "session '" + s->name + "' does not fit even when streamed: it needs " + std::to_string(hot + cold) +
        " KV pages (one layer of its " + std::to_string(cold) + " blocks plus " + std::to_string(hot) +
        " for its last block and this turn); " + std::to_string(pool.free_pages()) + " of " +
        std::to_string(pool.capacity_pages()) + " are free");
  std::vector<std::vector<attention::PageId>> ring(window), tail(n_layers);
  std::vector<std::vector<void*>> dst(n_layers);
  auto release = [&] {
    for (auto& v : ring)
      for (attention::PageId q : v) pool.Unref(q);
    for (auto& v : tail)
      for (attention::PageId q : v) pool.Unref(q);
  };
  for (int32_t w = 0; w < window; ++w) {
    for (uint64_t b = 0; b < cold; ++b) {
      Result<attention::PageId> id = pool.Allocate();
      if (!id.ok()) {
        release();
        return id.status();
      }
      ring[w].push_back(*id);
    }
  }
  for (int32_t l = 0; l < n_layers; ++l) {
    Result<attention::PageId> id = pool.Allocate();
    if (!id.ok()) {
      release();
      return id.status();
    }
    tail[l].push_back(*id);
    dst[l].push_back(pool.Data(*id));
  }
  r->loading = true;
  r->streamed = true;
  r->stream_window = window;
  r->stream_ring = std::move(ring);
  r->load_pages = std::move(tail);
  r->load_start = Clock::now();
  r->load_page_count = static_cast<uint64_t>(n_layers);
  spdlog::info("session '{}' ({} tokens of KV) is larger than T0: streaming {} blocks through {} layer slots",
               s->name, s->t2.kv_tokens, cold, window);
  options_.tier->Load("session '" + s->name + "'", {s->t2.blocks[spans - 1]}, tail_tokens, std::move(dst),
                      [this, r](Status st) { Post([this, r, st = std::move(st)] { StreamLoaded(r, st); }); });
  return Status::Ok();
}

void Scheduler::StreamLoaded(ActiveRequest* r, Status status) {
  r->loading = false;
  Session* s = r->session;
  attention::PagePool& pool = engine_->pool();
  const int32_t n_layers = engine_->model().config().n_layers;
  const int32_t window = r->stream_window;
  auto release = [&] {
    for (auto& v : r->stream_ring)
      for (attention::PageId q : v) pool.Unref(q);
    for (auto& v : r->load_pages)
      for (attention::PageId q : v) pool.Unref(q);
    r->stream_ring.clear();
    r->load_pages.clear();
  };
  if (status.ok() && !r->cancelled && !draining_local_) {
    const uint64_t cold = r->stream_ring[0].size();
    std::vector<std::vector<attention::PageId>> table(n_layers);
    for (int32_t l = 0; l < n_layers; ++l) {
      table[l] = r->stream_ring[l % window];
      table[l].push_back(r->load_pages[l][0]);
    }
    // Adopt takes one reference per table entry: a ring page serves
    // n_layers / window layers.
    for (auto& v : r->stream_ring)
      for (attention::PageId q : v)
        for (int32_t k = 1; k < n_layers / window; ++k) pool.Ref(q);
    Result<attention::SeqId> seq = engine_->kv().Adopt(std::move(table), static_cast<int64_t>(s->t2.kv_tokens));
    if (!seq.ok()) {
      for (auto& v : r->stream_ring)
        for (attention::PageId q : v)
          for (int32_t k = 1; k < n_layers / window; ++k) pool.Unref(q);
      status = seq.status();
    } else {
      tiering::KvStreamOptions o;
      o.label = "session '" + s->name + "'";
      o.blocks.assign(s->t2.blocks.begin(), s->t2.blocks.begin() + static_cast<ptrdiff_t>(cold));
      o.window = window;
      o.ring.resize(window);
      for (int32_t w = 0; w < window; ++w)
        for (attention::PageId q : r->stream_ring[w]) o.ring[w].push_back(pool.Data(q));
      r->stream_ring.clear();
      r->load_pages.clear();
      Result<std::unique_ptr<tiering::KvStream>> stream = options_.tier->OpenStream(std::move(o));
      if (!stream.ok()) {
        (void)engine_->kv().FreeSeq(*seq);
        Fail(r, stream.status());
        return;
      }
      r->stream = std::move(stream).value();
      r->stream_cold = cold;
      s->seq = *seq;
      r->kv0 = static_cast<int64_t>(s->t2.kv_tokens);
      FinalizePrompt(r);
      // The turn's pages now, so that others' growth cannot starve it.
      const int64_t growth = static_cast<int64_t>(s->tokens.size()) - r->kv0 + r->max_tokens;
      if (Status st = engine_->kv().Reserve(s->seq, growth); !st.ok()) {
        Fail(r, st.WithContext("session '" + s->name + "'"));
      }
      return;
    }
  }
  release();
  if (!status.ok()) {
    Fail(r, status);
  } else if (draining_local_) {
    Fail(r, Status::Unavailable("mnemod is shutting down"));
  } else {
    Finish(r, model::FinishReason::kCancelled);
  }
}

void Scheduler::CountStream(ActiveRequest* r) {
  if (!r->stream) return;
  const tiering::KvStreamStats st = r->stream->stats();
  const tiering::KvStreamStats& was = r->stream_counted;
  // Per layer visit: its streamed pages were ready (hits) or waited for.
  options_.tier->RecordPrefetch((st.layers_ready - was.layers_ready) * r->stream_cold,
                                (st.layers_waited - was.layers_waited) * r->stream_cold, st.stall_ns - was.stall_ns);
  r->stream_counted = st;
}

void Scheduler::StopStream(ActiveRequest* r) {
  if (!r->stream) return;
  r->stream->Stop();
  CountStream(r);
  r->stream.reset();
}

bool Scheduler::StartPipelined(ActiveRequest* r) {
  Session* s = r->session;
  Result<attention::SeqId> seq =
      engine_->kv().Adopt(r->load_pages, static_cast<int64_t>(s->t2.kv_tokens));
  if (!seq.ok()) return false;  // it joins when loaded
  r->load->consumed = true;
  r->load_pages.clear();
  s->seq = *seq;
  r->kv0 = static_cast<int64_t>(s->t2.kv_tokens);
  FinalizePrompt(r);
  return true;
}

Status Scheduler::EndPipelined(ActiveRequest* r) {
  Status status;
  {
    std::unique_lock<std::mutex> lock(r->load->mu);
    r->load->cv.wait(lock, [&] { return r->load->done; });
    status = r->load->status;
  }
  r->loading = false;
  r->load.reset();
  if (!status.ok()) {
    // Its pages hold a partial load: the KV is not usable.
    Session* s = r->session;
    (void)engine_->kv().FreeSeq(s->seq);
    s->seq = 0;
  }
  return status;
}

void Scheduler::LoadDone(ActiveRequest* r, Status status, std::vector<std::vector<attention::PageId>> pages) {
  r->loading = false;
  r->load.reset();
  r->load_pages.clear();
  Session* s = r->session;
  auto release = [&] {
    for (auto& layer : pages)
      for (attention::PageId q : layer) engine_->pool().Unref(q);
  };
  if (status.ok() && !r->cancelled && !draining_local_) {
    Result<attention::SeqId> seq = engine_->kv().Adopt(std::move(pages), static_cast<int64_t>(s->t2.kv_tokens));
    if (seq.ok()) {
      // The whole session loads before the request may run, so every page
      // counts as a stall and the request's wait as stall time.
      const auto waited = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - r->load_start);
      options_.tier->RecordPrefetch(0, r->load_page_count,
                                    static_cast<uint64_t>(std::max<int64_t>(waited.count(), 0)));
      s->seq = *seq;
      r->kv0 = static_cast<int64_t>(s->t2.kv_tokens);
      FinalizePrompt(r);
      return;
    }
    status = seq.status();
  }
  release();
  if (!status.ok()) {
    Fail(r, status);
  } else if (draining_local_) {
    Fail(r, Status::Unavailable("mnemod is shutting down"));
  } else {
    Finish(r, model::FinishReason::kCancelled);
  }
}

void Scheduler::Admit() {
  // Nothing runs and the next request waits for its KV from T2: it computes
  // on its pages as they arrive, alone in the batch (its step waits on
  // them, which nobody else should).
  if (running_.empty() && options_.pipelined_resume && !waiting_.empty() && waiting_.front()->loading &&
      !waiting_.front()->streamed && !waiting_.front()->cancelled && !draining_local_ && StartPipelined(waiting_.front().get())) {
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    return;
  }
  for (size_t i = 0; i < waiting_.size() && running_.size() < static_cast<size_t>(options_.max_batch);) {
    if (waiting_[i]->loading) {
      ++i;
      continue;
    }
    running_.push_back(std::move(waiting_[i]));
    waiting_.erase(waiting_.begin() + static_cast<ptrdiff_t>(i));
  }
}

bool Scheduler::EvictIdle() {
  // Sessions whose KV is on T2 lose nothing; others recompute later.
  Session* victim = nullptr;
  bool victim_safe = false;
  for (Session* s : sessions_.All()) {
    if (s->active || s->seq == 0) continue;
    const bool safe = KvWholeOnT2(*s);
    if (!victim || (safe && !victim_safe) ||
        (safe == victim_safe && s->last_used_unix_ms < victim->last_used_unix_ms)) {
      victim = s;
      victim_safe = safe;
    }
  }
  if (!victim) return false;
  // The history stays: the session's next turn recomputes the KV.
  (void)engine_->kv().FreeSeq(victim->seq);
  victim->seq = 0;
  spdlog::debug("KV of idle session '{}' dropped under memory pressure", victim->name);
  return true;
}

void Scheduler::Step() {
  attention::KvCache& kv = engine_->kv();
  // Cancelled requests leave before the step.
  for (size_t i = 0; i < running_.size();) {
    ActiveRequest* r = running_[i].get();
    if (r->cancelled) {
      Finish(r, model::FinishReason::kCancelled);
    } else {
      ++i;
    }
  }
  if (running_.empty()) return;

  // Decoders (one token to feed) first; their cost sets what is left for
  // prefill chunks.
  struct Entry {
    ActiveRequest* r;
    int64_t kv_len;
    int64_t n;
  };
  // A streamed session (larger than T0) steps alone, every other step
  // when others run: its steps wait on storage, theirs should not.
  ActiveRequest* streamed = nullptr;
  bool others = false;
  for (auto& up : running_) {
    if (up->stream) {
      if (!streamed) streamed = up.get();
    } else {
      others = true;
    }
  }
  const bool stream_step = streamed != nullptr && (!others || stream_turn_);
  if (streamed && others) stream_turn_ = !stream_turn_;
  std::vector<Entry> entries;
  entries.reserve(running_.size());
  int64_t n_decoders = 0;
  for (auto& up : running_) {
    ActiveRequest* r = up.get();
    if (stream_step ? r != streamed : r->stream != nullptr) continue;
    Session* s = r->session;
    if (s->seq == 0) s->seq = kv.CreateSeq();
    const int64_t kv_len = *kv.Length(s->seq);
    const int64_t feed = static_cast<int64_t>(s->tokens.size()) - kv_len;
    MNEMO_CHECK(feed >= 1);
    if (feed == 1) ++n_decoders;
    entries.push_back({r, kv_len, feed});
  }
  const bool any_decoder = n_decoders > 0;
  // Prefill rows this step: the paced chunk beside decoders (none in a step
  // that measures the decoders alone), a whole prefill_chunk when nobody
  // waits for a token.
  const int64_t budget0 = any_decoder ? pacer_.Budget(n_decoders) : options_.prefill_chunk;
  std::vector<int64_t> needs;
  for (const Entry& e : entries)
    if (e.n > 1) needs.push_back(e.n);
  const std::vector<int64_t> grants = SharePrefillRows(needs, budget0);
  int64_t prefill_rows = 0;
  for (size_t i = 0, k = 0; i < entries.size(); ++i) {
    if (entries[i].n <= 1) continue;
    entries[i].n = grants[k++];
    prefill_rows += entries[i].n;
  }
  std::vector<Entry> batch_entries;
  for (Entry& e : entries) {
    if (e.n == 0) continue;  // a prompt that gets no rows this step
    // Reserve per entry so a full pool is charged to the request that needs
    // the pages; idle sessions' KV goes first.
    Status st = kv.Reserve(e.r->session->seq, e.n);
    while (st.code() == StatusCode::kResourceExhausted && EvictIdle())
      st = kv.Reserve(e.r->session->seq, e.n);
    if (!st.ok()) {
      if (e.r->loading) {
        const Status load = EndPipelined(e.r);
        if (!load.ok()) st = load;
      }
      Fail(e.r, st.WithContext("session '" + e.r->session->name + "'"));
      continue;
    }
    batch_entries.push_back(e);
  }
  if (batch_entries.empty()) return;
  // A pipelined resume runs alone (Admit): its pages may still be loading.
  ActiveRequest* pipelined = nullptr;
  for (const Entry& e : batch_entries)
    if (e.r->loading) pipelined = e.r;
  MNEMO_CHECK(pipelined == nullptr || batch_entries.size() == 1);
  std::optional<LoadGate> gate;
  if (pipelined) gate.emplace(pipelined->load.get());
  std::optional<StreamGate> stream_gate;
  if (stream_step) stream_gate.emplace(streamed->stream.get());

  std::vector<model::BatchSeq> batch;
  batch.reserve(batch_entries.size());
  for (const Entry& e : batch_entries) {
    const Session* s = e.r->session;
    batch.push_back({s->seq, std::span<const int32_t>(s->tokens.data() + e.kv_len, e.n), false});
  }
  const double t_step0 = NowSeconds();
  model::KvLayerGate* layer_gate = gate ? static_cast<model::KvLayerGate*>(&*gate)
                                        : stream_gate ? static_cast<model::KvLayerGate*>(&*stream_gate) : nullptr;
  Status st = engine_->model().Forward(batch, &kv, &logits_, layer_gate);
  if (stream_step) CountStream(streamed);
  const double step_ms = (NowSeconds() - t_step0) * 1e3;
  if (pipelined) {
    // Per layer: its pages were ready when the step reached it (hits), or
    // the step waited for them (stalls).
    const uint64_t per_layer = pipelined->load_page_count / static_cast<uint64_t>(engine_->model().config().n_layers);
    options_.tier->RecordPrefetch(per_layer * static_cast<uint64_t>(gate->hits()),
                                  per_layer * static_cast<uint64_t>(gate->stalls()),
                                  static_cast<uint64_t>(gate->stall_seconds() * 1e9));
    const Status load = EndPipelined(pipelined);
    if (!load.ok()) st = load;
    spdlog::debug("resumed '{}' pipelined: {} layers ready when needed, {} waited for ({:.1f} ms); "
                  "request to step {:.1f} ms, step {:.1f} ms, load end {:.1f} ms after the step",
                  pipelined->session->name, gate->hits(), gate->stalls(), gate->stall_seconds() * 1e3,
                  (t_step0 - pipelined->t_arrive) * 1e3, step_ms, (NowSeconds() - t_step0) * 1e3 - step_ms);
  }
  if (st.ok() && !stream_step && !pipelined) pacer_.Observe(n_decoders, prefill_rows, budget0, step_ms);
  spdlog::trace("step: {} decode rows, {} prompt rows (budget {}), {:.2f} ms", n_decoders, prefill_rows,
                budget0, step_ms);
  if (!st.ok()) {
    spdlog::error("model step failed: {}", st.ToString());
    for (const Entry& e : batch_entries) Fail(e.r, st);
    return;
  }

  const model::Tokenizer& tok = engine_->tokenizer();
  const int32_t vocab = engine_->model().config().vocab_size;
  const size_t limit = static_cast<size_t>(engine_->max_context());
  const double now = NowSeconds();
  uint64_t generated_now = 0;
  for (size_t b = 0; b < batch_entries.size(); ++b) {
    ActiveRequest* r = batch_entries[b].r;
    Session* s = r->session;
    const int64_t kv_len = batch_entries[b].kv_len + batch_entries[b].n;
    if (kv_len < static_cast<int64_t>(s->tokens.size())) {
      if (r->prompt_tokens >= kProgressMinTokens) {
        const uint32_t done = r->prompt_tokens - static_cast<uint32_t>(s->tokens.size() - kv_len);
        r->Reply(protocol::PrefillProgress{done, r->prompt_tokens});
      }
      continue;
    }
    std::span<const float> row(logits_.data() + b * static_cast<size_t>(vocab), vocab);
    const int32_t t = r->sampler.Sample(row, s->tokens);
    s->tokens.push_back(t);
    ++generated_now;
    if (r->generated == 0) {
      if (r->prompt_tokens >= kProgressMinTokens)
        r->Reply(protocol::PrefillProgress{r->prompt_tokens, r->prompt_tokens});
      r->t_first = now;
      if (metrics_) metrics_->ObserveTtft((now - r->t_arrive) * 1e3);
    } else if (metrics_) {
      metrics_->ObserveInterToken((now - r->t_last) * 1e3);
    }
    r->t_last = now;
    ++r->generated;
    if (tok.IsEog(t)) {
      if (r->chat) {
        // The end-of-generation token usually begins the template's end
        // marker ("<|im_end|>" of "<|im_end|>\n"); the rest must still
        // precede the next message.
        const std::string_view end = engine_->chat_template().assistant_end();
        const std::string piece = tok.TokenToPiece(t, /*render_special=*/true);
        s->close_text = end.substr(0, piece.size()) == piece ? std::string(end.substr(piece.size()))
                                                             : std::string(end);
        s->chat_open = false;
      }
      --r->generated;  // not streamed: the end marker is not reply text
      Finish(r, model::FinishReason::kEos);
      continue;
    }
    std::string piece;
    const bool stopped = r->stop.Feed(tok.Piece(t, /*render_special=*/false), &piece);
    r->Reply(protocol::TokenChunk{std::move(piece), {t}});
    if (stopped) {
      Finish(r, model::FinishReason::kStop);
    } else if (r->generated >= r->max_tokens) {
      Finish(r, model::FinishReason::kLength);
    } else if (s->tokens.size() > limit) {
      Finish(r, model::FinishReason::kContextFull);
    }
  }
  if (metrics_ && generated_now) metrics_->AddGeneratedTokens(generated_now);
}

void Scheduler::Finish(ActiveRequest* r, model::FinishReason reason) {
  StopStream(r);
  Session* s = r->session;
  if (reason != model::FinishReason::kStop) {
    std::string tail;
    r->stop.Flush(&tail);
    if (!tail.empty()) r->Reply(protocol::TokenChunk{std::move(tail), {}});
  }
  if (reason == model::FinishReason::kCancelled && r->generated == 0) {
    // Cancelled before any reply: the turn never happened.
    RollBack(r);
  } else {
    if (r->chat && s->chat_open) {
      // The reply ended without the end marker (stop string, length,
      // cancel): the next message closes the turn first.
      s->close_text = std::string(engine_->chat_template().assistant_end());
      s->chat_open = false;
    }
    if (!r->chat) {
      s->close_text.clear();
      s->chat_open = false;
    }
    ++s->turns;
  }
  protocol::Done& done = r->done;
  done.finish_reason = ToWire(reason);
  done.prompt_tokens = r->prompt_tokens;
  done.generated_tokens = r->generated;
  done.ttft_ms = r->t_first > 0 ? (r->t_first - r->t_arrive) * 1e3 : 0;
  done.decode_tokens_per_s =
      r->generated > 1 && r->t_last > r->t_first ? (r->generated - 1) / (r->t_last - r->t_first) : 0;
  done.persisted = false;
  const bool rolled_back = reason == model::FinishReason::kCancelled && r->generated == 0;
  if (options_.tier && !rolled_back && s->seq != 0) {
    StartPersist(r);
    return;
  }
  r->Reply(done);
  Remove(r);
}

tiering::Manifest Scheduler::ManifestOf(const Session& s) const {
  tiering::Manifest m;
  m.owner_uid = s.owner;
  m.name = s.name;
  m.parent = s.parent;
  m.tokens = s.tokens;
  m.close_text = s.close_text;
  m.chat_open = s.chat_open;
  m.turns = s.turns;
  m.created_unix_ms = s.created_unix_ms;
  m.last_used_unix_ms = s.last_used_unix_ms;
  if (options_.tier) options_.tier->Stamp(&m);
  return m;
}

void Scheduler::StartPersist(ActiveRequest* r) {
  Session* s = r->session;
  attention::KvCache& kv = engine_->kv();
  const attention::SeqKv* seq = kv.Get(s->seq);
  tiering::PersistJob job;
  job.manifest = ManifestOf(*s);
  job.previous = s->t2;
  job.kv_tokens = static_cast<uint64_t>(seq->n_tokens);
  const uint64_t per_layer = tiering::BlocksForTokens(job.kv_tokens, engine_->pool().layout().page_tokens);
  job.pages.resize(seq->layers.size());
  for (size_t l = 0; l < seq->layers.size(); ++l)
    for (uint64_t p = 0; p < per_layer; ++p) job.pages[l].push_back(engine_->pool().Data(seq->layers[l][p]));
  // The request leaves the batch; its session stays busy (and its pages
  // unchanged) until the commit is done.
  persisting_.push_back(Detach(r));
  options_.tier->Persist(std::move(job), [this, r](Status st, tiering::CommittedKv committed) {
    Post([this, r, st = std::move(st), committed = std::move(committed)]() mutable {
      PersistDone(r, std::move(st), std::move(committed));
    });
  });
}

void Scheduler::PersistDone(ActiveRequest* r, Status status, tiering::CommittedKv committed) {
  Session* s = r->session;
  if (status.ok()) {
    s->t2 = std::move(committed);
    s->persisted = true;
    r->done.persisted = true;
  } else {
    r->done.persisted = false;
    r->done.persist_error_code = status.code();
    r->done.persist_error = "turn not persisted: " + status.ToString();
    if (metrics_) metrics_->CountError(status.code());
  }
  r->Reply(r->done);
  Remove(r);
}

void Scheduler::RollBack(ActiveRequest* r) {
  Session* s = r->session;
  s->tokens.resize(r->tokens0);
  s->close_text = r->close_text0;
  s->chat_open = r->chat_open0;
  s->persisted = r->persisted0;  // nothing changed since the last commit
  if (s->seq != 0) {
    Result<int64_t> len = engine_->kv().Length(s->seq);
    if (len.ok() && *len > r->kv0) (void)engine_->kv().Truncate(s->seq, r->kv0);
  }
}

void Scheduler::Fail(ActiveRequest* r, const Status& status) {
  StopStream(r);
  RollBack(r);
  r->Reply(protocol::ErrorReply::FromStatus(status));
  Remove(r);
}

std::unique_ptr<ActiveRequest> Scheduler::Detach(ActiveRequest* r) {
  std::unique_ptr<ActiveRequest> owner;
  auto take = [&](auto& list) {
    for (auto it = list.begin(); it != list.end(); ++it) {
      if (it->get() == r) {
        owner = std::move(*it);
        list.erase(it);
        return true;
      }
    }
    return false;
  };
  if (!take(running_) && !take(waiting_)) take(persisting_);
  MNEMO_CHECK(owner != nullptr);
  return owner;
}

void Scheduler::Remove(ActiveRequest* r) {
  if (r->streamed && r->session->seq != 0) {
    // Its pages held a ring, not the session's KV: it lives on T2 (and the
    // turn's new tokens too once persisted; otherwise they recompute).
    (void)engine_->kv().FreeSeq(r->session->seq);
    r->session->seq = 0;
  }
  r->session->active = nullptr;
  r->session->last_used_unix_ms = UnixMs();
  Detach(r);  // destroys it
}

}  // namespace mnemo::daemon
