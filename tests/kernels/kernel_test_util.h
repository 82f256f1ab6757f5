// Random weights and activations for the kernel tests, plus the target
// parameterization shared by the suites.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"
#include "kernels/dtype.h"

namespace mnemo::kernels::cpu::testing {

inline std::vector<float> RandomFloats(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  // A few outliers, as real activations have.
  std::uniform_int_distribution<size_t> pick(0, n - 1);
  for (size_t i = 0; i < n / 97; ++i) v[pick(rng)] *= 8.0f;
  return v;
}

inline uint16_t RandomHalf(std::mt19937& rng, float lo, float hi, bool random_sign) {
  std::uniform_real_distribution<float> dist(lo, hi);
  float f = dist(rng);
  if (random_sign && (rng() & 1)) f = -f;
  return F32ToF16(f);
}

// rows x cols weights of `type`: random quants, sane scales.
inline std::vector<uint8_t> RandomWeights(std::mt19937& rng, DType type, int64_t rows,
                                          int64_t cols) {
  const size_t row_bytes = RowBytes(type, cols);
  std::vector<uint8_t> out(row_bytes * static_cast<size_t>(rows));
  for (uint8_t& b : out) b = static_cast<uint8_t>(rng());
  const int64_t n_blocks = rows * cols / Info(type).block_elems;
  switch (type) {
    case DType::kF32: {
      auto v = RandomFloats(rng, static_cast<size_t>(rows * cols), 0.1f);
      std::memcpy(out.data(), v.data(), out.size());
      break;
    }
    case DType::kF16:
    case DType::kBF16: {
      auto v = RandomFloats(rng, static_cast<size_t>(rows * cols), 0.1f);
      auto* h = reinterpret_cast<uint16_t*>(out.data());
      for (size_t i = 0; i < v.size(); ++i) h[i] = type == DType::kF16 ? F32ToF16(v[i]) : F32ToBF16(v[i]);
      break;
    }
    case DType::kQ4_0: {
      auto* b = reinterpret_cast<BlockQ4_0*>(out.data());
      for (int64_t i = 0; i < n_blocks; ++i) b[i].d = RandomHalf(rng, 0.001f, 0.02f, true);
      break;
    }
    case DType::kQ4_1: {
      auto* b = reinterpret_cast<BlockQ4_1*>(out.data());
      for (int64_t i = 0; i < n_blocks; ++i) {
        b[i].d = RandomHalf(rng, 0.001f, 0.02f, false);
        b[i].m = RandomHalf(rng, 0.0f, 0.15f, true);
      }
      break;
    }
    case DType::kQ8_0: {
      auto* b = reinterpret_cast<BlockQ8_0*>(out.data());
      for (int64_t i = 0; i < n_blocks; ++i) b[i].d = RandomHalf(rng, 0.0001f, 0.002f, true);
      break;
    }
    case DType::kQ4_K: {
      auto* b = reinterpret_cast<BlockQ4_K*>(out.data());
      for (int64_t i = 0; i < n_blocks; ++i) {
        b[i].d = RandomHalf(rng, 0.0001f, 0.002f, false);
        b[i].dmin = RandomHalf(rng, 0.0001f, 0.002f, false);
      }
      break;
    }
    case DType::kQ6_K: {
      auto* b = reinterpret_cast<BlockQ6_K*>(out.data());
      for (int64_t i = 0; i < n_blocks; ++i) b[i].d = RandomHalf(rng, 0.0001f, 0.002f, true);
      break;
    }
    default:
      ADD_FAILURE() << "not a weight type";
  }
  return out;
}

inline std::vector<float> Dequantize(DType type, const uint8_t* data, int64_t rows, int64_t cols) {
  std::vector<float> out(static_cast<size_t>(rows * cols));
  const size_t row_bytes = RowBytes(type, cols);
  for (int64_t r = 0; r < rows; ++r) {
    ref::DequantizeRow(type, data + r * row_bytes, out.data() + r * cols, cols);
  }
  return out;
}

inline constexpr DType kWeightTypes[] = {DType::kF32,  DType::kF16,  DType::kBF16,
                                         DType::kQ4_0, DType::kQ4_1, DType::kQ8_0,
                                         DType::kQ4_K, DType::kQ6_K};

// Tests parameterized by SIMD target: each runs with dispatch pinned to it.
class TargetTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override { SetSimdTargetForTest(GetParam()); }
  void TearDown() override { SetSimdTargetForTest(0); }
};

// Runs f with the 256-bit and then the 512-bit tiles of the matmuls and
// the decode attention (WideTiles), which must give the same bits. Targets
// without 512-bit vectors take the same path both times.
template <class F>
void ForEachTileWidth(F&& f) {
  for (const int wide : {0, 1}) {
    SCOPED_TRACE(wide != 0 ? "512-bit tiles" : "256-bit tiles");
    SetWideTilesForTest(wide);
    f();
    if (::testing::Test::HasFatalFailure()) break;
  }
  SetWideTilesForTest(-1);
}

inline std::string TargetParamName(const ::testing::TestParamInfo<int64_t>& info) {
  std::string name = SimdTargetName(info.param);
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

}  // namespace mnemo::kernels::cpu::testing
