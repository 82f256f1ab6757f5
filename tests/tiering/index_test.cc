// tiering::Index: roundtrips, the slot allocator, refcounts across turns,
// forks and deletes, start-up reclamation, format versions, damaged records
// and byte flips in RocksDB's files, concurrency, a clean close that leaves
// nothing in the log, and crash consistency under real kill -9 (a child
// process re-executing this binary in a helper mode; logs that still hold
// commits are made the same way).
#include "tiering/index.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/file_system.h>
#include <rocksdb/options.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

extern char** environ;

namespace mnemo::tiering {
namespace {

namespace fs = std::filesystem;

constexpr int32_t kLayers = 4;
constexpr int32_t kPageTokens = 16;

#define ASSERT_OK(expr)                                       \
  do {                                                        \
    const ::mnemo::Status _st = StatusOf(expr);               \
    ASSERT_TRUE(_st.ok()) << #expr << ": " << _st.ToString(); \
  } while (0)
#define EXPECT_OK(expr)                                       \
  do {                                                        \
    const ::mnemo::Status _st = StatusOf(expr);               \
    EXPECT_TRUE(_st.ok()) << #expr << ": " << _st.ToString(); \
  } while (0)

Status StatusOf(const Status& s) { return s; }
template <typename T>
Status StatusOf(const Result<T>& r) {
  return r.status();
}

using Key = std::pair<uint32_t, std::string>;

// The checksums the tests store for a slot: derived from the slot alone so a
// checker can recompute them.
std::vector<uint64_t> Sums(BlockSlot slot) {
  std::vector<uint64_t> s(kLayers);
  for (int l = 0; l < kLayers; ++l) s[l] = XXH3_64bits_withSeed(&slot, sizeof(slot), l + 1);
  return s;
}

uint64_t Digest(const Manifest& m) {
  Result<EncodedManifest> e = EncodeManifest(m);
  MNEMO_CHECK(e.ok());
  return XXH3_64bits(e->head.data(), e->head.size());  // the head hashes every chunk
}

Manifest Empty(uint32_t uid, std::string name) {
  Manifest m;
  m.owner_uid = uid;
  m.name = std::move(name);
  m.model_fingerprint = 0xfeedf00d;
  m.kv = KvGeometry{kLayers, kPageTokens, 2, 8, KvDtype::kF16};
  m.created_unix_ms = 1700000000000;
  m.last_used_unix_ms = m.created_unix_ms;
  return m;
}

// Appends `add` tokens, keeps KV for all but the last `lag`, rewrites the old
// partial last block into a new slot, and commits. `before_commit` sees the
// manifest about to be committed. On failure `m` is unchanged and the turn's
// slots are released.
Status Turn(Index& idx, Manifest& m, std::mt19937_64& rng, uint32_t add, uint32_t lag = 1,
            const std::function<void(const Manifest&)>& before_commit = {}) {
  Manifest next = m;
  for (uint32_t i = 0; i < add; ++i) next.tokens.push_back(static_cast<int32_t>(rng() % 50000));
  next.kv_tokens = next.tokens.size() - std::min<uint64_t>(lag, next.tokens.size());
  next.kv_tokens = std::max(next.kv_tokens, m.kv_tokens);
  const uint64_t keep = m.kv_tokens / kPageTokens;  // full blocks stay where they are
  next.blocks.resize(keep);
  const uint64_t need = BlocksForTokens(next.kv_tokens, kPageTokens) - keep;
  MNEMO_ASSIGN_OR_RETURN(std::vector<BlockSlot> slots, idx.AllocateSlots(need));
  std::vector<std::vector<uint64_t>> sums;
  std::vector<NewBlock> fresh;
  sums.reserve(slots.size());
  for (BlockSlot s : slots) {
    sums.push_back(Sums(s));
    fresh.push_back(NewBlock{s, sums.back()});
    next.blocks.push_back(s);
  }
  ++next.turn_seq;
  ++next.turns;
  ++next.last_used_unix_ms;
  next.chat_open = !next.chat_open;
  next.sampler = SamplerState{7, next.turn_seq * 3};
  if (before_commit) before_commit(next);
  Status st = idx.CommitTurn(next, fresh);
  if (!st.ok()) {
    (void)idx.ReleaseSlots(slots);  // refused once the index is read-only
    return st;
  }
  m = std::move(next);
  return Status::Ok();
}

Manifest ForkOf(const Manifest& src, uint32_t uid, std::string name) {
  Manifest d = src;
  d.owner_uid = uid;
  d.name = std::move(name);
  d.parent = src.name;
  d.turn_seq = 1;
  return d;
}

// Checks the invariants any index must satisfy and returns its manifests:
// each refcount equals the number of manifests referencing the slot, block
// checksums are intact, every slot below capacity is committed, reserved or
// free, and no free slot is referenced.
std::map<Key, Manifest> CheckConsistent(Index& idx) {
  std::map<Key, Manifest> out;
  Result<std::vector<Manifest>> ms = idx.LoadManifests();
  EXPECT_TRUE(ms.ok()) << ms.status().ToString();
  if (!ms.ok()) return out;
  std::map<BlockSlot, uint32_t> users;
  for (Manifest& m : *ms) {
    for (BlockSlot s : m.blocks) ++users[s];
    Key k{m.owner_uid, m.name};
    out.emplace(std::move(k), std::move(m));
  }
  for (const auto& [slot, n] : users) {
    Result<BlockInfo> b = idx.GetBlock(slot);
    EXPECT_TRUE(b.ok()) << "slot " << slot << ": " << b.status().ToString();
    if (!b.ok()) continue;
    EXPECT_EQ(b->refcount, n) << "slot " << slot;
    EXPECT_EQ(b->page_checksums, Sums(slot)) << "slot " << slot;
  }
  const SlotStats st = idx.slot_stats();
  EXPECT_EQ(st.committed, users.size());
  EXPECT_EQ(st.committed + st.reserved + st.free, st.capacity);
  Result<std::vector<BlockSlot>> free_slots = idx.AllocateSlots(st.free);
  EXPECT_TRUE(free_slots.ok()) << free_slots.status().ToString();
  if (free_slots.ok()) {
    for (BlockSlot s : *free_slots) {
      EXPECT_EQ(users.count(s), 0u) << "slot " << s << " is free and referenced";
      EXPECT_LT(s, st.capacity);
    }
    EXPECT_TRUE(idx.ReleaseSlots(*free_slots).ok());
  }
  return out;
}

IndexOptions Options(uint64_t capacity = 1024) {
  IndexOptions o;
  o.capacity_slots = capacity;
  o.write_buffer_bytes = 64u << 10;  // flushes and compactions happen in tests
  return o;
}

std::unique_ptr<Index> OpenOrDie(const std::string& dir, const IndexOptions& o) {
  Result<std::unique_ptr<Index>> r = Index::Open(dir, o);
  MNEMO_CHECK_MSG(r.ok(), r.status().ToString().c_str());
  return std::move(r).value();
}

// Raw RocksDB access for planting damage the Index itself never writes.
void WithRawDb(const std::string& dir, const std::function<void(rocksdb::DB*)>& f) {
  rocksdb::Options o;
  rocksdb::DB* db = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(o, dir, &db);
  ASSERT_TRUE(s.ok()) << s.ToString();
  f(db);
  ASSERT_TRUE(db->Close().ok());
  delete db;
}

std::string FirstKeyWithPrefix(rocksdb::DB* db, std::string_view prefix) {
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
  it->Seek(rocksdb::Slice(prefix.data(), prefix.size()));
  if (!it->Valid() || !it->key().starts_with(rocksdb::Slice(prefix.data(), prefix.size()))) return "";
  return it->key().ToString();
}

std::string BigEndianSlotKey(char prefix, BlockSlot s) {
  std::string k(1, prefix);
  for (int i = 7; i >= 0; --i) k.push_back(static_cast<char>((s >> (8 * i)) & 0xff));
  return k;
}

struct Expected {
  std::map<Key, Manifest> sessions;
  std::map<BlockSlot, BlockInfo> blocks;
};

// What an index holds, read entirely; an error if any read fails.
Result<Expected> ReadAll(Index& idx) {
  Expected e;
  MNEMO_ASSIGN_OR_RETURN(std::vector<Manifest> ms, idx.LoadManifests());
  for (Manifest& m : ms) {
    for (BlockSlot s : m.blocks) {
      if (e.blocks.count(s)) continue;
      MNEMO_ASSIGN_OR_RETURN(BlockInfo b, idx.GetBlock(s));
      e.blocks.emplace(s, std::move(b));
    }
    Key k{m.owner_uid, m.name};
    e.sessions.emplace(std::move(k), std::move(m));
  }
  return e;
}

// --- Child processes ------------------------------------------------------------------
//
// Helper modes re-execute this binary with one DISABLED_ test selected and
// talk to the parent through a pipe on fd 3, one line per message.

void Emit(int fd, const std::string& line) {
  size_t off = 0;
  while (off < line.size()) {
    const ssize_t n = ::write(fd, line.data() + off, line.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) _exit(4);
    off += static_cast<size_t>(n);
  }
}

std::string Hex64(uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof(b), "%016llx", static_cast<unsigned long long>(v));
  return b;
}

struct Child {
  pid_t pid = -1;
  int fd = -1;
};

// Runs test `test` (a DISABLED_ helper) of this binary in a child process
// with `extra_env` added to the environment and the write end of a pipe on
// fd 3.
Child SpawnChild(const std::string& test, const std::vector<std::string>& extra_env) {
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  MNEMO_CHECK(n > 0);
  exe[n] = '\0';
  int p[2];
  MNEMO_CHECK(pipe2(p, O_CLOEXEC) == 0);
  // Everything the child needs is built before fork: after it, only
  // async-signal-safe calls until exec.
  std::vector<std::string> args = {exe, "--gtest_filter=" + test, "--gtest_also_run_disabled_tests"};
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  env.insert(env.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> argv, envp;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  const int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
  MNEMO_CHECK(devnull >= 0);
  const pid_t pid = fork();
  MNEMO_CHECK(pid >= 0);
  if (pid == 0) {
    if (p[1] == 3) {
      fcntl(3, F_SETFD, 0);
    } else if (dup2(p[1], 3) < 0) {
      _exit(126);
    }
    dup2(devnull, 1);  // gtest's own output
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  close(devnull);
  close(p[1]);
  return Child{pid, p[0]};
}

// Reads whole lines from `fd` until `deadline` (or EOF when `drain`).
bool ReadLines(int fd, std::string* buf, std::vector<std::string>* lines,
               std::chrono::steady_clock::time_point deadline, bool drain) {
  for (;;) {
    int timeout_ms = -1;
    if (!drain) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return true;
      timeout_ms = static_cast<int>(left.count());
    }
    pollfd pfd{fd, POLLIN, 0};
    const int pr = poll(&pfd, 1, timeout_ms);
    if (pr < 0 && errno == EINTR) continue;
    if (pr == 0) return true;
    char chunk[4096];
    const ssize_t n = read(fd, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;  // EOF
    buf->append(chunk, static_cast<size_t>(n));
    size_t nl;
    while ((nl = buf->find('\n')) != std::string::npos) {
      lines->push_back(buf->substr(0, nl));
      buf->erase(0, nl + 1);
    }
  }
}

// --- Logs that still hold commits -------------------------------------------------------
//
// A clean close flushes the log into tables (Index::~Index), so a log that
// holds commits is what a crash leaves. Tests of the log (a torn tail, flipped
// bytes, refusals that must not replay it into a table) make one by running a
// scenario in a child process that is killed with SIGKILL once it has
// reported what it committed.

std::string HexBytes(std::string_view b) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  for (unsigned char c : b) {
    s += kHex[c >> 4];
    s += kHex[c & 15];
  }
  return s;
}

std::string UnhexBytes(std::string_view h) {
  std::string b;
  for (size_t i = 0; i + 1 < h.size(); i += 2)
    b.push_back(static_cast<char>(std::stoi(std::string(h.substr(i, 2)), nullptr, 16)));
  return b;
}

// Reports state `e` in full: "M <head> <chunk>..." per session (hex of its
// encoding), "K <slot> <refcount> <page checksum>..." per block, then "S".
void EmitState(int fd, const Expected& e) {
  for (const auto& [k, m] : e.sessions) {
    Result<EncodedManifest> enc = EncodeManifest(m);
    MNEMO_CHECK(enc.ok());
    std::string line = "M " + HexBytes(enc->head);
    for (const std::string& c : enc->chunks) line += " " + HexBytes(c);
    Emit(fd, line + "\n");
  }
  for (const auto& [slot, b] : e.blocks) {
    std::string line = "K " + std::to_string(slot) + " " + std::to_string(b.refcount);
    for (uint64_t sum : b.page_checksums) line += " " + Hex64(sum);
    Emit(fd, line + "\n");
  }
  Emit(fd, "S\n");
}

// The states EmitState reported, in order.
void ParseStates(const std::vector<std::string>& lines, std::vector<Expected>* states) {
  Expected cur;
  for (const std::string& line : lines) {
    std::istringstream in(line);
    std::string tag;
    in >> tag;
    if (tag == "M") {
      std::string head, chunk;
      in >> head;
      std::vector<std::string> chunks;
      while (in >> chunk) chunks.push_back(UnhexBytes(chunk));
      Result<Manifest> m = DecodeManifest(UnhexBytes(head), chunks, "reported manifest");
      ASSERT_TRUE(m.ok()) << m.status().ToString();
      Key k{m->owner_uid, m->name};
      cur.sessions.emplace(std::move(k), std::move(*m));
    } else if (tag == "K") {
      BlockSlot slot = 0;
      BlockInfo b;
      std::string sum;
      in >> slot >> b.refcount;
      while (in >> sum) b.page_checksums.push_back(std::stoull(sum, nullptr, 16));
      cur.blocks.emplace(slot, std::move(b));
    } else if (tag == "S") {
      states->push_back(std::move(cur));
      cur = Expected();
    }
  }
}

// What the child of RunAndKill does; `state` reports what the index holds
// now (everything committed so far is acknowledged).
using Scenario = std::function<Status(Index& idx, std::mt19937_64& rng, const std::function<void()>& state)>;

const std::map<std::string, Scenario>& Scenarios() {
  static const auto* scenarios = new std::map<std::string, Scenario>{
      // Session (2, "b"), one turn.
      {"second-session",
       [](Index& idx, std::mt19937_64& rng, const std::function<void()>& state) {
         Manifest b = Empty(2, "b");
         MNEMO_RETURN_IF_ERROR(Turn(idx, b, rng, 40));
         state();
         return Status::Ok();
       }},
      // Two turns of session (1, "a"): the second is the log's last record.
      {"two-turns",
       [](Index& idx, std::mt19937_64& rng, const std::function<void()>& state) {
         Manifest a = Empty(1, "a");
         MNEMO_RETURN_IF_ERROR(Turn(idx, a, rng, 40));
         state();
         MNEMO_RETURN_IF_ERROR(Turn(idx, a, rng, 40));
         state();
         return Status::Ok();
       }},
      // A turn of (1000, "s0"), then (1001, "s1") deleted (IndexFlipTest).
      {"turn-and-delete",
       [](Index& idx, std::mt19937_64& rng, const std::function<void()>& state) {
         MNEMO_ASSIGN_OR_RETURN(Manifest m, idx.GetManifest(1000, "s0"));
         MNEMO_RETURN_IF_ERROR(Turn(idx, m, rng, 30));
         MNEMO_RETURN_IF_ERROR(idx.DeleteSession(1001, "s1"));
         state();
         return Status::Ok();
       }},
  };
  return *scenarios;
}

// The child of RunAndKill: opens the index, runs the scenario, reporting each
// state (after checking it is consistent), then says "R" and waits to be
// killed. It runs only when the parent re-executes this binary with
// MNEMO_INDEX_UNCLEAN_DIR set.
TEST(IndexUncleanChild, DISABLED_Run) {
  const char* dir = std::getenv("MNEMO_INDEX_UNCLEAN_DIR");
  const char* scenario = std::getenv("MNEMO_INDEX_UNCLEAN_SCENARIO");
  const char* capacity = std::getenv("MNEMO_INDEX_UNCLEAN_CAPACITY");
  if (!dir || !scenario || !capacity) GTEST_SKIP() << "helper mode of RunAndKill";
  const int fd = 3;
  auto fail = [](const Status& st) {
    std::fprintf(stderr, "unclean child: %s\n", st.ToString().c_str());
    _exit(3);
  };
  Result<std::unique_ptr<Index>> opened = Index::Open(dir, Options(std::strtoull(capacity, nullptr, 10)));
  if (!opened.ok()) fail(opened.status());
  Index& idx = **opened;
  std::mt19937_64 rng(12345);
  auto state = [&] {
    CheckConsistent(idx);
    if (::testing::Test::HasFailure()) fail(Status::Internal("inconsistent index"));
    Result<Expected> e = ReadAll(idx);
    if (!e.ok()) fail(e.status());
    EmitState(fd, *e);
  };
  if (Status st = Scenarios().at(scenario)(idx, rng, state); !st.ok()) fail(st);
  Emit(fd, "R\n");
  for (;;) pause();  // never closes the index
}

// Runs `scenario` on the index in `dir` (created if absent, with
// `capacity`) in a child process, kills it with SIGKILL once it is done, and
// returns the states it reported: the log holds all of them.
void RunAndKill(const std::string& dir, const std::string& scenario, uint64_t capacity, std::vector<Expected>* states) {
  Child child = SpawnChild("IndexUncleanChild.DISABLED_Run",
                           {"MNEMO_INDEX_UNCLEAN_DIR=" + dir, "MNEMO_INDEX_UNCLEAN_SCENARIO=" + scenario,
                            "MNEMO_INDEX_UNCLEAN_CAPACITY=" + std::to_string(capacity)});
  std::string buf;
  std::vector<std::string> lines;
  const auto start = std::chrono::steady_clock::now();
  bool alive = true;
  while (alive && std::find(lines.begin(), lines.end(), "R") == lines.end() &&
         std::chrono::steady_clock::now() - start < std::chrono::seconds(60)) {
    alive = ReadLines(child.fd, &buf, &lines, std::chrono::steady_clock::now() + std::chrono::milliseconds(20), false);
  }
  kill(child.pid, SIGKILL);
  close(child.fd);
  int wstatus = 0;
  ASSERT_EQ(waitpid(child.pid, &wstatus, 0), child.pid);
  ASSERT_NE(std::find(lines.begin(), lines.end(), "R"), lines.end())
      << "the child did not finish scenario " << scenario << " (status " << wstatus << ")";
  ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << "child status " << wstatus;
  ASSERT_NO_FATAL_FAILURE(ParseStates(lines, states));
  ASSERT_FALSE(states->empty());
}

// Every file of `dir`: name -> bytes.
std::map<std::string, std::string> Files(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::ifstream f(e.path(), std::ios::binary);
    out[e.path().filename().string()] = std::string(std::istreambuf_iterator<char>(f), {});
  }
  return out;
}

class IndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ =
        (fs::path(::testing::TempDir()) / ("mnemo_index_" + std::string(info->name()) + "_" + std::to_string(getpid())))
            .string();
    fs::remove_all(dir_);
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }
  std::string dir_;
  std::mt19937_64 rng_{12345};
};

// PageChecksum takes an AVX2 build of XXH3 where the CPU has it: the same
// hash as the library's for every length (XXH3's short, mid-size and long
// paths, stripe and block edges) and alignment, or every stored page would
// read as corrupt.
TEST(PageChecksumTest, EqualsLibraryXxh3) {
  std::mt19937_64 rng(11);
  std::vector<uint8_t> buf(200000 + 64);
  for (uint8_t& b : buf) b = static_cast<uint8_t>(rng());
  std::vector<size_t> lengths = {0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 255, 256, 1023, 1024, 1025,
                                 4096, 49152, 65536, 196608, 200000};
  for (int i = 0; i < 200; ++i) lengths.push_back(static_cast<size_t>(rng() % 200001));
  for (const size_t n : lengths) {
    for (const size_t align : {size_t{0}, size_t{1}, size_t{7}, size_t{32}}) {
      ASSERT_EQ(PageChecksum(buf.data() + align, n), XXH3_64bits(buf.data() + align, n))
          << "length " << n << " at offset " << align;
    }
  }
}

TEST_F(IndexTest, CreatesFreshIndexAndReopens) {
  {
    auto idx = OpenOrDie(dir_, Options(100));
    EXPECT_EQ(idx->recovery().sessions, 0u);
    EXPECT_EQ(idx->recovery().slots_free, 100u);
    Manifest m = Empty(1000, "a");
    ASSERT_OK(Turn(*idx, m, rng_, 40));
    EXPECT_EQ(m.blocks.size(), 3u);  // 39 KV tokens
  }
  auto idx = OpenOrDie(dir_, Options(100));
  EXPECT_EQ(idx->recovery().sessions, 1u);
  EXPECT_EQ(idx->recovery().slots_committed, 3u);
  EXPECT_EQ(idx->recovery().slots_free, 97u);
  EXPECT_EQ(idx->recovery().block_references, 3u);
  CheckConsistent(*idx);
}

// Every Open replays the log twice (the read-only check, then the writable
// open): a clean close flushes it into tables, so that the next start has
// nothing to replay, while a process that dies keeps every acknowledged
// commit in its log, which the next Open replays.
TEST_F(IndexTest, CleanCloseLeavesNothingInTheLog) {
  auto log_bytes = [&] {
    uintmax_t n = 0;
    for (const auto& [name, bytes] : Files(dir_))
      if (name.ends_with(".log")) n += bytes.size();
    return n;
  };
  std::map<Key, Manifest> all;
  {
    auto idx = OpenOrDie(dir_, Options());
    Manifest a = Empty(1, "a"), b = Empty(2, "b");
    ASSERT_OK(Turn(*idx, a, rng_, 40));
    ASSERT_OK(Turn(*idx, b, rng_, 300));
    ASSERT_OK(idx->ForkSession(2, "b", ForkOf(b, 3, "c")));
    ASSERT_OK(idx->DeleteSession(1, "a"));
    all = CheckConsistent(*idx);
    EXPECT_GT(log_bytes(), 0u);
  }
  EXPECT_EQ(log_bytes(), 0u) << "a clean close left records in the log";
  {
    auto idx = OpenOrDie(dir_, Options());
    EXPECT_EQ(CheckConsistent(*idx), all);
  }
  EXPECT_EQ(log_bytes(), 0u);

  std::vector<Expected> states;
  ASSERT_NO_FATAL_FAILURE(RunAndKill(dir_, "two-turns", 1024, &states));
  EXPECT_GT(log_bytes(), 0u);
  ASSERT_EQ(states.back().sessions.size(), 3u);
  auto idx = OpenOrDie(dir_, Options());
  EXPECT_EQ(CheckConsistent(*idx), states.back().sessions);
}

TEST_F(IndexTest, RejectsBadOptions) {
  IndexOptions o = Options(0);
  EXPECT_EQ(Index::Open(dir_, o).status().code(), StatusCode::kInvalidArgument);
  o = Options(10);
  o.create_if_missing = false;
  EXPECT_FALSE(Index::Open(dir_ + "/absent", o).ok());
}

TEST_F(IndexTest, CommitsAndReadsBack) {
  auto idx = OpenOrDie(dir_, Options());
  Manifest a = Empty(1000, "alpha");
  ASSERT_OK(Turn(*idx, a, rng_, 100));
  ASSERT_OK(Turn(*idx, a, rng_, 7));
  Manifest b = Empty(1001, "alpha");  // same name, another uid
  ASSERT_OK(Turn(*idx, b, rng_, 3));

  Result<Manifest> got = idx->GetManifest(1000, "alpha");
  ASSERT_OK(got);
  EXPECT_EQ(*got, a);
  got = idx->GetManifest(1001, "alpha");
  ASSERT_OK(got);
  EXPECT_EQ(*got, b);
  EXPECT_EQ(idx->GetManifest(1002, "alpha").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(idx->GetManifest(1000, "alph").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(idx->GetManifest(1000, "").status().code(), StatusCode::kNotFound);

  Result<BlockInfo> blk = idx->GetBlock(a.blocks[0]);
  ASSERT_OK(blk);
  EXPECT_EQ(blk->refcount, 1u);
  EXPECT_EQ(blk->page_checksums, Sums(a.blocks[0]));
  EXPECT_EQ(idx->GetBlock(999).status().code(), StatusCode::kNotFound);

  const auto all = CheckConsistent(*idx);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all.at(Key{1000, "alpha"}), a);
}

TEST_F(IndexTest, LoadManifestsOrdersByUidThenName) {
  auto idx = OpenOrDie(dir_, Options());
  const std::vector<Key> keys = {{256, "a"}, {2, "b"}, {2, "a"}, {1, "zz"}, {65536, "m"}, {2, "a.b"}};
  for (const Key& k : keys) {
    Manifest m = Empty(k.first, k.second);
    ASSERT_OK(Turn(*idx, m, rng_, 5));
  }
  Result<std::vector<Manifest>> all = idx->LoadManifests();
  ASSERT_OK(all);
  std::vector<Key> got;
  for (const Manifest& m : *all) got.emplace_back(m.owner_uid, m.name);
  std::vector<Key> want = keys;
  std::sort(want.begin(), want.end());
  EXPECT_EQ(got, want);
}

TEST_F(IndexTest, AllocatorIsBoundedByCapacity) {
  auto idx = OpenOrDie(dir_, Options(10));
  Result<std::vector<BlockSlot>> a = idx->AllocateSlots(4);
  Result<std::vector<BlockSlot>> b = idx->AllocateSlots(6);
  ASSERT_OK(a);
  ASSERT_OK(b);
  std::set<BlockSlot> all(a->begin(), a->end());
  all.insert(b->begin(), b->end());
  EXPECT_EQ(all.size(), 10u);
  EXPECT_EQ(*all.rbegin(), 9u);
  EXPECT_EQ(idx->AllocateSlots(1).status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(idx->slot_stats().reserved, 10u);

  const std::vector<BlockSlot> back = {(*b)[1], (*b)[3]};
  ASSERT_OK(idx->ReleaseSlots(back));
  EXPECT_EQ(idx->ReleaseSlots(back).code(), StatusCode::kInvalidArgument);  // no longer reserved
  const std::vector<BlockSlot> twice = {(*a)[0], (*a)[0]};
  EXPECT_EQ(idx->ReleaseSlots(twice).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(idx->slot_stats().reserved, 8u);  // nothing released by the failed calls
  Result<std::vector<BlockSlot>> c = idx->AllocateSlots(2);
  ASSERT_OK(c);
  EXPECT_EQ(std::set<BlockSlot>(c->begin(), c->end()), std::set<BlockSlot>(back.begin(), back.end()));
  EXPECT_EQ(idx->AllocateSlots(kMaxAllocateSlots + 1).status().code(), StatusCode::kInvalidArgument);
  Result<std::vector<BlockSlot>> none = idx->AllocateSlots(0);
  ASSERT_OK(none);
  EXPECT_TRUE(none->empty());
}

TEST_F(IndexTest, CommitRejectsBadBlockListsAndStaleTurns) {
  auto idx = OpenOrDie(dir_, Options(64));
  Manifest a = Empty(1, "a");
  ASSERT_OK(Turn(*idx, a, rng_, 30));  // 29 KV tokens: 2 blocks, the second partial
  const SlotStats before = idx->slot_stats();

  Result<std::vector<BlockSlot>> slots = idx->AllocateSlots(1);
  ASSERT_OK(slots);
  const BlockSlot s = (*slots)[0];
  const std::vector<uint64_t> sums = Sums(s);
  Manifest next = a;
  next.turn_seq++;
  next.tokens.push_back(1);
  next.kv_tokens = 30;
  next.blocks[1] = s;  // the partial block, rewritten
  const std::vector<NewBlock> good = {NewBlock{s, sums}};

  // Not reserved.
  const std::vector<uint64_t> sums63 = Sums(63);
  const std::vector<NewBlock> unreserved = {NewBlock{63, sums63}};
  Manifest x = next;
  x.blocks[1] = 63;
  EXPECT_EQ(idx->CommitTurn(x, unreserved).code(), StatusCode::kInvalidArgument);
  // A slot that is neither committed nor new.
  EXPECT_EQ(idx->CommitTurn(next, {}).code(), StatusCode::kInvalidArgument);
  // A new block the manifest does not list.
  Manifest y = a;
  y.turn_seq++;
  EXPECT_EQ(idx->CommitTurn(y, good).code(), StatusCode::kInvalidArgument);
  // Checksums for the wrong number of layers.
  const std::vector<uint64_t> short_sums(kLayers - 1, 0);
  EXPECT_EQ(idx->CommitTurn(next, std::vector<NewBlock>{NewBlock{s, short_sums}}).code(), StatusCode::kInvalidArgument);
  // Listed twice.
  EXPECT_EQ(idx->CommitTurn(next, std::vector<NewBlock>{good[0], good[0]}).code(), StatusCode::kInvalidArgument);
  // A turn that does not follow the committed one.
  Manifest stale = next;
  stale.turn_seq = a.turn_seq;
  EXPECT_EQ(idx->CommitTurn(stale, good).code(), StatusCode::kFailedPrecondition);
  // An invalid manifest.
  Manifest bad = next;
  bad.blocks.pop_back();
  EXPECT_EQ(idx->CommitTurn(bad, good).code(), StatusCode::kInvalidArgument);

  // Nothing changed.
  SlotStats now = idx->slot_stats();
  EXPECT_EQ(now.committed, before.committed);
  EXPECT_EQ(now.reserved, 1u);
  Result<Manifest> got = idx->GetManifest(1, "a");
  ASSERT_OK(got);
  EXPECT_EQ(*got, a);

  // The valid commit frees the old partial block at once (it was not shared).
  const BlockSlot old_partial = a.blocks[1];
  ASSERT_OK(idx->CommitTurn(next, good));
  EXPECT_EQ(idx->GetBlock(old_partial).status().code(), StatusCode::kNotFound);
  now = idx->slot_stats();
  EXPECT_EQ(now.committed, 2u);
  EXPECT_EQ(now.reserved, 0u);
  CheckConsistent(*idx);
}

TEST_F(IndexTest, RefcountsAcrossForkTurnsAndDelete) {
  auto idx = OpenOrDie(dir_, Options(64));
  Manifest a = Empty(1000, "a");
  ASSERT_OK(Turn(*idx, a, rng_, 41));  // 40 KV tokens: 3 blocks, the last partial
  ASSERT_EQ(a.blocks.size(), 3u);
  const std::vector<BlockSlot> a_blocks = a.blocks;

  Manifest b = ForkOf(a, 1000, "b");
  ASSERT_OK(idx->ForkSession(1000, "a", b));
  for (BlockSlot s : a_blocks) EXPECT_EQ(idx->GetBlock(s)->refcount, 2u);
  EXPECT_EQ(idx->ForkSession(1000, "a", b).code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(idx->ForkSession(1000, "nope", ForkOf(a, 1000, "c")).code(), StatusCode::kNotFound);
  Manifest foreign = ForkOf(a, 1000, "c");
  foreign.blocks[0] = 60;
  EXPECT_EQ(idx->ForkSession(1000, "a", foreign).code(), StatusCode::kInvalidArgument);
  Manifest other_geometry = ForkOf(a, 1000, "c");
  other_geometry.kv.head_dim = 16;
  EXPECT_EQ(idx->ForkSession(1000, "a", other_geometry).code(), StatusCode::kInvalidArgument);

  // b's next turn copies the shared partial block into its own slot.
  ASSERT_OK(Turn(*idx, b, rng_, 20));
  EXPECT_EQ(idx->GetBlock(a_blocks[0])->refcount, 2u);
  EXPECT_EQ(idx->GetBlock(a_blocks[1])->refcount, 2u);
  EXPECT_EQ(idx->GetBlock(a_blocks[2])->refcount, 1u);  // only a now
  EXPECT_NE(b.blocks[2], a_blocks[2]);
  EXPECT_EQ(idx->GetBlock(b.blocks[2])->refcount, 1u);
  CheckConsistent(*idx);

  // A fork of the fork shares blocks of both generations.
  Manifest c = ForkOf(b, 1001, "c");
  ASSERT_OK(idx->ForkSession(1000, "b", c));
  EXPECT_EQ(idx->GetBlock(a_blocks[0])->refcount, 3u);
  EXPECT_EQ(idx->GetBlock(b.blocks.back())->refcount, 2u);

  ASSERT_OK(idx->DeleteSession(1000, "a"));
  EXPECT_EQ(idx->GetBlock(a_blocks[0])->refcount, 2u);
  EXPECT_EQ(idx->GetBlock(a_blocks[2]).status().code(), StatusCode::kNotFound);  // freed
  EXPECT_EQ(idx->DeleteSession(1000, "a").code(), StatusCode::kNotFound);
  CheckConsistent(*idx);

  ASSERT_OK(idx->DeleteSession(1000, "b"));
  ASSERT_OK(idx->DeleteSession(1001, "c"));
  EXPECT_EQ(idx->slot_stats().committed, 0u);
  EXPECT_EQ(idx->slot_stats().free, 64u);
  idx.reset();
  idx = OpenOrDie(dir_, Options(64));
  EXPECT_EQ(idx->recovery().sessions, 0u);
  EXPECT_EQ(idx->recovery().slots_free, 64u);
}

TEST_F(IndexTest, SlotsAreReusedAfterDelete) {
  auto idx = OpenOrDie(dir_, Options(8));
  Manifest a = Empty(5, "a");
  ASSERT_OK(Turn(*idx, a, rng_, 8 * kPageTokens, 0));  // every slot
  EXPECT_EQ(idx->slot_stats().free, 0u);
  Manifest b = Empty(5, "b");
  EXPECT_EQ(Turn(*idx, b, rng_, 5).code(), StatusCode::kResourceExhausted);
  ASSERT_OK(idx->DeleteSession(5, "a"));
  ASSERT_OK(Turn(*idx, b, rng_, 8 * kPageTokens, 0));
  std::vector<BlockSlot> sorted = b.blocks;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(sorted, (std::vector<BlockSlot>{0, 1, 2, 3, 4, 5, 6, 7}));
  idx.reset();
  idx = OpenOrDie(dir_, Options(8));
  EXPECT_EQ(idx->recovery().slots_free, 0u);
  CheckConsistent(*idx);
}

// An export pins a session's blocks: a later turn that rewrites one and a
// delete that drops them all commit as usual, but no pinned slot is handed
// out again until the last pin goes, and the pin still reads the records.
TEST_F(IndexTest, PinnedSlotsOutliveTheirManifestsUntilUnpinned) {
  auto idx = OpenOrDie(dir_, Options(8));
  Manifest a = Empty(5, "a");
  ASSERT_OK(Turn(*idx, a, rng_, 3 * kPageTokens + 5, 0));  // slots 0..3, the last partial
  const std::vector<BlockSlot> pinned = a.blocks;
  ASSERT_EQ(pinned, (std::vector<BlockSlot>{0, 1, 2, 3}));
  Result<std::unique_ptr<BlockPin>> r = idx->Pin(pinned);
  ASSERT_OK(r);
  std::unique_ptr<BlockPin> pin = std::move(r).value();
  Result<std::unique_ptr<BlockPin>> r0 = idx->Pin(std::vector<BlockSlot>{0});  // a second reader of slot 0
  ASSERT_OK(r0);
  std::unique_ptr<BlockPin> pin0 = std::move(r0).value();
  EXPECT_EQ(idx->Pin(std::vector<BlockSlot>{1, 7}).status().code(), StatusCode::kNotFound);

  ASSERT_OK(Turn(*idx, a, rng_, 2 * kPageTokens, 0));  // drops slot 3, writes 4..6
  EXPECT_EQ(a.blocks, (std::vector<BlockSlot>{0, 1, 2, 4, 5, 6}));
  ASSERT_OK(idx->DeleteSession(5, "a"));
  SlotStats st = idx->slot_stats();
  EXPECT_EQ(st.committed, 0u);
  EXPECT_EQ(st.free, 4u) << "slots 0..3 are pinned";
  Result<std::vector<BlockSlot>> rest = idx->AllocateSlots(4);
  ASSERT_OK(rest);
  EXPECT_EQ(*rest, (std::vector<BlockSlot>{4, 5, 6, 7}));
  EXPECT_EQ(idx->AllocateSlots(1).status().code(), StatusCode::kResourceExhausted);
  ASSERT_OK(idx->ReleaseSlots(*rest));
  for (BlockSlot s : pinned) {
    Result<BlockInfo> b = idx->GetBlock(s, *pin);
    ASSERT_OK(b);
    EXPECT_EQ(b->page_checksums, Sums(s)) << "slot " << s;
    EXPECT_EQ(b->refcount, 1u);
    EXPECT_EQ(idx->GetBlock(s).status().code(), StatusCode::kNotFound) << "slot " << s;
  }
  pin.reset();
  EXPECT_EQ(idx->slot_stats().free, 7u) << "slot 0 is still pinned by the second reader";
  pin0.reset();
  EXPECT_EQ(idx->slot_stats().free, 8u);
  idx.reset();
  idx = OpenOrDie(dir_, Options(8));
  EXPECT_EQ(idx->recovery().slots_free, 8u);
  CheckConsistent(*idx);
}

TEST_F(IndexTest, UncommittedReservationsAreFreeAfterReopen) {
  {
    auto idx = OpenOrDie(dir_, Options(50));
    Manifest a = Empty(5, "a");
    ASSERT_OK(Turn(*idx, a, rng_, 50));
    ASSERT_OK(idx->AllocateSlots(20));  // written, never committed: a crash
  }
  auto idx = OpenOrDie(dir_, Options(50));
  EXPECT_EQ(idx->recovery().slots_committed, 4u);
  EXPECT_EQ(idx->recovery().slots_free, 46u);
  CheckConsistent(*idx);
}

TEST_F(IndexTest, LoweredCapacityKeepsCommittedSlotsAboveIt) {
  Manifest a = Empty(5, "a");
  {
    auto idx = OpenOrDie(dir_, Options(10));
    ASSERT_OK(Turn(*idx, a, rng_, 10 * kPageTokens, 0));
  }
  auto idx = OpenOrDie(dir_, Options(4));
  EXPECT_EQ(idx->recovery().slots_beyond_capacity, 6u);
  EXPECT_EQ(idx->recovery().slots_free, 0u);
  ASSERT_OK(idx->DeleteSession(5, "a"));
  EXPECT_EQ(idx->slot_stats().free, 4u);  // the six above the budget are gone for good
  Result<std::vector<BlockSlot>> s = idx->AllocateSlots(4);
  ASSERT_OK(s);
  EXPECT_EQ(*s, (std::vector<BlockSlot>{0, 1, 2, 3}));
}

TEST_F(IndexTest, LongHistorySpansChunksAndMayShrink) {
  auto idx = OpenOrDie(dir_, Options(20000));
  Manifest a = Empty(7, "long");
  ASSERT_OK(Turn(*idx, a, rng_, 150000));  // three manifest chunks
  ASSERT_OK(Turn(*idx, a, rng_, 3));
  Result<Manifest> got = idx->GetManifest(7, "long");
  ASSERT_OK(got);
  EXPECT_EQ(*got, a);
  // The history is replaced by a short one (e.g. a reset): the extra chunks go.
  Manifest reset = Empty(7, "long");
  reset.turn_seq = a.turn_seq;
  ASSERT_OK(Turn(*idx, reset, rng_, 10));
  got = idx->GetManifest(7, "long");
  ASSERT_OK(got);
  EXPECT_EQ(*got, reset);
  idx.reset();
  idx = OpenOrDie(dir_, Options(20000));  // Open would reject orphaned chunks
  CheckConsistent(*idx);
}

TEST_F(IndexTest, ConcurrentTurnsForksDeletesAndReads) {
  auto idx = OpenOrDie(dir_, Options(4096));
  constexpr int kThreads = 4, kTurns = 25;
  std::atomic<bool> done{false};
  std::atomic<int> read_errors{0};
  std::thread reader([&] {
    while (!done.load()) {
      Result<std::vector<Manifest>> all = idx->LoadManifests();
      if (!all.ok()) ++read_errors;
      if (all.ok()) {
        for (const Manifest& m : *all) {
          // A block may be freed between the listing and this read; any
          // other error is a bug.
          for (BlockSlot s : m.blocks) {
            Result<BlockInfo> b = idx->GetBlock(s);
            if (!b.ok() && b.status().code() != StatusCode::kNotFound) ++read_errors;
          }
        }
      }
    }
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < kThreads; ++t) {
    writers.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      Manifest m = Empty(100 + t, "main");
      for (int i = 0; i < kTurns; ++i) {
        EXPECT_OK(Turn(*idx, m, rng, 1 + rng() % 40));
        if (i % 5 == 4) {
          Manifest f = ForkOf(m, 100 + t, "fork" + std::to_string(i));
          EXPECT_OK(idx->ForkSession(100 + t, "main", f));
          EXPECT_OK(Turn(*idx, f, rng, 3));
          if (i % 10 == 9) EXPECT_OK(idx->DeleteSession(100 + t, f.name));
        }
      }
    });
  }
  for (auto& w : writers) w.join();
  done = true;
  reader.join();
  EXPECT_EQ(read_errors.load(), 0);
  const auto all = CheckConsistent(*idx);
  EXPECT_EQ(all.size(), static_cast<size_t>(kThreads * 4));
  idx.reset();
  idx = OpenOrDie(dir_, Options(4096));
  EXPECT_EQ(CheckConsistent(*idx), all);
}

// --- Format versions and planted damage ---------------------------------------

TEST_F(IndexTest, NewerFormatVersionIsFailedPreconditionAndUntouched) {
  {
    auto idx = OpenOrDie(dir_, Options());
    Manifest a = Empty(1, "a");
    ASSERT_OK(Turn(*idx, a, rng_, 20));
  }
  std::string v2("MNIX\x02\0\0\0", 8);
  WithRawDb(dir_, [&](rocksdb::DB* db) { ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "V", v2).ok()); });
  Result<std::unique_ptr<Index>> r = Index::Open(dir_, Options());
  ASSERT_EQ(r.status().code(), StatusCode::kFailedPrecondition) << r.status().ToString();
  EXPECT_NE(r.status().message().find("format version 2"), std::string_view::npos) << r.status().ToString();
  WithRawDb(dir_, [&](rocksdb::DB* db) {
    std::string v;
    ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), "V", &v).ok());
    EXPECT_EQ(v, v2);
    EXPECT_FALSE(FirstKeyWithPrefix(db, "M").empty());
  });
}

// RocksDB's read-write open writes at once (a new MANIFEST, log, OPTIONS
// file, a rotated info LOG, a table of what it replayed from the log), and
// on an index whose CURRENT is lost it even fails after writing a fresh
// CURRENT and MANIFEST, so that the next open succeeds on an empty database
// and deletes the old tables. Open checks an existing index read-only first:
// every refusal leaves the directory byte for byte as it was, its log
// included, refuses again the next time, and undoing the damage gives back
// every session.
TEST_F(IndexTest, RefusedOpensLeaveTheDirectoryByteForByte) {
  {
    auto idx = OpenOrDie(dir_, Options());
    Manifest a = Empty(1, "a");
    ASSERT_OK(Turn(*idx, a, rng_, 40));
  }  // a clean close: a is in a table
  std::vector<Expected> states;
  ASSERT_NO_FATAL_FAILURE(RunAndKill(dir_, "second-session", 1024, &states));  // b is only in the log
  const std::map<Key, Manifest> all = states.back().sessions;
  ASSERT_EQ(all.size(), 2u);
  bool has_table = false, has_log = false;
  for (const auto& [name, bytes] : Files(dir_)) {
    has_table |= name.ends_with(".sst");
    has_log |= name.ends_with(".log") && !bytes.empty();
  }
  ASSERT_TRUE(has_table && has_log);
  const std::string current_path = dir_ + "/CURRENT";
  auto put_current = [&](const std::string& text) {
    std::ofstream f(current_path, std::ios::binary | std::ios::trunc);
    f << text;
  };
  auto expect_refused = [&](StatusCode code, std::string_view says) {
    const auto before = Files(dir_);
    for (int i = 0; i < 2; ++i) {
      Result<std::unique_ptr<Index>> r = Index::Open(dir_, Options());
      ASSERT_EQ(r.status().code(), code) << r.status().ToString();
      EXPECT_NE(r.status().message().find(says), std::string_view::npos) << r.status().ToString();
      EXPECT_NE(r.status().message().find(dir_), std::string_view::npos) << r.status().ToString();
      EXPECT_TRUE(Files(dir_) == before) << "a refused Open changed " << dir_;
    }
  };

  WithRawDb(dir_, [&](rocksdb::DB* db) {
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "V", std::string("MNIX\x02\0\0\0", 8)).ok());
  });
  SCOPED_TRACE("newer format");
  expect_refused(StatusCode::kFailedPrecondition, "format version 2");
  WithRawDb(dir_, [&](rocksdb::DB* db) {
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "V", std::string("MNIX\x01\0\0\0", 8)).ok());
  });
  const std::string current = Files(dir_).at("CURRENT");
  fs::remove(current_path);
  SCOPED_TRACE("CURRENT lost");
  expect_refused(StatusCode::kCorruption, "no CURRENT file");
  put_current("MANIFEST-999999\n");
  SCOPED_TRACE("CURRENT names a missing MANIFEST");
  expect_refused(StatusCode::kCorruption, "missing");
  put_current("");
  SCOPED_TRACE("CURRENT empty");
  expect_refused(StatusCode::kCorruption, "CURRENT");

  put_current(current);
  auto idx = OpenOrDie(dir_, Options());
  EXPECT_EQ(CheckConsistent(*idx), all);

  // Not allowed to create: NotFound, and nothing made.
  IndexOptions no_create = Options();
  no_create.create_if_missing = false;
  const std::string absent = dir_ + "/absent";
  EXPECT_EQ(Index::Open(absent, no_create).status().code(), StatusCode::kNotFound);
  EXPECT_FALSE(fs::exists(absent));
}

TEST_F(IndexTest, MissingFormatRecordOrUnknownKeyIsCorruption) {
  {
    auto idx = OpenOrDie(dir_, Options());
    Manifest a = Empty(1, "a");
    ASSERT_OK(Turn(*idx, a, rng_, 20));
  }
  WithRawDb(dir_, [&](rocksdb::DB* db) { ASSERT_TRUE(db->Delete(rocksdb::WriteOptions(), "V").ok()); });
  Result<std::unique_ptr<Index>> r = Index::Open(dir_, Options());
  ASSERT_EQ(r.status().code(), StatusCode::kCorruption) << r.status().ToString();
  EXPECT_NE(r.status().message().find("no format version"), std::string_view::npos);
  EXPECT_NE(r.status().message().find("does not start"), std::string_view::npos);  // the start-up advice

  WithRawDb(dir_, [&](rocksdb::DB* db) {
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "V", std::string("MNIX\x01\0\0\0", 8)).ok());
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "X-unknown", "1").ok());
  });
  r = Index::Open(dir_, Options());
  ASSERT_EQ(r.status().code(), StatusCode::kCorruption) << r.status().ToString();
  EXPECT_NE(r.status().message().find("unknown record key"), std::string_view::npos) << r.status().ToString();
}

TEST_F(IndexTest, DamagedManifestIsCorruptionNamingTheSession) {
  {
    auto idx = OpenOrDie(dir_, Options());
    Manifest a = Empty(1000, "victim");
    ASSERT_OK(Turn(*idx, a, rng_, 20));
  }
  // Flip one byte of the head, then of the chunk.
  for (const char* prefix : {"M", "C"}) {
    std::string key, old;
    WithRawDb(dir_, [&](rocksdb::DB* db) {
      key = FirstKeyWithPrefix(db, prefix);
      ASSERT_FALSE(key.empty());
      ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), key, &old).ok());
      std::string bad = old;
      bad[bad.size() / 2] ^= 0x04;
      ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), key, bad).ok());
    });
    Result<std::unique_ptr<Index>> r = Index::Open(dir_, Options());
    ASSERT_EQ(r.status().code(), StatusCode::kCorruption) << prefix;
    EXPECT_NE(r.status().message().find("session 'victim' of uid 1000"), std::string_view::npos)
        << r.status().ToString();
    EXPECT_NE(r.status().message().find("checksum mismatch"), std::string_view::npos) << r.status().ToString();
    WithRawDb(dir_, [&](rocksdb::DB* db) { ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), key, old).ok()); });
  }
  auto idx = OpenOrDie(dir_, Options());  // repaired
  CheckConsistent(*idx);
}

TEST_F(IndexTest, DamagedOrInconsistentBlockRecordsAreCorruption) {
  Manifest a = Empty(1000, "a");
  {
    auto idx = OpenOrDie(dir_, Options());
    ASSERT_OK(Turn(*idx, a, rng_, 40));
  }
  const BlockSlot slot = a.blocks[1];
  auto expect_corrupt = [&](const std::function<void(rocksdb::DB*)>& damage, std::string_view needle) {
    std::map<std::string, std::string> saved;
    WithRawDb(dir_, [&](rocksdb::DB* db) {
      std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
      for (it->SeekToFirst(); it->Valid(); it->Next()) saved[it->key().ToString()] = it->value().ToString();
      damage(db);
    });
    Result<std::unique_ptr<Index>> r = Index::Open(dir_, Options());
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << needle;
    EXPECT_NE(r.status().message().find(needle), std::string_view::npos) << r.status().ToString();
    WithRawDb(dir_, [&](rocksdb::DB* db) {  // restore
      std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
      for (it->SeekToFirst(); it->Valid(); it->Next()) ASSERT_TRUE(db->Delete(rocksdb::WriteOptions(), it->key()).ok());
      for (const auto& [k, v] : saved) ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), k, v).ok());
    });
  };
  const std::string bk = BigEndianSlotKey('B', slot), rk = BigEndianSlotKey('R', slot);
  expect_corrupt(
      [&](rocksdb::DB* db) {
        std::string v;
        ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), bk, &v).ok());
        v[5] ^= 1;
        ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), bk, v).ok());
      },
      "block record of slot " + std::to_string(slot) + " checksum mismatch");
  // A refcount record moved under another slot's key fails its keyed checksum.
  expect_corrupt(
      [&](rocksdb::DB* db) {
        std::string v;
        ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), BigEndianSlotKey('R', a.blocks[0]), &v).ok());
        ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), rk, v).ok());
      },
      "refcount record of slot " + std::to_string(slot) + " checksum mismatch");
  // A well-formed refcount that disagrees with the manifests.
  expect_corrupt(
      [&](rocksdb::DB* db) {
        std::string body("\x05\0\0\0\0\0\0\0", 8);
        const uint64_t h = XXH3_64bits_withSeed(body.data(), 8, XXH3_64bits(rk.data(), rk.size()));
        for (int i = 0; i < 8; ++i) body.push_back(static_cast<char>((h >> (8 * i)) & 0xff));
        ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), rk, body).ok());
      },
      "has refcount 5 but 1 manifests reference it");
  expect_corrupt([&](rocksdb::DB* db) { ASSERT_TRUE(db->Delete(rocksdb::WriteOptions(), bk).ok()); },
                 "has a refcount but no block record");
  expect_corrupt(
      [&](rocksdb::DB* db) {
        ASSERT_TRUE(db->Delete(rocksdb::WriteOptions(), bk).ok());
        ASSERT_TRUE(db->Delete(rocksdb::WriteOptions(), rk).ok());
      },
      "no block record");
  expect_corrupt(
      [&](rocksdb::DB* db) {
        std::string k = FirstKeyWithPrefix(db, "C");
        k.back() = 9;  // chunk 9 of a one-chunk manifest
        ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), k, "junk").ok());
      },
      "beyond");
  expect_corrupt(
      [&](rocksdb::DB* db) {
        std::string k("C\0\0\0\x01orphan\0\0\0\0\0", 16);
        ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), k, "junk").ok());
      },
      "belongs to no session");
  auto idx = OpenOrDie(dir_, Options());
  CheckConsistent(*idx);
}

// --- Torn log tails and failed writes ---------------------------------------------

fs::path NewestLog(const std::string& dir) {
  fs::path best;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".log" && fs::file_size(e.path()) > 0 && e.path().filename() > best.filename())
      best = e.path();
  }
  return best;
}

TEST_F(IndexTest, TornLogTailDropsOnlyTheUnacknowledgedWriteAndSaysSo) {
  // A process killed after two acknowledged turns of session a: the second
  // is the last record of the log.
  std::vector<Expected> states;
  ASSERT_NO_FATAL_FAILURE(RunAndKill(dir_, "two-turns", 1024, &states));
  ASSERT_EQ(states.size(), 2u);
  const Manifest acked = states[0].sessions.at(Key{1, "a"});
  const Manifest a = states[1].sessions.at(Key{1, "a"});
  ASSERT_NE(acked, a);
  const fs::path log = NewestLog(dir_);
  ASSERT_FALSE(log.empty());
  const std::string scratch = dir_ + ".torn";
  for (uintmax_t cut : {1, 7, 100}) {
    SCOPED_TRACE("cut " + std::to_string(cut));
    fs::remove_all(scratch);
    fs::copy(dir_, scratch, fs::copy_options::recursive);
    const fs::path torn = fs::path(scratch) / log.filename();
    fs::resize_file(torn, fs::file_size(torn) - cut);
    IndexOptions strict = Options();
    strict.fail_on_torn_wal_tail = true;
    Result<std::unique_ptr<Index>> r = Index::Open(scratch, strict);
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << r.status().ToString();
    r = Index::Open(scratch, Options());
    ASSERT_OK(r);
    EXPECT_TRUE((*r)->recovery().wal_tail_dropped);
    EXPECT_FALSE((*r)->recovery().wal_tail_detail.empty());
    Result<Manifest> got = (*r)->GetManifest(1, "a");
    ASSERT_OK(got);
    EXPECT_EQ(*got, acked);
    CheckConsistent(**r);
  }
  fs::remove_all(scratch);
  auto idx = OpenOrDie(dir_, Options());  // the intact log: nothing dropped
  EXPECT_FALSE(idx->recovery().wal_tail_dropped);
  EXPECT_EQ(*idx->GetManifest(1, "a"), a);
}

// Fails syncs of write-ahead log files on demand.
class FlakySyncFs : public rocksdb::FileSystemWrapper {
 public:
  explicit FlakySyncFs(const std::shared_ptr<rocksdb::FileSystem>& base) : rocksdb::FileSystemWrapper(base) {}
  const char* Name() const override { return "FlakySyncFs"; }

  rocksdb::IOStatus NewWritableFile(const std::string& f, const rocksdb::FileOptions& o,
                                    std::unique_ptr<rocksdb::FSWritableFile>* r, rocksdb::IODebugContext* d) override {
    rocksdb::IOStatus s = target()->NewWritableFile(f, o, r, d);
    if (s.ok() && f.ends_with(".log")) *r = std::make_unique<File>(std::move(*r), &fail_sync);
    return s;
  }

  std::atomic<bool> fail_sync{false};

 private:
  class File : public rocksdb::FSWritableFileOwnerWrapper {
   public:
    File(std::unique_ptr<rocksdb::FSWritableFile>&& f, std::atomic<bool>* fail)
        : rocksdb::FSWritableFileOwnerWrapper(std::move(f)), fail_(fail) {}
    rocksdb::IOStatus Sync(const rocksdb::IOOptions& o, rocksdb::IODebugContext* d) override {
      return *fail_ ? rocksdb::IOStatus::IOError("injected sync failure") : target()->Sync(o, d);
    }
    rocksdb::IOStatus Fsync(const rocksdb::IOOptions& o, rocksdb::IODebugContext* d) override {
      return *fail_ ? rocksdb::IOStatus::IOError("injected fsync failure") : target()->Fsync(o, d);
    }

   private:
    std::atomic<bool>* fail_;
  };
};

TEST_F(IndexTest, FailedSyncMakesTheIndexReadOnlyAndFreesNothing) {
  auto flaky = std::make_shared<FlakySyncFs>(rocksdb::FileSystem::Default());
  std::unique_ptr<rocksdb::Env> env = rocksdb::NewCompositeEnv(flaky);
  IndexOptions o = Options(64);
  o.env = env.get();
  Manifest a = Empty(1, "a");
  {
    auto idx = OpenOrDie(dir_, o);
    ASSERT_OK(Turn(*idx, a, rng_, 30));  // the second block is partial
    const SlotStats before = idx->slot_stats();
    flaky->fail_sync = true;
    Manifest attempt = a;
    const Status st = Turn(*idx, attempt, rng_, 5);  // 34 KV tokens: would free a's partial block
    EXPECT_EQ(st.code(), StatusCode::kIOError) << st.ToString();
    EXPECT_NE(st.message().find("injected"), std::string_view::npos) << st.ToString();
    const SlotStats after = idx->slot_stats();
    EXPECT_EQ(after.committed, before.committed);
    EXPECT_EQ(after.reserved, 2u);  // the failed turn's two blocks are never handed out again
    EXPECT_OK(idx->GetBlock(a.blocks[1]));
    flaky->fail_sync = false;
    // Read-only, even though the disk works again.
    EXPECT_EQ(idx->AllocateSlots(1).status().code(), StatusCode::kIOError);
    EXPECT_EQ(idx->DeleteSession(1, "a").code(), StatusCode::kIOError);
    EXPECT_EQ(idx->ForkSession(1, "a", ForkOf(a, 1, "b")).code(), StatusCode::kIOError);
    Result<Manifest> got = idx->GetManifest(1, "a");
    ASSERT_OK(got);
    EXPECT_EQ(*got, a);
  }
  // A reopen reads the truth back: the failed turn landed or it did not.
  auto idx = OpenOrDie(dir_, Options(64));
  CheckConsistent(*idx);
  Result<Manifest> got = idx->GetManifest(1, "a");
  ASSERT_OK(got);
  EXPECT_TRUE(*got == a || got->turn_seq == a.turn_seq + 1);
}

// --- Byte flips in RocksDB's own files ------------------------------------------

bool SameBlocks(const std::map<BlockSlot, BlockInfo>& a, const std::map<BlockSlot, BlockInfo>& b) {
  if (a.size() != b.size()) return false;
  for (auto ia = a.begin(), ib = b.begin(); ia != a.end(); ++ia, ++ib) {
    if (ia->first != ib->first || ia->second.refcount != ib->second.refcount ||
        ia->second.page_checksums != ib->second.page_checksums)
      return false;
  }
  return true;
}

class IndexFlipTest : public IndexTest {
 protected:
  // A database whose data sits in tables (flushed at a clean close), in the
  // MANIFEST, and in the live write-ahead log (the last mutations, by a
  // process killed after they were acknowledged).
  void BuildPristine() {
    {
      auto idx = OpenOrDie(dir_, Options(2048));
      for (int i = 0; i < 6; ++i) {
        Manifest m = Empty(1000 + i % 2, "s" + std::to_string(i));
        ASSERT_OK(Turn(*idx, m, rng_, 200 + 50 * i));
        ASSERT_OK(Turn(*idx, m, rng_, 9));
        if (i == 2) ASSERT_OK(idx->ForkSession(m.owner_uid, m.name, ForkOf(m, 1000, "fork")));
      }
    }
    std::vector<Expected> states;
    ASSERT_NO_FATAL_FAILURE(RunAndKill(dir_, "turn-and-delete", 2048, &states));
    pristine_ = std::move(states.back());
  }

  // Flips bytes of every file whose name contains `pattern`, one trial per
  // position, and checks each trial opens to exactly the pristine content or
  // fails with Corruption (or reports a dropped torn log tail).
  void FlipFiles(std::string_view pattern, int random_positions) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir_)) {
      if (e.path().filename().string().find(pattern) != std::string::npos && fs::file_size(e.path()) > 0)
        files.push_back(e.path().filename());
    }
    ASSERT_FALSE(files.empty()) << "no " << pattern << " file in " << dir_;
    const std::string scratch = dir_ + ".flip";
    int trials = 0, corrupt = 0, tail_dropped = 0;
    std::string harmless;
    for (const fs::path& f : files) {
      const size_t size = fs::file_size(fs::path(dir_) / f);
      std::set<size_t> positions;
      for (size_t i = 0; i < std::min<size_t>(size, 40); ++i) {
        positions.insert(i);
        positions.insert(size - 1 - i);
      }
      std::mt19937_64 rng(size);
      for (int i = 0; i < random_positions; ++i) positions.insert(rng() % size);
      for (size_t pos : positions) {
        fs::remove_all(scratch);
        fs::copy(dir_, scratch, fs::copy_options::recursive);
        {
          std::fstream io(fs::path(scratch) / f, std::ios::in | std::ios::out | std::ios::binary);
          io.seekg(static_cast<std::streamoff>(pos));
          char c = 0;
          io.read(&c, 1);
          c = static_cast<char>(c ^ (1 << (pos % 8)));
          io.seekp(static_cast<std::streamoff>(pos));
          io.write(&c, 1);
        }
        ++trials;
        Result<std::unique_ptr<Index>> r = Index::Open(scratch, Options(2048));
        if (!r.ok()) {
          ++corrupt;
          EXPECT_EQ(r.status().code(), StatusCode::kCorruption)
              << f << " byte " << pos << ": " << r.status().ToString();
          continue;
        }
        Result<Expected> got = ReadAll(**r);
        if (!got.ok()) {
          ++corrupt;
          EXPECT_EQ(got.status().code(), StatusCode::kCorruption) << f << " byte " << pos;
          continue;
        }
        if ((*r)->recovery().wal_tail_dropped) {
          // A flipped length byte of the last log record reads as a torn,
          // unacknowledged write: dropped, and reported, never silently.
          ++tail_dropped;
          CheckConsistent(**r);
          continue;
        }
        EXPECT_TRUE(got->sessions == pristine_.sessions && SameBlocks(got->blocks, pristine_.blocks))
            << f << " byte " << pos << " of " << size << ": opened with different content (silent loss)";
        harmless += " " + std::to_string(static_cast<int64_t>(pos) - static_cast<int64_t>(size));
      }
    }
    fs::remove_all(scratch);
    std::printf(
        "%s: %d flips: %d Corruption, %d reported torn log tails, the rest harmless (offsets from the end:%s)\n",
        std::string(pattern).c_str(), trials, corrupt, tail_dropped, harmless.c_str());
    EXPECT_GT(corrupt, 0);
  }

  Expected pristine_;
};

// The flips that change nothing land in the table footer's padding (RocksDB
// 7.8's footer format does not checksum it; the handles it pads are intact).
TEST_F(IndexFlipTest, FlipsInTablesAreDetected) {
  ASSERT_NO_FATAL_FAILURE(BuildPristine());
  FlipFiles(".sst", 60);
}

TEST_F(IndexFlipTest, FlipsInTheWriteAheadLogAreDetected) {
  ASSERT_NO_FATAL_FAILURE(BuildPristine());
  FlipFiles(".log", 60);
}

TEST_F(IndexFlipTest, FlipsInTheRocksDbManifestAreDetected) {
  ASSERT_NO_FATAL_FAILURE(BuildPristine());
  FlipFiles("MANIFEST-", 60);
}

// --- Crash consistency under kill -9 ----------------------------------------------

constexpr uint64_t kCrashCapacity = 600;
constexpr int kCrashNames = 10;

IndexOptions CrashOptions() { return Options(kCrashCapacity); }

uint32_t UidOf(int name) { return 1000 + name % 2; }

// The child: commits turns, forks and deletes in a loop until killed. Before
// each mutation it announces the state it is about to make durable
// ("B P uid name digest" or "B D uid name"), after it "A". It runs only when
// the parent re-executes this binary with MNEMO_INDEX_CRASH_DIR set.
TEST(IndexCrashChild, DISABLED_Run) {
  const char* dir = std::getenv("MNEMO_INDEX_CRASH_DIR");
  const char* seed_env = std::getenv("MNEMO_INDEX_CRASH_SEED");
  const char* fd_env = std::getenv("MNEMO_INDEX_CRASH_FD");
  if (!dir || !seed_env || !fd_env) GTEST_SKIP() << "helper mode of IndexCrashTest";
  const int fd = std::atoi(fd_env);
  auto fail = [](const Status& st) {
    std::fprintf(stderr, "crash child: %s\n", st.ToString().c_str());
    _exit(3);
  };
  Result<std::unique_ptr<Index>> opened = Index::Open(dir, CrashOptions());
  if (!opened.ok()) fail(opened.status());
  Index& idx = **opened;
  Result<std::vector<Manifest>> loaded = idx.LoadManifests();
  if (!loaded.ok()) fail(loaded.status());
  std::map<int, Manifest> live;
  for (Manifest& m : *loaded) live.emplace(std::atoi(m.name.c_str() + 1), std::move(m));
  Emit(fd, "R\n");

  std::mt19937_64 rng(std::strtoull(seed_env, nullptr, 10));
  auto announce_put = [&](const Manifest& m) {
    Emit(fd, "B P " + std::to_string(m.owner_uid) + " " + m.name + " " + Hex64(Digest(m)) + "\n");
  };
  auto remove = [&](int n) {
    const Manifest& m = live.at(n);
    Emit(fd, "B D " + std::to_string(m.owner_uid) + " " + m.name + "\n");
    Status st = idx.DeleteSession(m.owner_uid, m.name);
    if (!st.ok()) fail(st);
    Emit(fd, "A\n");
    live.erase(n);
  };
  for (;;) {
    const int name = static_cast<int>(rng() % kCrashNames);
    const int op = static_cast<int>(rng() % 100);
    auto it = live.find(name);
    if (it == live.end()) {
      auto src = live.begin();
      if (op < 30 && src != live.end()) {  // fork
        Manifest f = ForkOf(src->second, UidOf(name), "s" + std::to_string(name));
        announce_put(f);
        Status st = idx.ForkSession(src->second.owner_uid, src->second.name, f);
        if (!st.ok()) fail(st);
        Emit(fd, "A\n");
        live.emplace(name, std::move(f));
      } else {  // a new session
        Manifest m = Empty(UidOf(name), "s" + std::to_string(name));
        Status st = Turn(idx, m, rng, 1 + rng() % 100, rng() % 2, announce_put);
        if (st.code() == StatusCode::kResourceExhausted) continue;
        if (!st.ok()) fail(st);
        Emit(fd, "A\n");
        live.emplace(name, std::move(m));
      }
    } else if (op < 12 || it->second.tokens.size() > 1500) {
      remove(name);
    } else {
      Status st = Turn(idx, it->second, rng, 1 + rng() % 48, rng() % 2, announce_put);
      if (st.code() == StatusCode::kResourceExhausted) {
        remove(name);
        continue;
      }
      if (!st.ok()) fail(st);
      Emit(fd, "A\n");
    }
  }
}

TEST_F(IndexTest, CrashConsistencyUnderKill9) {
  constexpr int kRounds = 60;
  std::map<Key, uint64_t> acked;  // what must survive: the last acknowledged state
  {
    auto idx = OpenOrDie(dir_, CrashOptions());  // created before the first child
  }
  std::mt19937_64 rng(2024);
  int killed_before_ready = 0, mutations = 0, pending_landed = 0, torn_tails = 0;
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    Child child = SpawnChild("IndexCrashChild.DISABLED_Run", {"MNEMO_INDEX_CRASH_DIR=" + dir_,
                                                              "MNEMO_INDEX_CRASH_SEED=" + std::to_string(rng()),
                                                              "MNEMO_INDEX_CRASH_FD=3"});
    std::string buf;
    std::vector<std::string> lines;
    const auto start = std::chrono::steady_clock::now();
    bool alive = true;
    if (round % 5 == 4) {
      // Kill at a random moment of Open and recovery.
      alive = ReadLines(child.fd, &buf, &lines, start + std::chrono::milliseconds(rng() % 150), false);
    } else {
      while (alive && std::find(lines.begin(), lines.end(), "R") == lines.end() &&
             std::chrono::steady_clock::now() - start < std::chrono::seconds(60)) {
        alive =
            ReadLines(child.fd, &buf, &lines, std::chrono::steady_clock::now() + std::chrono::milliseconds(20), false);
      }
      ASSERT_NE(std::find(lines.begin(), lines.end(), "R"), lines.end()) << "child did not get ready";
      alive = ReadLines(child.fd, &buf, &lines,
                        std::chrono::steady_clock::now() + std::chrono::milliseconds(1 + rng() % 80), false);
    }
    ASSERT_TRUE(alive) << "the child exited by itself";
    kill(child.pid, SIGKILL);
    ReadLines(child.fd, &buf, &lines, {}, true);
    close(child.fd);
    int wstatus = 0;
    ASSERT_EQ(waitpid(child.pid, &wstatus, 0), child.pid);
    ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << "child status " << wstatus;
    if (std::find(lines.begin(), lines.end(), "R") == lines.end()) ++killed_before_ready;

    // Replay the child's protocol: acknowledged mutations must be durable;
    // the one in flight may or may not be.
    std::optional<std::pair<Key, std::optional<uint64_t>>> pending;
    for (const std::string& line : lines) {
      std::istringstream in(line);
      std::string tag;
      in >> tag;
      if (tag == "B") {
        std::string kind, name, digest;
        uint32_t uid = 0;
        in >> kind >> uid >> name;
        std::optional<uint64_t> d;
        if (kind == "P") {
          in >> digest;
          d = std::stoull(digest, nullptr, 16);
        }
        pending.emplace(Key{uid, name}, d);
      } else if (tag == "A") {
        ASSERT_TRUE(pending.has_value());
        if (pending->second) {
          acked[pending->first] = *pending->second;
        } else {
          acked.erase(pending->first);
        }
        pending.reset();
        ++mutations;
      }
    }
    auto idx_or = Index::Open(dir_, CrashOptions());
    ASSERT_TRUE(idx_or.ok()) << idx_or.status().ToString();
    if ((*idx_or)->recovery().wal_tail_dropped) ++torn_tails;
    const std::map<Key, Manifest> now = CheckConsistent(**idx_or);
    std::map<Key, uint64_t> found;
    for (const auto& [k, m] : now) found[k] = Digest(m);
    if (found != acked) {
      ASSERT_TRUE(pending.has_value()) << "acknowledged state lost";
      std::map<Key, uint64_t> with_pending = acked;
      if (pending->second) {
        with_pending[pending->first] = *pending->second;
      } else {
        with_pending.erase(pending->first);
      }
      ASSERT_EQ(found, with_pending) << "state is neither the acknowledged one nor that plus the write in flight";
      ++pending_landed;
    }
    acked = std::move(found);
  }
  std::printf(
      "%d kill -9 rounds (%d during start-up), %d acknowledged mutations, %d in-flight writes landed, "
      "%d torn log tails dropped\n",
      kRounds, killed_before_ready, mutations, pending_landed, torn_tails);
  EXPECT_GT(mutations, kRounds);
}

}  // namespace
}  // namespace mnemo::tiering
