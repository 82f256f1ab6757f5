// The scalar references themselves: type table, conversions, round trips,
// and reference dot products against dot products of dequantized values.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/quants.h"
#include "kernels/dtype.h"
#include "tests/kernels/kernel_test_util.h"

namespace mnemo::kernels::cpu {
namespace {

using testing::Dequantize;
using testing::RandomFloats;
using testing::RandomWeights;

TEST(DTypeTest, TableMatchesGgml) {
  EXPECT_EQ(Info(DType::kQ4_0).block_bytes, 18);
  EXPECT_EQ(Info(DType::kQ4_1).block_bytes, 20);
  EXPECT_EQ(Info(DType::kQ8_0).block_bytes, 34);
  EXPECT_EQ(Info(DType::kQ8_1).block_bytes, 36);
  EXPECT_EQ(Info(DType::kQ4_K).block_bytes, 144);
  EXPECT_EQ(Info(DType::kQ6_K).block_bytes, 210);
  EXPECT_EQ(Info(DType::kQ8_K).block_bytes, 292);
  EXPECT_EQ(Info(DType::kQ4_K).block_elems, 256);
  EXPECT_EQ(Info(DType::kBF16).block_bytes, 2);
  EXPECT_EQ(Info(DType::kF32).name, "f32");
  EXPECT_EQ(GetDTypeInfo(6), nullptr);  // Q5_0: unknown to mnemo
  EXPECT_EQ(GetDTypeInfo(1000), nullptr);
  EXPECT_EQ(RowBytes(DType::kQ4_1, 576), 18u * 20u);
  EXPECT_TRUE(IsWeightType(DType::kQ4_1));
  EXPECT_TRUE(IsWeightType(DType::kBF16));
  EXPECT_FALSE(IsWeightType(DType::kQ8_K));
  EXPECT_FALSE(IsWeightType(DType::kQ8_1));
}

TEST(ConvertTest, HalfRoundTripsEveryValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(F32ToF16(f), h) << h;
  }
}

TEST(ConvertTest, HalfKnownValues) {
  EXPECT_EQ(F32ToF16(1.0f), 0x3C00);
  EXPECT_EQ(F32ToF16(-2.0f), 0xC000);
  EXPECT_EQ(F32ToF16(65504.0f), 0x7BFF);
  EXPECT_EQ(F32ToF16(1e6f), 0x7C00);           // overflow to inf
  EXPECT_EQ(F32ToF16(5.9604645e-8f), 0x0001);  // smallest subnormal
  EXPECT_EQ(F32ToF16(1.0f + 1.0f / 2048), 0x3C00);  // tie rounds to even
  EXPECT_EQ(F32ToF16(1.0f + 3.0f / 2048), 0x3C02);  // tie rounds to even (up)
  EXPECT_FLOAT_EQ(F16ToF32(0x3555), 0.33325195f);
  EXPECT_TRUE(std::isnan(F16ToF32(0x7E00)));
}

TEST(ConvertTest, BF16RoundsToNearestEven) {
  EXPECT_EQ(F32ToBF16(1.0f), 0x3F80);
  EXPECT_EQ(F32ToBits(BF16ToF32(F32ToBF16(3.14159f))), 0x40490000u);
  EXPECT_EQ(F32ToBF16(BitsToF32(0x3F808000u)), 0x3F80);  // tie to even (down)
  EXPECT_EQ(F32ToBF16(BitsToF32(0x3F818000u)), 0x3F82);  // tie to even (up)
}

TEST(QuantizeTest, Q8RoundTripsWithinHalfStep) {
  std::mt19937 rng(1);
  const int64_t n = 512;
  std::vector<float> x = RandomFloats(rng, n);
  for (int j = 0; j < 32; ++j) x[64 + j] = 0.0f;  // an all-zero block
  for (DType t : {DType::kQ8_0, DType::kQ8_1, DType::kQ8_K}) {
    std::vector<uint8_t> q(RowBytes(t, n));
    ref::QuantizeRow(t, x.data(), q.data(), n);
    std::vector<float> back(n);
    ref::DequantizeRow(t, q.data(), back.data(), n);
    const int64_t be = Info(t).block_elems;
    for (int64_t b = 0; b < n / be; ++b) {
      float amax = 0;
      for (int64_t j = 0; j < be; ++j) amax = std::fmax(amax, std::fabs(x[b * be + j]));
      const float step = amax / 127.0f;
      for (int64_t j = 0; j < be; ++j) {
        // Half a step plus the fp16 rounding of the scale.
        EXPECT_NEAR(back[b * be + j], x[b * be + j], 0.5f * step + amax * 1e-3f)
            << Info(t).name << " " << b * be + j;
      }
    }
  }
}

TEST(QuantizeTest, Q8_1SumMatchesQuants) {
  std::mt19937 rng(2);
  const int64_t n = 256;
  std::vector<float> x = RandomFloats(rng, n);
  std::vector<BlockQ8_1> q(n / 32);
  ref::QuantizeRow(DType::kQ8_1, x.data(), q.data(), n);
  for (const BlockQ8_1& b : q) {
    int sum = 0;
    for (int8_t v : b.qs) sum += v;
    EXPECT_NEAR(F16ToF32(b.s), F16ToF32(b.d) * sum, std::fabs(F16ToF32(b.s)) * 2e-3f + 1e-6f);
  }
}

TEST(QuantizeTest, Q8_KKeepsSignOfLargest) {
  std::vector<float> x(256, 0.5f);
  x[17] = -3.0f;
  BlockQ8_K b;
  ref::QuantizeRow(DType::kQ8_K, x.data(), &b, 256);
  EXPECT_EQ(b.qs[17], -127);
  EXPECT_FLOAT_EQ(b.d, 3.0f / 127.0f);
  int sum = 0;
  for (int j = 16; j < 32; ++j) sum += b.qs[j];
  EXPECT_EQ(b.bsums[1], sum);
}

// The reference dot product equals the dot product of the dequantized rows.
TEST(VecDotTest, MatchesDequantizedDot) {
  std::mt19937 rng(3);
  for (DType wt : testing::kWeightTypes) {
    for (int64_t cols : {256, 768}) {
      const DType xt = VecDotType(wt);
      auto w = RandomWeights(rng, wt, 1, cols);
      auto x = RandomFloats(rng, cols);
      std::vector<uint8_t> xq(RowBytes(xt, cols));
      ref::QuantizeRow(xt, x.data(), xq.data(), cols);
      const auto wf = Dequantize(wt, w.data(), 1, cols);
      const auto xf = Dequantize(xt, xq.data(), 1, cols);
      double expect = 0, mag = 0;
      for (int64_t j = 0; j < cols; ++j) {
        expect += static_cast<double>(wf[j]) * xf[j];
        mag += std::fabs(static_cast<double>(wf[j]) * xf[j]);
      }
      const float got = ref::VecDot(wt, w.data(), xq.data(), cols);
      // Q8_1's s is fp16-rounded: allow for it.
      EXPECT_NEAR(got, expect, 2e-3 * mag + 1e-6) << Info(wt).name << " cols=" << cols;
    }
  }
}

TEST(DequantizeTest, Q4_1AndQ4_0Layout) {
  BlockQ4_1 b{};
  b.d = F32ToF16(0.5f);
  b.m = F32ToF16(-1.0f);
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>((15 - j) << 4 | j);
  float out[32];
  ref::DequantizeRow(DType::kQ4_1, &b, out, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_FLOAT_EQ(out[j], 0.5f * j - 1.0f);
    EXPECT_FLOAT_EQ(out[16 + j], 0.5f * (15 - j) - 1.0f);
  }
  BlockQ4_0 c{};
  c.d = F32ToF16(2.0f);
  c.qs[0] = 0x0F;  // element 0 = 15 - 8, element 16 = 0 - 8
  ref::DequantizeRow(DType::kQ4_0, &c, out, 32);
  EXPECT_FLOAT_EQ(out[0], 14.0f);
  EXPECT_FLOAT_EQ(out[16], -16.0f);
}

}  // namespace
}  // namespace mnemo::kernels::cpu
