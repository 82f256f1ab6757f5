// Shared fixtures for the protocol tests: one fully populated sample of
// every message type.
#pragma once

#include <string>
#include <vector>

#include "protocol/messages.h"

namespace mnemo::protocol::testing {

inline GenerateRequest SampleGenerate() {
  GenerateRequest g;
  g.session = "agent-1";
  g.messages = {{"system", "You are terse."}, {"user", "Hi \xc3\xa9\xe2\x82\xac"}};
  g.sampling.temperature = 0.7f;
  g.sampling.top_k = 40;
  g.sampling.top_p = 0.9f;
  g.sampling.min_p = 0.05f;
  g.sampling.repeat_penalty = 1.1f;
  g.sampling.repeat_last_n = 64;
  g.sampling.presence_penalty = 0.5f;
  g.sampling.frequency_penalty = -0.5f;
  g.sampling.seed = 0xdeadbeefcafeULL;
  g.max_tokens = 128;
  g.stop = {"\n\n", "</s>"};
  return g;
}

inline std::vector<RequestBody> SampleRequests() {
  GenerateRequest raw;
  raw.session = "raw";
  raw.text = "Once upon a time";
  return {HelloRequest{kProtocolVersion, "mnemo-cli/0.1"},
          CreateSessionRequest{"s1"},
          CreateSessionRequest{},
          SampleGenerate(),
          raw,
          CancelRequest{7},
          ListSessionsRequest{},
          GetSessionRequest{"s1"},
          ForkSessionRequest{"s1", "s2"},
          DeleteSessionRequest{"s2"},
          StatsRequest{true},
          HealthRequest{},
          ExportSessionRequest{"agent.main"},
          ImportSessionRequest{std::string("agent.copy"), 0, std::string("MNEX\0\1\xff", 7), false},
          ImportSessionRequest{std::nullopt, 7, std::string(1000, 'k'), true}};
}

inline SessionInfo SampleInfo(const std::string& name) {
  return SessionInfo{name, "parent", 1234, 3, 78, 78ull * 12288, 1700000000000ull, 1700000001000ull, true, 60, 12, 78};
}

inline std::vector<ResponseBody> SampleResponses() {
  StatsReply st;
  st.requests_running = 3;
  st.requests_waiting = 1;
  st.connections = 5;
  st.sessions = 9;
  st.prompt_tokens_total = 1ull << 40;
  st.generated_tokens_total = 12345;
  st.ttft_ms_p50 = 12.5;
  st.ttft_ms_p99 = 80.25;
  st.inter_token_ms_p50 = 9.0;
  st.inter_token_ms_p99 = 21.0;
  st.uptime_s = 3600.5;
  TierUsage t0;
  t0.tier = "T0";
  t0.pages = 10;
  t0.bytes = 122880;
  t0.budget_bytes = 1 << 30;
  t0.hits = 7;
  t0.misses = 2;
  t0.bytes_read = 4096;
  t0.bytes_written = 8192;
  t0.prefetch_hits = 300;
  t0.prefetch_stalls = 60;
  t0.prefetch_stall_s = 0.125;
  TierUsage t2;
  t2.tier = "T2";
  t2.pages = 1000;
  t2.bytes = 12288000;
  t2.budget_bytes = 1ull << 40;
  t2.bytes_read = 1ull << 33;
  t2.bytes_written = 1ull << 34;
  IoLatency read;
  read.op = "read";
  read.count = 6;
  read.sum_s = 0.00042;
  read.max_s = 0.0002;
  read.bucket_bounds_s = {1e-6, 2e-6, 4e-6};
  read.bucket_counts = {0, 1, 2, 3};
  IoLatency sync;
  sync.op = "sync";
  t2.io_latency = {read, sync};
  st.tiers = {t0, t2};
  st.errors = {{StatusCode::kInvalidArgument, 4}, {StatusCode::kNotFound, 2}};
  st.prometheus_text = "# HELP mnemo_requests_running ...\n";
  st.exports = {7, 5, {{StatusCode::kCancelled, 1}, {StatusCode::kCorruption, 1}}, 1ull << 33};
  st.imports = {2, 1, {{StatusCode::kFailedPrecondition, 1}}, 4096};
  return {HelloReply{kProtocolVersion, "0.1.0", "SmolLM2-135M-Instruct", 8192, 1u << 20, "fast"},
          TokenChunk{"Hello", {9906, 11}},
          PrefillProgress{512, 8192},
          Done{FinishReason::kLength, 42, 128, 35.5, 48.25, true, StatusCode::kOk, ""},
          Done{FinishReason::kEos, 7, 3, 1.5, 20.0, false, StatusCode::kResourceExhausted, "T2 budget full"},
          ErrorReply{StatusCode::kNotFound, "no session 'x'"},
          SampleInfo("s1"),
          SessionList{{SampleInfo("a"), SampleInfo("b")}},
          Ack{},
          st,
          HealthReply{HealthStatus::kServing, true, 12.5, "ok"},
          ExportChunk{262144, std::string("\0\1\2 bytes", 9)},
          ExportDone{524311, 0x0123456789abcdefULL}};
}

// Every sample as frames, request i with id i + 1, responses after them.
inline std::vector<std::string> AllSampleFrames() {
  std::vector<std::string> out;
  uint64_t id = 1;
  for (const auto& r : SampleRequests()) out.push_back(EncodeRequest(id++, r));
  for (const auto& r : SampleResponses()) out.push_back(EncodeResponse(id++, r));
  return out;
}

}  // namespace mnemo::protocol::testing
