// Message builders and validators: every type round-trips through a real
// frame; invalid field values are typed InvalidArgument errors.
#include "protocol/messages.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "common/status.h"
#include "model/stop.h"
#include "tests/protocol/test_frames.h"

namespace mnemo::protocol {
namespace {

// Decodes exactly one frame from `bytes` and hands the verified root to `fn`.
template <class Fn>
auto WithFrame(const std::string& bytes, Fn fn) {
  FrameDecoder d;
  d.Feed(bytes);
  auto r = d.Next();
  MNEMO_CHECK(r.ok() && r->has_value());
  return fn((*r)->frame);
}

Result<Request> RoundTripRequest(uint64_t id, const RequestBody& body) {
  return WithFrame(EncodeRequest(id, body), [](const wire::Frame* f) { return ParseRequest(f); });
}

Status ParseStatus(const RequestBody& body) { return RoundTripRequest(1, body).status(); }

TEST(Messages, EveryRequestRoundTrips) {
  uint64_t id = 100;
  for (const auto& body : testing::SampleRequests()) {
    auto r = RoundTripRequest(id, body);
    ASSERT_TRUE(r.ok()) << body.index() << ": " << r.status().ToString();
    EXPECT_EQ(r->id, id);
    EXPECT_EQ(r->body, body) << "variant index " << body.index();
    ++id;
  }
}

TEST(Messages, EveryResponseRoundTrips) {
  uint64_t id = 0;  // 0 is fine for responses (connection-level errors)
  for (const auto& body : testing::SampleResponses()) {
    auto r = WithFrame(EncodeResponse(id, body), [](const wire::Frame* f) { return ParseResponse(f); });
    ASSERT_TRUE(r.ok()) << body.index() << ": " << r.status().ToString();
    EXPECT_EQ(r->id, id);
    EXPECT_EQ(r->body, body) << "variant index " << body.index();
    ++id;
  }
}

TEST(Messages, UnsetSamplingStaysUnset) {
  GenerateRequest g;
  g.session = "s";
  g.text = "";  // "continue" is allowed
  auto r = RoundTripRequest(1, g);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const auto& out = std::get<GenerateRequest>(r->body);
  EXPECT_FALSE(out.sampling.temperature.has_value());
  EXPECT_FALSE(out.sampling.seed.has_value());
  EXPECT_TRUE(out.text.has_value());
  EXPECT_TRUE(out.messages.empty());
  // Explicit zeros are kept as set, distinct from absent.
  g.sampling.temperature = 0.0f;
  g.sampling.seed = 0;
  r = RoundTripRequest(1, g);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(std::get<GenerateRequest>(r->body).sampling.temperature, 0.0f);
  EXPECT_EQ(std::get<GenerateRequest>(r->body).sampling.seed, 0u);
}

TEST(Messages, ErrorReplyCarriesStatusCode) {
  const Status s = Status::ResourceExhausted("too many sessions");
  auto r = WithFrame(EncodeError(9, s), [](const wire::Frame* f) { return ParseResponse(f); });
  ASSERT_TRUE(r.ok());
  const auto& e = std::get<ErrorReply>(r->body);
  EXPECT_EQ(e.ToStatus().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(e.ToStatus().message(), "too many sessions");
}

TEST(Messages, UnknownErrorCodeBecomesInternal) {
  flatbuffers::FlatBufferBuilder b;
  auto msg = b.CreateString("from the future");
  auto err = wire::CreateError(b, static_cast<wire::ErrorCode>(999), msg);
  wire::FinishFrameBuffer(b, wire::CreateFrame(b, 3, wire::Message::Error, err.Union()));
  auto r = WithFrame(EncodeFrame(b), [](const wire::Frame* f) { return ParseResponse(f); });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(std::get<ErrorReply>(r->body).code, StatusCode::kInternal);
}

TEST(Messages, WireEnumsMatchTheEngine) {
  using model::FinishReason;
  EXPECT_EQ(int(wire::FinishReason::Stop), int(FinishReason::kStop));
  EXPECT_EQ(int(wire::FinishReason::Eos), int(FinishReason::kEos));
  EXPECT_EQ(int(wire::FinishReason::Length), int(FinishReason::kLength));
  EXPECT_EQ(int(wire::FinishReason::Cancelled), int(FinishReason::kCancelled));
  EXPECT_EQ(int(wire::FinishReason::Error), int(FinishReason::kError));
  EXPECT_EQ(int(wire::FinishReason::ContextFull), int(FinishReason::kContextFull));
  EXPECT_EQ(int(protocol::FinishReason::kContextFull), int(FinishReason::kContextFull));
  EXPECT_EQ(kMaxStopStrings, model::StopMatcher::kMaxStopStrings);
  EXPECT_EQ(kMaxStopStringBytes, model::StopMatcher::kMaxStopStringBytes);
  // ErrorCode names and values follow StatusCode.
  for (int c = 0; c <= int(wire::ErrorCode::MAX); ++c) {
    std::string wire_name = wire::EnumNameErrorCode(static_cast<wire::ErrorCode>(c));
    std::string status_name(StatusCodeName(static_cast<StatusCode>(c)));
    auto norm = [](std::string s) {
      std::string o;
      for (char ch : s)
        if (std::isalnum(static_cast<unsigned char>(ch))) o += std::tolower(static_cast<unsigned char>(ch));
      return o;
    };
    EXPECT_EQ(norm(wire_name), norm(status_name)) << c;
  }
}

TEST(Messages, TerminalTypes) {
  EXPECT_TRUE(IsTerminal(wire::Message::Done));
  EXPECT_TRUE(IsTerminal(wire::Message::Error));
  EXPECT_TRUE(IsTerminal(wire::Message::Ack));
  EXPECT_TRUE(IsTerminal(wire::Message::HelloReply));
  EXPECT_FALSE(IsTerminal(wire::Message::TokenChunk));
  EXPECT_FALSE(IsTerminal(wire::Message::PrefillProgress));
  EXPECT_FALSE(IsTerminal(wire::Message::Generate));
  EXPECT_TRUE(IsRequest(wire::Message::Health));
  EXPECT_FALSE(IsRequest(wire::Message::HelloReply));
  EXPECT_TRUE(IsRequest(wire::Message::ExportSession));
  EXPECT_TRUE(IsRequest(wire::Message::ImportSession));
  EXPECT_FALSE(IsTerminal(wire::Message::ImportSession));
  EXPECT_FALSE(IsTerminal(wire::Message::ExportChunk));
  EXPECT_TRUE(IsTerminal(wire::Message::ExportDone));
}

void ExpectInvalid(const RequestBody& body, const char* what) {
  const Status s = ParseStatus(body);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << what << ": " << s.ToString();
}

TEST(Messages, TransferRequestsAreChecked) {
  ExpectInvalid(ExportSessionRequest{""}, "empty export name");
  ExpectInvalid(ExportSessionRequest{"a/b"}, "export name with a slash");
  ExpectInvalid(ImportSessionRequest{std::string(".hidden"), 0, "x", false}, "import name with a dot");
  ExpectInvalid(ImportSessionRequest{std::string("late"), 5, "x", false}, "name on a later piece");
}

TEST(Messages, InvalidSamplingValues) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  auto with = [](auto mutate) {
    GenerateRequest g = testing::SampleGenerate();
    mutate(g);
    return RequestBody{g};
  };
  ExpectInvalid(with([](auto& g) { g.sampling.temperature = -0.1f; }), "negative temperature");
  ExpectInvalid(with([&](auto& g) { g.sampling.temperature = nan; }), "NaN temperature");
  ExpectInvalid(with([&](auto& g) { g.sampling.temperature = inf; }), "inf temperature");
  ExpectInvalid(with([](auto& g) { g.sampling.top_k = -1; }), "negative top_k");
  ExpectInvalid(with([](auto& g) { g.sampling.top_p = 1.5f; }), "top_p > 1");
  ExpectInvalid(with([](auto& g) { g.sampling.min_p = -0.01f; }), "min_p < 0");
  ExpectInvalid(with([](auto& g) { g.sampling.repeat_penalty = 0.0f; }), "repeat_penalty 0");
  ExpectInvalid(with([](auto& g) { g.sampling.repeat_last_n = -2; }), "repeat_last_n -2");
  ExpectInvalid(with([](auto& g) { g.sampling.presence_penalty = 2.5f; }), "presence_penalty");
  ExpectInvalid(with([](auto& g) { g.sampling.frequency_penalty = -3.0f; }), "frequency_penalty");
  ExpectInvalid(with([](auto& g) { g.stop = {""}; }), "empty stop string");
  ExpectInvalid(with([](auto& g) { g.stop.assign(kMaxStopStrings + 1, "x"); }), "too many stop strings");
  ExpectInvalid(with([](auto& g) { g.stop = {std::string(kMaxStopStringBytes + 1, 'x')}; }), "long stop");
  ExpectInvalid(with([](auto& g) { g.stop = {"\xff"}; }), "stop not UTF-8");
  // Boundaries are accepted.
  GenerateRequest ok = testing::SampleGenerate();
  ok.sampling.temperature = 0.0f;
  ok.sampling.top_p = 1.0f;
  ok.sampling.min_p = 0.0f;
  ok.sampling.top_k = 0;
  ok.sampling.repeat_last_n = -1;
  ok.stop.assign(kMaxStopStrings, "x");
  EXPECT_TRUE(ParseStatus(ok).ok());
}

TEST(Messages, InvalidGenerateShape) {
  auto with = [](auto mutate) {
    GenerateRequest g = testing::SampleGenerate();
    mutate(g);
    return RequestBody{g};
  };
  ExpectInvalid(with([](auto& g) { g.session = ""; }), "empty session");
  ExpectInvalid(with([](auto& g) { g.session = "a/b"; }), "slash in session");
  ExpectInvalid(with([](auto& g) { g.session = ".hidden"; }), "leading dot");
  ExpectInvalid(with([](auto& g) { g.session = std::string(kMaxSessionNameBytes + 1, 'a'); }), "long session");
  ExpectInvalid(with([](auto& g) { g.text = "both"; }), "messages and text");
  ExpectInvalid(with([](auto& g) { g.messages.clear(); }), "neither messages nor text");
  ExpectInvalid(with([](auto& g) { g.messages[0].role = ""; }), "empty role");
  ExpectInvalid(with([](auto& g) { g.messages[1].content = "bad \xc3"; }), "truncated UTF-8");
  ExpectInvalid(with([](auto& g) { g.messages[1].content = "\xed\xa0\x80"; }), "surrogate");
  ExpectInvalid(with([](auto& g) { g.messages[1].content = "\xc0\xaf"; }), "overlong");
  EXPECT_TRUE(ParseStatus(with([](auto& g) { g.session = std::string(kMaxSessionNameBytes, 'a'); })).ok());
}

TEST(Messages, InvalidOtherRequests) {
  ExpectInvalid(HelloRequest{0, "x"}, "protocol version 0");
  ExpectInvalid(HelloRequest{1, std::string(kMaxClientNameBytes + 1, 'c')}, "long client name");
  ExpectInvalid(CreateSessionRequest{""}, "empty name");
  ExpectInvalid(CreateSessionRequest{"has space"}, "space in name");
  ExpectInvalid(CancelRequest{0}, "cancel id 0");
  ExpectInvalid(GetSessionRequest{""}, "get empty");
  ExpectInvalid(ForkSessionRequest{"a", ""}, "fork to empty");
  ExpectInvalid(ForkSessionRequest{"a", "a"}, "fork to itself");
  ExpectInvalid(DeleteSessionRequest{"\n"}, "delete control char");
}

TEST(Messages, RequestIdZeroIsReserved) {
  auto r = RoundTripRequest(0, HealthRequest{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
}

TEST(Messages, ResponseWhereRequestExpectedAndViceVersa) {
  auto r = WithFrame(EncodeResponse(1, Ack{}), [](const wire::Frame* f) { return ParseRequest(f); });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  auto s = WithFrame(EncodeRequest(1, HealthRequest{}), [](const wire::Frame* f) { return ParseResponse(f); });
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
}

TEST(Messages, InvalidResponseValues) {
  flatbuffers::FlatBufferBuilder b;
  auto done = wire::CreateDone(b, static_cast<wire::FinishReason>(42));
  wire::FinishFrameBuffer(b, wire::CreateFrame(b, 3, wire::Message::Done, done.Union()));
  auto r = WithFrame(EncodeFrame(b), [](const wire::Frame* f) { return ParseResponse(f); });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);

  auto p = WithFrame(EncodeResponse(1, PrefillProgress{10, 5}), [](const wire::Frame* f) { return ParseResponse(f); });
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
}

// A StatsReply frame with one tier whose T2 read histogram has the given
// bounds and counts.
std::string StatsWithHistogram(const std::vector<double>& bounds, const std::vector<uint64_t>& counts) {
  flatbuffers::FlatBufferBuilder b;
  auto h = wire::CreateIoLatency(b, b.CreateString("read"), 1, 0.001, 0.001, b.CreateVector(bounds),
                                 b.CreateVector(counts));
  std::vector<flatbuffers::Offset<wire::IoLatency>> hs = {h};
  auto hv = b.CreateVector(hs);
  auto tier = wire::CreateTierUsage(b, b.CreateString("T2"), 1, 2, 3, 0, 0, 0, 0, hv);
  std::vector<flatbuffers::Offset<wire::TierUsage>> ts = {tier};
  auto tv = b.CreateVector(ts);
  wire::StatsReplyBuilder sb(b);
  sb.add_tiers(tv);
  auto st = sb.Finish();
  wire::FinishFrameBuffer(b, wire::CreateFrame(b, 3, wire::Message::StatsReply, st.Union()));
  return EncodeFrame(b);
}

TEST(Messages, LatencyHistogramsAreChecked) {
  auto parse = [](const std::string& frame) {
    return WithFrame(frame, [](const wire::Frame* f) { return ParseResponse(f); });
  };
  auto ok = parse(StatsWithHistogram({1e-6, 2e-6}, {1, 0, 0}));
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  const auto& t = std::get<StatsReply>(ok->body).tiers.at(0);
  ASSERT_EQ(t.io_latency.size(), 1u);
  EXPECT_EQ(t.io_latency[0].bucket_counts, (std::vector<uint64_t>{1, 0, 0}));
  for (const auto& [bounds, counts] : std::vector<std::pair<std::vector<double>, std::vector<uint64_t>>>{
           {{1e-6, 2e-6}, {1, 0}},                                  // no overflow bucket
           {{2e-6, 1e-6}, {1, 0, 0}},                               // not ascending
           {{1e-6, std::numeric_limits<double>::infinity()}, {1, 0, 0}},  // not finite
           {std::vector<double>(kMaxLatencyBuckets + 1, 1.0), std::vector<uint64_t>(kMaxLatencyBuckets + 2, 0)},
       }) {
    auto r = parse(StatsWithHistogram(bounds, counts));
    ASSERT_FALSE(r.ok()) << bounds.size() << " bounds, " << counts.size() << " counts";
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  }
}

TEST(Messages, TierUsageFromAnOlderPeerHasZeroCounters) {
  flatbuffers::FlatBufferBuilder b;
  auto tier = wire::CreateTierUsage(b, b.CreateString("T1"), 5, 6, 7);
  std::vector<flatbuffers::Offset<wire::TierUsage>> ts = {tier};
  auto tv = b.CreateVector(ts);
  wire::StatsReplyBuilder sb(b);
  sb.add_tiers(tv);
  auto st = sb.Finish();
  wire::FinishFrameBuffer(b, wire::CreateFrame(b, 3, wire::Message::StatsReply, st.Union()));
  auto r = WithFrame(EncodeFrame(b), [](const wire::Frame* f) { return ParseResponse(f); });
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  TierUsage expect;
  expect.tier = "T1";
  expect.pages = 5;
  expect.bytes = 6;
  expect.budget_bytes = 7;
  EXPECT_EQ(std::get<StatsReply>(r->body).tiers.at(0), expect);
}

TEST(Messages, LatencyQuantilesComeFromTheBuckets) {
  IoLatency h;
  EXPECT_EQ(h.QuantileS(0.5), 0);
  h.bucket_bounds_s = {1e-6, 2e-6, 4e-6};
  h.bucket_counts = {50, 49, 0, 1};  // one sample above the last bound
  h.count = 100;
  h.max_s = 1.5;
  EXPECT_DOUBLE_EQ(h.QuantileS(0.5), 1e-6);
  EXPECT_DOUBLE_EQ(h.QuantileS(0.51), 2e-6);
  EXPECT_DOUBLE_EQ(h.QuantileS(0.99), 2e-6);
  EXPECT_DOUBLE_EQ(h.QuantileS(1.0), 1.5);
  h.bucket_counts = {0, 1, 0, 0};
  h.max_s = 1.5e-6;
  EXPECT_DOUBLE_EQ(h.QuantileS(0.5), 1.5e-6) << "capped by the largest sample";
}

TEST(Messages, Utf8Validator) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("plain"));
  EXPECT_TRUE(IsValidUtf8("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("\x80"));
  EXPECT_FALSE(IsValidUtf8("\xe2\x82"));
  EXPECT_FALSE(IsValidUtf8("\xf4\x90\x80\x80"));  // > U+10FFFF
  EXPECT_FALSE(IsValidUtf8("\xe0\x80\x80"));      // overlong
}

}  // namespace
}  // namespace mnemo::protocol
