// Fixed-bucket latency histograms for the tiers' I/O: cheap enough to record
// every transfer on the I/O path (a few relaxed atomic adds, no lock, no
// allocation), exported as plain snapshots for Stats and Prometheus.
#pragma once

#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>

namespace mnemo::tiering {

// Bucket i (i < kLatencyBounds) counts samples in (bound(i-1), bound(i)],
// bound(i) = 1 us << i: 1 us to about 8.4 s in factors of two, which covers
// a page-cache hit to a stalled disk. The last bucket counts what lies above.
inline constexpr size_t kLatencyBounds = 24;
inline constexpr size_t kLatencyBuckets = kLatencyBounds + 1;

constexpr uint64_t LatencyBoundNs(size_t i) { return uint64_t{1000} << i; }

// The bucket a sample of `ns` nanoseconds falls in.
constexpr size_t LatencyBucket(uint64_t ns) {
  if (ns <= LatencyBoundNs(0)) return 0;
  // The smallest i with 1000 << i >= ns: ceil(log2(ceil(ns / 1000))).
  const uint64_t us = ns / 1000 + (ns % 1000 != 0 ? 1 : 0);
  const size_t i = static_cast<size_t>(std::bit_width(us - 1));
  return i < kLatencyBounds ? i : kLatencyBounds;
}

// A histogram's values at one moment. Plain value.
struct LatencySnapshot {
  std::array<uint64_t, kLatencyBuckets> counts{};
  uint64_t count = 0;   // samples (== sum of counts)
  uint64_t sum_ns = 0;
  uint64_t max_ns = 0;

  // The upper bound of the bucket holding the q-quantile sample (q in
  // [0, 1]), capped by max_ns; 0 without samples. An estimate that never
  // understates by more than the bucket's width.
  uint64_t QuantileNs(double q) const {
    if (count == 0) return 0;
    uint64_t rank = static_cast<uint64_t>(q * static_cast<double>(count) + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > count) rank = count;
    uint64_t seen = 0;
    for (size_t i = 0; i < kLatencyBounds; ++i) {
      seen += counts[i];
      if (seen >= rank) return LatencyBoundNs(i) < max_ns ? LatencyBoundNs(i) : max_ns;
    }
    return max_ns;
  }
};

// Thread-safe, lock-free. Snapshot() taken while samples arrive may see a
// sample in `count` but not yet in its bucket (or the reverse); each field
// is exact on its own and every sample shows up by the next snapshot.
class LatencyHistogram {
 public:
  void Record(uint64_t ns) {
    constexpr auto kRelaxed = std::memory_order_relaxed;
    counts_[LatencyBucket(ns)].fetch_add(1, kRelaxed);
    count_.fetch_add(1, kRelaxed);
    sum_ns_.fetch_add(ns, kRelaxed);
    uint64_t max = max_ns_.load(kRelaxed);
    while (ns > max && !max_ns_.compare_exchange_weak(max, ns, kRelaxed)) {
    }
  }

  LatencySnapshot Snapshot() const {
    constexpr auto kRelaxed = std::memory_order_relaxed;
    LatencySnapshot s;
    for (size_t i = 0; i < kLatencyBuckets; ++i) s.counts[i] = counts_[i].load(kRelaxed);
    s.count = count_.load(kRelaxed);
    s.sum_ns = sum_ns_.load(kRelaxed);
    s.max_ns = max_ns_.load(kRelaxed);
    return s;
  }

 private:
  std::array<std::atomic<uint64_t>, kLatencyBuckets> counts_{};
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_ns_{0};
  std::atomic<uint64_t> max_ns_{0};
};

// Steady-clock nanoseconds, for timing I/O. Never 0 (0 means "not started").
inline uint64_t MonotonicNs() {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now().time_since_epoch())
                      .count();
  return ns > 0 ? static_cast<uint64_t>(ns) : 1;
}

}  // namespace mnemo::tiering
