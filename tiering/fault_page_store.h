// FaultInjectingPageStore: a PageStore wrapper for tests of the layers above
// the page store — injected EIO and ENOSPC, corrupted reads, torn writes,
// failed syncs, and power loss that drops every write not covered by a Sync.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tiering/page_store.h"

namespace mnemo::tiering {

// What to inject, and on which requests. Immutable once added.
struct FaultRule {
  enum class Action : uint8_t {
    kEio,          // the request fails with EIO; a write does not reach the store
    kEnospc,       // the request fails with ENOSPC (ResourceExhausted); nothing written
    kCorruptRead,  // the read succeeds, then one byte of the buffer is XORed
    kTornWrite,    // only the first torn_bytes of the write reach the store; reported OK
  };
  Action action = Action::kEio;
  IoOp op = IoOp::kWrite;  // the requests that count
  // Fires on the nth counted request (1-based, counted from AddFault) and on
  // the following ones until it has fired `times` times (0: no end).
  uint64_t nth = 1;
  uint64_t times = 1;
  // Optional filter: only requests it accepts are counted. Runs inside
  // Submit under the wrapper's lock: it must not call the store.
  std::function<bool(const IoRequest&)> match;
  size_t torn_bytes = kDirectIoAlignment;  // kTornWrite: a multiple of 4096, < length
  size_t corrupt_offset = 0;               // kCorruptRead: byte of the request's range (mod length)
  uint8_t corrupt_xor = 0x01;
};

// Thread-safe. Wraps (and owns) an inner store. Every callback runs on the
// wrapper's own completion thread, never inside Submit. Unlike the real
// stores, Submit of a write may block: before the first write to a 4 KiB page
// since that page was last synced it reads the page's durable content from
// the inner store (the power-loss shadow). Writes are counted durable by the
// Sync that follows their completion; a page with a write still in flight
// during a Sync keeps its older shadow (power loss then reverts it further
// than a disk would — conservative). Test-only.
class FaultInjectingPageStore final : public PageStore {
 public:
  explicit FaultInjectingPageStore(std::unique_ptr<PageStore> inner);
  ~FaultInjectingPageStore() override;  // completes every accepted request first

  void AddFault(FaultRule rule);
  void ClearFaults();
  // The next `times` Syncs fail as fdatasync failing with `err` would, and
  // make nothing durable.
  void FailSyncs(int err, int times = 1);
  // Power loss: every 4 KiB page written since it was last synced gets its
  // synced content back in the inner store (then synced). Returns the number
  // of pages reverted. FailedPrecondition while requests are in flight.
  Result<size_t> SimulatePowerLoss();
  // Pages written and not yet covered by a Sync.
  size_t unsynced_pages() const;
  uint64_t faults_fired() const;
  PageStore* inner() const { return inner_.get(); }

  Status Submit(std::span<IoRequest* const> batch) override;
  Status Sync() override;
  Status EnsureCapacity(uint64_t slots) override { return inner_->EnsureCapacity(slots); }
  Status RegisterBuffers(void* base, size_t bytes) override { return inner_->RegisterBuffers(base, bytes); }
  void UnregisterBuffers(void* base) override { inner_->UnregisterBuffers(base); }
  uint64_t capacity_slots() const override { return inner_->capacity_slots(); }
  uint64_t max_slots() const override { return inner_->max_slots(); }
  size_t block_bytes() const override { return inner_->block_bytes(); }
  uint32_t queue_depth() const override { return inner_->queue_depth(); }
  std::string_view engine_name() const override { return name_; }
  PageStoreStats stats() const override;
  bool OnIoThread() const override;

 private:
  struct Shadow;  // one per accepted request
  struct RuleState {
    FaultRule rule;
    uint64_t seen = 0;
    uint64_t fired = 0;
  };
  struct PageState {
    std::vector<uint8_t> durable;  // 4 KiB: the content as of the last Sync covering the page
    uint32_t writes_in_flight = 0;
  };
  using PageKey = std::pair<BlockSlot, uint64_t>;  // (slot, 4 KiB page of the block)

  static void OnInnerDone(IoRequest* inner);
  void CompletionLoop();
  // The action of the first rule that fires for r, if any. REQUIRES mu_.
  const FaultRule* Decide(const IoRequest& r);
  // Reads the durable content of r's pages that have none recorded yet.
  // REQUIRES submit_mu_ (not mu_).
  Status CaptureShadow(const IoRequest& r, size_t length);

  // constant after construction
  const std::unique_ptr<PageStore> inner_;
  const std::string name_;

  std::mutex submit_mu_;  // serialises Submit, Sync and SimulatePowerLoss

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<RuleState> rules_;           // guarded by mu_
  int sync_err_ = 0;                       // guarded by mu_
  int sync_failures_left_ = 0;             // guarded by mu_
  std::map<PageKey, PageState> pages_;     // guarded by mu_: pages with unsynced writes
  std::deque<Shadow*> done_;               // guarded by mu_
  uint64_t in_flight_ = 0;                 // guarded by mu_: accepted, not yet completed
  uint64_t faults_fired_ = 0;              // guarded by mu_
  bool stopping_ = false;                  // guarded by mu_
  PageStoreStats stats_;                   // guarded by mu_

  std::thread thread_;  // runs CompletionLoop
};

}  // namespace mnemo::tiering
