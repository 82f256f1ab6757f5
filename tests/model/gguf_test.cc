// GGUF reader: valid files, every metadata type, and truncated, corrupt and
// hostile inputs, which must yield typed errors and never crash.
#include "model/gguf.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>

#include "model/gguf_writer.h"
#include "tests/testutil/tiny_model.h"

namespace mnemo::model {
namespace {

using kernels::DType;

std::string SmallFile(uint32_t alignment = 32) {
  GgufWriter w(alignment);
  w.SetString("general.architecture", "llama");
  w.SetUint32("u32", 7);
  w.SetInt32("i32", -3);
  w.SetUint64("u64", 1ull << 40);
  w.SetFloat32("f32", 0.5f);
  w.SetBool("flag", true);
  w.SetStringArray("strs", {"a", "", "ccc"});
  w.SetInt32Array("ints", {1, -2, 3});
  w.SetFloat32Array("floats", {1.5f, 2.5f});
  std::string payload;
  int8_t i8 = -5;
  payload.append(reinterpret_cast<const char*>(&i8), 1);
  w.SetRaw("i8", GgufType::kInt8, payload);
  double f64 = 2.25;
  w.SetRaw("f64", GgufType::kFloat64, std::string(reinterpret_cast<const char*>(&f64), 8));
  std::vector<float> v(64);
  for (int i = 0; i < 64; ++i) v[i] = static_cast<float>(i) - 30.0f;
  EXPECT_TRUE(w.AddTensor("a", {32, 2}, DType::kQ8_0, testutil::Quantize(DType::kQ8_0, v)).ok());
  EXPECT_TRUE(w.AddTensor("b", {64}, DType::kF32, testutil::Quantize(DType::kF32, v)).ok());
  EXPECT_TRUE(w.AddTensor("c", {32, 2}, DType::kQ4_1, testutil::Quantize(DType::kQ4_1, v)).ok());
  return w.Serialize();
}

TEST(Gguf, ReadsEveryMetadataTypeAndTensor) {
  auto f = GgufFile::FromBytes(SmallFile());
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const GgufFile& g = **f;
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(*g.GetString("general.architecture"), "llama");
  EXPECT_EQ(*g.GetUint("u32"), 7u);
  EXPECT_EQ(*g.GetInt("i32"), -3);
  EXPECT_EQ(*g.GetUint("u64"), 1ull << 40);
  EXPECT_FLOAT_EQ(static_cast<float>(*g.GetFloat("f32")), 0.5f);
  EXPECT_TRUE(*g.GetBool("flag"));
  EXPECT_EQ(*g.GetInt("i8"), -5);
  EXPECT_DOUBLE_EQ(*g.GetFloat("f64"), 2.25);
  EXPECT_EQ(*g.GetStringArray("strs"), (std::vector<std::string>{"a", "", "ccc"}));
  EXPECT_EQ(*g.GetIntArray("ints"), (std::vector<int64_t>{1, -2, 3}));
  EXPECT_EQ(*g.GetFloatArray("floats"), (std::vector<float>{1.5f, 2.5f}));
  EXPECT_EQ(g.GetUint("i32").status().code(), StatusCode::kInvalidArgument);  // negative
  EXPECT_EQ(g.GetString("u32").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(g.GetString("nope").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(*g.GetIntOr("nope", 42), 42);
  ASSERT_EQ(g.tensors().size(), 3u);
  const GgufTensorInfo* a = g.FindTensor("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->type, DType::kQ8_0);
  EXPECT_EQ(a->dims, (std::vector<int64_t>{32, 2}));
  EXPECT_EQ(a->bytes, 2u * 34u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data) % 32, 0u);
  const GgufTensorInfo* b = g.FindTensor("b");
  ASSERT_NE(b, nullptr);
  float first;
  std::memcpy(&first, b->data, 4);
  EXPECT_EQ(first, -30.0f);
  EXPECT_EQ(g.FindTensor("zzz"), nullptr);
}

TEST(Gguf, HonoursCustomAlignment) {
  auto f = GgufFile::FromBytes(SmallFile(64));
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ((*f)->alignment(), 64u);
  EXPECT_EQ((*f)->data_offset() % 64, 0u);
  for (const auto& t : (*f)->tensors()) EXPECT_EQ(t.offset % 64, 0u);
}

TEST(Gguf, EveryTruncationIsACleanError) {
  const std::string full = SmallFile();
  auto whole = GgufFile::FromBytes(full);
  ASSERT_TRUE(whole.ok());
  // Cut anywhere before the end of the last tensor's data.
  const GgufTensorInfo* last = (*whole)->FindTensor("c");
  const size_t need = (*whole)->data_offset() + last->offset + last->bytes;
  for (size_t n = 0; n < need; ++n) {
    auto f = GgufFile::FromBytes(full.substr(0, n));
    ASSERT_FALSE(f.ok()) << "prefix of " << n << " bytes parsed";
    EXPECT_EQ(f.status().code(), StatusCode::kCorruption) << n << ": " << f.status().ToString();
  }
}

// Patches the little-endian u32/u64 at `off`.
template <typename T>
std::string Patch(std::string s, size_t off, T v) {
  std::memcpy(s.data() + off, &v, sizeof v);
  return s;
}

TEST(Gguf, RejectsCorruptHeaders) {
  const std::string ok = SmallFile();
  auto code = [](const std::string& s) { return GgufFile::FromBytes(s).status().code(); };
  EXPECT_EQ(code(Patch<uint32_t>(ok, 0, 0x12345678)), StatusCode::kCorruption);  // magic
  EXPECT_EQ(code(Patch<uint32_t>(ok, 4, 1)), StatusCode::kUnsupported);          // version
  EXPECT_EQ(code(Patch<uint32_t>(ok, 4, 99)), StatusCode::kUnsupported);
  EXPECT_EQ(code(Patch<uint64_t>(ok, 8, ~0ull)), StatusCode::kCorruption);   // tensor count
  EXPECT_EQ(code(Patch<uint64_t>(ok, 16, ~0ull)), StatusCode::kCorruption);  // kv count
  EXPECT_EQ(code(Patch<uint64_t>(ok, 24, ~0ull)), StatusCode::kCorruption);  // key length
  // First key "general.architecture" (20 bytes) then its type at 24+8+20.
  EXPECT_EQ(code(Patch<uint32_t>(ok, 52, 77)), StatusCode::kCorruption);  // unknown type
  // Its string length.
  EXPECT_EQ(code(Patch<uint64_t>(ok, 56, 1ull << 62)), StatusCode::kCorruption);
}

std::string OneTensor(std::vector<int64_t> dims, uint32_t type, uint64_t offset,
                      size_t data_bytes) {
  // Hand-built so that hostile fields can be expressed.
  std::string s;
  auto put32 = [&](uint32_t v) { s.append(reinterpret_cast<const char*>(&v), 4); };
  auto put64 = [&](uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); };
  put32(0x46554747);
  put32(3);
  put64(1);
  put64(0);
  put64(1);
  s += "t";
  put32(static_cast<uint32_t>(dims.size()));
  for (int64_t d : dims) put64(static_cast<uint64_t>(d));
  put32(type);
  put64(offset);
  s.resize((s.size() + 31) / 32 * 32, '\0');
  s.append(data_bytes, '\0');
  return s;
}

TEST(Gguf, RejectsHostileTensorInfos) {
  auto st = [](const std::string& s) { return GgufFile::FromBytes(s).status(); };
  EXPECT_TRUE(st(OneTensor({32, 2}, 0, 0, 256)).ok());
  EXPECT_EQ(st(OneTensor({}, 0, 0, 256)).code(), StatusCode::kCorruption);              // 0 dims
  EXPECT_EQ(st(OneTensor({1, 1, 1, 1, 1}, 0, 0, 64)).code(), StatusCode::kCorruption);  // 5 dims
  EXPECT_EQ(st(OneTensor({0, 2}, 0, 0, 64)).code(), StatusCode::kCorruption);           // empty
  EXPECT_EQ(st(OneTensor({1ll << 40, 1ll << 40}, 0, 0, 64)).code(), StatusCode::kCorruption);
  EXPECT_EQ(st(OneTensor({32, 2}, 0, 0, 255)).code(), StatusCode::kCorruption);  // short data
  EXPECT_EQ(st(OneTensor({32, 2}, 0, 16, 512)).code(), StatusCode::kCorruption);  // misaligned
  EXPECT_EQ(st(OneTensor({32, 2}, 0, ~0ull - 31, 512)).code(), StatusCode::kCorruption);
  EXPECT_EQ(st(OneTensor({33, 2}, 8, 0, 512)).code(), StatusCode::kCorruption);  // not blocked
  Status unknown = st(OneTensor({32}, 6, 0, 512));  // Q5_0: not supported
  EXPECT_EQ(unknown.code(), StatusCode::kUnsupported);
  EXPECT_NE(unknown.message().find("'t'"), std::string_view::npos) << unknown.ToString();
  EXPECT_EQ(st(OneTensor({32}, 1000, 0, 512)).code(), StatusCode::kUnsupported);
}

TEST(Gguf, RejectsDuplicatesAndBadAlignment) {
  GgufWriter w;
  w.SetUint32("k", 1);
  w.SetUint32("k", 2);
  EXPECT_EQ(GgufFile::FromBytes(w.Serialize()).status().code(), StatusCode::kCorruption);
  GgufWriter w2;
  w2.SetUint32("general.alignment", 24);
  EXPECT_EQ(GgufFile::FromBytes(w2.Serialize()).status().code(), StatusCode::kCorruption);
  GgufWriter w3;
  std::vector<float> v(32, 1.0f);
  ASSERT_TRUE(w3.AddTensor("x", {32}, DType::kF32, testutil::Quantize(DType::kF32, v)).ok());
  ASSERT_TRUE(w3.AddTensor("x", {32}, DType::kF32, testutil::Quantize(DType::kF32, v)).ok());
  EXPECT_EQ(GgufFile::FromBytes(w3.Serialize()).status().code(), StatusCode::kCorruption);
  // Nested arrays are refused.
  std::string nested;
  uint32_t t = static_cast<uint32_t>(GgufType::kArray);
  uint64_t n = 0;
  nested.append(reinterpret_cast<const char*>(&t), 4);
  nested.append(reinterpret_cast<const char*>(&n), 8);
  GgufWriter w4;
  w4.SetRaw("nest", GgufType::kArray, nested);
  EXPECT_EQ(GgufFile::FromBytes(w4.Serialize()).status().code(), StatusCode::kUnsupported);
}

TEST(Gguf, RandomCorruptionNeverCrashes) {
  const std::string base = testutil::MakeTinyModel({});
  std::mt19937_64 rng(7);
  int failures = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string s = base;
    const int flips = 1 + static_cast<int>(rng() % 4);
    // Bias mutations towards the header, where the structure lives.
    auto ok = GgufFile::FromBytes(base);
    const size_t header = (*ok)->data_offset();
    for (int i = 0; i < flips; ++i) s[rng() % header] ^= static_cast<char>(1 + rng() % 255);
    if (rng() % 4 == 0) s.resize(rng() % s.size());
    auto f = GgufFile::FromBytes(s);
    if (!f.ok()) {
      ++failures;
      continue;
    }
    // Whatever parsed must be internally consistent.
    for (const auto& t : (*f)->tensors()) {
      const auto* p = static_cast<const uint8_t*>(t.data);
      ASSERT_GE(p, (*f)->base());
      ASSERT_LE(p + t.bytes, (*f)->base() + (*f)->file_size());
    }
  }
  EXPECT_GT(failures, 100);
}

TEST(Gguf, OpenReportsMissingFileAndDirectory) {
  auto f = GgufFile::Open("/nonexistent/model.gguf");
  EXPECT_EQ(f.status().code(), StatusCode::kIOError);
  EXPECT_NE(f.status().message().find("/nonexistent/model.gguf"), std::string_view::npos);
  EXPECT_EQ(GgufFile::Open("/tmp").status().code(), StatusCode::kInvalidArgument);
}

TEST(Gguf, OpensTheDefaultModel) {
  const std::string path =
      std::string(MNEMO_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "default model not fetched: " << path;
  auto f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(*(*f)->GetString("general.architecture"), "llama");
  EXPECT_EQ(*(*f)->GetInt("llama.block_count"), 30);
  EXPECT_EQ((*f)->tensors().size(), 272u);
  EXPECT_EQ((*(*f)->GetStringArray("tokenizer.ggml.tokens")).size(), 49152u);
  EXPECT_EQ((*f)->FindTensor("token_embd.weight")->type, DType::kQ8_0);
  EXPECT_EQ((*f)->FindTensor("blk.0.attn_q.weight")->type, DType::kQ4_1);
}

}  // namespace
}  // namespace mnemo::model
