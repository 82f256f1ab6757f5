// The continuous-batching scheduler: one thread owns the engine (model, KV
// cache, sessions) and runs model steps. Every running request advances each
// step; new requests join between steps; long prompts are prefilled in
// chunks sized so that other sessions' decode steps stay short.
//
// Thread-safe: Submit, CancelConnection, Shutdown and the counters may be
// called from any thread; everything else lives on the scheduler thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "daemon/flow_window.h"
#include "daemon/metrics.h"
#include "daemon/prefill_pacer.h"
#include "daemon/session.h"
#include "model/engine.h"
#include "protocol/messages.h"

namespace mnemo::daemon {

struct SchedulerOptions {
  int32_t max_batch = 16;        // requests advanced per step
  int32_t step_tokens = 256;     // initial prefill rows of a step while requests decode (then measured)
  int32_t prefill_chunk = 512;   // tokens per step when only prefilling
  uint32_t default_max_tokens = 512;
  uint32_t max_queued = 64;      // Generate requests waiting for a batch slot
  uint32_t max_sessions_per_uid = 256;
  // Defaults for sampling fields a request leaves unset (llama.cpp server's).
  model::SamplingParams default_sampling = {.temperature = 0.8f, .top_k = 40, .top_p = 0.95f,
                                            .min_p = 0.05f};
  // Durable sessions (borrowed; null: sessions live in memory only).
  tiering::TierManager* tier = nullptr;
  // A session resumed from T2 while nothing else runs starts computing as
  // soon as its first layers are loaded (layer l computes while later
  // layers still load); otherwise it joins the batch once fully loaded.
  bool pipelined_resume = true;
  // A resumed session whose KV does not fit T0 streams its committed pages
  // through a ring of at most this many layer slots per step (larger than
  // memory); 0 refuses such sessions with ResourceExhausted instead.
  int32_t max_stream_window = 6;
};

// Delivers one response of a request. Called in order, the terminal
// response last, on the scheduler thread (an export's ExportChunk frames on
// the tier manager's transfer thread, all before its terminal reply); must
// not block.
using ReplyFn = std::function<void(protocol::ResponseBody body)>;

struct Job {
  uint64_t conn = 0;  // connection id, for CancelConnection and Cancel
  uint64_t id = 0;    // request id on that connection
  uid_t uid = 0;      // the peer's uid (SO_PEERCRED): owns what it creates
  protocol::RequestBody body;
  ReplyFn reply;
  // ExportSession: the credit for its ExportChunk frames (see FlowWindow).
  std::shared_ptr<FlowWindow> window;
};

// An import whose file was received, verified and written to T2: what
// Scheduler::CommitImport needs to make it a session.
struct ImportCommit {
  uint64_t conn = 0;
  uint64_t id = 0;
  uid_t uid = 0;
  std::optional<std::string> name;  // the requested name; else the file's
  std::shared_ptr<tiering::ImportJob> job;
  tiering::Manifest manifest;       // as ImportJob::Finish reported it
  ReplyFn reply;                    // gets SessionInfo or an error
};

struct ActiveRequest;

class Scheduler {
 public:
  // `engine` and `metrics` are borrowed and must outlive the scheduler.
  Scheduler(model::Engine* engine, SchedulerOptions options, Metrics* metrics);
  ~Scheduler();  // Shutdown(0) if still running
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Restores the sessions committed in the tier manager's index (their KV
  // stays on T2 until a request needs it). Call before Start.
  Status Recover();
  void Start();
  // Queues a CreateSession, Generate, Cancel, ListSessions, GetSession,
  // ForkSession, DeleteSession or ExportSession request. Its replies arrive
  // through job.reply on the scheduler thread.
  void Submit(Job job);
  // Makes a finished import a session of c.uid: AlreadyExists when the uid
  // has one of that name, ResourceExhausted at the per-uid limit, or the
  // commit's error; the import is aborted (its T2 slots freed) on any error.
  void CommitImport(ImportCommit c);
  // The connection went away: its requests are cancelled and their replies
  // are dropped.
  void CancelConnection(uint64_t conn);
  // Stops admitting work (new requests get Unavailable), lets running
  // generations finish for up to `grace`, ends the rest with an Unavailable
  // error, and joins the thread.
  void Shutdown(std::chrono::milliseconds grace);

  // Refreshes the tier rows of the metrics (T0 occupancy as of the last
  // loop iteration, T1/T2 and every tier's counters as of now). Any thread;
  // the server calls it before answering Stats so counters are exact.
  void PublishTiers();

  uint32_t running() const { return running_count_.load(); }
  uint32_t waiting() const { return waiting_count_.load(); }
  uint32_t sessions() const { return session_count_.load(); }
  // Steady-clock time of the last loop iteration: a stuck step shows here
  // (the watchdog stops pinging).
  std::chrono::steady_clock::time_point last_heartbeat() const {
    return std::chrono::steady_clock::time_point(
        std::chrono::steady_clock::duration(heartbeat_.load()));
  }

 private:
  void Run();
  // Runs `fn` on the scheduler thread between steps (tier callbacks).
  void Post(std::function<void()> fn);
  // Starts reading a session's T2 blocks into fresh T0 pages.
  Status StartLoad(ActiveRequest* r);
  void LoadDone(ActiveRequest* r, Status status, std::vector<std::vector<attention::PageId>> pages);
  // A session too large for T0: its last block loads into dedicated pages,
  // the rest streams through a ring (StreamLoaded finishes the set-up).
  Status StartStream(ActiveRequest* r, uint64_t growth_tokens);
  void StreamLoaded(ActiveRequest* r, Status status);
  // Stops a streamed request's ring (idempotent) and counts its prefetch.
  void StopStream(ActiveRequest* r);
  // Adds the ring's prefetch hits and stalls since the last count.
  void CountStream(ActiveRequest* r);
  // Admits a loading request into the batch on its pages as they load.
  bool StartPipelined(ActiveRequest* r);
  // Waits for a pipelined request's load to end; on failure its KV is
  // dropped. Returns the load's status.
  Status EndPipelined(ActiveRequest* r);
  // Turn end with tiering: persist, then Done.
  void StartPersist(ActiveRequest* r);
  void PersistDone(ActiveRequest* r, Status status, tiering::CommittedKv committed);
  tiering::Manifest ManifestOf(const Session& s) const;
  void Handle(Job job);
  void HandleGenerate(Job job);
  void HandleFork(Job& job, const protocol::ForkSessionRequest& req);
  void HandleExport(Job job);
  // Whether the KV of `tokens` tokens is more than T0 holds in all (with
  // every idle session evicted): a turn that needs it streams the session's
  // committed KV from T2 instead.
  bool ExceedsT0(uint64_t tokens) const;
  // Whether the KV `s` holds in T0 is all committed on T2 (dropping it
  // from T0 loses nothing).
  bool KvWholeOnT2(const Session& s) const;
  // The session of an ExportSession job when a turn of it is running (or
  // persisting), so that the export waits for it; else null.
  const Session* ExportWaits(const Job& job);
  // Starts the deferred exports whose session has no turn running any more.
  void RunDeferredExports();
  void DoCommitImport(ImportCommit& c);
  void Admit();
  // Sets a turn's prompt token count once its session's KV is in T0.
  void FinalizePrompt(ActiveRequest* r);
  void Step();
  // Ends a request: Done with `reason` (the turn stays in the session).
  void Finish(ActiveRequest* r, model::FinishReason reason);
  // Ends a request with an error and rolls its turn back.
  void Fail(ActiveRequest* r, const Status& status);
  void RollBack(ActiveRequest* r);
  void Remove(ActiveRequest* r);
  // Takes r out of whichever list holds it (running, waiting, persisting).
  std::unique_ptr<ActiveRequest> Detach(ActiveRequest* r);
  // Frees the KV of the least recently used idle session; false if none.
  bool EvictIdle();
  protocol::SessionInfo Info(const Session& s) const;
  void PublishGauges();

  // --- constant after construction -------------------------------------------
  model::Engine* const engine_;
  const SchedulerOptions options_;
  Metrics* const metrics_;

  // --- shared with other threads -------------------------------------------
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> inbox_;                // guarded by mu_
  std::vector<uint64_t> dead_conns_;     // guarded by mu_
  std::deque<std::function<void()>> posted_;  // guarded by mu_
  bool draining_ = false;                // guarded by mu_
  std::chrono::steady_clock::time_point drain_deadline_;  // guarded by mu_
  std::atomic<uint32_t> running_count_{0}, waiting_count_{0}, session_count_{0};
  std::atomic<int64_t> heartbeat_{0};
  // T0 occupancy, published by the scheduler thread for PublishTiers.
  std::atomic<uint64_t> t0_pages_{0}, t0_bytes_{0}, t0_budget_bytes_{0};
  // Serialises PublishTiers, so totals never go backwards.
  std::mutex publish_mu_;
  std::thread thread_;

  // --- scheduler thread only -------------------------------------------------
  SessionTable sessions_;
  std::deque<std::unique_ptr<ActiveRequest>> waiting_;
  std::vector<std::unique_ptr<ActiveRequest>> running_;
  // Finished turns waiting for their persist to commit (sessions stay busy).
  std::vector<std::unique_ptr<ActiveRequest>> persisting_;
  // Exports streaming, by (connection, request id): cancelled through
  // their window.
  std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<FlowWindow>> exports_;
  // Exports of sessions with a turn running (or persisting): they start
  // when it ends, so the file holds that turn too.
  std::vector<Job> deferred_exports_;
  std::chrono::steady_clock::time_point tier_stats_at_{};
  bool draining_local_ = false;
  bool stream_turn_ = false;  // Step alternates streamed and other requests
  std::vector<float> logits_;
  PrefillPacer pacer_;  // prompt rows of a step beside decoders
};

}  // namespace mnemo::daemon
