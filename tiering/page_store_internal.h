// Internals shared by the PageStore implementations: errno translation, the
// intrusive request queue, and the slab files of a store directory. Not part
// of the tiering API.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "common/status.h"
#include "tiering/page_store.h"

namespace mnemo::tiering::internal {

// The one place where an errno (from a transfer, a completion's res,
// fallocate, fdatasync, open...) becomes a Status: ENOSPC and EDQUOT are
// ResourceExhausted, everything else IOError with the errno text.
Status ErrnoStatus(std::string_view what, int err);

// The store whose callbacks the current thread runs (set by each store's
// I/O threads), for PageStore::OnIoThread.
inline thread_local const PageStore* tls_io_store = nullptr;

// Transfer errors worth resubmitting as is; bounded by kMaxRetries.
inline bool RetryableErrno(int err) { return err == EAGAIN || err == EINTR; }
inline constexpr uint32_t kMaxRetries = 16;

// FIFO of caller-owned requests linked through IoRequest::internal.next;
// allocates nothing. Thread-compatible.
class IoQueue {
 public:
  bool empty() const { return head_ == nullptr; }
  size_t size() const { return size_; }
  void PushBack(IoRequest* r) {
    r->internal.next = nullptr;
    if (tail_) {
      tail_->internal.next = r;
    } else {
      head_ = r;
    }
    tail_ = r;
    ++size_;
  }
  void PushFront(IoRequest* r) {
    r->internal.next = head_;
    head_ = r;
    if (!tail_) tail_ = r;
    ++size_;
  }
  IoRequest* PopFront() {
    IoRequest* r = head_;
    if (!r) return nullptr;
    head_ = r->internal.next;
    if (!head_) tail_ = nullptr;
    r->internal.next = nullptr;
    --size_;
    return r;
  }
  // Moves all of `other` to the back of this queue.
  void Splice(IoQueue& other) {
    if (other.empty()) return;
    if (tail_) {
      tail_->internal.next = other.head_;
    } else {
      head_ = other.head_;
    }
    tail_ = other.tail_;
    size_ += other.size_;
    other.head_ = other.tail_ = nullptr;
    other.size_ = 0;
  }

 private:
  IoRequest* head_ = nullptr;
  IoRequest* tail_ = nullptr;
  size_t size_ = 0;
};

// Relaxed atomic counters behind PageStoreStats. Thread-safe.
struct StatCounters {
  std::atomic<uint64_t> reads{0}, writes{0}, read_bytes{0}, write_bytes{0}, errors{0},
      resubmissions{0}, overflowed{0}, fixed_buffer_ios{0}, syncs{0};
  LatencyHistogram read_latency, write_latency, sync_latency;
  // Marks a request's first transfer attempt (later attempts keep the mark).
  static void Started(IoRequest* r) {
    if (r->internal.start_ns == 0) r->internal.start_ns = MonotonicNs();
  }
  // Counts one finished request (before its callback runs).
  void Finished(const IoRequest& r) {
    constexpr auto kRelaxed = std::memory_order_relaxed;
    if (r.internal.start_ns != 0) {
      const uint64_t now = MonotonicNs();
      const uint64_t ns = now > r.internal.start_ns ? now - r.internal.start_ns : 0;
      (r.op == IoOp::kRead ? read_latency : write_latency).Record(ns);
    }
    if (r.op == IoOp::kRead) {
      reads.fetch_add(1, kRelaxed);
      read_bytes.fetch_add(r.internal.done_bytes, kRelaxed);
    } else {
      writes.fetch_add(1, kRelaxed);
      write_bytes.fetch_add(r.internal.done_bytes, kRelaxed);
    }
    if (!r.status.ok()) errors.fetch_add(1, kRelaxed);
  }
  PageStoreStats Snapshot() const;
};

// Completes a request: sets the status, counts it, then runs its callback.
// The store must not touch `r` afterwards.
inline void Complete(StatCounters* stats, IoRequest* r, Status st) {
  r->status = std::move(st);
  stats->Finished(*r);
  r->callback(r);
}

// The slab files of one store directory: geometry record, directory lock,
// preallocation, dirty tracking and fdatasync. Thread-safe; fd(i) and
// FileOffset are lock-free and valid for every slab below n_slabs().
class SlabFiles {
 public:
  static Result<std::unique_ptr<SlabFiles>> Open(const PageStoreOptions& options);
  ~SlabFiles();
  SlabFiles(const SlabFiles&) = delete;
  SlabFiles& operator=(const SlabFiles&) = delete;

  uint64_t capacity_slots() const { return capacity_slots_.load(std::memory_order_acquire); }
  uint64_t max_slots() const { return max_slots_; }
  uint32_t n_slabs() const { return n_slabs_.load(std::memory_order_acquire); }
  uint32_t max_slabs() const { return max_slabs_; }
  size_t block_bytes() const { return block_bytes_; }
  uint64_t blocks_per_slab() const { return blocks_per_slab_; }
  bool direct_io() const { return direct_io_; }
  const std::string& dir() const { return dir_; }

  int fd(uint32_t slab) const { return fds_[slab]; }
  uint32_t SlabOf(BlockSlot s) const { return static_cast<uint32_t>(s / blocks_per_slab_); }
  uint64_t FileOffset(BlockSlot s, size_t offset_in_block) const {
    return (s % blocks_per_slab_) * block_bytes_ + offset_in_block;
  }

  // Grows to at least `slots` blocks (rounded up to whole slabs within the
  // budget). For each slab file that appears, on_new_slab(index, fd) runs
  // before the new capacity is published (so readers of capacity_slots()
  // see registered files).
  Status EnsureCapacity(uint64_t slots, const std::function<Status(uint32_t, int)>& on_new_slab);

  // A write into `slab` has completed; the next Sync must fdatasync it.
  void MarkDirty(uint32_t slab) { dirty_[slab].store(1, std::memory_order_release); }
  // fdatasync of every dirty slab; serialised so a Sync never returns while
  // an earlier one still flushes a slab it skipped. Counts each fdatasync
  // and its latency in *stats.
  Status Sync(StatCounters* stats);

 private:
  SlabFiles() = default;
  std::string SlabPath(uint32_t i) const;
  // Extends slab i's file (opening/creating it if fd < 0) to `blocks` blocks.
  Status GrowSlab(uint32_t i, uint64_t blocks, bool* created);

  // constant after Open
  std::string dir_;
  size_t block_bytes_ = 0;
  uint64_t blocks_per_slab_ = 0;
  uint64_t max_slots_ = 0;
  uint32_t max_slabs_ = 0;
  bool direct_io_ = true;
  int dir_fd_ = -1;
  int lock_fd_ = -1;
  std::unique_ptr<int[]> fds_;                        // [max_slabs_], -1 when absent
  std::unique_ptr<std::atomic<uint8_t>[]> dirty_;    // [max_slabs_]

  std::mutex grow_mu_;   // serialises EnsureCapacity
  std::mutex sync_mu_;   // serialises Sync
  std::atomic<uint32_t> n_slabs_{0};
  std::atomic<uint64_t> capacity_slots_{0};
  std::unique_ptr<uint64_t[]> slab_blocks_;  // [max_slabs_] guarded by grow_mu_
};

}  // namespace mnemo::tiering::internal
