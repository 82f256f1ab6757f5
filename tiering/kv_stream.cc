// KvStream: the layer ring of a session streamed through T0.
#include "tiering/kv_stream.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <iterator>

#include "tiering/index.h"
#include "tiering/tier_manager.h"

namespace mnemo::tiering {
namespace {
// Pages that arrive between two wake-ups of a step thread checking them.
constexpr size_t kCheckBatch = 64;
}  // namespace

KvStream::KvStream(TierManager* tm, KvStreamOptions options, std::vector<std::vector<uint64_t>> checksums)
    : tm_(tm),
      options_(std::move(options)),
      window_(options_.window),
      n_layers_(tm->layout().n_layers),
      grouped_(options_.group_reads && options_.direct && options_.window > 1),
      checksums_(std::move(checksums)),
      slots_(static_cast<size_t>(options_.window)) {}

KvStream::~KvStream() { Stop(); }

Status KvStream::Start() {
  const BlockLayout& L = tm_->layout();
  const uint32_t n = std::max<uint32_t>(options_.max_inflight, 1);
  reads_.resize(n);
  if (!options_.direct) {
    MNEMO_ASSIGN_OR_RETURN(bounce_, AlignedBuffer::Allocate(size_t{n} * L.layer_stride));
    // Registered once (io_uring fixed buffers): reads into it skip pinning
    // pages per request. Refused (e.g. RLIMIT_MEMLOCK): the plain path.
    bounce_registered_ = tm_->store_->RegisterBuffers(bounce_.data(), bounce_.size()).ok();
  } else {
    // The ring's pages, as the few address runs the pool's chunks give,
    // registered too: page reads straight into T0 then take the fixed-buffer
    // path (on a virtio disk ~1.4x the decode rate of pinning per read).
    // What the store refuses (a full table, RLIMIT_MEMLOCK) reads through the
    // plain path.
    std::vector<uintptr_t> pages;
    for (const auto& slot : options_.ring)
      for (void* p : slot) pages.push_back(reinterpret_cast<uintptr_t>(p));
    std::sort(pages.begin(), pages.end());
    pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
    for (size_t i = 0; i < pages.size();) {
      size_t j = i + 1;
      while (j < pages.size() && pages[j] == pages[j - 1] + L.layer_stride) ++j;
      void* base = reinterpret_cast<void*>(pages[i]);
      if (!tm_->store_->RegisterBuffers(base, (j - i) * L.layer_stride).ok()) break;
      ring_registered_.push_back(base);
      ++stats_.registered_runs;
      i = j;
    }
  }
  for (uint32_t i = 0; i < n; ++i) {
    reads_[i].stream = this;
    reads_[i].bounce = options_.direct ? nullptr : bounce_.data() + size_t{i} * L.layer_stride;
    if (grouped_) reads_[i].iov.resize(static_cast<size_t>(window_));
    free_reads_.push_back(&reads_[i]);
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (grouped_) {
    LoadGroupLocked(0);
  } else {
    for (int32_t s = 0; s < window_; ++s) LoadLocked(s, s % n_layers_);
  }
  PumpLocked();
  return error_;
}

void KvStream::ResetSlotLocked(int32_t slot, int32_t layer) {
  Slot& s = slots_[static_cast<size_t>(slot)];
  s.layer = layer;
  s.pending = options_.blocks.size();
  s.ready = s.pending == 0;
  s.arrived.clear();
  s.arrived.reserve(options_.blocks.size());
  s.checked = 0;
}

void KvStream::LoadLocked(int32_t slot, int32_t layer) {
  ResetSlotLocked(slot, layer);
  for (uint64_t b = 0; b < options_.blocks.size(); ++b) todo_.push_back(Load{slot, 1, b});
}

void KvStream::LoadGroupLocked(uint64_t first_visit) {
  for (int32_t i = 0; i < window_; ++i)
    ResetSlotLocked(i, static_cast<int32_t>((first_visit + static_cast<uint64_t>(i)) % static_cast<uint64_t>(n_layers_)));
  // Block by block (the order on T2), one load per run of consecutive
  // layers: the group's layers run on until they wrap to layer 0.
  for (uint64_t b = 0; b < options_.blocks.size(); ++b) {
    int32_t first = 0;
    for (int32_t i = 1; i <= window_; ++i) {
      if (i == window_ || slots_[static_cast<size_t>(i)].layer != slots_[static_cast<size_t>(i - 1)].layer + 1) {
        todo_.push_back(Load{first, i - first, b});
        first = i;
      }
    }
  }
}

void KvStream::PumpLocked() {
  const BlockLayout& L = tm_->layout();
  // Reads go to the store in batches (one submission each).
  IoRequest* batch[64];
  size_t n = 0;
  auto flush = [&] {
    if (n == 0) return;
    Status s = tm_->store_->Submit(std::span<IoRequest* const>(batch, n));
    if (s.ok()) {
      inflight_ += n;
    } else {
      for (size_t i = 0; i < n; ++i) free_reads_.push_back(static_cast<Read*>(batch[i]->user));
      if (error_.ok()) error_ = s.WithContext(options_.label + ": reading KV pages");
      cv_.notify_all();
    }
    n = 0;
  };
  while (!todo_.empty() && error_.ok() && !stopping_) {
    const Load ld = todo_.front();
    const uint64_t b = ld.block;
    auto page_of = [&](int32_t k) { return options_.ring[static_cast<size_t>(ld.slot + k)][b]; };
    const int32_t layer = slots_[static_cast<size_t>(ld.slot)].layer;
    const size_t offset = L.LayerOffset(layer);
    // A block cached in T1 is there whole: its pages are copied, and any
    // evicted meanwhile are read one by one.
    if (tm_->T1GetRange(options_.blocks[b], offset, L.page_bytes, static_cast<uint8_t*>(page_of(0)))) {
      todo_.pop_front();
      ++stats_.pages_cached;
      PageDoneLocked(ld.slot, b, Status::Ok(), static_cast<const uint8_t*>(page_of(0)));
      for (int32_t k = ld.count - 1; k >= 1; --k) {
        void* page = page_of(k);
        if (tm_->T1GetRange(options_.blocks[b], offset + static_cast<size_t>(k) * L.layer_stride, L.page_bytes,
                            static_cast<uint8_t*>(page))) {
          ++stats_.pages_cached;
          PageDoneLocked(ld.slot + k, b, Status::Ok(), static_cast<const uint8_t*>(page));
        } else {
          todo_.push_front(Load{ld.slot + k, 1, b});
        }
      }
      continue;
    }
    if (free_reads_.empty()) break;  // a completion pumps again
    todo_.pop_front();
    Read* r = free_reads_.back();
    free_reads_.pop_back();
    r->load = ld;
    r->req = IoRequest{};
    r->req.op = IoOp::kRead;
    r->req.slot = options_.blocks[b];
    r->req.offset = offset;
    r->req.length = static_cast<size_t>(ld.count) * L.layer_stride;
    if (ld.count > 1) {  // grouped (direct): scatter into the slots' pages
      for (int32_t k = 0; k < ld.count; ++k) r->iov[static_cast<size_t>(k)] = iovec{page_of(k), L.layer_stride};
      r->req.iov = r->iov.data();
      r->req.iov_count = static_cast<uint32_t>(ld.count);
    } else {
      r->req.buf = options_.direct ? page_of(0) : r->bounce;
    }
    r->req.callback = &KvStream::OnRead;
    r->req.user = r;
    batch[n++] = &r->req;
    if (n == std::size(batch)) flush();
  }
  flush();
}

void KvStream::OnRead(IoRequest* req) {
  Read* r = static_cast<Read*>(req->user);
  KvStream* self = r->stream;
  std::lock_guard<std::mutex> lock(self->mu_);
  --self->inflight_;
  ++self->stats_.reads;
  const Load& ld = r->load;
  self->stats_.pages_read += static_cast<uint64_t>(ld.count);
  if (ld.count > 1) {
    for (int32_t k = 0; k < ld.count; ++k)
      self->PageDoneLocked(ld.slot + k, ld.block, req->status,
                           static_cast<const uint8_t*>(r->iov[static_cast<size_t>(k)].iov_base));
  } else {
    self->PageDoneLocked(ld.slot, ld.block, req->status, static_cast<const uint8_t*>(req->buf));
  }
  self->free_reads_.push_back(r);
  // Refill in batches (one submission for many reads) while enough are
  // still in flight to keep the device busy.
  if (self->free_reads_.size() >= 32 || self->inflight_ < 64) self->PumpLocked();
  // Waiters wake for a ready slot or an error (PageDoneLocked), and Stop for
  // the last read back: not for every page.
  if (self->stopping_ && self->inflight_ == 0) self->cv_.notify_all();
}

void KvStream::PageDoneLocked(int32_t slot, uint64_t block, const Status& status, const uint8_t* data) {
  const BlockLayout& L = tm_->layout();
  Slot& s = slots_[static_cast<size_t>(slot)];
  if (!error_.ok()) return;
  if (!status.ok()) {
    error_ = status.WithContext(options_.label + ": reading KV pages");
    cv_.notify_all();
    return;
  }
  void* page = options_.ring[static_cast<size_t>(slot)][block];
  if (data != page) std::memcpy(page, data, L.page_bytes);
  s.arrived.push_back(block);
  if (--s.pending == 0) {
    s.ready = true;
    cv_.notify_all();
  } else if ((s.arrived.size() - s.checked) % kCheckBatch == 0) {
    // The waiting step thread checks pages while the rest still load.
    cv_.notify_all();
  }
}

bool KvStream::CheckArrivedLocked(std::unique_lock<std::mutex>& lock) {
  const auto cur = static_cast<size_t>(visit_ % static_cast<uint64_t>(window_));
  size_t k = cur;
  for (size_t i = 0; i < slots_.size() && slots_[k].checked == slots_[k].arrived.size(); ++i)
    k = (cur + i + 1) % slots_.size();
  Slot& s = slots_[k];
  if (s.checked == s.arrived.size()) return false;
  // Only this thread checks and only it reloads slots (LayerDone), so the
  // claimed pages stay put while mu_ is released.
  const size_t from = s.checked, to = s.arrived.size();
  s.checked = to;
  const int32_t layer = s.layer;
  check_blocks_.assign(s.arrived.begin() + static_cast<ptrdiff_t>(from), s.arrived.begin() + static_cast<ptrdiff_t>(to));
  lock.unlock();
  const BlockLayout& L = tm_->layout();
  uint64_t bad = options_.blocks.size();
  for (uint64_t b : check_blocks_) {
    if (PageChecksum(options_.ring[k][b], L.page_bytes) != checksums_[b][static_cast<size_t>(layer)]) {
      bad = b;
      break;
    }
  }
  lock.lock();
  if (bad < options_.blocks.size() && error_.ok()) {
    error_ = Status::Corruption(options_.label + ": KV page of layer " + std::to_string(layer) + " in block " +
                                std::to_string(options_.blocks[bad]) + " fails its checksum");
    cv_.notify_all();
  }
  return true;
}

Status KvStream::WaitLayer(int32_t layer) {
  std::unique_lock<std::mutex> lock(mu_);
  if (layer < 0 || layer >= n_layers_) return Status::InvalidArgument("KV stream: no layer " + std::to_string(layer));
  if (!error_.ok()) return error_;
  if (stopping_) return Status::Cancelled(options_.label + ": KV stream stopped");
  const int32_t expected = static_cast<int32_t>(visit_ % static_cast<uint64_t>(n_layers_));
  if (layer != expected)
    return Status::Internal("KV stream: layer " + std::to_string(layer) + " asked out of order (layer " +
                            std::to_string(expected) + " comes next)");
  const auto slot = static_cast<size_t>(visit_ % static_cast<uint64_t>(window_));
  Slot& s = slots_[slot];
  const uint64_t n_blocks = options_.blocks.size();
  if (s.ready && s.checked == n_blocks) {
    ++stats_.layers_ready;
    return Status::Ok();
  }
  // Every page against its XXH3, here on the step thread rather than on the
  // I/O thread, and while the rest of the ring still loads: pages are
  // checked as they arrive (in batches), any slot's, this one's first.
  const bool was_ready = s.ready;
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    if (!error_.ok()) break;
    if (stopping_) break;
    if (s.ready && s.checked == n_blocks) break;
    if (CheckArrivedLocked(lock)) continue;
    cv_.wait(lock, [&] {
      return !error_.ok() || stopping_ || (s.ready && s.checked == n_blocks) ||
             s.arrived.size() - s.checked >= kCheckBatch || (s.ready && s.checked < n_blocks);
    });
  }
  if (was_ready) {
    ++stats_.layers_ready;
  } else {
    ++stats_.layers_waited;
    stats_.stall_ns += static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
  }
  if (!error_.ok()) return error_;
  if (stopping_) return Status::Cancelled(options_.label + ": KV stream stopped");
  return Status::Ok();
}

void KvStream::LayerDone(int32_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_ || !error_.ok()) return;
  if (layer != static_cast<int32_t>(visit_ % static_cast<uint64_t>(n_layers_))) return;
  const auto slot = static_cast<int32_t>(visit_ % static_cast<uint64_t>(window_));
  const auto next = static_cast<int32_t>((visit_ + static_cast<uint64_t>(window_)) % static_cast<uint64_t>(n_layers_));
  ++visit_;
  if (next == layer) return;  // the ring holds every layer: nothing to swap
  if (grouped_) {
    // The next group loads once the step is done with every slot.
    if (visit_ % static_cast<uint64_t>(window_) != 0) return;
    LoadGroupLocked(visit_);
    PumpLocked();
    return;
  }
  LoadLocked(slot, next);
  PumpLocked();
}

void KvStream::Stop() {
  std::unique_lock<std::mutex> lock(mu_);
  stopping_ = true;
  todo_.clear();
  cv_.notify_all();
  cv_.wait(lock, [&] { return inflight_ == 0; });
  if (bounce_registered_) {
    tm_->store_->UnregisterBuffers(bounce_.data());
    bounce_registered_ = false;
  }
  for (void* base : ring_registered_) tm_->store_->UnregisterBuffers(base);
  ring_registered_.clear();
}

KvStreamStats KvStream::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace mnemo::tiering
