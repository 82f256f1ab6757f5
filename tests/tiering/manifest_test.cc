// Manifest codec: roundtrips (empty, multi-chunk, every optional field),
// validation of every invariant, and decoding of damaged, truncated,
// reordered and newer-version records.
#include "tiering/manifest.h"

#include <gtest/gtest.h>
#include <xxhash.h>

#include <functional>
#include <random>
#include <utility>

namespace mnemo::tiering {
namespace {

Manifest Sample(uint64_t n_tokens, uint64_t kv_tokens, int32_t page_tokens = 16, uint64_t seed = 1) {
  Manifest m;
  m.owner_uid = 1000;
  m.name = "agent.main";
  m.parent = "agent.root";
  m.model_fingerprint = 0x0123456789abcdefULL;
  m.kv = KvGeometry{30, page_tokens, 3, 64, KvDtype::kF16};
  std::mt19937_64 rng(seed);
  m.tokens.resize(n_tokens);
  for (int32_t& t : m.tokens) t = static_cast<int32_t>(rng() % 49152);
  m.kv_tokens = kv_tokens;
  const uint64_t blocks = BlocksForTokens(kv_tokens, page_tokens);
  for (uint64_t i = 0; i < blocks; ++i) m.blocks.push_back(1000 + 3 * i);
  m.close_text = "\n";
  m.chat_open = true;
  m.turns = 7;
  m.created_unix_ms = 1700000000000;
  m.last_used_unix_ms = 1700000123456;
  m.sampler = SamplerState{42, 99};
  m.turn_seq = 12;
  return m;
}

Result<Manifest> RoundTrip(const Manifest& m) {
  Result<EncodedManifest> e = EncodeManifest(m);
  if (!e.ok()) return e.status();
  return DecodeManifest(e->head, e->chunks, SessionLabel(m.owner_uid, m.name));
}

TEST(ManifestTest, RoundTripsSmallAndEmpty) {
  for (const Manifest& m : {Sample(0, 0), Sample(1, 0), Sample(1, 1), Sample(17, 16), Sample(33, 33)}) {
    Result<Manifest> back = RoundTrip(m);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(*back, m);
  }
}

TEST(ManifestTest, RoundTripsOptionalFieldsAbsent) {
  Manifest m = Sample(40, 39);
  m.parent.clear();
  m.close_text.clear();
  m.chat_open = false;
  m.sampler.reset();
  Result<Manifest> back = RoundTrip(m);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, m);
  EXPECT_FALSE(back->sampler.has_value());
}

TEST(ManifestTest, RoundTripsManyChunks) {
  // 200k tokens at 16 per page: 4 chunks of 65536 tokens, the last partial.
  const Manifest m = Sample(200000, 199999);
  Result<EncodedManifest> e = EncodeManifest(m);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_EQ(e->chunks.size(), 4u);
  Result<Manifest> back = DecodeManifest(e->head, e->chunks, "s");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, m);
  // An odd page size still gives chunks of whole blocks.
  const Manifest odd = Sample(100000, 99000, 48);
  back = RoundTrip(odd);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, odd);
}

TEST(ManifestTest, AppendRewritesOnlyTheLastChunks) {
  Manifest m = Sample(150000, 149990);
  Result<EncodedManifest> a = EncodeManifest(m);
  ASSERT_TRUE(a.ok());
  m.tokens.push_back(5);
  m.kv_tokens = 150000;
  m.blocks.back() = 777777;  // the partial last block rewritten
  Result<EncodedManifest> b = EncodeManifest(m);
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(a->chunks.size(), b->chunks.size());
  EXPECT_EQ(a->chunk_hashes[0], b->chunk_hashes[0]);
  EXPECT_EQ(a->chunk_hashes[1], b->chunk_hashes[1]);
  EXPECT_NE(a->chunk_hashes[2], b->chunk_hashes[2]);
}

TEST(ManifestTest, ValidationRejectsEveryBrokenInvariant) {
  auto expect_invalid = [](Manifest m, std::string_view what) {
    Status st = ValidateManifest(m);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << what;
    EXPECT_NE(st.message().find("session '"), std::string_view::npos) << st.ToString();
    EXPECT_FALSE(EncodeManifest(m).ok()) << what;
  };
  Manifest m = Sample(50, 40);
  ASSERT_TRUE(ValidateManifest(m).ok());
  const std::vector<std::pair<std::string_view, std::function<void(Manifest&)>>> breaks = {
      {"empty name", [](Manifest& x) { x.name.clear(); }},
      {"long name", [](Manifest& x) { x.name.assign(kMaxSessionNameBytes + 1, 'a'); }},
      {"NUL in name", [](Manifest& x) { x.name = std::string("a\0b", 3); }},
      {"NUL in parent", [](Manifest& x) { x.parent = std::string("p\0", 2); }},
      {"layers", [](Manifest& x) { x.kv.n_layers = 0; }},
      {"page tokens",
       [](Manifest& x) {
         x.kv.page_tokens = 0;
         x.blocks.clear();
         x.kv_tokens = 0;
       }},
      {"head dim", [](Manifest& x) { x.kv.head_dim = kMaxHeadDim + 1; }},
      {"dtype", [](Manifest& x) { x.kv.dtype = static_cast<KvDtype>(9); }},
      {"kv > tokens", [](Manifest& x) { x.kv_tokens = 51; }},
      {"too few blocks", [](Manifest& x) { x.blocks.pop_back(); }},
      {"too many blocks", [](Manifest& x) { x.blocks.push_back(5); }},
      {"duplicate slot", [](Manifest& x) { x.blocks[1] = x.blocks[0]; }},
      {"negative token", [](Manifest& x) { x.tokens[3] = -1; }},
      {"close text", [](Manifest& x) { x.close_text.assign(kMaxCloseTextBytes + 1, 'x'); }},
  };
  for (const auto& [what, breaker] : breaks) {
    Manifest x = m;
    breaker(x);
    expect_invalid(x, what);
  }
}

TEST(ManifestTest, EveryHeadByteFlipIsCorruptionNamingTheSession) {
  const Manifest m = Sample(70, 65);
  Result<EncodedManifest> e = EncodeManifest(m);
  ASSERT_TRUE(e.ok());
  const std::string what = SessionLabel(m.owner_uid, m.name);
  for (size_t i = 0; i < e->head.size(); ++i) {
    for (uint8_t bit : {0x01, 0x80}) {
      std::string head = e->head;
      head[i] = static_cast<char>(head[i] ^ bit);
      Result<Manifest> r = DecodeManifest(head, e->chunks, what);
      ASSERT_FALSE(r.ok()) << "byte " << i;
      EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << "byte " << i << ": " << r.status().ToString();
      EXPECT_EQ(r.status().message().substr(0, what.size()), what) << r.status().ToString();
    }
  }
}

TEST(ManifestTest, EveryChunkByteFlipAndTruncationIsCorruption) {
  const Manifest m = Sample(70, 65);
  Result<EncodedManifest> e = EncodeManifest(m);
  ASSERT_TRUE(e.ok());
  ASSERT_EQ(e->chunks.size(), 1u);
  for (size_t i = 0; i < e->chunks[0].size(); ++i) {
    std::vector<std::string> chunks = e->chunks;
    chunks[0][i] = static_cast<char>(chunks[0][i] ^ 0x10);
    Result<Manifest> r = DecodeManifest(e->head, chunks, "s");
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << "byte " << i;
  }
  for (size_t n = 0; n < e->head.size(); ++n) {
    Result<Manifest> r = DecodeManifest(std::string_view(e->head).substr(0, n), e->chunks, "s");
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << "head cut at " << n;
  }
  for (size_t n = 0; n < e->chunks[0].size(); ++n) {
    std::vector<std::string> chunks{e->chunks[0].substr(0, n)};
    EXPECT_EQ(DecodeManifest(e->head, chunks, "s").status().code(), StatusCode::kCorruption) << "chunk cut at " << n;
  }
}

TEST(ManifestTest, MissingExtraAndForeignChunksAreCorruption) {
  const Manifest m = Sample(140000, 140000);
  Result<EncodedManifest> e = EncodeManifest(m);
  ASSERT_TRUE(e.ok());
  ASSERT_EQ(e->chunks.size(), 3u);
  std::vector<std::string> missing(e->chunks.begin(), e->chunks.end() - 1);
  EXPECT_EQ(DecodeManifest(e->head, missing, "s").status().code(), StatusCode::kCorruption);
  std::vector<std::string> extra = e->chunks;
  extra.push_back(e->chunks.back());
  EXPECT_EQ(DecodeManifest(e->head, extra, "s").status().code(), StatusCode::kCorruption);
  std::vector<std::string> swapped = e->chunks;
  std::swap(swapped[0], swapped[1]);
  EXPECT_EQ(DecodeManifest(e->head, swapped, "s").status().code(), StatusCode::kCorruption);
  // A chunk of another version of the same session (an older turn).
  Manifest older = m;
  older.tokens[1] ^= 1;
  Result<EncodedManifest> o = EncodeManifest(older);
  ASSERT_TRUE(o.ok());
  std::vector<std::string> stale = e->chunks;
  stale[0] = o->chunks[0];
  Result<Manifest> r = DecodeManifest(e->head, stale, "session 'x' of uid 1");
  EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
  EXPECT_NE(r.status().message().find("chunk 0 checksum mismatch"), std::string_view::npos) << r.status().ToString();
}

// A head that is intact but written by a newer codec is Unsupported, not
// Corruption.
TEST(ManifestTest, NewerHeadVersionIsUnsupported) {
  const Manifest m = Sample(10, 10);
  Result<EncodedManifest> e = EncodeManifest(m);
  ASSERT_TRUE(e.ok());
  std::string head = e->head;
  head[4] = static_cast<char>(kManifestVersion + 1);
  const uint64_t h = XXH3_64bits(head.data(), head.size() - 8);
  for (int i = 0; i < 8; ++i) head[head.size() - 8 + i] = static_cast<char>((h >> (8 * i)) & 0xff);
  Result<Manifest> r = DecodeManifest(head, e->chunks, "s");
  EXPECT_EQ(r.status().code(), StatusCode::kUnsupported) << r.status().ToString();
}

TEST(ManifestTest, SessionLabelEscapes) {
  EXPECT_EQ(SessionLabel(7, "a-b"), "session 'a-b' of uid 7");
  EXPECT_EQ(SessionLabel(7, std::string("a\n'\xff", 4)), "session 'a\\x0a\\x27\\xff' of uid 7");
}

}  // namespace
}  // namespace mnemo::tiering
