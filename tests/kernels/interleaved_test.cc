// The fast matmul over interleaved weights (kernels/cpu/interleaved.h): its
// kernel gives the bits of the defining scalar form over GGUF rows, whatever
// the split into row and activation tiles; it computes
// the same product as llama.cpp's dot product up to rounding; the backend in
// MathMode::kFast gives a row the same result alone or batched.
#include "kernels/cpu/interleaved.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"
#include "tests/kernels/kernel_test_util.h"

namespace mnemo::kernels::cpu {
namespace {

using testing::RandomFloats;
using testing::RandomWeights;

struct Case {
  DType type;
  int64_t rows, cols, n;
};

std::string Name(const Case& c) {
  return std::string(Info(c.type).name) + " " + std::to_string(c.rows) + "x" +
         std::to_string(c.cols) + " n=" + std::to_string(c.n);
}

struct Problem {
  std::vector<uint8_t> w, inter, act;
  std::vector<float> x;
  ActFormat format;
  GemmArgs args;  // over `inter`; w_row_bytes for `w`
};

Problem Make(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  Problem p;
  p.w = RandomWeights(rng, c.type, c.rows, c.cols);
  p.inter.resize(InterleavedBytes(c.type, c.rows, c.cols) + 64);
  Interleave(c.type, p.w.data(), c.rows, c.cols, p.inter.data());
  p.format = MakeActFormat(VecDotType(c.type), c.cols);
  p.act.resize(static_cast<size_t>(c.n) * p.format.row_bytes);
  p.x = RandomFloats(rng, static_cast<size_t>(c.n * c.cols));
  for (int64_t i = 0; i < c.n; ++i) {
    QuantizeActRow(p.format, p.x.data() + i * c.cols, p.act.data() + i * p.format.row_bytes);
  }
  p.args.w_type = c.type;
  p.args.w = p.inter.data();
  p.args.w_row_bytes = RowBytes(c.type, c.cols);
  p.args.x = p.act.data();
  p.args.format = p.format;
  p.args.ldy = c.rows;
  return p;
}

std::vector<float> Reference(Problem& p, const Case& c) {
  std::vector<float> y(static_cast<size_t>(c.n * c.rows), NAN);
  GemmArgs a = p.args;
  a.w = p.w.data();
  a.y = y.data();
  ref::GemmInterleaved(a, 0, c.rows, 0, c.n);
  return y;
}

std::vector<float> RunTiles(Problem& p, const Case& c, int64_t row_split, int64_t col_split) {
  std::vector<float> y(static_cast<size_t>(c.n * c.rows), NAN);
  GemmArgs a = p.args;
  a.y = y.data();
  for (int64_t r = 0; r < c.rows; r += row_split) {
    for (int64_t i = 0; i < c.n; i += col_split) {
      GemmInterleaved(a, r, std::min(c.rows, r + row_split), i, std::min(c.n, i + col_split));
    }
  }
  return y;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

const Case kCases[] = {
    {DType::kQ4_0, 16, 32, 1},   {DType::kQ4_0, 40, 96, 3},    {DType::kQ4_0, 48, 1536, 21},
    {DType::kQ4_1, 16, 32, 1},   {DType::kQ4_1, 40, 96, 3},    {DType::kQ4_1, 576, 576, 16},
    {DType::kQ4_1, 48, 1536, 21}, {DType::kQ8_0, 16, 32, 1},   {DType::kQ8_0, 40, 96, 3},
    {DType::kQ8_0, 200, 576, 16}, {DType::kQ8_0, 48, 1536, 21},
};

class InterleavedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CpuHasAvx512Vnni()) {
      GTEST_SKIP() << "this CPU lacks AVX-512 VNNI, which the interleaved matmul needs "
                      "(MathMode::kFast computes exact here)";
    }
  }
};

TEST_F(InterleavedTest, KernelGivesTheDefiningBitsWhateverTheTiles) {
  uint32_t seed = 1;
  for (const Case& c : kCases) {
    SCOPED_TRACE(Name(c));
    Problem p = Make(c, seed++);
    const std::vector<float> want = Reference(p, c);
    EXPECT_TRUE(SameBits(RunTiles(p, c, c.rows, c.n), want));
    EXPECT_TRUE(SameBits(RunTiles(p, c, 16, 1), want));  // one group, one row at a time
    EXPECT_TRUE(SameBits(RunTiles(p, c, 32, 5), want));  // partial column tiles
    EXPECT_TRUE(SameBits(RunTiles(p, c, 64, 9), want));  // a tile of 8 and one of 1
  }
}

// The same product as llama.cpp's dot product (ref::VecDot over GGML
// blocks of the same activations), up to the rounding of a float sum.
TEST_F(InterleavedTest, ComputesLlamaCppsProductUpToRounding) {
  uint32_t seed = 100;
  for (const Case& c : kCases) {
    SCOPED_TRACE(Name(c));
    Problem p = Make(c, seed++);
    const std::vector<float> y = RunTiles(p, c, c.rows, c.n);
    const DType act = VecDotType(c.type);
    std::vector<uint8_t> blocks(RowBytes(act, c.cols));
    std::vector<float> want(y.size());
    float largest = 0;
    for (int64_t i = 0; i < c.n; ++i) {
      ref::QuantizeRow(act, p.x.data() + i * c.cols, blocks.data(), c.cols);
      for (int64_t r = 0; r < c.rows; ++r) {
        const float v = ref::VecDot(c.type, p.w.data() + r * p.args.w_row_bytes, blocks.data(), c.cols);
        want[static_cast<size_t>(i * c.rows + r)] = v;
        largest = std::max(largest, std::fabs(v));
      }
    }
    for (size_t k = 0; k < y.size(); ++k) {
      ASSERT_NEAR(y[k], want[k], 1e-4f * largest) << "output " << k;
    }
  }
}

// The backend in kFast: an interleaved copy, and each activation row's
// result the same whether it runs alone or in a batch of 16 (prefill tiles
// included).
TEST_F(InterleavedTest, BackendGivesARowTheSameResultAloneOrBatched) {
  auto be = MakeCpuBackend(2, MathMode::kFast);
  if (be->math_mode() != MathMode::kFast) {
    GTEST_SKIP() << "this CPU lacks AVX-512 VNNI: MathMode::kFast falls back to exact here";
  }
  std::mt19937 rng(7);
  for (DType type : {DType::kQ4_0, DType::kQ4_1, DType::kQ8_0}) {
    const int64_t rows = 1536, cols = 576;
    SCOPED_TRACE(std::string(Info(type).name));
    const std::vector<uint8_t> host = RandomWeights(rng, type, rows, cols);
    auto up = be->UploadMatrix(Weight{type, rows, cols, host.data()});
    ASSERT_TRUE(up.ok()) << up.status().ToString();
    const Weight w = up.value();
    EXPECT_EQ(w.layout, WeightLayout::kInterleaved);
    EXPECT_NE(w.data, host.data());
    for (int64_t n : {16, 70}) {
      const std::vector<float> x = RandomFloats(rng, static_cast<size_t>(n * cols));
      std::vector<float> batched(static_cast<size_t>(n * rows));
      be->MatMul(w, x.data(), n, batched.data());
      for (int64_t i = 0; i < n; i += 7) {
        std::vector<float> alone(static_cast<size_t>(rows));
        be->MatMul(w, x.data() + i * cols, 1, alone.data());
        ASSERT_EQ(std::memcmp(alone.data(), batched.data() + i * rows, rows * sizeof(float)), 0)
            << "n=" << n << " row " << i;
      }
    }
  }
  // Types without an interleaved layout stay GGUF rows.
  const std::vector<uint8_t> q4k = RandomWeights(rng, DType::kQ4_K, 32, 256);
  EXPECT_EQ(be->UploadMatrix(Weight{DType::kQ4_K, 32, 256, q4k.data()}).value().layout,
            WeightLayout::kRows);
  // The exact backend leaves every weight as it is (zero-copy).
  auto exact = MakeCpuBackend(1);
  const std::vector<uint8_t> q41 = RandomWeights(rng, DType::kQ4_1, 32, 64);
  const Weight same = exact->UploadMatrix(Weight{DType::kQ4_1, 32, 64, q41.data()}).value();
  EXPECT_EQ(same.layout, WeightLayout::kRows);
  EXPECT_EQ(same.data, q41.data());
}

TEST(MathModeTest, ParsesItsNames) {
  EXPECT_EQ(ParseMathMode("exact"), MathMode::kExact);
  EXPECT_EQ(ParseMathMode("fast"), MathMode::kFast);
  EXPECT_FALSE(ParseMathMode("Fast").has_value());
  EXPECT_FALSE(ParseMathMode("").has_value());
  EXPECT_EQ(MathModeName(MathMode::kFast), "fast");
  EXPECT_EQ(MathModeName(MathMode::kExact), "exact");
}

}  // namespace
}  // namespace mnemo::kernels::cpu
