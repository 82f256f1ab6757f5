// Session export files: the writer and the verifying, incremental reader.
#include "tiering/export_format.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tiering/le_codec.h"

namespace mnemo::tiering {
namespace {

using le::Put;
using le::PutString;
using Cursor = le::Reader;

constexpr uint32_t kHeaderMagic = 0x58454e4d;    // "MNEX"
constexpr uint32_t kManifestMagic = 0x4d584e4d;  // "MNXM"
constexpr uint32_t kBlockMagic = 0x42584e4d;     // "MNXB"
constexpr uint32_t kTrailerMagic = 0x54584e4d;   // "MNXT"
constexpr size_t kManifestHeadBytes = 16;
constexpr size_t kBlockHeadBytes = 16;
constexpr uint64_t kMaxManifestBodyBytes =
    2 * (2 + kMaxSessionNameBytes) + 8 + 4 * kMaxManifestTokens + 8 + 4 + kMaxCloseTextBytes + 64;

uint64_t Hash(std::string_view b) { return XXH3_64bits(b.data(), b.size()); }

std::string GeometryText(const KvGeometry& kv, uint64_t page_bytes) {
  return std::to_string(kv.n_layers) + " layers, " + std::to_string(kv.page_tokens) + " tokens per page, " +
         std::to_string(kv.n_kv_heads) + " KV heads of " + std::to_string(kv.head_dim) + ", dtype " +
         std::to_string(static_cast<uint32_t>(kv.dtype)) + ", " + std::to_string(page_bytes) + "-byte pages";
}

XXH3_state_t* NewHash() {
  XXH3_state_t* s = XXH3_createState();
  MNEMO_CHECK(s != nullptr);
  XXH3_64bits_reset(s);
  return s;
}

}  // namespace

// ------------------------------------------------------------------ writer

ExportWriter::ExportWriter(ExportModel model, ExportSink sink, size_t chunk_bytes)
    : model_(model), sink_(std::move(sink)), chunk_bytes_(std::max<size_t>(chunk_bytes, 1)), hash_(NewHash()) {}

ExportWriter::~ExportWriter() { XXH3_freeState(hash_); }

Status ExportWriter::Emit(std::string_view bytes) {
  XXH3_64bits_update(hash_, bytes.data(), bytes.size());
  bytes_ += bytes.size();
  while (!bytes.empty()) {
    const size_t n = std::min(bytes.size(), chunk_bytes_ - out_.size());
    out_.append(bytes.data(), n);
    bytes.remove_prefix(n);
    if (out_.size() == chunk_bytes_) MNEMO_RETURN_IF_ERROR(Flush());
  }
  return Status::Ok();
}

Status ExportWriter::Flush() {
  if (out_.empty()) return Status::Ok();
  Status s = sink_(out_);
  out_.clear();
  return s;
}

Status ExportWriter::Begin(const Manifest& m) {
  MNEMO_CHECK(!begun_);
  begun_ = true;
  const std::string label = SessionLabel(m.owner_uid, m.name);
  if (!(m.kv == model_.kv)) return Status::InvalidArgument(label + ": KV geometry is not the model's");
  if (m.name.empty() || m.name.size() > kMaxSessionNameBytes || m.parent.size() > kMaxSessionNameBytes ||
      m.tokens.size() > kMaxManifestTokens || m.close_text.size() > kMaxCloseTextBytes || m.kv_tokens > m.tokens.size())
    return Status::InvalidArgument(label + ": manifest out of the export bounds");
  n_blocks_ = BlocksForTokens(m.kv_tokens, model_.kv.page_tokens);

  std::string h;
  h.reserve(kExportHeaderBytes);
  Put<uint32_t>(&h, kHeaderMagic);
  Put<uint16_t>(&h, kExportVersion);
  Put<uint16_t>(&h, 0);
  Put<uint64_t>(&h, model_.model_fingerprint);
  Put<int32_t>(&h, model_.kv.n_layers);
  Put<int32_t>(&h, model_.kv.page_tokens);
  Put<int32_t>(&h, model_.kv.n_kv_heads);
  Put<int32_t>(&h, model_.kv.head_dim);
  Put<uint32_t>(&h, static_cast<uint32_t>(model_.kv.dtype));
  Put<uint32_t>(&h, 0);
  Put<uint64_t>(&h, model_.layout.page_bytes);
  Put<uint64_t>(&h, n_blocks_);
  Put<uint64_t>(&h, Hash(h));
  MNEMO_CHECK(h.size() == kExportHeaderBytes);
  MNEMO_RETURN_IF_ERROR(Emit(h));

  std::string body;
  body.reserve(64 + m.name.size() + m.parent.size() + 4 * m.tokens.size() + m.close_text.size());
  PutString<uint16_t>(&body, m.name);
  PutString<uint16_t>(&body, m.parent);
  Put<uint64_t>(&body, m.tokens.size());
  for (int32_t t : m.tokens) Put<int32_t>(&body, t);
  Put<uint64_t>(&body, m.kv_tokens);
  PutString<uint32_t>(&body, m.close_text);
  Put<uint8_t>(&body, m.chat_open ? 1 : 0);
  Put<uint32_t>(&body, m.turns);
  Put<uint64_t>(&body, m.created_unix_ms);
  Put<uint64_t>(&body, m.last_used_unix_ms);
  Put<uint8_t>(&body, m.sampler ? 1 : 0);
  Put<uint64_t>(&body, m.sampler ? m.sampler->seed : 0);
  Put<uint64_t>(&body, m.sampler ? m.sampler->draws : 0);
  std::string head;
  Put<uint32_t>(&head, kManifestMagic);
  Put<uint32_t>(&head, 0);
  Put<uint64_t>(&head, body.size());
  MNEMO_RETURN_IF_ERROR(Emit(head));
  MNEMO_RETURN_IF_ERROR(Emit(body));
  std::string sum;
  Put<uint64_t>(&sum, Hash(body));
  return Emit(sum);
}

Status ExportWriter::AddBlock(const uint8_t* block, std::span<const uint64_t> page_checksums) {
  MNEMO_CHECK(begun_);
  const BlockLayout& L = model_.layout;
  if (next_block_ >= n_blocks_) return Status::FailedPrecondition("export: more blocks than the manifest's KV");
  if (page_checksums.size() != static_cast<size_t>(L.n_layers))
    return Status::InvalidArgument("export: block has the wrong number of page checksums");
  std::string head;
  head.reserve(kBlockHeadBytes + 8 * page_checksums.size());
  Put<uint32_t>(&head, kBlockMagic);
  Put<uint32_t>(&head, 0);
  Put<uint64_t>(&head, next_block_);
  for (uint64_t c : page_checksums) Put<uint64_t>(&head, c);
  MNEMO_RETURN_IF_ERROR(Emit(head));
  for (int32_t l = 0; l < L.n_layers; ++l)
    MNEMO_RETURN_IF_ERROR(
        Emit(std::string_view(reinterpret_cast<const char*>(block + L.LayerOffset(l)), L.page_bytes)));
  ++next_block_;
  return Status::Ok();
}

Result<ExportSummary> ExportWriter::Finish() {
  MNEMO_CHECK(begun_);
  if (next_block_ != n_blocks_)
    return Status::FailedPrecondition("export: " + std::to_string(next_block_) + " of " +
                                      std::to_string(n_blocks_) + " blocks written");
  std::string t;
  Put<uint32_t>(&t, kTrailerMagic);
  Put<uint32_t>(&t, 0);
  Put<uint64_t>(&t, bytes_);
  Put<uint64_t>(&t, XXH3_64bits_digest(hash_));
  MNEMO_RETURN_IF_ERROR(Emit(t));
  MNEMO_RETURN_IF_ERROR(Flush());
  return ExportSummary{bytes_, XXH3_64bits_digest(hash_)};
}

// ------------------------------------------------------------------ reader

ExportReader::ExportReader(ExportModel expected, Handlers handlers)
    : expected_(expected), handlers_(std::move(handlers)), hash_(NewHash()), file_hash_(NewHash()) {}

ExportReader::~ExportReader() {
  XXH3_freeState(hash_);
  XXH3_freeState(file_hash_);
}

std::string_view ExportReader::PartName() const {
  switch (part_) {
    case Part::kHeader: return "header";
    case Part::kManifestHead:
    case Part::kManifestBody: return "manifest";
    case Part::kBlock: return "KV blocks";
    case Part::kTrailer: return "trailer";
    case Part::kDone: return "end";
  }
  return "?";
}

Status ExportReader::Fail(Status s) {
  if (failed_.ok()) failed_ = std::move(s);
  return failed_;
}

Status ExportReader::Feed(std::string_view bytes) {
  if (!failed_.ok()) return failed_;
  fed_ += bytes.size();
  XXH3_64bits_update(file_hash_, bytes.data(), bytes.size());
  // A record arriving whole in `bytes` goes to Step without a copy; only a
  // record split across pieces is gathered in buf_ (which so never holds
  // more than one record).
  while (part_ != Part::kDone) {
    std::string_view rec;
    if (buf_.empty() && bytes.size() >= need_) {
      rec = bytes.substr(0, need_);
      bytes.remove_prefix(need_);
    } else {
      const size_t take = std::min(bytes.size(), need_ - buf_.size());
      buf_.append(bytes.data(), take);
      bytes.remove_prefix(take);
      if (buf_.size() < need_) break;
      rec = buf_;
    }
    const size_t rec_bytes = rec.size();
    if (Status s = Step(rec); !s.ok()) return Fail(std::move(s));
    consumed_ += rec_bytes;
    buf_.clear();
  }
  if (!bytes.empty()) return Fail(Status::Corruption("export file: bytes after the trailer"));
  return Status::Ok();
}

Status ExportReader::Step(std::string_view rec) {
  const BlockLayout& L = expected_.layout;
  auto corrupt = [&](const std::string& why) {
    return Status::Corruption("export file: " + std::string(PartName()) + " at byte " + std::to_string(consumed_) +
                              ": " + why);
  };
  if (part_ != Part::kTrailer) XXH3_64bits_update(hash_, rec.data(), rec.size());
  Cursor c(rec);
  switch (part_) {
    case Part::kHeader: {
      uint32_t magic = 0, dtype = 0, pad = 0;
      uint16_t version = 0, flags = 0;
      uint64_t fingerprint = 0, page_bytes = 0, n_blocks = 0, sum = 0;
      KvGeometry kv;
      c.Get(&magic);
      if (magic != kHeaderMagic) return Status::Corruption("export file: not a mnemo session export (bad magic)");
      c.Get(&version);
      c.Get(&flags);
      c.Get(&fingerprint);
      c.Get(&kv.n_layers);
      c.Get(&kv.page_tokens);
      c.Get(&kv.n_kv_heads);
      c.Get(&kv.head_dim);
      c.Get(&dtype);
      c.Get(&pad);
      c.Get(&page_bytes);
      c.Get(&n_blocks);
      const size_t before = c.pos();
      c.Get(&sum);
      if (sum != Hash(rec.substr(0, before))) return corrupt("header checksum mismatch");
      if (version != kExportVersion)
        return Status::FailedPrecondition("export file has format version " + std::to_string(version) +
                                          "; this mnemod reads version " + std::to_string(kExportVersion));
      if (flags != 0 || pad != 0) return corrupt("reserved fields are not zero");
      kv.dtype = static_cast<KvDtype>(dtype);
      if (fingerprint != expected_.model_fingerprint)
        return Status::FailedPrecondition("export file was computed with another model file (fingerprint " +
                                          std::to_string(fingerprint) + ", this daemon's " +
                                          std::to_string(expected_.model_fingerprint) + ")");
      if (!(kv == expected_.kv) || page_bytes != L.page_bytes)
        return Status::FailedPrecondition("export file has another KV layout (" + GeometryText(kv, page_bytes) +
                                          "; this daemon's: " + GeometryText(expected_.kv, L.page_bytes) + ")");
      if (n_blocks > BlocksForTokens(kMaxManifestTokens, kv.page_tokens)) return corrupt("impossible block count");
      n_blocks_ = n_blocks;
      part_ = Part::kManifestHead;
      need_ = kManifestHeadBytes;
      return Status::Ok();
    }
    case Part::kManifestHead: {
      uint32_t magic = 0, pad = 0;
      uint64_t body_len = 0;
      c.Get(&magic);
      c.Get(&pad);
      c.Get(&body_len);
      if (magic != kManifestMagic || pad != 0) return corrupt("bad section magic");
      if (body_len > kMaxManifestBodyBytes) return corrupt("manifest length " + std::to_string(body_len) + " too large");
      part_ = Part::kManifestBody;
      need_ = static_cast<size_t>(body_len) + 8;
      return Status::Ok();
    }
    case Part::kManifestBody: {
      const std::string_view body = rec.substr(0, rec.size() - 8);
      Cursor sc(rec.substr(rec.size() - 8));
      uint64_t sum = 0;
      sc.Get(&sum);
      if (sum != Hash(body)) return corrupt("manifest checksum mismatch");
      Cursor b(body);
      Manifest m;
      m.model_fingerprint = expected_.model_fingerprint;
      m.kv = expected_.kv;
      uint64_t n_tokens = 0;
      uint8_t chat_open = 0, has_sampler = 0;
      SamplerState sampler;
      bool ok = b.GetString<uint16_t>(&m.name, kMaxSessionNameBytes) &&
                b.GetString<uint16_t>(&m.parent, kMaxSessionNameBytes) && b.Get(&n_tokens) &&
                n_tokens <= kMaxManifestTokens && b.left() >= 4 * n_tokens;
      if (ok) {
        m.tokens.resize(n_tokens);
        for (uint64_t i = 0; i < n_tokens && ok; ++i) ok = b.Get(&m.tokens[i]) && m.tokens[i] >= 0;
      }
      ok = ok && b.Get(&m.kv_tokens) && b.GetString<uint32_t>(&m.close_text, kMaxCloseTextBytes) &&
           b.Get(&chat_open) && b.Get(&m.turns) && b.Get(&m.created_unix_ms) && b.Get(&m.last_used_unix_ms) &&
           b.Get(&has_sampler) && b.Get(&sampler.seed) && b.Get(&sampler.draws) && b.left() == 0 &&
           chat_open <= 1 && has_sampler <= 1;
      if (!ok) return corrupt("malformed manifest");
      if (m.name.empty()) return corrupt("empty session name");
      if (m.kv_tokens > m.tokens.size()) return corrupt("KV covers more tokens than the history");
      if (BlocksForTokens(m.kv_tokens, expected_.kv.page_tokens) != n_blocks_)
        return corrupt("block count does not match the KV length");
      m.chat_open = chat_open != 0;
      if (has_sampler) m.sampler = sampler;
      if (handlers_.on_manifest) MNEMO_RETURN_IF_ERROR(handlers_.on_manifest(std::move(m)));
      part_ = n_blocks_ > 0 ? Part::kBlock : Part::kTrailer;
      need_ = n_blocks_ > 0 ? kBlockHeadBytes + static_cast<size_t>(L.n_layers) * (8 + L.page_bytes)
                            : kExportTrailerBytes;
      return Status::Ok();
    }
    case Part::kBlock: {
      uint32_t magic = 0, pad = 0;
      uint64_t index = 0;
      c.Get(&magic);
      c.Get(&pad);
      c.Get(&index);
      if (magic != kBlockMagic || pad != 0) return corrupt("bad block magic in block " + std::to_string(next_block_));
      if (index != next_block_)
        return corrupt("block " + std::to_string(index) + " where block " + std::to_string(next_block_) +
                       " was expected");
      std::vector<uint64_t> sums(static_cast<size_t>(L.n_layers));
      for (auto& s : sums) c.Get(&s);
      const uint8_t* pages = reinterpret_cast<const uint8_t*>(rec.data() + c.pos());
      for (int32_t l = 0; l < L.n_layers; ++l) {
        if (XXH3_64bits(pages + static_cast<size_t>(l) * L.page_bytes, L.page_bytes) != sums[l])
          return corrupt("KV page of layer " + std::to_string(l) + " in block " + std::to_string(index) +
                         " fails its checksum");
      }
      if (handlers_.on_block) MNEMO_RETURN_IF_ERROR(handlers_.on_block(index, pages, sums));
      if (++next_block_ == n_blocks_) {
        part_ = Part::kTrailer;
        need_ = kExportTrailerBytes;
      }
      return Status::Ok();
    }
    case Part::kTrailer: {
      uint32_t magic = 0, pad = 0;
      uint64_t bytes = 0, sum = 0;
      c.Get(&magic);
      c.Get(&pad);
      c.Get(&bytes);
      c.Get(&sum);
      if (magic != kTrailerMagic || pad != 0) return corrupt("bad trailer magic");
      if (bytes != consumed_) return corrupt("trailer records " + std::to_string(bytes) + " bytes, read " +
                                             std::to_string(consumed_));
      if (sum != XXH3_64bits_digest(hash_)) return corrupt("whole-file checksum mismatch");
      part_ = Part::kDone;
      need_ = 0;
      return Status::Ok();
    }
    case Part::kDone: break;
  }
  return Status::Internal("export reader: step after the end");
}

Result<ExportSummary> ExportReader::Finish() {
  if (!failed_.ok()) return failed_;
  if (part_ != Part::kDone)
    return Fail(Status::Corruption("export file is truncated: it ends in the " + std::string(PartName()) +
                                   " after " + std::to_string(fed_) + " bytes"));
  return ExportSummary{fed_, XXH3_64bits_digest(file_hash_)};
}

}  // namespace mnemo::tiering
