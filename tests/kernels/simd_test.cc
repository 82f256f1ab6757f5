// Every SIMD kernel against its scalar reference, on every SIMD target this
// CPU can run, with tolerances scaled by the magnitude of the result.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"
#include "tests/kernels/kernel_test_util.h"

namespace mnemo::kernels::cpu {
namespace {

using testing::Dequantize;
using testing::RandomFloats;
using testing::RandomWeights;
using testing::TargetTest;

struct AlignedBuf {
  explicit AlignedBuf(size_t n) : bytes(n + 64, 0) {}
  uint8_t* data() {
    return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(bytes.data()) + 63) & ~uintptr_t{63});
  }
  std::vector<uint8_t> bytes;
};

// Quantizes n rows of x to the internal layout with the reference.
AlignedBuf RefActRows(const ActFormat& f, const float* x, int64_t n) {
  AlignedBuf out(f.row_bytes * static_cast<size_t>(n));
  std::vector<uint8_t> blocks(RowBytes(f.type, f.cols));
  for (int64_t i = 0; i < n; ++i) {
    ref::QuantizeRow(f.type, x + i * f.cols, blocks.data(), f.cols);
    ref::BlocksToActRow(f, blocks.data(), out.data() + i * f.row_bytes);
  }
  return out;
}

class SimdTest : public TargetTest {};

TEST_P(SimdTest, QuantizeActRowMatchesReference) {
  std::mt19937 rng(10);
  for (DType t : {DType::kQ8_0, DType::kQ8_1, DType::kQ8_K, DType::kF16, DType::kBF16, DType::kF32}) {
    for (int64_t cols : {256, 1536}) {
      const ActFormat f = MakeActFormat(t, cols);
      std::vector<float> x = RandomFloats(rng, static_cast<size_t>(cols), 3.0f);
      for (int j = 0; j < 32; ++j) x[32 + j] = 0.0f;  // a zero block
      x[100] = -1e-9f;                                // a tiny value (x has 256 or more)
      AlignedBuf got(f.row_bytes);
      QuantizeActRow(f, x.data(), got.data());
      AlignedBuf want = RefActRows(f, x.data(), 1);
      const size_t elem = t == DType::kF32 ? 4 : (t == DType::kF16 || t == DType::kBF16) ? 2 : 1;
      ASSERT_EQ(0, std::memcmp(got.data(), want.data(), static_cast<size_t>(cols) * elem))
          << Info(t).name << " quants differ, cols=" << cols;
      if (elem == 1) {
        const size_t d_bytes = static_cast<size_t>(f.blocks) * 4;
        EXPECT_EQ(0, std::memcmp(got.data() + f.d_offset, want.data() + f.d_offset, d_bytes))
            << Info(t).name << " scales differ";
        const size_t s_bytes = t == DType::kQ8_K ? static_cast<size_t>(f.blocks) * 32 : d_bytes;
        EXPECT_EQ(0, std::memcmp(got.data() + f.s_offset, want.data() + f.s_offset, s_bytes))
            << Info(t).name << " sums differ";
        if (t != DType::kQ8_K) {
          EXPECT_EQ(0, std::memcmp(got.data() + f.ds_offset, want.data() + f.ds_offset, 2 * d_bytes))
              << Info(t).name << " pairs differ";
        }
      }
    }
  }
}

TEST_P(SimdTest, GemmMatchesReferenceVecDot) {
  std::mt19937 rng(11);
  for (DType wt : testing::kWeightTypes) {
    const bool k_quant = Info(wt).block_elems == 256;
    const std::vector<int64_t> col_sizes =
        k_quant ? std::vector<int64_t>{256, 768} : std::vector<int64_t>{32, 96, 576};
    for (int64_t cols : col_sizes) {
      const int64_t rows = 37;  // not a multiple of the 4-row tile
      const int64_t n = 7;      // not a multiple of the activation tile
      auto w = RandomWeights(rng, wt, rows, cols);
      auto x = RandomFloats(rng, static_cast<size_t>(n * cols));
      const ActFormat f = MakeActFormat(VecDotType(wt), cols);
      AlignedBuf act = RefActRows(f, x.data(), n);
      // Reference: blocks straight from ref::QuantizeRow.
      std::vector<uint8_t> xq(RowBytes(VecDotType(wt), cols));
      const auto wf = Dequantize(wt, w.data(), rows, cols);
      std::vector<float> want(static_cast<size_t>(n * rows)), mag(want.size());
      for (int64_t i = 0; i < n; ++i) {
        ref::QuantizeRow(VecDotType(wt), x.data() + i * cols, xq.data(), cols);
        const auto xf = Dequantize(VecDotType(wt), xq.data(), 1, cols);
        for (int64_t r = 0; r < rows; ++r) {
          want[i * rows + r] = ref::VecDot(wt, w.data() + r * RowBytes(wt, cols), xq.data(), cols);
          double m = 0;
          for (int64_t j = 0; j < cols; ++j) m += std::fabs(wf[r * cols + j] * xf[j]);
          mag[i * rows + r] = static_cast<float>(m);
        }
      }
      GemmArgs args;
      args.w_type = wt;
      args.w = w.data();
      args.w_row_bytes = RowBytes(wt, cols);
      args.x = act.data();
      args.format = f;
      // Whole range, then sub-ranges with odd offsets in both dimensions.
      const int64_t ranges[][4] = {{0, rows, 0, n}, {1, 6, 2, 3}, {5, 37, 0, 1}, {0, 4, 3, 7}};
      for (const auto& rg : ranges) {
        std::vector<float> y(static_cast<size_t>(n * rows), NAN);
        args.y = y.data();
        args.ldy = rows;
        Gemm(args, rg[0], rg[1], rg[2], rg[3]);
        for (int64_t i = rg[2]; i < rg[3]; ++i) {
          for (int64_t r = rg[0]; r < rg[1]; ++r) {
            const size_t k = static_cast<size_t>(i * rows + r);
            ASSERT_NEAR(y[k], want[k], 1e-5f * mag[k] + 1e-6f)
                << Info(wt).name << " cols=" << cols << " r=" << r << " i=" << i;
          }
        }
      }
    }
  }
}

TEST_P(SimdTest, RmsNormMatchesReference) {
  std::mt19937 rng(12);
  for (int64_t dim : {1, 7, 64, 576, 1000}) {
    auto x = RandomFloats(rng, static_cast<size_t>(dim));
    auto gain = RandomFloats(rng, static_cast<size_t>(dim));
    std::vector<float> y(static_cast<size_t>(dim));
    RmsNormRow(x.data(), gain.data(), dim, 1e-5f, y.data());
    double ss = 0;
    for (float v : x) ss += static_cast<double>(v) * v;
    const double scale = 1.0 / std::sqrt(ss / dim + 1e-5);
    for (int64_t i = 0; i < dim; ++i) {
      const double want = x[i] * scale * gain[i];
      EXPECT_NEAR(y[i], want, 1e-5 * std::fabs(want) + 1e-6) << "dim=" << dim << " i=" << i;
    }
    // In place.
    std::vector<float> z = x;
    RmsNormRow(z.data(), gain.data(), dim, 1e-5f, z.data());
    for (int64_t i = 0; i < dim; ++i) EXPECT_EQ(z[i], y[i]);
  }
}

TEST_P(SimdTest, RopeMatchesReferenceBothStyles) {
  std::mt19937 rng(13);
  for (RopeStyle style : {RopeStyle::kAdjacent, RopeStyle::kHalves}) {
    for (int32_t head_dim : {64, 12}) {
      for (int32_t rot_dims : {head_dim, head_dim / 2}) {
        const int32_t n_heads = 3;
        const int32_t half = rot_dims / 2;
        auto x = RandomFloats(rng, static_cast<size_t>(n_heads * head_dim));
        std::vector<float> cs(static_cast<size_t>(rot_dims));
        for (int32_t i = 0; i < half; ++i) {
          const float theta = 17.0f * std::pow(10000.0f, -2.0f * i / rot_dims);
          cs[i] = std::cos(theta);
          cs[half + i] = std::sin(theta);
        }
        std::vector<float> want = x;
        for (int32_t h = 0; h < n_heads; ++h) {
          float* v = want.data() + h * head_dim;
          for (int32_t i = 0; i < half; ++i) {
            const int32_t i0 = style == RopeStyle::kAdjacent ? 2 * i : i;
            const int32_t i1 = style == RopeStyle::kAdjacent ? 2 * i + 1 : i + half;
            const float a = v[i0], b = v[i1];
            v[i0] = a * cs[i] - b * cs[half + i];
            v[i1] = a * cs[half + i] + b * cs[i];
          }
        }
        RopeRow(x.data(), n_heads, head_dim, rot_dims, cs.data(), style);
        for (size_t i = 0; i < x.size(); ++i) {
          EXPECT_NEAR(x[i], want[i], 1e-5f * (std::fabs(want[i]) + 1.0f))
              << "style=" << static_cast<int>(style) << " head_dim=" << head_dim
              << " rot=" << rot_dims << " i=" << i;
        }
      }
    }
  }
}

TEST_P(SimdTest, SiluMulAddSoftmaxMatchReference) {
  std::mt19937 rng(14);
  for (int64_t n : {1, 5, 64, 1537}) {
    auto g = RandomFloats(rng, static_cast<size_t>(n), 4.0f);
    g[0] = -100.0f;  // exp(-g) overflows: silu -> -0
    auto u = RandomFloats(rng, static_cast<size_t>(n));
    std::vector<float> got = g;
    SiluMul(got.data(), u.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const double want = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
      EXPECT_NEAR(got[i], want, 1e-5 * std::fabs(want) + 1e-6) << "silu n=" << n << " i=" << i;
    }
    std::vector<float> sum = g;
    AddInPlace(sum.data(), u.data(), n);
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(sum[i], g[i] + u[i]);
    std::vector<float> sm = g;
    Softmax(sm.data(), n);
    double mx = -INFINITY, total = 0;
    for (float v : g) mx = std::fmax(mx, v);
    for (float v : g) total += std::exp(v - mx);
    for (int64_t i = 0; i < n; ++i) {
      const double want = std::exp(g[i] - mx) / total;
      EXPECT_NEAR(sm[i], want, 1e-5 * want + 1e-7) << "softmax n=" << n << " i=" << i;
    }
  }
}

TEST_P(SimdTest, HalfConversionMatchesScalar) {
  std::mt19937 rng(15);
  for (int64_t n : {1, 9, 64, 333}) {
    auto x = RandomFloats(rng, static_cast<size_t>(n), 100.0f);
    x[0] = 1.0f + 1.0f / 2048;  // a tie
    if (n > 4) {
      x[1] = 1e-6f;    // fp16 subnormal
      x[2] = 1e6f;     // overflow
      x[3] = -0.0f;
    }
    std::vector<uint16_t> h(static_cast<size_t>(n));
    F32ToF16Row(x.data(), h.data(), n);
    std::vector<float> back(static_cast<size_t>(n));
    F16ToF32Row(h.data(), back.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(h[i], F32ToF16(x[i])) << i;
      EXPECT_EQ(F32ToBits(back[i]), F32ToBits(F16ToF32(h[i]))) << i;
    }
  }
}

// The sampler's greedy pick: the lowest index of the largest value, NaN never
// winning, -inf never beating the start; lengths around every vector width.
TEST_P(SimdTest, ArgmaxMatchesScalarScan) {
  auto scalar = [](const std::vector<float>& v) {
    int64_t id = 0;
    float best = -INFINITY;
    for (size_t i = 0; i < v.size(); ++i) {
      if (v[i] > best) {
        best = v[i];
        id = static_cast<int64_t>(i);
      }
    }
    return id;
  };
  std::mt19937 rng(16);
  std::uniform_int_distribution<int> small(-3, 3);  // many ties
  for (int64_t n = 0; n <= 70; ++n) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> v(static_cast<size_t>(n));
      for (float& f : v) f = static_cast<float>(small(rng));
      if (n > 0 && trial % 4 == 1) v[rng() % n] = NAN;
      if (n > 0 && trial % 4 == 2) v[rng() % n] = INFINITY;
      if (trial % 4 == 3) std::fill(v.begin(), v.end(), -INFINITY);
      if (n > 1 && trial == 7) v[rng() % n] = NAN, v[rng() % n] = -INFINITY;
      ASSERT_EQ(ArgmaxF32(v.data(), n), scalar(v)) << "n=" << n << " trial=" << trial;
    }
  }
  // A vocabulary-sized row whose maximum sits in the middle and again at the end.
  auto big = RandomFloats(rng, 49152, 10.0f);
  big[30001] = 1e30f;
  big[49151] = 1e30f;
  EXPECT_EQ(ArgmaxF32(big.data(), static_cast<int64_t>(big.size())), 30001);
  std::vector<float> nans(100, NAN);
  EXPECT_EQ(ArgmaxF32(nans.data(), 100), 0);
}

INSTANTIATE_TEST_SUITE_P(AllTargets, SimdTest, ::testing::ValuesIn(SimdTargets()),
                         testing::TargetParamName);

}  // namespace
}  // namespace mnemo::kernels::cpu
