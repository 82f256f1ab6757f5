// Paged KV cache: a bounded pool of fixed-size KV pages in backend memory and
// per-sequence page tables (per layer, the ordered page ids). Attention reads
// KV only through these tables, so a page can live anywhere.
//
// Thread-compatible: owned and driven by the engine's step thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "kernels/backend.h"

namespace mnemo::attention {

using PageId = uint32_t;
using SeqId = int64_t;

// Fixed-size pages carved from lazily allocated chunks of backend memory, up
// to a byte budget. Pages are reference-counted so forked sequences share
// them.
class PagePool {
 public:
  // budget_bytes is rounded down to whole pages; at least one page.
  static Result<std::unique_ptr<PagePool>> Create(kernels::Backend* backend,
                                                  kernels::KvLayout layout,
                                                  size_t budget_bytes);
  ~PagePool();
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  // Allocates the memory of the first `bytes` of the budget (whole chunks,
  // at most the budget) and has the backend back it now, so that the pages
  // it holds cost no page faults when first used and a budget the host
  // cannot back fails here rather than under load. ResourceExhausted when
  // the backend is out of memory.
  Status Reserve(size_t bytes);
  size_t reserved_bytes() const { return chunks_bytes_; }

  // A free page with refcount 1, or ResourceExhausted when the budget is used
  // up (or the backend is out of memory).
  Result<PageId> Allocate();
  void Ref(PageId id);
  // Frees the page when the count drops to zero.
  void Unref(PageId id);
  uint32_t RefCount(PageId id) const { return refs_[id]; }
  // Copies the bytes of page src into page dst.
  void CopyPage(PageId dst, PageId src);

  void* Data(PageId id) const {
    return chunks_[id / pages_per_chunk_] + static_cast<size_t>(id % pages_per_chunk_) * page_bytes_;
  }
  const kernels::KvLayout& layout() const { return layout_; }
  size_t page_bytes() const { return page_bytes_; }
  size_t capacity_pages() const { return capacity_; }
  size_t used_pages() const { return used_; }
  size_t free_pages() const { return capacity_ - used_; }

 private:
  PagePool(kernels::Backend* backend, kernels::KvLayout layout, size_t capacity);

  // constant after construction
  kernels::Backend* const backend_;
  const kernels::KvLayout layout_;
  const size_t page_bytes_;
  const size_t capacity_;
  // Pages per chunk: whole 2 MiB huge pages where the page size allows it
  // (see ChunkPages), else 256.
  const size_t pages_per_chunk_;

  Status AddChunk();

  std::vector<uint8_t*> chunks_;
  size_t chunks_bytes_ = 0;
  std::vector<uint32_t> refs_;     // per allocated id
  std::vector<PageId> free_list_;  // ids whose refcount is zero
  size_t used_ = 0;
  std::vector<uint8_t> bounce_;  // host staging for CopyPage
};

// The KV of one sequence: for each layer the ordered pages holding its tokens.
struct SeqKv {
  int64_t n_tokens = 0;                      // tokens with KV written
  std::vector<std::vector<PageId>> layers;   // [layer][page index]
};

// Sequences over a PagePool.
class KvCache {
 public:
  KvCache(PagePool* pool, int32_t n_layers) : pool_(pool), n_layers_(n_layers) {}
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  SeqId CreateSeq();
  // A new sequence sharing all of `src`'s pages (no KV copy). The partially
  // filled last page is copied on the first write of either sequence.
  Result<SeqId> Fork(SeqId src);
  // A sequence made of pages the caller allocated and filled (a session
  // resumed from storage). Takes over one reference of every page.
  // InvalidArgument unless every layer has ceil(n_tokens / page_tokens)
  // pages; on error the references stay with the caller.
  Result<SeqId> Adopt(std::vector<std::vector<PageId>> layers, int64_t n_tokens);
  Status FreeSeq(SeqId id);
  // Drops tokens at positions >= n_tokens (pages past them are released).
  Status Truncate(SeqId id, int64_t n_tokens);
  bool Has(SeqId id) const { return seqs_.count(id) != 0; }
  Result<int64_t> Length(SeqId id) const;
  const SeqKv* Get(SeqId id) const;

  // Makes room for `n_new` more tokens on every layer: allocates pages and
  // un-shares a shared last page that will be written. When the budget is
  // short, fails with ResourceExhausted before changing anything; if the
  // backend itself runs out of memory midway, Truncate(id, length) releases
  // the pages added so far.
  Status Reserve(SeqId id, int64_t n_new);
  // Records that `n` more tokens were written (after Reserve).
  void Advance(SeqId id, int64_t n);

  // Page and slot where token position `pos` of `id` lives on `layer`;
  // the position must be reserved.
  void* PageFor(SeqId id, int32_t layer, int64_t pos, int32_t* slot) const;

  PagePool* pool() const { return pool_; }
  int32_t n_layers() const { return n_layers_; }
  size_t n_seqs() const { return seqs_.size(); }

 private:
  PagePool* const pool_;
  const int32_t n_layers_;
  SeqId next_id_ = 1;
  std::unordered_map<SeqId, SeqKv> seqs_;
};

}  // namespace mnemo::attention
