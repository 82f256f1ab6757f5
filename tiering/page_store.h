// The T2 page store: fixed-size blocks (BlockLayout::block_bytes) at dense
// BlockSlot numbers in preallocated slab files, read and written with
// asynchronous, caller-owned requests, and made durable by Sync().
//
// Implementations: io_uring with O_DIRECT (uring_page_store.cc), pread/pwrite
// on a thread pool (pread_page_store.cc), and a fault-injecting wrapper for
// tests (fault_page_store.h). OpenPageStore picks io_uring when the kernel
// offers it.
//
// Ownership: requests and their buffers belong to the caller and are
// borrowed by the store from Submit until the request's callback starts.
// The store allocates nothing per request on its I/O path.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "tiering/latency_histogram.h"
#include "tiering/layout.h"

namespace mnemo::tiering {

enum class IoOp : uint8_t { kRead, kWrite };

struct IoRequest;
// Runs once per submitted request, on a store-owned I/O thread, after the
// transfer finished or failed (req->status says which). It may resubmit or
// free the request and its buffer, and may call Submit; it must not block
// (no synchronous store calls: they would wait on the thread running them)
// and should be short, since it delays other completions.
using IoCallback = void (*)(IoRequest* req);

// One read or write of a byte range of one block. Thread-compatible: the
// caller fills it in, then hands it to Submit; from then until the callback
// starts, neither the request nor the bytes of its buffer may be touched.
struct IoRequest {
  // Set by the caller.
  IoOp op = IoOp::kRead;
  BlockSlot slot = 0;
  size_t offset = 0;      // into the block; a multiple of kDirectIoAlignment
  size_t length = 0;      // > 0, a multiple of kDirectIoAlignment, offset + length <= block_bytes
  void* buf = nullptr;    // kDirectIoAlignment-aligned, length bytes, caller-owned
  // Scatter read (kRead only): when iov_count > 0 the range lands in
  // iov[0..iov_count) in order (one device request, e.g. consecutive layer
  // pages of a block into separate pages of memory) and buf is unused. Each
  // piece kDirectIoAlignment-aligned and a multiple of it long, their sum
  // `length`, at most kMaxIov of them; the array is borrowed like buf.
  const iovec* iov = nullptr;
  uint32_t iov_count = 0;
  IoCallback callback = nullptr;
  void* user = nullptr;   // for the callback

  // Set by the store before the callback: OK, IOError (errno text),
  // ResourceExhausted (ENOSPC/EDQUOT) or Unavailable (store shutting down).
  Status status;

  // Store-private bookkeeping: do not touch between Submit and the callback.
  struct Internal {
    IoRequest* next = nullptr;  // intrusive queue link
    size_t done_bytes = 0;      // transferred so far (short transfers resume here)
    uint32_t retries = 0;       // EAGAIN/EINTR resubmissions
    uint64_t start_ns = 0;      // MonotonicNs() when the transfer first went to the device
  } internal;
};

// The most pieces of one scatter read (IoRequest::iov_count).
inline constexpr uint32_t kMaxIov = 256;

// Counters since the store was opened. Plain values (a snapshot).
struct PageStoreStats {
  uint64_t reads = 0;             // completed read requests (OK or not)
  uint64_t writes = 0;
  uint64_t read_bytes = 0;        // bytes transferred
  uint64_t write_bytes = 0;
  uint64_t errors = 0;            // requests completed with a non-OK status
  uint64_t resubmissions = 0;     // short transfers and EAGAIN/EINTR retries
  uint64_t overflowed = 0;        // requests that waited because the ring was full
  uint64_t fixed_buffer_ios = 0;  // transfers that used a registered buffer
  uint64_t syncs = 0;             // fdatasync calls issued by Sync()
  // Device latency: a transfer from its first handing to the kernel (SQE
  // submission, pread/pwrite call) to its completion, resubmissions of a
  // short transfer included and time in the overflow queue excluded; one
  // fdatasync each for syncs.
  LatencySnapshot read_latency, write_latency, sync_latency;
};

struct PageStoreOptions {
  enum class Engine : uint8_t { kAuto, kUring, kPread };

  std::string dir;                    // created if missing (create_if_missing)
  size_t block_bytes = 0;             // BlockLayout::block_bytes; a multiple of kDirectIoAlignment
  size_t slab_bytes = size_t{1} << 30;  // slab file size, rounded down to whole blocks (>= 1)
  uint64_t budget_bytes = 0;          // byte budget of the store: max_slots = budget / block_bytes
  uint32_t queue_depth = 32;          // transfers in flight at once (ring size; pread threads cap)
  uint32_t max_outstanding = 1u << 16;  // accepted, not yet completed requests (>= 2 * queue_depth)
  uint32_t pread_threads = 4;         // PreadPageStore workers (<= queue_depth)
  Engine engine = Engine::kAuto;
  bool direct_io = true;              // O_DIRECT; Unsupported where the file system refuses it
  bool create_if_missing = true;
};

// A block store over slab files. Thread-safe: every method may be called
// from any thread, except that the synchronous ones (Execute, ReadBlocks,
// WriteBlocks, Write, Read, Sync, EnsureCapacity) block and must not run on
// the store's I/O threads (i.e. inside a callback) — a CHECK catches that.
// Callbacks run on the store's I/O thread(s): one at a time for io_uring and
// the fault wrapper, concurrently (one per worker) for pread; so a callback
// touching shared state must synchronise. The destructor completes every
// accepted request (callbacks included) before it returns; Submit from a
// callback during destruction gets Unavailable.
class PageStore {
 public:
  virtual ~PageStore() = default;
  PageStore(const PageStore&) = delete;
  PageStore& operator=(const PageStore&) = delete;

  // Queues every request of the batch, or none: a malformed request
  // (misaligned buffer or range, no callback: InvalidArgument; slot at or
  // past capacity_slots(): OutOfRange), more than max_outstanding requests
  // pending (ResourceExhausted) or a store shutting down (Unavailable) fails
  // the whole batch before anything is queued, and no callback runs. On OK,
  // each request's callback runs exactly once. Never blocks on I/O: when the
  // ring is full, requests wait in an overflow queue (bounded by
  // max_outstanding).
  virtual Status Submit(std::span<IoRequest* const> batch) = 0;

  // Makes every write whose callback has started before this call durable
  // (fdatasync of every slab file written since the last Sync). Blocking.
  // On error the slabs stay marked dirty, so a later Sync retries them.
  virtual Status Sync() = 0;

  // Grows the slab files (preallocated with fallocate, whole slabs where the
  // budget allows) so that at least `slots` blocks exist. ResourceExhausted
  // beyond the budget or when the file system is full. Blocking.
  virtual Status EnsureCapacity(uint64_t slots) = 0;

  // Registers [base, base + bytes) (kDirectIoAlignment-aligned) so transfers
  // whose buffers lie inside it take the fast path (io_uring fixed buffers:
  // pinned once, no per-I/O page mapping). Buffers elsewhere still work.
  // The memory must stay allocated until UnregisterBuffers(base) or the
  // store's destruction. Stores without such a path accept and ignore it.
  virtual Status RegisterBuffers(void* base, size_t bytes) { return Status::Ok(); }
  // REQUIRES: no transfer on that memory in flight.
  virtual void UnregisterBuffers(void* base) {}

  // Blocks that can be addressed now (slots [0, capacity_slots())).
  virtual uint64_t capacity_slots() const = 0;
  // The budget in blocks: EnsureCapacity's limit.
  virtual uint64_t max_slots() const = 0;
  virtual size_t block_bytes() const = 0;
  virtual uint32_t queue_depth() const = 0;
  virtual std::string_view engine_name() const = 0;  // "io_uring", "pread", ...
  virtual PageStoreStats stats() const = 0;
  // True on a thread that runs this store's callbacks.
  virtual bool OnIoThread() const = 0;

  // Synchronous conveniences over Submit. Each submits in windows of at most
  // 2 * queue depth requests and returns when all have completed, with the
  // first error (the others still ran). They take over the requests'
  // callback and user fields.
  Status Execute(std::span<IoRequest> reqs);
  // Whole blocks: slots[i] <-> bufs[i] (block_bytes each, aligned).
  Status WriteBlocks(std::span<const BlockSlot> slots, std::span<const void* const> bufs);
  Status ReadBlocks(std::span<const BlockSlot> slots, std::span<void* const> bufs);
  // One byte range of one block (e.g. a layer page at BlockLayout::LayerOffset).
  Status Write(BlockSlot slot, size_t offset, size_t length, const void* buf);
  Status Read(BlockSlot slot, size_t offset, size_t length, void* buf);

  // Checks one request against the geometry and capacity (what Submit does).
  Status Validate(const IoRequest& req) const;

 protected:
  PageStore() = default;
};

// Opens (creating if allowed) the store in options.dir. kAuto tries io_uring
// and falls back to pread when the kernel refuses it (logged). The geometry
// is recorded in the directory: reopening with another block_bytes is
// InvalidArgument; another slab_bytes is ignored (the recorded one stays);
// a record of a newer format version is FailedPrecondition (nothing
// modified). A budget below what the slab files already hold keeps them (max_slots
// covers them). One process at a time: the directory is locked (flock).
Result<std::unique_ptr<PageStore>> OpenPageStore(const PageStoreOptions& options);
// The block size recorded in page store directory `dir`, without opening
// (or locking) it; nullopt when the directory holds no store yet. Errors as
// OpenPageStore's for a damaged or newer record.
Result<std::optional<size_t>> RecordedBlockBytes(const std::string& dir);
// Unsupported when io_uring is unavailable.
Result<std::unique_ptr<PageStore>> OpenUringPageStore(const PageStoreOptions& options);
Result<std::unique_ptr<PageStore>> OpenPreadPageStore(const PageStoreOptions& options);

// Heap memory aligned to kDirectIoAlignment, size rounded up to it. Move-only
// owner. Thread-compatible.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // Zero-filled. ResourceExhausted when the allocation fails.
  static Result<AlignedBuffer> Allocate(size_t bytes);
  AlignedBuffer(AlignedBuffer&& o) noexcept : data_(o.data_), size_(o.size_) {
    o.data_ = nullptr;
    o.size_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept;
  ~AlignedBuffer();

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// The hot-path buffer pool: n_buffers equal, aligned buffers carved from one
// allocation registered with a store (io_uring fixed buffers). When the
// registration is refused (e.g. RLIMIT_MEMLOCK), the buffers still work
// through the plain path and registered() is false. Thread-safe.
// Must be destroyed before its store, with no transfer on its buffers in flight.
class IoBufferArena {
 public:
  static Result<std::unique_ptr<IoBufferArena>> Create(PageStore* store, size_t buffer_bytes,
                                                       size_t n_buffers);
  ~IoBufferArena();
  IoBufferArena(const IoBufferArena&) = delete;
  IoBufferArena& operator=(const IoBufferArena&) = delete;

  // A free buffer, or nullptr when all are in use (the pool is bounded).
  void* Acquire();
  void Release(void* buf);
  // Buffer i, for callers that manage the pool themselves (no Acquire needed).
  void* buffer(size_t i) const { return mem_.data() + i * buffer_bytes_; }
  size_t buffer_bytes() const { return buffer_bytes_; }
  size_t n_buffers() const { return n_buffers_; }
  bool registered() const { return registered_; }

 private:
  IoBufferArena(PageStore* store, AlignedBuffer mem, size_t buffer_bytes, size_t n_buffers);

  // constant after construction
  PageStore* const store_;
  const AlignedBuffer mem_;
  const size_t buffer_bytes_;
  const size_t n_buffers_;
  bool registered_ = false;

  std::mutex mu_;
  std::vector<uint32_t> free_;  // guarded by mu_
};

}  // namespace mnemo::tiering
