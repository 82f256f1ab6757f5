// Scalar reference kernels: the definition of what every SIMD kernel must
// compute. Written for clarity, not speed; formulas follow GGML's.
#include <cmath>
#include <cstring>
#include <vector>

#include "common/check.h"
#include "kernels/cpu/quants.h"

namespace mnemo::kernels::cpu {
namespace {

size_t RoundUp64(size_t n) { return (n + 63) & ~size_t{63}; }

// Round half to even, as _mm256_round_ps(_MM_ROUND_NEAREST) and GGML's
// nearest_int() do (the default FP environment rounds to nearest even).
int RoundNearestEven(float v) { return static_cast<int>(std::nearbyintf(v)); }

float AbsMax(const float* x, int n) {
  float amax = 0.0f;
  for (int j = 0; j < n; ++j) amax = std::fmax(amax, std::fabs(x[j]));
  return amax;
}

void QuantizeQ8_0(const float* x, BlockQ8_0* y, int64_t n) {
  for (int64_t i = 0; i < n / kQK; ++i, x += kQK) {
    const float amax = AbsMax(x, kQK);
    // llama.cpp's x86 build multiplies by 127/amax (not 1/d); keep that.
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    y[i].d = F32ToF16(d);
    for (int j = 0; j < kQK; ++j) y[i].qs[j] = static_cast<int8_t>(RoundNearestEven(x[j] * id));
  }
}

void QuantizeQ8_1(const float* x, BlockQ8_1* y, int64_t n) {
  for (int64_t i = 0; i < n / kQK; ++i, x += kQK) {
    const float amax = AbsMax(x, kQK);
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    y[i].d = F32ToF16(d);
    int sum = 0;
    for (int j = 0; j < kQK; ++j) {
      const int q = RoundNearestEven(x[j] * id);
      y[i].qs[j] = static_cast<int8_t>(q);
      sum += q;
    }
    // The unrounded d, as llama.cpp's AVX2 quantizer.
    y[i].s = F32ToF16(d * static_cast<float>(sum));
  }
}

void QuantizeQ8_K(const float* x, BlockQ8_K* y, int64_t n) {
  for (int64_t i = 0; i < n / kQKK; ++i, x += kQKK) {
    float max = 0.0f;
    float amax = 0.0f;
    for (int j = 0; j < kQKK; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) {
        amax = ax;
        max = x[j];
      }
    }
    if (amax == 0.0f) {
      std::memset(&y[i], 0, sizeof(BlockQ8_K));
      continue;
    }
    const float iscale = -127.0f / max;
    for (int j = 0; j < kQKK; ++j) {
      const int v = RoundNearestEven(iscale * x[j]);
      y[i].qs[j] = static_cast<int8_t>(v < 127 ? v : 127);
    }
    for (int j = 0; j < kQKK / 16; ++j) {
      int sum = 0;
      for (int k = 0; k < 16; ++k) sum += y[i].qs[j * 16 + k];
      y[i].bsums[j] = static_cast<int16_t>(sum);
    }
    y[i].d = 1.0f / iscale;
  }
}

}  // namespace

DType VecDotType(DType weight) {
  switch (weight) {
    case DType::kQ4_0:
    case DType::kQ8_0:
      return DType::kQ8_0;
    case DType::kQ4_1:
      return DType::kQ8_1;
    case DType::kQ4_K:
    case DType::kQ6_K:
      return DType::kQ8_K;
    case DType::kF16:
      return DType::kF16;
    case DType::kBF16:
      return DType::kBF16;
    default:
      return DType::kF32;
  }
}

ActFormat MakeActFormat(DType act_type, int64_t cols) {
  ActFormat f;
  f.type = act_type;
  f.cols = cols;
  switch (act_type) {
    case DType::kQ8_0:
    case DType::kQ8_1:
      MNEMO_CHECK(cols % kQK == 0);
      f.blocks = cols / kQK;
      f.d_offset = RoundUp64(static_cast<size_t>(cols));
      f.s_offset = f.d_offset + RoundUp64(static_cast<size_t>(f.blocks) * 4);
      f.ds_offset = f.s_offset + RoundUp64(static_cast<size_t>(f.blocks) * 4);
      f.row_bytes = f.ds_offset + RoundUp64(static_cast<size_t>(f.blocks) * 8);
      break;
    case DType::kQ8_K:
      MNEMO_CHECK(cols % kQKK == 0);
      f.blocks = cols / kQKK;
      f.d_offset = RoundUp64(static_cast<size_t>(cols));
      f.s_offset = f.d_offset + RoundUp64(static_cast<size_t>(f.blocks) * 4);
      f.row_bytes = f.s_offset + RoundUp64(static_cast<size_t>(f.blocks) * 16 * 2);
      break;
    case DType::kF16:
    case DType::kBF16:
      f.row_bytes = RoundUp64(static_cast<size_t>(cols) * 2);
      break;
    case DType::kF32:
      f.row_bytes = RoundUp64(static_cast<size_t>(cols) * 4);
      break;
    default:
      MNEMO_CHECK_MSG(false, "not an activation type");
  }
  return f;
}

namespace ref {

void DequantizeRow(DType type, const void* src, float* dst, int64_t n) {
  MNEMO_CHECK(n % Info(type).block_elems == 0);
  switch (type) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case DType::kF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = F16ToF32(s[i]);
      return;
    }
    case DType::kBF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = BF16ToF32(s[i]);
      return;
    }
    case DType::kQ4_0: {
      const auto* b = static_cast<const BlockQ4_0*>(src);
      for (int64_t i = 0; i < n / kQK; ++i, dst += kQK) {
        const float d = F16ToF32(b[i].d);
        for (int j = 0; j < kQK / 2; ++j) {
          dst[j] = static_cast<float>((b[i].qs[j] & 0xF) - 8) * d;
          dst[j + kQK / 2] = static_cast<float>((b[i].qs[j] >> 4) - 8) * d;
        }
      }
      return;
    }
    case DType::kQ4_1: {
      const auto* b = static_cast<const BlockQ4_1*>(src);
      for (int64_t i = 0; i < n / kQK; ++i, dst += kQK) {
        const float d = F16ToF32(b[i].d);
        const float m = F16ToF32(b[i].m);
        for (int j = 0; j < kQK / 2; ++j) {
          dst[j] = static_cast<float>(b[i].qs[j] & 0xF) * d + m;
          dst[j + kQK / 2] = static_cast<float>(b[i].qs[j] >> 4) * d + m;
        }
      }
      return;
    }
    case DType::kQ8_0: {
      const auto* b = static_cast<const BlockQ8_0*>(src);
      for (int64_t i = 0; i < n / kQK; ++i, dst += kQK) {
        const float d = F16ToF32(b[i].d);
        for (int j = 0; j < kQK; ++j) dst[j] = static_cast<float>(b[i].qs[j]) * d;
      }
      return;
    }
    case DType::kQ8_1: {
      const auto* b = static_cast<const BlockQ8_1*>(src);
      for (int64_t i = 0; i < n / kQK; ++i, dst += kQK) {
        const float d = F16ToF32(b[i].d);
        for (int j = 0; j < kQK; ++j) dst[j] = static_cast<float>(b[i].qs[j]) * d;
      }
      return;
    }
    case DType::kQ4_K: {
      const auto* b = static_cast<const BlockQ4_K*>(src);
      for (int64_t i = 0; i < n / kQKK; ++i, dst += kQKK) {
        uint8_t q[kQKK], sc[8], mn[8];
        UnpackQ4_K(b[i], q, sc, mn);
        const float d = F16ToF32(b[i].d);
        const float dmin = F16ToF32(b[i].dmin);
        for (int j = 0; j < kQKK; ++j) {
          const int s = j / 32;
          dst[j] = d * sc[s] * q[j] - dmin * mn[s];
        }
      }
      return;
    }
    case DType::kQ6_K: {
      const auto* b = static_cast<const BlockQ6_K*>(src);
      for (int64_t i = 0; i < n / kQKK; ++i, dst += kQKK) {
        int8_t q[kQKK];
        UnpackQ6_K(b[i], q);
        const float d = F16ToF32(b[i].d);
        for (int j = 0; j < kQKK; ++j) dst[j] = d * b[i].scales[j / 16] * q[j];
      }
      return;
    }
    case DType::kQ8_K: {
      const auto* b = static_cast<const BlockQ8_K*>(src);
      for (int64_t i = 0; i < n / kQKK; ++i, dst += kQKK) {
        for (int j = 0; j < kQKK; ++j) dst[j] = b[i].d * b[i].qs[j];
      }
      return;
    }
  }
  MNEMO_CHECK_MSG(false, "unknown dtype");
}

void QuantizeRow(DType type, const float* src, void* dst, int64_t n) {
  MNEMO_CHECK(n % Info(type).block_elems == 0);
  switch (type) {
    case DType::kQ8_0:
      return QuantizeQ8_0(src, static_cast<BlockQ8_0*>(dst), n);
    case DType::kQ8_1:
      return QuantizeQ8_1(src, static_cast<BlockQ8_1*>(dst), n);
    case DType::kQ8_K:
      return QuantizeQ8_K(src, static_cast<BlockQ8_K*>(dst), n);
    case DType::kF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = F32ToF16(src[i]);
      return;
    }
    case DType::kBF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = F32ToBF16(src[i]);
      return;
    }
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    default:
      MNEMO_CHECK_MSG(false, "not an activation type");
  }
}

float VecDot(DType weight_type, const void* w_row, const void* x_row, int64_t n) {
  switch (weight_type) {
    case DType::kF32:
    case DType::kF16:
    case DType::kBF16: {
      // Both sides are plain elements; accumulate in double like GGML's
      // generic f16 dot.
      std::vector<float> w(static_cast<size_t>(n)), x(static_cast<size_t>(n));
      DequantizeRow(weight_type, w_row, w.data(), n);
      DequantizeRow(weight_type, x_row, x.data(), n);
      double sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(w[i]) * x[i];
      return static_cast<float>(sum);
    }
    case DType::kQ4_0: {
      const auto* w = static_cast<const BlockQ4_0*>(w_row);
      const auto* x = static_cast<const BlockQ8_0*>(x_row);
      float sum = 0;
      for (int64_t i = 0; i < n / kQK; ++i) {
        int sumi = 0;
        for (int j = 0; j < kQK / 2; ++j) {
          sumi += ((w[i].qs[j] & 0xF) - 8) * x[i].qs[j];
          sumi += ((w[i].qs[j] >> 4) - 8) * x[i].qs[j + kQK / 2];
        }
        sum += static_cast<float>(sumi) * (F16ToF32(w[i].d) * F16ToF32(x[i].d));
      }
      return sum;
    }
    case DType::kQ4_1: {
      const auto* w = static_cast<const BlockQ4_1*>(w_row);
      const auto* x = static_cast<const BlockQ8_1*>(x_row);
      float sum = 0;
      for (int64_t i = 0; i < n / kQK; ++i) {
        int sumi = 0;
        for (int j = 0; j < kQK / 2; ++j) {
          sumi += (w[i].qs[j] & 0xF) * x[i].qs[j];
          sumi += (w[i].qs[j] >> 4) * x[i].qs[j + kQK / 2];
        }
        sum += static_cast<float>(sumi) * (F16ToF32(w[i].d) * F16ToF32(x[i].d)) +
               F16ToF32(w[i].m) * F16ToF32(x[i].s);
      }
      return sum;
    }
    case DType::kQ8_0: {
      const auto* w = static_cast<const BlockQ8_0*>(w_row);
      const auto* x = static_cast<const BlockQ8_0*>(x_row);
      float sum = 0;
      for (int64_t i = 0; i < n / kQK; ++i) {
        int sumi = 0;
        for (int j = 0; j < kQK; ++j) sumi += w[i].qs[j] * x[i].qs[j];
        sum += static_cast<float>(sumi) * (F16ToF32(w[i].d) * F16ToF32(x[i].d));
      }
      return sum;
    }
    case DType::kQ4_K: {
      const auto* w = static_cast<const BlockQ4_K*>(w_row);
      const auto* x = static_cast<const BlockQ8_K*>(x_row);
      float sum = 0;
      for (int64_t i = 0; i < n / kQKK; ++i) {
        uint8_t q[kQKK], sc[8], mn[8];
        UnpackQ4_K(w[i], q, sc, mn);
        int sumi = 0;
        for (int s = 0; s < 8; ++s) {
          int sub = 0;
          for (int l = 0; l < 32; ++l) sub += q[s * 32 + l] * x[i].qs[s * 32 + l];
          sumi += sc[s] * sub;
        }
        int summ = 0;
        for (int j = 0; j < kQKK / 16; ++j) summ += x[i].bsums[j] * mn[j / 2];
        sum += F16ToF32(w[i].d) * x[i].d * static_cast<float>(sumi) -
               F16ToF32(w[i].dmin) * x[i].d * static_cast<float>(summ);
      }
      return sum;
    }
    case DType::kQ6_K: {
      const auto* w = static_cast<const BlockQ6_K*>(w_row);
      const auto* x = static_cast<const BlockQ8_K*>(x_row);
      float sum = 0;
      for (int64_t i = 0; i < n / kQKK; ++i) {
        int8_t q[kQKK];
        UnpackQ6_K(w[i], q);
        int sumi = 0;
        for (int s = 0; s < 16; ++s) {
          int sub = 0;
          for (int l = 0; l < 16; ++l) sub += q[s * 16 + l] * x[i].qs[s * 16 + l];
          sumi += w[i].scales[s] * sub;
        }
        sum += F16ToF32(w[i].d) * x[i].d * static_cast<float>(sumi);
      }
      return sum;
    }
    default:
      MNEMO_CHECK_MSG(false, "not a weight type");
  }
  return 0;
}

void BlocksToActRow(const ActFormat& f, const void* blocks, void* row) {
  auto* base = static_cast<uint8_t*>(row);
  auto* qs = reinterpret_cast<int8_t*>(base);
  auto* d = reinterpret_cast<float*>(base + f.d_offset);
  auto* ds = reinterpret_cast<float*>(base + f.ds_offset);
  switch (f.type) {
    case DType::kQ8_0: {
      const auto* b = static_cast<const BlockQ8_0*>(blocks);
      auto* s = reinterpret_cast<float*>(base + f.s_offset);
      for (int64_t i = 0; i < f.blocks; ++i) {
        std::memcpy(qs + i * kQK, b[i].qs, kQK);
        d[i] = F16ToF32(b[i].d);
        int sum = 0;
        for (int j = 0; j < kQK; ++j) sum += b[i].qs[j];
        s[i] = d[i] * static_cast<float>(sum);
        ds[2 * i] = d[i];
        ds[2 * i + 1] = s[i];
      }
      return;
    }
    case DType::kQ8_1: {
      const auto* b = static_cast<const BlockQ8_1*>(blocks);
      auto* s = reinterpret_cast<float*>(base + f.s_offset);
      for (int64_t i = 0; i < f.blocks; ++i) {
        std::memcpy(qs + i * kQK, b[i].qs, kQK);
        d[i] = F16ToF32(b[i].d);
        s[i] = F16ToF32(b[i].s);
        ds[2 * i] = d[i];
        ds[2 * i + 1] = s[i];
      }
      return;
    }
    case DType::kQ8_K: {
      const auto* b = static_cast<const BlockQ8_K*>(blocks);
      auto* bsums = reinterpret_cast<int16_t*>(base + f.s_offset);
      for (int64_t i = 0; i < f.blocks; ++i) {
        std::memcpy(qs + i * kQKK, b[i].qs, kQKK);
        d[i] = b[i].d;
        std::memcpy(bsums + i * 16, b[i].bsums, 32);
      }
      return;
    }
    case DType::kF16:
    case DType::kBF16:
      std::memcpy(row, blocks, static_cast<size_t>(f.cols) * 2);
      return;
    case DType::kF32:
      std::memcpy(row, blocks, static_cast<size_t>(f.cols) * 4);
      return;
    default:
      MNEMO_CHECK_MSG(false, "not an activation type");
  }
}

}  // namespace ref
}  // namespace mnemo::kernels::cpu
