// Streams a session's committed KV through a small ring of T0 pages, layer
// by layer, for sessions larger than memory: a decode step reads layer l's
// pages of every committed block while it computes layer l - 1, l - 2, ...
// The ring has `window` slots of one layer each, used in turn: steps visit
// layers 0..n_layers-1 over and over, visit v lives in slot v % window. A
// step waits for its next layer (WaitLayer), and once it has used it
// (LayerDone) the slot loads the layer of visit v + window, wrapping to the
// next step's first layers. Pages come from T1 when cached, else from T2
// (io_uring); WaitLayer checks each against its XXH3 before the step uses
// it, as they arrive while it waits (not all after the last one).
//
// Reads go straight into the ring's pages when they are 4 KiB-aligned host
// memory, which is then registered with the store (io_uring fixed buffers:
// no pinning per read); else through registered bounce buffers and a copy.
//
// Grouped reads (KvStreamOptions::group_reads, off by default): the ring
// loads `window` consecutive visits at once, once the step is done with all
// of its slots, and reads a block's pages of those layers (adjacent on T2: a
// block holds its layers one after the other) with one scatter read into the
// slots: per block one device request of window pages instead of window
// requests of one page, for devices that cap requests per second; the price
// is that the step computes the group's layers while nothing loads, and
// scatter reads do not take the fixed-buffer path. On the virtio disk of
// docs/benchmarks.md (bench 3) they were no faster than registered page
// reads.
//
// Thread-safe: WaitLayer/LayerDone/Stop come from the step thread, reads
// complete on the store's I/O thread. The ring memory belongs to the caller
// and must stay valid until Stop() returned (the destructor stops too).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/status.h"
#include "tiering/layout.h"
#include "tiering/page_store.h"

namespace mnemo::tiering {

class TierManager;

struct KvStreamOptions {
  std::string label;              // names the session in errors
  std::vector<BlockSlot> blocks;  // the streamed blocks, in token order
  int32_t window = 2;             // ring slots (layers loaded ahead), 1..n_layers
  // [window][blocks.size()] T0 page memory (page_bytes each).
  std::vector<std::vector<void*>> ring;
  // Reads go straight into the ring pages (host memory, 4 KiB aligned,
  // page_bytes a multiple of 4 KiB); otherwise through bounce buffers
  // registered with the store, then copied.
  bool direct = true;
  // Load a group of `window` layers at a time with one read per block (see
  // above); only when `direct` and window > 1. Otherwise one read per page,
  // and a slot reloads as soon as the step is done with it.
  bool group_reads = false;
  uint32_t max_inflight = 256;  // reads submitted at once
};

struct KvStreamStats {
  uint64_t layers_ready = 0;    // WaitLayer found the layer loaded
  uint64_t layers_waited = 0;   // WaitLayer had to wait
  uint64_t stall_ns = 0;        // time spent waiting
  uint64_t pages_read = 0;      // from T2
  uint64_t pages_cached = 0;    // from T1
  uint64_t reads = 0;           // T2 requests (a grouped read of several pages counts once)
  uint64_t registered_runs = 0; // address runs of the ring registered with the store
};

class KvStream {
 public:
  ~KvStream();
  KvStream(const KvStream&) = delete;
  KvStream& operator=(const KvStream&) = delete;

  // Blocks until `layer` (which must be the next visit's) is in its slot. Corruption naming
  // the session when a page fails its checksum, IOError when a read fails;
  // after an error every call fails with it.
  Status WaitLayer(int32_t layer);
  // The step is done with `layer`: its slot loads the next layer it serves.
  void LayerDone(int32_t layer);
  // Stops loading and waits for every read in flight. Idempotent.
  void Stop();
  KvStreamStats stats() const;
  int32_t window() const { return window_; }

 private:
  friend class TierManager;
  struct Slot {
    int32_t layer = -1;      // the layer it holds or is loading
    uint64_t pending = 0;    // pages of it not yet in place
    bool ready = false;
    std::vector<uint64_t> arrived;  // blocks whose page is in place, in arrival order
    size_t checked = 0;             // arrived[0, checked) taken for checking by the step thread
  };
  // Pages of one block for slots [slot, slot + count), whose layers are
  // consecutive (adjacent on T2).
  struct Load {
    int32_t slot = 0;
    int32_t count = 1;
    uint64_t block = 0;  // index into blocks_
  };
  struct Read {
    IoRequest req;
    KvStream* stream = nullptr;
    Load load;
    uint8_t* bounce = nullptr;
    std::vector<iovec> iov;  // window pieces when grouped
  };
  KvStream(TierManager* tm, KvStreamOptions options, std::vector<std::vector<uint64_t>> checksums);
  Status Start();
  // Queues the loads of `layer` into `slot`. REQUIRES: mu_ held.
  void LoadLocked(int32_t slot, int32_t layer);
  // Grouped reads: queues the loads of visits [first_visit, first_visit +
  // window) into slots 0..window-1. REQUIRES: mu_ held, first_visit a
  // multiple of window.
  void LoadGroupLocked(uint64_t first_visit);
  // Submits queued loads up to max_inflight. REQUIRES: mu_ held.
  void PumpLocked();
  // A page of `slot` is in place (or failed). REQUIRES: mu_ held.
  void PageDoneLocked(int32_t slot, uint64_t block, const Status& status, const uint8_t* data);
  // Resets `slot` to load `layer`. REQUIRES: mu_ held.
  void ResetSlotLocked(int32_t slot, int32_t layer);
  // On the step thread: checks the XXH3s of pages that arrived and are not
  // checked yet, in any slot (the slot of `visit_` first), with mu_ released
  // meanwhile. False when there was nothing to check. REQUIRES: lock holds mu_.
  bool CheckArrivedLocked(std::unique_lock<std::mutex>& lock);
  static void OnRead(IoRequest* req);

  // --- constant after construction ---------------------------------------------
  TierManager* const tm_;
  const KvStreamOptions options_;
  const int32_t window_;
  const int32_t n_layers_;
  const bool grouped_;  // group_reads in effect
  // [block][layer] page checksums from the index.
  const std::vector<std::vector<uint64_t>> checksums_;
  std::vector<Read> reads_;          // max_inflight request records
  AlignedBuffer bounce_;             // max_inflight * layer_stride when !direct
  bool bounce_registered_ = false;   // guarded by mu_ after Start
  std::vector<void*> ring_registered_;  // bases of the ring's runs registered with the store

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Slot> slots_;                        // guarded by mu_
  std::deque<Load> todo_;                          // guarded by mu_
  std::vector<Read*> free_reads_;                  // guarded by mu_
  uint64_t inflight_ = 0;                          // guarded by mu_
  uint64_t visit_ = 0;  // the next layer visit WaitLayer serves; guarded by mu_
  Status error_;                                   // guarded by mu_
  bool stopping_ = false;                          // guarded by mu_
  KvStreamStats stats_;                            // guarded by mu_
  std::vector<uint64_t> check_blocks_;             // the step thread's (CheckArrivedLocked)
};

}  // namespace mnemo::tiering
