// UringPageStore: the T2 page store on io_uring — O_DIRECT slab files,
// registered files, registered (fixed) buffers, batched submission at a
// bounded queue depth, an overflow queue, and one I/O thread that owns the
// ring. The only file in mnemo that talks to io_uring.
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include <liburing.h>
#include <spdlog/spdlog.h>

#include "common/thread_name.h"
#include "tiering/page_store.h"
#include "tiering/page_store_internal.h"

namespace mnemo::tiering {
namespace {

using internal::ErrnoStatus;
using internal::IoQueue;
using internal::SlabFiles;

// user_data of the eventfd read that wakes the I/O thread; requests are
// pointers, never 1.
constexpr uint64_t kWakeTag = 1;
// Registered buffer table: slots for RegisterBuffers regions (each cut into
// pieces of at most 1 GiB, the kernel's limit per fixed buffer). Room for a
// streamed session's ring, registered as the runs of the T0 pool's chunks
// it spans (3 MiB each for the default model).
constexpr uint32_t kMaxBufferSlots = 1024;
constexpr size_t kMaxFixedBufferBytes = size_t{1} << 30;

// Thread-safe. One I/O thread owns the ring: it alone fills the submission
// queue and reaps completions. Submit hands requests over through a
// mutex-guarded intake queue and, when the thread may be asleep, an eventfd
// whose read is always armed in the ring. Per round the thread moves intake
// to its overflow queue, fills the SQ up to the queue depth, submits and
// waits for at least one completion in one syscall, reaps every CQE, and only
// then runs the callbacks (never from inside the reap, never recursively).
// Short transfers and EAGAIN/EINTR go back to the head of the overflow queue.
class UringPageStore final : public PageStore {
 public:
  static Result<std::unique_ptr<PageStore>> Open(const PageStoreOptions& o);
  ~UringPageStore() override;

  Status Submit(std::span<IoRequest* const> batch) override;
  Status Sync() override {
    MNEMO_CHECK_MSG(!OnIoThread(), "PageStore::Sync on the store's own I/O thread");
    return slabs_->Sync(&stats_);
  }
  Status EnsureCapacity(uint64_t slots) override;
  Status RegisterBuffers(void* base, size_t bytes) override;
  void UnregisterBuffers(void* base) override;
  uint64_t capacity_slots() const override { return slabs_->capacity_slots(); }
  uint64_t max_slots() const override { return slabs_->max_slots(); }
  size_t block_bytes() const override { return slabs_->block_bytes(); }
  uint32_t queue_depth() const override { return qd_; }
  std::string_view engine_name() const override { return "io_uring"; }
  PageStoreStats stats() const override { return stats_.Snapshot(); }
  bool OnIoThread() const override { return internal::tls_io_store == this; }

 private:
  struct Region {
    uintptr_t begin = 0;    // [begin, end): 0,0 while not (yet) usable
    uintptr_t end = 0;
    void* owner = nullptr;  // the RegisterBuffers base; null = free slot
  };

  UringPageStore(const PageStoreOptions& o) : qd_(o.queue_depth), max_outstanding_(o.max_outstanding) {}
  Status Init(const PageStoreOptions& o);
  void Loop();
  void ArmWake();
  void Wake();
  // Fills one SQE for the rest of r's transfer. REQUIRES regions_mu_.
  void Prep(io_uring_sqe* sqe, IoRequest* r);
  // The fixed buffer that holds [b, b + len), or -1. REQUIRES regions_mu_.
  int FixedBufferOf(uintptr_t b, size_t len) const;
  // Rebuilds by_begin_ from regions_. REQUIRES regions_mu_.
  void IndexRegionsLocked();
  // Handles one request CQE: done (pushed to *done), or back to pending_.
  void OnCqe(IoRequest* r, int res, IoQueue* done);
  std::string Describe(const IoRequest& r) const;

  // constant after Open
  const uint32_t qd_;
  const uint32_t max_outstanding_;
  std::unique_ptr<SlabFiles> slabs_;
  io_uring ring_{};
  bool ring_ready_ = false;
  int wake_fd_ = -1;
  bool files_registered_ = false;
  bool buffers_sparse_ = false;
  std::thread thread_;

  mutable internal::StatCounters stats_;

  std::mutex mu_;
  IoQueue intake_;            // guarded by mu_
  uint64_t outstanding_ = 0;  // guarded by mu_: accepted, not yet completed
  bool wake_pending_ = false; // guarded by mu_: eventfd written, intake not yet drained
  bool stopping_ = false;     // guarded by mu_

  // Confined to the I/O thread.
  IoQueue pending_;       // overflow: accepted, waiting for room in the ring
  uint32_t inflight_ = 0; // request SQEs in the kernel
  uint64_t wake_buf_ = 0; // target of the eventfd read
  bool wake_armed_ = false;

  std::mutex regions_mu_;
  std::array<Region, kMaxBufferSlots> regions_{};  // guarded by regions_mu_; index = fixed buffer index
  // (begin, index) of the usable regions, sorted: Prep's lookup. Guarded by regions_mu_.
  std::vector<std::pair<uintptr_t, uint32_t>> by_begin_;
};

Result<std::unique_ptr<PageStore>> UringPageStore::Open(const PageStoreOptions& o) {
  std::unique_ptr<UringPageStore> s(new UringPageStore(o));
  MNEMO_RETURN_IF_ERROR(s->Init(o));
  return std::unique_ptr<PageStore>(std::move(s));
}

Status UringPageStore::Init(const PageStoreOptions& o) {
  if (o.queue_depth == 0 || o.queue_depth > 4096)
    return Status::InvalidArgument("page store: queue_depth must be in [1, 4096]");
  // One SQ entry beyond the queue depth for the wake read; the CQ (twice the
  // SQ) then always has room for every completion in flight.
  io_uring_params p{};
  p.flags = IORING_SETUP_CLAMP | IORING_SETUP_COOP_TASKRUN;
  int rc = io_uring_queue_init_params(qd_ + 1, &ring_, &p);
  if (rc == -EINVAL) {  // kernels before 5.19 lack COOP_TASKRUN
    p = io_uring_params{};
    p.flags = IORING_SETUP_CLAMP;
    rc = io_uring_queue_init_params(qd_ + 1, &ring_, &p);
  }
  if (rc < 0) {
    if (rc == -ENOSYS || rc == -EPERM || rc == -EINVAL || rc == -ENOMEM || rc == -EOPNOTSUPP)
      return Status::Unsupported(std::string("io_uring unavailable: ") + std::strerror(-rc));
    return ErrnoStatus("io_uring_queue_init", -rc);
  }
  ring_ready_ = true;
  io_uring_probe* probe = io_uring_get_probe_ring(&ring_);
  const bool ops_ok = probe && io_uring_opcode_supported(probe, IORING_OP_READ) &&
                      io_uring_opcode_supported(probe, IORING_OP_WRITE) &&
                      io_uring_opcode_supported(probe, IORING_OP_READ_FIXED) &&
                      io_uring_opcode_supported(probe, IORING_OP_WRITE_FIXED);
  if (probe) io_uring_free_probe(probe);
  if (!ops_ok) return Status::Unsupported("io_uring lacks IORING_OP_READ/WRITE (kernel before 5.6)");

  wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
  if (wake_fd_ < 0) return ErrnoStatus("eventfd", errno);

  MNEMO_ASSIGN_OR_RETURN(slabs_, SlabFiles::Open(o));

  // Registered files: a sparse table of every slab the budget allows, filled
  // as slabs appear. Without it (old kernel, low RLIMIT_NOFILE) plain fds.
  rc = io_uring_register_files_sparse(&ring_, slabs_->max_slabs());
  files_registered_ = rc == 0;
  if (!files_registered_)
    spdlog::debug("page store {}: slab files not registered with io_uring: {}", o.dir, std::strerror(-rc));
  for (uint32_t i = 0; files_registered_ && i < slabs_->n_slabs(); ++i) {
    int fd = slabs_->fd(i);
    rc = io_uring_register_files_update(&ring_, i, &fd, 1);
    if (rc < 0) return ErrnoStatus("io_uring register slab file", -rc);
  }
  rc = io_uring_register_buffers_sparse(&ring_, kMaxBufferSlots);
  buffers_sparse_ = rc == 0;
  if (!buffers_sparse_)
    spdlog::debug("page store {}: no sparse fixed-buffer table: {}", o.dir, std::strerror(-rc));

  try {
    thread_ = std::thread([this] {
      SetThreadName("mnemo-uring");
      Loop();
    });
  } catch (const std::system_error& e) {
    return Status::ResourceExhausted(std::string("page store: cannot start its I/O thread: ") + e.what());
  }
  return Status::Ok();
}

UringPageStore::~UringPageStore() {
  if (thread_.joinable()) {
    {
      std::lock_guard<std::mutex> l(mu_);
      stopping_ = true;
    }
    Wake();
    thread_.join();  // the loop drains intake, overflow and in-flight I/O first
  }
  if (ring_ready_) io_uring_queue_exit(&ring_);  // also cancels the wake read
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

Status UringPageStore::Submit(std::span<IoRequest* const> batch) {
  for (IoRequest* r : batch) MNEMO_RETURN_IF_ERROR(Validate(*r));
  bool wake = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopping_) return Status::Unavailable("page store is shutting down");
    if (outstanding_ + batch.size() > max_outstanding_)
      return Status::ResourceExhausted("page store: " + std::to_string(outstanding_) + " requests outstanding, " +
                                       std::to_string(batch.size()) + " more would pass the limit of " +
                                       std::to_string(max_outstanding_));
    for (IoRequest* r : batch) {
      r->status = Status::Ok();
      r->internal = IoRequest::Internal{};
      intake_.PushBack(r);
    }
    outstanding_ += batch.size();
    // The I/O thread drains intake before it next waits, so a callback that
    // submits needs no wake-up.
    if (!wake_pending_ && !OnIoThread() && !batch.empty()) wake = wake_pending_ = true;
  }
  if (wake) Wake();
  return Status::Ok();
}

void UringPageStore::Wake() {
  const uint64_t one = 1;
  while (::write(wake_fd_, &one, sizeof(one)) < 0 && errno == EINTR) {
  }
}

void UringPageStore::ArmWake() {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (!sqe) return;  // SQ full of unsubmitted entries; their completions wake us
  io_uring_prep_read(sqe, wake_fd_, &wake_buf_, sizeof(wake_buf_), 0);
  io_uring_sqe_set_data64(sqe, kWakeTag);
  wake_armed_ = true;
}

std::string UringPageStore::Describe(const IoRequest& r) const {
  return std::string(r.op == IoOp::kRead ? "read" : "write") + " of slot " + std::to_string(r.slot) + " [" +
         std::to_string(r.offset) + ", +" + std::to_string(r.length) + ") in " + slabs_->dir();
}

void UringPageStore::Prep(io_uring_sqe* sqe, IoRequest* r) {
  internal::StatCounters::Started(r);
  const size_t done = r->internal.done_bytes;
  const uint32_t slab = slabs_->SlabOf(r->slot);
  const uint64_t off = slabs_->FileOffset(r->slot, r->offset + done);
  uint8_t* buf = static_cast<uint8_t*>(r->buf) + done;
  const auto len = static_cast<unsigned>(r->length - done);
  const int fd = files_registered_ ? static_cast<int>(slab) : slabs_->fd(slab);
  const int fixed = r->iov_count == 0 ? FixedBufferOf(reinterpret_cast<uintptr_t>(buf), len) : -1;
  if (r->iov_count > 0) {  // scatter read: whole each time (OnCqe restarts a short one)
    io_uring_prep_readv(sqe, fd, r->iov, r->iov_count, off);
  } else if (r->op == IoOp::kRead) {
    if (fixed >= 0) {
      io_uring_prep_read_fixed(sqe, fd, buf, len, off, fixed);
    } else {
      io_uring_prep_read(sqe, fd, buf, len, off);
    }
  } else {
    if (fixed >= 0) {
      io_uring_prep_write_fixed(sqe, fd, buf, len, off, fixed);
    } else {
      io_uring_prep_write(sqe, fd, buf, len, off);
    }
  }
  if (files_registered_) sqe->flags |= IOSQE_FIXED_FILE;
  if (fixed >= 0) stats_.fixed_buffer_ios.fetch_add(1, std::memory_order_relaxed);
  io_uring_sqe_set_data(sqe, r);
}

int UringPageStore::FixedBufferOf(uintptr_t b, size_t len) const {
  // The last region that begins at or before b (regions never overlap).
  auto it = std::upper_bound(by_begin_.begin(), by_begin_.end(), std::make_pair(b, UINT32_MAX));
  if (it == by_begin_.begin()) return -1;
  const Region& reg = regions_[std::prev(it)->second];
  return b + len <= reg.end ? static_cast<int>(std::prev(it)->second) : -1;
}

void UringPageStore::IndexRegionsLocked() {
  by_begin_.clear();
  for (uint32_t i = 0; i < kMaxBufferSlots; ++i)
    if (regions_[i].end > regions_[i].begin) by_begin_.emplace_back(regions_[i].begin, i);
  std::sort(by_begin_.begin(), by_begin_.end());
}

void UringPageStore::OnCqe(IoRequest* r, int res, IoQueue* done) {
  if (res < 0) {
    const int err = -res;
    if (internal::RetryableErrno(err) && r->internal.retries < internal::kMaxRetries) {
      ++r->internal.retries;
      stats_.resubmissions.fetch_add(1, std::memory_order_relaxed);
      pending_.PushFront(r);
      return;
    }
    r->status = ErrnoStatus(Describe(*r), err);
    done->PushBack(r);
    return;
  }
  if (res == 0) {  // no progress: past the end of a slab file that shrank under us
    r->status = ErrnoStatus(Describe(*r) + " made no progress after " + std::to_string(r->internal.done_bytes) +
                                " bytes",
                            EIO);
    done->PushBack(r);
    return;
  }
  r->internal.done_bytes += static_cast<size_t>(res);
  if (r->internal.done_bytes < r->length) {  // short transfer: resubmit the rest first
    stats_.resubmissions.fetch_add(1, std::memory_order_relaxed);
    // A scatter read starts over: its pieces have no "rest" to point at
    // without a copy of the array (reads are idempotent).
    if (r->iov_count > 0) {
      if (++r->internal.retries > internal::kMaxRetries) {
        r->status = ErrnoStatus(Describe(*r) + " stays short after " + std::to_string(r->internal.done_bytes) +
                                    " bytes",
                                EIO);
        done->PushBack(r);
        return;
      }
      r->internal.done_bytes = 0;
    }
    pending_.PushFront(r);
    return;
  }
  if (r->op == IoOp::kWrite) slabs_->MarkDirty(slabs_->SlabOf(r->slot));
  done->PushBack(r);
}

void UringPageStore::Loop() {
  internal::tls_io_store = this;
  for (;;) {
    bool stopping;
    {
      std::lock_guard<std::mutex> l(mu_);
      // New requests beyond the ring's free room wait in the overflow queue.
      const size_t room = qd_ - inflight_ > pending_.size() ? qd_ - inflight_ - pending_.size() : 0;
      if (intake_.size() > room)
        stats_.overflowed.fetch_add(intake_.size() - room, std::memory_order_relaxed);
      pending_.Splice(intake_);
      wake_pending_ = false;
      stopping = stopping_;
    }
    if (stopping && pending_.empty() && inflight_ == 0) break;
    if (!wake_armed_) ArmWake();

    // Fill the ring up to the queue depth; the rest waits in pending_.
    if (!pending_.empty() && inflight_ < qd_) {
      std::lock_guard<std::mutex> l(regions_mu_);
      while (inflight_ < qd_ && !pending_.empty()) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
        if (!sqe) break;
        Prep(sqe, pending_.PopFront());
        ++inflight_;
      }
    }
    // Submit everything and sleep until at least one completion.
    int rc = io_uring_submit_and_wait(&ring_, 1);
    if (rc < 0 && rc != -EINTR) {
      if (rc == -EAGAIN || rc == -EBUSY || rc == -ENOMEM) {
        // The kernel is short of memory for requests: reap what completed,
        // and back off briefly if nothing did.
        io_uring_cqe* cqe = nullptr;
        if (io_uring_peek_cqe(&ring_, &cqe) != 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      } else {
        MNEMO_CHECK_MSG(false, "io_uring_submit_and_wait failed unexpectedly");
      }
    }

    // Reap all completions, then run the callbacks.
    IoQueue done;
    unsigned head;
    unsigned n = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++n;
      if (cqe->user_data == kWakeTag) {
        wake_armed_ = false;
        continue;
      }
      --inflight_;
      OnCqe(static_cast<IoRequest*>(io_uring_cqe_get_data(cqe)), cqe->res, &done);
    }
    io_uring_cq_advance(&ring_, n);

    // Released before the callbacks run, so a caller that counts its own
    // completions never sees the store fuller than it is.
    if (!done.empty()) {
      std::lock_guard<std::mutex> l(mu_);
      outstanding_ -= done.size();
    }
    while (IoRequest* r = done.PopFront()) {
      stats_.Finished(*r);
      r->callback(r);  // the request may be gone after this
    }
  }
  internal::tls_io_store = nullptr;
}

Status UringPageStore::EnsureCapacity(uint64_t slots) {
  MNEMO_CHECK_MSG(!OnIoThread(), "PageStore::EnsureCapacity on the store's own I/O thread");
  return slabs_->EnsureCapacity(slots, [this](uint32_t slab, int fd) {
    if (!files_registered_) return Status::Ok();
    const int rc = io_uring_register_files_update(&ring_, slab, &fd, 1);
    if (rc < 0) return ErrnoStatus("io_uring register slab file", -rc);
    return Status::Ok();
  });
}

Status UringPageStore::RegisterBuffers(void* base, size_t bytes) {
  if (!buffers_sparse_) return Status::Unsupported("io_uring fixed-buffer registration unavailable");
  const auto b = reinterpret_cast<uintptr_t>(base);
  if (base == nullptr || bytes == 0 || b % kDirectIoAlignment != 0)
    return Status::InvalidArgument("RegisterBuffers: region must be non-empty and 4096-aligned");
  const size_t pieces = (bytes + kMaxFixedBufferBytes - 1) / kMaxFixedBufferBytes;
  // Reserve table slots, then register outside the lock: pinning a large
  // region takes long and the I/O thread takes regions_mu_ every round.
  std::vector<uint32_t> slots;
  {
    std::lock_guard<std::mutex> l(regions_mu_);
    for (uint32_t i = 0; i < kMaxBufferSlots && slots.size() < pieces; ++i)
      if (regions_[i].owner == nullptr) slots.push_back(i);
    if (slots.size() < pieces)
      return Status::ResourceExhausted("RegisterBuffers: the fixed-buffer table (" + std::to_string(kMaxBufferSlots) +
                                       " slots of up to 1 GiB) is full");
    for (uint32_t i : slots) regions_[i].owner = base;
  }
  Status st;
  size_t registered = 0;
  for (; registered < pieces; ++registered) {
    const size_t off = registered * kMaxFixedBufferBytes;
    iovec iov{static_cast<uint8_t*>(base) + off, std::min(kMaxFixedBufferBytes, bytes - off)};
    __u64 tag = 0;
    const int rc = io_uring_register_buffers_update_tag(&ring_, slots[registered], &iov, &tag, 1);
    if (rc < 0) {
      st = ErrnoStatus("io_uring register I/O buffers (" + std::to_string(bytes) + " bytes)", -rc);
      break;
    }
  }
  std::lock_guard<std::mutex> l(regions_mu_);
  for (size_t k = 0; k < pieces; ++k) {
    Region& reg = regions_[slots[k]];
    if (st.ok()) {
      const size_t off = k * kMaxFixedBufferBytes;
      reg.begin = b + off;
      reg.end = b + off + std::min(kMaxFixedBufferBytes, bytes - off);
    } else {
      if (k < registered) {
        iovec empty{nullptr, 0};
        __u64 tag = 0;
        (void)io_uring_register_buffers_update_tag(&ring_, slots[k], &empty, &tag, 1);
      }
      reg = Region{};
    }
  }
  IndexRegionsLocked();
  return st;
}

void UringPageStore::UnregisterBuffers(void* base) {
  std::vector<uint32_t> slots;
  {
    std::lock_guard<std::mutex> l(regions_mu_);
    for (uint32_t i = 0; i < kMaxBufferSlots; ++i) {
      if (regions_[i].owner == base) {
        regions_[i].begin = regions_[i].end = 0;  // no new transfer picks it
        slots.push_back(i);
      }
    }
    IndexRegionsLocked();
  }
  for (uint32_t i : slots) {
    iovec empty{nullptr, 0};
    __u64 tag = 0;
    const int rc = io_uring_register_buffers_update_tag(&ring_, i, &empty, &tag, 1);
    if (rc < 0) spdlog::warn("page store: unregistering I/O buffers: {}", std::strerror(-rc));
  }
  std::lock_guard<std::mutex> l(regions_mu_);
  for (uint32_t i : slots) regions_[i] = Region{};
}

}  // namespace

Result<std::unique_ptr<PageStore>> OpenUringPageStore(const PageStoreOptions& options) {
  return UringPageStore::Open(options);
}

}  // namespace mnemo::tiering
