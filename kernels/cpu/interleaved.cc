// The interleaved-weight matmul (see interleaved.h): its AVX-512 VNNI kernel,
// the layout conversion, and the scalar form that defines its results.
#include "kernels/cpu/interleaved.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/check.h"
#include "kernels/cpu/quants.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mnemo::kernels::cpu {
namespace {

constexpr int64_t kG = kGroupRows;
constexpr size_t kQ4_1BlockBytes = 2 * 64 + 4 * 64;  // d, m, 4 parts
constexpr size_t kQ8_0BlockBytes = 64 + 8 * 64;      // d, 8 parts
// Activation rows one vector tile takes (two accumulators each in registers,
// beside the block's eight weight vectors).
constexpr int kMaxTileCols = 8;

size_t BlockBytes(DType type) {
  return type == DType::kQ4_1 ? kQ4_1BlockBytes : kQ8_0BlockBytes;
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
// of the group are not stored.
template <bool kQ4, int NC>
MNEMO_VNNI_TARGET void TileGroup(const uint8_t* group, int64_t nb, const ActRow* x,
                                 const int32_t* const* corr, float* const* y, __mmask16 mask) {
  __m512 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * (kQ4 ? kQ4_1BlockBytes : kQ8_0BlockBytes);
    const __m512 dw = _mm512_loadu_ps(blk);
    __m512 mw = _mm512_setzero_ps();
    __m512i w[8];
    if constexpr (kQ4) {
      mw = _mm512_loadu_ps(blk + 64);
      for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(blk + 128 + 64 * j);
        w[j] = _mm512_and_si512(v, low);
        w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
    } else {
      for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(blk + 64 + 64 * j);
    }
    for (int c = 0; c < NC; ++c) {
      const int8_t* q = x[c].q + b * 32;
      // Two chains of four, so that the dot products of one row overlap.
      __m512i s0 = kQ4 ? _mm512_setzero_si512() : _mm512_set1_epi32(corr[c][b]);
      __m512i s1 = _mm512_setzero_si512();
      for (int j = 0; j < 8; j += 2) {
        s0 = DpBusdBcast(s0, w[j], q + 4 * j);
        s1 = DpBusdBcast(s1, w[j + 1], q + 4 * j + 4);
      }
      const __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(x[c].d[b]));
      acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), dd, acc[c]);
      if constexpr (kQ4) acc[c] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x[c].s[b]), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(y[c], mask, acc[c]);
}

template <bool kQ4, int... NC>
MNEMO_VNNI_TARGET void TileGroupN(int nc, const uint8_t* group, int64_t nb, const ActRow* x,
                                  const int32_t* const* corr, float* const* y, __mmask16 mask,
                                  std::integer_sequence<int, NC...>) {
  ((nc == NC + 1 ? TileGroup<kQ4, NC + 1>(group, nb, x, corr, y, mask) : void()), ...);
}

template <bool kQ4>
MNEMO_VNNI_TARGET void GemmVnni(const GemmArgs& a, int64_t r0, int64_t r1, int64_t i0,
                                int64_t i1) {
  const int64_t nb = a.format.blocks;
  const size_t group_bytes = static_cast<size_t>(nb) * BlockBytes(a.w_type);
  // Q8_0: the weights are stored +128 (unsigned for vpdpbusd), so each
  // block's sum starts at -128 * sum(x quants) of the block.
  thread_local std::vector<int32_t> corr_buf;
  if constexpr (!kQ4) {
    corr_buf.resize(static_cast<size_t>((i1 - i0) * nb));
    for (int64_t i = i0; i < i1; ++i) {
      const int8_t* q = Act(a, i).q;
      int32_t* c = corr_buf.data() + (i - i0) * nb;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t s = 0;
        for (int k = 0; k < 32; ++k) s += q[b * 32 + k];
        c[b] = -128 * s;
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
        corr[c] = kQ4 ? nullptr : corr_buf.data() + (i + c - i0) * nb;
        y[c] = a.y + (i + c) * a.ldy + g * kG;
      }
      TileGroupN<kQ4>(nc, group, nb, x, corr, y, mask,
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

bool HasInterleavedLayout(DType type) { return type == DType::kQ4_1 || type == DType::kQ8_0; }

size_t InterleavedBytes(DType type, int64_t rows, int64_t cols) {
  MNEMO_CHECK(HasInterleavedLayout(type) && cols % kQK == 0);
  const int64_t groups = (rows + kG - 1) / kG;
  return static_cast<size_t>(groups) * static_cast<size_t>(cols / kQK) * BlockBytes(type);
}

void Interleave(DType type, const void* src, int64_t rows, int64_t cols, void* dst) {
  MNEMO_CHECK(HasInterleavedLayout(type) && cols % kQK == 0);
  const int64_t nb = cols / kQK;
  const size_t row_bytes = RowBytes(type, cols);
  const size_t block_bytes = BlockBytes(type);
  auto* out = static_cast<uint8_t*>(dst);
  std::memset(out, 0, InterleavedBytes(type, rows, cols));
  const auto* in = static_cast<const uint8_t*>(src);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / kG, rr = r % kG;
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* blk = out + (g * nb + b) * block_bytes;
      if (type == DType::kQ4_1) {
        BlockQ4_1 s;
        std::memcpy(&s, in + r * row_bytes + b * sizeof(BlockQ4_1), sizeof s);
        const float d = F16ToF32(s.d), m = F16ToF32(s.m);
        std::memcpy(blk + 4 * rr, &d, 4);
        std::memcpy(blk + 64 + 4 * rr, &m, 4);
        for (int j = 0; j < 4; ++j) std::memcpy(blk + 128 + 64 * j + 4 * rr, s.qs + 4 * j, 4);
      } else {
        BlockQ8_0 s;
        std::memcpy(&s, in + r * row_bytes + b * sizeof(BlockQ8_0), sizeof s);
        const float d = F16ToF32(s.d);
        std::memcpy(blk + 4 * rr, &d, 4);
        for (int j = 0; j < 8; ++j) {
          for (int i = 0; i < 4; ++i) {
            blk[64 + 64 * j + 4 * rr + i] = static_cast<uint8_t>(s.qs[4 * j + i] + 128);
          }
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
  if (a.w_type == DType::kQ4_1) return GemmVnni<true>(a, r0, r1, i0, i1);
  return GemmVnni<false>(a, r0, r1, i0, i1);
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
        if (a.w_type == DType::kQ4_1) {
          BlockQ4_1 s;
          std::memcpy(&s, row + b * sizeof s, sizeof s);
          dw = F16ToF32(s.d);
          mw = F16ToF32(s.m);
          for (int k = 0; k < 16; ++k) {
            isum += (s.qs[k] & 0xF) * x.q[b * 32 + k] + (s.qs[k] >> 4) * x.q[b * 32 + 16 + k];
          }
        } else {
          BlockQ8_0 s;
          std::memcpy(&s, row + b * sizeof s, sizeof s);
          dw = F16ToF32(s.d);
          for (int k = 0; k < 32; ++k) isum += s.qs[k] * x.q[b * 32 + k];
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
