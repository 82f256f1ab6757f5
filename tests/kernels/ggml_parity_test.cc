// Bit-exactness with llama.cpp: on x86 targets with AVX2 and up, MatMul of
// Q4_1 and Q8_0 weights (activation quantization included) returns the
// very floats ggml's AVX2 vec_dot does, so mnemo's greedy tokens follow
// llama.cpp's even at near-ties. The expected bits were produced by ggml
// 0.25.3 (llama-cpp-python 0.3.36, AVX2+FMA build) on the same inputs.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "hwy/targets.h"  // HWY_AVX2 etc.
#include "kernels/backend.h"
#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"
#include "tests/kernels/kernel_test_util.h"

namespace mnemo::kernels::cpu {
namespace {

struct Lcg {
  uint64_t s;
  uint32_t Next() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(s >> 32);
  }
  float Uniform() { return static_cast<float>(Next() >> 8) * (1.0f / 16777216.0f); }
};

std::vector<uint8_t> GoldenWeights(DType t, int64_t rows, int64_t cols) {
  Lcg g{static_cast<uint64_t>(t) + 1};
  std::vector<uint8_t> w(RowBytes(t, cols) * static_cast<size_t>(rows));
  for (auto& b : w) b = static_cast<uint8_t>(g.Next() >> 24);
  const size_t bb = static_cast<size_t>(Info(t).block_bytes);
  for (size_t b = 0; b < w.size() / bb; ++b) {
    const uint16_t d = F32ToF16(0.001f + 0.004f * g.Uniform());
    const uint16_t m = F32ToF16(-0.03f * g.Uniform());
    std::memcpy(&w[b * bb], &d, 2);
    if (t == DType::kQ4_1) std::memcpy(&w[b * bb + 2], &m, 2);
    if (t == DType::kQ8_0) {
      for (size_t j = 2; j < bb; ++j) {
        if (w[b * bb + j] == 0x80) w[b * bb + j] = 0x81;  // GGML never writes -128
      }
    }
  }
  return w;
}

std::vector<float> GoldenActivations(int64_t n, int64_t cols) {
  Lcg g{99};
  std::vector<float> x(static_cast<size_t>(n * cols));
  for (auto& v : x) {
    v = (g.Uniform() - 0.5f) * 4.0f;
    if (g.Next() % 23 == 0) v *= 9.0f;
  }
  return x;
}

constexpr int64_t kRows = 8, kCols = 576, kN = 3;

// y[i][r] bits from ggml_vec_dot_{q4_1_q8_1,q8_0_q8_0} after ggml's own
// activation quantization.
constexpr uint32_t kQ4_1[kN * kRows] = {
    0xbef4c212, 0xbef5de48, 0x3f4d9b2b, 0xbfb9df42, 0xbf11cd30, 0xbf0e5140, 0x3f858b28, 0xbf95de78,
    0x3fa3a15e, 0x3effc20c, 0x3fc3e739, 0x3fcbc894, 0x40016540, 0xbef7bf0b, 0xbf47b02c, 0x3eebd408,
    0x3f7bc6f7, 0xbef94138, 0x3e8ece16, 0xbf69c8a4, 0xbf170cb7, 0x4008c41c, 0xbfa2ec4c, 0x3ea3d644};
constexpr uint32_t kQ8_0[kN * kRows] = {
    0x418a9560, 0x417148ee, 0x418c8157, 0xc13a621c, 0xc18f537c, 0xc018ffec, 0x410ab768, 0x3fce3754,
    0xc01f5cc0, 0xc03034f8, 0xc18e6a96, 0xc05e50b8, 0xc18d3a0e, 0x3fbf8d14, 0x3da57a00, 0x40602561,
    0x414de4e4, 0x40c3a02c, 0xc191b38f, 0xc098325e, 0x4083fd67, 0xc1d46026, 0x40e310d3, 0xc0f705f1};

class GgmlParityTest : public testing::TargetTest {};

TEST_P(GgmlParityTest, MatMulBitIdenticalToGgml) {
  const int64_t target = GetParam();
  if (target != HWY_AVX2 && target != HWY_AVX3 && target != HWY_AVX3_DL) {
    GTEST_SKIP() << "bit-exactness is defined for the x86 AVX2/AVX-512 kernels";
  }
  const auto x = GoldenActivations(kN, kCols);
  testing::ForEachTileWidth([&] {
    for (DType t : {DType::kQ4_1, DType::kQ8_0}) {
      const uint32_t* want = t == DType::kQ4_1 ? kQ4_1 : kQ8_0;
      const auto w = GoldenWeights(t, kRows, kCols);
      const Weight weight{t, kRows, kCols, w.data()};
      for (int threads : {1, 2}) {
        auto backend = MakeCpuBackend(threads);
        // All rows at once (prefill tiles) and one at a time (decode path).
        std::vector<float> y(kN * kRows);
        backend->MatMul(weight, x.data(), kN, y.data());
        for (int64_t i = 0; i < kN; ++i) {
          std::vector<float> y1(kRows);
          backend->MatMul(weight, x.data() + i * kCols, 1, y1.data());
          for (int64_t r = 0; r < kRows; ++r) {
            EXPECT_EQ(F32ToBits(y[i * kRows + r]), want[i * kRows + r])
                << Info(t).name << " n=3 i=" << i << " r=" << r;
            EXPECT_EQ(F32ToBits(y1[r]), want[i * kRows + r])
                << Info(t).name << " n=1 i=" << i << " r=" << r;
          }
        }
      }
    }
  });
}

// The decode path (n = 1) is pinned to ggml's bits above; every batched
// shape (row tiles, column tiles and their remainders, the prefill tiling)
// must return those very bits for each row of x, on every target.
TEST_P(GgmlParityTest, EveryBatchSizeMatchesOneRowBits) {
  testing::ForEachTileWidth([&] {
    std::mt19937 rng(7);
    for (DType t : {DType::kQ4_0, DType::kQ4_1, DType::kQ8_0}) {
      for (const int64_t cols : {int64_t{576}, int64_t{1536}}) {
        for (const int64_t rows :
             {int64_t{1}, int64_t{7}, int64_t{13}, int64_t{36}, int64_t{203}}) {
          const auto w = testing::RandomWeights(rng, t, rows, cols);
          const Weight weight{t, rows, cols, w.data()};
          const int64_t n_max = 50;
          const auto x = testing::RandomFloats(rng, static_cast<size_t>(n_max * cols));
          auto backend = MakeCpuBackend(2);
          std::vector<float> want(static_cast<size_t>(n_max * rows));
          for (int64_t i = 0; i < n_max; ++i) {
            backend->MatMul(weight, x.data() + i * cols, 1, want.data() + i * rows);
          }
          for (const int64_t n : {2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 50}) {
            std::vector<float> y(static_cast<size_t>(n * rows));
            backend->MatMul(weight, x.data(), n, y.data());
            for (int64_t j = 0; j < n * rows; ++j) {
              ASSERT_EQ(F32ToBits(y[j]), F32ToBits(want[j]))
                  << Info(t).name << " cols=" << cols << " rows=" << rows << " n=" << n
                  << " i=" << j / rows << " r=" << j % rows;
            }
          }
        }
      }
    }
  });
}

INSTANTIATE_TEST_SUITE_P(AllTargets, GgmlParityTest, ::testing::ValuesIn(SimdTargets()),
                         testing::TargetParamName);

}  // namespace
}  // namespace mnemo::kernels::cpu
