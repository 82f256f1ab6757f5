// T2 page store: io_uring and pread engines under the same tests (roundtrips
// of blocks and layer pages, the overflow path, capacity and budget, reopen,
// Sync, validation, shutdown), then the fault-injecting wrapper over each.
#include "tiering/page_store.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "tiering/fault_page_store.h"
#include "tiering/layout.h"

namespace mnemo::tiering {
namespace {

using Engine = PageStoreOptions::Engine;

// SmolLM2-135M geometry: 30 layers of 12 KiB pages, 360 KiB blocks.
BlockLayout TestLayout() {
  kernels::KvLayout kv;
  kv.page_tokens = 16;
  kv.n_kv_heads = 3;
  kv.head_dim = 64;
  auto b = BlockLayout::For(kv, 30);
  MNEMO_CHECK(b.ok());
  return *b;
}

uint64_t SplitMix(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void Fill(void* buf, size_t n, uint64_t seed) {
  auto* p = static_cast<uint8_t*>(buf);
  uint64_t x = seed;
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t v = SplitMix(x);
    std::memcpy(p + i, &v, std::min<size_t>(8, n - i));
  }
}

AlignedBuffer Buffer(size_t n) {
  auto b = AlignedBuffer::Allocate(n);
  MNEMO_CHECK(b.ok());
  return std::move(b).value();
}

// Counts callbacks; lets a test wait for a number of them.
struct Completions {
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  int errors = 0;
  std::vector<std::thread::id> threads;

  static void Callback(IoRequest* r) {
    auto* c = static_cast<Completions*>(r->user);
    std::lock_guard<std::mutex> l(c->mu);
    ++c->done;
    if (!r->status.ok()) ++c->errors;
    c->threads.push_back(std::this_thread::get_id());
    c->cv.notify_all();
  }
  void WaitFor(int n) {
    std::unique_lock<std::mutex> l(mu);
    ASSERT_TRUE(cv.wait_for(l, std::chrono::seconds(60), [&] { return done >= n; }))
        << done << " of " << n << " completions";
  }
};

std::string EngineName(Engine e) { return e == Engine::kUring ? "Uring" : "Pread"; }

class PageStoreTest : public ::testing::TestWithParam<Engine> {
 protected:
  void SetUp() override {
    layout_ = TestLayout();
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string(info->test_suite_name()) + "_" + info->name();
    std::replace(name.begin(), name.end(), '/', '_');
    dir_ = std::string(MNEMO_BINARY_DIR) + "/test-tmp/page_store/" + name + "_" + std::to_string(::getpid());
    std::filesystem::remove_all(dir_);
    options_.dir = dir_;
    options_.block_bytes = layout_.block_bytes;
    options_.slab_bytes = 4 * layout_.block_bytes;
    options_.budget_bytes = 16 * layout_.block_bytes;
    options_.queue_depth = 4;
    options_.pread_threads = 2;
    options_.engine = GetParam();
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  // Opens into store_; false (test skipped) when this machine lacks the engine
  // or O_DIRECT on the test directory's file system.
  bool Open() {
    store_.reset();
    auto s = OpenPageStore(options_);
    if (!s.ok() && s.status().code() == StatusCode::kUnsupported) {
      skip_reason_ = s.status().ToString();
      return false;
    }
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    if (!s.ok()) return false;
    store_ = std::move(s).value();
    return true;
  }

  BlockLayout layout_;
  std::string dir_;
  PageStoreOptions options_;
  std::unique_ptr<PageStore> store_;
  std::string skip_reason_;
};

#define OPEN_OR_SKIP()                 \
  do {                                 \
    if (!Open()) {                     \
      if (!skip_reason_.empty()) {     \
        GTEST_SKIP() << skip_reason_;  \
      }                                \
      return;                          \
    }                                  \
  } while (0)

TEST_P(PageStoreTest, OpensTheRequestedEngine) {
  OPEN_OR_SKIP();
  EXPECT_EQ(store_->engine_name(), GetParam() == Engine::kUring ? "io_uring" : "pread");
  EXPECT_EQ(store_->block_bytes(), layout_.block_bytes);
  EXPECT_EQ(store_->capacity_slots(), 0u);
  EXPECT_EQ(store_->max_slots(), 16u);
}

TEST_P(PageStoreTest, WholeBlocksRoundtripAtRandomSlots) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(16).ok());
  const size_t bb = layout_.block_bytes;
  AlignedBuffer out = Buffer(16 * bb), in = Buffer(16 * bb);
  std::vector<BlockSlot> slots(16);
  std::iota(slots.begin(), slots.end(), 0);
  std::mt19937 rng(7);
  std::shuffle(slots.begin(), slots.end(), rng);
  std::vector<const void*> wbufs;
  std::vector<void*> rbufs;
  for (size_t i = 0; i < slots.size(); ++i) {
    Fill(out.data() + i * bb, bb, 1000 + slots[i]);
    wbufs.push_back(out.data() + i * bb);
    rbufs.push_back(in.data() + i * bb);
  }
  ASSERT_TRUE(store_->WriteBlocks(slots, wbufs).ok());
  std::shuffle(slots.begin(), slots.end(), rng);
  ASSERT_TRUE(store_->ReadBlocks(slots, rbufs).ok());
  AlignedBuffer expect = Buffer(bb);
  for (size_t i = 0; i < slots.size(); ++i) {
    Fill(expect.data(), bb, 1000 + slots[i]);
    ASSERT_EQ(std::memcmp(in.data() + i * bb, expect.data(), bb), 0) << "slot " << slots[i];
  }
  const PageStoreStats st = store_->stats();
  EXPECT_EQ(st.writes, 16u);
  EXPECT_EQ(st.reads, 16u);
  EXPECT_EQ(st.write_bytes, 16 * bb);
  EXPECT_EQ(st.errors, 0u);
}

TEST_P(PageStoreTest, SingleLayerPagesAreAddressable) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(8).ok());
  const size_t bb = layout_.block_bytes;
  const size_t stride = layout_.layer_stride;
  // A model of the store's content, updated alongside.
  std::vector<AlignedBuffer> model;
  for (BlockSlot s = 0; s < 8; ++s) {
    model.push_back(Buffer(bb));
    Fill(model.back().data(), bb, s);
    ASSERT_TRUE(store_->Write(s, 0, bb, model.back().data()).ok());
  }
  std::mt19937 rng(11);
  AlignedBuffer page = Buffer(stride);
  for (int i = 0; i < 40; ++i) {
    const BlockSlot s = rng() % 8;
    const int32_t layer = static_cast<int32_t>(rng() % layout_.n_layers);
    Fill(page.data(), stride, 5000 + i);
    ASSERT_TRUE(store_->Write(s, layout_.LayerOffset(layer), stride, page.data()).ok());
    std::memcpy(model[s].data() + layout_.LayerOffset(layer), page.data(), stride);
  }
  for (int i = 0; i < 40; ++i) {
    const BlockSlot s = rng() % 8;
    const int32_t layer = static_cast<int32_t>(rng() % layout_.n_layers);
    ASSERT_TRUE(store_->Read(s, layout_.LayerOffset(layer), stride, page.data()).ok());
    ASSERT_EQ(std::memcmp(page.data(), model[s].data() + layout_.LayerOffset(layer), stride), 0)
        << "slot " << s << " layer " << layer;
  }
  AlignedBuffer block = Buffer(bb);
  for (BlockSlot s = 0; s < 8; ++s) {
    ASSERT_TRUE(store_->Read(s, 0, bb, block.data()).ok());
    ASSERT_EQ(std::memcmp(block.data(), model[s].data(), bb), 0) << "slot " << s;
  }
}

// Scatter reads: one request for a range of consecutive layer pages, each
// landing in its own buffer (in reverse memory order, and pieces that split a
// page), many beyond the queue depth at once.
TEST_P(PageStoreTest, ScatterReadsSpreadARangeOverSeparateBuffers) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(4).ok());
  const size_t bb = layout_.block_bytes;
  const size_t stride = layout_.layer_stride;
  std::vector<AlignedBuffer> model;
  for (BlockSlot s = 0; s < 4; ++s) {
    model.push_back(Buffer(bb));
    Fill(model.back().data(), bb, 700 + s);
    ASSERT_TRUE(store_->Write(s, 0, bb, model.back().data()).ok());
  }
  struct Case {
    BlockSlot slot;
    int32_t first_layer;
    std::vector<size_t> pieces;  // bytes of each piece, in range order
  };
  const std::vector<Case> cases = {
      {0, 0, {stride, stride}},
      {1, 5, {stride, stride, stride}},
      {2, 28, {stride, stride}},                                   // the block's last two pages
      {3, 0, std::vector<size_t>(layout_.n_layers, stride)},       // the whole block
      {1, 7, {kDirectIoAlignment, stride + kDirectIoAlignment, stride - 2 * kDirectIoAlignment}},
  };
  // Every case 4 times: 20 requests against a queue depth of 4.
  std::vector<IoRequest> reqs;
  std::vector<std::vector<iovec>> iovs;
  std::vector<AlignedBuffer> mem;
  std::vector<size_t> which;
  for (int rep = 0; rep < 4; ++rep) {
    for (size_t c = 0; c < cases.size(); ++c) {
      const Case& k = cases[c];
      size_t total = 0;
      for (size_t p : k.pieces) total += p;
      mem.push_back(Buffer(2 * total));
      std::memset(mem.back().data(), 0xEE, 2 * total);
      std::vector<iovec> v;
      size_t end = 2 * total;  // pieces from the buffer's end backwards, a gap between them
      for (size_t p : k.pieces) {
        end -= 2 * p;
        v.push_back(iovec{mem.back().data() + end, p});
      }
      iovs.push_back(std::move(v));
      IoRequest r;
      r.op = IoOp::kRead;
      r.slot = k.slot;
      r.offset = layout_.LayerOffset(k.first_layer);
      r.length = total;
      which.push_back(c);
      reqs.push_back(r);
    }
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].iov = iovs[i].data();
    reqs[i].iov_count = static_cast<uint32_t>(iovs[i].size());
  }
  ASSERT_TRUE(store_->Execute(reqs).ok());
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Case& k = cases[which[i]];
    size_t at = layout_.LayerOffset(k.first_layer);
    for (size_t p = 0; p < iovs[i].size(); ++p) {
      ASSERT_EQ(std::memcmp(iovs[i][p].iov_base, model[k.slot].data() + at, iovs[i][p].iov_len), 0)
          << "case " << which[i] << " piece " << p;
      // The gap after each piece is untouched.
      EXPECT_EQ(static_cast<uint8_t*>(iovs[i][p].iov_base)[iovs[i][p].iov_len], 0xEE)
          << "case " << which[i] << " piece " << p;
      at += iovs[i][p].iov_len;
    }
  }
  EXPECT_GE(store_->stats().read_bytes, 4 * (bb + 9 * stride));
}

TEST_P(PageStoreTest, MalformedScatterReadsAreRejected) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(1).ok());
  AlignedBuffer buf = Buffer(4 * kDirectIoAlignment);
  iovec iov[2] = {{buf.data(), kDirectIoAlignment}, {buf.data() + 2 * kDirectIoAlignment, kDirectIoAlignment}};
  IoRequest r;
  r.op = IoOp::kRead;
  r.length = 2 * kDirectIoAlignment;
  r.iov = iov;
  r.iov_count = 2;
  r.callback = &Completions::Callback;
  EXPECT_TRUE(store_->Validate(r).ok());
  IoRequest bad = r;
  bad.length = 3 * kDirectIoAlignment;  // the pieces hold less
  EXPECT_EQ(store_->Validate(bad).code(), StatusCode::kInvalidArgument);
  bad = r;
  bad.op = IoOp::kWrite;  // only reads scatter
  EXPECT_EQ(store_->Validate(bad).code(), StatusCode::kInvalidArgument);
  bad = r;
  bad.iov_count = kMaxIov + 1;
  EXPECT_EQ(store_->Validate(bad).code(), StatusCode::kInvalidArgument);
  iovec misaligned[2] = {{buf.data() + 512, kDirectIoAlignment}, iov[1]};
  bad = r;
  bad.iov = misaligned;
  EXPECT_EQ(store_->Validate(bad).code(), StatusCode::kInvalidArgument);
  iovec odd[2] = {{buf.data(), 1000}, {buf.data() + 2 * kDirectIoAlignment, 2 * kDirectIoAlignment - 1000}};
  bad = r;
  bad.iov = odd;
  EXPECT_EQ(store_->Validate(bad).code(), StatusCode::kInvalidArgument);
}

// 256 requests against a queue depth of 4: most wait in the overflow queue.
TEST_P(PageStoreTest, ManyRequestsBeyondTheQueueDepth) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(16).ok());
  constexpr int kN = 256;
  const size_t pages_per_block = layout_.block_bytes / kDirectIoAlignment;
  AlignedBuffer data = Buffer(kN * kDirectIoAlignment);
  std::vector<IoRequest> reqs(kN);
  std::vector<IoRequest*> batch;
  Completions c;
  for (int i = 0; i < kN; ++i) {
    Fill(data.data() + i * kDirectIoAlignment, kDirectIoAlignment, 77 + i);
    reqs[i].op = IoOp::kWrite;
    reqs[i].slot = static_cast<BlockSlot>(i % 16);
    reqs[i].offset = (i / 16) % pages_per_block * kDirectIoAlignment;
    reqs[i].length = kDirectIoAlignment;
    reqs[i].buf = data.data() + i * kDirectIoAlignment;
    reqs[i].callback = &Completions::Callback;
    reqs[i].user = &c;
    batch.push_back(&reqs[i]);
  }
  ASSERT_TRUE(store_->Submit(batch).ok());
  c.WaitFor(kN);
  EXPECT_EQ(c.errors, 0);
  EXPECT_GT(store_->stats().overflowed, 0u);
  for (std::thread::id t : c.threads) EXPECT_NE(t, std::this_thread::get_id());

  AlignedBuffer back = Buffer(kN * kDirectIoAlignment);
  Completions r;
  for (int i = 0; i < kN; ++i) {
    reqs[i].op = IoOp::kRead;
    reqs[i].buf = back.data() + i * kDirectIoAlignment;
    reqs[i].user = &r;
  }
  ASSERT_TRUE(store_->Submit(batch).ok());
  r.WaitFor(kN);
  EXPECT_EQ(r.errors, 0);
  EXPECT_EQ(std::memcmp(back.data(), data.data(), kN * kDirectIoAlignment), 0);
}

// Callbacks may submit: a chain of reads, each started by the previous one's
// callback on the I/O thread, with several chains interleaved.
struct Chain {
  PageStore* store = nullptr;
  IoRequest req;
  int left = 0;
  Completions* c = nullptr;
};

TEST_P(PageStoreTest, CallbacksMaySubmit) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(16).ok());
  constexpr int kChains = 8, kSteps = 50;
  Completions c;
  std::vector<AlignedBuffer> bufs;
  std::vector<std::unique_ptr<Chain>> chains;
  std::vector<IoRequest*> first;
  for (int i = 0; i < kChains; ++i) {
    bufs.push_back(Buffer(kDirectIoAlignment));
    auto ch = std::make_unique<Chain>();
    ch->store = store_.get();
    ch->left = kSteps;
    ch->c = &c;
    ch->req.op = IoOp::kRead;
    ch->req.slot = static_cast<BlockSlot>(i);
    ch->req.length = kDirectIoAlignment;
    ch->req.buf = bufs.back().data();
    ch->req.callback = [](IoRequest* r) {
      auto* chain = static_cast<Chain*>(r->user);
      if (r->status.ok() && --chain->left > 0) {
        r->slot = (r->slot + 1) % 16;
        if (chain->store->Submit({&r, 1}).ok()) return;
      }
      std::lock_guard<std::mutex> l(chain->c->mu);
      ++chain->c->done;
      if (!r->status.ok() || chain->left != 0) ++chain->c->errors;
      chain->c->cv.notify_all();
    };
    ch->req.user = ch.get();
    first.push_back(&ch->req);
    chains.push_back(std::move(ch));
  }
  ASSERT_TRUE(store_->Submit(first).ok());
  c.WaitFor(kChains);
  EXPECT_EQ(c.errors, 0);
  EXPECT_EQ(store_->stats().reads, uint64_t{kChains} * kSteps);
}

TEST_P(PageStoreTest, CapacityGrowsInSlabsWithinTheBudget) {
  options_.budget_bytes = 10 * layout_.block_bytes + 100;  // 10 blocks; slabs of 4
  OPEN_OR_SKIP();
  EXPECT_EQ(store_->max_slots(), 10u);
  AlignedBuffer buf = Buffer(layout_.block_bytes);
  Status st = store_->Write(0, 0, layout_.block_bytes, buf.data());
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange) << st.ToString();

  ASSERT_TRUE(store_->EnsureCapacity(1).ok());
  EXPECT_EQ(store_->capacity_slots(), 4u);  // a whole slab
  ASSERT_TRUE(store_->EnsureCapacity(5).ok());
  EXPECT_EQ(store_->capacity_slots(), 8u);
  st = store_->EnsureCapacity(11);
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
  EXPECT_EQ(store_->capacity_slots(), 8u);
  ASSERT_TRUE(store_->EnsureCapacity(9).ok());
  EXPECT_EQ(store_->capacity_slots(), 10u);  // the last slab only as large as the budget
  EXPECT_TRUE(store_->Write(9, 0, layout_.block_bytes, buf.data()).ok());
  EXPECT_EQ(store_->Write(10, 0, layout_.block_bytes, buf.data()).code(), StatusCode::kOutOfRange);

  struct stat sb {};
  ASSERT_EQ(::stat((dir_ + "/slab-000000").c_str(), &sb), 0);
  EXPECT_EQ(static_cast<size_t>(sb.st_size), 4 * layout_.block_bytes);
  EXPECT_GE(static_cast<size_t>(sb.st_blocks) * 512, 4 * layout_.block_bytes);  // preallocated
  ASSERT_EQ(::stat((dir_ + "/slab-000002").c_str(), &sb), 0);
  EXPECT_EQ(static_cast<size_t>(sb.st_size), 2 * layout_.block_bytes);
}

TEST_P(PageStoreTest, ReopenSeesTheSameData) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(6).ok());
  const size_t bb = layout_.block_bytes;
  AlignedBuffer buf = Buffer(bb);
  for (BlockSlot s = 0; s < 6; ++s) {
    Fill(buf.data(), bb, 300 + s);
    ASSERT_TRUE(store_->Write(s, 0, bb, buf.data()).ok());
  }
  ASSERT_TRUE(store_->Sync().ok());

  // One process at a time per directory.
  auto second = OpenPageStore(options_);
  EXPECT_EQ(second.status().code(), StatusCode::kFailedPrecondition) << second.status().ToString();

  store_.reset();
  ASSERT_TRUE(Open());
  EXPECT_EQ(store_->capacity_slots(), 8u);
  AlignedBuffer expect = Buffer(bb);
  for (BlockSlot s = 0; s < 6; ++s) {
    ASSERT_TRUE(store_->Read(s, 0, bb, buf.data()).ok());
    Fill(expect.data(), bb, 300 + s);
    EXPECT_EQ(std::memcmp(buf.data(), expect.data(), bb), 0) << "slot " << s;
  }
  store_.reset();

  // Another block size is refused rather than misread.
  PageStoreOptions other = options_;
  other.block_bytes = bb + kDirectIoAlignment;
  auto wrong = OpenPageStore(other);
  EXPECT_EQ(wrong.status().code(), StatusCode::kInvalidArgument) << wrong.status().ToString();

  // Another slab size (say, from a new budget) keeps the recorded one.
  options_.slab_bytes = 8 * bb;
  options_.budget_bytes = 32 * bb;
  ASSERT_TRUE(Open());
  EXPECT_EQ(store_->capacity_slots(), 8u);
  EXPECT_EQ(store_->max_slots(), 32u);
  for (BlockSlot s = 0; s < 6; ++s) {
    ASSERT_TRUE(store_->Read(s, 0, bb, buf.data()).ok());
    Fill(expect.data(), bb, 300 + s);
    EXPECT_EQ(std::memcmp(buf.data(), expect.data(), bb), 0) << "slot " << s;
  }
  ASSERT_TRUE(store_->EnsureCapacity(9).ok());
  EXPECT_EQ(store_->capacity_slots(), 12u);  // slabs of 4 blocks, as recorded
  store_.reset();

  // A smaller budget than the files hold keeps every block.
  options_.budget_bytes = 2 * bb;
  ASSERT_TRUE(Open());
  EXPECT_EQ(store_->capacity_slots(), 12u);
  EXPECT_EQ(store_->max_slots(), 12u);
  ASSERT_TRUE(store_->Read(5, 0, bb, buf.data()).ok());
  Fill(expect.data(), bb, 305);
  EXPECT_EQ(std::memcmp(buf.data(), expect.data(), bb), 0);
}

TEST_P(PageStoreTest, SyncFlushesOnlyTheSlabsWritten) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(16).ok());
  AlignedBuffer buf = Buffer(kDirectIoAlignment);
  ASSERT_TRUE(store_->Sync().ok());
  EXPECT_EQ(store_->stats().syncs, 0u);
  ASSERT_TRUE(store_->Write(1, 0, kDirectIoAlignment, buf.data()).ok());   // slab 0
  ASSERT_TRUE(store_->Write(13, 0, kDirectIoAlignment, buf.data()).ok());  // slab 3
  ASSERT_TRUE(store_->Read(6, 0, kDirectIoAlignment, buf.data()).ok());    // reads dirty nothing
  ASSERT_TRUE(store_->Sync().ok());
  EXPECT_EQ(store_->stats().syncs, 2u);
  ASSERT_TRUE(store_->Sync().ok());
  EXPECT_EQ(store_->stats().syncs, 2u);
}

TEST_P(PageStoreTest, MalformedRequestsAreRejectedWhole) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(4).ok());
  AlignedBuffer buf = Buffer(2 * kDirectIoAlignment);
  Completions c;
  IoRequest good;
  good.op = IoOp::kRead;
  good.length = kDirectIoAlignment;
  good.buf = buf.data();
  good.callback = &Completions::Callback;
  good.user = &c;

  IoRequest bad = good;
  bad.buf = buf.data() + 512;  // misaligned buffer
  IoRequest* batch[] = {&good, &bad};
  Status st = store_->Submit(batch);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();

  bad = good;
  bad.offset = 512;
  EXPECT_EQ(store_->Submit(batch).code(), StatusCode::kInvalidArgument);
  bad = good;
  bad.length = 1000;
  EXPECT_EQ(store_->Submit(batch).code(), StatusCode::kInvalidArgument);
  bad = good;
  bad.offset = layout_.block_bytes - kDirectIoAlignment;
  bad.length = 2 * kDirectIoAlignment;  // past the block
  EXPECT_EQ(store_->Submit(batch).code(), StatusCode::kInvalidArgument);
  bad = good;
  bad.callback = nullptr;
  EXPECT_EQ(store_->Submit(batch).code(), StatusCode::kInvalidArgument);
  bad = good;
  bad.slot = 4;
  EXPECT_EQ(store_->Submit(batch).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(store_->Read(0, 0, kDirectIoAlignment, buf.data() + 8).code(), StatusCode::kInvalidArgument);

  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::lock_guard<std::mutex> l(c.mu);
  EXPECT_EQ(c.done, 0) << "a rejected batch must queue nothing";
}

TEST_P(PageStoreTest, OutstandingRequestsAreBounded) {
  options_.max_outstanding = 8;
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(4).ok());
  AlignedBuffer buf = Buffer(9 * kDirectIoAlignment);
  std::vector<IoRequest> reqs(9);
  std::vector<IoRequest*> batch;
  Completions c;
  for (int i = 0; i < 9; ++i) {
    reqs[i].length = kDirectIoAlignment;
    reqs[i].buf = buf.data() + i * kDirectIoAlignment;
    reqs[i].callback = &Completions::Callback;
    reqs[i].user = &c;
    batch.push_back(&reqs[i]);
  }
  EXPECT_EQ(store_->Submit(batch).code(), StatusCode::kResourceExhausted);
  // The synchronous helpers stay within the bound by themselves.
  EXPECT_TRUE(store_->Execute(reqs).ok());
}

TEST_P(PageStoreTest, RegisteredArenaTakesTheFixedBufferPath) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(4).ok());
  const size_t bb = layout_.block_bytes;
  {
    auto arena = IoBufferArena::Create(store_.get(), bb, 4);
    ASSERT_TRUE(arena.ok()) << arena.status().ToString();
    if (GetParam() == Engine::kUring) {
      EXPECT_TRUE((*arena)->registered());
    }
    std::vector<void*> held;
    for (int i = 0; i < 4; ++i) held.push_back((*arena)->Acquire());
    EXPECT_EQ((*arena)->Acquire(), nullptr);  // bounded
    for (int i = 0; i < 4; ++i) Fill(held[i], bb, 900 + i);
    std::vector<BlockSlot> slots = {3, 2, 1, 0};
    std::vector<const void*> w(held.begin(), held.end());
    ASSERT_TRUE(store_->WriteBlocks(slots, w).ok());
    for (void* p : held) std::memset(p, 0, bb);
    ASSERT_TRUE(store_->ReadBlocks(slots, held).ok());
    AlignedBuffer expect = Buffer(bb);
    for (int i = 0; i < 4; ++i) {
      Fill(expect.data(), bb, 900 + i);
      EXPECT_EQ(std::memcmp(held[i], expect.data(), bb), 0);
    }
    for (void* p : held) (*arena)->Release(p);
    if (GetParam() == Engine::kUring) {
      EXPECT_EQ(store_->stats().fixed_buffer_ios, 8u);
    }
  }
  // Unregistered: plain buffers still work, and new ones at the same
  // addresses do not use the stale registration.
  AlignedBuffer plain = Buffer(bb);
  const uint64_t fixed_before = store_->stats().fixed_buffer_ios;
  ASSERT_TRUE(store_->Read(0, 0, bb, plain.data()).ok());
  EXPECT_EQ(store_->stats().fixed_buffer_ios, fixed_before);
  AlignedBuffer expect = Buffer(bb);
  Fill(expect.data(), bb, 903);
  EXPECT_EQ(std::memcmp(plain.data(), expect.data(), bb), 0);
}

// A slab file cut short behind the store's back: the read of a block that
// straddles the new end gets a short transfer, resubmits the rest, gets no
// progress, and fails with IOError instead of spinning.
// Many separately registered regions (a streamed ring's pool chunks): each
// read finds its own, reads spanning two regions or none take the plain
// path, and every read lands the right bytes.
TEST_P(PageStoreTest, ManyRegisteredRegionsEachTakeTheFixedPath) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(2).ok());
  const size_t bb = layout_.block_bytes;
  const size_t stride = layout_.layer_stride;
  AlignedBuffer block = Buffer(bb);
  Fill(block.data(), bb, 1234);
  ASSERT_TRUE(store_->Write(1, 0, bb, block.data()).ok());
  // 100 regions of 2 pages each, in one allocation with a page's gap between
  // regions, registered in a shuffled order.
  constexpr int kRegions = 100;
  AlignedBuffer mem = Buffer(kRegions * 3 * stride);
  std::vector<int> order(kRegions);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(5));
  auto region = [&](int i) { return mem.data() + static_cast<size_t>(i) * 3 * stride; };
  for (int i : order) ASSERT_TRUE(store_->RegisterBuffers(region(i), 2 * stride).ok()) << "region " << i;
  const uint64_t fixed0 = store_->stats().fixed_buffer_ios;
  for (int i = 0; i < kRegions; ++i) {
    const int32_t layer = i % layout_.n_layers;
    uint8_t* dst = region(i) + (i % 2) * stride;  // either page of the region
    ASSERT_TRUE(store_->Read(1, layout_.LayerOffset(layer), stride, dst).ok());
    ASSERT_EQ(std::memcmp(dst, block.data() + layout_.LayerOffset(layer), stride), 0) << "region " << i;
  }
  if (GetParam() == Engine::kUring) {
    EXPECT_EQ(store_->stats().fixed_buffer_ios - fixed0, static_cast<uint64_t>(kRegions));
  }
  // Past a region's end (into the gap) and in the gap: plain reads.
  const uint64_t fixed1 = store_->stats().fixed_buffer_ios;
  ASSERT_TRUE(store_->Read(1, 0, 2 * stride, region(7) + stride).ok());
  EXPECT_EQ(std::memcmp(region(7) + stride, block.data(), 2 * stride), 0);
  ASSERT_TRUE(store_->Read(1, 0, stride, region(8) + 2 * stride).ok());
  EXPECT_EQ(store_->stats().fixed_buffer_ios, fixed1);
  for (int i = 0; i < kRegions; ++i) store_->UnregisterBuffers(region(i));
  ASSERT_TRUE(store_->Read(1, 0, stride, region(3)).ok());
  EXPECT_EQ(store_->stats().fixed_buffer_ios, fixed1) << "unregistered";
}

TEST_P(PageStoreTest, ShortTransfersResumeAndEndOfFileFails) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(4).ok());
  const size_t bb = layout_.block_bytes;
  AlignedBuffer buf = Buffer(bb);
  Fill(buf.data(), bb, 5);
  ASSERT_TRUE(store_->Write(0, 0, bb, buf.data()).ok());
  ASSERT_EQ(::truncate((dir_ + "/slab-000000").c_str(), static_cast<off_t>(bb + bb / 2)), 0);
  Status st = store_->Read(1, 0, bb, buf.data());
  EXPECT_EQ(st.code(), StatusCode::kIOError) << st.ToString();
  EXPECT_NE(st.message().find("no progress"), std::string_view::npos) << st.ToString();
  EXPECT_GE(store_->stats().resubmissions, 1u);
  EXPECT_TRUE(store_->Read(0, 0, bb, buf.data()).ok());  // the intact block still reads
  AlignedBuffer expect = Buffer(bb);
  Fill(expect.data(), bb, 5);
  EXPECT_EQ(std::memcmp(buf.data(), expect.data(), bb), 0);
}

// The destructor finishes every accepted request, and Submit afterwards is
// impossible; what was written is there on reopen.
TEST_P(PageStoreTest, DestructorDrainsInFlightIo) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(16).ok());
  const size_t bb = layout_.block_bytes;
  AlignedBuffer data = Buffer(16 * bb);
  std::vector<IoRequest> reqs(16);
  std::vector<IoRequest*> batch;
  Completions c;
  for (int i = 0; i < 16; ++i) {
    Fill(data.data() + i * bb, bb, 40 + i);
    reqs[i].op = IoOp::kWrite;
    reqs[i].slot = static_cast<BlockSlot>(i);
    reqs[i].length = bb;
    reqs[i].buf = data.data() + i * bb;
    reqs[i].callback = &Completions::Callback;
    reqs[i].user = &c;
    batch.push_back(&reqs[i]);
  }
  ASSERT_TRUE(store_->Submit(batch).ok());
  store_.reset();
  {
    std::lock_guard<std::mutex> l(c.mu);
    EXPECT_EQ(c.done, 16);
    EXPECT_EQ(c.errors, 0);
  }
  ASSERT_TRUE(Open());
  AlignedBuffer back = Buffer(bb);
  for (BlockSlot s = 0; s < 16; ++s) {
    ASSERT_TRUE(store_->Read(s, 0, bb, back.data()).ok());
    EXPECT_EQ(std::memcmp(back.data(), data.data() + s * bb, bb), 0) << "slot " << s;
  }
}

TEST_P(PageStoreTest, EveryTransferAndSyncIsTimed) {
  OPEN_OR_SKIP();
  ASSERT_TRUE(store_->EnsureCapacity(16).ok());
  const size_t bb = layout_.block_bytes;
  AlignedBuffer buf = Buffer(8 * bb);
  std::vector<BlockSlot> slots = {0, 1, 2, 3, 12, 13, 14, 15};  // slabs 0 and 3
  std::vector<const void*> wbufs;
  std::vector<void*> rbufs;
  for (size_t i = 0; i < slots.size(); ++i) {
    wbufs.push_back(buf.data() + i * bb);
    rbufs.push_back(buf.data() + i * bb);
  }
  ASSERT_TRUE(store_->WriteBlocks(slots, wbufs).ok());
  ASSERT_TRUE(store_->Sync().ok());
  ASSERT_TRUE(store_->ReadBlocks(slots, rbufs).ok());
  ASSERT_TRUE(store_->Read(5, 0, kDirectIoAlignment, buf.data()).ok());
  const PageStoreStats st = store_->stats();
  auto total = [](const LatencySnapshot& h) {
    uint64_t n = 0;
    for (uint64_t c : h.counts) n += c;
    return n;
  };
  EXPECT_EQ(st.write_latency.count, st.writes);
  EXPECT_EQ(st.write_latency.count, 8u);
  EXPECT_EQ(total(st.write_latency), 8u);
  EXPECT_EQ(st.read_latency.count, 9u);
  EXPECT_EQ(total(st.read_latency), 9u);
  EXPECT_EQ(st.sync_latency.count, st.syncs);
  EXPECT_EQ(st.sync_latency.count, 2u) << "one fdatasync per slab written";
  // Real transfers take time; a zero sum would mean the clock never started.
  EXPECT_GT(st.write_latency.sum_ns, 0u);
  EXPECT_GT(st.read_latency.sum_ns, 0u);
  EXPECT_GE(st.read_latency.max_ns, st.read_latency.sum_ns / st.read_latency.count);
  // A request the store refuses is not a transfer.
  AlignedBuffer one = Buffer(kDirectIoAlignment);
  EXPECT_FALSE(store_->Read(16, 0, kDirectIoAlignment, one.data()).ok());
  EXPECT_EQ(store_->stats().read_latency.count, 9u);
}

INSTANTIATE_TEST_SUITE_P(Engines, PageStoreTest, ::testing::Values(Engine::kUring, Engine::kPread),
                         [](const auto& info) { return EngineName(info.param); });

// ---------------------------------------------------------------------------
// FaultInjectingPageStore over each engine.

class FaultPageStoreTest : public PageStoreTest {
 protected:
  bool OpenFaulty() {
    if (!Open()) return false;
    auto f = std::make_unique<FaultInjectingPageStore>(std::move(store_));
    fault_ = f.get();
    store_ = std::move(f);
    return store_->EnsureCapacity(8).ok();
  }
  // Writes every block of slots [0, n) with seed base + slot.
  void WriteAll(int n, uint64_t base) {
    AlignedBuffer buf = Buffer(layout_.block_bytes);
    for (int s = 0; s < n; ++s) {
      Fill(buf.data(), layout_.block_bytes, base + s);
      ASSERT_TRUE(store_->Write(s, 0, layout_.block_bytes, buf.data()).ok());
    }
  }
  // Whether the range of slot s holds the bytes Fill(seed) gives that range
  // of a whole block.
  bool Holds(BlockSlot s, uint64_t seed, size_t offset = 0, size_t length = 0) {
    const size_t bb = layout_.block_bytes;
    if (length == 0) length = bb - offset;
    AlignedBuffer got = Buffer(bb), expect = Buffer(bb);
    EXPECT_TRUE(store_->Read(s, 0, bb, got.data()).ok());
    Fill(expect.data(), bb, seed);
    return std::memcmp(got.data() + offset, expect.data() + offset, length) == 0;
  }

  FaultInjectingPageStore* fault_ = nullptr;
};

#define OPEN_FAULTY_OR_SKIP()              \
  do {                                     \
    if (!OpenFaulty()) {                   \
      if (!skip_reason_.empty()) {         \
        GTEST_SKIP() << skip_reason_;      \
      }                                    \
      FAIL() << "cannot open the store";   \
    }                                      \
  } while (0)

TEST_P(FaultPageStoreTest, LatenciesAreTheInnerDevices) {
  OPEN_FAULTY_OR_SKIP();
  WriteAll(4, 100);
  ASSERT_TRUE(store_->Sync().ok());
  EXPECT_TRUE(Holds(2, 102));
  const PageStoreStats outer = store_->stats();
  const PageStoreStats inner = fault_->inner()->stats();
  EXPECT_EQ(outer.writes, 4u);
  EXPECT_EQ(outer.write_latency.count, inner.write_latency.count);
  EXPECT_EQ(outer.read_latency.count, inner.read_latency.count);
  EXPECT_EQ(outer.sync_latency.count, inner.sync_latency.count);
  EXPECT_GE(outer.write_latency.count, 4u);
  EXPECT_GE(outer.read_latency.count, 1u);
  EXPECT_GE(outer.sync_latency.count, 1u);
}

TEST_P(FaultPageStoreTest, EioOnTheNthWriteSurfacesAsIoError) {
  OPEN_FAULTY_OR_SKIP();
  WriteAll(4, 100);
  FaultRule rule;
  rule.action = FaultRule::Action::kEio;
  rule.op = IoOp::kWrite;
  rule.nth = 2;
  fault_->AddFault(rule);
  AlignedBuffer buf = Buffer(layout_.block_bytes);
  Fill(buf.data(), layout_.block_bytes, 200);
  EXPECT_TRUE(store_->Write(0, 0, layout_.block_bytes, buf.data()).ok());
  Status st = store_->Write(1, 0, layout_.block_bytes, buf.data());
  EXPECT_EQ(st.code(), StatusCode::kIOError) << st.ToString();
  EXPECT_NE(st.message().find("Input/output error"), std::string_view::npos) << st.ToString();
  EXPECT_TRUE(store_->Write(2, 0, layout_.block_bytes, buf.data()).ok());  // fired once
  EXPECT_TRUE(Holds(0, 200));
  EXPECT_TRUE(Holds(1, 101));  // the failed write changed nothing
  EXPECT_TRUE(Holds(2, 200));
  EXPECT_EQ(fault_->faults_fired(), 1u);
  EXPECT_EQ(store_->stats().errors, 1u);
}

TEST_P(FaultPageStoreTest, EnospcSurfacesAsResourceExhausted) {
  OPEN_FAULTY_OR_SKIP();
  FaultRule rule;
  rule.action = FaultRule::Action::kEnospc;
  rule.times = 0;  // every write from now on
  fault_->AddFault(rule);
  AlignedBuffer buf = Buffer(kDirectIoAlignment);
  for (int i = 0; i < 3; ++i) {
    Status st = store_->Write(i, 0, kDirectIoAlignment, buf.data());
    EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
  }
  EXPECT_TRUE(store_->Read(0, 0, kDirectIoAlignment, buf.data()).ok());
  fault_->ClearFaults();
  EXPECT_TRUE(store_->Write(0, 0, kDirectIoAlignment, buf.data()).ok());
}

TEST_P(FaultPageStoreTest, ReadFaultsByPredicate) {
  OPEN_FAULTY_OR_SKIP();
  WriteAll(4, 10);
  FaultRule rule;
  rule.action = FaultRule::Action::kEio;
  rule.op = IoOp::kRead;
  rule.times = 0;
  rule.match = [](const IoRequest& r) { return r.slot == 3; };
  fault_->AddFault(rule);
  AlignedBuffer buf = Buffer(layout_.block_bytes);
  EXPECT_TRUE(store_->Read(2, 0, layout_.block_bytes, buf.data()).ok());
  EXPECT_EQ(store_->Read(3, 0, layout_.block_bytes, buf.data()).code(), StatusCode::kIOError);
  EXPECT_EQ(store_->Read(3, 0, layout_.block_bytes, buf.data()).code(), StatusCode::kIOError);
  EXPECT_EQ(fault_->faults_fired(), 2u);
}

TEST_P(FaultPageStoreTest, CorruptedReadFlipsOneByteOnce) {
  OPEN_FAULTY_OR_SKIP();
  WriteAll(2, 50);
  FaultRule rule;
  rule.action = FaultRule::Action::kCorruptRead;
  rule.op = IoOp::kRead;
  rule.corrupt_offset = 12345;
  rule.corrupt_xor = 0x10;
  fault_->AddFault(rule);
  const size_t bb = layout_.block_bytes;
  AlignedBuffer got = Buffer(bb), expect = Buffer(bb);
  Fill(expect.data(), bb, 51);
  ASSERT_TRUE(store_->Read(1, 0, bb, got.data()).ok());
  size_t differing = 0;
  for (size_t i = 0; i < bb; ++i) differing += got.data()[i] != expect.data()[i];
  EXPECT_EQ(differing, 1u);
  EXPECT_EQ(got.data()[12345], expect.data()[12345] ^ 0x10);
  EXPECT_TRUE(Holds(1, 51));  // the stored bytes are intact
}

TEST_P(FaultPageStoreTest, CorruptedScatterReadFlipsTheByteInItsPiece) {
  OPEN_FAULTY_OR_SKIP();
  WriteAll(1, 60);
  FaultRule rule;
  rule.action = FaultRule::Action::kCorruptRead;
  rule.op = IoOp::kRead;
  const size_t stride = layout_.layer_stride;
  rule.corrupt_offset = stride + 100;  // byte 100 of the second page
  rule.corrupt_xor = 0x01;
  fault_->AddFault(rule);
  AlignedBuffer a = Buffer(stride), b = Buffer(stride), expect = Buffer(layout_.block_bytes);
  Fill(expect.data(), layout_.block_bytes, 60);
  iovec iov[2] = {{a.data(), stride}, {b.data(), stride}};
  IoRequest r;
  r.op = IoOp::kRead;
  r.offset = layout_.LayerOffset(4);
  r.length = 2 * stride;
  r.iov = iov;
  r.iov_count = 2;
  ASSERT_TRUE(store_->Execute(std::span<IoRequest>(&r, 1)).ok());
  EXPECT_EQ(std::memcmp(a.data(), expect.data() + layout_.LayerOffset(4), stride), 0);
  EXPECT_EQ(b.data()[100], expect.data()[layout_.LayerOffset(5) + 100] ^ 0x01);
  b.data()[100] ^= 0x01;
  EXPECT_EQ(std::memcmp(b.data(), expect.data() + layout_.LayerOffset(5), stride), 0);
  EXPECT_TRUE(Holds(0, 60));
}

TEST_P(FaultPageStoreTest, TornWriteLandsOnlyAPrefix) {
  OPEN_FAULTY_OR_SKIP();
  WriteAll(2, 60);
  FaultRule rule;
  rule.action = FaultRule::Action::kTornWrite;
  rule.torn_bytes = 8192;
  fault_->AddFault(rule);
  AlignedBuffer buf = Buffer(layout_.block_bytes);
  Fill(buf.data(), layout_.block_bytes, 70);
  EXPECT_TRUE(store_->Write(1, 0, layout_.block_bytes, buf.data()).ok());  // the tear is silent
  EXPECT_TRUE(Holds(1, 70, 0, 8192));
  EXPECT_TRUE(Holds(1, 61, 8192));
}

TEST_P(FaultPageStoreTest, PowerLossDropsExactlyTheUnsyncedWrites) {
  OPEN_FAULTY_OR_SKIP();
  const size_t bb = layout_.block_bytes;
  WriteAll(4, 1);  // slots 0..3 hold seeds 1..4
  ASSERT_TRUE(store_->Sync().ok());
  EXPECT_EQ(fault_->unsynced_pages(), 0u);

  AlignedBuffer b = Buffer(bb);
  Fill(b.data(), bb, 20);
  ASSERT_TRUE(store_->Write(0, 0, bb, b.data()).ok());
  ASSERT_TRUE(store_->Sync().ok());  // slot 0 := 20, durable
  Fill(b.data(), bb, 30);
  ASSERT_TRUE(store_->Write(1, 0, bb, b.data()).ok());  // slot 1 := 30, never synced
  AlignedBuffer page = Buffer(layout_.layer_stride);
  Fill(page.data(), layout_.layer_stride, 40);
  ASSERT_TRUE(store_->Write(2, layout_.LayerOffset(7), layout_.layer_stride, page.data()).ok());
  const size_t unsynced = bb / kDirectIoAlignment + layout_.layer_stride / kDirectIoAlignment;
  EXPECT_EQ(fault_->unsynced_pages(), unsynced);
  EXPECT_TRUE(Holds(1, 30));  // visible before the power loss, like the page cache

  auto lost = fault_->SimulatePowerLoss();
  ASSERT_TRUE(lost.ok()) << lost.status().ToString();
  EXPECT_EQ(*lost, unsynced);
  EXPECT_TRUE(Holds(0, 20));
  EXPECT_TRUE(Holds(1, 2));
  EXPECT_TRUE(Holds(2, 3));
  EXPECT_TRUE(Holds(3, 4));

  // What survived is on disk: a fresh store over the directory agrees.
  store_.reset();
  fault_ = nullptr;
  ASSERT_TRUE(Open());
  EXPECT_TRUE(Holds(0, 20));
  EXPECT_TRUE(Holds(1, 2));
  EXPECT_TRUE(Holds(2, 3));
}

TEST_P(FaultPageStoreTest, FailedSyncMakesNothingDurable) {
  OPEN_FAULTY_OR_SKIP();
  WriteAll(2, 1);
  ASSERT_TRUE(store_->Sync().ok());
  WriteAll(2, 5);
  fault_->FailSyncs(EIO);
  Status st = store_->Sync();
  EXPECT_EQ(st.code(), StatusCode::kIOError) << st.ToString();
  auto lost = fault_->SimulatePowerLoss();
  ASSERT_TRUE(lost.ok());
  EXPECT_EQ(*lost, 2 * layout_.block_bytes / kDirectIoAlignment);
  EXPECT_TRUE(Holds(0, 1));
  EXPECT_TRUE(Holds(1, 2));

  fault_->FailSyncs(ENOSPC);
  EXPECT_EQ(store_->Sync().code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(store_->Sync().ok());
}

TEST_P(FaultPageStoreTest, CallbacksRunOnTheWrappersThread) {
  OPEN_FAULTY_OR_SKIP();
  FaultRule rule;
  rule.action = FaultRule::Action::kEio;
  rule.op = IoOp::kRead;
  fault_->AddFault(rule);
  AlignedBuffer buf = Buffer(kDirectIoAlignment);
  Completions c;
  IoRequest failed, ok;
  for (IoRequest* r : {&failed, &ok}) {
    r->op = IoOp::kRead;
    r->length = kDirectIoAlignment;
    r->buf = buf.data();
    r->callback = &Completions::Callback;
    r->user = &c;
  }
  IoRequest* batch[] = {&failed};
  ASSERT_TRUE(store_->Submit(batch).ok());  // synthesised failure: not run inside Submit
  batch[0] = &ok;
  ASSERT_TRUE(store_->Submit(batch).ok());
  c.WaitFor(2);
  EXPECT_EQ(c.errors, 1);
  ASSERT_EQ(c.threads.size(), 2u);
  EXPECT_NE(c.threads[0], std::this_thread::get_id());
  EXPECT_EQ(c.threads[0], c.threads[1]);
}

// A request whose completion waits behind a slow callback is in flight.
TEST_P(FaultPageStoreTest, PowerLossIsRefusedWhileRequestsAreInFlight) {
  OPEN_FAULTY_OR_SKIP();
  struct Gate {
    std::mutex mu;
    std::condition_variable cv;
    bool entered = false, open = false;
  } gate;
  AlignedBuffer buf = Buffer(2 * kDirectIoAlignment);
  IoRequest slow;
  slow.op = IoOp::kWrite;
  slow.length = kDirectIoAlignment;
  slow.buf = buf.data();
  slow.user = &gate;
  slow.callback = [](IoRequest* req) {  // holds the completion thread until the gate opens
    auto* g = static_cast<Gate*>(req->user);
    std::unique_lock<std::mutex> l(g->mu);
    g->entered = true;
    g->cv.notify_all();
    g->cv.wait(l, [&] { return g->open; });
  };
  IoRequest* batch[] = {&slow};
  ASSERT_TRUE(store_->Submit(batch).ok());
  {
    std::unique_lock<std::mutex> l(gate.mu);
    gate.cv.wait(l, [&] { return gate.entered; });
  }
  Completions c;
  IoRequest queued;
  queued.op = IoOp::kWrite;
  queued.slot = 1;
  queued.length = kDirectIoAlignment;
  queued.buf = buf.data() + kDirectIoAlignment;
  queued.callback = &Completions::Callback;
  queued.user = &c;
  batch[0] = &queued;
  ASSERT_TRUE(store_->Submit(batch).ok());
  auto lost = fault_->SimulatePowerLoss();
  EXPECT_EQ(lost.status().code(), StatusCode::kFailedPrecondition) << lost.status().ToString();
  {
    std::lock_guard<std::mutex> l(gate.mu);
    gate.open = true;
    gate.cv.notify_all();
  }
  c.WaitFor(1);
  lost = fault_->SimulatePowerLoss();
  ASSERT_TRUE(lost.ok()) << lost.status().ToString();
  EXPECT_EQ(*lost, 2u);
}

INSTANTIATE_TEST_SUITE_P(Engines, FaultPageStoreTest, ::testing::Values(Engine::kUring, Engine::kPread),
                         [](const auto& info) { return EngineName(info.param); });

}  // namespace
}  // namespace mnemo::tiering
