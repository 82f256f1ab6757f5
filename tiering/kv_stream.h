// Streams a session's committed KV through a small ring of T0 pages, layer
// by layer, for sessions larger than memory: a decode step reads layer l's
// pages of every committed block while it computes layer l - 1, l - 2, ...
// The ring has `window` slots of one layer each, used in turn: steps visit
// layers 0..n_layers-1 over and over, visit v lives in slot v % window. A
// step waits for its next layer (WaitLayer), and once it has used it
// (LayerDone) the slot loads the layer of visit v + window, wrapping to the
// next step's first layers. Pages come from T1 when cached, else from T2
// (io_uring); WaitLayer checks each against its XXH3 before the step uses
// it.
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
  uint32_t max_inflight = 256;  // reads submitted at once
};

struct KvStreamStats {
  uint64_t layers_ready = 0;    // WaitLayer found the layer loaded
  uint64_t layers_waited = 0;   // WaitLayer had to wait
  uint64_t stall_ns = 0;        // time spent waiting
  uint64_t pages_read = 0;      // from T2
  uint64_t pages_cached = 0;    // from T1
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
    bool verified = false;   // its pages passed their checksums
  };
  struct Read {
    IoRequest req;
    KvStream* stream = nullptr;
    int32_t slot = 0;
    uint64_t block = 0;  // index into blocks_
    uint8_t* bounce = nullptr;
  };
  KvStream(TierManager* tm, KvStreamOptions options, std::vector<std::vector<uint64_t>> checksums);
  Status Start();
  // Queues the loads of `layer` into `slot`. REQUIRES: mu_ held.
  void LoadLocked(int32_t slot, int32_t layer);
  // Submits queued loads up to max_inflight. REQUIRES: mu_ held.
  void PumpLocked();
  // A page of `slot` is in place (or failed). REQUIRES: mu_ held.
  void PageDoneLocked(int32_t slot, uint64_t block, const Status& status, const uint8_t* data);
  static void OnRead(IoRequest* req);

  // --- constant after construction ---------------------------------------------
  TierManager* const tm_;
  const KvStreamOptions options_;
  const int32_t window_;
  const int32_t n_layers_;
  // [block][layer] page checksums from the index.
  const std::vector<std::vector<uint64_t>> checksums_;
  std::vector<Read> reads_;          // max_inflight request records
  AlignedBuffer bounce_;             // max_inflight * layer_stride when !direct
  bool bounce_registered_ = false;   // guarded by mu_ after Start

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Slot> slots_;                        // guarded by mu_
  std::deque<std::pair<int32_t, uint64_t>> todo_;  // (slot, block) to load; guarded by mu_
  std::vector<Read*> free_reads_;                  // guarded by mu_
  uint64_t inflight_ = 0;                          // guarded by mu_
  uint64_t visit_ = 0;  // the next layer visit WaitLayer serves; guarded by mu_
  Status error_;                                   // guarded by mu_
  bool stopping_ = false;                          // guarded by mu_
  KvStreamStats stats_;                            // guarded by mu_
};

}  // namespace mnemo::tiering
