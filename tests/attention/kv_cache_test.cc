// Page pool and page tables: page boundaries, sharing, copy-on-write,
// truncation and exhaustion.
#include "attention/kv_cache.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <vector>

namespace mnemo::attention {
namespace {

struct Fixture {
  std::unique_ptr<kernels::Backend> backend = kernels::MakeCpuBackend(1);
  kernels::KvLayout layout{4, 2, 8};
  std::unique_ptr<PagePool> pool;
  explicit Fixture(size_t pages) {
    auto p = PagePool::Create(backend.get(), layout, pages * layout.page_bytes());
    EXPECT_TRUE(p.ok());
    pool = std::move(p).value();
  }
};

TEST(PagePool, BudgetBoundsPagesAndRefsFree) {
  Fixture f(3);
  EXPECT_EQ(f.pool->capacity_pages(), 3u);
  EXPECT_EQ(f.layout.page_bytes(), 2u * 4 * 2 * 8 * 2);
  auto a = f.pool->Allocate(), b = f.pool->Allocate(), c = f.pool->Allocate();
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  auto d = f.pool->Allocate();
  EXPECT_EQ(d.status().code(), StatusCode::kResourceExhausted);
  f.pool->Ref(*b);
  f.pool->Unref(*b);
  EXPECT_EQ(f.pool->free_pages(), 0u);
  f.pool->Unref(*b);
  EXPECT_EQ(f.pool->free_pages(), 1u);
  auto e = f.pool->Allocate();
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(*e, *b);  // reused
  // Distinct pages do not overlap.
  std::memset(f.pool->Data(*a), 1, f.pool->page_bytes());
  std::memset(f.pool->Data(*c), 2, f.pool->page_bytes());
  EXPECT_EQ(static_cast<uint8_t*>(f.pool->Data(*a))[f.pool->page_bytes() - 1], 1);
}

long ResidentBytes() {
  long size = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return -1;
  if (std::fscanf(f, "%ld %ld", &size, &resident) != 2) resident = -1;
  std::fclose(f);
  return resident * 4096;
}

TEST(PagePool, ReserveBacksWholeHugePageChunksUpToTheBudget) {
  // The default model's pages (16 tokens, 3 kv heads of 64): 12 KiB, 512 to
  // a 6 MiB chunk of whole 2 MiB huge pages.
  std::unique_ptr<kernels::Backend> backend = kernels::MakeCpuBackend(1);
  const kernels::KvLayout layout{16, 3, 64};
  const size_t page = layout.page_bytes();
  ASSERT_EQ(page, 12288u);
  auto p = PagePool::Create(backend.get(), layout, 1300 * page);  // 2 full chunks and a partial one
  ASSERT_TRUE(p.ok());
  PagePool& pool = **p;
  EXPECT_EQ(pool.reserved_bytes(), 0u);

  const long before = ResidentBytes();
  ASSERT_TRUE(pool.Reserve(7 << 20).ok());  // rounds up to whole chunks: 2 of 6 MiB
  EXPECT_EQ(pool.reserved_bytes(), 1024 * page);
  // Backed now, without a write of ours.
  EXPECT_GE(ResidentBytes() - before, static_cast<long>(1024 * page) * 9 / 10);

  // Pages of the reserved chunks need no new memory; chunks start on a huge page.
  std::vector<PageId> ids;
  for (int i = 0; i < 1024; ++i) {
    auto id = pool.Allocate();
    ASSERT_TRUE(id.ok());
    ids.push_back(*id);
  }
  EXPECT_EQ(pool.reserved_bytes(), 1024 * page);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(pool.Data(ids[0])) % (2u << 20), 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(pool.Data(ids[512])) % (2u << 20), 0u);
  auto more = pool.Allocate();  // the next chunk, allocated on demand
  ASSERT_TRUE(more.ok());
  EXPECT_EQ(pool.reserved_bytes(), 1300 * page);

  // Reserving more than the budget stops at the budget.
  ASSERT_TRUE(pool.Reserve(size_t{1} << 40).ok());
  EXPECT_EQ(pool.reserved_bytes(), 1300 * page);
  EXPECT_EQ(pool.capacity_pages(), 1300u);
}

TEST(PagePool, RejectsBudgetBelowOnePage) {
  auto backend = kernels::MakeCpuBackend(1);
  kernels::KvLayout layout{16, 3, 64};
  EXPECT_EQ(PagePool::Create(backend.get(), layout, 100).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(KvCache, ReservesWholePagesPerLayerAtBoundaries) {
  Fixture f(64);
  KvCache kv(f.pool.get(), 3);
  SeqId s = kv.CreateSeq();
  ASSERT_TRUE(kv.Reserve(s, 4).ok());
  EXPECT_EQ(kv.Get(s)->layers[0].size(), 1u);
  EXPECT_EQ(f.pool->used_pages(), 3u);
  kv.Advance(s, 4);
  ASSERT_TRUE(kv.Reserve(s, 1).ok());  // position 4 opens page 2
  EXPECT_EQ(kv.Get(s)->layers[2].size(), 2u);
  kv.Advance(s, 1);
  ASSERT_TRUE(kv.Reserve(s, 3).ok());  // positions 5..7 fit in page 2
  EXPECT_EQ(kv.Get(s)->layers[1].size(), 2u);
  kv.Advance(s, 3);
  int32_t slot = -1;
  void* p = kv.PageFor(s, 1, 7, &slot);
  EXPECT_EQ(slot, 3);
  EXPECT_EQ(p, f.pool->Data(kv.Get(s)->layers[1][1]));
  ASSERT_TRUE(kv.Truncate(s, 4).ok());
  EXPECT_EQ(f.pool->used_pages(), 3u);
  EXPECT_EQ(*kv.Length(s), 4);
  EXPECT_EQ(kv.Truncate(s, 9).code(), StatusCode::kOutOfRange);
  ASSERT_TRUE(kv.FreeSeq(s).ok());
  EXPECT_EQ(f.pool->used_pages(), 0u);
  EXPECT_EQ(kv.FreeSeq(s).code(), StatusCode::kNotFound);
}

TEST(KvCache, ForkSharesPagesAndCopiesThePartialPageOnWrite) {
  Fixture f(64);
  KvCache kv(f.pool.get(), 2);
  SeqId a = kv.CreateSeq();
  ASSERT_TRUE(kv.Reserve(a, 6).ok());
  kv.Advance(a, 6);
  for (int l = 0; l < 2; ++l)
    for (PageId p : kv.Get(a)->layers[l]) std::memset(f.pool->Data(p), 0x40 + l, f.pool->page_bytes());
  EXPECT_EQ(f.pool->used_pages(), 4u);
  auto b = kv.Fork(a);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(f.pool->used_pages(), 4u);
  EXPECT_EQ(kv.Get(*b)->layers, kv.Get(a)->layers);
  ASSERT_TRUE(kv.Reserve(*b, 1).ok());  // writes into the shared half page
  EXPECT_EQ(f.pool->used_pages(), 6u);
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(kv.Get(*b)->layers[l][0], kv.Get(a)->layers[l][0]);  // full page still shared
    const PageId pb = kv.Get(*b)->layers[l][1], pa = kv.Get(a)->layers[l][1];
    EXPECT_NE(pb, pa);
    EXPECT_EQ(std::memcmp(f.pool->Data(pb), f.pool->Data(pa), f.pool->page_bytes()), 0);
  }
  ASSERT_TRUE(kv.FreeSeq(a).ok());
  EXPECT_EQ(f.pool->used_pages(), 4u);
  ASSERT_TRUE(kv.FreeSeq(*b).ok());
  EXPECT_EQ(f.pool->used_pages(), 0u);
  EXPECT_EQ(kv.Fork(12345).status().code(), StatusCode::kNotFound);
}

TEST(KvCache, ExhaustionIsAllOrNothing) {
  Fixture f(5);
  KvCache kv(f.pool.get(), 2);
  SeqId a = kv.CreateSeq();
  ASSERT_TRUE(kv.Reserve(a, 8).ok());  // 2 pages x 2 layers
  kv.Advance(a, 8);
  Status s = kv.Reserve(a, 1);         // needs 2 more, 1 free
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("exhausted"), std::string_view::npos);
  EXPECT_EQ(kv.Get(a)->layers[0].size(), 2u);
  EXPECT_EQ(f.pool->used_pages(), 4u);
}

TEST(KvCache, AdoptTakesOverFilledPagesAndValidatesTheirCount) {
  Fixture f(8);
  KvCache kv(f.pool.get(), 2);
  std::vector<std::vector<PageId>> layers(2);
  for (auto& l : layers)
    for (int i = 0; i < 2; ++i) l.push_back(*f.pool->Allocate());
  // 6 tokens need 2 pages of 4 per layer; 9 would need 3.
  auto bad = kv.Adopt(layers, 9);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(f.pool->used_pages(), 4u);
  auto wrong_layers = kv.Adopt({layers[0]}, 6);
  EXPECT_EQ(wrong_layers.status().code(), StatusCode::kInvalidArgument);
  auto id = kv.Adopt(layers, 6);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*kv.Length(*id), 6);
  // Writing continues in the partial last page, then a fresh one.
  ASSERT_TRUE(kv.Reserve(*id, 3).ok());
  EXPECT_EQ(kv.Get(*id)->layers[0].size(), 3u);
  ASSERT_TRUE(kv.FreeSeq(*id).ok());
  EXPECT_EQ(f.pool->used_pages(), 0u);
}

}  // namespace
}  // namespace mnemo::attention
