// Plain C++ forms of every protocol message, their field limits and the
// validators clients run before sending. Free of FlatBuffers so that the
// installed client header (mnemo/client.h) can include it; messages.h adds
// the wire encoding.
//
// Thread-safe: the functions are pure; the structs are plain values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "common/status.h"

namespace mnemo::protocol {

inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr size_t kFrameHeaderBytes = 4;
inline constexpr uint32_t kDefaultMaxFrameBytes = 1u << 20;
// Hard ceiling for any configured limit (FlatBuffers itself caps at 2 GiB).
inline constexpr uint32_t kMaxFrameBytesCeiling = 64u << 20;

// Bounds on request fields; InvalidArgument when exceeded.
inline constexpr size_t kMaxSessionNameBytes = 128;
inline constexpr size_t kMaxClientNameBytes = 128;
inline constexpr size_t kMaxRoleBytes = 32;
inline constexpr size_t kMaxMessages = 1024;
inline constexpr size_t kMaxStopStrings = 32;       // == model::StopMatcher
inline constexpr size_t kMaxStopStringBytes = 512;  // == model::StopMatcher
inline constexpr float kMaxTemperature = 100.0f;
inline constexpr float kMaxRepeatPenalty = 100.0f;
// Data bytes per ExportChunk / ImportSession frame (well within the
// default frame limit).
inline constexpr size_t kTransferChunkBytes = 256u << 10;

// Mirrors model::FinishReason (same values; pinned by tests).
enum class FinishReason : uint8_t { kStop = 0, kEos = 1, kLength = 2, kCancelled = 3, kError = 4, kContextFull = 5 };
enum class HealthStatus : uint8_t { kServing = 0, kStarting = 1, kDraining = 2 };

// Session names: 1..kMaxSessionNameBytes of [A-Za-z0-9._:@-], not starting
// with '.', so they are safe in logs, paths and keys.
Status ValidateSessionName(std::string_view name);

// ---------------------------------------------------------------- requests

struct HelloRequest {
  uint32_t protocol_version = kProtocolVersion;
  std::string client_name;
  bool operator==(const HelloRequest&) const = default;
};

struct CreateSessionRequest {
  std::optional<std::string> name;  // nullopt: the daemon picks one
  bool operator==(const CreateSessionRequest&) const = default;
};

struct ChatMessage {
  std::string role;
  std::string content;
  bool operator==(const ChatMessage&) const = default;
};

// Unset fields take the daemon's defaults.
struct SamplingOptions {
  std::optional<float> temperature;
  std::optional<int32_t> top_k;
  std::optional<float> top_p;
  std::optional<float> min_p;
  std::optional<float> repeat_penalty;
  std::optional<int32_t> repeat_last_n;
  std::optional<float> presence_penalty;
  std::optional<float> frequency_penalty;
  std::optional<uint64_t> seed;
  bool operator==(const SamplingOptions&) const = default;
};

struct GenerateRequest {
  std::string session;
  // Exactly one is set: chat messages, or raw text (which may be empty:
  // "continue").
  std::vector<ChatMessage> messages;
  std::optional<std::string> text;
  SamplingOptions sampling;
  uint32_t max_tokens = 0;  // 0: the daemon's default
  std::vector<std::string> stop;
  bool operator==(const GenerateRequest&) const = default;
};

struct CancelRequest {
  uint64_t target_id = 0;
  bool operator==(const CancelRequest&) const = default;
};
struct ListSessionsRequest {
  bool operator==(const ListSessionsRequest&) const = default;
};
struct GetSessionRequest {
  std::string session;
  bool operator==(const GetSessionRequest&) const = default;
};
struct ForkSessionRequest {
  std::string src;
  std::string dst;
  bool operator==(const ForkSessionRequest&) const = default;
};
struct DeleteSessionRequest {
  std::string session;
  bool operator==(const DeleteSessionRequest&) const = default;
};
struct StatsRequest {
  bool prometheus = false;
  bool operator==(const StatsRequest&) const = default;
};
struct HealthRequest {
  bool operator==(const HealthRequest&) const = default;
};
// Streams the session as an export file (ExportChunk..., ExportDone).
struct ExportSessionRequest {
  std::string session;
  bool operator==(const ExportSessionRequest&) const = default;
};
// One piece of an import; see mnemo.fbs.
struct ImportSessionRequest {
  std::optional<std::string> name;  // first piece only: the new session's name
  uint64_t offset = 0;
  std::string data;
  bool last = false;
  bool operator==(const ImportSessionRequest&) const = default;
};

using RequestBody = std::variant<HelloRequest, CreateSessionRequest, GenerateRequest, CancelRequest,
                                 ListSessionsRequest, GetSessionRequest, ForkSessionRequest,
                                 DeleteSessionRequest, StatsRequest, HealthRequest, ExportSessionRequest,
                                 ImportSessionRequest>;
struct Request {
  uint64_t id = 0;
  RequestBody body;
  bool operator==(const Request&) const = default;
};

// --------------------------------------------------------------- responses

struct HelloReply {
  uint32_t protocol_version = kProtocolVersion;
  std::string daemon_version;
  std::string model_name;
  uint32_t context_limit = 0;
  uint32_t max_frame_bytes = 0;
  std::string math;  // "exact" or "fast" (mnemod --math); empty from older daemons
  bool operator==(const HelloReply&) const = default;
};

struct TokenChunk {
  std::string text;
  std::vector<int32_t> token_ids;
  bool operator==(const TokenChunk&) const = default;
};

struct PrefillProgress {
  uint32_t processed = 0;
  uint32_t total = 0;
  bool operator==(const PrefillProgress&) const = default;
};

struct Done {
  FinishReason finish_reason = FinishReason::kStop;
  uint32_t prompt_tokens = 0;
  uint32_t generated_tokens = 0;
  double ttft_ms = 0;
  double decode_tokens_per_s = 0;
  bool persisted = false;
  // Set when persisting the turn failed: why (persisted is then false).
  StatusCode persist_error_code = StatusCode::kOk;
  std::string persist_error;
  bool operator==(const Done&) const = default;
};

struct ErrorReply {
  StatusCode code = StatusCode::kInternal;
  std::string message;
  Status ToStatus() const { return Status(code, message); }
  static ErrorReply FromStatus(const Status& s) { return {s.code(), std::string(s.message())}; }
  bool operator==(const ErrorReply&) const = default;
};

struct SessionInfo {
  std::string name;
  std::string parent;
  uint32_t tokens = 0;
  uint32_t turns = 0;
  uint32_t kv_pages = 0;
  uint64_t kv_bytes = 0;
  uint64_t created_unix_ms = 0;
  uint64_t last_used_unix_ms = 0;
  bool persisted = false;
  // Pages of the session's KV per tier (a page may be in several).
  uint32_t t0_pages = 0;
  uint32_t t1_pages = 0;
  uint32_t t2_pages = 0;
  bool operator==(const SessionInfo&) const = default;
};

struct SessionList {
  std::vector<SessionInfo> sessions;
  bool operator==(const SessionList&) const = default;
};

struct Ack {
  bool operator==(const Ack&) const = default;
};

// Latency of one kind of a tier's I/O. bucket_counts[i] counts samples in
// (bucket_bounds_s[i-1], bucket_bounds_s[i]]; the last entry (one more than
// the bounds) counts those above the last bound.
struct IoLatency {
  std::string op;  // "read", "write", "sync"
  uint64_t count = 0;
  double sum_s = 0;
  double max_s = 0;
  std::vector<double> bucket_bounds_s;
  std::vector<uint64_t> bucket_counts;

  // An estimate of the q-quantile (q in [0, 1]): the upper bound of the
  // bucket holding that sample, capped by max_s; 0 without samples.
  double QuantileS(double q) const {
    uint64_t total = 0;
    for (uint64_t c : bucket_counts) total += c;
    if (total == 0) return 0;
    double r = q * static_cast<double>(total);
    uint64_t rank = r <= 1 ? 1 : static_cast<uint64_t>(r);
    if (static_cast<double>(rank) < r) ++rank;
    if (rank > total) rank = total;
    uint64_t seen = 0;
    for (size_t i = 0; i < bucket_bounds_s.size() && i < bucket_counts.size(); ++i) {
      seen += bucket_counts[i];
      if (seen >= rank) return bucket_bounds_s[i] < max_s ? bucket_bounds_s[i] : max_s;
    }
    return max_s;
  }
  bool operator==(const IoLatency&) const = default;
};
inline constexpr size_t kMaxLatencyBuckets = 64;
inline constexpr size_t kMaxIoLatencies = 8;

struct TierUsage {
  std::string tier;
  uint64_t pages = 0;
  uint64_t bytes = 0;
  uint64_t budget_bytes = 0;
  // Counters since the daemon started. Hits/misses: requests whose session's
  // KV was resident (T0), blocks looked up by loads (T1). Bytes read and
  // written: what moved out of and into the tier.
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  std::vector<IoLatency> io_latency;  // per operation
  // Prefetch into this tier: layer pages ready when compute needed them,
  // pages compute waited for, and the time it waited.
  uint64_t prefetch_hits = 0;
  uint64_t prefetch_stalls = 0;
  double prefetch_stall_s = 0;
  bool operator==(const TierUsage&) const = default;
};

// Session exports or imports since the daemon started (see mnemo.fbs).
struct TransferCounts {
  uint64_t started = 0;
  uint64_t completed = 0;
  std::vector<std::pair<StatusCode, uint64_t>> failed;  // count per code
  uint64_t bytes = 0;
  bool operator==(const TransferCounts&) const = default;
};

struct StatsReply {
  uint32_t requests_running = 0;
  uint32_t requests_waiting = 0;
  uint32_t connections = 0;
  uint32_t sessions = 0;
  uint64_t prompt_tokens_total = 0;
  uint64_t generated_tokens_total = 0;
  double ttft_ms_p50 = 0;
  double ttft_ms_p99 = 0;
  double inter_token_ms_p50 = 0;
  double inter_token_ms_p99 = 0;
  double uptime_s = 0;
  std::vector<TierUsage> tiers;
  std::vector<std::pair<StatusCode, uint64_t>> errors;  // count per code
  std::string prometheus_text;
  TransferCounts exports, imports;
  bool operator==(const StatsReply&) const = default;
};

struct HealthReply {
  HealthStatus status = HealthStatus::kServing;
  bool model_loaded = false;
  double uptime_s = 0;
  std::string message;
  bool operator==(const HealthReply&) const = default;
};

struct ExportChunk {
  uint64_t offset = 0;
  std::string data;
  bool operator==(const ExportChunk&) const = default;
};

struct ExportDone {
  uint64_t bytes = 0;
  uint64_t checksum = 0;  // XXH3-64 of the whole file
  bool operator==(const ExportDone&) const = default;
};

using ResponseBody = std::variant<HelloReply, TokenChunk, PrefillProgress, Done, ErrorReply, SessionInfo,
                                  SessionList, Ack, StatsReply, HealthReply, ExportChunk, ExportDone>;
struct Response {
  uint64_t id = 0;
  ResponseBody body;
  bool operator==(const Response&) const = default;
};

// Field-level checks shared with callers that build requests themselves
// (the client validates before sending, for an early, local error).
Status ValidateGenerate(const GenerateRequest& req);
bool IsValidUtf8(std::string_view s);

}  // namespace mnemo::protocol
