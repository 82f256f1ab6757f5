// tiering::Index: the durable record of sessions and T2 blocks, a RocksDB
// database (conventionally <data_dir>/index). It owns the session manifests,
// one record per committed T2 block (its refcount and per-layer page
// checksums) and the in-memory slot allocator rebuilt from them at Open.
//
// Thread-safe. Mutations (CommitTurn, ForkSession, DeleteSession,
// ReleaseSlots) are serialized; each is one synced RocksDB write batch, so a
// crash keeps all of it or none of it. Reads (GetManifest, LoadManifests,
// GetBlock) run beside mutations and each sees one consistent snapshot.
// AllocateSlots never waits for a disk write.
//
// Slot life cycle: free -> AllocateSlots -> reserved -> (page data written
// and made durable by the caller) -> CommitTurn/ForkSession reference it ->
// committed (refcount = manifests referencing it) -> the last reference
// dropped -> free again, but only once that batch is durable. Reservations
// live only in memory: after a crash the slots of an uncommitted turn are
// free again at Open (start-up reclamation), whatever their page data.
//
// After a failed write the outcome on disk is unknown, so the index turns
// read-only (every later mutation returns that error) until reopened; Open
// then rebuilds the truth from disk.
//
// On-disk format (format version 1), keys by first byte:
//   "V"                                   "MNIX" + u32 format version
//   'B' + be64 slot                       block: u16 n, u16 version, n x u64
//                                         page XXH3, u64 record XXH3
//   'C' + be32 uid + name + 0x00 + be32 i manifest chunk i (manifest.h)
//   'M' + be32 uid + name                 manifest head (manifest.h)
//   'R' + be64 slot                       refcount: u32, u32 0, u64 XXH3
// Record checksums are seeded with the key's XXH3, so a value found under
// the wrong key fails too. The big-endian uid keeps a uid's sessions
// contiguous; session names never contain NUL.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "tiering/layout.h"
#include "tiering/manifest.h"

namespace rocksdb {
class Env;
class Snapshot;
}  // namespace rocksdb

namespace mnemo::tiering {

inline constexpr std::string_view kIndexDirName = "index";
// The newest on-disk format this build reads and writes.
inline constexpr uint32_t kIndexFormatVersion = 1;
// Most blocks one AllocateSlots call hands out.
inline constexpr uint64_t kMaxAllocateSlots = uint64_t{1} << 20;

// XXH3 of one layer page, as block records store it.
uint64_t PageChecksum(const void* data, size_t bytes);

struct IndexOptions {
  // The T2 budget in blocks: slots [0, capacity_slots) are allocatable.
  // Required, at most 2^40. Lowering it keeps committed slots above it valid
  // (counted in RecoveryReport) but never hands them out again.
  uint64_t capacity_slots = 0;
  uint32_t max_sessions = 1u << 20;
  bool create_if_missing = true;
  // RocksDB memtable size; small values make flushes and compactions happen
  // often (tests).
  size_t write_buffer_bytes = 16u << 20;
  size_t block_cache_bytes = 32u << 20;
  // A write-ahead log that ends inside a record is what a crash during a
  // write leaves (kill -9 can interrupt a multi-page write(2); power loss can
  // tear anything unsynced): that write was never acknowledged, so by default
  // Open drops it and says so in RecoveryReport. A flipped length byte in
  // the last record reads the same way; set this to fail Open with
  // Corruption instead.
  bool fail_on_torn_wal_tail = false;
  // Tests inject file-system faults through this (e.g. a FileSystemWrapper
  // behind rocksdb::NewCompositeEnv). Borrowed; must outlive the Index.
  // nullptr: the default environment.
  rocksdb::Env* env = nullptr;
};

// What Open found. Immutable after Open; the daemon logs it at start-up.
struct RecoveryReport {
  uint64_t sessions = 0;
  uint64_t slots_committed = 0;        // with a block record (refcount >= 1)
  uint64_t slots_free = 0;             // allocatable, within capacity
  uint64_t slots_beyond_capacity = 0;  // committed at or above capacity_slots
  uint64_t block_references = 0;       // sum of refcounts
  uint64_t elapsed_ms = 0;
  // The write-ahead log ended inside a record, which was dropped (see
  // IndexOptions::fail_on_torn_wal_tail); RocksDB's description of it.
  bool wal_tail_dropped = false;
  std::string wal_tail_detail;
};

struct SlotStats {
  uint64_t capacity = 0;
  uint64_t committed = 0;
  uint64_t reserved = 0;
  uint64_t free = 0;
};

// A block a turn wrote: its slot (from AllocateSlots) and one PageChecksum
// per layer. page_checksums is borrowed for the call.
struct NewBlock {
  BlockSlot slot = 0;
  std::span<const uint64_t> page_checksums;
};

struct BlockInfo {
  uint32_t refcount = 0;
  std::vector<uint64_t> page_checksums;  // one per layer
};

class Index;

// Committed blocks held for a reader (a session export) from the moment
// Index::Pin took them: while the pin lives none of its slots is handed out
// again, even after every manifest dropped it (its records are deleted as
// usual; the slot becomes free when the pin goes), and GetBlock through
// the pin reads the block records as they were when it was taken. Pins live
// only in memory: after a crash the dropped slots are simply free.
//
// Thread-safe. Must not outlive its Index.
class BlockPin {
 public:
  ~BlockPin();
  BlockPin(const BlockPin&) = delete;
  BlockPin& operator=(const BlockPin&) = delete;

 private:
  friend class Index;
  BlockPin(Index* index, std::vector<BlockSlot> slots, const rocksdb::Snapshot* snapshot)
      : index_(index), slots_(std::move(slots)), snapshot_(snapshot) {}
  Index* const index_;
  const std::vector<BlockSlot> slots_;
  const rocksdb::Snapshot* const snapshot_;
};

// Thread-safe: every method may be called from any thread (see the file
// comment for what runs concurrently).
class Index {
 public:
  // Creates or opens the database in `dir`, checks its format version, and
  // verifies every record: RocksDB block checksums, record and manifest
  // checksums, and that each refcount equals the number of manifests that
  // reference the slot. Time and memory are proportional to the index, never
  // to page data. Errors: FailedPrecondition for a newer format, Corruption
  // saying what is damaged and where, with start-up advice (also for a
  // directory holding RocksDB tables or logs but no CURRENT file), IOError;
  // NotFound, with nothing created, when there is no database and
  // options.create_if_missing is false.
  // An existing database is verified through a read-only open first, so
  // after any of these errors the directory is byte for byte as it was. A
  // torn log tail is dropped and reported (IndexOptions).
  static Result<std::unique_ptr<Index>> Open(const std::string& dir, const IndexOptions& options);
  // Writes what only the log holds to tables (unless a write failed), so the
  // next Open has no log to replay, and closes the database. A flush error
  // is logged, not fatal: the synced log still holds every commit.
  // REQUIRES: no call in flight.
  ~Index();
  Index(const Index&) = delete;
  Index& operator=(const Index&) = delete;

  const RecoveryReport& recovery() const;
  SlotStats slot_stats() const;

  // Reserves n free slots (lowest first). ResourceExhausted when fewer than
  // n are free (nothing is reserved then); InvalidArgument for n over
  // kMaxAllocateSlots; the write error once the index is read-only.
  Result<std::vector<BlockSlot>> AllocateSlots(uint64_t n);
  // Returns reserved slots that will not be committed (a failed turn).
  // InvalidArgument, with nothing released, if any is not reserved. Once the
  // index is read-only the slots stay reserved (their batch may have reached
  // the disk) and the write error is returned.
  Status ReleaseSlots(std::span<const BlockSlot> slots);

  // Commits a turn of session (m.owner_uid, m.name), creating it if absent.
  // REQUIRES: the page data of every new block is durable on T2.
  // `new_blocks` are the reserved slots this turn wrote; every other slot of
  // m.blocks must already be committed (kept from the previous turn, or
  // shared). Slots the session referenced before and m.blocks no longer
  // lists (e.g. a rewritten partial last block) lose a reference; records
  // reaching zero are deleted and their slots become free once the batch is
  // durable. Errors: InvalidArgument (manifest or block lists),
  // FailedPrecondition when m.turn_seq is not above the committed one,
  // ResourceExhausted at max_sessions, or the write's error.
  Status CommitTurn(const Manifest& m, std::span<const NewBlock> new_blocks);

  // Creates session (dst.owner_uid, dst.name), whose blocks must all be
  // blocks of the source session, with the same KV geometry; each gains a
  // reference. NotFound (source), AlreadyExists (destination),
  // InvalidArgument, ResourceExhausted.
  Status ForkSession(uint32_t src_uid, std::string_view src_name, const Manifest& dst);

  // Removes the session; its blocks lose a reference. NotFound if absent.
  Status DeleteSession(uint32_t uid, std::string_view name);

  // NotFound for an unknown session; Corruption naming it for damage.
  Result<Manifest> GetManifest(uint32_t uid, std::string_view name) const;
  // Every session (uid, then name order), from one snapshot: what start-up
  // needs to list and resume sessions without reading page data.
  Result<std::vector<Manifest>> LoadManifests() const;
  // The block's record; NotFound when the slot is not committed.
  Result<BlockInfo> GetBlock(BlockSlot slot) const;
  // The same as it was when `pin` was taken. REQUIRES: `pin` came from this
  // index.
  Result<BlockInfo> GetBlock(BlockSlot slot, const BlockPin& pin) const;

  // Pins committed `slots` (see BlockPin); NotFound naming the first one
  // that is not committed (nothing is pinned then). Waits for a mutation in
  // flight, so the pin sees none of it or all of it.
  Result<std::unique_ptr<BlockPin>> Pin(std::span<const BlockSlot> slots);

 private:
  friend class BlockPin;
  void Unpin(const BlockPin& pin);
  Result<BlockInfo> ReadBlock(BlockSlot slot, const rocksdb::Snapshot* snapshot) const;
  struct Impl;
  explicit Index(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mnemo::tiering
