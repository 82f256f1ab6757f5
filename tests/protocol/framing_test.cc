// FrameDecoder: splits, limits, verification and a fuzz loop over random and
// mutated frames.
#include "protocol/framing.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <random>

#include "protocol/messages.h"
#include "tests/protocol/test_frames.h"

// The replacement pair below is consistent; GCC cannot see that.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

// Largest single allocation while tracking is on: proves that a lying length
// prefix does not make the decoder allocate that much.
namespace {
std::atomic<bool> g_track{false};
std::atomic<size_t> g_max_alloc{0};
}  // namespace

void* operator new(size_t n) {
  if (g_track.load(std::memory_order_relaxed)) {
    size_t prev = g_max_alloc.load(std::memory_order_relaxed);
    while (n > prev && !g_max_alloc.compare_exchange_weak(prev, n)) {
    }
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace mnemo::protocol {
namespace {

using testing::AllSampleFrames;

std::string Header(uint32_t len) {
  std::string h(4, '\0');
  for (int i = 0; i < 4; ++i) h[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  return h;
}

// Drains the decoder: the ids of complete frames, and the first error.
struct Drained {
  std::vector<uint64_t> ids;
  std::vector<wire::Message> types;
  Status error;
};
Drained Drain(FrameDecoder& d) {
  Drained out;
  for (;;) {
    auto r = d.Next();
    if (!r.ok()) {
      out.error = r.status();
      return out;
    }
    if (!r->has_value()) return out;
    out.ids.push_back((*r)->id);
    out.types.push_back((*r)->type);
  }
}

TEST(Framing, HeaderIsLittleEndianLength) {
  const std::string f = EncodeRequest(1, HealthRequest{});
  ASSERT_GE(f.size(), 4u);
  const uint32_t len = uint8_t(f[0]) | uint8_t(f[1]) << 8 | uint8_t(f[2]) << 16 | uint32_t(uint8_t(f[3])) << 24;
  EXPECT_EQ(len, f.size() - 4);
}

TEST(Framing, SeveralFramesInOneBuffer) {
  const auto frames = AllSampleFrames();
  std::string all;
  for (const auto& f : frames) all += f;
  FrameDecoder d;
  d.Feed(all);
  Drained got = Drain(d);
  ASSERT_TRUE(got.error.ok()) << got.error.ToString();
  ASSERT_EQ(got.ids.size(), frames.size());
  for (size_t i = 0; i < frames.size(); ++i) EXPECT_EQ(got.ids[i], i + 1);
  EXPECT_TRUE(d.idle());
  EXPECT_EQ(d.buffered_bytes(), 0u);  // the final Next() released the last body
}

TEST(Framing, ByteAtATime) {
  const auto frames = AllSampleFrames();
  std::string all;
  for (const auto& f : frames) all += f;
  FrameDecoder d;
  std::vector<uint64_t> ids;
  for (char c : all) {
    d.Feed(std::string_view(&c, 1));
    Drained got = Drain(d);
    ASSERT_TRUE(got.error.ok()) << got.error.ToString();
    ids.insert(ids.end(), got.ids.begin(), got.ids.end());
  }
  ASSERT_EQ(ids.size(), frames.size());
  for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(ids[i], i + 1);
}

TEST(Framing, RandomSplits) {
  const auto frames = AllSampleFrames();
  std::string all;
  for (int rep = 0; rep < 3; ++rep)
    for (const auto& f : frames) all += f;
  std::mt19937_64 rng(42);
  for (int trial = 0; trial < 50; ++trial) {
    FrameDecoder d;
    size_t pos = 0, n = 0;
    while (pos < all.size()) {
      const size_t k = std::min<size_t>(all.size() - pos, rng() % 97 + 1);
      d.Feed(std::string_view(all).substr(pos, k));
      pos += k;
      Drained got = Drain(d);
      ASSERT_TRUE(got.error.ok());
      n += got.ids.size();
    }
    EXPECT_EQ(n, 3 * frames.size());
  }
}

TEST(Framing, TruncatedFrameWaitsForTheRest) {
  const std::string f = EncodeRequest(5, testing::SampleGenerate());
  FrameDecoder d;
  d.Feed(std::string_view(f).substr(0, 2));  // partial header
  auto r = d.Next();
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  d.Feed(std::string_view(f).substr(2, f.size() - 3));  // all but the last byte
  r = d.Next();
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  EXPECT_FALSE(d.idle());
  EXPECT_FALSE(d.failed());
  d.Feed(std::string_view(f).substr(f.size() - 1));
  r = d.Next();
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->id, 5u);
  EXPECT_EQ((*r)->type, wire::Message::Generate);
}

TEST(Framing, TruncatedFlatBufferIsCorruption) {
  // The header is consistent with the bytes, but the FlatBuffer inside is cut.
  const std::string f = EncodeRequest(5, testing::SampleGenerate());
  const std::string body = f.substr(4, (f.size() - 4) / 2);
  FrameDecoder d;
  d.Feed(Header(body.size()) + body);
  auto r = d.Next();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
  EXPECT_TRUE(d.failed());
}

TEST(Framing, OversizeLengthIsRejectedWithoutAllocating) {
  FrameDecoder d;  // 1 MiB limit
  g_max_alloc = 0;
  g_track = true;
  d.Feed(Header(0xffffffffu) + std::string(16, 'x'));
  auto r = d.Next();
  g_track = false;
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted) << r.status().ToString();
  EXPECT_LT(g_max_alloc.load(), 4096u);
  EXPECT_TRUE(d.failed());
  // Stays failed, even when valid frames follow.
  d.Feed(EncodeRequest(1, HealthRequest{}));
  r = d.Next();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
}

TEST(Framing, LengthAtTheLimitGrowsOnlyWithReceivedBytes) {
  FrameDecoder d(DecoderLimits{.max_frame_bytes = 1u << 20});
  g_max_alloc = 0;
  g_track = true;
  d.Feed(Header(1u << 20) + std::string(100, 'x'));
  auto r = d.Next();
  g_track = false;
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  EXPECT_LT(g_max_alloc.load(), 4096u);
  EXPECT_LE(d.buffered_bytes(), 100u);
}

TEST(Framing, ConfiguredLimitApplies) {
  const std::string f = EncodeRequest(1, testing::SampleGenerate());
  FrameDecoder small(DecoderLimits{.max_frame_bytes = 64});
  small.Feed(f);
  auto r = small.Next();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  FrameDecoder exact(DecoderLimits{.max_frame_bytes = static_cast<uint32_t>(f.size() - 4)});
  exact.Feed(f);
  r = exact.Next();
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->has_value());
}

TEST(Framing, ZeroLengthFrame) {
  FrameDecoder d;
  d.Feed(Header(0));
  auto r = d.Next();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(d.failed());
}

TEST(Framing, TinyAndGarbageBodiesAreCorruption) {
  for (uint32_t n : {1u, 3u, 4u, 7u, 8u, 12u, 64u}) {
    FrameDecoder d;
    d.Feed(Header(n) + std::string(n, '\xab'));
    auto r = d.Next();
    ASSERT_FALSE(r.ok()) << n;
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << n;
  }
}

TEST(Framing, WrongFileIdentifierIsCorruption) {
  std::string f = EncodeRequest(1, HealthRequest{});
  // The identifier sits right after the root offset.
  ASSERT_EQ(f.substr(8, 4), "MNMO");
  f[8] = 'X';
  FrameDecoder d;
  d.Feed(f);
  auto r = d.Next();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
}

std::string FrameWithType(uint64_t id, uint8_t type) {
  flatbuffers::FlatBufferBuilder b;
  auto ack = wire::CreateAck(b);
  wire::FrameBuilder fr(b);
  fr.add_id(id);
  fr.add_message_type(static_cast<wire::Message>(type));
  if (type != 0) fr.add_message(ack.Union());
  wire::FinishFrameBuffer(b, fr.Finish());
  return EncodeFrame(b);
}

TEST(Framing, UnknownUnionTypeIsInvalidArgumentAndNotFatal) {
  FrameDecoder d;
  d.Feed(FrameWithType(77, 200) + FrameWithType(78, 0) + EncodeRequest(79, HealthRequest{}));
  auto r = d.Next();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().ToString();
  EXPECT_EQ(d.error_id(), 77u);
  EXPECT_FALSE(d.failed());
  r = d.Next();  // NONE
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(d.error_id(), 78u);
  r = d.Next();
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->has_value());
  EXPECT_EQ((*r)->id, 79u);
  EXPECT_EQ(d.error_id(), 0u);
}

TEST(Framing, DeepOrWideFramesHitVerifierLimits) {
  // 300 sessions in a list: 301 tables plus the frame.
  SessionList list;
  for (int i = 0; i < 300; ++i) list.sessions.push_back(testing::SampleInfo("s" + std::to_string(i)));
  const std::string f = EncodeResponse(1, list);
  FrameDecoder tight(DecoderLimits{.max_tables = 100});
  tight.Feed(f);
  auto r = tight.Next();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
  FrameDecoder normal;
  normal.Feed(f);
  r = normal.Next();
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->has_value());
}

// Decodes `bytes` fed in random chunks; every outcome must be a verified
// frame (which then parses to a value or a typed error) or a typed error.
void FuzzOne(const std::string& bytes, std::mt19937_64& rng, size_t* frames, size_t* errors) {
  FrameDecoder d(DecoderLimits{.max_frame_bytes = 4096});
  size_t pos = 0;
  while (pos < bytes.size()) {
    const size_t k = std::min<size_t>(bytes.size() - pos, rng() % 64 + 1);
    d.Feed(std::string_view(bytes).substr(pos, k));
    pos += k;
    for (;;) {
      auto r = d.Next();
      if (!r.ok()) {
        const StatusCode c = r.status().code();
        ASSERT_TRUE(c == StatusCode::kCorruption || c == StatusCode::kInvalidArgument ||
                    c == StatusCode::kResourceExhausted)
            << r.status().ToString();
        ++*errors;
        if (d.failed()) return;
        continue;
      }
      if (!r->has_value()) break;
      ++*frames;
      const wire::Frame* f = (*r)->frame;
      if (IsRequest(f->message_type())) {
        auto req = ParseRequest(f);
        if (!req.ok()) {
          ASSERT_EQ(req.status().code(), StatusCode::kInvalidArgument);
        }
      } else {
        auto resp = ParseResponse(f);
        if (!resp.ok()) {
          ASSERT_EQ(resp.status().code(), StatusCode::kInvalidArgument);
        }
      }
    }
  }
}

TEST(Framing, FuzzRandomBuffers) {
  std::mt19937_64 rng(1234);
  size_t frames = 0, errors = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string buf(rng() % 512, '\0');
    for (auto& c : buf) c = static_cast<char>(rng());
    if (i % 2 == 0 && buf.size() >= 4) {  // plausible length prefix
      const uint32_t len = static_cast<uint32_t>(rng() % (buf.size()));
      for (int k = 0; k < 4; ++k) buf[k] = static_cast<char>((len >> (8 * k)) & 0xff);
    }
    FuzzOne(buf, rng, &frames, &errors);
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_GT(errors, 1000u);
}

TEST(Framing, FuzzMutatedValidFrames) {
  const auto samples = AllSampleFrames();
  std::mt19937_64 rng(99);
  size_t frames = 0, errors = 0;
  for (int i = 0; i < 6000; ++i) {
    std::string f = samples[rng() % samples.size()];
    const int mutations = 1 + static_cast<int>(rng() % 4);
    for (int m = 0; m < mutations; ++m) {
      const size_t at = 4 + rng() % (f.size() - 4);  // keep the header honest
      switch (rng() % 3) {
        case 0: f[at] = static_cast<char>(rng()); break;
        case 1: f[at] ^= static_cast<char>(1u << (rng() % 8)); break;
        case 2: f[at] = static_cast<char>(rng() % 2 ? 0xff : 0x00); break;
      }
    }
    if (i % 10 == 0) f.resize(4 + rng() % (f.size() - 4));  // truncated stream
    FuzzOne(f + samples[rng() % samples.size()], rng, &frames, &errors);
    if (::testing::Test::HasFatalFailure()) return;
  }
  // Both outcomes occur: many mutations hit padding or scalar payloads.
  EXPECT_GT(frames, 100u);
  EXPECT_GT(errors, 100u);
}

}  // namespace
}  // namespace mnemo::protocol
