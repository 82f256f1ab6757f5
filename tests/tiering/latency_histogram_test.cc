// Latency histograms of the tiers' I/O: bucket boundaries, snapshots,
// quantile estimates, and exact totals under concurrent recording.
#include "tiering/latency_histogram.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace mnemo::tiering {
namespace {

TEST(LatencyHistogramTest, BucketsAreClosedAboveInPowersOfTwoMicroseconds) {
  EXPECT_EQ(LatencyBoundNs(0), 1000u);
  EXPECT_EQ(LatencyBoundNs(10), 1024000u);
  EXPECT_EQ(LatencyBucket(0), 0u);
  EXPECT_EQ(LatencyBucket(1), 0u);
  EXPECT_EQ(LatencyBucket(1000), 0u);
  EXPECT_EQ(LatencyBucket(1001), 1u);
  EXPECT_EQ(LatencyBucket(2000), 1u);
  EXPECT_EQ(LatencyBucket(2001), 2u);
  EXPECT_EQ(LatencyBucket(4000), 2u);
  EXPECT_EQ(LatencyBucket(4001), 3u);
  // Every bound lands in its own bucket, one nanosecond more in the next.
  for (size_t i = 0; i < kLatencyBounds; ++i) {
    EXPECT_EQ(LatencyBucket(LatencyBoundNs(i)), i) << i;
    EXPECT_EQ(LatencyBucket(LatencyBoundNs(i) + 1), i + 1) << i;
  }
  EXPECT_EQ(LatencyBucket(LatencyBoundNs(kLatencyBounds - 1) + 1), kLatencyBounds);
  EXPECT_EQ(LatencyBucket(UINT64_MAX), kLatencyBounds);
}

TEST(LatencyHistogramTest, SnapshotHasCountsSumAndMax) {
  LatencyHistogram h;
  EXPECT_EQ(h.Snapshot().count, 0u);
  EXPECT_EQ(h.Snapshot().QuantileNs(0.5), 0u);
  h.Record(500);        // bucket 0
  h.Record(1500);       // bucket 1
  h.Record(1800);       // bucket 1
  h.Record(30'000);     // (16 us, 32 us]: bucket 5
  h.Record(100'000'000'000);  // 100 s: overflow
  const LatencySnapshot s = h.Snapshot();
  EXPECT_EQ(s.count, 5u);
  EXPECT_EQ(s.sum_ns, 500u + 1500 + 1800 + 30'000 + 100'000'000'000);
  EXPECT_EQ(s.max_ns, 100'000'000'000u);
  EXPECT_EQ(s.counts[0], 1u);
  EXPECT_EQ(s.counts[1], 2u);
  EXPECT_EQ(s.counts[5], 1u);
  EXPECT_EQ(s.counts[kLatencyBounds], 1u);
  uint64_t total = 0;
  for (uint64_t c : s.counts) total += c;
  EXPECT_EQ(total, s.count);
}

TEST(LatencyHistogramTest, QuantilesAreBucketBoundsCappedByTheMax) {
  LatencyHistogram h;
  for (int i = 0; i < 99; ++i) h.Record(1500);  // bucket 1: (1 us, 2 us]
  h.Record(50'000);                              // bucket 6: (32 us, 64 us]
  const LatencySnapshot s = h.Snapshot();
  EXPECT_EQ(s.QuantileNs(0.0), 2000u);
  EXPECT_EQ(s.QuantileNs(0.5), 2000u);
  EXPECT_EQ(s.QuantileNs(0.99), 2000u);
  EXPECT_EQ(s.QuantileNs(1.0), 50'000u) << "the top bucket's bound is capped by the largest sample";
  LatencyHistogram one;
  one.Record(1200);
  EXPECT_EQ(one.Snapshot().QuantileNs(0.5), 1200u);
}

TEST(LatencyHistogramTest, ConcurrentRecordsAreAllCounted) {
  LatencyHistogram h;
  constexpr int kThreads = 4;
  constexpr uint64_t kPerThread = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&h, t] {
      for (uint64_t i = 0; i < kPerThread; ++i) h.Record((i % 7) * 1000 + static_cast<uint64_t>(t));
    });
  }
  for (auto& t : threads) t.join();
  const LatencySnapshot s = h.Snapshot();
  EXPECT_EQ(s.count, kThreads * kPerThread);
  uint64_t total = 0, expect_sum = 0;
  for (uint64_t c : s.counts) total += c;
  for (int t = 0; t < kThreads; ++t)
    for (uint64_t i = 0; i < kPerThread; ++i) expect_sum += (i % 7) * 1000 + static_cast<uint64_t>(t);
  EXPECT_EQ(total, s.count);
  EXPECT_EQ(s.sum_ns, expect_sum);
  EXPECT_EQ(s.max_ns, 6000u + kThreads - 1);
}

}  // namespace
}  // namespace mnemo::tiering
