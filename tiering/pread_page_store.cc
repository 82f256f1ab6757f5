// PreadPageStore: the T2 page store on pread/pwrite and a small pool of I/O
// threads, for kernels without io_uring. Same slab files, same semantics.
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <thread>
#include <vector>

#include "common/thread_name.h"
#include "tiering/page_store.h"
#include "tiering/page_store_internal.h"

namespace mnemo::tiering {
namespace {

using internal::ErrnoStatus;
using internal::IoQueue;
using internal::SlabFiles;

// Thread-safe. Each of `threads` workers takes one request at a time from the
// intake queue (bounded by max_outstanding), transfers all of it (short
// transfers resumed, EINTR/EAGAIN retried a bounded number of times) and runs
// its callback — so callbacks of different requests may run concurrently.
// Workers sleep on a condition variable when there is nothing to do; the
// destructor lets them finish every accepted request.
class PreadPageStore final : public PageStore {
 public:
  static Result<std::unique_ptr<PageStore>> Open(const PageStoreOptions& o);
  ~PreadPageStore() override;

  Status Submit(std::span<IoRequest* const> batch) override;
  Status Sync() override {
    MNEMO_CHECK_MSG(!OnIoThread(), "PageStore::Sync on the store's own I/O thread");
    return slabs_->Sync(&stats_);
  }
  Status EnsureCapacity(uint64_t slots) override {
    MNEMO_CHECK_MSG(!OnIoThread(), "PageStore::EnsureCapacity on the store's own I/O thread");
    return slabs_->EnsureCapacity(slots, [](uint32_t, int) { return Status::Ok(); });
  }
  uint64_t capacity_slots() const override { return slabs_->capacity_slots(); }
  uint64_t max_slots() const override { return slabs_->max_slots(); }
  size_t block_bytes() const override { return slabs_->block_bytes(); }
  uint32_t queue_depth() const override { return static_cast<uint32_t>(workers_.size()); }
  std::string_view engine_name() const override { return "pread"; }
  PageStoreStats stats() const override { return stats_.Snapshot(); }
  bool OnIoThread() const override { return internal::tls_io_store == this; }

 private:
  explicit PreadPageStore(const PageStoreOptions& o) : max_outstanding_(o.max_outstanding) {}
  void Worker();
  // Transfers all of r; sets r->status.
  void Transfer(IoRequest* r);

  // constant after Open
  const uint32_t max_outstanding_;
  std::unique_ptr<SlabFiles> slabs_;
  std::vector<std::thread> workers_;

  mutable internal::StatCounters stats_;

  std::mutex mu_;
  std::condition_variable work_cv_;
  IoQueue intake_;            // guarded by mu_
  uint64_t outstanding_ = 0;  // guarded by mu_
  bool stopping_ = false;     // guarded by mu_
};

Result<std::unique_ptr<PageStore>> PreadPageStore::Open(const PageStoreOptions& o) {
  std::unique_ptr<PreadPageStore> s(new PreadPageStore(o));
  MNEMO_ASSIGN_OR_RETURN(s->slabs_, SlabFiles::Open(o));
  const uint32_t n = std::max<uint32_t>(1, std::min(o.pread_threads, o.queue_depth));
  try {
    for (uint32_t i = 0; i < n; ++i) s->workers_.emplace_back([p = s.get()] {
      SetThreadName("mnemo-pread");
      p->Worker();
    });
  } catch (const std::system_error& e) {
    // The destructor stops the workers that did start.
    return Status::ResourceExhausted(std::string("page store: cannot start I/O threads: ") + e.what());
  }
  return std::unique_ptr<PageStore>(std::move(s));
}

PreadPageStore::~PreadPageStore() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

Status PreadPageStore::Submit(std::span<IoRequest* const> batch) {
  for (IoRequest* r : batch) MNEMO_RETURN_IF_ERROR(Validate(*r));
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
    if (outstanding_ > workers_.size())
      stats_.overflowed.fetch_add(std::min<uint64_t>(batch.size(), outstanding_ - workers_.size()),
                                  std::memory_order_relaxed);
  }
  if (batch.size() == 1) {
    work_cv_.notify_one();
  } else if (!batch.empty()) {
    work_cv_.notify_all();
  }
  return Status::Ok();
}

void PreadPageStore::Transfer(IoRequest* r) {
  internal::StatCounters::Started(r);
  const uint32_t slab = slabs_->SlabOf(r->slot);
  const int fd = slabs_->fd(slab);
  while (r->internal.done_bytes < r->length) {
    const size_t done = r->internal.done_bytes;
    uint8_t* buf = static_cast<uint8_t*>(r->buf) + done;
    const size_t len = r->length - done;
    const auto off = static_cast<off_t>(slabs_->FileOffset(r->slot, r->offset + done));
    ssize_t n;
    if (r->iov_count > 0) {  // scatter read: whole each time (a short one starts over)
      n = ::preadv(fd, r->iov, static_cast<int>(r->iov_count), static_cast<off_t>(slabs_->FileOffset(r->slot, r->offset)));
      if (n > 0 && static_cast<size_t>(n) < r->length) {
        if (++r->internal.retries > internal::kMaxRetries) {
          r->status = ErrnoStatus("read of slot " + std::to_string(r->slot) + " in " + slabs_->dir() +
                                      " stays short after " + std::to_string(n) + " bytes",
                                  EIO);
          return;
        }
        stats_.resubmissions.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
    } else {
      n = r->op == IoOp::kRead ? ::pread(fd, buf, len, off) : ::pwrite(fd, buf, len, off);
    }
    if (n < 0) {
      const int err = errno;
      if (internal::RetryableErrno(err) && r->internal.retries < internal::kMaxRetries) {
        ++r->internal.retries;
        stats_.resubmissions.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      r->status = ErrnoStatus(std::string(r->op == IoOp::kRead ? "read" : "write") + " of slot " +
                                  std::to_string(r->slot) + " in " + slabs_->dir(),
                              err);
      return;
    }
    if (n == 0) {
      r->status = ErrnoStatus(std::string(r->op == IoOp::kRead ? "read" : "write") + " of slot " +
                                  std::to_string(r->slot) + " in " + slabs_->dir() + " made no progress",
                              EIO);
      return;
    }
    r->internal.done_bytes += static_cast<size_t>(n);
    if (r->internal.done_bytes < r->length) stats_.resubmissions.fetch_add(1, std::memory_order_relaxed);
  }
  if (r->op == IoOp::kWrite) slabs_->MarkDirty(slab);
}

void PreadPageStore::Worker() {
  internal::tls_io_store = this;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return !intake_.empty() || stopping_; });
    IoRequest* r = intake_.PopFront();
    if (r == nullptr) break;  // stopping, and every accepted request is taken
    lock.unlock();
    Transfer(r);
    stats_.Finished(*r);
    lock.lock();
    --outstanding_;  // before the callback, as UringPageStore does
    lock.unlock();
    r->callback(r);  // the request may be gone after this
    lock.lock();
  }
  internal::tls_io_store = nullptr;
}

}  // namespace

Result<std::unique_ptr<PageStore>> OpenPreadPageStore(const PageStoreOptions& options) {
  return PreadPageStore::Open(options);
}

}  // namespace mnemo::tiering
