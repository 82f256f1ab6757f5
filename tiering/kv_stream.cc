// KvStream: the layer ring of a session streamed through T0.
#include "tiering/kv_stream.h"

#include <chrono>
#include <cstring>
#include <iterator>

#include "tiering/index.h"
#include "tiering/tier_manager.h"

namespace mnemo::tiering {

KvStream::KvStream(TierManager* tm, KvStreamOptions options, std::vector<std::vector<uint64_t>> checksums)
    : tm_(tm),
      options_(std::move(options)),
      window_(options_.window),
      n_layers_(tm->layout().n_layers),
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
  }
  for (uint32_t i = 0; i < n; ++i) {
    reads_[i].stream = this;
    reads_[i].bounce = options_.direct ? nullptr : bounce_.data() + size_t{i} * L.layer_stride;
    free_reads_.push_back(&reads_[i]);
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (int32_t s = 0; s < window_; ++s) LoadLocked(s, s % n_layers_);
  PumpLocked();
  return error_;
}

void KvStream::LoadLocked(int32_t slot, int32_t layer) {
  Slot& s = slots_[static_cast<size_t>(slot)];
  s.layer = layer;
  s.verified = false;
  s.pending = options_.blocks.size();
  s.ready = s.pending == 0;
  for (uint64_t b = 0; b < options_.blocks.size(); ++b) todo_.emplace_back(slot, b);
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
    const auto [slot, b] = todo_.front();
    const int32_t layer = slots_[static_cast<size_t>(slot)].layer;
    void* page = options_.ring[static_cast<size_t>(slot)][b];
    const size_t offset = L.LayerOffset(layer);
    if (tm_->T1GetRange(options_.blocks[b], offset, L.page_bytes, static_cast<uint8_t*>(page))) {
      todo_.pop_front();
      ++stats_.pages_cached;
      PageDoneLocked(slot, b, Status::Ok(), static_cast<const uint8_t*>(page));
      continue;
    }
    if (free_reads_.empty()) break;  // a completion pumps again
    todo_.pop_front();
    Read* r = free_reads_.back();
    free_reads_.pop_back();
    r->slot = slot;
    r->block = b;
    r->req = IoRequest{};
    r->req.op = IoOp::kRead;
    r->req.slot = options_.blocks[b];
    r->req.offset = offset;
    r->req.length = L.layer_stride;
    r->req.buf = options_.direct ? page : r->bounce;
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
  ++self->stats_.pages_read;
  self->PageDoneLocked(r->slot, r->block, req->status, static_cast<const uint8_t*>(req->buf));
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
  if (--s.pending == 0) {
    s.ready = true;
    cv_.notify_all();
  }
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
  if (s.ready) {
    ++stats_.layers_ready;
  } else {
    ++stats_.layers_waited;
    const auto t0 = std::chrono::steady_clock::now();
    cv_.wait(lock, [&] { return s.ready || !error_.ok() || stopping_; });
    stats_.stall_ns += static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
    if (!error_.ok()) return error_;
    if (!s.ready) return Status::Cancelled(options_.label + ": KV stream stopped");
  }
  if (s.verified) return Status::Ok();
  // Every page of the layer against its XXH3, here on the waiting step
  // thread rather than on the I/O thread; no read touches a ready slot.
  lock.unlock();
  const BlockLayout& L = tm_->layout();
  uint64_t bad = options_.blocks.size();
  for (uint64_t b = 0; b < options_.blocks.size() && bad == options_.blocks.size(); ++b)
    if (PageChecksum(options_.ring[slot][b], L.page_bytes) != checksums_[b][static_cast<size_t>(layer)]) bad = b;
  lock.lock();
  if (bad < options_.blocks.size()) {
    if (error_.ok())
      error_ = Status::Corruption(options_.label + ": KV page of layer " + std::to_string(layer) + " in block " +
                                  std::to_string(options_.blocks[bad]) + " fails its checksum");
    return error_;
  }
  s.verified = true;
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
}

KvStreamStats KvStream::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace mnemo::tiering
