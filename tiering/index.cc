// tiering::Index over RocksDB: key and record encodings, Open-time
// verification and recovery, the slot allocator, and the synced mutation
// batches. RocksDB stays inside this file; FromRocks is the one place its
// statuses become mnemo Statuses.
#include "tiering/index.h"

#include <rocksdb/cache.h>
#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/options.h>
#include <rocksdb/snapshot.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>
#include <spdlog/spdlog.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <utility>

namespace mnemo::tiering {

#if MNEMO_HAVE_XXH3_AVX2
namespace internal {
uint64_t PageChecksumAvx2(const void* data, size_t bytes);
}  // namespace internal

uint64_t PageChecksum(const void* data, size_t bytes) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2 ? internal::PageChecksumAvx2(data, bytes) : XXH3_64bits(data, bytes);
}
#else
uint64_t PageChecksum(const void* data, size_t bytes) { return XXH3_64bits(data, bytes); }
#endif

namespace {

constexpr char kBlockPrefix = 'B';
constexpr char kChunkPrefix = 'C';
constexpr char kHeadPrefix = 'M';
constexpr char kRefPrefix = 'R';
constexpr std::string_view kFormatKey = "V";
constexpr uint32_t kFormatMagic = 0x58494E4D;  // "MNIX"
constexpr uint16_t kRecordVersion = 1;
constexpr uint64_t kMaxCapacitySlots = uint64_t{1} << 40;
constexpr uint32_t kMaxRefcount = UINT32_MAX - 1;
constexpr size_t kRefRecordBytes = 16;

// --- Status translation ------------------------------------------------------

// The one place RocksDB statuses become mnemo Statuses.
Status FromRocks(const rocksdb::Status& s, std::string_view context) {
  if (s.ok()) return Status::Ok();
  std::string m(context);
  m += ": ";
  m += s.ToString();
  switch (s.code()) {
    case rocksdb::Status::kNotFound:
      return Status::NotFound(std::move(m));
    case rocksdb::Status::kCorruption:
      return Status::Corruption(std::move(m));
    case rocksdb::Status::kNotSupported:
      return Status::Unsupported(std::move(m));
    case rocksdb::Status::kInvalidArgument:
      return Status::InvalidArgument(std::move(m));
    case rocksdb::Status::kIOError:
      return s.IsNoSpace() ? Status::ResourceExhausted(std::move(m)) : Status::IOError(std::move(m));
    case rocksdb::Status::kBusy:
    case rocksdb::Status::kTimedOut:
    case rocksdb::Status::kTryAgain:
    case rocksdb::Status::kIncomplete:
    case rocksdb::Status::kShutdownInProgress:
      return Status::Unavailable(std::move(m));
    default:
      return Status::Internal(std::move(m));
  }
}

// --- Fixed-width encodings ---------------------------------------------------

void PutLe(std::string* out, uint64_t v, size_t bytes) {
  for (size_t i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t GetLe(std::string_view b, size_t pos, size_t bytes) {
  uint64_t v = 0;
  for (size_t i = 0; i < bytes; ++i) v |= uint64_t{static_cast<uint8_t>(b[pos + i])} << (8 * i);
  return v;
}
void PutBe(std::string* out, uint64_t v, size_t bytes) {
  for (size_t i = bytes; i-- > 0;) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t GetBe(std::string_view b, size_t pos, size_t bytes) {
  uint64_t v = 0;
  for (size_t i = 0; i < bytes; ++i) v = (v << 8) | static_cast<uint8_t>(b[pos + i]);
  return v;
}

std::string_view View(const rocksdb::Slice& s) { return {s.data(), s.size()}; }

// --- Keys ----------------------------------------------------------------------

std::string HeadKey(uint32_t uid, std::string_view name) {
  std::string k(1, kHeadPrefix);
  PutBe(&k, uid, 4);
  k += name;
  return k;
}

std::string ChunkPrefix(uint32_t uid, std::string_view name) {
  std::string k(1, kChunkPrefix);
  PutBe(&k, uid, 4);
  k += name;
  k.push_back('\0');
  return k;
}

std::string ChunkKey(std::string_view prefix, uint32_t i) {
  std::string k(prefix);
  PutBe(&k, i, 4);
  return k;
}

std::string SlotKey(char prefix, BlockSlot slot) {
  std::string k(1, prefix);
  PutBe(&k, slot, 8);
  return k;
}

bool ParseHeadKey(std::string_view k, uint32_t* uid, std::string* name) {
  if (k.size() < 6 || k.size() > 5 + kMaxSessionNameBytes || k[0] != kHeadPrefix) return false;
  *uid = static_cast<uint32_t>(GetBe(k, 1, 4));
  name->assign(k.substr(5));
  return name->find('\0') == std::string::npos;
}

bool ParseSlotKey(std::string_view k, char prefix, BlockSlot* slot) {
  if (k.size() != 9 || k[0] != prefix) return false;
  *slot = GetBe(k, 1, 8);
  return true;
}

bool HasPrefix(const rocksdb::Slice& key, std::string_view prefix) {
  return key.size() >= prefix.size() && View(key).substr(0, prefix.size()) == prefix;
}

std::string Hex(std::string_view b) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  for (unsigned char c : b.substr(0, 64)) {
    s += kHex[c >> 4];
    s += kHex[c & 15];
  }
  return s;
}

// --- Records -------------------------------------------------------------------

// Seeded with the key so that a value under the wrong key fails too.
uint64_t RecordHash(std::string_view key, std::string_view body) {
  return XXH3_64bits_withSeed(body.data(), body.size(), XXH3_64bits(key.data(), key.size()));
}

std::string EncodeBlockRecord(std::string_view key, std::span<const uint64_t> sums) {
  std::string v;
  v.reserve(4 + 8 * sums.size() + 8);
  PutLe(&v, sums.size(), 2);
  PutLe(&v, kRecordVersion, 2);
  for (uint64_t s : sums) PutLe(&v, s, 8);
  PutLe(&v, RecordHash(key, v), 8);
  return v;
}

Status DecodeBlockRecord(std::string_view key, std::string_view v, BlockSlot slot, std::vector<uint64_t>* sums) {
  const std::string what = "block record of slot " + std::to_string(slot);
  if (v.size() < 12) return Status::Corruption(what + " is truncated");
  const size_t n = GetLe(v, 0, 2);
  if (n == 0 || n > static_cast<size_t>(kMaxLayers) || v.size() != 4 + 8 * n + 8)
    return Status::Corruption(what + " has a bad length");
  if (RecordHash(key, v.substr(0, v.size() - 8)) != GetLe(v, v.size() - 8, 8))
    return Status::Corruption(what + " checksum mismatch");
  if (GetLe(v, 2, 2) != kRecordVersion) return Status::Corruption(what + " has an unknown version");
  sums->resize(n);
  for (size_t i = 0; i < n; ++i) (*sums)[i] = GetLe(v, 4 + 8 * i, 8);
  return Status::Ok();
}

std::string EncodeRefRecord(std::string_view key, uint32_t ref) {
  std::string v;
  v.reserve(kRefRecordBytes);
  PutLe(&v, ref, 4);
  PutLe(&v, 0, 4);
  PutLe(&v, RecordHash(key, v), 8);
  return v;
}

Status DecodeRefRecord(std::string_view key, std::string_view v, BlockSlot slot, uint32_t* ref) {
  const std::string what = "refcount record of slot " + std::to_string(slot);
  if (v.size() != kRefRecordBytes) return Status::Corruption(what + " has a bad length");
  if (RecordHash(key, v.substr(0, 8)) != GetLe(v, 8, 8)) return Status::Corruption(what + " checksum mismatch");
  *ref = static_cast<uint32_t>(GetLe(v, 0, 4));
  if (*ref == 0 || GetLe(v, 4, 4) != 0) return Status::Corruption(what + " is invalid");
  return Status::Ok();
}

std::string EncodeFormatRecord(uint32_t version) {
  std::string v;
  PutLe(&v, kFormatMagic, 4);
  PutLe(&v, version, 4);
  return v;
}

// Sorted set differences of two slot lists, skipping their common prefix
// (a turn usually keeps all but the last block).
void DiffSlots(std::span<const BlockSlot> before, std::span<const BlockSlot> after, std::vector<BlockSlot>* added,
               std::vector<BlockSlot>* removed) {
  size_t p = 0;
  while (p < before.size() && p < after.size() && before[p] == after[p]) ++p;
  std::vector<BlockSlot> b(before.begin() + p, before.end()), a(after.begin() + p, after.end());
  std::sort(b.begin(), b.end());
  std::sort(a.begin(), a.end());
  std::set_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(*added));
  std::set_difference(b.begin(), b.end(), a.begin(), a.end(), std::back_inserter(*removed));
}

// RocksDB's strict WAL recovery reports a log that ends inside a record
// with these reasons (db/log_reader.cc); any other damage is not a torn
// write. Should a RocksDB release reword them, a torn tail fails Open as
// Corruption: the safe direction.
bool IsTornWalTail(const rocksdb::Status& s) {
  const std::string m = s.ToString();
  for (const char* reason : {"truncated record body", "truncated header", "error reading trailing data"}) {
    if (m.find(reason) != std::string::npos) return true;
  }
  return false;
}

bool PlausibleName(std::string_view name) {
  return !name.empty() && name.size() <= kMaxSessionNameBytes && name.find('\0') == std::string_view::npos;
}

// A snapshot released on scope exit.
class ScopedSnapshot {
 public:
  explicit ScopedSnapshot(rocksdb::DB* db) : db_(db), snap_(db->GetSnapshot()) {}
  ~ScopedSnapshot() { db_->ReleaseSnapshot(snap_); }
  ScopedSnapshot(const ScopedSnapshot&) = delete;
  ScopedSnapshot& operator=(const ScopedSnapshot&) = delete;
  const rocksdb::Snapshot* get() const { return snap_; }

 private:
  rocksdb::DB* db_;
  const rocksdb::Snapshot* snap_;
};

using SessionKey = std::pair<uint32_t, std::string>;

// What the index keeps in memory of a committed session: enough to compute
// refcount changes and which manifest chunks a turn rewrites.
struct SessionRec {
  std::vector<BlockSlot> slots;
  std::vector<uint64_t> chunk_hashes;
  uint64_t turn_seq = 0;
  KvGeometry kv;
};

// A mutation: computed under mu, written, then applied to memory once the
// batch is durable.
struct Plan {
  rocksdb::WriteBatch batch;
  SessionKey key;
  std::optional<SessionRec> rec;                     // new state; nullopt erases
  std::vector<BlockSlot> created;                    // reserved -> refcount 1
  std::vector<std::pair<BlockSlot, uint32_t>> refs;  // committed -> new refcount >= 1
  std::vector<BlockSlot> freed;                      // refcount -> 0
  rocksdb::Status batch_status;                      // first WriteBatch failure

  void Put(std::string_view k, std::string_view v) {
    if (batch_status.ok())
      batch_status = batch.Put(rocksdb::Slice(k.data(), k.size()), rocksdb::Slice(v.data(), v.size()));
  }
  void Delete(std::string_view k) {
    if (batch_status.ok()) batch_status = batch.Delete(rocksdb::Slice(k.data(), k.size()));
  }
};

struct LoadedManifest {
  Manifest m;
  std::vector<uint64_t> chunk_hashes;
};

}  // namespace

struct Index::Impl {
  // Constant after Open.
  std::string dir;
  IndexOptions options;
  std::unique_ptr<rocksdb::DB> db;
  RecoveryReport report;
  bool needs_format_record = false;  // found by a read-only Recover

  // Serializes mutations and is held across their synced write, so that a
  // plan computed from memory is still valid when it is applied. Taken
  // before mu.
  std::mutex write_mu;
  mutable std::mutex mu;
  // Guarded by mu.
  Status write_error;  // sticky: the index is read-only after a failed write
  std::map<SessionKey, SessionRec> sessions;
  std::unordered_map<BlockSlot, uint32_t> refs;  // committed slots
  std::unordered_set<BlockSlot> reserved;
  std::unordered_map<BlockSlot, uint32_t> pins;  // BlockPins holding the slot
  // Pinned slots that no manifest references any more: free once unpinned.
  std::unordered_set<BlockSlot> pinned_unreferenced;
  // Free slots below capacity as disjoint, coalesced extents: start -> length.
  std::map<BlockSlot, uint64_t> free_extents;
  uint64_t free_slots = 0;

  ~Impl() {
    if (db) {
      rocksdb::Status s = db->Close();
      if (!s.ok()) spdlog::warn("index {}: close: {}", dir, s.ToString());
    }
  }

  // Writes the memtables to tables so that the log holds nothing the next
  // Open must replay (see Index::~Index).
  void FlushForCleanClose();

  std::string Context() const { return "index " + dir; }
  Status Corrupt(std::string_view why) const { return Status::Corruption(Context() + ": " + std::string(why)); }
  Status Rocks(const rocksdb::Status& s, std::string_view what = {}) const {
    return FromRocks(s, what.empty() ? Context() : Context() + ": " + std::string(what));
  }

  rocksdb::Options RocksOptions(bool tolerate_torn_wal_tail) const;
  // Corruption when `dir` has no CURRENT file but holds RocksDB tables or
  // logs: a lost CURRENT, not a new database (RocksDB would start an empty
  // one over them and delete the tables at the next open).
  Status CheckNoOrphanedData() const;
  // Opens the existing database read-only (nothing written, no info log)
  // and runs Recover on it, so that a newer format or damage fails Open
  // before RocksDB's read-write open writes anything. Sets *tolerant when
  // only a torn log tail could be dropped; leaves db closed.
  Status Probe(bool* tolerant);
  // With read_only, a missing format record of an empty database is noted
  // (needs_format_record) instead of written.
  Status CheckFormat(bool read_only);
  Status Recover(bool read_only);
  Result<LoadedManifest> ReadManifest(rocksdb::Iterator* chunks, uint32_t uid, std::string_view name,
                                      std::string_view head) const;
  Status CheckNoKeys(const rocksdb::ReadOptions& ro, std::string_view lo, std::string_view hi) const;

  void AddFree(BlockSlot start, uint64_t len);
  void FreeSlot(BlockSlot slot);
  void PutSessionRecords(const SessionRec* old, const SessionKey& key, const EncodedManifest& enc, Plan* plan) const;
  void AddRef(BlockSlot slot, uint32_t current, Plan* plan) const;
  void DropRef(BlockSlot slot, Plan* plan) const;
  Status Execute(Plan* plan);
};

rocksdb::Options Index::Impl::RocksOptions(bool tolerate_torn_wal_tail) const {
  rocksdb::Options o;
  if (options.env) o.env = options.env;
  o.create_if_missing = options.create_if_missing;
  o.paranoid_checks = true;
  o.paranoid_file_checks = true;
  o.force_consistency_checks = true;
  // Strict first: any damage in the log fails recovery. Only an Open that
  // found a torn tail retries with the tolerant mode (see Index::Open).
  o.wal_recovery_mode = tolerate_torn_wal_tail ? rocksdb::WALRecoveryMode::kTolerateCorruptedTailRecords
                                               : rocksdb::WALRecoveryMode::kAbsoluteConsistency;
  o.avoid_flush_during_recovery = false;
  o.write_buffer_size = options.write_buffer_bytes;
  o.max_write_buffer_number = 2;
  o.max_total_wal_size = 4 * options.write_buffer_bytes;
  o.max_background_jobs = 2;
  o.max_open_files = 256;
  o.keep_log_file_num = 4;
  o.max_log_file_size = 8u << 20;
  o.max_manifest_file_size = 64u << 20;
  rocksdb::BlockBasedTableOptions t;
  t.block_cache = rocksdb::NewLRUCache(options.block_cache_bytes);
  t.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
  t.checksum = rocksdb::kXXH3;
  o.table_factory.reset(rocksdb::NewBlockBasedTableFactory(t));
  return o;
}

Status Index::Impl::CheckFormat(bool read_only) {
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  std::string v;
  rocksdb::Status s = db->Get(ro, kFormatKey, &v);
  if (s.IsNotFound()) {
    {
      std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(ro));
      it->SeekToFirst();
      MNEMO_RETURN_IF_ERROR(Rocks(it->status()));
      if (it->Valid()) return Corrupt("has records but no format version record");
    }
    if (read_only) {
      needs_format_record = true;
      return Status::Ok();
    }
    rocksdb::WriteOptions wo;
    wo.sync = true;
    return Rocks(db->Put(wo, kFormatKey, EncodeFormatRecord(kIndexFormatVersion)), "writing the format version");
  }
  MNEMO_RETURN_IF_ERROR(Rocks(s, "reading the format version"));
  if (v.size() != 8 || GetLe(v, 0, 4) != kFormatMagic) return Corrupt("format version record is damaged");
  const uint64_t version = GetLe(v, 4, 4);
  if (version > kIndexFormatVersion) {
    return Status::FailedPrecondition(
        Context() + " has format version " + std::to_string(version) + ", newer than the version " +
        std::to_string(kIndexFormatVersion) +
        " this mnemod reads; it was written by a newer mnemod. Run that "
        "version, or move the directory aside to start empty. The index was not modified.");
  }
  if (version == 0) return Corrupt("format version record says version 0");
  return Status::Ok();
}

Result<LoadedManifest> Index::Impl::ReadManifest(rocksdb::Iterator* chunks, uint32_t uid, std::string_view name,
                                                 std::string_view head) const {
  const std::string what = SessionLabel(uid, name);
  MNEMO_ASSIGN_OR_RETURN(ManifestDecoder d, ManifestDecoder::Start(head, what));
  if (d.manifest().owner_uid != uid || d.manifest().name != name) {
    return Status::Corruption(what + ": manifest stored under it belongs to " +
                              SessionLabel(d.manifest().owner_uid, d.manifest().name));
  }
  const std::string prefix = ChunkPrefix(uid, name);
  chunks->Seek(prefix);
  for (uint32_t i = 0; i < d.chunk_count(); ++i, chunks->Next()) {
    if (!chunks->Valid() || View(chunks->key()) != ChunkKey(prefix, i)) {
      MNEMO_RETURN_IF_ERROR(Rocks(chunks->status(), what));
      return Status::Corruption(what + ": manifest chunk " + std::to_string(i) + " is missing");
    }
    MNEMO_RETURN_IF_ERROR(d.AddChunk(View(chunks->value())));
  }
  MNEMO_RETURN_IF_ERROR(Rocks(chunks->status(), what));
  if (chunks->Valid() && HasPrefix(chunks->key(), prefix))
    return Status::Corruption(what + ": has a manifest chunk beyond the " + std::to_string(d.chunk_count()) +
                              " its head lists");
  LoadedManifest out;
  out.chunk_hashes = d.chunk_hashes();
  MNEMO_ASSIGN_OR_RETURN(out.m, d.Finish());
  return out;
}

Status Index::Impl::CheckNoKeys(const rocksdb::ReadOptions& ro, std::string_view lo, std::string_view hi) const {
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(ro));
  it->Seek(rocksdb::Slice(lo.data(), lo.size()));
  MNEMO_RETURN_IF_ERROR(Rocks(it->status()));
  if (it->Valid() && (hi.empty() || View(it->key()) < hi)) return Corrupt("unknown record key " + Hex(View(it->key())));
  return Status::Ok();
}

Status Index::Impl::Recover(bool read_only) {
  const auto t0 = std::chrono::steady_clock::now();
  MNEMO_RETURN_IF_ERROR(CheckFormat(read_only));
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  ro.fill_cache = false;
  // Every block of every table, shadowed entries included, so that damage a
  // later compaction would trip over stops start-up instead.
  MNEMO_RETURN_IF_ERROR(Rocks(db->VerifyChecksum(ro), "verifying table checksums"));

  ScopedSnapshot snap(db.get());
  ro.snapshot = snap.get();
  // Keys outside the known ranges mean damage or a format this build does not
  // know.
  MNEMO_RETURN_IF_ERROR(CheckNoKeys(ro, "", "B"));
  MNEMO_RETURN_IF_ERROR(CheckNoKeys(ro, "D", "M"));
  MNEMO_RETURN_IF_ERROR(CheckNoKeys(ro, "N", "R"));
  MNEMO_RETURN_IF_ERROR(CheckNoKeys(ro, "S", "V"));
  MNEMO_RETURN_IF_ERROR(CheckNoKeys(ro, std::string_view("V\0", 2), ""));

  // Manifests, with chunks walked in step: head and chunk keys sort alike
  // (names hold no NUL), so a chunk key the walk skips belongs to no session.
  std::unordered_map<BlockSlot, uint32_t> derived;  // slot -> manifests referencing it
  {
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(ro));
    std::unique_ptr<rocksdb::Iterator> cit(db->NewIterator(ro));
    cit->Seek(std::string(1, kChunkPrefix));
    const std::string head_end(1, static_cast<char>(kHeadPrefix + 1)),
        chunk_end(1, static_cast<char>(kChunkPrefix + 1));
    for (it->Seek(std::string(1, kHeadPrefix)); it->Valid() && View(it->key()) < head_end; it->Next()) {
      uint32_t uid = 0;
      std::string name;
      if (!ParseHeadKey(View(it->key()), &uid, &name)) return Corrupt("malformed manifest key " + Hex(View(it->key())));
      const std::string prefix = ChunkPrefix(uid, name);
      if (cit->Valid() && View(cit->key()) < prefix)
        return Corrupt("manifest chunk " + Hex(View(cit->key())) + " belongs to no session");
      Result<LoadedManifest> lm = ReadManifest(cit.get(), uid, name, View(it->value()));
      if (!lm.ok()) return lm.status().WithContext(Context());
      for (BlockSlot s : lm->m.blocks) ++derived[s];
      report.block_references += lm->m.blocks.size();
      SessionRec rec{std::move(lm->m.blocks), std::move(lm->chunk_hashes), lm->m.turn_seq, lm->m.kv};
      sessions.emplace(SessionKey{uid, std::move(name)}, std::move(rec));
    }
    MNEMO_RETURN_IF_ERROR(Rocks(it->status()));
    MNEMO_RETURN_IF_ERROR(Rocks(cit->status()));
    if (cit->Valid() && View(cit->key()) < chunk_end)
      return Corrupt("manifest chunk " + Hex(View(cit->key())) + " belongs to no session");
  }

  // Refcount and block records, walked in step (both keyed by slot), each
  // checked against the references the manifests make.
  {
    std::unique_ptr<rocksdb::Iterator> rit(db->NewIterator(ro));
    std::unique_ptr<rocksdb::Iterator> bit(db->NewIterator(ro));
    const std::string ref_end(1, static_cast<char>(kRefPrefix + 1)), block_end(1, static_cast<char>(kBlockPrefix + 1));
    bit->Seek(std::string(1, kBlockPrefix));
    std::vector<uint64_t> sums;
    for (rit->Seek(std::string(1, kRefPrefix)); rit->Valid() && View(rit->key()) < ref_end; rit->Next()) {
      BlockSlot slot = 0;
      if (!ParseSlotKey(View(rit->key()), kRefPrefix, &slot))
        return Corrupt("malformed refcount key " + Hex(View(rit->key())));
      uint32_t ref = 0;
      Status st = DecodeRefRecord(View(rit->key()), View(rit->value()), slot, &ref);
      if (!st.ok()) return st.WithContext(Context());
      BlockSlot bslot = 0;
      const bool have_block = bit->Valid() && View(bit->key()) < block_end;
      if (have_block && !ParseSlotKey(View(bit->key()), kBlockPrefix, &bslot))
        return Corrupt("malformed block key " + Hex(View(bit->key())));
      if (!have_block || bslot > slot)
        return Corrupt("slot " + std::to_string(slot) + " has a refcount but no block record");
      if (bslot < slot) return Corrupt("slot " + std::to_string(bslot) + " has a block record but no refcount");
      st = DecodeBlockRecord(View(bit->key()), View(bit->value()), slot, &sums);
      if (!st.ok()) return st.WithContext(Context());
      bit->Next();
      auto d = derived.find(slot);
      const uint32_t users = d == derived.end() ? 0 : d->second;
      if (users != ref)
        return Corrupt("slot " + std::to_string(slot) + " has refcount " + std::to_string(ref) + " but " +
                       std::to_string(users) + " manifests reference it");
      derived.erase(slot);
      refs.emplace(slot, ref);
    }
    MNEMO_RETURN_IF_ERROR(Rocks(rit->status()));
    MNEMO_RETURN_IF_ERROR(Rocks(bit->status()));
    if (bit->Valid() && View(bit->key()) < block_end)
      return Corrupt("block record " + Hex(View(bit->key())) + " has no refcount");
    if (!derived.empty()) {
      return Corrupt("slot " + std::to_string(derived.begin()->first) + " is referenced by " +
                     std::to_string(derived.begin()->second) + " manifests but has no block record");
    }
  }

  // The allocator: free = every slot below capacity that is not committed.
  std::vector<BlockSlot> used;
  used.reserve(refs.size());
  for (const auto& [slot, ref] : refs) {
    if (slot < options.capacity_slots) {
      used.push_back(slot);
    } else {
      ++report.slots_beyond_capacity;
    }
  }
  std::sort(used.begin(), used.end());
  BlockSlot next = 0;
  for (BlockSlot s : used) {
    if (s > next) AddFree(next, s - next);
    next = s + 1;
  }
  if (next < options.capacity_slots) AddFree(next, options.capacity_slots - next);

  report.sessions = sessions.size();
  report.slots_committed = refs.size();
  report.slots_free = free_slots;
  report.elapsed_ms = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count());
  return Status::Ok();
}

void Index::Impl::AddFree(BlockSlot start, uint64_t len) {
  free_extents.emplace(start, len);
  free_slots += len;
}

void Index::Impl::FreeSlot(BlockSlot s) {
  if (s >= options.capacity_slots) return;  // above a lowered budget: never reused
  auto next = free_extents.upper_bound(s);
  if (next != free_extents.begin()) {
    auto prev = std::prev(next);
    MNEMO_CHECK_MSG(prev->first + prev->second <= s, "slot freed twice");
    if (prev->first + prev->second == s) {
      ++prev->second;
      if (next != free_extents.end() && next->first == s + 1) {
        prev->second += next->second;
        free_extents.erase(next);
      }
      ++free_slots;
      return;
    }
  }
  if (next != free_extents.end() && next->first == s + 1) {
    auto node = free_extents.extract(next);
    node.key() = s;
    ++node.mapped();
    free_extents.insert(std::move(node));
  } else {
    free_extents.emplace(s, 1);
  }
  ++free_slots;
}

void Index::Impl::PutSessionRecords(const SessionRec* old, const SessionKey& key, const EncodedManifest& enc,
                                    Plan* plan) const {
  plan->Put(HeadKey(key.first, key.second), enc.head);
  const std::string prefix = ChunkPrefix(key.first, key.second);
  const size_t old_n = old ? old->chunk_hashes.size() : 0;
  for (size_t i = 0; i < enc.chunks.size(); ++i) {
    if (i < old_n && old->chunk_hashes[i] == enc.chunk_hashes[i]) continue;  // unchanged
    plan->Put(ChunkKey(prefix, static_cast<uint32_t>(i)), enc.chunks[i]);
  }
  for (size_t i = enc.chunks.size(); i < old_n; ++i) plan->Delete(ChunkKey(prefix, static_cast<uint32_t>(i)));
}

void Index::Impl::AddRef(BlockSlot slot, uint32_t current, Plan* plan) const {
  plan->refs.emplace_back(slot, current + 1);
  const std::string k = SlotKey(kRefPrefix, slot);
  plan->Put(k, EncodeRefRecord(k, current + 1));
}

void Index::Impl::DropRef(BlockSlot slot, Plan* plan) const {
  auto r = refs.find(slot);
  MNEMO_CHECK_MSG(r != refs.end(), "a committed manifest references an uncommitted slot");
  if (r->second == 1) {
    plan->freed.push_back(slot);
    plan->Delete(SlotKey(kRefPrefix, slot));
    plan->Delete(SlotKey(kBlockPrefix, slot));
  } else {
    plan->refs.emplace_back(slot, r->second - 1);
    const std::string k = SlotKey(kRefPrefix, slot);
    plan->Put(k, EncodeRefRecord(k, r->second - 1));
  }
}

Status Index::Impl::Execute(Plan* plan) {
  if (!plan->batch_status.ok()) return Rocks(plan->batch_status, "building a write batch");
  rocksdb::WriteOptions wo;
  wo.sync = true;
  const rocksdb::Status ws = db->Write(wo, &plan->batch);
  std::lock_guard<std::mutex> l(mu);
  if (!ws.ok()) {
    // The batch may or may not be durable: stop mutating until a reopen
    // reads the truth back from disk. Slots it would free stay unavailable.
    write_error = Rocks(ws, "synced write failed; the index is read-only until mnemod restarts");
    return write_error;
  }
  for (BlockSlot s : plan->created) {
    MNEMO_CHECK(reserved.erase(s) == 1);
    MNEMO_CHECK(refs.emplace(s, 1).second);
  }
  for (const auto& [slot, ref] : plan->refs) {
    auto r = refs.find(slot);
    MNEMO_CHECK(r != refs.end());
    r->second = ref;
  }
  for (BlockSlot s : plan->freed) {
    MNEMO_CHECK(refs.erase(s) == 1);
    if (pins.count(s)) {
      pinned_unreferenced.insert(s);  // a reader still needs its data
    } else {
      FreeSlot(s);
    }
  }
  if (plan->rec) {
    sessions.insert_or_assign(std::move(plan->key), std::move(*plan->rec));
  } else {
    sessions.erase(plan->key);
  }
  return Status::Ok();
}

Status Index::Impl::CheckNoOrphanedData() const {
  std::error_code ec;
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const bool data = name.ends_with(".sst") || (name.ends_with(".log") && name != "LOG");
    if (data)
      return Corrupt("holds RocksDB data (" + name +
                     ") but no CURRENT file, which names the database's MANIFEST; it was lost or deleted");
  }
  return Status::Ok();
}

namespace {

// Swallows RocksDB's info log: the read-only probe creates no LOG file.
class NullLogger final : public rocksdb::Logger {
 public:
  using rocksdb::Logger::Logv;
  void Logv(const char* /*format*/, va_list /*ap*/) override {}
};

}  // namespace

Status Index::Impl::Probe(bool* tolerant) {
  *tolerant = false;
  auto open = [&](bool tolerate) {
    rocksdb::Options o = RocksOptions(tolerate);
    o.info_log = std::make_shared<NullLogger>();
    rocksdb::DB* raw = nullptr;
    rocksdb::Status rs = rocksdb::DB::OpenForReadOnly(o, dir, &raw);
    db.reset(raw);
    return rs;
  };
  rocksdb::Status rs = open(false);
  if (rs.IsCorruption() && IsTornWalTail(rs) && !options.fail_on_torn_wal_tail) {
    // Replay again, stopping at the torn record; the read-write open will
    // drop it the same way. Report what was dropped.
    report.wal_tail_dropped = true;
    report.wal_tail_detail = rs.ToString();
    *tolerant = true;
    rs = open(true);
  }
  Status st;
  if (rs.IsPathNotFound() || rs.IsNotFound()) {
    // CURRENT exists, so a file it leads to (the MANIFEST, a table) is gone.
    st = Corrupt("a file the database lists is missing: " + rs.ToString());
  } else {
    st = Rocks(rs, "opening RocksDB");
  }
  if (st.ok()) st = Recover(/*read_only=*/true);
  if (db) {
    rocksdb::Status cs = db->Close();
    if (st.ok() && !cs.ok()) st = Rocks(cs, "closing the read-only check");
    db.reset();
  }
  return st;
}

// --- Index -----------------------------------------------------------------------

void Index::Impl::FlushForCleanClose() {
  {
    std::lock_guard<std::mutex> l(mu);
    // After a failed write RocksDB has stopped writing (a background error),
    // and the next Open reads the outcome back from the log.
    if (!write_error.ok()) return;
  }
  rocksdb::FlushOptions fo;
  fo.wait = true;
  fo.allow_write_stall = true;
  const rocksdb::Status s = db->Flush(fo);
  // Nothing is lost either way: every acknowledged write is in the synced log.
  if (!s.ok()) spdlog::warn("index {}: flush at close: {} (the next start replays the log)", dir, s.ToString());
}

Index::Index(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

// Every Open replays the log twice (the read-only check, then the writable
// open), and the writable open then writes what it replayed to a table:
// with everything written since the last memtable flush in the log (up to
// two 16 MiB write buffers), that was most of a start-up's time. So a clean
// close flushes first and leaves an empty log (RocksDB's own shutdown
// flush, avoid_flush_during_shutdown, covers only writes made without a
// log). A crash still leaves the synced log, which Open replays as before.
Index::~Index() { impl_->FlushForCleanClose(); }

Result<std::unique_ptr<Index>> Index::Open(const std::string& dir, const IndexOptions& options) {
  if (options.capacity_slots == 0 || options.capacity_slots > kMaxCapacitySlots)
    return Status::InvalidArgument("index capacity must be 1.." + std::to_string(kMaxCapacitySlots) + " slots");
  if (options.max_sessions == 0) return Status::InvalidArgument("index max_sessions must be positive");
  if (options.write_buffer_bytes < (64u << 10) || options.write_buffer_bytes > (size_t{1} << 30))
    return Status::InvalidArgument("index write buffer must be 64 KiB..1 GiB");
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->options = options;
  // An existing database is verified read-only before RocksDB opens it for
  // writing (which writes a new MANIFEST, log and info LOG at once): a
  // failed Open leaves the directory byte for byte as it was.
  std::error_code ec;
  const bool existing = std::filesystem::exists(std::filesystem::path(dir) / "CURRENT", ec);
  Status st;
  bool tolerant = false;
  if (existing) {
    st = impl->Probe(&tolerant);
  } else {
    st = impl->CheckNoOrphanedData();
    if (st.ok() && !options.create_if_missing)
      return Status::NotFound("index " + dir + " does not exist (no CURRENT file)");
    if (st.ok()) {
      std::filesystem::create_directories(dir, ec);
      if (ec) return Status::IOError("creating index directory " + dir + ": " + ec.message());
    }
  }
  if (st.ok()) {
    rocksdb::DB* raw = nullptr;
    st = impl->Rocks(rocksdb::DB::Open(impl->RocksOptions(tolerant), dir, &raw), "opening RocksDB");
    impl->db.reset(raw);
  }
  if (st.ok() && !existing) st = impl->Recover(/*read_only=*/false);
  if (st.ok() && impl->needs_format_record) st = impl->CheckFormat(/*read_only=*/false);
  if (st.ok()) return std::unique_ptr<Index>(new Index(std::move(impl)));
  if (st.code() != StatusCode::kCorruption) return st;
  std::string m(st.message());
  m += ". mnemod does not start on a damaged index, which would lose sessions silently: restore " + dir +
       " from a backup, or move it aside to start with no sessions";
  return Status::Corruption(std::move(m));
}

const RecoveryReport& Index::recovery() const { return impl_->report; }

SlotStats Index::slot_stats() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  SlotStats s;
  s.capacity = impl_->options.capacity_slots;
  s.committed = impl_->refs.size();
  s.reserved = impl_->reserved.size();
  s.free = impl_->free_slots;
  return s;
}

Result<std::vector<BlockSlot>> Index::AllocateSlots(uint64_t n) {
  if (n > kMaxAllocateSlots)
    return Status::InvalidArgument("cannot allocate " + std::to_string(n) + " slots at once (limit " +
                                   std::to_string(kMaxAllocateSlots) + ")");
  Impl& x = *impl_;
  std::vector<BlockSlot> out;
  out.reserve(n);
  std::lock_guard<std::mutex> l(x.mu);
  MNEMO_RETURN_IF_ERROR(x.write_error);  // nothing could be committed
  if (n > x.free_slots) {
    return Status::ResourceExhausted(
        "T2 is full: " + std::to_string(n) + " slots wanted, " + std::to_string(x.free_slots) + " free of " +
        std::to_string(x.options.capacity_slots) + " (" + std::to_string(x.reserved.size()) + " reserved)");
  }
  while (out.size() < n) {
    auto it = x.free_extents.begin();
    MNEMO_CHECK(it != x.free_extents.end());
    const uint64_t take = std::min<uint64_t>(it->second, n - out.size());
    for (uint64_t k = 0; k < take; ++k) out.push_back(it->first + k);
    if (take == it->second) {
      x.free_extents.erase(it);
    } else {
      auto node = x.free_extents.extract(it);
      node.key() += take;
      node.mapped() -= take;
      x.free_extents.insert(std::move(node));
    }
    x.free_slots -= take;
  }
  x.reserved.insert(out.begin(), out.end());
  return out;
}

Status Index::ReleaseSlots(std::span<const BlockSlot> slots) {
  Impl& x = *impl_;
  std::lock_guard<std::mutex> wl(x.write_mu);  // not while a commit of them is in flight
  std::lock_guard<std::mutex> l(x.mu);
  // After a failed write these may be blocks of a batch that did reach the
  // disk: they stay reserved (never rewritten) until a reopen knows.
  MNEMO_RETURN_IF_ERROR(x.write_error);
  std::unordered_set<BlockSlot> seen;
  for (BlockSlot s : slots) {
    if (!x.reserved.count(s) || !seen.insert(s).second)
      return Status::InvalidArgument("slot " + std::to_string(s) + " is not reserved (or listed twice)");
  }
  for (BlockSlot s : slots) {
    x.reserved.erase(s);
    x.FreeSlot(s);
  }
  return Status::Ok();
}

Status Index::CommitTurn(const Manifest& m, std::span<const NewBlock> new_blocks) {
  MNEMO_ASSIGN_OR_RETURN(EncodedManifest enc, EncodeManifest(m));
  Impl& x = *impl_;
  const std::string what = SessionLabel(m.owner_uid, m.name);
  std::lock_guard<std::mutex> wl(x.write_mu);
  Plan plan;
  plan.key = SessionKey{m.owner_uid, m.name};
  {
    std::lock_guard<std::mutex> l(x.mu);
    MNEMO_RETURN_IF_ERROR(x.write_error);
    auto it = x.sessions.find(plan.key);
    const SessionRec* old = it == x.sessions.end() ? nullptr : &it->second;
    if (old && m.turn_seq <= old->turn_seq) {
      return Status::FailedPrecondition(what + ": turn " + std::to_string(m.turn_seq) +
                                        " does not follow the committed turn " + std::to_string(old->turn_seq));
    }
    if (!old && x.sessions.size() >= x.options.max_sessions)
      return Status::ResourceExhausted(what + ": the index holds its limit of " +
                                       std::to_string(x.options.max_sessions) + " sessions");
    std::unordered_map<BlockSlot, std::span<const uint64_t>> fresh;
    for (const NewBlock& nb : new_blocks) {
      const std::string slot = "new block slot " + std::to_string(nb.slot);
      if (nb.page_checksums.size() != static_cast<size_t>(m.kv.n_layers))
        return Status::InvalidArgument(what + ": " + slot + " has " + std::to_string(nb.page_checksums.size()) +
                                       " page checksums for " + std::to_string(m.kv.n_layers) + " layers");
      if (!x.reserved.count(nb.slot))
        return Status::InvalidArgument(what + ": " + slot + " is not reserved (AllocateSlots)");
      if (!fresh.emplace(nb.slot, nb.page_checksums).second)
        return Status::InvalidArgument(what + ": " + slot + " is listed twice");
    }
    std::vector<BlockSlot> added, removed;
    DiffSlots(old ? std::span<const BlockSlot>(old->slots) : std::span<const BlockSlot>(), m.blocks, &added, &removed);
    for (BlockSlot s : added) {
      if (auto f = fresh.find(s); f != fresh.end()) {
        plan.created.push_back(s);
        const std::string bk = SlotKey(kBlockPrefix, s), rk = SlotKey(kRefPrefix, s);
        plan.Put(bk, EncodeBlockRecord(bk, f->second));
        plan.Put(rk, EncodeRefRecord(rk, 1));
        fresh.erase(f);
      } else if (auto r = x.refs.find(s); r != x.refs.end()) {
        if (r->second >= kMaxRefcount)
          return Status::ResourceExhausted("slot " + std::to_string(s) + " is at its reference limit");
        x.AddRef(s, r->second, &plan);
      } else {
        return Status::InvalidArgument(what + ": block slot " + std::to_string(s) +
                                       " is neither committed nor one of the turn's new blocks");
      }
    }
    if (!fresh.empty())
      return Status::InvalidArgument(what + ": new block slot " + std::to_string(fresh.begin()->first) +
                                     " is not a new entry of the manifest's blocks");
    for (BlockSlot s : removed) x.DropRef(s, &plan);
    x.PutSessionRecords(old, plan.key, enc, &plan);
    plan.rec = SessionRec{m.blocks, std::move(enc.chunk_hashes), m.turn_seq, m.kv};
  }
  return x.Execute(&plan).WithContext(what);
}

Status Index::ForkSession(uint32_t src_uid, std::string_view src_name, const Manifest& dst) {
  MNEMO_ASSIGN_OR_RETURN(EncodedManifest enc, EncodeManifest(dst));
  Impl& x = *impl_;
  const std::string what = SessionLabel(dst.owner_uid, dst.name);
  const std::string src_what = SessionLabel(src_uid, src_name);
  std::lock_guard<std::mutex> wl(x.write_mu);
  Plan plan;
  plan.key = SessionKey{dst.owner_uid, dst.name};
  {
    std::lock_guard<std::mutex> l(x.mu);
    MNEMO_RETURN_IF_ERROR(x.write_error);
    auto src = x.sessions.find(SessionKey{src_uid, std::string(src_name)});
    if (src == x.sessions.end()) return Status::NotFound(src_what + ": no such session to fork");
    if (x.sessions.count(plan.key)) return Status::AlreadyExists(what + ": already exists");
    if (x.sessions.size() >= x.options.max_sessions)
      return Status::ResourceExhausted(what + ": the index holds its limit of " +
                                       std::to_string(x.options.max_sessions) + " sessions");
    if (!(dst.kv == src->second.kv))
      return Status::InvalidArgument(what + ": KV geometry differs from the fork source " + src_what);
    std::unordered_set<BlockSlot> shared(src->second.slots.begin(), src->second.slots.end());
    for (BlockSlot s : dst.blocks) {
      if (!shared.count(s))
        return Status::InvalidArgument(what + ": block slot " + std::to_string(s) + " is not a block of " + src_what);
      auto r = x.refs.find(s);
      MNEMO_CHECK_MSG(r != x.refs.end(), "a committed manifest references an uncommitted slot");
      const uint32_t ref = r->second;
      if (ref >= kMaxRefcount)
        return Status::ResourceExhausted("slot " + std::to_string(s) + " is at its reference limit");
      x.AddRef(s, ref, &plan);
    }
    x.PutSessionRecords(nullptr, plan.key, enc, &plan);
    plan.rec = SessionRec{dst.blocks, std::move(enc.chunk_hashes), dst.turn_seq, dst.kv};
  }
  return x.Execute(&plan).WithContext(what);
}

Status Index::DeleteSession(uint32_t uid, std::string_view name) {
  Impl& x = *impl_;
  const std::string what = SessionLabel(uid, name);
  std::lock_guard<std::mutex> wl(x.write_mu);
  Plan plan;
  plan.key = SessionKey{uid, std::string(name)};
  {
    std::lock_guard<std::mutex> l(x.mu);
    MNEMO_RETURN_IF_ERROR(x.write_error);
    auto it = x.sessions.find(plan.key);
    if (it == x.sessions.end()) return Status::NotFound(what + ": no such session");
    for (BlockSlot s : it->second.slots) x.DropRef(s, &plan);
    plan.Delete(HeadKey(uid, name));
    const std::string prefix = ChunkPrefix(uid, name);
    for (size_t i = 0; i < it->second.chunk_hashes.size(); ++i) plan.Delete(ChunkKey(prefix, static_cast<uint32_t>(i)));
  }
  return x.Execute(&plan).WithContext(what);
}

Result<Manifest> Index::GetManifest(uint32_t uid, std::string_view name) const {
  const Impl& x = *impl_;
  const std::string what = SessionLabel(uid, name);
  if (!PlausibleName(name)) return Status::NotFound(what + ": no such session");
  ScopedSnapshot snap(x.db.get());
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  ro.snapshot = snap.get();
  std::string head;
  const rocksdb::Status s = x.db->Get(ro, HeadKey(uid, name), &head);
  if (s.IsNotFound()) return Status::NotFound(what + ": no such session");
  MNEMO_RETURN_IF_ERROR(x.Rocks(s, what));
  std::unique_ptr<rocksdb::Iterator> cit(x.db->NewIterator(ro));
  Result<LoadedManifest> lm = x.ReadManifest(cit.get(), uid, name, head);
  if (!lm.ok()) return lm.status().WithContext(x.Context());
  return std::move(lm->m);
}

Result<std::vector<Manifest>> Index::LoadManifests() const {
  const Impl& x = *impl_;
  ScopedSnapshot snap(x.db.get());
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  ro.snapshot = snap.get();
  std::unique_ptr<rocksdb::Iterator> it(x.db->NewIterator(ro));
  std::unique_ptr<rocksdb::Iterator> cit(x.db->NewIterator(ro));
  std::vector<Manifest> out;
  const std::string head_end(1, static_cast<char>(kHeadPrefix + 1));
  for (it->Seek(std::string(1, kHeadPrefix)); it->Valid() && View(it->key()) < head_end; it->Next()) {
    uint32_t uid = 0;
    std::string name;
    if (!ParseHeadKey(View(it->key()), &uid, &name)) return x.Corrupt("malformed manifest key " + Hex(View(it->key())));
    Result<LoadedManifest> lm = x.ReadManifest(cit.get(), uid, name, View(it->value()));
    if (!lm.ok()) return lm.status().WithContext(x.Context());
    out.push_back(std::move(lm->m));
  }
  MNEMO_RETURN_IF_ERROR(x.Rocks(it->status(), "listing manifests"));
  return out;
}

Result<BlockInfo> Index::GetBlock(BlockSlot slot) const {
  ScopedSnapshot snap(impl_->db.get());
  return ReadBlock(slot, snap.get());
}

Result<BlockInfo> Index::GetBlock(BlockSlot slot, const BlockPin& pin) const {
  MNEMO_CHECK(pin.index_ == this);
  return ReadBlock(slot, pin.snapshot_);
}

Result<std::unique_ptr<BlockPin>> Index::Pin(std::span<const BlockSlot> slots) {
  Impl& x = *impl_;
  std::lock_guard<std::mutex> wl(x.write_mu);  // the database and refs agree
  std::lock_guard<std::mutex> l(x.mu);
  for (BlockSlot s : slots)
    if (!x.refs.count(s)) return Status::NotFound("block slot " + std::to_string(s) + " is not committed");
  for (BlockSlot s : slots) ++x.pins[s];
  return std::unique_ptr<BlockPin>(
      new BlockPin(this, std::vector<BlockSlot>(slots.begin(), slots.end()), x.db->GetSnapshot()));
}

void Index::Unpin(const BlockPin& pin) {
  Impl& x = *impl_;
  x.db->ReleaseSnapshot(pin.snapshot_);
  std::lock_guard<std::mutex> l(x.mu);
  for (BlockSlot s : pin.slots_) {
    auto it = x.pins.find(s);
    MNEMO_CHECK_MSG(it != x.pins.end(), "slot unpinned more often than pinned");
    if (--it->second > 0) continue;
    x.pins.erase(it);
    if (x.pinned_unreferenced.erase(s)) x.FreeSlot(s);
  }
}

BlockPin::~BlockPin() { index_->Unpin(*this); }

Result<BlockInfo> Index::ReadBlock(BlockSlot slot, const rocksdb::Snapshot* snapshot) const {
  const Impl& x = *impl_;
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  ro.snapshot = snapshot;
  const std::string bk = SlotKey(kBlockPrefix, slot), rk = SlotKey(kRefPrefix, slot);
  std::string bv, rv;
  const rocksdb::Status bs = x.db->Get(ro, bk, &bv);
  const rocksdb::Status rs = x.db->Get(ro, rk, &rv);
  const std::string what = "block slot " + std::to_string(slot);
  if (bs.IsNotFound() && rs.IsNotFound()) return Status::NotFound(what + " is not committed");
  if (bs.IsNotFound() || rs.IsNotFound()) return x.Corrupt(what + " has only one of its two records");
  MNEMO_RETURN_IF_ERROR(x.Rocks(bs, what));
  MNEMO_RETURN_IF_ERROR(x.Rocks(rs, what));
  BlockInfo info;
  Status st = DecodeRefRecord(rk, rv, slot, &info.refcount);
  if (st.ok()) st = DecodeBlockRecord(bk, bv, slot, &info.page_checksums);
  if (!st.ok()) return st.WithContext(x.Context());
  return info;
}

}  // namespace mnemo::tiering
