// Session export format: round trips (pieces of any size), every truncation
// point, a flipped byte in every part, another model or KV layout, another
// format version, trailing bytes, and a handler's error.
#include "tiering/export_format.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "tiering/index.h"

namespace mnemo::tiering {
namespace {

constexpr uint64_t kFingerprint = 0xfeedbeef12345678ULL;

ExportModel Model(int32_t page_tokens = 4) {
  ExportModel m;
  m.model_fingerprint = kFingerprint;
  m.kv = KvGeometry{3, page_tokens, 1, 8, KvDtype::kF16};
  m.layout = *BlockLayout::For(kernels::KvLayout{page_tokens, 1, 8}, 3);
  return m;
}

Manifest Sample(uint64_t n_tokens, uint64_t kv_tokens) {
  Manifest m;
  m.name = "agent.main";
  m.parent = "agent.root";
  m.model_fingerprint = kFingerprint;
  m.kv = Model().kv;
  for (uint64_t i = 0; i < n_tokens; ++i) m.tokens.push_back(static_cast<int32_t>((i * 7919) % 49152));
  m.kv_tokens = kv_tokens;
  m.close_text = "\n";
  m.chat_open = true;
  m.turns = 2;
  m.created_unix_ms = 1700000000000;
  m.last_used_unix_ms = 1700000123456;
  m.sampler = SamplerState{42, 99};
  return m;
}

// A block in T2 layout with deterministic page contents and zero padding.
std::vector<uint8_t> Block(const BlockLayout& L, uint64_t i, std::vector<uint64_t>* sums) {
  std::vector<uint8_t> b(L.block_bytes, 0);
  sums->assign(L.n_layers, 0);
  for (int32_t l = 0; l < L.n_layers; ++l) {
    uint8_t* p = b.data() + L.LayerOffset(l);
    for (size_t k = 0; k < L.page_bytes; ++k) p[k] = static_cast<uint8_t>(i * 31 + l * 7 + k);
    (*sums)[l] = PageChecksum(p, L.page_bytes);
  }
  return b;
}

struct Written {
  std::string file;
  std::vector<std::string> pieces;
  ExportSummary summary;
};

Written Write(const Manifest& m, size_t chunk_bytes = 100) {
  const ExportModel model = Model();
  Written w;
  ExportWriter writer(model, [&](std::string_view p) {
    w.pieces.emplace_back(p);
    w.file.append(p);
    return Status::Ok();
  }, chunk_bytes);
  EXPECT_TRUE(writer.Begin(m).ok());
  for (uint64_t i = 0; i < BlocksForTokens(m.kv_tokens, model.kv.page_tokens); ++i) {
    std::vector<uint64_t> sums;
    std::vector<uint8_t> b = Block(model.layout, i, &sums);
    EXPECT_TRUE(writer.AddBlock(b.data(), sums).ok());
  }
  Result<ExportSummary> s = writer.Finish();
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  w.summary = *s;
  return w;
}

struct ReadBack {
  Status status;
  Manifest manifest;
  std::vector<std::vector<uint8_t>> blocks;  // contiguous pages
  std::vector<std::vector<uint64_t>> sums;
  ExportSummary summary;
};

// Feeds `file` in pieces of `piece` bytes (0: all at once).
ReadBack Read(std::string_view file, size_t piece = 0, ExportModel model = Model()) {
  ReadBack out;
  ExportReader::Handlers h;
  h.on_manifest = [&](Manifest m) {
    out.manifest = std::move(m);
    return Status::Ok();
  };
  h.on_block = [&](uint64_t index, const uint8_t* pages, std::span<const uint64_t> sums) {
    EXPECT_EQ(index, out.blocks.size());
    out.blocks.emplace_back(pages, pages + model.layout.n_layers * model.layout.page_bytes);
    out.sums.emplace_back(sums.begin(), sums.end());
    return Status::Ok();
  };
  ExportReader reader(model, h);
  if (piece == 0) piece = std::max<size_t>(file.size(), 1);
  for (size_t at = 0; at < file.size(); at += piece) {
    out.status = reader.Feed(file.substr(at, piece));
    if (!out.status.ok()) return out;
  }
  Result<ExportSummary> s = reader.Finish();
  out.status = s.status();
  if (s.ok()) out.summary = *s;
  return out;
}

TEST(ExportFormatTest, RoundTripsAnyPieceSize) {
  const Manifest m = Sample(23, 22);  // 6 blocks, the last partial
  const Written w = Write(m);
  for (const auto& p : w.pieces) EXPECT_LE(p.size(), 100u);
  EXPECT_EQ(w.summary.bytes, w.file.size());
  EXPECT_EQ(w.summary.checksum, XXH3_64bits(w.file.data(), w.file.size()));
  for (size_t piece : {0, 1, 7, 64, 100, 4096}) {
    ReadBack r = Read(w.file, piece);
    ASSERT_TRUE(r.status.ok()) << piece << ": " << r.status.ToString();
    Manifest expect = m;
    EXPECT_EQ(r.manifest, expect);
    EXPECT_EQ(r.summary.bytes, w.summary.bytes);
    EXPECT_EQ(r.summary.checksum, w.summary.checksum);
    ASSERT_EQ(r.blocks.size(), 6u);
    const BlockLayout& L = Model().layout;
    for (uint64_t i = 0; i < 6; ++i) {
      std::vector<uint64_t> sums;
      std::vector<uint8_t> b = Block(L, i, &sums);
      EXPECT_EQ(r.sums[i], sums);
      for (int32_t l = 0; l < L.n_layers; ++l)
        EXPECT_EQ(0, memcmp(r.blocks[i].data() + l * L.page_bytes, b.data() + L.LayerOffset(l), L.page_bytes));
    }
  }
}

TEST(ExportFormatTest, RoundTripsWithoutKvAndOptionalFields) {
  Manifest m = Sample(5, 0);
  m.parent.clear();
  m.close_text.clear();
  m.chat_open = false;
  m.sampler.reset();
  const Written w = Write(m);
  ReadBack r = Read(w.file);
  ASSERT_TRUE(r.status.ok()) << r.status.ToString();
  EXPECT_EQ(r.manifest, m);
  EXPECT_TRUE(r.blocks.empty());
}

TEST(ExportFormatTest, EveryTruncationIsCorruption) {
  const Written w = Write(Sample(9, 9));
  for (size_t n = 0; n < w.file.size(); ++n) {
    ReadBack r = Read(std::string_view(w.file).substr(0, n), 13);
    ASSERT_EQ(r.status.code(), StatusCode::kCorruption) << "truncated at " << n << ": " << r.status.ToString();
  }
}

TEST(ExportFormatTest, EveryFlippedByteIsCorruption) {
  const Written w = Write(Sample(9, 9));
  const std::string_view parts[] = {"header", "manifest", "KV blocks", "trailer"};
  std::vector<bool> seen(4);
  for (size_t at = 0; at < w.file.size(); ++at) {
    std::string bad = w.file;
    bad[at] ^= 0x20;
    ReadBack r = Read(bad, 50);
    ASSERT_EQ(r.status.code(), StatusCode::kCorruption) << "flipped byte " << at << ": " << r.status.ToString();
    for (size_t p = 0; p < 4; ++p)
      if (r.status.message().find(parts[p]) != std::string_view::npos) seen[p] = true;
  }
  for (size_t p = 0; p < 4; ++p) EXPECT_TRUE(seen[p]) << "no error named the " << parts[p];
}

TEST(ExportFormatTest, FlippedPayloadNamesBlockAndLayer) {
  const Written w = Write(Sample(9, 9));
  std::string bad = w.file;
  bad[bad.size() - kExportTrailerBytes - 5] ^= 1;  // last page of the last block
  ReadBack r = Read(bad);
  ASSERT_EQ(r.status.code(), StatusCode::kCorruption);
  EXPECT_NE(r.status.message().find("layer 2 in block 2 fails its checksum"), std::string_view::npos)
      << r.status.ToString();
}

TEST(ExportFormatTest, AnotherModelOrLayoutIsFailedPrecondition) {
  const Written w = Write(Sample(9, 9));
  ExportModel other = Model();
  other.model_fingerprint ^= 1;
  ReadBack r = Read(w.file, 0, other);
  EXPECT_EQ(r.status.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status.message().find("another model file"), std::string_view::npos) << r.status.ToString();
  r = Read(w.file, 0, Model(8));
  EXPECT_EQ(r.status.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status.message().find("another KV layout"), std::string_view::npos) << r.status.ToString();
}

TEST(ExportFormatTest, NewerVersionIsFailedPrecondition) {
  std::string file = Write(Sample(9, 9)).file;
  file[4] = 2;
  const uint64_t sum = XXH3_64bits(file.data(), 56);
  for (int i = 0; i < 8; ++i) file[56 + i] = static_cast<char>((sum >> (8 * i)) & 0xff);
  ReadBack r = Read(file);
  EXPECT_EQ(r.status.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status.message().find("format version 2"), std::string_view::npos) << r.status.ToString();
}

TEST(ExportFormatTest, NotAnExportAndTrailingBytes) {
  ReadBack r = Read(std::string(200, 'x'));
  EXPECT_EQ(r.status.code(), StatusCode::kCorruption);
  EXPECT_NE(r.status.message().find("not a mnemo session export"), std::string_view::npos);
  const Written w = Write(Sample(9, 9));
  r = Read(w.file + "z", 0);
  EXPECT_EQ(r.status.code(), StatusCode::kCorruption);
  EXPECT_NE(r.status.message().find("after the trailer"), std::string_view::npos);
}

TEST(ExportFormatTest, HandlerErrorStopsTheRead) {
  const Written w = Write(Sample(9, 9));
  ExportReader::Handlers h;
  int blocks = 0;
  h.on_block = [&](uint64_t, const uint8_t*, std::span<const uint64_t>) {
    return ++blocks == 2 ? Status::IOError("disk full") : Status::Ok();
  };
  ExportReader reader(Model(), h);
  Status s = reader.Feed(w.file);
  EXPECT_EQ(s.code(), StatusCode::kIOError);
  EXPECT_EQ(blocks, 2);
  EXPECT_EQ(reader.Feed("x").code(), StatusCode::kIOError);  // sticks
}

TEST(ExportFormatTest, WriterChecksItsInput) {
  const ExportModel model = Model();
  ExportWriter writer(model, [](std::string_view) { return Status::Ok(); });
  ASSERT_TRUE(writer.Begin(Sample(9, 9)).ok());
  EXPECT_EQ(writer.Finish().status().code(), StatusCode::kFailedPrecondition);  // blocks missing
  Manifest m = Sample(9, 9);
  m.kv.page_tokens = 8;
  ExportWriter w2(model, [](std::string_view) { return Status::Ok(); });
  EXPECT_EQ(w2.Begin(m).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mnemo::tiering
