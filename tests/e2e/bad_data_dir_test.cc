// Start-up of the real mnemod on a data directory it must not use: an index
// or a page store written by a newer mnemod (a newer format version), or a
// damaged or lost RocksDB (CURRENT lost or naming a MANIFEST that is gone, a
// MANIFEST byte flipped, the whole index gone while slab files remain).
// The daemon must refuse to start — no READY=1, a non-zero exit, a log line
// naming the problem and the directory — and leave every file of the data
// directory byte for byte as it was, however often it is restarted; with the
// damage undone, the next start serves the old session, resumed from T2.
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>

#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <xxhash.h>

#include "mnemo/client.h"
#include "tests/testutil/daemon_process.h"

namespace mnemo {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using client::Client;
using testutil::DaemonProcess;

// Small budgets: the slab file is preallocated whole.
const std::vector<std::string> kArgs = {"--t2-budget", "16M", "--t1-budget", "0"};

client::GenerateRequest Turn(const std::string& text) {
  client::GenerateRequest g;
  g.session = "s";
  g.messages = {{"user", text}};
  g.max_tokens = 8;
  g.sampling.temperature = 0;
  return g;
}

std::string ReadFile(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void WriteFile(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << bytes;
}

// Every directory and file under `root`: relative path -> "dir", or the
// file's size and the XXH3 of its bytes.
std::map<std::string, std::string> Snapshot(const std::string& root) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    const std::string rel = fs::relative(e.path(), root).string();
    if (e.is_directory()) {
      out[rel] = "dir";
      continue;
    }
    const std::string bytes = ReadFile(e.path());
    out[rel] = std::to_string(bytes.size()) + " bytes, xxh3 " + std::to_string(XXH3_64bits(bytes.data(), bytes.size()));
  }
  return out;
}

// Plants format record `version` in the index with RocksDB itself, as a
// newer mnemod would have written it ("MNIX" + u32 little-endian).
void SetFormatVersion(const std::string& index_dir, uint32_t version) {
  rocksdb::Options o;
  rocksdb::DB* db = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(o, index_dir, &db);
  ASSERT_TRUE(s.ok()) << s.ToString();
  std::string v = "MNIX";
  for (int i = 0; i < 4; ++i) v.push_back(static_cast<char>((version >> (8 * i)) & 0xff));
  rocksdb::WriteOptions wo;
  wo.sync = true;
  EXPECT_TRUE(db->Put(wo, "V", v).ok());
  EXPECT_TRUE(db->Close().ok());
  delete db;
}

class BadDataDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(testutil::MnemodPath())) GTEST_SKIP() << "mnemod not built";
    if (!fs::exists(testutil::DefaultModelPath()))
      GTEST_SKIP() << "default model not fetched (scripts/fetch-model): " << testutil::DefaultModelPath();
    index_dir_ = d_.data_dir() + "/index";
  }
  void TearDown() override {
    if (HasFailure()) fprintf(stderr, "---- mnemod log ----\n%s\n", d_.log().c_str());
  }

  Result<Client> Connect() {
    client::ConnectOptions o;
    o.socket_path = d_.socket_path();
    return Client::Connect(o);
  }

  // A data directory holding session "s" with one persisted turn.
  void MakeDataDir() {
    ASSERT_TRUE(d_.Start(args_)) << d_.error();
    auto c = Connect();
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    ASSERT_TRUE(c->CreateSession("s").ok());
    auto r = c->GenerateText(Turn("Name a fruit."));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_TRUE(r->done.persisted) << r->done.persist_error;
    auto info = c->GetSession("s");
    ASSERT_TRUE(info.ok());
    tokens_ = info->tokens;
    ASSERT_EQ(d_.Stop(SIGTERM), 0);
    ASSERT_TRUE(fs::exists(index_dir_ + "/CURRENT"));
  }

  // Starts mnemod on the data directory and expects a refusal that leaves
  // every file as it was and names `dir` (the index by default). Returns
  // what this start logged.
  std::string ExpectRefusal(std::string dir = {}) {
    if (dir.empty()) dir = index_dir_;
    const auto before = Snapshot(d_.data_dir());
    const size_t log_from = d_.log().size();
    EXPECT_FALSE(d_.Start(args_, 60s)) << "mnemod started on a data directory it must refuse";
    const int st = d_.Wait(30s);
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) != 0) << "exit status " << st;
    for (const auto& n : d_.notifications()) EXPECT_EQ(n.find("READY=1"), std::string::npos) << n;
    EXPECT_FALSE(fs::exists(d_.socket_path()));
    const auto after = Snapshot(d_.data_dir());
    EXPECT_EQ(after, before) << "the refused start-up changed the data directory";
    const std::string log = d_.log().substr(log_from);
    // The message names what it refused.
    EXPECT_NE(log.find(dir), std::string::npos) << log;
    return log;
  }

  // With the damage undone, the old session is there and resumes from T2.
  void ExpectServedAgain() {
    ASSERT_TRUE(d_.Start(args_)) << d_.error();
    auto c = Connect();
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    auto info = c->GetSession("s");
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    EXPECT_EQ(info->turns, 1u);
    EXPECT_EQ(info->tokens, tokens_);
    auto r = c->GenerateText(Turn("Name a color."));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(r->done.persisted) << r->done.persist_error;
    EXPECT_LT(r->done.prompt_tokens, tokens_) << "the history was recomputed";
    EXPECT_EQ(d_.Stop(SIGTERM), 0);
  }

  DaemonProcess d_;
  std::vector<std::string> args_ = kArgs;  // mnemod's flags for the next start
  std::string index_dir_;
  uint32_t tokens_ = 0;
};

TEST_F(BadDataDirTest, NewerIndexFormatVersionIsRefusedAndLeftUntouched) {
  ASSERT_NO_FATAL_FAILURE(MakeDataDir());
  ASSERT_NO_FATAL_FAILURE(SetFormatVersion(index_dir_, 2));
  for (int start = 0; start < 2; ++start) {
    SCOPED_TRACE("start " + std::to_string(start));
    const std::string log = ExpectRefusal();
    EXPECT_NE(log.find("format version 2"), std::string::npos) << log;
    EXPECT_NE(log.find("newer mnemod"), std::string::npos) << log;
  }
  ASSERT_NO_FATAL_FAILURE(SetFormatVersion(index_dir_, 1));
  ExpectServedAgain();
}

// A data directory written with another KV page size than today's default
// (an upgrade that moved the default): without --page-tokens mnemod keeps
// the directory's size and resumes its sessions; a --page-tokens that
// cannot open it is refused, naming both sizes and the flag, and nothing is
// touched.
TEST_F(BadDataDirTest, DataDirOfAnotherPageSizeKeepsItsSizeUnlessAFlagConflicts) {
  args_ = kArgs;
  args_.insert(args_.end(), {"--page-tokens", "16"});
  ASSERT_NO_FATAL_FAILURE(MakeDataDir());
  args_ = kArgs;
  args_.insert(args_.end(), {"--page-tokens", "64"});
  const std::string log = ExpectRefusal(d_.data_dir());
  EXPECT_NE(log.find("created with 16-token KV pages"), std::string::npos) << log;
  EXPECT_NE(log.find("--page-tokens 64 cannot open it"), std::string::npos) << log;
  args_ = kArgs;  // the default: 64-token pages for a new directory
  const size_t log_from = d_.log().size();
  ExpectServedAgain();
  EXPECT_NE(d_.log().find("created with 16-token KV pages: using them", log_from), std::string::npos)
      << d_.log().substr(log_from);
}

TEST_F(BadDataDirTest, NewerPageStoreFormatVersionIsRefusedAndLeftUntouched) {
  ASSERT_NO_FATAL_FAILURE(MakeDataDir());
  const std::string meta_path = d_.data_dir() + "/pages/PAGESTORE";
  const std::string meta = ReadFile(meta_path);
  ASSERT_EQ(meta.rfind("mnemo-t2-page-store 1\n", 0), 0u) << meta;
  WriteFile(meta_path, "mnemo-t2-page-store 2\n" + meta.substr(meta.find('\n') + 1));
  const std::string log = ExpectRefusal(meta_path);
  EXPECT_NE(log.find("page store format version 2"), std::string::npos) << log;
  EXPECT_NE(log.find("newer mnemod"), std::string::npos) << log;
  WriteFile(meta_path, meta);
  ExpectServedAgain();
}

// RocksDB itself, opened for writing on an index whose CURRENT is gone,
// fails but leaves a fresh CURRENT and MANIFEST behind, and the next open
// then succeeds on an empty database and deletes the old tables: mnemod must
// not get there.
TEST_F(BadDataDirTest, LostCurrentFileIsRefusedOnEveryStartAndLeftUntouched) {
  ASSERT_NO_FATAL_FAILURE(MakeDataDir());
  const std::string current = ReadFile(index_dir_ + "/CURRENT");
  fs::remove(index_dir_ + "/CURRENT");
  for (int start = 0; start < 2; ++start) {
    SCOPED_TRACE("start " + std::to_string(start));
    const std::string log = ExpectRefusal();
    EXPECT_NE(log.find("no CURRENT file"), std::string::npos) << log;
    EXPECT_NE(log.find("damaged index"), std::string::npos) << log;  // the start-up advice
  }
  WriteFile(index_dir_ + "/CURRENT", current);
  ExpectServedAgain();
}

// Slab files with no index: the index was lost (they are first made after
// it), and a fresh one would drop the sessions they hold.
TEST_F(BadDataDirTest, LostIndexBesideSlabFilesIsRefusedAndLeftUntouched) {
  ASSERT_NO_FATAL_FAILURE(MakeDataDir());
  const std::string aside = d_.dir() + "/index.aside";
  fs::rename(index_dir_, aside);
  for (int start = 0; start < 2; ++start) {
    SCOPED_TRACE("start " + std::to_string(start));
    const std::string log = ExpectRefusal();
    EXPECT_NE(log.find("is missing"), std::string::npos) << log;
    EXPECT_NE(log.find("lose every session"), std::string::npos) << log;
    EXPECT_FALSE(fs::exists(index_dir_)) << "a refused start-up created a new index";
  }
  fs::rename(aside, index_dir_);
  ExpectServedAgain();
}

TEST_F(BadDataDirTest, CurrentNamingAMissingManifestIsRefusedAndLeftUntouched) {
  ASSERT_NO_FATAL_FAILURE(MakeDataDir());
  const std::string current = ReadFile(index_dir_ + "/CURRENT");
  WriteFile(index_dir_ + "/CURRENT", "MANIFEST-999999\n");
  const std::string log = ExpectRefusal();
  EXPECT_NE(log.find("missing"), std::string::npos) << log;
  EXPECT_NE(log.find("MANIFEST-999999"), std::string::npos) << log;
  EXPECT_NE(log.find("damaged index"), std::string::npos) << log;
  WriteFile(index_dir_ + "/CURRENT", current);
  ExpectServedAgain();
}

TEST_F(BadDataDirTest, DamagedRocksDbManifestIsRefusedAndLeftUntouched) {
  ASSERT_NO_FATAL_FAILURE(MakeDataDir());
  std::string current = ReadFile(index_dir_ + "/CURRENT");
  while (!current.empty() && current.back() == '\n') current.pop_back();
  const fs::path manifest = fs::path(index_dir_) / current;
  ASSERT_TRUE(fs::exists(manifest)) << manifest;
  const std::string pristine = ReadFile(manifest);
  ASSERT_GT(pristine.size(), 16u);
  // A byte inside the first record (past its 7-byte header): its CRC fails.
  std::string damaged = pristine;
  damaged[12] = static_cast<char>(damaged[12] ^ 0x20);
  WriteFile(manifest, damaged);
  const std::string log = ExpectRefusal();
  EXPECT_NE(log.find("Corruption"), std::string::npos) << log;
  EXPECT_NE(log.find("damaged index"), std::string::npos) << log;
  WriteFile(manifest, pristine);
  ExpectServedAgain();
}

}  // namespace
}  // namespace mnemo
