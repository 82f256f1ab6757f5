// GGML block formats, scalar fp16/bf16 conversion, and the slow scalar
// reference kernels every SIMD kernel is tested against. Also the internal
// layout of quantized activation rows that the SIMD matmul consumes.
//
// Stateless free functions; safe for concurrent use on disjoint buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels/dtype.h"

namespace mnemo::kernels::cpu {

inline constexpr int kQK = 32;    // elements per Q4_0/Q4_1/Q8_0/Q8_1 block
inline constexpr int kQKK = 256;  // elements per K-quant super-block

// Block layouts exactly as ggml-common.h; fp16 fields are raw IEEE half bits.
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQK / 2];  // element j in the low nibble of qs[j], j+16 in the high
};
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[kQK / 2];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQK];
};
struct BlockQ8_1 {
  uint16_t d;
  uint16_t s;  // d * sum(qs)
  int8_t qs[kQK];
};
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];  // 8 six-bit scales and 8 six-bit mins, packed
  uint8_t qs[kQKK / 2];
};
struct BlockQ6_K {
  uint8_t ql[kQKK / 2];
  uint8_t qh[kQKK / 4];
  int8_t scales[kQKK / 16];
  uint16_t d;
};
struct BlockQ8_K {
  float d;
  int8_t qs[kQKK];
  int16_t bsums[kQKK / 16];  // sums of groups of 16 qs
};
static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ8_1) == 36);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ6_K) == 210);
static_assert(sizeof(BlockQ8_K) == 292);

// --- Scalar conversions (IEEE round-to-nearest-even, as F16C and GGML) -------

inline float BitsToF32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t F32ToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float F16ToF32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers: move the exponent into place and rebias by a multiply.
  const float normalized = BitsToF32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: use the mantissa as the low bits of a float in [0.5, 1).
  const float denormalized = BitsToF32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? F32ToBits(denormalized) : F32ToBits(normalized));
  return BitsToF32(result);
}

inline uint16_t F32ToF16(float f) {
  // Let the FPU do the rounding: scale so the half's precision lines up with
  // the float's, add a bias that shifts out the extra mantissa bits.
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = F32ToBits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = BitsToF32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = F32ToBits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float BF16ToF32(uint16_t h) { return BitsToF32(static_cast<uint32_t>(h) << 16); }

inline uint16_t F32ToBF16(float f) {
  uint32_t u = F32ToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 64);  // quiet NaN
  return static_cast<uint16_t>((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

// Rounds f through fp16 and back, as a value stored in an fp16 field reads.
inline float RoundF16(float f) { return F16ToF32(F32ToF16(f)); }

// The activation type llama.cpp quantizes x to for a dot product with `weight`.
DType VecDotType(DType weight);

// Q4_K's packed 6-bit scale and min of sub-block j (0..7).
inline void Q4KScaleMin(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *min = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Q4_K: sub-block j of 32 uses scale/min j; within each 64-element chunk the
// low nibbles of 32 bytes come first, then the high nibbles.
inline void UnpackQ4_K(const BlockQ4_K& b, uint8_t q[kQKK], uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 8; ++j) Q4KScaleMin(j, b.scales, &sc[j], &mn[j]);
  for (int chunk = 0; chunk < 4; ++chunk) {
    for (int l = 0; l < 32; ++l) {
      q[chunk * 64 + l] = b.qs[chunk * 32 + l] & 0xF;
      q[chunk * 64 + 32 + l] = b.qs[chunk * 32 + l] >> 4;
    }
  }
}

// Q6_K: values in [-32, 31]; sub-block of 16 elements j uses scales[j].
inline void UnpackQ6_K(const BlockQ6_K& b, int8_t q[kQKK]) {
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = b.ql + half * 64;
    const uint8_t* qh = b.qh + half * 32;
    int8_t* out = q + half * 128;
    for (int l = 0; l < 32; ++l) {
      out[l + 0] = static_cast<int8_t>(((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
      out[l + 32] = static_cast<int8_t>(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
      out[l + 64] = static_cast<int8_t>(((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
      out[l + 96] = static_cast<int8_t>(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
    }
  }
}

// --- Internal activation rows -------------------------------------------------
//
// The SIMD matmul reads x quantized into this layout rather than GGML blocks:
// quants contiguous (aligned loads, no fp16 scale conversions in the inner
// loop), scales as f32 arrays. The numbers are the same as GGML's: d is the
// fp16-rounded block scale, so dot products equal llama.cpp's.
//   Q8_0: qs[cols] int8 | d[nb] f32 | s[nb] f32 = d * sum(qs) (for Q4_0's -8)
//         | ds[2*nb] f32: (d, s) pairs again, for one-load access per block
//   Q8_1: as Q8_0, with s = GGML's fp16 s
//   Q8_K: qs[cols] int8 | d[nb] f32 | bsums[nb*16] int16
//   F16, BF16: uint16[cols];  F32: float[cols]
struct ActFormat {
  DType type = DType::kF32;
  int64_t cols = 0;
  int64_t blocks = 0;
  size_t d_offset = 0;
  size_t s_offset = 0;  // s (Q8_0/Q8_1) or bsums (Q8_K)
  size_t ds_offset = 0; // (d, s) pairs (Q8_0/Q8_1)
  size_t row_bytes = 0; // multiple of 64
};
ActFormat MakeActFormat(DType act_type, int64_t cols);

// --- Scalar references (namespace ref) ----------------------------------------
namespace ref {

// dst[0..n) = the n values encoded at src (any DType). n % block_elems == 0.
void DequantizeRow(DType type, const void* src, float* dst, int64_t n);

// Encodes n values as GGML blocks of an activation type (Q8_0, Q8_1, Q8_K,
// F16, BF16 or F32), rounding as llama.cpp's x86 build does.
void QuantizeRow(DType type, const float* src, void* dst, int64_t n);

// Dot product of one weight row with x encoded (QuantizeRow) as
// VecDotType(weight_type).
float VecDot(DType weight_type, const void* w_row, const void* x_row, int64_t n);

// Converts one row of GGML activation blocks into the internal layout.
void BlocksToActRow(const ActFormat& format, const void* blocks, void* row);

}  // namespace ref
}  // namespace mnemo::kernels::cpu
