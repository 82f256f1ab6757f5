// Metrics: prometheus-cpp families for exposition, plus exact recent latency
// samples so the Stats reply's p50/p99 do not depend on bucket boundaries.
#include "daemon/metrics.h"

#include <arpa/inet.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

namespace mnemo::daemon {
namespace {

using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;

// Latency samples kept for p50/p99: the last kWindowSamples of each kind.
constexpr size_t kWindowSamples = 8192;
// Label cardinality bounds; tiers and request types come from code, so
// hitting these is a bug, but it must not grow the registry without end.
constexpr size_t kMaxTiers = 8;
constexpr size_t kMaxRequestTypes = 32;

constexpr auto kLastKnownCode = StatusCode::kUnavailable;
constexpr size_t kNumCodes = static_cast<size_t>(kLastKnownCode) + 1;

// Seconds. Time to first token spans a cached short prompt (milliseconds)
// to a long prefill on CPU (tens of seconds); inter-token gaps span a GPU
// decode step to a CPU step shared by a full batch.
const std::vector<double> kTtftBuckets = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
const std::vector<double> kInterTokenBuckets = {0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05,
                                                0.075, 0.1,    0.15,  0.25, 0.5,  1,     2.5};

// The last kWindowSamples values. Thread-compatible (Metrics guards it).
class Window {
 public:
  void Add(double v) {
    if (samples_.size() < kWindowSamples) {
      samples_.push_back(v);
    } else {
      samples_[next_] = v;
    }
    next_ = (next_ + 1) % kWindowSamples;
  }
  const std::vector<double>& samples() const { return samples_; }

 private:
  std::vector<double> samples_;
  size_t next_ = 0;
};

// Nearest-rank quantile (the smallest sample with at least q of all samples
// at or below it); 0 for no samples. Sorts `v` partially.
double Quantile(std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  size_t rank = static_cast<size_t>(std::ceil(q * static_cast<double>(v.size())));
  rank = std::clamp<size_t>(rank, 1, v.size());
  auto nth = v.begin() + static_cast<ptrdiff_t>(rank - 1);
  std::nth_element(v.begin(), nth, v.end());
  return *nth;
}

// Latencies arrive in milliseconds; a NaN is dropped and a negative value
// (a clock step) counts as zero.
bool SanitizeMs(double& ms) {
  if (std::isnan(ms)) return false;
  ms = std::max(ms, 0.0);
  return true;
}

}  // namespace

Status ValidateListenAddress(std::string_view address) {
  auto bad = [&](std::string_view why) {
    return Status::InvalidArgument("metrics address '" + std::string(address) + "': " + std::string(why) +
                                   " (expected HOST:PORT, e.g. 127.0.0.1:9464 or [::1]:9464)");
  };
  const size_t colon = address.rfind(':');
  if (colon == std::string_view::npos) return bad("no port");
  std::string host(address.substr(0, colon));
  std::string_view port = address.substr(colon + 1);
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || port.size() > 5 || ec != std::errc() || end != port.data() + port.size() || value > 65535) {
    return bad("port must be 0..65535");
  }
  unsigned char buf[sizeof(in6_addr)];
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    if (inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), buf) != 1) return bad("not an IPv6 address");
    return Status::Ok();
  }
  if (inet_pton(AF_INET, host.c_str(), buf) != 1) return bad("host must be a numeric IPv4 address or [IPv6]");
  return Status::Ok();
}

namespace {

// What a scrape collects: refreshes the uptime gauge, then the registry,
// then the families built from the tier rows (`tier_families`).
class Exposition : public prometheus::Collectable {
 public:
  using Families = std::function<std::vector<prometheus::MetricFamily>()>;
  Exposition(std::shared_ptr<prometheus::Registry> registry, Gauge* uptime, std::chrono::steady_clock::time_point start,
             Families tier_families)
      : registry_(std::move(registry)), uptime_(uptime), start_(start), tier_families_(std::move(tier_families)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    uptime_->Set(std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
    std::vector<prometheus::MetricFamily> out = registry_->Collect();
    for (auto& f : tier_families_()) out.push_back(std::move(f));
    return out;
  }

 private:
  const std::shared_ptr<prometheus::Registry> registry_;
  Gauge* const uptime_;
  const std::chrono::steady_clock::time_point start_;
  const Families tier_families_;
};

// The tiers' counters and I/O histograms arrive as totals (TierStats
// snapshots), which prometheus-cpp's Counter cannot take, so they are
// exposed from the rows at scrape time. Every tier gets every counter
// series from its first row on, so rate() sees the first increment.
std::vector<prometheus::MetricFamily> TierFamilies(const std::vector<protocol::TierUsage>& rows) {
  using prometheus::ClientMetric;
  using prometheus::MetricFamily;
  using prometheus::MetricType;
  auto family = [](const char* name, const char* help, MetricType type) {
    MetricFamily f;
    f.name = name;
    f.help = help;
    f.type = type;
    return f;
  };
  MetricFamily hits = family("mnemo_tier_hits_total",
                             "Tier hits: requests whose session KV was resident (T0), blocks found by loads (T1).",
                             MetricType::Counter);
  MetricFamily misses = family("mnemo_tier_misses_total",
                               "Tier misses: requests whose session KV had to be loaded or recomputed (T0), blocks "
                               "loads did not find (T1).",
                               MetricType::Counter);
  MetricFamily read = family("mnemo_tier_read_bytes_total", "Bytes moved out of a tier.", MetricType::Counter);
  MetricFamily written = family("mnemo_tier_written_bytes_total", "Bytes moved into a tier.", MetricType::Counter);
  MetricFamily io = family("mnemo_tier_io_seconds", "Device latency of a tier's I/O, by operation.",
                           MetricType::Histogram);
  MetricFamily pf_hits = family("mnemo_prefetch_hits_total",
                                "KV layer pages that were in the tier when compute needed them.", MetricType::Counter);
  MetricFamily pf_stalls = family("mnemo_prefetch_stalls_total", "KV layer pages compute had to wait for.",
                                  MetricType::Counter);
  MetricFamily pf_stall_s = family("mnemo_prefetch_stall_seconds_total", "Time compute waited for KV pages.",
                                   MetricType::Counter);
  for (const protocol::TierUsage& t : rows) {
    const std::vector<ClientMetric::Label> labels = {{"tier", t.tier}};
    auto add = [&](MetricFamily& f, double v) {
      ClientMetric m;
      m.label = labels;
      m.counter.value = v;
      f.metric.push_back(std::move(m));
    };
    add(hits, static_cast<double>(t.hits));
    add(misses, static_cast<double>(t.misses));
    add(read, static_cast<double>(t.bytes_read));
    add(written, static_cast<double>(t.bytes_written));
    add(pf_hits, static_cast<double>(t.prefetch_hits));
    add(pf_stalls, static_cast<double>(t.prefetch_stalls));
    add(pf_stall_s, t.prefetch_stall_s);
    for (const protocol::IoLatency& h : t.io_latency) {
      ClientMetric m;
      m.label = {{"op", h.op}, {"tier", t.tier}};
      m.histogram.sample_count = h.count;
      m.histogram.sample_sum = h.sum_s;
      uint64_t cumulative = 0;
      for (size_t i = 0; i < h.bucket_counts.size(); ++i) {
        cumulative += h.bucket_counts[i];
        const double bound =
            i < h.bucket_bounds_s.size() ? h.bucket_bounds_s[i] : std::numeric_limits<double>::infinity();
        m.histogram.bucket.push_back({cumulative, bound});
      }
      io.metric.push_back(std::move(m));
    }
  }
  std::vector<MetricFamily> out;
  for (MetricFamily* f : {&hits, &misses, &read, &written, &io, &pf_hits, &pf_stalls, &pf_stall_s})
    if (!f->metric.empty()) out.push_back(std::move(*f));
  return out;
}

}  // namespace

// Registry series are created and never removed, so the raw pointers into
// the registry stay valid for the Impl's life.
struct Metrics::Impl {
  struct TierRow {
    Gauge* pages;
    Gauge* bytes;
    Gauge* budget_bytes;
    protocol::TierUsage usage;
  };

  // --- constant after construction
  const std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  const std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  Gauge* running;
  Gauge* waiting;
  Gauge* connections;
  Gauge* sessions;
  Gauge* uptime;
  Counter* prompt_tokens;
  Counter* generated_tokens;
  Family<Counter>* requests;
  std::array<Counter*, kNumCodes> errors{};  // [0] (OK) unused
  Histogram* ttft;
  Histogram* inter_token;
  Family<Gauge>* kv_pages;
  Family<Gauge>* kv_bytes;
  Family<Gauge>* kv_budget_bytes;
  // Per Transfer (export, import).
  struct TransferSeries {
    Counter* started;
    Counter* completed;
    Counter* bytes;
    std::array<Counter*, kNumCodes> failed{};  // [0] (OK) unused
    std::atomic<uint64_t> started_n{0}, completed_n{0}, bytes_n{0};
    std::array<std::atomic<uint64_t>, kNumCodes> failed_n{};
  };
  std::array<TransferSeries, 2> transfers;
  std::shared_ptr<Exposition> exposition;

  // Exact totals for the Stats reply (Prometheus counters are doubles).
  std::atomic<uint64_t> prompt_total{0};
  std::atomic<uint64_t> generated_total{0};
  std::array<std::atomic<uint64_t>, kNumCodes> error_totals{};
  std::atomic<uint32_t> running_n{0}, waiting_n{0}, connections_n{0}, sessions_n{0};

  // --- guarded by mu
  mutable std::mutex mu;
  Window ttft_ms;
  Window inter_token_ms;
  std::map<std::string, TierRow, std::less<>> tiers;
  std::map<std::string, Counter*, std::less<>> request_counters;
  std::string serving_address;
  int serving_port = 0;
  // Last member: destroyed first, so no scrape runs while the rest goes.
  std::unique_ptr<prometheus::Exposer> exposer;

  Impl() {
    auto& r = *registry;
    auto gauge = [&](const char* name, const char* help) -> Gauge* {
      return &prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({});
    };
    auto counter = [&](const char* name, const char* help) -> Counter* {
      return &prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({});
    };
    running = gauge("mnemo_requests_running", "Requests in the running batch.");
    waiting = gauge("mnemo_requests_waiting", "Requests queued for a batch slot.");
    connections = gauge("mnemo_connections", "Open client connections.");
    sessions = gauge("mnemo_sessions", "Sessions held by the daemon.");
    uptime = gauge("mnemo_uptime_seconds", "Seconds since the daemon started.");
    prompt_tokens = counter("mnemo_prompt_tokens_total", "Prompt tokens prefilled.");
    generated_tokens = counter("mnemo_generated_tokens_total", "Tokens generated.");
    requests = &prometheus::BuildCounter().Name("mnemo_requests_total").Help("Requests received, by type.").Register(r);
    auto& error_family =
        prometheus::BuildCounter().Name("mnemo_errors_total").Help("Error replies sent, by status code.").Register(r);
    // Every code up front: a series that appears only after its first
    // error makes rate() miss that first error.
    for (size_t c = 1; c < kNumCodes; ++c) {
      errors[c] = &error_family.Add({{"code", std::string(StatusCodeName(static_cast<StatusCode>(c)))}});
    }
    ttft = &prometheus::BuildHistogram()
                .Name("mnemo_ttft_seconds")
                .Help("Time from a request's arrival to its first generated token.")
                .Register(r)
                .Add({}, kTtftBuckets);
    inter_token = &prometheus::BuildHistogram()
                       .Name("mnemo_inter_token_seconds")
                       .Help("Time between consecutive generated tokens of one request.")
                       .Register(r)
                       .Add({}, kInterTokenBuckets);
    kv_pages = &prometheus::BuildGauge().Name("mnemo_kv_pages").Help("KV pages held, by tier.").Register(r);
    kv_bytes = &prometheus::BuildGauge().Name("mnemo_kv_bytes").Help("KV bytes held, by tier.").Register(r);
    kv_budget_bytes =
        &prometheus::BuildGauge().Name("mnemo_kv_budget_bytes").Help("KV byte budget, by tier.").Register(r);
    for (size_t t = 0; t < transfers.size(); ++t) {
      const bool ex = t == static_cast<size_t>(Transfer::kExport);
      TransferSeries& x = transfers[t];
      x.started = counter(ex ? "mnemo_exports_started_total" : "mnemo_imports_started_total",
                          ex ? "Session exports requested." : "Session imports requested.");
      x.completed = counter(ex ? "mnemo_exports_completed_total" : "mnemo_imports_completed_total",
                            ex ? "Session exports sent whole (ExportDone)." : "Session imports committed.");
      x.bytes = counter(ex ? "mnemo_export_bytes_total" : "mnemo_import_bytes_total",
                        ex ? "Export file bytes sent to clients." : "Export file bytes received for imports.");
      auto& failed = prometheus::BuildCounter()
                         .Name(ex ? "mnemo_exports_failed_total" : "mnemo_imports_failed_total")
                         .Help(ex ? "Session exports that ended with an error, by status code."
                                  : "Session imports that ended with an error, by status code.")
                         .Register(r);
      for (size_t c = 1; c < kNumCodes; ++c)
        x.failed[c] = &failed.Add({{"code", std::string(StatusCodeName(static_cast<StatusCode>(c)))}});
    }
    exposition = std::make_shared<Exposition>(registry, uptime, start, [this] {
      std::vector<protocol::TierUsage> rows;
      {
        std::lock_guard lock(mu);
        for (const auto& [name, row] : tiers) rows.push_back(row.usage);
      }
      return TierFamilies(rows);
    });
  }

  double UptimeS() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); }
};

Metrics::Metrics() : impl_(std::make_unique<Impl>()) {}
Metrics::~Metrics() = default;

void Metrics::SetRequests(uint32_t running, uint32_t waiting) {
  impl_->running_n.store(running, std::memory_order_relaxed);
  impl_->waiting_n.store(waiting, std::memory_order_relaxed);
  impl_->running->Set(running);
  impl_->waiting->Set(waiting);
}

void Metrics::SetConnections(uint32_t n) {
  impl_->connections_n.store(n, std::memory_order_relaxed);
  impl_->connections->Set(n);
}

void Metrics::SetSessions(uint32_t n) {
  impl_->sessions_n.store(n, std::memory_order_relaxed);
  impl_->sessions->Set(n);
}

void Metrics::SetTier(std::string_view tier, uint64_t pages, uint64_t bytes, uint64_t budget_bytes) {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->tiers.find(tier);
  if (it == impl_->tiers.end()) {
    MNEMO_DCHECK(impl_->tiers.size() < kMaxTiers);
    if (impl_->tiers.size() >= kMaxTiers) return;
    const prometheus::Labels labels = {{"tier", std::string(tier)}};
    Impl::TierRow row{
        &impl_->kv_pages->Add(labels), &impl_->kv_bytes->Add(labels), &impl_->kv_budget_bytes->Add(labels), {}};
    row.usage.tier = std::string(tier);
    it = impl_->tiers.emplace(std::string(tier), std::move(row)).first;
  }
  Impl::TierRow& row = it->second;
  row.usage.pages = pages;
  row.usage.bytes = bytes;
  row.usage.budget_bytes = budget_bytes;
  row.pages->Set(static_cast<double>(pages));
  row.bytes->Set(static_cast<double>(bytes));
  row.budget_bytes->Set(static_cast<double>(budget_bytes));
}

void Metrics::SetTierUsage(const protocol::TierUsage& usage) {
  SetTier(usage.tier, usage.pages, usage.bytes, usage.budget_bytes);
  std::lock_guard lock(impl_->mu);
  auto it = impl_->tiers.find(usage.tier);
  if (it != impl_->tiers.end()) it->second.usage = usage;
}

protocol::IoLatency ToIoLatency(std::string op, const tiering::LatencySnapshot& h) {
  protocol::IoLatency l;
  l.op = std::move(op);
  l.count = h.count;
  l.sum_s = static_cast<double>(h.sum_ns) / 1e9;
  l.max_s = static_cast<double>(h.max_ns) / 1e9;
  l.bucket_bounds_s.reserve(tiering::kLatencyBounds);
  for (size_t i = 0; i < tiering::kLatencyBounds; ++i)
    l.bucket_bounds_s.push_back(static_cast<double>(tiering::LatencyBoundNs(i)) / 1e9);
  l.bucket_counts.assign(h.counts.begin(), h.counts.end());
  return l;
}

void Metrics::AddPromptTokens(uint64_t n) {
  impl_->prompt_total.fetch_add(n, std::memory_order_relaxed);
  impl_->prompt_tokens->Increment(static_cast<double>(n));
}

void Metrics::AddGeneratedTokens(uint64_t n) {
  impl_->generated_total.fetch_add(n, std::memory_order_relaxed);
  impl_->generated_tokens->Increment(static_cast<double>(n));
}

void Metrics::CountRequest(std::string_view type) {
  Counter* counter = nullptr;
  {
    std::lock_guard lock(impl_->mu);
    auto it = impl_->request_counters.find(type);
    if (it == impl_->request_counters.end()) {
      MNEMO_DCHECK(impl_->request_counters.size() < kMaxRequestTypes);
      std::string label = impl_->request_counters.size() < kMaxRequestTypes ? std::string(type) : "other";
      // Family::Add returns the existing series for known labels ("other").
      Counter* c = &impl_->requests->Add({{"type", label}});
      it = impl_->request_counters.emplace(std::string(type), c).first;
    }
    counter = it->second;
  }
  counter->Increment();
}

void Metrics::CountError(StatusCode code) {
  if (code == StatusCode::kOk) return;
  auto index = static_cast<size_t>(code);
  // A code this build does not know (only a bad cast makes one) counts as
  // Internal rather than growing a label.
  if (index >= kNumCodes) index = static_cast<size_t>(StatusCode::kInternal);
  impl_->error_totals[index].fetch_add(1, std::memory_order_relaxed);
  impl_->errors[index]->Increment();
}

void Metrics::TransferStarted(Transfer t) {
  Impl::TransferSeries& x = impl_->transfers[static_cast<size_t>(t)];
  x.started_n.fetch_add(1, std::memory_order_relaxed);
  x.started->Increment();
}

void Metrics::TransferBytes(Transfer t, uint64_t n) {
  Impl::TransferSeries& x = impl_->transfers[static_cast<size_t>(t)];
  x.bytes_n.fetch_add(n, std::memory_order_relaxed);
  x.bytes->Increment(static_cast<double>(n));
}

void Metrics::TransferEnded(Transfer t, StatusCode code) {
  Impl::TransferSeries& x = impl_->transfers[static_cast<size_t>(t)];
  if (code == StatusCode::kOk) {
    x.completed_n.fetch_add(1, std::memory_order_relaxed);
    x.completed->Increment();
    return;
  }
  auto index = static_cast<size_t>(code);
  if (index >= kNumCodes) index = static_cast<size_t>(StatusCode::kInternal);
  x.failed_n[index].fetch_add(1, std::memory_order_relaxed);
  x.failed[index]->Increment();
}

void Metrics::ObserveTtft(double ms) {
  if (!SanitizeMs(ms)) return;
  impl_->ttft->Observe(ms / 1000.0);
  std::lock_guard lock(impl_->mu);
  impl_->ttft_ms.Add(ms);
}

void Metrics::ObserveInterToken(double ms) {
  if (!SanitizeMs(ms)) return;
  impl_->inter_token->Observe(ms / 1000.0);
  std::lock_guard lock(impl_->mu);
  impl_->inter_token_ms.Add(ms);
}

protocol::StatsReply Metrics::Snapshot() const {
  protocol::StatsReply s;
  s.requests_running = impl_->running_n.load(std::memory_order_relaxed);
  s.requests_waiting = impl_->waiting_n.load(std::memory_order_relaxed);
  s.connections = impl_->connections_n.load(std::memory_order_relaxed);
  s.sessions = impl_->sessions_n.load(std::memory_order_relaxed);
  s.prompt_tokens_total = impl_->prompt_total.load(std::memory_order_relaxed);
  s.generated_tokens_total = impl_->generated_total.load(std::memory_order_relaxed);
  s.uptime_s = impl_->UptimeS();
  for (size_t c = 1; c < kNumCodes; ++c) {
    const uint64_t n = impl_->error_totals[c].load(std::memory_order_relaxed);
    if (n > 0) s.errors.emplace_back(static_cast<StatusCode>(c), n);
  }
  auto transfer = [&](Transfer t, protocol::TransferCounts* out) {
    const Impl::TransferSeries& x = impl_->transfers[static_cast<size_t>(t)];
    out->started = x.started_n.load(std::memory_order_relaxed);
    out->completed = x.completed_n.load(std::memory_order_relaxed);
    out->bytes = x.bytes_n.load(std::memory_order_relaxed);
    for (size_t c = 1; c < kNumCodes; ++c) {
      const uint64_t n = x.failed_n[c].load(std::memory_order_relaxed);
      if (n > 0) out->failed.emplace_back(static_cast<StatusCode>(c), n);
    }
  };
  transfer(Transfer::kExport, &s.exports);
  transfer(Transfer::kImport, &s.imports);
  std::vector<double> ttft, inter_token;
  {
    std::lock_guard lock(impl_->mu);
    ttft = impl_->ttft_ms.samples();
    inter_token = impl_->inter_token_ms.samples();
    // std::map order: T0, T1, T2.
    for (const auto& [name, row] : impl_->tiers) s.tiers.push_back(row.usage);
  }
  // Quantiles outside the lock: copying 2 x 64 KiB is cheap, selecting is not.
  s.ttft_ms_p50 = Quantile(ttft, 0.50);
  s.ttft_ms_p99 = Quantile(ttft, 0.99);
  s.inter_token_ms_p50 = Quantile(inter_token, 0.50);
  s.inter_token_ms_p99 = Quantile(inter_token, 0.99);
  return s;
}

std::string Metrics::PrometheusText() const {
  return prometheus::TextSerializer().Serialize(impl_->exposition->Collect());
}

Status Metrics::Serve(const std::string& listen_address) {
  MNEMO_RETURN_IF_ERROR(ValidateListenAddress(listen_address));
  std::lock_guard lock(impl_->mu);
  if (impl_->exposer != nullptr) {
    return Status::FailedPrecondition("metrics already served on " + impl_->serving_address);
  }
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    // One civetweb thread: scrapes are rare and small.
    exposer = std::make_unique<prometheus::Exposer>(listen_address, 1);
    exposer->RegisterCollectable(impl_->exposition);
  } catch (const std::exception& e) {
    return Status::IOError("metrics: cannot listen on " + listen_address + ": " + e.what());
  }
  const std::vector<int> ports = exposer->GetListeningPorts();
  impl_->serving_port = ports.empty() ? 0 : ports.front();
  impl_->serving_address = listen_address;
  impl_->exposer = std::move(exposer);
  return Status::Ok();
}

int Metrics::ServingPort() const {
  std::lock_guard lock(impl_->mu);
  return impl_->serving_port;
}

}  // namespace mnemo::daemon
