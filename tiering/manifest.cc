// Manifest validation and its head/chunk binary encoding (see manifest.h).
#include "tiering/manifest.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "tiering/le_codec.h"

namespace mnemo::tiering {
namespace {

using le::Put;
using le::PutString;
using Reader = le::Reader;

constexpr uint32_t kHeadMagic = 0x464D4E4D;   // "MNMF"
constexpr uint32_t kChunkMagic = 0x434D4E4D;  // "MNMC"
constexpr size_t kHeadPrefixBytes = 12;       // magic, version, reserved, body_len
constexpr size_t kChunkHeaderBytes = 20;
constexpr uint8_t kFlagChatOpen = 1;
constexpr uint8_t kFlagSampler = 2;
// Largest head body: strings, fixed fields, and one hash per chunk of the
// smallest chunk size (one block of one token).
constexpr size_t kMaxHeadBodyBytes =
    2 * (2 + kMaxSessionNameBytes) + 4 + kMaxCloseTextBytes + 256 + 8 * kMaxManifestTokens;


uint64_t Hash(std::string_view b) { return XXH3_64bits(b.data(), b.size()); }

Status Invalid(std::string_view why) { return Status::InvalidArgument(std::string(why)); }

Status ValidateName(std::string_view field, std::string_view s, bool allow_empty) {
  if ((!allow_empty && s.empty()) || s.size() > kMaxSessionNameBytes)
    return Invalid(std::string(field) + " must be 1.." + std::to_string(kMaxSessionNameBytes) + " bytes");
  if (s.find('\0') != std::string_view::npos) return Invalid(std::string(field) + " contains a NUL byte");
  return Status::Ok();
}

// Tokens per chunk for a page size: a whole number of blocks near the target.
uint32_t ChunkTokensFor(int32_t page_tokens) {
  const uint32_t pt = static_cast<uint32_t>(page_tokens);
  return std::max<uint32_t>(1, kManifestChunkTargetTokens / pt) * pt;
}

uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

}  // namespace

uint64_t BlocksForTokens(uint64_t tokens, int32_t page_tokens) {
  MNEMO_CHECK(page_tokens > 0);
  return CeilDiv(tokens, static_cast<uint64_t>(page_tokens));
}

std::string SessionLabel(uint32_t uid, std::string_view name) {
  std::string s = "session '";
  for (unsigned char c : name) {
    if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
      s += static_cast<char>(c);
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      s += "\\x";
      s += kHex[c >> 4];
      s += kHex[c & 15];
    }
  }
  s += "' of uid ";
  s += std::to_string(uid);
  return s;
}

namespace {

// Every invariant of manifest.h; InvalidArgument with the bare reason.
Status CheckInvariants(const Manifest& m) {
  MNEMO_RETURN_IF_ERROR(ValidateName("name", m.name, /*allow_empty=*/false));
  MNEMO_RETURN_IF_ERROR(ValidateName("parent", m.parent, /*allow_empty=*/true));
  const KvGeometry& kv = m.kv;
  if (kv.n_layers <= 0 || kv.n_layers > kMaxLayers || kv.page_tokens <= 0 || kv.page_tokens > kMaxPageTokens ||
      kv.n_kv_heads <= 0 || kv.n_kv_heads > kMaxKvHeads || kv.head_dim <= 0 || kv.head_dim > kMaxHeadDim) {
    return Invalid("KV geometry out of range (layers " + std::to_string(kv.n_layers) + ", page tokens " +
                   std::to_string(kv.page_tokens) + ", kv heads " + std::to_string(kv.n_kv_heads) + ", head dim " +
                   std::to_string(kv.head_dim) + ")");
  }
  if (kv.dtype != KvDtype::kF16) return Invalid("unknown KV dtype " + std::to_string(static_cast<uint32_t>(kv.dtype)));
  if (m.tokens.size() > kMaxManifestTokens)
    return Invalid(std::to_string(m.tokens.size()) + " tokens exceed the limit of " +
                   std::to_string(kMaxManifestTokens));
  if (m.kv_tokens > m.tokens.size())
    return Invalid("KV length " + std::to_string(m.kv_tokens) + " exceeds the " + std::to_string(m.tokens.size()) +
                   " tokens of history");
  const uint64_t want_blocks = BlocksForTokens(m.kv_tokens, kv.page_tokens);
  if (m.blocks.size() != want_blocks)
    return Invalid(std::to_string(m.blocks.size()) + " blocks for " + std::to_string(m.kv_tokens) +
                   " KV tokens (want " + std::to_string(want_blocks) + ")");
  for (size_t i = 0; i < m.tokens.size(); ++i) {
    if (m.tokens[i] < 0) return Invalid("negative token id at position " + std::to_string(i));
  }
  if (m.close_text.size() > kMaxCloseTextBytes) return Invalid("close text too long");
  if (!m.blocks.empty()) {
    std::vector<BlockSlot> sorted(m.blocks);
    std::sort(sorted.begin(), sorted.end());
    auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) return Invalid("block slot " + std::to_string(*dup) + " appears twice");
  }
  return Status::Ok();
}

}  // namespace

Status ValidateManifest(const Manifest& m) { return CheckInvariants(m).WithContext(SessionLabel(m.owner_uid, m.name)); }

Result<EncodedManifest> EncodeManifest(const Manifest& m) {
  MNEMO_RETURN_IF_ERROR(ValidateManifest(m));
  EncodedManifest e;
  const uint32_t chunk_tokens = ChunkTokensFor(m.kv.page_tokens);
  const uint32_t chunk_blocks = chunk_tokens / static_cast<uint32_t>(m.kv.page_tokens);
  const uint64_t n_tokens = m.tokens.size();
  const uint64_t n_blocks = m.blocks.size();
  const uint64_t n_chunks = CeilDiv(n_tokens, chunk_tokens);
  e.chunks.reserve(n_chunks);
  e.chunk_hashes.reserve(n_chunks);
  for (uint64_t i = 0; i < n_chunks; ++i) {
    const uint64_t t0 = i * chunk_tokens, t1 = std::min(n_tokens, t0 + chunk_tokens);
    const uint64_t b0 = std::min(n_blocks, i * chunk_blocks), b1 = std::min(n_blocks, b0 + chunk_blocks);
    std::string c;
    c.reserve(kChunkHeaderBytes + 4 * (t1 - t0) + 8 * (b1 - b0));
    Put<uint32_t>(&c, kChunkMagic);
    Put<uint16_t>(&c, kManifestVersion);
    Put<uint16_t>(&c, 0);
    Put<uint32_t>(&c, static_cast<uint32_t>(i));
    Put<uint32_t>(&c, static_cast<uint32_t>(t1 - t0));
    Put<uint32_t>(&c, static_cast<uint32_t>(b1 - b0));
    for (uint64_t t = t0; t < t1; ++t) Put<int32_t>(&c, m.tokens[t]);
    for (uint64_t b = b0; b < b1; ++b) Put<uint64_t>(&c, m.blocks[b]);
    e.chunk_hashes.push_back(Hash(c));
    e.chunks.push_back(std::move(c));
  }

  std::string body;
  body.reserve(160 + m.name.size() + m.parent.size() + m.close_text.size() + 8 * n_chunks);
  Put<uint32_t>(&body, m.owner_uid);
  PutString<uint16_t>(&body, m.name);
  PutString<uint16_t>(&body, m.parent);
  Put<uint64_t>(&body, m.model_fingerprint);
  Put<int32_t>(&body, m.kv.n_layers);
  Put<int32_t>(&body, m.kv.page_tokens);
  Put<int32_t>(&body, m.kv.n_kv_heads);
  Put<int32_t>(&body, m.kv.head_dim);
  Put<uint32_t>(&body, static_cast<uint32_t>(m.kv.dtype));
  Put<uint64_t>(&body, n_tokens);
  Put<uint64_t>(&body, m.kv_tokens);
  Put<uint64_t>(&body, n_blocks);
  PutString<uint32_t>(&body, m.close_text);
  Put<uint8_t>(&body, static_cast<uint8_t>((m.chat_open ? kFlagChatOpen : 0) | (m.sampler ? kFlagSampler : 0)));
  Put<uint32_t>(&body, m.turns);
  Put<uint64_t>(&body, m.created_unix_ms);
  Put<uint64_t>(&body, m.last_used_unix_ms);
  Put<uint64_t>(&body, m.sampler ? m.sampler->seed : 0);
  Put<uint64_t>(&body, m.sampler ? m.sampler->draws : 0);
  Put<uint64_t>(&body, m.turn_seq);
  Put<uint32_t>(&body, chunk_tokens);
  Put<uint32_t>(&body, static_cast<uint32_t>(n_chunks));
  for (uint64_t h : e.chunk_hashes) Put<uint64_t>(&body, h);

  e.head.reserve(kHeadPrefixBytes + body.size() + 8);
  Put<uint32_t>(&e.head, kHeadMagic);
  Put<uint16_t>(&e.head, kManifestVersion);
  Put<uint16_t>(&e.head, 0);
  Put<uint32_t>(&e.head, static_cast<uint32_t>(body.size()));
  e.head += body;
  Put<uint64_t>(&e.head, Hash(e.head));
  return e;
}

Status ManifestDecoder::Bad(std::string_view why) const {
  return Status::Corruption(what_ + ": manifest " + std::string(why));
}

Result<ManifestDecoder> ManifestDecoder::Start(std::string_view head, std::string_view what) {
  ManifestDecoder d;
  d.what_ = std::string(what);
  Reader r(head);
  uint32_t magic = 0, body_len = 0;
  uint16_t version = 0, reserved = 0;
  if (!r.Get(&magic) || !r.Get(&version) || !r.Get(&reserved) || !r.Get(&body_len))
    return d.Bad("head truncated (" + std::to_string(head.size()) + " bytes)");
  if (magic != kHeadMagic) return d.Bad("head has a bad magic number");
  if (body_len > kMaxHeadBodyBytes || head.size() != kHeadPrefixBytes + body_len + 8)
    return d.Bad("head length " + std::to_string(head.size()) + " does not match its body length " +
                 std::to_string(body_len));
  uint64_t stored = 0;
  Reader tail(head.substr(head.size() - 8));
  MNEMO_CHECK(tail.Get(&stored));
  if (Hash(head.substr(0, head.size() - 8)) != stored) return d.Bad("head checksum mismatch");
  // The checksum covers the version: a mismatch above is damage, this is not.
  if (version > kManifestVersion) {
    return Status::Unsupported(d.what_ + ": manifest version " + std::to_string(version) +
                               " is newer than this build's " + std::to_string(kManifestVersion));
  }
  if (version == 0 || reserved != 0) return d.Bad("head has an invalid version or reserved field");

  Reader b(head.substr(kHeadPrefixBytes, body_len));
  Manifest& m = d.m_;
  uint32_t dtype = 0, n_chunks = 0;
  uint8_t flags = 0;
  uint64_t seed = 0, draws = 0;
  const bool ok = b.Get(&m.owner_uid) && b.GetString<uint16_t>(&m.name, kMaxSessionNameBytes) &&
                  b.GetString<uint16_t>(&m.parent, kMaxSessionNameBytes) && b.Get(&m.model_fingerprint) &&
                  b.Get(&m.kv.n_layers) && b.Get(&m.kv.page_tokens) && b.Get(&m.kv.n_kv_heads) &&
                  b.Get(&m.kv.head_dim) && b.Get(&dtype) && b.Get(&d.n_tokens_) && b.Get(&m.kv_tokens) &&
                  b.Get(&d.n_blocks_) && b.GetString<uint32_t>(&m.close_text, kMaxCloseTextBytes) && b.Get(&flags) &&
                  b.Get(&m.turns) && b.Get(&m.created_unix_ms) && b.Get(&m.last_used_unix_ms) && b.Get(&seed) &&
                  b.Get(&draws) && b.Get(&m.turn_seq) && b.Get(&d.chunk_tokens_) && b.Get(&n_chunks);
  if (!ok) return d.Bad("head body truncated or a string is over its bound");
  m.kv.dtype = static_cast<KvDtype>(dtype);
  if ((flags & ~(kFlagChatOpen | kFlagSampler)) != 0) return d.Bad("head has unknown flags");
  m.chat_open = (flags & kFlagChatOpen) != 0;
  if (flags & kFlagSampler) {
    m.sampler = SamplerState{seed, draws};
  } else if (seed != 0 || draws != 0) {
    return d.Bad("head has sampler state without its flag");
  }
  // Counts are checked before anything is sized by them.
  if (d.n_tokens_ > kMaxManifestTokens) return d.Bad("token count " + std::to_string(d.n_tokens_) + " over the limit");
  if (m.kv.page_tokens <= 0 || m.kv.page_tokens > kMaxPageTokens)
    return d.Bad("page size " + std::to_string(m.kv.page_tokens) + " out of range");
  if (m.kv_tokens > d.n_tokens_ || d.n_blocks_ != BlocksForTokens(m.kv_tokens, m.kv.page_tokens))
    return d.Bad("has inconsistent token, KV and block counts (" + std::to_string(d.n_tokens_) + ", " +
                 std::to_string(m.kv_tokens) + ", " + std::to_string(d.n_blocks_) + ")");
  if (d.chunk_tokens_ == 0 || d.chunk_tokens_ > kMaxManifestChunkTokens ||
      d.chunk_tokens_ % static_cast<uint32_t>(m.kv.page_tokens) != 0)
    return d.Bad("chunk size " + std::to_string(d.chunk_tokens_) + " is invalid");
  if (n_chunks != CeilDiv(d.n_tokens_, d.chunk_tokens_))
    return d.Bad("chunk count " + std::to_string(n_chunks) + " does not cover " + std::to_string(d.n_tokens_) +
                 " tokens");
  if (b.left() != uint64_t{8} * n_chunks) return d.Bad("head body has the wrong length for its chunk hashes");
  d.chunk_hashes_.resize(n_chunks);
  for (uint64_t& h : d.chunk_hashes_) MNEMO_CHECK(b.Get(&h));
  m.tokens.reserve(d.n_tokens_);
  m.blocks.reserve(d.n_blocks_);
  return d;
}

Status ManifestDecoder::AddChunk(std::string_view chunk) {
  if (next_chunk_ >= chunk_hashes_.size()) return Bad("has more chunks than its head lists");
  const uint32_t i = next_chunk_;
  if (Hash(chunk) != chunk_hashes_[i]) return Bad("chunk " + std::to_string(i) + " checksum mismatch");
  Reader r(chunk);
  uint32_t magic = 0, index = 0, n_tok = 0, n_blk = 0;
  uint16_t version = 0, reserved = 0;
  if (!r.Get(&magic) || !r.Get(&version) || !r.Get(&reserved) || !r.Get(&index) || !r.Get(&n_tok) || !r.Get(&n_blk) ||
      magic != kChunkMagic || version == 0 || version > kManifestVersion || reserved != 0)
    return Bad("chunk " + std::to_string(i) + " has a bad header");
  const uint64_t chunk_blocks = chunk_tokens_ / static_cast<uint32_t>(m_.kv.page_tokens);
  const uint64_t t0 = uint64_t{i} * chunk_tokens_;
  const uint64_t b0 = std::min(n_blocks_, uint64_t{i} * chunk_blocks);
  const uint64_t want_tok = std::min<uint64_t>(n_tokens_ - t0, chunk_tokens_);
  const uint64_t want_blk = std::min(n_blocks_ - b0, chunk_blocks);
  if (index != i || n_tok != want_tok || n_blk != want_blk)
    return Bad("chunk " + std::to_string(i) + " has index " + std::to_string(index) + " and " + std::to_string(n_tok) +
               " tokens, " + std::to_string(n_blk) + " blocks (want " + std::to_string(want_tok) + ", " +
               std::to_string(want_blk) + ")");
  if (r.left() != uint64_t{4} * n_tok + uint64_t{8} * n_blk)
    return Bad("chunk " + std::to_string(i) + " has the wrong length");
  for (uint32_t k = 0; k < n_tok; ++k) {
    int32_t t = 0;
    MNEMO_CHECK(r.Get(&t));
    m_.tokens.push_back(t);
  }
  for (uint32_t k = 0; k < n_blk; ++k) {
    uint64_t s = 0;
    MNEMO_CHECK(r.Get(&s));
    m_.blocks.push_back(s);
  }
  ++next_chunk_;
  return Status::Ok();
}

Result<Manifest> ManifestDecoder::Finish() {
  if (next_chunk_ != chunk_hashes_.size())
    return Bad("is missing chunks: " + std::to_string(next_chunk_) + " of " + std::to_string(chunk_hashes_.size()));
  Status st = CheckInvariants(m_);
  if (!st.ok()) return Status::Corruption(what_ + ": manifest fails validation: " + std::string(st.message()));
  return std::move(m_);
}

Result<Manifest> DecodeManifest(std::string_view head, std::span<const std::string> chunks, std::string_view what) {
  MNEMO_ASSIGN_OR_RETURN(ManifestDecoder d, ManifestDecoder::Start(head, what));
  for (const std::string& c : chunks) MNEMO_RETURN_IF_ERROR(d.AddChunk(c));
  return d.Finish();
}

}  // namespace mnemo::tiering
