// FaultInjectingPageStore: rule matching, the power-loss shadow of unsynced
// pages, and the completion thread that delivers every callback.
#include "tiering/fault_page_store.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "tiering/page_store_internal.h"

namespace mnemo::tiering {

// One accepted request: the inner request that carries it (when it reaches
// the inner store) and what to do on completion. Owned by the wrapper from
// Submit until the outer callback runs.
struct FaultInjectingPageStore::Shadow {
  IoRequest inner;
  IoRequest* outer = nullptr;
  FaultInjectingPageStore* self = nullptr;
  bool forwarded = false;  // else completes with `synthetic`
  Status synthetic;
  bool corrupt = false;
  size_t corrupt_offset = 0;
  uint8_t corrupt_xor = 0;
  size_t write_length = 0;  // bytes of a forwarded write (a torn write's prefix)
};

namespace {
constexpr size_t kPage = kDirectIoAlignment;

// The byte at `offset` into the request's range: in buf, or in the scatter
// piece that holds it.
uint8_t* ByteAt(const IoRequest& r, size_t offset) {
  for (uint32_t i = 0; i < r.iov_count; ++i) {
    if (offset < r.iov[i].iov_len) return static_cast<uint8_t*>(r.iov[i].iov_base) + offset;
    offset -= r.iov[i].iov_len;
  }
  return static_cast<uint8_t*>(r.buf) + offset;
}
}  // namespace

FaultInjectingPageStore::FaultInjectingPageStore(std::unique_ptr<PageStore> inner)
    : inner_(std::move(inner)), name_("fault(" + std::string(inner_->engine_name()) + ")") {
  thread_ = std::thread([this] { CompletionLoop(); });
}

FaultInjectingPageStore::~FaultInjectingPageStore() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void FaultInjectingPageStore::AddFault(FaultRule rule) {
  std::lock_guard<std::mutex> l(mu_);
  rules_.push_back(RuleState{std::move(rule)});
}

void FaultInjectingPageStore::ClearFaults() {
  std::lock_guard<std::mutex> l(mu_);
  rules_.clear();
  sync_failures_left_ = 0;
}

void FaultInjectingPageStore::FailSyncs(int err, int times) {
  std::lock_guard<std::mutex> l(mu_);
  sync_err_ = err;
  sync_failures_left_ = times;
}

size_t FaultInjectingPageStore::unsynced_pages() const {
  std::lock_guard<std::mutex> l(mu_);
  return pages_.size();
}

uint64_t FaultInjectingPageStore::faults_fired() const {
  std::lock_guard<std::mutex> l(mu_);
  return faults_fired_;
}

PageStoreStats FaultInjectingPageStore::stats() const {
  // Latencies are the inner store's: the device's, not the wrapper's.
  const PageStoreStats inner = inner_->stats();
  std::lock_guard<std::mutex> l(mu_);
  PageStoreStats s = stats_;
  s.read_latency = inner.read_latency;
  s.write_latency = inner.write_latency;
  s.sync_latency = inner.sync_latency;
  return s;
}

bool FaultInjectingPageStore::OnIoThread() const {
  return internal::tls_io_store == this || inner_->OnIoThread();
}

const FaultRule* FaultInjectingPageStore::Decide(const IoRequest& r) {
  for (RuleState& rs : rules_) {
    const FaultRule& f = rs.rule;
    if (f.op != r.op || (f.match && !f.match(r))) continue;
    ++rs.seen;
    if (rs.seen >= std::max<uint64_t>(f.nth, 1) && (f.times == 0 || rs.fired < f.times)) {
      ++rs.fired;
      ++faults_fired_;
      return &rs.rule;
    }
  }
  return nullptr;
}

Status FaultInjectingPageStore::CaptureShadow(const IoRequest& r, size_t length) {
  const uint64_t first = r.offset / kPage;
  const uint64_t n = length / kPage;
  std::vector<uint64_t> missing;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (uint64_t p = first; p < first + n; ++p)
      if (pages_.count({r.slot, p}) == 0) missing.push_back(p);
  }
  if (missing.empty()) return Status::Ok();
  // No write to a page without a shadow is in flight (a write keeps its
  // page's shadow until a Sync finds it complete), so the inner store holds
  // exactly the durable content of these pages.
  const uint64_t lo = missing.front();
  const uint64_t span = missing.back() - lo + 1;
  MNEMO_ASSIGN_OR_RETURN(AlignedBuffer buf, AlignedBuffer::Allocate(span * kPage));
  MNEMO_RETURN_IF_ERROR(inner_->Read(r.slot, lo * kPage, span * kPage, buf.data()));
  std::lock_guard<std::mutex> l(mu_);
  for (uint64_t p : missing) {
    const uint8_t* src = buf.data() + (p - lo) * kPage;
    pages_.try_emplace({r.slot, p}, PageState{std::vector<uint8_t>(src, src + kPage), 0});
  }
  return Status::Ok();
}

Status FaultInjectingPageStore::Submit(std::span<IoRequest* const> batch) {
  for (IoRequest* r : batch) MNEMO_RETURN_IF_ERROR(Validate(*r));
  std::lock_guard<std::mutex> submit_lock(submit_mu_);
  std::vector<std::unique_ptr<Shadow>> shadows;
  shadows.reserve(batch.size());
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopping_) return Status::Unavailable("page store is shutting down");
    for (IoRequest* r : batch) {
      auto s = std::make_unique<Shadow>();
      s->outer = r;
      s->self = this;
      s->forwarded = true;
      s->write_length = r->op == IoOp::kWrite ? r->length : 0;
      if (const FaultRule* f = Decide(*r)) {
        switch (f->action) {
          case FaultRule::Action::kEio:
            s->forwarded = false;
            s->synthetic = internal::ErrnoStatus("injected fault", EIO);
            break;
          case FaultRule::Action::kEnospc:
            s->forwarded = false;
            s->synthetic = internal::ErrnoStatus("injected fault", ENOSPC);
            break;
          case FaultRule::Action::kCorruptRead:
            if (r->op == IoOp::kRead) {
              s->corrupt = true;
              s->corrupt_offset = f->corrupt_offset % r->length;
              s->corrupt_xor = f->corrupt_xor;
            }
            break;
          case FaultRule::Action::kTornWrite:
            if (r->op == IoOp::kWrite) {
              s->write_length = std::min(f->torn_bytes / kPage * kPage, r->length - kPage);
              if (s->write_length == 0) s->forwarded = false;  // synthetic stays OK: nothing landed
            }
            break;
        }
      }
      shadows.push_back(std::move(s));
    }
  }
  // The power-loss shadow of every page a write is about to change.
  for (auto& s : shadows)
    if (s->forwarded && s->write_length > 0) MNEMO_RETURN_IF_ERROR(CaptureShadow(*s->outer, s->write_length));

  std::vector<IoRequest*> forward;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& s : shadows) {
      if (!s->forwarded) continue;
      IoRequest& in = s->inner;
      in.op = s->outer->op;
      in.slot = s->outer->slot;
      in.offset = s->outer->offset;
      in.length = in.op == IoOp::kWrite ? s->write_length : s->outer->length;
      in.buf = s->outer->buf;
      in.iov = s->outer->iov;
      in.iov_count = s->outer->iov_count;
      in.callback = &OnInnerDone;
      in.user = s.get();
      forward.push_back(&in);
      if (in.op == IoOp::kWrite)
        for (uint64_t p = in.offset / kPage; p < (in.offset + in.length) / kPage; ++p)
          ++pages_.at({in.slot, p}).writes_in_flight;
    }
    in_flight_ += shadows.size();
  }
  // Once the inner store has them, forwarded shadows belong to the
  // completion loop, which may free them at any moment: keep raw pointers,
  // and never touch a forwarded one after a successful Submit.
  std::vector<Shadow*> all, synthetic;
  for (auto& s : shadows) {
    if (!s->forwarded) synthetic.push_back(s.get());
    all.push_back(s.release());
  }
  Status st = inner_->Submit(forward);
  std::lock_guard<std::mutex> l(mu_);
  if (!st.ok()) {  // nothing was queued: undo
    in_flight_ -= all.size();
    for (IoRequest* in : forward)
      if (in->op == IoOp::kWrite)
        for (uint64_t p = in->offset / kPage; p < (in->offset + in->length) / kPage; ++p)
          --pages_.at({in->slot, p}).writes_in_flight;
    for (Shadow* s : all) delete s;
    return st;
  }
  for (Shadow* s : synthetic) done_.push_back(s);  // completes on our thread, not in Submit
  if (!synthetic.empty()) cv_.notify_all();
  return Status::Ok();
}

void FaultInjectingPageStore::OnInnerDone(IoRequest* inner) {
  auto* s = static_cast<Shadow*>(inner->user);
  FaultInjectingPageStore* self = s->self;
  std::lock_guard<std::mutex> l(self->mu_);
  self->done_.push_back(s);
  self->cv_.notify_all();
}

void FaultInjectingPageStore::CompletionLoop() {
  internal::tls_io_store = this;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    // in_flight_ drops only as the batch taken here completes, so this exits
    // after every accepted request's callback has run.
    cv_.wait(lock, [&] { return !done_.empty() || (stopping_ && in_flight_ == 0); });
    if (done_.empty()) break;
    std::deque<Shadow*> batch;
    batch.swap(done_);
    for (Shadow* s : batch) {
      IoRequest* r = s->outer;
      r->status = s->forwarded ? s->inner.status : s->synthetic;
      r->internal.done_bytes = r->status.ok() ? r->length : 0;
      if (s->forwarded && r->op == IoOp::kWrite)
        for (uint64_t p = r->offset / kPage; p < (r->offset + s->write_length) / kPage; ++p)
          --pages_.at({r->slot, p}).writes_in_flight;
      if (r->op == IoOp::kRead) {
        ++stats_.reads;
        stats_.read_bytes += r->internal.done_bytes;
      } else {
        ++stats_.writes;
        stats_.write_bytes += r->internal.done_bytes;
      }
      if (!r->status.ok()) ++stats_.errors;
    }
    // Settled before the callbacks run: a caller woken by one may Sync or
    // simulate a power loss at once.
    in_flight_ -= batch.size();
    lock.unlock();
    for (Shadow* s : batch) {
      IoRequest* r = s->outer;
      if (r->status.ok() && s->corrupt) *ByteAt(*r, s->corrupt_offset) ^= s->corrupt_xor;
      delete s;
      r->callback(r);  // r may be gone after this
    }
    lock.lock();
  }
  internal::tls_io_store = nullptr;
}

Status FaultInjectingPageStore::Sync() {
  MNEMO_CHECK_MSG(!OnIoThread(), "PageStore::Sync on the store's own I/O thread");
  std::lock_guard<std::mutex> submit_lock(submit_mu_);
  std::vector<PageKey> covered;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (sync_failures_left_ > 0) {
      --sync_failures_left_;
      return internal::ErrnoStatus("fdatasync (injected fault)", sync_err_);
    }
    for (const auto& [key, page] : pages_)
      if (page.writes_in_flight == 0) covered.push_back(key);
  }
  MNEMO_RETURN_IF_ERROR(inner_->Sync());
  std::lock_guard<std::mutex> l(mu_);
  ++stats_.syncs;
  for (const PageKey& key : covered) {
    auto it = pages_.find(key);
    if (it != pages_.end() && it->second.writes_in_flight == 0) pages_.erase(it);
  }
  return Status::Ok();
}

Result<size_t> FaultInjectingPageStore::SimulatePowerLoss() {
  MNEMO_CHECK_MSG(!OnIoThread(), "SimulatePowerLoss on the store's own I/O thread");
  std::lock_guard<std::mutex> submit_lock(submit_mu_);
  std::map<PageKey, PageState> lost;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (in_flight_ != 0)
      return Status::FailedPrecondition("SimulatePowerLoss with " + std::to_string(in_flight_) +
                                        " requests in flight");
    lost.swap(pages_);
  }
  if (lost.empty()) return size_t{0};
  MNEMO_ASSIGN_OR_RETURN(AlignedBuffer buf, AlignedBuffer::Allocate(lost.size() * kPage));
  std::vector<IoRequest> reqs(lost.size());
  size_t i = 0;
  for (const auto& [key, page] : lost) {
    std::memcpy(buf.data() + i * kPage, page.durable.data(), kPage);
    reqs[i].op = IoOp::kWrite;
    reqs[i].slot = key.first;
    reqs[i].offset = key.second * kPage;
    reqs[i].length = kPage;
    reqs[i].buf = buf.data() + i * kPage;
    ++i;
  }
  MNEMO_RETURN_IF_ERROR(inner_->Execute(reqs));
  MNEMO_RETURN_IF_ERROR(inner_->Sync());
  return lost.size();
}

}  // namespace mnemo::tiering
