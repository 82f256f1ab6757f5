// mnemo-bench t2: throughput of the T2 page store on this machine's disk —
// sequential whole-block writes and reads (resume, full-attention streaming)
// and random single layer-page reads (sparse page selection) — through
// UringPageStore with registered buffers, queue depth --qd kept full by the
// completion callbacks. bench/compare_fio.sh runs fio on the same file
// system with the same block size, depth and size, and prints the ratios.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "tiering/page_store.h"

namespace mnemo::bench {

int CmdT2(int argc, char** argv);

namespace {

using nlohmann::json;
using tiering::BlockSlot;
using tiering::IoOp;
using tiering::IoRequest;
using tiering::PageStore;
using tiering::PageStoreOptions;


[[noreturn]] void Die(const std::string& msg) { DieAs("mnemo-bench t2", msg); }

// "2G", "360K", "1M", "4096": bytes (binary units).
uint64_t ParseBytes(const std::string& flag, const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  uint64_t mult = 1;
  std::string unit(end);
  if (!unit.empty() && (unit.back() == 'B' || unit.back() == 'b')) unit.pop_back();
  if (!unit.empty() && (unit.back() == 'i')) unit.pop_back();
  if (unit == "K" || unit == "k") {
    mult = uint64_t{1} << 10;
  } else if (unit == "M" || unit == "m") {
    mult = uint64_t{1} << 20;
  } else if (unit == "G" || unit == "g") {
    mult = uint64_t{1} << 30;
  } else if (!unit.empty() || end == s.c_str()) {
    Die("--" + flag + " expects a size like 360K, 1M or 2G, got '" + s + "'");
  }
  if (v <= 0) Die("--" + flag + " must be positive");
  return static_cast<uint64_t>(v * static_cast<double>(mult));
}

struct T2Options {
  std::string dir;
  uint64_t size_bytes = uint64_t{2} << 30;
  uint64_t block_bytes = uint64_t{1} << 20;
  uint64_t page_bytes = 48 << 10;   // random reads: one layer page (64 tokens of the default model)
  uint64_t slab_bytes = uint64_t{1} << 30;
  uint32_t qd = 16;
  uint64_t rand_ops = 0;            // 0: size / page / 4, at most 65536
  uint64_t seed = 1;
  PageStoreOptions::Engine engine = PageStoreOptions::Engine::kUring;
  bool keep = false;
  std::string phase = "all";        // all | write | read | rand (read/rand reuse a kept store)
  bool json = false;
};

T2Options ParseOptions(int argc, char** argv) {
  T2Options o;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--dir") {
      o.dir = value();
    } else if (a == "--size") {
      o.size_bytes = ParseBytes("size", value());
    } else if (a == "--block") {
      o.block_bytes = ParseBytes("block", value());
    } else if (a == "--page") {
      o.page_bytes = ParseBytes("page", value());
    } else if (a == "--slab") {
      o.slab_bytes = ParseBytes("slab", value());
    } else if (a == "--qd") {
      o.qd = static_cast<uint32_t>(std::strtoul(value().c_str(), nullptr, 10));
    } else if (a == "--rand-ops") {
      o.rand_ops = std::strtoull(value().c_str(), nullptr, 10);
    } else if (a == "--seed") {
      o.seed = std::strtoull(value().c_str(), nullptr, 10);
    } else if (a == "--engine") {
      const std::string e = value();
      if (e == "uring" || e == "io_uring") {
        o.engine = PageStoreOptions::Engine::kUring;
      } else if (e == "pread") {
        o.engine = PageStoreOptions::Engine::kPread;
      } else {
        Die("--engine is uring or pread");
      }
    } else if (a == "--phase") {
      o.phase = value();
      if (o.phase != "all" && o.phase != "write" && o.phase != "read" && o.phase != "rand")
        Die("--phase is all, write, read or rand");
    } else if (a == "--keep") {
      o.keep = true;
    } else if (a == "--json") {
      o.json = true;
    } else {
      Die("unknown option " + a);
    }
  }
  if (o.dir.empty()) Die("--dir is required (a directory on the disk to measure)");
  if (o.block_bytes % tiering::kDirectIoAlignment != 0) Die("--block must be a multiple of 4K");
  if (o.page_bytes % tiering::kDirectIoAlignment != 0 || o.page_bytes > o.block_bytes)
    Die("--page must be a multiple of 4K, at most --block");
  if (o.size_bytes < o.block_bytes) Die("--size is smaller than one block");
  if (o.qd == 0 || o.qd > 1024) Die("--qd must be in [1, 1024]");
  if (o.rand_ops == 0) o.rand_ops = std::min<uint64_t>(65536, std::max<uint64_t>(1, o.size_bytes / o.page_bytes / 4));
  return o;
}

// Keeps `qd` requests in flight until n_ops have completed: each completion
// callback (on the store's I/O thread) prepares and submits the next op.
// Thread-safe: the callbacks and the waiting thread share it under mu.
class Driver {
 public:
  using Prep = std::function<void(uint64_t op, IoRequest* r)>;

  Driver(PageStore* store, std::vector<void*> bufs, uint64_t n_ops, Prep prep, bool latencies)
      : store_(store), n_ops_(n_ops), prep_(std::move(prep)), slots_(bufs.size()) {
    if (latencies) lat_us_.resize(n_ops);
    for (size_t i = 0; i < bufs.size(); ++i) {
      slots_[i].driver = this;
      slots_[i].req.buf = bufs[i];
      slots_[i].req.callback = &Driver::Done;
      slots_[i].req.user = &slots_[i];
    }
  }

  // Returns the seconds from the first submission to the last completion.
  double Run() {
    std::vector<IoRequest*> first;
    const double t0 = Now();
    for (Slot& s : slots_) {
      const uint64_t op = next_.fetch_add(1);
      if (op >= n_ops_) break;
      Start(&s, op);
      first.push_back(&s.req);
    }
    active_ = static_cast<int>(first.size());
    Status st = store_->Submit(first);
    if (!st.ok()) Die(st.ToString());
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return active_ == 0; });
    const double elapsed = Now() - t0;
    if (!error_.ok()) Die(error_.ToString());
    return elapsed;
  }

  // Latency percentile in microseconds (p in [0, 1]).
  double LatencyUs(double p) {
    if (lat_us_.empty()) return 0;
    std::vector<double> v = lat_us_;
    const size_t k = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
    std::nth_element(v.begin(), v.begin() + static_cast<long>(k), v.end());
    return v[k];
  }

 private:
  struct Slot {
    IoRequest req;
    Driver* driver = nullptr;
    uint64_t op = 0;
    double t0 = 0;
  };

  void Start(Slot* s, uint64_t op) {
    s->op = op;
    prep_(op, &s->req);
    if (!lat_us_.empty()) s->t0 = Now();
  }

  static void Done(IoRequest* r) {
    auto* s = static_cast<Slot*>(r->user);
    Driver* d = s->driver;
    if (!d->lat_us_.empty()) d->lat_us_[s->op] = (Now() - s->t0) * 1e6;
    if (r->status.ok()) {
      const uint64_t op = d->next_.fetch_add(1);
      if (op < d->n_ops_) {
        d->Start(s, op);
        Status st = d->store_->Submit({&r, 1});
        if (st.ok()) return;
        r->status = st;
      }
    }
    std::lock_guard<std::mutex> l(d->mu_);
    if (!r->status.ok() && d->error_.ok()) d->error_ = r->status;
    if (--d->active_ == 0) d->cv_.notify_all();
  }

  PageStore* const store_;
  const uint64_t n_ops_;
  const Prep prep_;
  std::vector<Slot> slots_;
  std::vector<double> lat_us_;  // [op], each written by one callback
  std::atomic<uint64_t> next_{0};

  std::mutex mu_;
  std::condition_variable cv_;
  int active_ = 0;  // guarded by mu_
  Status error_;    // guarded by mu_
};

}  // namespace

int CmdT2(int argc, char** argv) {
  const T2Options o = ParseOptions(argc, argv);
  const std::string dir = o.dir + "/mnemo-t2-bench";
  const bool do_write = o.phase == "all" || o.phase == "write";
  const bool do_read = o.phase == "all" || o.phase == "read";
  const bool do_rand = o.phase == "all" || o.phase == "rand";
  std::error_code ec;
  if (do_write) std::filesystem::remove_all(dir, ec);

  PageStoreOptions so;
  so.dir = dir;
  so.block_bytes = o.block_bytes;
  so.slab_bytes = std::max(o.slab_bytes, o.block_bytes);
  so.budget_bytes = o.size_bytes;
  so.queue_depth = o.qd;
  so.pread_threads = o.qd;  // the pread engine's depth is its thread count
  so.engine = o.engine;
  so.create_if_missing = do_write;
  auto opened = tiering::OpenPageStore(so);
  if (!opened.ok()) Die(opened.status().ToString());
  std::unique_ptr<PageStore> store = std::move(opened).value();
  const uint64_t n_blocks = store->max_slots();
  json j{{"engine", std::string(store->engine_name())},
         {"dir", dir},
         {"size_bytes", n_blocks * o.block_bytes},
         {"block_bytes", o.block_bytes},
         {"page_bytes", o.page_bytes},
         {"qd", o.qd}};

  double t = Now();
  if (do_write) {
    if (Status st = store->EnsureCapacity(n_blocks); !st.ok()) Die(st.ToString());
    j["prealloc_s"] = Now() - t;
  } else if (store->capacity_slots() < n_blocks) {
    Die("the store in " + dir + " holds " + std::to_string(store->capacity_slots()) + " of " +
        std::to_string(n_blocks) + " blocks: run --phase write --keep first");
  }

  // One registered block buffer per request in flight, filled with noise
  // (no zero pages for a device that compresses).
  auto arena = tiering::IoBufferArena::Create(store.get(), o.block_bytes, o.qd);
  if (!arena.ok()) Die(arena.status().ToString());
  std::vector<void*> bufs;
  std::mt19937_64 noise(o.seed);
  for (size_t i = 0; i < o.qd; ++i) {
    bufs.push_back((*arena)->buffer(i));
    auto* p = static_cast<uint64_t*>(bufs.back());
    for (size_t k = 0; k < o.block_bytes / 8; ++k) p[k] = noise();
  }

  auto whole_block = [&](IoOp op) {
    return [&, op](uint64_t i, IoRequest* r) {
      r->op = op;
      r->slot = i;
      r->offset = 0;
      r->length = o.block_bytes;
    };
  };
  const double bytes = static_cast<double>(n_blocks * o.block_bytes);

  if (do_write) {
    Driver writer(store.get(), bufs, n_blocks, whole_block(IoOp::kWrite), false);
    j["seq_write_bytes_per_s"] = bytes / writer.Run();
    t = Now();
    if (Status st = store->Sync(); !st.ok()) Die(st.ToString());
    j["sync_s"] = Now() - t;
  }
  if (do_read) {
    Driver reader(store.get(), bufs, n_blocks, whole_block(IoOp::kRead), false);
    j["seq_read_bytes_per_s"] = bytes / reader.Run();
  }
  if (do_rand) {
    // Random layer pages: a uniformly random block and layer per read, the
    // layer pages of a block laid out as tiering::BlockLayout does (each
    // padded to 4 KiB).
    const uint64_t stride = tiering::AlignUp(o.page_bytes, tiering::kDirectIoAlignment);
    const uint64_t layers = o.block_bytes / stride;
    std::vector<std::pair<BlockSlot, uint64_t>> picks(o.rand_ops);
    std::mt19937_64 rng(o.seed + 1);
    for (auto& p : picks) p = {rng() % n_blocks, rng() % layers * stride};
    Driver random(store.get(), bufs, o.rand_ops,
                  [&](uint64_t i, IoRequest* r) {
                    r->op = IoOp::kRead;
                    r->slot = picks[i].first;
                    r->offset = picks[i].second;
                    r->length = o.page_bytes;
                  },
                  true);
    const double rand_s = random.Run();
    j["rand_read_ops"] = o.rand_ops;
    j["rand_read_bytes_per_s"] = static_cast<double>(o.rand_ops * o.page_bytes) / rand_s;
    j["rand_read_iops"] = static_cast<double>(o.rand_ops) / rand_s;
    j["rand_read_lat_us_p50"] = random.LatencyUs(0.5);
    j["rand_read_lat_us_p99"] = random.LatencyUs(0.99);
  }

  const tiering::PageStoreStats stats = store->stats();
  j["fixed_buffer_ios"] = stats.fixed_buffer_ios;
  j["fixed_buffers"] = stats.fixed_buffer_ios > 0;  // the store took the registered-buffer path
  j["overflowed"] = stats.overflowed;
  j["resubmissions"] = stats.resubmissions;
  arena->reset();
  store.reset();
  if (!o.keep) std::filesystem::remove_all(dir, ec);

  if (o.json) {
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("T2 page store (%s, O_DIRECT, queue depth %u%s) in %s\n", j["engine"].get<std::string>().c_str(), o.qd,
              j["fixed_buffers"].get<bool>() ? ", registered buffers" : "", dir.c_str());
  const auto block_kib = static_cast<unsigned long long>(o.block_bytes >> 10);
  if (do_write) {
    std::printf("  preallocate  %.2f GiB in %.3f s\n", bytes / (1 << 30), j["prealloc_s"].get<double>());
    std::printf("  seq write    %llu KiB blocks  %.3f GB/s  (then Sync %.3f s)\n", block_kib,
                j["seq_write_bytes_per_s"].get<double>() / 1e9, j["sync_s"].get<double>());
  }
  if (do_read)
    std::printf("  seq read     %llu KiB blocks  %.3f GB/s\n", block_kib, j["seq_read_bytes_per_s"].get<double>() / 1e9);
  if (do_rand)
    std::printf("  random read  %llu KiB pages   %.3f GB/s  %.0f IOPS  p50 %.0f us  p99 %.0f us\n",
                static_cast<unsigned long long>(o.page_bytes >> 10), j["rand_read_bytes_per_s"].get<double>() / 1e9,
                j["rand_read_iops"].get<double>(), j["rand_read_lat_us_p50"].get<double>(),
                j["rand_read_lat_us_p99"].get<double>());
  return 0;
}

}  // namespace mnemo::bench
