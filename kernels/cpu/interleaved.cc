// The interleaved-weight matmul (see interleaved.h): its AVX-512 VNNI kernel,
// the layout conversion, and the scalar form that defines its results.
#include "kernels/cpu/interleaved.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "common/check.h"
#include "kernels/cpu/quants.h"

#if defined(__x86_64__)
// GCC 12 warns that _mm512_cvtepi32_ps's (unused) pass-through operand,
// _mm512_undefined_ps(), may be used uninitialized: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

namespace mnemo::kernels::cpu {
namespace {

constexpr int64_t kG = kGroupRows;
// Activation rows one vector tile takes (two accumulators each in registers,
// beside the block's eight weight vectors).
constexpr int kMaxTileCols = 8;

// Where a block of 16 rows keeps its parts (see interleaved.h).
struct Geometry {
  bool nibbles;  // 4 parts of packed nibbles, else 8 parts of bytes
  bool min;      // an m[16] after d[16] (Q4_1)
  int32_t bias;  // subtracted from each stored quant: 8 (Q4_0), 128 (Q8_0)
  size_t quants() const { return min ? 128 : 64; }
  size_t bytes() const { return quants() + (nibbles ? 4 : 8) * 64; }
};

constexpr Geometry GeometryOf(DType type) {
  return type == DType::kQ4_0   ? Geometry{true, false, 8}
         : type == DType::kQ4_1 ? Geometry{true, true, 0}
                                : Geometry{false, false, 128};
}

// One activation row's quants and scales (ActFormat Q8_0 / Q8_1).
struct ActRow {
  const int8_t* q;
  const float* d;
  const float* s;
};

ActRow Act(const GemmArgs& a, int64_t i) {
  const uint8_t* base = a.x + i * a.format.row_bytes;
  return {reinterpret_cast<const int8_t*>(base),
          reinterpret_cast<const float*>(base + a.format.d_offset),
          reinterpret_cast<const float*>(base + a.format.s_offset)};
}

// -------------------------------------------------------------- vector kernel

#if defined(__x86_64__)
#define MNEMO_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")))

// acc += u8(u) . i8(broadcast 4 bytes at p) per 4-byte lane. The EVEX form is
// spelled out, as in gemm.cc: compilers may pick the VEX one (AVX-VNNI).
MNEMO_VNNI_TARGET inline __m512i DpBusdBcast(__m512i acc, __m512i u, const int8_t* p) {
  asm("%{evex%} vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*(const int32_t*)p));
  return acc;
}

// One group of 16 weight rows against NC activation rows; rows >= `valid`
// of the group are not stored. corr[c][b]: -bias * sum(x quants of block b).
template <DType kType, int NC>
MNEMO_VNNI_TARGET void TileGroup(const uint8_t* group, int64_t nb, const ActRow* x,
                                 const int32_t* const* corr, float* const* y, __mmask16 mask) {
  constexpr Geometry kGeo = GeometryOf(kType);
  __m512 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * kGeo.bytes();
    const __m512 dw = _mm512_loadu_ps(blk);
    __m512 mw = _mm512_setzero_ps();
    if constexpr (kGeo.min) mw = _mm512_loadu_ps(blk + 64);
    __m512i w[8];
    if constexpr (kGeo.nibbles) {
      for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(blk + kGeo.quants() + 64 * j);
        w[j] = _mm512_and_si512(v, low);
        w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
      for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(blk + kGeo.quants() + 64 * j);
    }
    for (int c = 0; c < NC; ++c) {
      const int8_t* q = x[c].q + b * 32;
      // Two chains of four, so that the dot products of one row overlap.
      __m512i s0 = kGeo.bias == 0 ? _mm512_setzero_si512() : _mm512_set1_epi32(corr[c][b]);
      __m512i s1 = _mm512_setzero_si512();
      for (int j = 0; j < 8; j += 2) {
        s0 = DpBusdBcast(s0, w[j], q + 4 * j);
        s1 = DpBusdBcast(s1, w[j + 1], q + 4 * j + 4);
      }
      const __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(x[c].d[b]));
      acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), dd, acc[c]);
      if constexpr (kGeo.min) acc[c] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x[c].s[b]), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(y[c], mask, acc[c]);
}

template <DType kType, int... NC>
MNEMO_VNNI_TARGET void TileGroupN(int nc, const uint8_t* group, int64_t nb, const ActRow* x,
                                  const int32_t* const* corr, float* const* y, __mmask16 mask,
                                  std::integer_sequence<int, NC...>) {
  ((nc == NC + 1 ? TileGroup<kType, NC + 1>(group, nb, x, corr, y, mask) : void()), ...);
}

template <DType kType>
MNEMO_VNNI_TARGET void GemmVnni(const GemmArgs& a, int64_t r0, int64_t r1, int64_t i0,
                                int64_t i1) {
  constexpr Geometry kGeo = GeometryOf(kType);
  const int64_t nb = a.format.blocks;
  const size_t group_bytes = static_cast<size_t>(nb) * kGeo.bytes();
  // Quants stored +bias (unsigned for vpdpbusd): each block's sum starts at
  // -bias * sum(x quants) of the block.
  thread_local std::vector<int32_t> corr_buf;
  if constexpr (kGeo.bias != 0) {
    corr_buf.resize(static_cast<size_t>((i1 - i0) * nb));
    for (int64_t i = i0; i < i1; ++i) {
      const int8_t* q = Act(a, i).q;
      int32_t* c = corr_buf.data() + (i - i0) * nb;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t s = 0;
        for (int k = 0; k < 32; ++k) s += q[b * 32 + k];
        c[b] = -kGeo.bias * s;
      }
    }
  }
  for (int64_t g = r0 / kG; g * kG < r1; ++g) {
    const int64_t valid = std::min<int64_t>(kG, r1 - g * kG);
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
    const uint8_t* group = a.w + g * group_bytes;
    for (int64_t i = i0; i < i1; i += kMaxTileCols) {
      const int nc = static_cast<int>(std::min<int64_t>(kMaxTileCols, i1 - i));
      ActRow x[kMaxTileCols];
      const int32_t* corr[kMaxTileCols];
      float* y[kMaxTileCols];
      for (int c = 0; c < nc; ++c) {
        x[c] = Act(a, i + c);
        corr[c] = kGeo.bias == 0 ? nullptr : corr_buf.data() + (i + c - i0) * nb;
        y[c] = a.y + (i + c) * a.ldy + g * kG;
      }
      TileGroupN<kType>(nc, group, nb, x, corr, y, mask,
                        std::make_integer_sequence<int, kMaxTileCols>());
    }
  }
}

bool CpuHasVnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}
#else
bool CpuHasVnni() { return false; }
#endif

}  // namespace

bool HasInterleavedLayout(DType type) {
  return type == DType::kQ4_0 || type == DType::kQ4_1 || type == DType::kQ8_0;
}

size_t InterleavedBytes(DType type, int64_t rows, int64_t cols) {
  MNEMO_CHECK(HasInterleavedLayout(type) && cols % kQK == 0);
  const int64_t groups = (rows + kG - 1) / kG;
  return static_cast<size_t>(groups) * static_cast<size_t>(cols / kQK) * GeometryOf(type).bytes();
}

void Interleave(DType type, const void* src, int64_t rows, int64_t cols, void* dst) {
  MNEMO_CHECK(HasInterleavedLayout(type) && cols % kQK == 0);
  const Geometry geo = GeometryOf(type);
  const int64_t nb = cols / kQK;
  const size_t row_bytes = RowBytes(type, cols);
  const size_t in_block = static_cast<size_t>(Info(type).block_bytes);
  auto* out = static_cast<uint8_t*>(dst);
  std::memset(out, 0, InterleavedBytes(type, rows, cols));
  const auto* in = static_cast<const uint8_t*>(src);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / kG, rr = r % kG;
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* blk = out + (g * nb + b) * geo.bytes();
      const uint8_t* from = in + r * row_bytes + b * in_block;
      // Every GGML block here starts with its fp16 d; Q4_1's m follows.
      uint16_t h[2];
      std::memcpy(h, from, sizeof h);
      const float d = F16ToF32(h[0]), m = F16ToF32(h[1]);
      std::memcpy(blk + 4 * rr, &d, 4);
      if (geo.min) std::memcpy(blk + 64 + 4 * rr, &m, 4);
      const uint8_t* qs = from + (geo.min ? 4 : 2);
      uint8_t* to = blk + geo.quants() + 4 * rr;
      if (geo.nibbles) {  // byte 4j+i: elements 4j+i (low) and 16+4j+i (high)
        for (int j = 0; j < 4; ++j) std::memcpy(to + 64 * j, qs + 4 * j, 4);
      } else {  // int8 + 128, unsigned
        for (int j = 0; j < 8; ++j) {
          for (int i = 0; i < 4; ++i) to[64 * j + i] = static_cast<uint8_t>(qs[4 * j + i] ^ 0x80);
        }
      }
    }
  }
}

bool CpuHasAvx512Vnni() {
  static const bool kVnni = CpuHasVnni();
  return kVnni;
}

void GemmInterleaved(const GemmArgs& a, int64_t r0, int64_t r1, int64_t i0, int64_t i1) {
  MNEMO_CHECK(HasInterleavedLayout(a.w_type) && r0 % kG == 0);
  MNEMO_CHECK_MSG(CpuHasAvx512Vnni(), "the interleaved matmul needs AVX-512 VNNI");
  r1 = std::min(r1, a.ldy);
  if (r0 >= r1 || i0 >= i1) return;
#if defined(__x86_64__)
  switch (a.w_type) {
    case DType::kQ4_0:
      return GemmVnni<DType::kQ4_0>(a, r0, r1, i0, i1);
    case DType::kQ4_1:
      return GemmVnni<DType::kQ4_1>(a, r0, r1, i0, i1);
    default:
      return GemmVnni<DType::kQ8_0>(a, r0, r1, i0, i1);
  }
#endif
}

namespace ref {

void GemmInterleaved(const GemmArgs& a, int64_t r0, int64_t r1, int64_t i0, int64_t i1) {
  MNEMO_CHECK(HasInterleavedLayout(a.w_type));
  const int64_t nb = a.format.blocks;
  for (int64_t i = i0; i < i1; ++i) {
    const ActRow x = Act(a, i);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = a.w + r * a.w_row_bytes;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t isum = 0;
        float dw, mw = 0.0f;
        const int8_t* xq = x.q + b * 32;
        if (a.w_type == DType::kQ8_0) {
          BlockQ8_0 s;
          std::memcpy(&s, row + b * sizeof s, sizeof s);
          dw = F16ToF32(s.d);
          for (int k = 0; k < 32; ++k) isum += s.qs[k] * xq[k];
        } else {
          const uint8_t* qs;
          int offset = 0;  // Q4_0's quants are q - 8
          if (a.w_type == DType::kQ4_1) {
            BlockQ4_1 s;
            std::memcpy(&s, row + b * sizeof s, sizeof s);
            dw = F16ToF32(s.d);
            mw = F16ToF32(s.m);
            qs = row + b * sizeof s + offsetof(BlockQ4_1, qs);
          } else {
            BlockQ4_0 s;
            std::memcpy(&s, row + b * sizeof s, sizeof s);
            dw = F16ToF32(s.d);
            qs = row + b * sizeof s + offsetof(BlockQ4_0, qs);
            offset = 8;
          }
          for (int k = 0; k < 16; ++k) {
            isum += ((qs[k] & 0xF) - offset) * xq[k] + ((qs[k] >> 4) - offset) * xq[16 + k];
          }
        }
        acc = std::fma(static_cast<float>(isum), dw * x.d[b], acc);
        if (a.w_type == DType::kQ4_1) acc = std::fma(mw, x.s[b], acc);
      }
      a.y[i * a.ldy + r] = acc;
    }
  }
}

}  // namespace ref
}  // namespace mnemo::kernels::cpu
