// Page pool bookkeeping and page-table maintenance.
#include "attention/kv_cache.h"

#include <algorithm>
#include <numeric>

namespace mnemo::attention {
namespace {

// Chunks are allocated as the pool fills. A chunk that spans whole 2 MiB
// huge pages lets the backend back it with them (the CPU backend asks for
// transparent huge pages): filling a resumed session's pages then costs a
// fault per 2 MiB instead of per 4 KiB. The smallest such chunk, when it is
// at most 8 MiB; else 256 pages.
size_t ChunkPages(size_t page_bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t span = std::lcm(page_bytes, kHuge);
  if (span <= 4 * kHuge) return span / page_bytes;
  return 256;
}

}  // namespace

PagePool::PagePool(kernels::Backend* backend, kernels::KvLayout layout, size_t capacity)
    : backend_(backend),
      layout_(layout),
      page_bytes_(layout.page_bytes()),
      capacity_(capacity),
      pages_per_chunk_(ChunkPages(layout.page_bytes())) {}

Result<std::unique_ptr<PagePool>> PagePool::Create(kernels::Backend* backend,
                                                   kernels::KvLayout layout,
                                                   size_t budget_bytes) {
  if (layout.page_tokens <= 0 || layout.n_kv_heads <= 0 || layout.head_dim <= 0)
    return Status::InvalidArgument("invalid KV page layout");
  size_t capacity = budget_bytes / layout.page_bytes();
  if (capacity == 0)
    return Status::InvalidArgument("KV budget of " + std::to_string(budget_bytes) +
                                   " bytes is smaller than one page (" +
                                   std::to_string(layout.page_bytes()) + " bytes)");
  if (capacity > (size_t{1} << 31)) capacity = size_t{1} << 31;
  return std::unique_ptr<PagePool>(new PagePool(backend, layout, capacity));
}

PagePool::~PagePool() {
  for (uint8_t* c : chunks_) backend_->FreeBuffer(c);
}

Result<PageId> PagePool::Allocate() {
  if (!free_list_.empty()) {
    PageId id = free_list_.back();
    free_list_.pop_back();
    refs_[id] = 1;
    ++used_;
    return id;
  }
  if (refs_.size() >= capacity_)
    return Status::ResourceExhausted("KV page pool exhausted: all " + std::to_string(capacity_) +
                                     " pages (" + std::to_string(capacity_ * page_bytes_) +
                                     " bytes) in use");
  if (refs_.size() == chunks_.size() * pages_per_chunk_) MNEMO_RETURN_IF_ERROR(AddChunk());
  PageId id = static_cast<PageId>(refs_.size());
  refs_.push_back(1);
  ++used_;
  return id;
}

Status PagePool::AddChunk() {
  const size_t pages = std::min(pages_per_chunk_, capacity_ - chunks_.size() * pages_per_chunk_);
  void* p = backend_->AllocBuffer(pages * page_bytes_);
  if (p == nullptr) return Status::ResourceExhausted("backend out of memory allocating KV pages");
  chunks_.push_back(static_cast<uint8_t*>(p));
  chunks_bytes_ += pages * page_bytes_;
  return Status::Ok();
}

Status PagePool::Reserve(size_t bytes) {
  const size_t want = std::min(capacity_, (bytes + page_bytes_ - 1) / page_bytes_);
  while (chunks_.size() * pages_per_chunk_ < want) {
    const size_t before = chunks_bytes_;
    MNEMO_RETURN_IF_ERROR(AddChunk());
    backend_->Prefault(chunks_.back(), chunks_bytes_ - before);
  }
  return Status::Ok();
}

void PagePool::Ref(PageId id) {
  MNEMO_CHECK(id < refs_.size() && refs_[id] > 0);
  ++refs_[id];
}

void PagePool::CopyPage(PageId dst, PageId src) {
  // Stage through the host so that any backend's memory works; this runs once
  // per fork and layer, not per token.
  bounce_.resize(page_bytes_);
  backend_->CopyToHost(bounce_.data(), Data(src), page_bytes_);
  backend_->CopyFromHost(Data(dst), bounce_.data(), page_bytes_);
}

void PagePool::Unref(PageId id) {
  MNEMO_CHECK(id < refs_.size() && refs_[id] > 0);
  if (--refs_[id] == 0) {
    free_list_.push_back(id);
    --used_;
  }
}

KvCache::~KvCache() {
  for (auto& [id, s] : seqs_)
    for (auto& layer : s.layers)
      for (PageId p : layer) pool_->Unref(p);
}

SeqId KvCache::CreateSeq() {
  SeqId id = next_id_++;
  SeqKv s;
  s.layers.resize(n_layers_);
  seqs_.emplace(id, std::move(s));
  return id;
}

Result<SeqId> KvCache::Fork(SeqId src) {
  auto it = seqs_.find(src);
  if (it == seqs_.end()) return Status::NotFound("no KV sequence " + std::to_string(src));
  SeqKv copy = it->second;
  for (auto& layer : copy.layers)
    for (PageId p : layer) pool_->Ref(p);
  SeqId id = next_id_++;
  seqs_.emplace(id, std::move(copy));
  return id;
}

Result<SeqId> KvCache::Adopt(std::vector<std::vector<PageId>> layers, int64_t n_tokens) {
  if (static_cast<int32_t>(layers.size()) != n_layers_)
    return Status::InvalidArgument("adopted KV has " + std::to_string(layers.size()) + " layers, cache has " +
                                   std::to_string(n_layers_));
  const int32_t pt = pool_->layout().page_tokens;
  if (n_tokens < 0) return Status::InvalidArgument("negative token count");
  const size_t pages = static_cast<size_t>((n_tokens + pt - 1) / pt);
  for (const auto& layer : layers)
    if (layer.size() != pages)
      return Status::InvalidArgument("adopted KV layer has " + std::to_string(layer.size()) + " pages for " +
                                     std::to_string(n_tokens) + " tokens");
  SeqKv s;
  s.n_tokens = n_tokens;
  s.layers = std::move(layers);
  SeqId id = next_id_++;
  seqs_.emplace(id, std::move(s));
  return id;
}

Status KvCache::FreeSeq(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return Status::NotFound("no KV sequence " + std::to_string(id));
  for (auto& layer : it->second.layers)
    for (PageId p : layer) pool_->Unref(p);
  seqs_.erase(it);
  return Status::Ok();
}

Status KvCache::Truncate(SeqId id, int64_t n_tokens) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return Status::NotFound("no KV sequence " + std::to_string(id));
  SeqKv& s = it->second;
  if (n_tokens < 0 || n_tokens > s.n_tokens)
    return Status::OutOfRange("truncate to " + std::to_string(n_tokens) + " of " +
                              std::to_string(s.n_tokens) + " tokens");
  const int32_t pt = pool_->layout().page_tokens;
  size_t keep = static_cast<size_t>((n_tokens + pt - 1) / pt);
  for (auto& layer : s.layers) {
    while (layer.size() > keep) {
      pool_->Unref(layer.back());
      layer.pop_back();
    }
  }
  s.n_tokens = n_tokens;
  return Status::Ok();
}

Result<int64_t> KvCache::Length(SeqId id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return Status::NotFound("no KV sequence " + std::to_string(id));
  return it->second.n_tokens;
}

const SeqKv* KvCache::Get(SeqId id) const {
  auto it = seqs_.find(id);
  return it == seqs_.end() ? nullptr : &it->second;
}

Status KvCache::Reserve(SeqId id, int64_t n_new) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return Status::NotFound("no KV sequence " + std::to_string(id));
  SeqKv& s = it->second;
  if (n_new <= 0) return Status::Ok();
  const int32_t pt = pool_->layout().page_tokens;
  const size_t have = s.layers.empty() ? 0 : s.layers[0].size();
  const size_t need = static_cast<size_t>((s.n_tokens + n_new + pt - 1) / pt);
  // A shared, partially filled last page gets written: it needs a private copy.
  const bool cow = (s.n_tokens % pt) != 0 && have > 0;
  size_t new_pages = (need > have ? need - have : 0) * n_layers_;
  size_t cow_pages = 0;
  if (cow)
    for (int32_t l = 0; l < n_layers_; ++l)
      if (pool_->RefCount(s.layers[l][have - 1]) > 1) ++cow_pages;
  if (new_pages + cow_pages > pool_->free_pages())
    return Status::ResourceExhausted(
        "KV page pool exhausted: sequence needs " + std::to_string(new_pages + cow_pages) +
        " more pages, " + std::to_string(pool_->free_pages()) + " free of " +
        std::to_string(pool_->capacity_pages()));
  if (cow) {
    for (int32_t l = 0; l < n_layers_; ++l) {
      PageId old = s.layers[l][have - 1];
      if (pool_->RefCount(old) == 1) continue;
      // Counted above, but the backend may still be out of memory.
      MNEMO_ASSIGN_OR_RETURN(PageId fresh_id, pool_->Allocate());
      pool_->CopyPage(fresh_id, old);
      pool_->Unref(old);
      s.layers[l][have - 1] = fresh_id;
    }
  }
  for (int32_t l = 0; l < n_layers_; ++l) {
    while (s.layers[l].size() < need) {
      // On failure the caller's Truncate() releases what was added.
      MNEMO_ASSIGN_OR_RETURN(PageId page, pool_->Allocate());
      s.layers[l].push_back(page);
    }
  }
  return Status::Ok();
}

void KvCache::Advance(SeqId id, int64_t n) {
  auto it = seqs_.find(id);
  MNEMO_CHECK(it != seqs_.end());
  SeqKv& s = it->second;
  const int32_t pt = pool_->layout().page_tokens;
  MNEMO_CHECK(s.layers.empty() ||
              static_cast<int64_t>(s.layers[0].size()) * pt >= s.n_tokens + n);
  s.n_tokens += n;
}

void* KvCache::PageFor(SeqId id, int32_t layer, int64_t pos, int32_t* slot) const {
  const SeqKv& s = seqs_.at(id);
  const int32_t pt = pool_->layout().page_tokens;
  *slot = static_cast<int32_t>(pos % pt);
  return pool_->Data(s.layers[layer][static_cast<size_t>(pos / pt)]);
}

}  // namespace mnemo::attention
