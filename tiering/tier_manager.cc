// TierManager: turn persistence (stage, write, sync, commit), resume loads
// with checksum verification, and the T1 block cache.
#include "tiering/tier_manager.h"

#include "common/thread_name.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#include <spdlog/spdlog.h>

namespace mnemo::tiering {
namespace {

// Blocks staged and written per window: bounds the staging memory of a
// persist or load (window * block_bytes) whatever the session length.
constexpr size_t kWindowBlocks = 32;

}  // namespace

Result<std::optional<int32_t>> DataDirPageTokens(const std::string& data_dir, const KvGeometry& kv) {
  const std::string dir = data_dir + "/pages";
  MNEMO_ASSIGN_OR_RETURN(std::optional<size_t> recorded, RecordedBlockBytes(dir));
  if (!recorded) return std::optional<int32_t>();
  std::vector<int32_t> fits, unpadded;
  for (int32_t pt = 1; pt <= 1024; ++pt) {
    Result<BlockLayout> layout = BlockLayout::For(kernels::KvLayout{pt, kv.n_kv_heads, kv.head_dim}, kv.n_layers);
    if (!layout.ok()) return layout.status();
    if (layout->block_bytes == *recorded) {
      fits.push_back(pt);
      if (layout->page_bytes == layout->layer_stride) unpadded.push_back(pt);
    }
    if (layout->block_bytes > *recorded) break;
  }
  if (fits.size() == 1) return std::optional<int32_t>(fits[0]);
  if (std::find(fits.begin(), fits.end(), kv.page_tokens) != fits.end())
    return std::optional<int32_t>(kv.page_tokens);
  // Pages padded up to the I/O alignment make the same blocks as the size
  // that fills it exactly (the default model: 11 to 16 tokens, 59 to 64):
  // that size, the one any default has been, is taken.
  if (unpadded.size() == 1) return std::optional<int32_t>(unpadded[0]);
  const std::string what = "the page store in " + dir + " holds blocks of " + std::to_string(*recorded) + " bytes";
  if (fits.empty())
    return Status::InvalidArgument(what + ", which no KV page size of this model makes (" +
                                   std::to_string(kv.n_layers) + " layers, " + std::to_string(kv.n_kv_heads) +
                                   " KV heads of " + std::to_string(kv.head_dim) +
                                   "): it was written for another model");
  return Status::InvalidArgument(what + ", which pages of " + std::to_string(fits.front()) + " to " +
                                 std::to_string(fits.back()) + " tokens all make: set --page-tokens");
}

Result<std::unique_ptr<TierManager>> TierManager::Open(const TierOptions& options) {
  if (options.page_bytes == 0) return Status::InvalidArgument("tiering: page_bytes not set");
  kernels::KvLayout kv{options.kv.page_tokens, options.kv.n_kv_heads, options.kv.head_dim};
  MNEMO_ASSIGN_OR_RETURN(BlockLayout layout, BlockLayout::For(kv, options.kv.n_layers));
  if (layout.page_bytes != options.page_bytes)
    return Status::InvalidArgument("tiering: page size " + std::to_string(options.page_bytes) +
                                   " does not match the KV geometry's " + std::to_string(layout.page_bytes));
  if (options.t2_budget_bytes < layout.block_bytes)
    return Status::InvalidArgument("T2 budget of " + std::to_string(options.t2_budget_bytes) +
                                   " bytes holds no block of " + std::to_string(layout.block_bytes) + " bytes");
  std::error_code ec;
  std::filesystem::create_directories(options.data_dir, ec);
  if (ec) return Status::IOError("cannot create " + options.data_dir + ": " + ec.message());

  PageStoreOptions so;
  so.dir = options.data_dir + "/pages";
  so.block_bytes = layout.block_bytes;
  so.slab_bytes = std::max<size_t>(std::min<uint64_t>(options.slab_bytes, options.t2_budget_bytes),
                                   layout.block_bytes);
  so.budget_bytes = options.t2_budget_bytes;
  so.queue_depth = options.queue_depth;
  so.engine = options.engine;
  so.direct_io = options.direct_io;
  Result<std::unique_ptr<PageStore>> opened = OpenPageStore(so);
  if (!opened.ok() && opened.status().code() == StatusCode::kUnsupported && so.direct_io) {
    spdlog::warn("{}; using buffered I/O (the page cache) for T2", opened.status().ToString());
    so.direct_io = false;
    opened = OpenPageStore(so);
  }
  if (!opened.ok()) return opened.status();
  std::unique_ptr<PageStore> store = std::move(opened).value();
  if (options.wrap_store) store = options.wrap_store(std::move(store));

  IndexOptions io;
  io.capacity_slots = store->max_slots();
  // Slab files are first made by a persist or import, after the index: T2
  // blocks without an index mean it was lost, and a new one would drop every
  // session silently.
  io.create_if_missing = store->capacity_slots() == 0;
  const std::string index_dir = options.data_dir + "/" + std::string(kIndexDirName);
  Result<std::unique_ptr<Index>> opened_index = Index::Open(index_dir, io);
  if (!opened_index.ok() && opened_index.status().code() == StatusCode::kNotFound && !io.create_if_missing)
    return Status::Corruption("the session index " + index_dir + " is missing, but " + so.dir + " holds " +
                              std::to_string(store->capacity_slots()) +
                              " blocks of KV pages that it records. mnemod does not start without it, which would "
                              "lose every session silently: restore it from a backup, or move " + options.data_dir +
                              " aside to start with no sessions");
  if (!opened_index.ok()) return opened_index.status();
  std::unique_ptr<Index> index = std::move(opened_index).value();
  const RecoveryReport& r = index->recovery();
  spdlog::info("T2: {} ({}), {} sessions, {} blocks committed, {} free, index opened in {} ms",
               store->engine_name(), so.dir, r.sessions, r.slots_committed, r.slots_free, r.elapsed_ms);
  return std::unique_ptr<TierManager>(
      new TierManager(options, layout, std::move(store), std::move(index)));
}

TierManager::TierManager(TierOptions options, BlockLayout layout, std::unique_ptr<PageStore> store,
                         std::unique_ptr<Index> index)
    : options_(std::move(options)),
      layout_(layout),
      store_(std::move(store)),
      index_(std::move(index)),
      t1_capacity_blocks_(options_.t1_budget_bytes / layout_.block_bytes) {
  persist_worker_.name = "mnemo-persist";
  load_worker_.name = "mnemo-load";
  transfer_worker_.name = "mnemo-transfer";
  StartWorker(&persist_worker_);
  StartWorker(&load_worker_);
  StartWorker(&transfer_worker_);
}

TierManager::~TierManager() {
  StopWorker(&transfer_worker_);
  StopWorker(&persist_worker_);
  StopWorker(&load_worker_);
}

void TierManager::StartWorker(Worker* w) {
  w->thread = std::thread([w] {
    SetThreadName(w->name);
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(w->mu);
        w->cv.wait(lock, [&] { return w->stop || !w->jobs.empty(); });
        if (w->jobs.empty()) return;  // stop requested and drained
        job = std::move(w->jobs.front());
        w->jobs.pop_front();
      }
      job();
    }
  });
}

void TierManager::StopWorker(Worker* w) {
  {
    std::lock_guard<std::mutex> lock(w->mu);
    w->stop = true;
    w->cv.notify_all();
  }
  if (w->thread.joinable()) w->thread.join();
}

void TierManager::Enqueue(Worker* w, std::function<void()> job) {
  std::lock_guard<std::mutex> lock(w->mu);
  w->jobs.push_back(std::move(job));
  w->cv.notify_one();
}

void TierManager::Stamp(Manifest* m) const {
  m->model_fingerprint = options_.model_fingerprint;
  m->kv = options_.kv;
}

Status TierManager::CheckCompatible(const Manifest& m) const {
  if (m.model_fingerprint != options_.model_fingerprint)
    return Status::FailedPrecondition(SessionLabel(m.owner_uid, m.name) +
                                      " was computed with another model file (fingerprint " +
                                      std::to_string(m.model_fingerprint) + ", this daemon's " +
                                      std::to_string(options_.model_fingerprint) + "); it cannot be resumed");
  if (!(m.kv == options_.kv)) {
    KvGeometry same_pages = m.kv;
    same_pages.page_tokens = options_.kv.page_tokens;
    // Only the page size differs (a daemon whose page_tokens changed, e.g.
    // across the default's move from 16 to 64): say how to resume it.
    const std::string hint = same_pages == options_.kv
                                 ? "; this daemon uses " + std::to_string(options_.kv.page_tokens) +
                                       "-token pages: run it with --page-tokens " +
                                       std::to_string(m.kv.page_tokens) + " to resume it"
                                 : "; it cannot be resumed";
    return Status::FailedPrecondition(SessionLabel(m.owner_uid, m.name) +
                                      " was stored with another KV layout (page tokens " +
                                      std::to_string(m.kv.page_tokens) + ", layers " +
                                      std::to_string(m.kv.n_layers) + ")" + hint);
  }
  return Status::Ok();
}

void TierManager::StageBlock(const PersistJob& job, size_t s, uint8_t* block, uint64_t* checksums) const {
  for (int32_t l = 0; l < layout_.n_layers; ++l) {
    uint8_t* dst = block + layout_.LayerOffset(l);
    memcpy(dst, job.pages[l][s], layout_.page_bytes);
    if (layout_.layer_stride > layout_.page_bytes)
      memset(dst + layout_.page_bytes, 0, layout_.layer_stride - layout_.page_bytes);
    checksums[l] = PageChecksum(dst, layout_.page_bytes);
  }
}

void TierManager::Persist(PersistJob job, PersistDone done) {
  Enqueue(&persist_worker_, [this, job = std::move(job), done = std::move(done)]() mutable {
    CommittedKv out;
    Status s = DoPersist(job, &out);
    ++persists_;
    if (!s.ok()) {
      ++persist_errors_;
      spdlog::warn("persisting {}: {}", SessionLabel(job.manifest.owner_uid, job.manifest.name), s.ToString());
    }
    done(std::move(s), std::move(out));
  });
}

Status TierManager::DoPersist(PersistJob& job, CommittedKv* out) {
  const int32_t pt = layout_.page_tokens;
  const uint64_t spans = BlocksForTokens(job.kv_tokens, pt);
  for (const auto& layer : job.pages)
    if (layer.size() < spans) return Status::Internal("persist: page table shorter than the KV");
  if (static_cast<int32_t>(job.pages.size()) != layout_.n_layers)
    return Status::Internal("persist: page table has the wrong layer count");
  // Full blocks already committed stay; a committed partial block is
  // rewritten, as are blocks past what was committed.
  uint64_t keep = std::min<uint64_t>(job.previous.kv_tokens, job.kv_tokens) / pt;
  keep = std::min<uint64_t>(keep, job.previous.blocks.size());
  const uint64_t fresh = spans - keep;
  std::vector<BlockSlot> slots;
  if (fresh > 0) {
    MNEMO_ASSIGN_OR_RETURN(slots, index_->AllocateSlots(fresh));
    if (Status s = store_->EnsureCapacity(slots.back() + 1); !s.ok()) {
      (void)index_->ReleaseSlots(slots);
      return s;
    }
  }
  std::vector<uint64_t> checksums(fresh * layout_.n_layers);
  auto fail = [&](Status s) {
    if (!slots.empty()) (void)index_->ReleaseSlots(slots);
    return s;
  };
  const size_t window = std::min<size_t>(kWindowBlocks, std::max<uint64_t>(fresh, 1));
  Result<AlignedBuffer> staging = AlignedBuffer::Allocate(window * layout_.block_bytes);
  if (!staging.ok()) return fail(staging.status());
  for (uint64_t w0 = 0; w0 < fresh; w0 += window) {
    const uint64_t n = std::min<uint64_t>(window, fresh - w0);
    std::vector<const void*> bufs(n);
    for (uint64_t i = 0; i < n; ++i) {
      uint8_t* block = staging->data() + i * layout_.block_bytes;
      StageBlock(job, keep + w0 + i, block, &checksums[(w0 + i) * layout_.n_layers]);
      bufs[i] = block;
    }
    t0_bytes_read_.fetch_add(n * layout_.n_layers * layout_.page_bytes, std::memory_order_relaxed);
    if (Status s = store_->WriteBlocks(std::span<const BlockSlot>(slots.data() + w0, n), bufs); !s.ok())
      return fail(s.WithContext("writing KV blocks"));
    for (uint64_t i = 0; i < n; ++i) T1Put(slots[w0 + i], staging->data() + i * layout_.block_bytes);
  }
  if (fresh > 0) {
    if (options_.persist_hook) {
      if (Status s = options_.persist_hook(PersistStage::kBlocksWritten); !s.ok()) {
        for (BlockSlot slot : slots) T1Drop(slot);
        return fail(s);
      }
    }
    if (Status s = store_->Sync(); !s.ok()) return fail(s.WithContext("syncing KV blocks"));
  }
  if (options_.persist_hook) {
    if (Status s = options_.persist_hook(PersistStage::kBeforeCommit); !s.ok()) {
      for (BlockSlot slot : slots) T1Drop(slot);
      return fail(s);
    }
  }
  Manifest& m = job.manifest;
  Stamp(&m);
  m.kv_tokens = job.kv_tokens;
  m.blocks.assign(job.previous.blocks.begin(), job.previous.blocks.begin() + static_cast<ptrdiff_t>(keep));
  m.blocks.insert(m.blocks.end(), slots.begin(), slots.end());
  m.turn_seq = job.previous.turn_seq + 1;
  std::vector<NewBlock> nb(fresh);
  for (uint64_t i = 0; i < fresh; ++i)
    nb[i] = NewBlock{slots[i], std::span<const uint64_t>(&checksums[i * layout_.n_layers], layout_.n_layers)};
  if (Status s = index_->CommitTurn(m, nb); !s.ok()) {
    for (BlockSlot slot : slots) T1Drop(slot);
    return fail(s.WithContext("committing the manifest"));
  }
  // The rewritten partial block's slot may be reused now.
  for (uint64_t i = keep; i < job.previous.blocks.size(); ++i) T1Drop(job.previous.blocks[i]);
  out->kv_tokens = m.kv_tokens;
  out->blocks = m.blocks;
  out->turn_seq = m.turn_seq;
  return Status::Ok();
}

void TierManager::Load(std::string label, std::vector<BlockSlot> blocks, uint64_t kv_tokens,
                       std::vector<std::vector<void*>> dst, std::function<void(Status)> done,
                       std::function<void(int32_t)> on_layers) {
  Enqueue(&load_worker_, [this, label = std::move(label), blocks = std::move(blocks), kv_tokens,
                          dst = std::move(dst), done = std::move(done),
                          on_layers = std::move(on_layers)]() mutable {
    Status s = DoLoad(label, blocks, kv_tokens, dst, on_layers);
    ++loads_;
    if (!s.ok()) {
      ++load_errors_;
      spdlog::warn("loading {}: {}", label, s.ToString());
    }
    done(std::move(s));
  });
}

namespace {

// One extent read of a load: the request, and whether it completed. The
// completion runs on the store's I/O thread and only flags it.
struct LoadIo;
struct LoadRing {
  std::mutex mu;
  std::condition_variable cv;
  LoadIo* awaited = nullptr;  // the read the load thread sleeps for (guarded by mu)
};

struct LoadIo {
  IoRequest req;
  std::vector<iovec> iov;       // a direct load's T0 pages
  std::vector<void*> pages;
  LoadRing* ring = nullptr;
  bool done = false;  // guarded by ring->mu
  bool submitted = false;
};

void LoadIoDone(IoRequest* req) {
  auto* io = static_cast<LoadIo*>(req->user);
  std::lock_guard<std::mutex> lock(io->ring->mu);
  io->done = true;
  // Only the awaited read wakes the load thread: on two vCPUs every wake-up
  // takes a core from the computation the load feeds.
  if (io->ring->awaited == io) io->ring->cv.notify_one();
}

// Reads a load thread handles per wake-up (fewer within a layer group's
// last reads): it sleeps for the last of them, then verifies them all.
constexpr uint64_t kLoadWakeBatch = 16;

}  // namespace

Status TierManager::ReadVerified(const std::string& label, std::span<const BlockSlot> slots, uint8_t* staging,
                                 std::vector<BlockInfo>* infos, const BlockPin* pin) {
  const size_t n = slots.size();
  infos->assign(n, BlockInfo{});
  std::vector<BlockSlot> to_read;
  std::vector<void*> bufs;
  std::vector<bool> from_t1(n);
  for (size_t i = 0; i < n; ++i) {
    Result<BlockInfo> info = pin ? index_->GetBlock(slots[i], *pin) : index_->GetBlock(slots[i]);
    if (!info.ok()) return info.status().WithContext(label);
    (*infos)[i] = std::move(info).value();
    uint8_t* block = staging + i * layout_.block_bytes;
    from_t1[i] = T1Get(slots[i], block);
    if (!from_t1[i]) {
      to_read.push_back(slots[i]);
      bufs.push_back(block);
    }
  }
  if (!to_read.empty()) {
    if (Status s = store_->ReadBlocks(to_read, bufs); !s.ok()) return s.WithContext(label + ": reading KV blocks");
  }
  for (size_t i = 0; i < n; ++i) {
    uint8_t* block = staging + i * layout_.block_bytes;
    const BlockSlot slot = slots[i];
    const BlockInfo& info = (*infos)[i];
    bool ok = info.page_checksums.size() == static_cast<size_t>(layout_.n_layers);
    int32_t bad_layer = -1;
    for (int32_t l = 0; ok && l < layout_.n_layers; ++l) {
      if (PageChecksum(block + layout_.LayerOffset(l), layout_.page_bytes) != info.page_checksums[l]) {
        ok = false;
        bad_layer = l;
      }
    }
    if (!ok) {
      if (from_t1[i]) {
        // A stale cache entry (slot reused): read the disk copy instead.
        T1Drop(slot);
        if (Status s = store_->ReadBlocks(std::span<const BlockSlot>(&slot, 1),
                                          std::span<void* const>(reinterpret_cast<void**>(&block), 1));
            !s.ok())
          return s.WithContext(label + ": reading KV blocks");
        from_t1[i] = false;
        --i;  // verify again
        continue;
      }
      return Status::Corruption(label + ": KV page of layer " + std::to_string(bad_layer) + " in block " +
                                std::to_string(slot) + " fails its checksum");
    }
    if (!from_t1[i]) T1Put(slot, block);
  }
  return Status::Ok();
}

Status TierManager::DoLoad(const std::string& label, const std::vector<BlockSlot>& blocks, uint64_t kv_tokens,
                           const std::vector<std::vector<void*>>& dst,
                           const std::function<void(int32_t)>& on_layers) {
  const uint64_t spans = BlocksForTokens(kv_tokens, layout_.page_tokens);
  const int32_t n_layers = layout_.n_layers;
  if (blocks.size() < spans) return Status::Corruption(label + ": manifest lists fewer blocks than its KV");
  if (static_cast<int32_t>(dst.size()) != n_layers) return Status::Internal("load: wrong layer count");
  if (spans == 0) {
    if (on_layers) on_layers(n_layers);
    return Status::Ok();
  }
  std::vector<BlockInfo> infos(spans);
  for (uint64_t i = 0; i < spans; ++i) {
    Result<BlockInfo> info = index_->GetBlock(blocks[i]);
    if (!info.ok()) return info.status().WithContext(label);
    if (info->page_checksums.size() != static_cast<size_t>(n_layers))
      return Status::Corruption(label + ": block " + std::to_string(blocks[i]) + " has " +
                                std::to_string(info->page_checksums.size()) + " page checksums, expected " +
                                std::to_string(n_layers));
    infos[i] = std::move(info).value();
  }

  // Items in load order: (layer group g, block i) for g, then i. Groups
  // grow from one layer, doubling up to about load_extent_bytes per read:
  // compute waits only for the first layer's pages of every block, and the
  // later, larger reads keep the device busy while it works. Extents of a
  // whole block load in one group (and fill T1).
  const int32_t per_group = static_cast<int32_t>(
      std::clamp<size_t>(options_.load_extent_bytes / layout_.layer_stride, 1, static_cast<size_t>(n_layers)));
  std::vector<int32_t> bounds{0};
  for (int32_t size = per_group == n_layers ? n_layers : 1; bounds.back() < n_layers;
       size = std::min(size * 2, per_group))
    bounds.push_back(std::min(n_layers, bounds.back() + size));
  const int32_t groups = static_cast<int32_t>(bounds.size()) - 1;
  const uint64_t items = static_cast<uint64_t>(groups) * spans;
  const size_t extent_max = static_cast<size_t>(per_group) * layout_.layer_stride;
  const size_t ring_n = std::min<uint64_t>(std::max<uint32_t>(options_.load_inflight, 1), items);
  // Reads land straight in the T0 pages (scatter reads: no staging copy,
  // which on a busy host takes CPU from the computation waiting for them)
  // when a block's layers are whole pages apart and every page is aligned
  // for O_DIRECT. Whole-block extents stage, to fill T1 with the block.
  bool direct = groups > 1 && layout_.page_bytes == layout_.layer_stride &&
                layout_.page_bytes % kDirectIoAlignment == 0 && static_cast<uint32_t>(per_group) <= kMaxIov;
  for (const auto& layer : dst)
    for (void* p : layer) direct = direct && reinterpret_cast<uintptr_t>(p) % kDirectIoAlignment == 0;
  Result<AlignedBuffer> staging = AlignedBuffer::Allocate(direct ? extent_max : ring_n * extent_max);
  if (!staging.ok()) return staging.status();
  LoadRing ring;
  std::vector<LoadIo> ios(ring_n);
  if (direct) {
    for (LoadIo& io : ios) {
      io.iov.resize(static_cast<size_t>(per_group));
      io.pages.resize(static_cast<size_t>(per_group));
    }
  }
  auto group_layers = [&](uint64_t item, int32_t* l0, int32_t* l1) {
    const int32_t g = static_cast<int32_t>(item / spans);
    *l0 = bounds[g];
    *l1 = bounds[g + 1];
  };
  // Reads prepared by start, submitted together by flush.
  std::vector<IoRequest*> pending;
  pending.reserve(ring_n);
  // Prepares item k in ring slot k % ring_n: from T1 when cached, else a
  // read for the next flush.
  auto start = [&](uint64_t k) {
    LoadIo& io = ios[k % ring_n];
    int32_t l0, l1;
    group_layers(k, &l0, &l1);
    const BlockSlot slot = blocks[k % spans];
    uint8_t* buf = direct ? nullptr : staging->data() + (k % ring_n) * extent_max;
    const size_t off = layout_.LayerOffset(l0);
    const size_t len = static_cast<size_t>(l1 - l0) * layout_.layer_stride;
    io.req = IoRequest{};
    io.req.op = IoOp::kRead;
    io.req.slot = slot;
    io.req.offset = off;
    io.req.length = len;
    io.req.buf = buf;
    io.req.callback = &LoadIoDone;
    io.req.user = &io;
    io.ring = &ring;
    io.submitted = false;
    if (direct) {
      for (int32_t l = l0; l < l1; ++l) {
        io.pages[l - l0] = dst[l][k % spans];
        io.iov[l - l0] = iovec{dst[l][k % spans], layout_.page_bytes};
      }
      if (l1 - l0 == 1) {
        io.req.buf = io.pages[0];
      } else {
        io.req.iov = io.iov.data();
        io.req.iov_count = static_cast<uint32_t>(l1 - l0);
      }
    }
    const bool cached = direct ? T1GetLayers(slot, l0, l1, io.pages.data()) : T1GetRange(slot, off, len, buf);
    {
      std::lock_guard<std::mutex> lock(ring.mu);
      io.done = cached;
    }
    if (!cached) pending.push_back(&io.req);
  };
  // Submits the prepared reads in one batch (all or none).
  auto flush = [&]() -> Status {
    if (pending.empty()) return Status::Ok();
    Status s = store_->Submit(std::span<IoRequest* const>(pending.data(), pending.size()));
    if (s.ok())
      for (IoRequest* r : pending) static_cast<LoadIo*>(r->user)->submitted = true;
    pending.clear();
    return s;
  };
  auto wait_done = [&](LoadIo& io) {
    std::unique_lock<std::mutex> lock(ring.mu);
    if (io.done) return;
    ring.awaited = &io;
    ring.cv.wait(lock, [&] { return io.done; });
    ring.awaited = nullptr;
  };
  // Waits until every submitted read is back (their buffers are ours again).
  auto drain = [&] {
    for (LoadIo& io : ios)
      if (io.submitted) wait_done(io);
  };

  uint64_t next = 0;
  for (; next < ring_n; ++next) start(next);
  uint64_t batch_end = 0;
  for (uint64_t k = 0; k < items; ++k) {
    if (k == batch_end) {
      // Submit the reads prepared since the last batch, then sleep once for
      // this batch's last read.
      if (Status st = flush(); !st.ok()) {
        drain();
        return st.WithContext(label + ": reading KV blocks");
      }
      batch_end = std::min({k + kLoadWakeBatch, (k / spans + 1) * spans, next});
      wait_done(ios[(batch_end - 1) % ring_n]);
    }
    LoadIo& io = ios[k % ring_n];
    wait_done(io);
    io.submitted = false;
    const uint64_t i = k % spans;
    const BlockSlot slot = blocks[i];
    int32_t l0, l1;
    group_layers(k, &l0, &l1);
    Status s = io.req.status;
    uint8_t* buf = static_cast<uint8_t*>(io.req.buf);  // null when direct
    bool in_dst = direct;                               // the bytes are in dst already
    auto page_of = [&](int32_t l) -> const uint8_t* {
      return in_dst ? static_cast<const uint8_t*>(dst[l][i]) : buf + static_cast<size_t>(l - l0) * layout_.layer_stride;
    };
    // The first layer of the extent whose page fails its checksum, or -1.
    auto bad_layer_of = [&] {
      for (int32_t l = l0; l < l1; ++l)
        if (PageChecksum(page_of(l), layout_.page_bytes) != infos[i].page_checksums[l]) return l;
      return -1;
    };
    int32_t bad_layer = s.ok() ? bad_layer_of() : -1;
    if (bad_layer >= 0) {
      // A stale T1 entry (its slot was reused) or a bad read: drop the cache
      // entry and check the disk once more (a direct load through the
      // staging buffer).
      T1Drop(slot);
      if (direct) {
        buf = staging->data();
        in_dst = false;
      }
      s = store_->Read(slot, io.req.offset, io.req.length, buf);
      bad_layer = s.ok() ? bad_layer_of() : -1;
    }
    if (!s.ok()) {
      drain();
      return s.WithContext(label + ": reading KV blocks");
    }
    if (bad_layer >= 0) {
      drain();
      return Status::Corruption(label + ": KV page of layer " + std::to_string(bad_layer) + " in block " +
                                std::to_string(slot) + " fails its checksum");
    }
    if (!in_dst)
      for (int32_t l = l0; l < l1; ++l) memcpy(dst[l][i], page_of(l), layout_.page_bytes);
    t0_bytes_written_.fetch_add(uint64_t{layout_.page_bytes} * static_cast<uint64_t>(l1 - l0),
                                std::memory_order_relaxed);
    if (groups == 1 && !T1Has(slot)) T1Put(slot, buf);  // a whole block read from T2
    if (next < items) start(next++);
    if (i + 1 == spans && on_layers) on_layers(l1);
  }
  return Status::Ok();
}

Result<std::unique_ptr<KvStream>> TierManager::OpenStream(KvStreamOptions o) {
  const int32_t n_layers = layout_.n_layers;
  if (o.window < 1 || o.window > n_layers)
    return Status::InvalidArgument("KV stream window " + std::to_string(o.window) + " outside [1, " +
                                   std::to_string(n_layers) + "]");
  if (o.ring.size() != static_cast<size_t>(o.window))
    return Status::InvalidArgument("KV stream: ring has " + std::to_string(o.ring.size()) + " slots, window " +
                                   std::to_string(o.window));
  for (const auto& slot : o.ring) {
    if (slot.size() != o.blocks.size()) return Status::InvalidArgument("KV stream: ring slot of the wrong size");
    for (void* p : slot)
      if (reinterpret_cast<uintptr_t>(p) % kDirectIoAlignment != 0) o.direct = false;
  }
  if (layout_.page_bytes != layout_.layer_stride) o.direct = false;
  std::vector<std::vector<uint64_t>> checksums(o.blocks.size());
  for (size_t i = 0; i < o.blocks.size(); ++i) {
    Result<BlockInfo> info = index_->GetBlock(o.blocks[i]);
    if (!info.ok()) return info.status().WithContext(o.label);
    if (info->page_checksums.size() != static_cast<size_t>(n_layers))
      return Status::Corruption(o.label + ": block " + std::to_string(o.blocks[i]) + " has " +
                                std::to_string(info->page_checksums.size()) + " page checksums, expected " +
                                std::to_string(n_layers));
    checksums[i] = std::move(info->page_checksums);
  }
  std::unique_ptr<KvStream> stream(new KvStream(this, std::move(o), std::move(checksums)));
  MNEMO_RETURN_IF_ERROR(stream->Start());
  return stream;
}

ExportModel TierManager::export_model() const {
  return ExportModel{options_.model_fingerprint, options_.kv, layout_};
}

void TierManager::Export(std::string label, Manifest m, ExportSink sink, size_t chunk_bytes,
                         std::function<void(Result<ExportSummary>)> done) {
  // Pinned now, on the caller's thread, where `m` is known to be committed.
  Result<std::unique_ptr<BlockPin>> pinned = index_->Pin(m.blocks);
  std::shared_ptr<BlockPin> pin;
  if (pinned.ok()) pin = std::move(pinned).value();
  Status pin_error = pinned.status().WithContext(label);
  Enqueue(&transfer_worker_, [this, label = std::move(label), m = std::move(m), sink = std::move(sink), chunk_bytes,
                              done = std::move(done), pin = std::move(pin), pin_error]() mutable {
    Result<ExportSummary> r = pin ? DoExport(label, m, *pin, sink, chunk_bytes) : Result<ExportSummary>(pin_error);
    pin.reset();  // the slots a later turn or delete dropped are free again
    ++exports_;
    if (!r.ok()) {
      ++export_errors_;
      spdlog::info("exporting {}: {}", label, r.status().ToString());
    }
    done(std::move(r));
  });
}

Result<ExportSummary> TierManager::DoExport(const std::string& label, const Manifest& m, const BlockPin& pin,
                                            const ExportSink& sink, size_t chunk_bytes) {
  MNEMO_RETURN_IF_ERROR(CheckCompatible(m));
  const uint64_t spans = BlocksForTokens(m.kv_tokens, layout_.page_tokens);
  if (m.blocks.size() < spans) return Status::Corruption(label + ": manifest lists fewer blocks than its KV");
  ExportWriter writer(export_model(), sink, chunk_bytes);
  MNEMO_RETURN_IF_ERROR(writer.Begin(m));
  const size_t window = std::min<size_t>(kWindowBlocks, std::max<uint64_t>(spans, 1));
  MNEMO_ASSIGN_OR_RETURN(AlignedBuffer staging, AlignedBuffer::Allocate(window * layout_.block_bytes));
  std::vector<BlockInfo> infos;
  for (uint64_t w0 = 0; w0 < spans; w0 += window) {
    const uint64_t n = std::min<uint64_t>(window, spans - w0);
    MNEMO_RETURN_IF_ERROR(
        ReadVerified(label, std::span<const BlockSlot>(m.blocks.data() + w0, n), staging.data(), &infos, &pin));
    for (uint64_t i = 0; i < n; ++i)
      MNEMO_RETURN_IF_ERROR(writer.AddBlock(staging.data() + i * layout_.block_bytes, infos[i].page_checksums));
  }
  return writer.Finish();
}

std::shared_ptr<ImportJob> TierManager::StartImport(std::string label) {
  return std::make_shared<ImportJob>(this, std::move(label));
}

// ------------------------------------------------------------------ import

ImportJob::ImportJob(TierManager* tm, std::string label) : tm_(tm), label_(std::move(label)) {
  ExportReader::Handlers h;
  h.on_manifest = [this](Manifest m) { return OnManifest(std::move(m)); };
  h.on_block = [this](uint64_t, const uint8_t* pages, std::span<const uint64_t> sums) {
    return OnBlock(pages, sums);
  };
  reader_ = std::make_unique<ExportReader>(tm_->export_model(), std::move(h));
}

ImportJob::~ImportJob() {
  std::lock_guard<std::mutex> lock(mu_);
  ReleaseLocked();
}

void ImportJob::ReleaseLocked() {
  if (committed_ || slots_.empty()) return;
  if (Status s = tm_->index_->ReleaseSlots(slots_); !s.ok())
    spdlog::warn("import {}: releasing {} reserved slots: {}", label_, slots_.size(), s.ToString());
  slots_.clear();
}

Status ImportJob::OnManifest(Manifest m) {
  const BlockLayout& L = tm_->layout_;
  const uint64_t n = BlocksForTokens(m.kv_tokens, L.page_tokens);
  manifest_ = std::move(m);
  if (n == 0) return Status::Ok();
  Result<std::vector<BlockSlot>> slots = tm_->index_->AllocateSlots(n);
  if (!slots.ok()) return slots.status().WithContext("reserving " + std::to_string(n) + " T2 blocks");
  {
    std::lock_guard<std::mutex> lock(mu_);
    slots_ = std::move(slots).value();
    if (aborted_) ReleaseLocked();
  }
  MNEMO_RETURN_IF_ERROR(tm_->store_->EnsureCapacity(slots_.back() + 1));
  checksums_.resize(n * static_cast<size_t>(L.n_layers));
  const size_t window = std::min<uint64_t>(kWindowBlocks, n);
  MNEMO_ASSIGN_OR_RETURN(staging_, AlignedBuffer::Allocate(window * L.block_bytes));
  return Status::Ok();
}

Status ImportJob::OnBlock(const uint8_t* pages, std::span<const uint64_t> sums) {
  const BlockLayout& L = tm_->layout_;
  const uint64_t window = staging_.size() / L.block_bytes;
  uint8_t* block = staging_.data() + (staged_ - written_) * L.block_bytes;
  for (int32_t l = 0; l < L.n_layers; ++l) {
    uint8_t* dst = block + L.LayerOffset(l);
    memcpy(dst, pages + static_cast<size_t>(l) * L.page_bytes, L.page_bytes);
    if (L.layer_stride > L.page_bytes) memset(dst + L.page_bytes, 0, L.layer_stride - L.page_bytes);
    checksums_[staged_ * L.n_layers + l] = sums[l];
  }
  ++staged_;
  if (staged_ - written_ == window) return WriteWindow();
  return Status::Ok();
}

Status ImportJob::WriteWindow() {
  const BlockLayout& L = tm_->layout_;
  const uint64_t n = staged_ - written_;
  if (n == 0) return Status::Ok();
  std::vector<const void*> bufs(n);
  for (uint64_t i = 0; i < n; ++i) bufs[i] = staging_.data() + i * L.block_bytes;
  if (Status s = tm_->store_->WriteBlocks(std::span<const BlockSlot>(slots_.data() + written_, n), bufs); !s.ok())
    return s.WithContext("writing KV blocks");
  written_ = staged_;
  return Status::Ok();
}

void ImportJob::Feed(std::string piece, std::function<void(Status)> done) {
  TierManager::Enqueue(&tm_->transfer_worker_, [self = shared_from_this(), piece = std::move(piece),
                                                done = std::move(done)] {
    if (self->failed_.ok()) {
      {
        std::lock_guard<std::mutex> lock(self->mu_);
        if (self->aborted_) self->failed_ = Status::Cancelled(self->label_ + ": import cancelled");
      }
      if (self->failed_.ok()) self->failed_ = self->reader_->Feed(piece).WithContext(self->label_);
    }
    done(self->failed_);
  });
}

void ImportJob::Finish(std::function<void(Result<Manifest>)> done) {
  TierManager::Enqueue(&tm_->transfer_worker_, [self = shared_from_this(), done = std::move(done)] {
    ImportJob& j = *self;
    if (j.failed_.ok()) j.failed_ = j.reader_->Finish().status().WithContext(j.label_);
    if (j.failed_.ok()) j.failed_ = j.WriteWindow().WithContext(j.label_);
    if (j.failed_.ok() && j.written_ > 0) j.failed_ = j.tm_->store_->Sync().WithContext(j.label_ + ": syncing");
    ++j.tm_->imports_;
    if (!j.failed_.ok()) {
      ++j.tm_->import_errors_;
      spdlog::info("import failed: {}", j.failed_.ToString());
      {
        std::lock_guard<std::mutex> lock(j.mu_);
        j.ReleaseLocked();
      }
      done(j.failed_);
      return;
    }
    Manifest m = j.manifest_;
    {
      std::lock_guard<std::mutex> lock(j.mu_);
      j.finished_ = true;
      m.blocks = j.slots_;
    }
    done(std::move(m));
  });
}

Status ImportJob::Commit(uint32_t uid, const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  MNEMO_CHECK(finished_ && !committed_);
  if (aborted_) return Status::Cancelled(label_ + ": import cancelled");
  const BlockLayout& L = tm_->layout_;
  Manifest m = manifest_;
  m.owner_uid = uid;
  m.name = name;
  m.blocks = slots_;
  m.turn_seq = 1;
  tm_->Stamp(&m);
  std::vector<NewBlock> nb(slots_.size());
  for (size_t i = 0; i < slots_.size(); ++i)
    nb[i] = NewBlock{slots_[i], std::span<const uint64_t>(&checksums_[i * L.n_layers], L.n_layers)};
  MNEMO_RETURN_IF_ERROR(tm_->index_->CommitTurn(m, nb).WithContext("committing the imported session"));
  committed_ = true;
  manifest_ = std::move(m);
  return Status::Ok();
}

void ImportJob::Abort() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_ || committed_) return;
    aborted_ = true;
  }
  // After any write to the slots still queued: a slot is free again only
  // once nothing of this import can write to it.
  TierManager::Enqueue(&tm_->transfer_worker_, [self = shared_from_this()] {
    std::lock_guard<std::mutex> lock(self->mu_);
    self->ReleaseLocked();
  });
}

Status TierManager::CommitManifest(const Manifest& m) {
  Manifest copy = m;
  Stamp(&copy);
  return index_->CommitTurn(copy, {});
}

Status TierManager::Fork(uint32_t uid, std::string_view src, const Manifest& dst) {
  Manifest copy = dst;
  Stamp(&copy);
  return index_->ForkSession(uid, src, copy);
}

Status TierManager::Delete(uint32_t uid, std::string_view name) { return index_->DeleteSession(uid, name); }

void TierManager::T1Put(BlockSlot slot, const uint8_t* block) {
  if (t1_capacity_blocks_ == 0) return;
  std::lock_guard<std::mutex> lock(t1_mu_);
  auto it = t1_.find(slot);
  if (it != t1_.end()) {
    memcpy(it->second.data.data(), block, layout_.block_bytes);
    t1_bytes_written_.fetch_add(layout_.block_bytes, std::memory_order_relaxed);
    t1_lru_.splice(t1_lru_.begin(), t1_lru_, it->second.lru);
    return;
  }
  AlignedBuffer buf;
  if (t1_.size() >= t1_capacity_blocks_) {
    // Reuse the least recently used entry's memory.
    const BlockSlot victim = t1_lru_.back();
    t1_lru_.pop_back();
    auto v = t1_.find(victim);
    buf = std::move(v->second.data);
    t1_.erase(v);
  } else {
    Result<AlignedBuffer> b = AlignedBuffer::Allocate(layout_.block_bytes);
    if (!b.ok()) return;  // a cache: skip under memory pressure
    buf = std::move(b).value();
  }
  memcpy(buf.data(), block, layout_.block_bytes);
  t1_bytes_written_.fetch_add(layout_.block_bytes, std::memory_order_relaxed);
  t1_lru_.push_front(slot);
  t1_.emplace(slot, T1Entry{std::move(buf), t1_lru_.begin()});
}

bool TierManager::T1Get(BlockSlot slot, uint8_t* block) { return T1GetRange(slot, 0, layout_.block_bytes, block); }

bool TierManager::T1Copy(BlockSlot slot, const std::function<uint64_t(const uint8_t* block)>& copy) {
  std::lock_guard<std::mutex> lock(t1_mu_);
  auto it = t1_.find(slot);
  if (it == t1_.end()) {
    ++t1_misses_;
    return false;
  }
  ++t1_hits_;
  t1_bytes_read_.fetch_add(copy(it->second.data.data()), std::memory_order_relaxed);
  t1_lru_.splice(t1_lru_.begin(), t1_lru_, it->second.lru);
  return true;
}

bool TierManager::T1GetRange(BlockSlot slot, size_t offset, size_t length, uint8_t* out) {
  return T1Copy(slot, [&](const uint8_t* block) {
    memcpy(out, block + offset, length);
    return uint64_t{length};
  });
}

bool TierManager::T1GetLayers(BlockSlot slot, int32_t l0, int32_t l1, void* const* pages) {
  return T1Copy(slot, [&](const uint8_t* block) {
    for (int32_t l = l0; l < l1; ++l) memcpy(pages[l - l0], block + layout_.LayerOffset(l), layout_.page_bytes);
    return uint64_t{layout_.page_bytes} * static_cast<uint64_t>(l1 - l0);
  });
}

bool TierManager::T1Has(BlockSlot slot) const {
  std::lock_guard<std::mutex> lock(t1_mu_);
  return t1_.count(slot) != 0;
}

void TierManager::T1Drop(BlockSlot slot) {
  std::lock_guard<std::mutex> lock(t1_mu_);
  auto it = t1_.find(slot);
  if (it == t1_.end()) return;
  t1_lru_.erase(it->second.lru);
  t1_.erase(it);
}

uint32_t TierManager::CountT1(const std::vector<BlockSlot>& slots) const {
  std::lock_guard<std::mutex> lock(t1_mu_);
  uint32_t n = 0;
  for (BlockSlot s : slots) n += t1_.count(s) ? 1 : 0;
  return n;
}

TierStats TierManager::stats() const {
  TierStats s;
  s.block_bytes = layout_.block_bytes;
  s.n_layers = layout_.n_layers;
  {
    std::lock_guard<std::mutex> lock(t1_mu_);
    s.t1_blocks = t1_.size();
    s.t1_hits = t1_hits_;
    s.t1_misses = t1_misses_;
  }
  s.t1_bytes = s.t1_blocks * layout_.block_bytes;
  s.t1_budget_bytes = t1_capacity_blocks_ * layout_.block_bytes;
  const SlotStats slots = index_->slot_stats();
  s.t2_blocks = slots.committed;
  s.t2_reserved_blocks = slots.reserved;
  s.t2_bytes = slots.committed * layout_.block_bytes;
  s.t2_budget_bytes = store_->max_slots() * layout_.block_bytes;
  const PageStoreStats io = store_->stats();
  s.bytes_read = io.read_bytes;
  s.bytes_written = io.write_bytes;
  s.t2_read_latency = io.read_latency;
  s.t2_write_latency = io.write_latency;
  s.t2_sync_latency = io.sync_latency;
  constexpr auto kRelaxed = std::memory_order_relaxed;
  s.t0_hits = t0_hits_.load(kRelaxed);
  s.t0_misses = t0_misses_.load(kRelaxed);
  s.t0_bytes_read = t0_bytes_read_.load(kRelaxed);
  s.t0_bytes_written = t0_bytes_written_.load(kRelaxed);
  s.t1_bytes_read = t1_bytes_read_.load(kRelaxed);
  s.t1_bytes_written = t1_bytes_written_.load(kRelaxed);
  s.prefetch_hits = prefetch_hits_.load(kRelaxed);
  s.prefetch_stalls = prefetch_stalls_.load(kRelaxed);
  s.prefetch_stall_ns = prefetch_stall_ns_.load(kRelaxed);
  s.persists = persists_.load();
  s.persist_errors = persist_errors_.load();
  s.loads = loads_.load();
  s.load_errors = load_errors_.load();
  return s;
}

}  // namespace mnemo::tiering
