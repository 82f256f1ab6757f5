// Continuous batching over LlamaModel::Forward: admission, step composition,
// sampling, stop handling and turn bookkeeping of every session.
#include "daemon/scheduler.h"

#include <algorithm>
#include <random>

#include <spdlog/spdlog.h>

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

// Attention's share of a token's cost grows with the context it attends to:
// a token at context L costs about (1 + L / kAttentionCostTokens) decode
// rows of weight streaming on this CPU backend. Prefill chunks are sized
// with it so that a step carrying a chunk of a long prompt costs about the
// step budget, however deep into the prompt it is.
constexpr double kAttentionCostTokens = 2048;
// A prefill makes progress every step, even when decoders fill the budget.
constexpr int64_t kMinPrefillChunk = 16;
// Prompts longer than this report PrefillProgress after each chunk.
constexpr size_t kProgressMinTokens = 64;

double RowCost(int64_t context) { return 1.0 + static_cast<double>(context) / kAttentionCostTokens; }

protocol::FinishReason ToWire(model::FinishReason r) {
  return static_cast<protocol::FinishReason>(static_cast<uint8_t>(r));
}

}  // namespace

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
  uint32_t prompt_tokens = 0;   // tokens prefilled by this turn
  uint32_t generated = 0;
  double t_arrive = 0, t_first = 0, t_last = 0;
  bool cancelled = false;
  bool detached = false;  // the connection is gone: replies are dropped

  ActiveRequest(model::Sampler s, model::StopMatcher m) : sampler(std::move(s)), stop(std::move(m)) {}
  void Reply(protocol::ResponseBody body) {
    if (!detached && reply) reply(std::move(body));
  }
};

Scheduler::Scheduler(model::Engine* engine, SchedulerOptions options, Metrics* metrics)
    : engine_(engine),
      options_(options),
      metrics_(metrics),
      sessions_(options.max_sessions_per_uid) {}

Scheduler::~Scheduler() { Shutdown(std::chrono::milliseconds(0)); }

void Scheduler::Start() {
  heartbeat_.store(Clock::now().time_since_epoch().count());
  thread_ = std::thread([this] { Run(); });
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
    bool draining;
    Clock::time_point deadline;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::seconds(1), [&] {
        return !inbox_.empty() || !dead_conns_.empty() || draining_ || !running_.empty() ||
               !waiting_.empty();
      });
      jobs.swap(inbox_);
      dead.swap(dead_conns_);
      draining = draining_;
      deadline = drain_deadline_;
    }
    heartbeat_.store(Clock::now().time_since_epoch().count());
    for (uint64_t conn : dead) {
      auto mark = [&](auto& list) {
        for (auto& r : list)
          if (r->conn == conn) r->cancelled = r->detached = true;
      };
      mark(running_);
      mark(waiting_);
    }
    for (Job& job : jobs) Handle(std::move(job));
    if (draining && !draining_local_) {
      draining_local_ = true;
      // Queued requests have not started: refuse them now.
      while (!waiting_.empty()) Fail(waiting_.front().get(), Status::Unavailable("mnemod is shutting down"));
    }
    if (draining && Clock::now() >= deadline) {
      while (!running_.empty())
        Fail(running_.front().get(),
             Status::Unavailable("mnemod is shutting down: generation ended before completion"));
    }
    if (draining && running_.empty() && waiting_.empty()) break;
    Admit();
    if (!running_.empty()) Step();
    PublishGauges();
  }
  PublishGauges();
}

void Scheduler::PublishGauges() {
  running_count_.store(static_cast<uint32_t>(running_.size()));
  waiting_count_.store(static_cast<uint32_t>(waiting_.size()));
  session_count_.store(static_cast<uint32_t>(sessions_.size()));
  if (!metrics_) return;
  metrics_->SetRequests(running_count_.load(), waiting_count_.load());
  metrics_->SetSessions(session_count_.load());
  const attention::PagePool& pool = engine_->pool();
  metrics_->SetTier("T0", pool.used_pages(), pool.used_pages() * pool.page_bytes(),
                    pool.capacity_pages() * pool.page_bytes());
}

protocol::SessionInfo Scheduler::Info(const Session& s) const {
  protocol::SessionInfo info;
  info.name = s.name;
  info.parent = s.parent;
  info.tokens = static_cast<uint32_t>(s.tokens.size());
  info.turns = s.turns;
  if (s.seq != 0) {
    if (const attention::SeqKv* kv = engine_->kv().Get(s.seq)) {
      for (const auto& layer : kv->layers) info.kv_pages += static_cast<uint32_t>(layer.size());
    }
  }
  info.kv_bytes = static_cast<uint64_t>(info.kv_pages) * engine_->pool().page_bytes();
  info.created_unix_ms = s.created_unix_ms;
  info.last_used_unix_ms = s.last_used_unix_ms;
  info.persisted = false;
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
    for (auto* list : {&running_}) {
      for (auto& r : *list)
        if (r->conn == job.conn && r->id == req->target_id) r->cancelled = true;
    }
    // Queued requests end at once.
    for (size_t i = 0; i < waiting_.size(); ++i) {
      if (waiting_[i]->conn == job.conn && waiting_[i]->id == req->target_id) {
        Finish(waiting_[i].get(), model::FinishReason::kCancelled);
        break;
      }
    }
    // Idempotent: cancelling a finished or unknown request is not an error,
    // since the race between a request ending and its cancel is inherent.
    job.reply(Ack{});
    return;
  }
  if (draining_local_) {
    reply_error(Status::Unavailable("mnemod is shutting down"));
    return;
  }
  if (auto* req = std::get_if<CreateSessionRequest>(&job.body)) {
    Result<Session*> s = sessions_.Create(job.uid, req->name, UnixMs());
    if (!s.ok()) return reply_error(s.status());
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
    if ((*s)->seq != 0) (void)engine_->kv().FreeSeq((*s)->seq);
    sessions_.Erase(job.uid, req->session);
    job.reply(Ack{});
    return;
  }
  reply_error(Status::InvalidArgument("request type not handled by the scheduler"));
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

  auto r = std::make_unique<ActiveRequest>(std::move(sampler).value(), std::move(stop).value());
  r->conn = job.conn;
  r->id = job.id;
  r->uid = job.uid;
  r->session = s;
  r->reply = std::move(job.reply);
  r->max_tokens = req.max_tokens ? req.max_tokens : options_.default_max_tokens;
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
  // Nothing new and the KV already covers the history ("continue" right
  // after a fork of a fully fed session): recompute the last token to get
  // logits to sample from.
  if (s->seq != 0 && r->kv0 >= static_cast<int64_t>(s->tokens.size()))
    (void)engine_->kv().Truncate(s->seq, static_cast<int64_t>(s->tokens.size()) - 1);
  int64_t kv_now = 0;
  if (s->seq != 0) kv_now = *engine_->kv().Length(s->seq);
  r->prompt_tokens = static_cast<uint32_t>(s->tokens.size() - kv_now);
  s->active = r.get();
  s->last_used_unix_ms = UnixMs();
  if (metrics_) metrics_->AddPromptTokens(r->prompt_tokens);
  waiting_.push_back(std::move(r));
}

void Scheduler::Admit() {
  while (!waiting_.empty() && running_.size() < static_cast<size_t>(options_.max_batch)) {
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

bool Scheduler::EvictIdle() {
  Session* victim = nullptr;
  for (Session* s : sessions_.All()) {
    if (s->active || s->seq == 0) continue;
    if (!victim || s->last_used_unix_ms < victim->last_used_unix_ms) victim = s;
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
  std::vector<Entry> entries;
  entries.reserve(running_.size());
  double decode_cost = 0;
  bool any_decoder = false;
  for (auto& up : running_) {
    ActiveRequest* r = up.get();
    Session* s = r->session;
    if (s->seq == 0) s->seq = kv.CreateSeq();
    const int64_t kv_len = *kv.Length(s->seq);
    const int64_t feed = static_cast<int64_t>(s->tokens.size()) - kv_len;
    MNEMO_CHECK(feed >= 1);
    if (feed == 1) {
      any_decoder = true;
      decode_cost += RowCost(kv_len);
    }
    entries.push_back({r, kv_len, feed});
  }
  double budget = any_decoder ? std::max(0.0, options_.step_tokens - decode_cost)
                              : static_cast<double>(options_.prefill_chunk);
  std::vector<Entry> batch_entries;
  for (Entry& e : entries) {
    if (e.n > 1) {
      // Largest chunk whose cost fits the budget, at least kMinPrefillChunk.
      const double per_token = RowCost(e.kv_len + e.n / 2);
      int64_t n = any_decoder ? static_cast<int64_t>(budget / per_token)
                              : static_cast<int64_t>(budget);
      n = std::min(e.n, std::max(n, kMinPrefillChunk));
      budget = std::max(0.0, budget - static_cast<double>(n) * per_token);
      e.n = n;
    }
    // Reserve per entry so a full pool is charged to the request that needs
    // the pages; idle sessions' KV goes first.
    Status st = kv.Reserve(e.r->session->seq, e.n);
    while (st.code() == StatusCode::kResourceExhausted && EvictIdle())
      st = kv.Reserve(e.r->session->seq, e.n);
    if (!st.ok()) {
      Fail(e.r, st.WithContext("session '" + e.r->session->name + "'"));
      continue;
    }
    batch_entries.push_back(e);
  }
  if (batch_entries.empty()) return;

  std::vector<model::BatchSeq> batch;
  batch.reserve(batch_entries.size());
  for (const Entry& e : batch_entries) {
    const Session* s = e.r->session;
    batch.push_back({s->seq, std::span<const int32_t>(s->tokens.data() + e.kv_len, e.n), false});
  }
  Status st = engine_->model().Forward(batch, &kv, &logits_);
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
  protocol::Done done;
  done.finish_reason = ToWire(reason);
  done.prompt_tokens = r->prompt_tokens;
  done.generated_tokens = r->generated;
  done.ttft_ms = r->t_first > 0 ? (r->t_first - r->t_arrive) * 1e3 : 0;
  done.decode_tokens_per_s =
      r->generated > 1 && r->t_last > r->t_first ? (r->generated - 1) / (r->t_last - r->t_first) : 0;
  done.persisted = false;
  r->Reply(done);
  Remove(r);
}

void Scheduler::RollBack(ActiveRequest* r) {
  Session* s = r->session;
  s->tokens.resize(r->tokens0);
  s->close_text = r->close_text0;
  s->chat_open = r->chat_open0;
  if (s->seq != 0) {
    Result<int64_t> len = engine_->kv().Length(s->seq);
    if (len.ok() && *len > r->kv0) (void)engine_->kv().Truncate(s->seq, r->kv0);
  }
}

void Scheduler::Fail(ActiveRequest* r, const Status& status) {
  RollBack(r);
  r->Reply(protocol::ErrorReply::FromStatus(status));
  Remove(r);
}

void Scheduler::Remove(ActiveRequest* r) {
  r->session->active = nullptr;
  r->session->last_used_unix_ms = UnixMs();
  auto drop = [r](auto& list) {
    for (auto it = list.begin(); it != list.end(); ++it) {
      if (it->get() == r) {
        list.erase(it);
        return true;
      }
    }
    return false;
  };
  if (!drop(running_)) drop(waiting_);
}

}  // namespace mnemo::daemon
