// FlowWindow: credit up to the window, a blocked producer woken by released
// credit, cancellation, and the stall timeout.
#include "daemon/flow_window.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

namespace mnemo::daemon {
namespace {

using namespace std::chrono_literals;

TEST(FlowWindowTest, BlocksAtTheWindowUntilCreditComesBack) {
  FlowWindow w(100, 30s);
  ASSERT_TRUE(w.Acquire(60).ok());
  ASSERT_TRUE(w.Acquire(40).ok());
  std::atomic<bool> got{false};
  std::thread producer([&] {
    EXPECT_TRUE(w.Acquire(50).ok());
    got = true;
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(got.load()) << "acquired beyond the window";
  w.Release(60);  // 40 + 50 fit now
  producer.join();
  EXPECT_TRUE(got.load());
}

TEST(FlowWindowTest, OversizedPieceWaitsForAnEmptyWindow) {
  FlowWindow w(100, 30s);
  ASSERT_TRUE(w.Acquire(500).ok());  // alone: allowed
  std::thread releaser([&] { w.Release(500); });
  EXPECT_TRUE(w.Acquire(500).ok());
  releaser.join();
}

TEST(FlowWindowTest, CancelWakesAWaitingProducerAndSticks) {
  FlowWindow w(10, 30s);
  ASSERT_TRUE(w.Acquire(10).ok());
  std::thread canceller([&] { w.Cancel(Status::Cancelled("connection closed")); });
  Status s = w.Acquire(10);
  canceller.join();
  EXPECT_EQ(s.code(), StatusCode::kCancelled);
  w.Release(10);
  EXPECT_EQ(w.Acquire(1).code(), StatusCode::kCancelled);
}

TEST(FlowWindowTest, ReaderThatStopsReadingIsUnavailableAfterTheStall) {
  FlowWindow w(10, 100ms);
  ASSERT_TRUE(w.Acquire(10).ok());
  Status s = w.Acquire(10);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("stopped reading"), std::string_view::npos);
}

}  // namespace
}  // namespace mnemo::daemon
