// The tiering manager: sessions' KV beyond the compute pool (T0). At the end
// of a turn it writes the turn's new blocks to T2 (the page store), makes
// them durable, then commits the session manifest in the index; on resume it
// reads a session's blocks back into T0 pages, verifying every layer page's
// checksum. A host-memory block cache (T1) keeps recently written or read
// blocks so a session evicted from T0 resumes without touching the disk.
//
// Thread-safe. Persist and Load run on two dedicated worker threads (a
// resume never queues behind a large persist), exports and imports on a
// third (a long transfer delays neither), and they report through callbacks
// on those threads; the caller's threads never wait on I/O. T0 page memory
// is handed over as raw pointers that the caller keeps valid and unchanged
// (persist) or untouched (load) until the callback runs.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "tiering/export_format.h"
#include "tiering/index.h"
#include "tiering/kv_stream.h"
#include "tiering/latency_histogram.h"
#include "tiering/layout.h"
#include "tiering/manifest.h"
#include "tiering/page_store.h"

namespace mnemo::tiering {

// The moments of a turn's persist that a test may stop at (TierOptions::
// persist_hook): its new blocks written but not yet synced, and every block
// durable but the manifest not yet committed.
enum class PersistStage : uint8_t { kBlocksWritten, kBeforeCommit };

struct TierOptions {
  std::string data_dir;  // holds pages/ (the T2 store) and index/
  uint64_t t1_budget_bytes = 0;
  uint64_t t2_budget_bytes = 0;
  uint32_t queue_depth = 32;
  PageStoreOptions::Engine engine = PageStoreOptions::Engine::kAuto;
  bool direct_io = true;
  // Slab files are preallocated whole (at most the budget): large enough
  // for long sequential extents, small enough not to grab a disk at once.
  size_t slab_bytes = size_t{256} << 20;
  // What the KV is computed with; manifests written under anything else are
  // refused at resume.
  uint64_t model_fingerprint = 0;
  KvGeometry kv;
  size_t page_bytes = 0;  // one layer page as T0 stores it
  // Resume reads each block in extents of about this many bytes (whole
  // layer pages), layer group after layer group: smaller extents let
  // compute start sooner, larger ones read faster.
  size_t load_extent_bytes = size_t{128} << 10;
  // Extents in flight per load (bounds its staging memory).
  uint32_t load_inflight = 64;
  // Tests: wraps the opened store (fault injection).
  std::function<std::unique_ptr<PageStore>(std::unique_ptr<PageStore>)> wrap_store;
  // Tests: runs on the persist worker at each stage a persist reaches
  // (kBlocksWritten only when it wrote blocks) and may block there, e.g.
  // while the test simulates a power loss; a non-OK status fails the
  // persist at that point, as if the process had died there.
  std::function<Status(PersistStage)> persist_hook;
};

// A session's KV as last committed on T2.
struct CommittedKv {
  uint64_t kv_tokens = 0;
  std::vector<BlockSlot> blocks;
  uint64_t turn_seq = 0;
};

struct PersistJob {
  // Everything but kv_tokens, blocks and turn_seq, which Persist fills in.
  Manifest manifest;
  CommittedKv previous;
  uint64_t kv_tokens = 0;  // tokens whose KV is in `pages`
  // [layer][page] T0 page memory covering kv_tokens.
  std::vector<std::vector<const void*>> pages;
};

class TierManager;

// A session being imported from an export file (export_format.h): its
// blocks go to freshly reserved T2 slots as they arrive, and nothing is
// visible in the index until Commit. Feed, Finish and Abort queue work on
// the tier manager's transfer worker, in call order, and report on it.
//
// Thread-safe. Abort (or destruction of the TierManager's reservations at
// the next start-up) returns the reserved slots of an import that never
// commits.
class ImportJob : public std::enable_shared_from_this<ImportJob> {
 public:
  // A piece of the file, in order. `done` gets the first error of the
  // import (ExportReader's errors, the store's), then the same for every
  // later piece.
  void Feed(std::string piece, std::function<void(Status)> done);
  // The file ended: verifies the trailer, writes the last blocks, syncs.
  // `done` gets the manifest as it will be committed (owner and name not
  // yet set; blocks are the reserved slots).
  void Finish(std::function<void(Result<Manifest>)> done);
  // Commits the finished import as session (uid, name) in one synced index
  // batch. Caller's thread. REQUIRES: Finish reported success.
  Status Commit(uint32_t uid, const std::string& name);
  // Drops the import: its reserved slots become free once no queued write
  // can touch them. Idempotent; does nothing after a successful Commit.
  // REQUIRES: the TierManager is alive (as for every method).
  void Abort();

  ImportJob(TierManager* tm, std::string label);
  ~ImportJob();

 private:
  friend class TierManager;
  Status OnManifest(Manifest m);
  Status OnBlock(const uint8_t* pages, std::span<const uint64_t> sums);
  Status WriteWindow();
  void ReleaseLocked();

  TierManager* const tm_;
  const std::string label_;
  // --- transfer worker only ---------------------------------------------------
  std::unique_ptr<ExportReader> reader_;
  Manifest manifest_;
  AlignedBuffer staging_;
  uint64_t staged_ = 0, written_ = 0;  // blocks
  std::vector<uint64_t> checksums_;    // [block][layer]
  Status failed_;
  // --- guarded by mu_ ------------------------------------------------------------
  std::mutex mu_;
  std::vector<BlockSlot> slots_;  // reserved, not yet committed
  bool finished_ = false, committed_ = false, aborted_ = false;
};

// Counters since the manager opened. A tier's bytes read and written are
// what moved out of and into it: T0 is read by persists and written by
// loads, T1 is written when blocks are cached and read on hits, T2 is the
// page store's transfers. Hits and misses: T0 counts requests (their
// session's KV resident in the compute pool or not, as the scheduler
// reports), T1 counts blocks looked up by loads.
struct TierStats {
  uint64_t t0_hits = 0, t0_misses = 0;
  uint64_t t0_bytes_read = 0, t0_bytes_written = 0;
  uint64_t t1_blocks = 0, t1_bytes = 0, t1_budget_bytes = 0;
  uint64_t t1_hits = 0, t1_misses = 0;
  uint64_t t1_bytes_read = 0, t1_bytes_written = 0;
  uint64_t t2_blocks = 0, t2_bytes = 0, t2_budget_bytes = 0;
  uint64_t t2_reserved_blocks = 0;  // allocated to a persist or import not yet committed
  uint64_t bytes_read = 0, bytes_written = 0;  // T2
  // T2 device latency per operation (PageStoreStats).
  LatencySnapshot t2_read_latency, t2_write_latency, t2_sync_latency;
  // Prefetch into T0, as RecordPrefetch reports it.
  uint64_t prefetch_hits = 0, prefetch_stalls = 0, prefetch_stall_ns = 0;
  uint64_t persists = 0, persist_errors = 0, loads = 0, load_errors = 0;
  size_t block_bytes = 0;
  int32_t n_layers = 0;
};

// The KV page size (tokens) data directory `data_dir` was created with, for
// a model of geometry `kv`, read from the page store's recorded block size:
// nullopt when it holds no page store yet. Pages are padded to the I/O
// alignment in a block, so several sizes can make one block size:
// kv.page_tokens when it is one of them, else the one whose pages fill the
// alignment exactly (a padded size, which no default has been, shows up
// later as each session's recorded page size, and its refusal names it).
// InvalidArgument,
// naming the block size, when no page size up to 1024 tokens makes that
// block for this model (another model's data), or when the candidates
// leave it open (--page-tokens decides).
Result<std::optional<int32_t>> DataDirPageTokens(const std::string& data_dir, const KvGeometry& kv);

class TierManager {
 public:
  // Opens (creating) <data_dir>/pages and <data_dir>/index. Errors as
  // OpenPageStore and Index::Open (a newer format: FailedPrecondition; a
  // damaged index: Corruption), and Corruption when the index is missing
  // while the page store holds slab files (a lost index, not a new one).
  static Result<std::unique_ptr<TierManager>> Open(const TierOptions& options);
  ~TierManager();  // finishes queued work, then stops the workers
  TierManager(const TierManager&) = delete;
  TierManager& operator=(const TierManager&) = delete;

  const BlockLayout& layout() const { return layout_; }
  const RecoveryReport& recovery() const { return index_->recovery(); }
  std::string_view engine_name() const { return store_->engine_name(); }

  // Every committed session, for the daemon's table at start-up.
  Result<std::vector<Manifest>> LoadManifests() const { return index_->LoadManifests(); }
  // FailedPrecondition naming the session when it was computed under
  // another model file or KV layout.
  Status CheckCompatible(const Manifest& m) const;
  // The KV geometry and fingerprint new manifests carry.
  void Stamp(Manifest* m) const;

  using PersistDone = std::function<void(Status, CommittedKv)>;
  // Writes the blocks of `job` not yet on T2 (the previous partial block is
  // rewritten to a fresh slot), syncs, and commits the manifest. `done` gets
  // the new committed state, or an error with nothing changed on T2.
  void Persist(PersistJob job, PersistDone done);

  // Reads the first kv_tokens tokens' blocks into `dst` ([layer][page] T0
  // page memory, ceil(kv_tokens / page_tokens) pages per layer). Corruption
  // naming `label` when a page fails its checksum.
  //
  // The pages arrive in layer order: every block's first layer, then the
  // next two, four, ... layers (extents of at most about load_extent_bytes
  // per block), so that a step can compute layer l while later layers still
  // load; with extents of a whole block, whole blocks. `on_layers(n)`
  // (optional, on the load thread) reports that layers [0, n) of every
  // block are verified and in `dst`; it runs with increasing n, the last
  // time with n_layers, before `done`.
  void Load(std::string label, std::vector<BlockSlot> blocks, uint64_t kv_tokens,
            std::vector<std::vector<void*>> dst, std::function<void(Status)> done,
            std::function<void(int32_t)> on_layers = nullptr);

  // A ring that streams `options.blocks` through T0 layer by layer (a
  // session larger than memory); see KvStream. Reads the blocks' checksums
  // from the index first (NotFound/Corruption naming the session).
  Result<std::unique_ptr<KvStream>> OpenStream(KvStreamOptions options);

  // The model and KV layout exports are written for and imports require.
  ExportModel export_model() const;
  // Streams committed session `m` (its kv_tokens and blocks as committed;
  // owner and turn_seq are not exported) to `sink`, reading its blocks from
  // T1 or T2 and verifying every page's checksum (Corruption naming `label`
  // otherwise). The blocks are pinned before Export returns (Index::Pin):
  // later turns, forks and deletes of the session may commit meanwhile
  // without freeing or reusing them, and the export is the state `m`
  // describes. A block of `m` that is not committed fails the export
  // (NotFound). `sink` may block (flow control) and its error aborts the
  // export.
  void Export(std::string label, Manifest m, ExportSink sink, size_t chunk_bytes,
              std::function<void(Result<ExportSummary>)> done);
  // Starts importing a session export.
  std::shared_ptr<ImportJob> StartImport(std::string label);

  // Index operations: one small synced batch each, on the caller's thread.
  Status CommitManifest(const Manifest& m);  // a session without KV blocks
  Status Fork(uint32_t uid, std::string_view src, const Manifest& dst);
  Status Delete(uint32_t uid, std::string_view name);

  // Accounting reported by the T0 owner (the scheduler); any thread.
  // A request found its session's KV resident in T0 (hit) or had to load or
  // recompute it (miss).
  void RecordT0Access(bool hit) { (hit ? t0_hits_ : t0_misses_).fetch_add(1, std::memory_order_relaxed); }
  // Layer pages a computation needed: `hits` were in T0 when it needed them
  // (resident, or prefetched in time), `stalls` it had to wait for, and
  // `stall_ns` how long it waited in all. Callable per layer as pages arrive.
  void RecordPrefetch(uint64_t hits, uint64_t stalls, uint64_t stall_ns) {
    prefetch_hits_.fetch_add(hits, std::memory_order_relaxed);
    prefetch_stalls_.fetch_add(stalls, std::memory_order_relaxed);
    prefetch_stall_ns_.fetch_add(stall_ns, std::memory_order_relaxed);
  }

  TierStats stats() const;
  // Blocks of `slots` present in T1.
  uint32_t CountT1(const std::vector<BlockSlot>& slots) const;

 private:
  friend class KvStream;
  friend class ImportJob;
  TierManager(TierOptions options, BlockLayout layout, std::unique_ptr<PageStore> store,
              std::unique_ptr<Index> index);
  struct Worker {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> jobs;  // guarded by mu
    bool stop = false;                       // guarded by mu
    std::thread thread;
    const char* name = "mnemo-tier";         // the thread's name
  };
  void StartWorker(Worker* w);
  void StopWorker(Worker* w);
  static void Enqueue(Worker* w, std::function<void()> job);
  Status DoPersist(PersistJob& job, CommittedKv* out);
  Status DoLoad(const std::string& label, const std::vector<BlockSlot>& blocks, uint64_t kv_tokens,
                const std::vector<std::vector<void*>>& dst, const std::function<void(int32_t)>& on_layers);
  Result<ExportSummary> DoExport(const std::string& label, const Manifest& m, const BlockPin& pin,
                                 const ExportSink& sink, size_t chunk_bytes);
  // Reads blocks `slots` into consecutive block_bytes of `staging` (from T1
  // where present) and verifies each layer page against the index; fills
  // `infos`. Corruption naming `label` for a page that fails. With `pin`,
  // the block records are read as the pin saw them.
  Status ReadVerified(const std::string& label, std::span<const BlockSlot> slots, uint8_t* staging,
                      std::vector<BlockInfo>* infos, const BlockPin* pin = nullptr);
  // Copies span `s` of `job` into `block` (block_bytes) and fills the
  // per-layer checksums.
  void StageBlock(const PersistJob& job, size_t s, uint8_t* block, uint64_t* checksums) const;
  // T1.
  void T1Put(BlockSlot slot, const uint8_t* block);
  bool T1Get(BlockSlot slot, uint8_t* block);
  // Bytes [offset, offset + length) of a cached block.
  bool T1GetRange(BlockSlot slot, size_t offset, size_t length, uint8_t* out);
  // Runs copy(block) on a cached block under the T1 lock (it returns the
  // bytes it copied out), counting the hit or miss and refreshing recency.
  bool T1Copy(BlockSlot slot, const std::function<uint64_t(const uint8_t* block)>& copy);
  // Layers [l0, l1) of a cached block into pages[0 .. l1 - l0): one lookup.
  bool T1GetLayers(BlockSlot slot, int32_t l0, int32_t l1, void* const* pages);
  bool T1Has(BlockSlot slot) const;
  void T1Drop(BlockSlot slot);

  // --- constant after construction -------------------------------------------
  const TierOptions options_;
  const BlockLayout layout_;
  std::unique_ptr<PageStore> store_;
  std::unique_ptr<Index> index_;
  const uint64_t t1_capacity_blocks_;

  // --- T1, guarded by t1_mu_ ---------------------------------------------------
  mutable std::mutex t1_mu_;
  std::list<BlockSlot> t1_lru_;  // most recent first
  struct T1Entry {
    AlignedBuffer data;
    std::list<BlockSlot>::iterator lru;
  };
  std::unordered_map<BlockSlot, T1Entry> t1_;
  uint64_t t1_hits_ = 0, t1_misses_ = 0;

  std::atomic<uint64_t> persists_{0}, persist_errors_{0}, loads_{0}, load_errors_{0};
  std::atomic<uint64_t> t0_hits_{0}, t0_misses_{0}, t0_bytes_read_{0}, t0_bytes_written_{0};
  std::atomic<uint64_t> t1_bytes_read_{0}, t1_bytes_written_{0};
  std::atomic<uint64_t> prefetch_hits_{0}, prefetch_stalls_{0}, prefetch_stall_ns_{0};
  std::atomic<uint64_t> exports_{0}, export_errors_{0}, imports_{0}, import_errors_{0};
  Worker persist_worker_, load_worker_, transfer_worker_;
};

}  // namespace mnemo::tiering
