// mnemod's metrics: one registry that feeds both the protocol's Stats reply
// and Prometheus exposition (prometheus-cpp), optionally served over HTTP.
//
// Thread-safe: every method may be called from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/status.h"
#include "protocol/messages.h"
#include "tiering/latency_histogram.h"

namespace mnemo::daemon {

// "HOST:PORT" with a numeric IPv4 host or a bracketed IPv6 one
// ("127.0.0.1:9464", "[::1]:9464") and a port 0..65535 (0: any free port).
// InvalidArgument otherwise. Serve and the config parser share it.
Status ValidateListenAddress(std::string_view address);

// A tiering latency histogram in the protocol's form (seconds).
protocol::IoLatency ToIoLatency(std::string op, const tiering::LatencySnapshot& h);

class Metrics {
 public:
  Metrics();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Gauges.
  void SetRequests(uint32_t running, uint32_t waiting);
  void SetConnections(uint32_t n);
  void SetSessions(uint32_t n);
  // One row per tier ("T0", "T1", "T2"); later calls replace the tier's
  // occupancy (SetTier) or all of its row (SetTierUsage: the counters are
  // totals since start, so they must not go backwards).
  void SetTier(std::string_view tier, uint64_t pages, uint64_t bytes, uint64_t budget_bytes);
  void SetTierUsage(const protocol::TierUsage& usage);

  // Counters.
  void AddPromptTokens(uint64_t n);
  void AddGeneratedTokens(uint64_t n);
  void CountRequest(std::string_view type);  // "generate", "create_session", ...
  void CountError(StatusCode code);
  // Session exports and imports: each started one ends once, with OK
  // (completed) or its error's code (failed); bytes of the export file as
  // they are sent or received.
  enum class Transfer : uint8_t { kExport, kImport };
  void TransferStarted(Transfer t);
  void TransferBytes(Transfer t, uint64_t n);
  void TransferEnded(Transfer t, StatusCode code);

  // Latencies (histograms in Prometheus; p50/p99 over a recent window in Stats).
  void ObserveTtft(double ms);
  void ObserveInterToken(double ms);

  // Everything the Stats reply carries except prometheus_text; uptime since
  // construction.
  protocol::StatsReply Snapshot() const;
  // Prometheus text exposition format of every metric.
  std::string PrometheusText() const;

  // Serves /metrics over HTTP on "HOST:PORT" until destruction.
  // InvalidArgument for a malformed address, IOError when it cannot bind.
  Status Serve(const std::string& listen_address);
  // The TCP port Serve bound (the chosen one when it was given port 0);
  // 0 when not serving.
  int ServingPort() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mnemo::daemon
