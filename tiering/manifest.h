// Session manifests: the durable description of one session (owner, token
// history, sampler, and the T2 blocks that hold its KV) and their versioned,
// checksummed binary encoding.
//
// Manifest is a plain value type (thread-compatible). The codec functions are
// pure and thread-safe; ManifestDecoder is thread-compatible.
//
// Encoding (version 1, little-endian). A manifest is stored as one *head*
// record plus one *chunk* record per span of chunk_tokens tokens, so that a
// turn which appends to a long history rewrites only the chunks it touched
// (a 1M-token session's history is 4 MiB; one chunk is at most ~300 KiB).
//   head:  u32 magic "MNMF" | u16 version | u16 0 | u32 body_len | body |
//          u64 XXH3 of everything before it
//   body:  every scalar and string field, the token/block counts, the chunk
//          size and the XXH3 of every chunk in order
//   chunk: u32 magic "MNMC" | u16 version | u16 0 | u32 index | u32 n_tokens |
//          u32 n_blocks | i32 tokens[n_tokens] | u64 slots[n_blocks]
// Chunk i holds tokens [i*chunk_tokens, ...) and the block slots of the same
// token span. A chunk carries no checksum of its own: the head records the
// XXH3 of each chunk, which also ties the chunks to this version of the head.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "tiering/layout.h"

namespace mnemo::tiering {

// Bounds a decoder enforces before it allocates anything.
inline constexpr size_t kMaxSessionNameBytes = 255;
inline constexpr size_t kMaxCloseTextBytes = 64u << 10;
// 4M tokens (16 MiB of history): bounds the largest index write batch (a
// fork of such a session) to ~30 MiB.
inline constexpr uint64_t kMaxManifestTokens = uint64_t{1} << 22;
inline constexpr int32_t kMaxLayers = 1024;
inline constexpr int32_t kMaxPageTokens = 1 << 16;
inline constexpr int32_t kMaxKvHeads = 1024;
inline constexpr int32_t kMaxHeadDim = 1 << 14;
// A chunk spans about this many tokens (a whole number of blocks).
inline constexpr uint32_t kManifestChunkTargetTokens = 1u << 16;
inline constexpr uint32_t kMaxManifestChunkTokens = 1u << 20;
inline constexpr uint16_t kManifestVersion = 1;

enum class KvDtype : uint32_t { kF16 = 1 };

// The KV geometry the session's blocks were written with.
struct KvGeometry {
  int32_t n_layers = 0;
  int32_t page_tokens = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  KvDtype dtype = KvDtype::kF16;
  bool operator==(const KvGeometry&) const = default;
};

// Mirrors model::Sampler::State (tiering does not depend on model/).
struct SamplerState {
  uint64_t seed = 0;
  uint64_t draws = 0;
  bool operator==(const SamplerState&) const = default;
};

struct Manifest {
  uint32_t owner_uid = 0;
  std::string name;    // 1..kMaxSessionNameBytes, no NUL byte
  std::string parent;  // fork source, empty if none
  uint64_t model_fingerprint = 0;
  KvGeometry kv;
  std::vector<int32_t> tokens;  // the whole history, ids >= 0
  // Tokens whose KV is on T2: a prefix of `tokens`.
  uint64_t kv_tokens = 0;
  // One slot per page_tokens span of the first kv_tokens tokens, in token
  // order; the last block may be partial. No slot appears twice.
  std::vector<BlockSlot> blocks;
  std::string close_text;
  bool chat_open = false;
  uint32_t turns = 0;
  uint64_t created_unix_ms = 0;
  uint64_t last_used_unix_ms = 0;
  std::optional<SamplerState> sampler;
  // Increases with every committed turn of this session (Index enforces it).
  uint64_t turn_seq = 0;

  bool operator==(const Manifest&) const = default;
};

// ceil(tokens / page_tokens). REQUIRES: page_tokens > 0.
uint64_t BlocksForTokens(uint64_t tokens, int32_t page_tokens);

// "session 'name' of uid N", with unprintable bytes escaped: how errors name
// a session.
std::string SessionLabel(uint32_t uid, std::string_view name);

// Checks every bound and invariant above. InvalidArgument naming the session.
Status ValidateManifest(const Manifest& m);

struct EncodedManifest {
  std::string head;
  std::vector<std::string> chunks;
  std::vector<uint64_t> chunk_hashes;  // XXH3 of chunks[i], as the head records
};

// Validates, then encodes. InvalidArgument from ValidateManifest.
Result<EncodedManifest> EncodeManifest(const Manifest& m);

// Decodes a head, then its chunks in order. Every failure is Corruption
// (Unsupported for a head written by a newer version) whose message starts
// with `what` (e.g. SessionLabel of the key the record was found under).
//
// Thread-compatible.
class ManifestDecoder {
 public:
  static Result<ManifestDecoder> Start(std::string_view head, std::string_view what);

  uint32_t chunk_count() const { return static_cast<uint32_t>(chunk_hashes_.size()); }
  // The manifest so far: everything but tokens and blocks until every chunk
  // has been added.
  const Manifest& manifest() const { return m_; }
  const std::vector<uint64_t>& chunk_hashes() const { return chunk_hashes_; }

  // The next chunk, in index order; `chunk` is borrowed for the call.
  Status AddChunk(std::string_view chunk);
  // REQUIRES: called once. Corruption when chunks are missing or the whole
  // fails ValidateManifest.
  Result<Manifest> Finish();

 private:
  ManifestDecoder() = default;
  Status Bad(std::string_view why) const;

  std::string what_;
  Manifest m_;
  uint64_t n_tokens_ = 0;
  uint64_t n_blocks_ = 0;
  uint32_t chunk_tokens_ = 0;
  std::vector<uint64_t> chunk_hashes_;
  uint32_t next_chunk_ = 0;
};

// The whole manifest from its head and chunks (convenience over
// ManifestDecoder).
Result<Manifest> DecodeManifest(std::string_view head, std::span<const std::string> chunks, std::string_view what);

}  // namespace mnemo::tiering
