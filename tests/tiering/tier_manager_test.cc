// TierManager resume loads: pages arrive layer group by layer group, every
// layer reported ready is verified and in place when reported, from T2 and
// from T1 alike; a damaged page stops the load with Corruption before the
// layers it belongs to are reported.
#include "tiering/tier_manager.h"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "tests/testutil/tiny_model.h"
#include "tiering/fault_page_store.h"

namespace mnemo::tiering {
namespace {

constexpr int32_t kLayers = 8;
constexpr int32_t kPageTokens = 16;
constexpr int32_t kKvHeads = 2;
constexpr int32_t kHeadDim = 32;
// One layer page: K and V, fp16.
constexpr size_t kPageBytes = size_t{kPageTokens} * kKvHeads * kHeadDim * 2 * 2;

// A byte of layer `l`, page `p`, at `i`: distinct per page.
uint8_t Pattern(int32_t l, size_t p, size_t i) { return static_cast<uint8_t>(l * 31 + p * 7 + i * 13 + (i >> 8)); }

struct LoadResult {
  Status status;
  std::vector<int32_t> progress;  // on_layers arguments, in order
  bool layers_complete_when_reported = true;
};

class TierManagerTest : public ::testing::Test {
 protected:
  void TearDown() override {
    tier_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  void Open(uint64_t t1_budget, size_t extent_bytes, bool fault = false) {
    TierOptions o;
    o.data_dir = dir_;
    o.t1_budget_bytes = t1_budget;
    o.t2_budget_bytes = 16u << 20;
    o.slab_bytes = 16u << 20;
    o.model_fingerprint = 42;
    o.kv = KvGeometry{kLayers, kPageTokens, kKvHeads, kHeadDim, KvDtype::kF16};
    o.page_bytes = kPageBytes;
    o.load_extent_bytes = extent_bytes;
    o.load_inflight = 5;  // fewer than the extents of a load: the ring wraps
    if (fault) {
      o.wrap_store = [this](std::unique_ptr<PageStore> inner) {
        auto f = std::make_unique<FaultInjectingPageStore>(std::move(inner));
        fault_ = f.get();
        return std::unique_ptr<PageStore>(std::move(f));
      };
    }
    auto t = TierManager::Open(o);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tier_ = std::move(t).value();
  }

  // Persists a session of `tokens` tokens with pattern pages.
  CommittedKv Persist(uint64_t tokens) {
    const size_t pages = BlocksForTokens(tokens, kPageTokens);
    src_.assign(kLayers, std::vector<std::vector<uint8_t>>(pages));
    PersistJob job;
    job.manifest.owner_uid = 1000;
    job.manifest.name = "s";
    job.manifest.tokens.assign(tokens, 7);
    job.kv_tokens = tokens;
    job.pages.resize(kLayers);
    for (int32_t l = 0; l < kLayers; ++l) {
      for (size_t p = 0; p < pages; ++p) {
        src_[l][p].resize(kPageBytes);
        for (size_t i = 0; i < kPageBytes; ++i) src_[l][p][i] = Pattern(l, p, i);
        job.pages[l].push_back(src_[l][p].data());
      }
    }
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    Status status;
    CommittedKv committed;
    tier_->Persist(std::move(job), [&](Status s, CommittedKv c) {
      std::lock_guard<std::mutex> lock(mu);
      status = s;
      committed = std::move(c);
      done = true;
      cv.notify_all();
    });
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
    EXPECT_TRUE(status.ok()) << status.ToString();
    return committed;
  }

  // Loads into fresh page buffers (dst_), checking at every progress report
  // that the layers reported are complete and correct. With aligned_ the
  // pages are 4 KiB aligned, as T0's are, and the reads land in them
  // directly (scatter reads); otherwise they go through a staging buffer.
  LoadResult Load(const CommittedKv& kv) {
    const size_t pages = BlocksForTokens(kv.kv_tokens, kPageTokens);
    dst_.assign(kLayers, std::vector<uint8_t*>(pages));
    unaligned_.assign(kLayers * pages * kPageBytes + 1, 0);
    if (aligned_) {
      auto mem = AlignedBuffer::Allocate(kLayers * pages * kPageBytes);
      EXPECT_TRUE(mem.ok());
      aligned_mem_ = std::move(mem).value();
      std::memset(aligned_mem_.data(), 0, aligned_mem_.size());
    }
    std::vector<std::vector<void*>> dst(kLayers);
    for (int32_t l = 0; l < kLayers; ++l) {
      for (size_t p = 0; p < pages; ++p) {
        const size_t at = (l * pages + p) * kPageBytes;
        // Unaligned: one byte past a 4 KiB boundary at least every other page.
        dst_[l][p] = aligned_ ? aligned_mem_.data() + at : unaligned_.data() + 1 + at;
        dst[l].push_back(dst_[l][p]);
      }
    }
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    LoadResult r;
    tier_->Load(
        "session 's'", kv.blocks, kv.kv_tokens, std::move(dst),
        [&](Status s) {
          std::lock_guard<std::mutex> lock(mu);
          r.status = s;
          done = true;
          cv.notify_all();
        },
        [&](int32_t n) {
          std::lock_guard<std::mutex> lock(mu);
          r.progress.push_back(n);
          for (int32_t l = 0; l < n; ++l)
            for (size_t p = 0; p < pages; ++p)
              if (std::memcmp(dst_[l][p], src_[l][p].data(), kPageBytes) != 0) r.layers_complete_when_reported = false;
        });
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
    return r;
  }

  // Whether the last load's pages hold the persisted bytes.
  bool Loaded() const {
    for (size_t l = 0; l < src_.size(); ++l)
      for (size_t p = 0; p < src_[l].size(); ++p)
        if (l >= dst_.size() || p >= dst_[l].size() || std::memcmp(dst_[l][p], src_[l][p].data(), kPageBytes) != 0)
          return false;
    return true;
  }

  std::string dir_ = testutil::TempDir();
  std::unique_ptr<TierManager> tier_;
  FaultInjectingPageStore* fault_ = nullptr;
  std::vector<std::vector<std::vector<uint8_t>>> src_;
  std::vector<std::vector<uint8_t*>> dst_;
  bool aligned_ = false;
  AlignedBuffer aligned_mem_;
  std::vector<uint8_t> unaligned_;
};

// The load tests, with T0-like aligned pages (direct scatter reads) and
// with unaligned ones (staged).
class TierManagerLoadTest : public TierManagerTest, public ::testing::WithParamInterface<bool> {
 protected:
  void SetUp() override { aligned_ = GetParam(); }
};
INSTANTIATE_TEST_SUITE_P(Pages, TierManagerLoadTest, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& i) { return i.param ? "Aligned" : "Unaligned"; });

TEST_P(TierManagerLoadTest, LoadDeliversLayerGroupsInOrderFromT2) {
  Open(/*t1_budget=*/0, /*extent_bytes=*/3 * kPageBytes, /*fault=*/true);  // groups of 1, 2, 3, 2 layers
  const CommittedKv kv = Persist(100);                                       // 7 blocks, the last partial
  ASSERT_EQ(kv.blocks.size(), 7u);
  // Counts the reads (scatter reads: straight into the pages), injects nothing.
  std::atomic<int> reads{0}, scatter{0};
  FaultRule watch;
  watch.action = FaultRule::Action::kCorruptRead;
  watch.op = IoOp::kRead;
  watch.match = [&](const IoRequest& r) {
    ++reads;
    if (r.iov_count > 0) ++scatter;
    return false;
  };
  fault_->AddFault(watch);
  LoadResult r = Load(kv);
  ASSERT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_EQ(r.progress, (std::vector<int32_t>{1, 3, 6, 8}));
  EXPECT_TRUE(r.layers_complete_when_reported);
  EXPECT_TRUE(Loaded());
  EXPECT_EQ(tier_->stats().t1_hits, 0u);
  EXPECT_EQ(reads.load(), 4 * 7);  // four layer groups of seven blocks
  EXPECT_EQ(scatter.load(), aligned_ ? 3 * 7 : 0);  // one-layer extents read plainly
}

TEST_P(TierManagerLoadTest, WholeBlockExtentsLoadInOneGroupAndFillT1) {
  Open(/*t1_budget=*/4u << 20, /*extent_bytes=*/size_t{1} << 20);
  const CommittedKv kv = Persist(40);
  LoadResult r = Load(kv);  // written blocks are cached: T1 hits
  ASSERT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_EQ(r.progress, (std::vector<int32_t>{kLayers}));
  EXPECT_TRUE(r.layers_complete_when_reported);
  EXPECT_TRUE(Loaded());
  EXPECT_GE(tier_->stats().t1_hits, kv.blocks.size());
}

TEST_P(TierManagerLoadTest, LoadFromT1InLayerGroupsMatches) {
  Open(/*t1_budget=*/4u << 20, /*extent_bytes=*/kPageBytes);  // one layer per group
  const CommittedKv kv = Persist(70);
  LoadResult r = Load(kv);
  ASSERT_TRUE(r.status.ok()) << r.status.ToString();
  std::vector<int32_t> expected;
  for (int32_t l = 1; l <= kLayers; ++l) expected.push_back(l);
  EXPECT_EQ(r.progress, expected);
  EXPECT_TRUE(r.layers_complete_when_reported);
  EXPECT_TRUE(Loaded());
}

TEST_P(TierManagerLoadTest, CorruptPageStopsTheLoadBeforeItsLayersAreReported) {
  Open(/*t1_budget=*/0, /*extent_bytes=*/2 * kPageBytes, /*fault=*/true);  // groups: 1, 3, 5, 7, 8
  const CommittedKv kv = Persist(64);  // 4 blocks
  ASSERT_NE(fault_, nullptr);
  // Every read of block 1's layers 5-6 comes back with a byte of layer 5's
  // page flipped (a bad disk copy: the re-read fails as well).
  const BlockSlot victim = kv.blocks[1];
  FaultRule rule;
  rule.action = FaultRule::Action::kCorruptRead;
  rule.op = IoOp::kRead;
  rule.times = 0;
  rule.match = [victim](const IoRequest& r) { return r.slot == victim && r.offset == 5 * kPageBytes; };
  rule.corrupt_offset = 5;
  fault_->AddFault(rule);
  LoadResult r = Load(kv);
  ASSERT_EQ(r.status.code(), StatusCode::kCorruption) << r.status.ToString();
  EXPECT_NE(r.status.message().find("session 's'"), std::string::npos) << r.status.ToString();
  EXPECT_NE(r.status.message().find("layer 5"), std::string::npos) << r.status.ToString();
  EXPECT_EQ(r.progress, (std::vector<int32_t>{1, 3, 5}));
  EXPECT_TRUE(r.layers_complete_when_reported);
  // Once the disk gives the true bytes, the same load succeeds.
  fault_->ClearFaults();
  LoadResult again = Load(kv);
  ASSERT_TRUE(again.status.ok()) << again.status.ToString();
  EXPECT_TRUE(Loaded());
}

TEST_P(TierManagerLoadTest, OneBadReadIsHealedByReadingAgain) {
  Open(/*t1_budget=*/0, /*extent_bytes=*/2 * kPageBytes, /*fault=*/true);
  const CommittedKv kv = Persist(64);
  ASSERT_NE(fault_, nullptr);
  const BlockSlot victim = kv.blocks[2];
  FaultRule rule;
  rule.action = FaultRule::Action::kCorruptRead;
  rule.op = IoOp::kRead;
  rule.times = 1;
  rule.match = [victim](const IoRequest& r) { return r.slot == victim && r.offset == 3 * kPageBytes; };
  fault_->AddFault(rule);
  LoadResult r = Load(kv);
  ASSERT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_EQ(fault_->faults_fired(), 1u);
  EXPECT_TRUE(Loaded());
}

// A ring of `window` layer slots over the first `blocks` blocks of `kv`.
struct Ring {
  std::vector<std::vector<void*>> ptrs;
  AlignedBuffer mem;
};
Ring MakeRing(int32_t window, size_t blocks) {
  Ring r;
  auto mem = AlignedBuffer::Allocate(size_t(window) * blocks * kPageBytes);
  EXPECT_TRUE(mem.ok());
  r.mem = std::move(mem).value();
  r.ptrs.assign(window, {});
  for (int32_t s = 0; s < window; ++s)
    for (size_t b = 0; b < blocks; ++b) r.ptrs[s].push_back(r.mem.data() + (s * blocks + b) * kPageBytes);
  return r;
}

// A manifest from a daemon with another page size is refused with the
// flag that resumes it; one from another geometry, plainly.
TEST_F(TierManagerTest, AnotherKvLayoutIsRefusedNamingThePageSizeFlag) {
  Open(0, 1 << 20);
  Manifest m;
  m.owner_uid = 1000;
  m.name = "s";
  tier_->Stamp(&m);
  EXPECT_TRUE(tier_->CheckCompatible(m).ok());
  Manifest pages = m;
  pages.kv.page_tokens = 64;
  const Status st = tier_->CheckCompatible(pages);
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("--page-tokens 64"), std::string_view::npos) << st.ToString();
  Manifest layers = pages;
  layers.kv.n_layers = kLayers + 1;
  const Status st2 = tier_->CheckCompatible(layers);
  EXPECT_EQ(st2.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(st2.message().find("--page-tokens"), std::string_view::npos) << st2.ToString();
  EXPECT_NE(st2.message().find("cannot be resumed"), std::string_view::npos) << st2.ToString();
}

TEST_F(TierManagerTest, DataDirPageTokensReadsThePageSizeTheDirectoryWasCreatedWith) {
  KvGeometry kv{kLayers, 64, kKvHeads, kHeadDim, KvDtype::kF16};
  auto none = DataDirPageTokens(dir_, kv);
  ASSERT_TRUE(none.ok()) << none.status().ToString();
  EXPECT_FALSE(none->has_value());  // no page store yet

  Open(0, 1 << 20);  // kPageTokens: pages of exactly the I/O alignment
  // Another default (64): the directory's own size, the one that fills the
  // alignment (1 to 15 tokens make the same padded block).
  auto stored = DataDirPageTokens(dir_, kv);
  ASSERT_TRUE(stored.ok()) << stored.status().ToString();
  ASSERT_TRUE(stored->has_value());
  EXPECT_EQ(**stored, kPageTokens);
  // A size that makes the same block is taken as asked.
  kv.page_tokens = 8;
  stored = DataDirPageTokens(dir_, kv);
  ASSERT_TRUE(stored.ok() && stored->has_value());
  EXPECT_EQ(**stored, 8);
  // Another model's geometry makes no such block.
  kv.n_layers = kLayers + 1;
  const auto other = DataDirPageTokens(dir_, kv);
  EXPECT_EQ(other.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(other.status().message().find("another model"), std::string_view::npos) << other.status().ToString();
}

TEST_F(TierManagerTest, StreamServesEveryLayerStepAfterStepThroughASmallRing) {
  Open(/*t1_budget=*/0, /*extent_bytes=*/kPageBytes);
  const CommittedKv kv = Persist(112);  // 7 full blocks
  // Grouped reads (one scatter read per block for a group of layers; window
  // 3 of 8 layers wraps, so some groups split in two runs) and one read per
  // page.
  for (bool grouped : {true, false})
  for (int32_t window : {1, 2, 3, kLayers}) {
    SCOPED_TRACE(testing::Message() << (grouped ? "grouped" : "per page") << ", window " << window);
    Ring ring = MakeRing(window, kv.blocks.size());
    KvStreamOptions o;
    o.label = "session 's'";
    o.blocks = kv.blocks;
    o.window = window;
    o.ring = ring.ptrs;
    o.group_reads = grouped;
    o.max_inflight = 4;
    auto stream = tier_->OpenStream(o);
    ASSERT_TRUE(stream.ok()) << stream.status().ToString();
    for (int step = 0; step < 3; ++step) {
      for (int32_t l = 0; l < kLayers; ++l) {
        ASSERT_TRUE((*stream)->WaitLayer(l).ok()) << "window " << window << " step " << step << " layer " << l;
        const size_t slot = static_cast<size_t>(step * kLayers + l) % static_cast<size_t>(window);
        for (size_t b = 0; b < kv.blocks.size(); ++b)
          ASSERT_EQ(std::memcmp(ring.ptrs[slot][b], src_[l][b].data(), kPageBytes), 0)
              << "window " << window << " step " << step << " layer " << l << " block " << b;
        (*stream)->LayerDone(l);
      }
    }
    const KvStreamStats st = (*stream)->stats();
    EXPECT_EQ(st.layers_ready + st.layers_waited, 3u * kLayers);
    // The whole ring is loaded once; smaller rings reload every layer per
    // step, and may have begun the next step's first `window` layers.
    const uint64_t loads = window == kLayers ? kLayers : 3u * kLayers;
    const uint64_t ahead = window == kLayers ? 0 : static_cast<uint64_t>(window);
    EXPECT_GE(st.pages_read + st.pages_cached, loads * kv.blocks.size()) << "window " << window;
    EXPECT_LE(st.pages_read + st.pages_cached, (loads + ahead) * kv.blocks.size()) << "window " << window;
    EXPECT_EQ(st.pages_cached, 0u) << "no T1";
    // The ring (one allocation) is one run, registered with io_uring: the
    // pages above came through fixed-buffer reads into it.
    if (tier_->engine_name() == "io_uring") {
      EXPECT_EQ(st.registered_runs, 1u);
    }
    if (grouped && window > 1) {
      // At most two runs per group and block (a group that wraps past the
      // last layer), one for a ring that holds every layer.
      EXPECT_LT(st.reads, st.pages_read);
      if (window == kLayers) {
        EXPECT_EQ(st.reads, kv.blocks.size());
      }
      if (window == 2) {
        EXPECT_EQ(st.reads * 2, st.pages_read);
      }
    } else {
      EXPECT_EQ(st.reads, st.pages_read);
    }
    (*stream)->Stop();
  }
}

TEST_F(TierManagerTest, StreamGroupedReadsMixT1AndT2Pages) {
  // T1 holds some of the blocks: their pages are copied from it, the rest
  // come from T2 in grouped reads; every step sees the same bytes.
  Open(/*t1_budget=*/4 * kLayers * kPageBytes, /*extent_bytes=*/kPageBytes);
  const CommittedKv kv = Persist(160);  // 10 full blocks
  Ring ring = MakeRing(2, kv.blocks.size());
  KvStreamOptions o;
  o.label = "session 's'";
  o.blocks = kv.blocks;
  o.window = 2;
  o.ring = ring.ptrs;
  o.group_reads = true;
  o.max_inflight = 3;
  auto stream = tier_->OpenStream(o);
  ASSERT_TRUE(stream.ok()) << stream.status().ToString();
  for (int step = 0; step < 2; ++step) {
    for (int32_t l = 0; l < kLayers; ++l) {
      ASSERT_TRUE((*stream)->WaitLayer(l).ok()) << "step " << step << " layer " << l;
      for (size_t b = 0; b < kv.blocks.size(); ++b)
        ASSERT_EQ(std::memcmp(ring.ptrs[l % 2][b], src_[l][b].data(), kPageBytes), 0)
            << "step " << step << " layer " << l << " block " << b;
      (*stream)->LayerDone(l);
    }
  }
  (*stream)->Stop();
  const KvStreamStats st = (*stream)->stats();
  EXPECT_GE(st.pages_read + st.pages_cached, 2u * kLayers * kv.blocks.size());
  EXPECT_LE(st.pages_read + st.pages_cached, (2u * kLayers + 2) * kv.blocks.size());
  EXPECT_LE(st.reads * 2, st.pages_read + 2 * kv.blocks.size()) << "T2 pages come two to a read";
}

TEST_F(TierManagerTest, StreamOutOfOrderAndCorruptPagesAreTypedErrors) {
  Open(/*t1_budget=*/0, /*extent_bytes=*/kPageBytes, /*fault=*/true);
  const CommittedKv kv = Persist(64);
  Ring ring = MakeRing(2, kv.blocks.size());
  KvStreamOptions o;
  o.label = "session 's'";
  o.blocks = kv.blocks;
  o.window = 2;
  o.ring = ring.ptrs;
  {
    auto stream = tier_->OpenStream(o);
    ASSERT_TRUE(stream.ok());
    EXPECT_EQ((*stream)->WaitLayer(3).code(), StatusCode::kInternal) << "layer 0 comes first";
    EXPECT_EQ((*stream)->WaitLayer(kLayers).code(), StatusCode::kInvalidArgument);
  }
  // Layer 3 of block 2 reads back damaged: found when layer 3 is waited for.
  const BlockSlot victim = kv.blocks[2];
  FaultRule rule;
  rule.action = FaultRule::Action::kCorruptRead;
  rule.op = IoOp::kRead;
  rule.times = 0;
  // Grouped reads take layers 2 and 3 of a block in one request.
  rule.match = [victim](const IoRequest& r) {
    return r.slot == victim && r.offset <= 3 * kPageBytes && 3 * kPageBytes < r.offset + r.length;
  };
  rule.corrupt_offset = 3 * kPageBytes + 5;  // modulo the request's length: inside layer 3's page
  fault_->AddFault(rule);
  auto stream = tier_->OpenStream(o);
  ASSERT_TRUE(stream.ok());
  Status s;
  int32_t l = 0;
  for (; l < kLayers; ++l) {
    s = (*stream)->WaitLayer(l);
    if (!s.ok()) break;
    (*stream)->LayerDone(l);
  }
  EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
  EXPECT_LE(l, 3) << "layer 3 was reported ready";
  EXPECT_NE(s.message().find("session 's'"), std::string::npos);
  EXPECT_NE(s.message().find("layer 3"), std::string::npos);
  EXPECT_EQ((*stream)->WaitLayer(l).code(), StatusCode::kCorruption) << "the error sticks";
  (*stream)->Stop();
}

TEST_F(TierManagerTest, OpenStreamRejectsABadRing) {
  Open(/*t1_budget=*/0, /*extent_bytes=*/kPageBytes);
  const CommittedKv kv = Persist(32);
  Ring ring = MakeRing(2, kv.blocks.size());
  KvStreamOptions o;
  o.blocks = kv.blocks;
  o.window = 3;  // the ring has 2 slots
  o.ring = ring.ptrs;
  EXPECT_EQ(tier_->OpenStream(o).status().code(), StatusCode::kInvalidArgument);
  o.window = 0;
  EXPECT_EQ(tier_->OpenStream(o).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mnemo::tiering
