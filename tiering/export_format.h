// The session export file: one self-contained, checksummed stream holding a
// session's history and KV blocks, so that it can be imported by a daemon on
// another host running the same model file and KV layout.
//
// Format (version 1, little-endian):
//   header   (64 bytes): u32 magic "MNEX" | u16 version | u16 0 |
//            u64 model fingerprint | i32 n_layers | i32 page_tokens |
//            i32 n_kv_heads | i32 head_dim | u32 dtype | u32 0 |
//            u64 page_bytes | u64 n_blocks | u64 XXH3 of the 56 bytes before
//   manifest: u32 magic "MNXM" | u32 0 | u64 body_len | body | u64 XXH3(body)
//            body: u16 len + name | u16 len + parent | u64 n_tokens |
//            i32 tokens[n_tokens] | u64 kv_tokens | u32 len + close_text |
//            u8 chat_open | u32 turns | u64 created_unix_ms |
//            u64 last_used_unix_ms | u8 has_sampler | u64 seed | u64 draws
//   block i (n_blocks of them, i = 0, 1, ...): u32 magic "MNXB" | u32 0 |
//            u64 i | n_layers x u64 page XXH3 (as the index stores them) |
//            n_layers x page_bytes (the layer pages, unpadded)
//   trailer  (24 bytes): u32 magic "MNXT" | u32 0 | u64 bytes before the
//            trailer | u64 XXH3 of every byte before the trailer
// Every version keeps the 64-byte header with its magic, version and
// checksum where version 1 has them, so a damaged header (Corruption) and a
// newer one (FailedPrecondition) are told apart. Owner and T2 page locations are not exported: the importer owns the
// session and places its blocks where its store has room.
//
// ExportWriter and ExportReader are thread-compatible; the functions are pure.
#pragma once

#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>

#include "common/status.h"
#include "tiering/layout.h"
#include "tiering/manifest.h"

namespace mnemo::tiering {

inline constexpr uint16_t kExportVersion = 1;
inline constexpr size_t kExportHeaderBytes = 64;
inline constexpr size_t kExportTrailerBytes = 24;

// What the KV of an export is computed with; import requires equality.
struct ExportModel {
  uint64_t model_fingerprint = 0;
  KvGeometry kv;
  BlockLayout layout;  // for kv
};

struct ExportSummary {
  uint64_t bytes = 0;     // the whole file
  uint64_t checksum = 0;  // XXH3 of the whole file (trailer included)
};

// Receives the stream in order; pieces are at most chunk_bytes long and are
// borrowed for the call. A non-OK return aborts the export with that status.
using ExportSink = std::function<Status(std::string_view piece)>;

// Writes one export: Begin, AddBlock for each of the manifest's blocks in
// order, Finish.
class ExportWriter {
 public:
  ExportWriter(ExportModel model, ExportSink sink, size_t chunk_bytes = 256u << 10);
  ~ExportWriter();
  ExportWriter(const ExportWriter&) = delete;
  ExportWriter& operator=(const ExportWriter&) = delete;

  // Header and manifest section. `m` supplies every field but owner_uid,
  // blocks and turn_seq; InvalidArgument for a manifest that does not fit
  // the bounds of manifest.h or whose KV geometry is not the model's.
  Status Begin(const Manifest& m);
  // One block in T2 layout (layout.block_bytes, layer pages at their
  // stride) with its per-layer page checksums.
  Status AddBlock(const uint8_t* block, std::span<const uint64_t> page_checksums);
  // The trailer. FailedPrecondition when blocks are missing.
  Result<ExportSummary> Finish();

 private:
  Status Emit(std::string_view bytes);
  Status Flush();

  const ExportModel model_;
  const ExportSink sink_;
  const size_t chunk_bytes_;
  std::string out_;  // pending, below chunk_bytes_
  XXH3_state_t* hash_;
  uint64_t bytes_ = 0;
  uint64_t n_blocks_ = 0, next_block_ = 0;
  bool begun_ = false;
};

// Parses an export pushed to it in pieces of any size, verifying as it goes,
// and hands out the manifest, then each block. Memory is bounded by the
// largest section (one block record, or a manifest of kMaxManifestTokens).
//
// Errors (the first one sticks; every later call returns it):
//   FailedPrecondition  another format version, model fingerprint or KV
//                       geometry than `expected`
//   Corruption          bad magic, a checksum that fails, an impossible
//                       field, bytes past the trailer, a stream that ends
//                       early (Finish); the message says which part
//   a handler's error
class ExportReader {
 public:
  struct Handlers {
    // The manifest, with owner_uid 0, no blocks and turn_seq 0.
    std::function<Status(Manifest m)> on_manifest;
    // Block `index`: layout.n_layers pages of page_bytes, contiguous, each
    // already verified against its checksum. Borrowed for the call.
    std::function<Status(uint64_t index, const uint8_t* pages, std::span<const uint64_t> page_checksums)> on_block;
  };
  ExportReader(ExportModel expected, Handlers handlers);
  ~ExportReader();
  ExportReader(const ExportReader&) = delete;
  ExportReader& operator=(const ExportReader&) = delete;

  Status Feed(std::string_view bytes);
  // The stream ended: Corruption unless the trailer was read and verified.
  Result<ExportSummary> Finish();

  uint64_t bytes_fed() const { return fed_; }
  uint64_t n_blocks() const { return n_blocks_; }

 private:
  enum class Part { kHeader, kManifestHead, kManifestBody, kBlock, kTrailer, kDone };
  Status Step(std::string_view rec);
  Status Fail(Status s);
  std::string_view PartName() const;

  const ExportModel expected_;
  const Handlers handlers_;
  XXH3_state_t* hash_;       // every byte before the trailer
  XXH3_state_t* file_hash_;  // every byte
  std::string buf_;
  Part part_ = Part::kHeader;
  size_t need_ = kExportHeaderBytes;
  uint64_t fed_ = 0, consumed_ = 0;
  uint64_t n_blocks_ = 0, next_block_ = 0;
  Status failed_;
};

}  // namespace mnemo::tiering
