// Metrics: the same counts in the Stats snapshot and the Prometheus text,
// exact-sample quantiles, concurrent updates, and /metrics over HTTP.
#include "daemon/metrics.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace mnemo::daemon {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

protocol::TierUsage Row(std::string tier, uint64_t pages, uint64_t bytes, uint64_t budget_bytes) {
  protocol::TierUsage t;
  t.tier = std::move(tier);
  t.pages = pages;
  t.bytes = bytes;
  t.budget_bytes = budget_bytes;
  return t;
}

TEST(MetricsTest, EmptySnapshotIsZero) {
  Metrics m;
  protocol::StatsReply s = m.Snapshot();
  EXPECT_EQ(s.requests_running, 0u);
  EXPECT_EQ(s.prompt_tokens_total, 0u);
  EXPECT_EQ(s.ttft_ms_p50, 0);
  EXPECT_EQ(s.inter_token_ms_p99, 0);
  EXPECT_TRUE(s.tiers.empty());
  EXPECT_TRUE(s.errors.empty());
  EXPECT_TRUE(s.prometheus_text.empty());
  EXPECT_GE(s.uptime_s, 0);
  EXPECT_LT(s.uptime_s, 60);
}

TEST(MetricsTest, CountsAppearInSnapshotAndText) {
  Metrics m;
  m.SetRequests(3, 2);
  m.SetConnections(5);
  m.SetSessions(7);
  m.AddPromptTokens(100);
  m.AddPromptTokens(23);
  m.AddGeneratedTokens(42);
  for (int i = 0; i < 3; ++i) m.CountRequest("generate");
  m.CountRequest("stats");
  m.CountError(StatusCode::kResourceExhausted);
  m.CountError(StatusCode::kResourceExhausted);
  m.CountError(StatusCode::kInvalidArgument);
  m.CountError(StatusCode::kOk);  // not an error: ignored
  // Out of order, and T1 set twice: the later row wins.
  m.SetTier("T2", 30, 3000, 64000);
  m.SetTier("T1", 1, 1, 1);
  m.SetTier("T0", 10, 1000, 4000);
  m.SetTier("T1", 20, 2000, 8000);
  m.ObserveTtft(250);
  m.ObserveInterToken(12.5);

  protocol::StatsReply s = m.Snapshot();
  EXPECT_EQ(s.requests_running, 3u);
  EXPECT_EQ(s.requests_waiting, 2u);
  EXPECT_EQ(s.connections, 5u);
  EXPECT_EQ(s.sessions, 7u);
  EXPECT_EQ(s.prompt_tokens_total, 123u);
  EXPECT_EQ(s.generated_tokens_total, 42u);
  EXPECT_DOUBLE_EQ(s.ttft_ms_p50, 250);
  EXPECT_DOUBLE_EQ(s.inter_token_ms_p99, 12.5);
  ASSERT_EQ(s.tiers.size(), 3u);
  EXPECT_EQ(s.tiers[0], Row("T0", 10, 1000, 4000));
  EXPECT_EQ(s.tiers[1], Row("T1", 20, 2000, 8000));
  EXPECT_EQ(s.tiers[2], Row("T2", 30, 3000, 64000));
  const std::vector<std::pair<StatusCode, uint64_t>> errors = {{StatusCode::kInvalidArgument, 1},
                                                               {StatusCode::kResourceExhausted, 2}};
  EXPECT_EQ(s.errors, errors);

  const std::string text = m.PrometheusText();
  for (const char* line : {
           "mnemo_requests_running 3",
           "mnemo_requests_waiting 2",
           "mnemo_connections 5",
           "mnemo_sessions 7",
           "mnemo_prompt_tokens_total 123",
           "mnemo_generated_tokens_total 42",
           "mnemo_requests_total{type=\"generate\"} 3",
           "mnemo_requests_total{type=\"stats\"} 1",
           "mnemo_errors_total{code=\"ResourceExhausted\"} 2",
           "mnemo_errors_total{code=\"InvalidArgument\"} 1",
           "mnemo_errors_total{code=\"NotFound\"} 0",  // every code exists from the start
           "mnemo_kv_pages{tier=\"T1\"} 20",
           "mnemo_kv_bytes{tier=\"T2\"} 3000",
           "mnemo_kv_budget_bytes{tier=\"T0\"} 4000",
           "mnemo_ttft_seconds_count 1",
           "mnemo_ttft_seconds_sum 0.25",
           "mnemo_ttft_seconds_bucket{le=\"0.25\"} 1",
           "mnemo_ttft_seconds_bucket{le=\"0.1\"} 0",
           "mnemo_inter_token_seconds_count 1",
           "mnemo_inter_token_seconds_bucket{le=\"0.02\"} 1",
           "# TYPE mnemo_ttft_seconds histogram",
           "# TYPE mnemo_uptime_seconds gauge",
           "mnemo_uptime_seconds ",
       }) {
    EXPECT_THAT(text, HasSubstr(line));
  }
  EXPECT_THAT(text, Not(HasSubstr("code=\"OK\"")));
}

TEST(MetricsTest, ExportAndImportCountersReachSnapshotAndText) {
  Metrics m;
  using T = Metrics::Transfer;
  for (int i = 0; i < 3; ++i) m.TransferStarted(T::kExport);
  m.TransferBytes(T::kExport, 1000);
  m.TransferBytes(T::kExport, 24);
  m.TransferEnded(T::kExport, StatusCode::kOk);
  m.TransferEnded(T::kExport, StatusCode::kCancelled);
  m.TransferEnded(T::kExport, StatusCode::kNotFound);
  m.TransferStarted(T::kImport);
  m.TransferBytes(T::kImport, 7);
  m.TransferEnded(T::kImport, StatusCode::kCorruption);

  protocol::StatsReply s = m.Snapshot();
  EXPECT_EQ(s.exports.started, 3u);
  EXPECT_EQ(s.exports.completed, 1u);
  EXPECT_EQ(s.exports.bytes, 1024u);
  const std::vector<std::pair<StatusCode, uint64_t>> export_failed = {{StatusCode::kNotFound, 1},
                                                                      {StatusCode::kCancelled, 1}};
  std::vector<std::pair<StatusCode, uint64_t>> got = s.exports.failed;
  std::sort(got.begin(), got.end());
  std::vector<std::pair<StatusCode, uint64_t>> want = export_failed;
  std::sort(want.begin(), want.end());
  EXPECT_EQ(got, want);
  EXPECT_EQ(s.imports.started, 1u);
  EXPECT_EQ(s.imports.completed, 0u);
  EXPECT_EQ(s.imports.bytes, 7u);
  EXPECT_EQ(s.imports.failed, (std::vector<std::pair<StatusCode, uint64_t>>{{StatusCode::kCorruption, 1}}));
  EXPECT_TRUE(s.errors.empty()) << "transfer failures are not error replies by themselves";

  const std::string text = m.PrometheusText();
  for (const char* line : {
           "mnemo_exports_started_total 3",
           "mnemo_exports_completed_total 1",
           "mnemo_export_bytes_total 1024",
           "mnemo_exports_failed_total{code=\"Cancelled\"} 1",
           "mnemo_exports_failed_total{code=\"NotFound\"} 1",
           "mnemo_exports_failed_total{code=\"Corruption\"} 0",  // every code from the start
           "mnemo_imports_started_total 1",
           "mnemo_imports_completed_total 0",
           "mnemo_import_bytes_total 7",
           "mnemo_imports_failed_total{code=\"Corruption\"} 1",
       }) {
    EXPECT_THAT(text, HasSubstr(line));
  }
  EXPECT_THAT(text, Not(HasSubstr("code=\"OK\"")));
}

TEST(MetricsTest, TierCountersAndIoHistogramsReachSnapshotAndText) {
  Metrics m;
  tiering::LatencyHistogram reads;
  reads.Record(1500);       // (1 us, 2 us]
  reads.Record(1800);
  reads.Record(30'000);     // (16 us, 32 us]
  protocol::TierUsage t2;
  t2.tier = "T2";
  t2.pages = 30;
  t2.bytes = 3000;
  t2.budget_bytes = 64000;
  t2.bytes_read = 1 << 20;
  t2.bytes_written = 3 << 20;
  t2.io_latency = {ToIoLatency("read", reads.Snapshot()), ToIoLatency("sync", tiering::LatencySnapshot{})};
  protocol::TierUsage t0;
  t0.tier = "T0";
  t0.pages = 10;
  t0.hits = 4;
  t0.misses = 1;
  t0.prefetch_hits = 90;
  t0.prefetch_stalls = 30;
  t0.prefetch_stall_s = 0.25;
  m.SetTierUsage(t2);
  m.SetTierUsage(t0);
  m.SetTier("T0", 11, 1100, 4000);  // occupancy only: the counters stay

  protocol::StatsReply s = m.Snapshot();
  ASSERT_EQ(s.tiers.size(), 2u);
  EXPECT_EQ(s.tiers[0].pages, 11u);
  EXPECT_EQ(s.tiers[0].hits, 4u);
  EXPECT_EQ(s.tiers[0].prefetch_stalls, 30u);
  EXPECT_EQ(s.tiers[1], t2);
  const protocol::IoLatency& r = s.tiers[1].io_latency.at(0);
  EXPECT_EQ(r.count, 3u);
  EXPECT_EQ(r.bucket_counts.size(), r.bucket_bounds_s.size() + 1);
  EXPECT_DOUBLE_EQ(r.bucket_bounds_s.at(1), 2e-6);
  EXPECT_EQ(r.bucket_counts.at(1), 2u);
  EXPECT_EQ(r.bucket_counts.at(5), 1u);
  EXPECT_DOUBLE_EQ(r.max_s, 30e-6);
  EXPECT_DOUBLE_EQ(r.QuantileS(0.5), 2e-6);

  const std::string text = m.PrometheusText();
  for (const char* line : {
           "# TYPE mnemo_tier_io_seconds histogram",
           "mnemo_tier_io_seconds_count{op=\"read\",tier=\"T2\"} 3",
           "mnemo_tier_io_seconds_bucket{op=\"read\",tier=\"T2\",le=\"1e-06\"} 0",
           "mnemo_tier_io_seconds_bucket{op=\"read\",tier=\"T2\",le=\"2e-06\"} 2",
           "mnemo_tier_io_seconds_bucket{op=\"read\",tier=\"T2\",le=\"3.2e-05\"} 3",
           "mnemo_tier_io_seconds_bucket{op=\"read\",tier=\"T2\",le=\"+Inf\"} 3",
           "mnemo_tier_io_seconds_count{op=\"sync\",tier=\"T2\"} 0",
           "# TYPE mnemo_tier_hits_total counter",
           "mnemo_tier_hits_total{tier=\"T0\"} 4",
           "mnemo_tier_misses_total{tier=\"T0\"} 1",
           "mnemo_tier_hits_total{tier=\"T2\"} 0",
           "mnemo_tier_read_bytes_total{tier=\"T2\"} 1048576",
           "mnemo_tier_written_bytes_total{tier=\"T2\"} 3145728",
           "mnemo_prefetch_hits_total{tier=\"T0\"} 90",
           "mnemo_prefetch_stalls_total{tier=\"T0\"} 30",
           "mnemo_prefetch_stall_seconds_total{tier=\"T0\"} 0.25",
           "mnemo_kv_pages{tier=\"T0\"} 11",
       }) {
    EXPECT_THAT(text, HasSubstr(line));
  }
}

TEST(MetricsTest, QuantilesAreExactOnKnownSamples) {
  Metrics m;
  std::vector<double> v(100);
  std::iota(v.begin(), v.end(), 1.0);  // 1..100 ms
  std::shuffle(v.begin(), v.end(), std::mt19937(42));
  for (double x : v) {
    m.ObserveTtft(x);
    m.ObserveInterToken(x / 10);
  }
  protocol::StatsReply s = m.Snapshot();
  EXPECT_DOUBLE_EQ(s.ttft_ms_p50, 50);
  EXPECT_DOUBLE_EQ(s.ttft_ms_p99, 99);
  EXPECT_DOUBLE_EQ(s.inter_token_ms_p50, 5);
  EXPECT_DOUBLE_EQ(s.inter_token_ms_p99, 9.9);
}

TEST(MetricsTest, QuantilesForgetSamplesBeyondTheWindow) {
  Metrics m;
  for (int i = 0; i < 8192; ++i) m.ObserveTtft(1000);
  for (int i = 0; i < 8192; ++i) m.ObserveTtft(2);
  protocol::StatsReply s = m.Snapshot();
  EXPECT_DOUBLE_EQ(s.ttft_ms_p99, 2);
  // The histogram still counts everything.
  EXPECT_THAT(m.PrometheusText(), HasSubstr("mnemo_ttft_seconds_count 16384"));
}

TEST(MetricsTest, BadLatenciesAreDroppedOrClamped) {
  Metrics m;
  m.ObserveTtft(std::nan(""));
  m.ObserveTtft(-5);
  protocol::StatsReply s = m.Snapshot();
  EXPECT_EQ(s.ttft_ms_p50, 0);
  EXPECT_THAT(m.PrometheusText(), HasSubstr("mnemo_ttft_seconds_count 1"));
}

TEST(MetricsTest, ConcurrentUpdatesAreAllCounted) {
  Metrics m;
  constexpr int kThreads = 4, kIters = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&m, t] {
      for (int i = 0; i < kIters; ++i) {
        m.AddGeneratedTokens(1);
        m.CountRequest(t % 2 ? "generate" : "health");
        m.CountError(StatusCode::kCancelled);
        m.ObserveInterToken(i);
        m.SetTier("T0", i, i, i);
        if (i % 500 == 0) {
          (void)m.Snapshot();
          (void)m.PrometheusText();
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  protocol::StatsReply s = m.Snapshot();
  EXPECT_EQ(s.generated_tokens_total, uint64_t{kThreads * kIters});
  ASSERT_EQ(s.errors.size(), 1u);
  EXPECT_EQ(s.errors[0].second, uint64_t{kThreads * kIters});
  const std::string text = m.PrometheusText();
  EXPECT_THAT(text, HasSubstr("mnemo_requests_total{type=\"generate\"} 4000"));
  EXPECT_THAT(text, HasSubstr("mnemo_inter_token_seconds_count 8000"));
}

TEST(ValidateListenAddressTest, AcceptsNumericHostsAndPorts) {
  for (const char* a : {"127.0.0.1:9464", "0.0.0.0:1", "127.0.0.1:0", "[::1]:9464", "[::]:65535"}) {
    EXPECT_TRUE(ValidateListenAddress(a).ok()) << a;
  }
  for (const char* a :
       {"", "9464", ":9464", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:80x",
        "localhost:9464", "::1:9464", "[::1]", "[::1:9464", "1.2.3:80", "[127.0.0.1]:80"}) {
    Status st = ValidateListenAddress(a);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << a;
  }
}

// Sends GET `path` to 127.0.0.1:port and returns the whole response.
std::string HttpGet(int port, const std::string& path) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  EXPECT_GE(fd, 0);
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ADD_FAILURE() << "connect: " << strerror(errno);
    close(fd);
    return {};
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  EXPECT_EQ(send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  std::string resp;
  char buf[4096];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof buf, 0)) > 0) resp.append(buf, static_cast<size_t>(n));
  close(fd);
  return resp;
}

TEST(MetricsServeTest, ServesMetricsOverHttp) {
  Metrics m;
  EXPECT_EQ(m.ServingPort(), 0);
  ASSERT_TRUE(m.Serve("127.0.0.1:0").ok());
  const int port = m.ServingPort();
  ASSERT_GT(port, 0);
  m.AddPromptTokens(77);
  m.CountRequest("generate");
  const std::string resp = HttpGet(port, "/metrics");
  EXPECT_THAT(resp, HasSubstr("200 OK"));
  EXPECT_THAT(resp, HasSubstr("mnemo_prompt_tokens_total 77"));
  EXPECT_THAT(resp, HasSubstr("mnemo_requests_total{type=\"generate\"} 1"));
  EXPECT_THAT(resp, HasSubstr("mnemo_uptime_seconds "));
  EXPECT_THAT(resp, Not(HasSubstr("mnemo_uptime_seconds 0\n")));  // refreshed per scrape

  Status again = m.Serve("127.0.0.1:0");
  EXPECT_EQ(again.code(), StatusCode::kFailedPrecondition);
}

TEST(MetricsServeTest, TakenPortIsIOErrorNamingTheAddress) {
  // Hold a listening socket on a free port.
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(listen(fd, 1), 0);
  socklen_t len = sizeof addr;
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string address = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));

  Metrics m;
  Status st = m.Serve(address);
  EXPECT_EQ(st.code(), StatusCode::kIOError) << st.ToString();
  EXPECT_THAT(std::string(st.message()), HasSubstr(address));
  EXPECT_EQ(m.ServingPort(), 0);
  close(fd);
}

TEST(MetricsServeTest, MalformedAddressIsInvalidArgument) {
  Metrics m;
  EXPECT_EQ(m.Serve("localhost").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(m.Serve("127.0.0.1:http").code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mnemo::daemon
