// Activation quantization and quantized matmul tiles, compiled once per
// Highway target. The int8 dot products use maddubs/madd (SSSE3..AVX-512) or
// vpdpbusd (AVX-512 VNNI) through small target-specific helpers: Highway
// 1.0.3 has no u8 x i8 widening multiply-add.
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/check.h"
#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/gemm.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "kernels/cpu/f16-inl.h"

// Decode (one activation row) streams one weight row at a time: several rows
// interleaved defeat the hardware prefetcher (measured: -40% GB/s).
#ifndef MNEMO_N1_RM
#define MNEMO_N1_RM 1
#endif
#ifndef MNEMO_PF
#define MNEMO_PF 2048  // bytes of weights prefetched ahead in the decode path
#endif
#ifndef MNEMO_Q4_RM  // tile shape, overridable for tuning experiments
#define MNEMO_Q4_RM 4
#define MNEMO_Q4_RN 3
#endif
#ifndef MNEMO_Q8_RM
#define MNEMO_Q8_RM 4
#define MNEMO_Q8_RN 2
#endif
#ifndef MNEMO_WIDE_RN  // activation rows per 512-bit pair tile (<= 4)
#define MNEMO_WIDE_RN 4
#endif
// The widest Q4 column tile of either width: what a group's dd holds.
#define MNEMO_Q4_MAX_RN (MNEMO_Q4_RN > MNEMO_WIDE_RN ? MNEMO_Q4_RN : MNEMO_WIDE_RN)

HWY_BEFORE_NAMESPACE();
namespace mnemo::kernels::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

HWY_INLINE float HalfToFloat(uint16_t h) {
#if HWY_ARCH_X86 && (HWY_TARGET <= HWY_AVX2)
  return _cvtsh_ss(h);
#else
  return F16ToF32(h);
#endif
}

using DF = hn::CappedTag<float, 8>;
using VF = hn::Vec<DF>;

HWY_INLINE float SumF(VF v) { return hn::GetLane(hn::SumOfLanes(DF(), v)); }

struct ActView {
  const uint8_t* base;
  size_t stride;
  const ActFormat* f;
  const int8_t* qs(int64_t i) const { return reinterpret_cast<const int8_t*>(base + i * stride); }
  const float* d(int64_t i) const {
    return reinterpret_cast<const float*>(base + i * stride + f->d_offset);
  }
  const float* s(int64_t i) const {
    return reinterpret_cast<const float*>(base + i * stride + f->s_offset);
  }
  const float* ds(int64_t i) const {
    return reinterpret_cast<const float*>(base + i * stride + f->ds_offset);
  }
  const int16_t* bsums(int64_t i) const {
    return reinterpret_cast<const int16_t*>(base + i * stride + f->s_offset);
  }
};

// Per-thread scratch for decoded weight scales.
float* ScaleScratch(size_t floats) {
  thread_local std::vector<float> buf;
  if (buf.size() < floats) buf.resize(floats);
  return buf.data();
}

#if HWY_TARGET != HWY_SCALAR

// One quant block (32 int8) is processed as 1 (256-bit targets) or 2
// (128-bit targets) vectors; 512-bit targets use their 256-bit half, as
// llama.cpp does, so that one vector is one block with one scale.
using DU8 = hn::CappedTag<uint8_t, 32>;
using DI8 = hn::CappedTag<int8_t, 32>;
using DI32 = hn::CappedTag<int32_t, 8>;
using VU8 = hn::Vec<DU8>;
using VI8 = hn::Vec<DI8>;
using VI32 = hn::Vec<DI32>;
constexpr size_t kN8 = hn::MaxLanes(DU8());
constexpr int kParts = static_cast<int>(32 / kN8);
static_assert(kN8 == 16 || kN8 == 32, "unsupported vector width");

// i32 lane k = sum over bytes 4k..4k+3 of a[j] * b[j]; a unsigned, b signed.
// Callers keep |a[2j]*b[2j] + a[2j+1]*b[2j+1]| < 2^15 (maddubs saturates).
HWY_INLINE VI32 DotU8I8(VU8 a, VI8 b) {
#if HWY_TARGET == HWY_AVX3_DL
  // AVX3_DL implies AVX512-VNNI (Highway checks the CPUID bit). The EVEX
  // encoding is spelled out: compilers may pick the VEX one (AVX-VNNI),
  // which Ice Lake and Zen 4 lack.
  __m256i acc = _mm256_setzero_si256();
  asm("%{evex%} vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a.raw), "v"(b.raw));
  return VI32{acc};
#elif HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3
  return VI32{_mm256_madd_epi16(_mm256_maddubs_epi16(a.raw, b.raw), _mm256_set1_epi16(1))};
#elif HWY_TARGET == HWY_SSSE3 || HWY_TARGET == HWY_SSE4
  return VI32{_mm_madd_epi16(_mm_maddubs_epi16(a.raw, b.raw), _mm_set1_epi16(1))};
#else
  const DI32 d32;
  const hn::Repartition<int16_t, DI32> d16;
  const hn::Repartition<uint16_t, DI32> du16;
  const auto a16 = hn::BitCast(du16, a);
  const auto a_even = hn::BitCast(d16, hn::And(a16, hn::Set(du16, 0xFF)));
  const auto a_odd = hn::BitCast(d16, hn::ShiftRight<8>(a16));
  const auto b16 = hn::BitCast(d16, b);
  const auto b_even = hn::ShiftRight<8>(hn::ShiftLeft<8>(b16));
  const auto b_odd = hn::ShiftRight<8>(b16);
  VI32 sum1 = hn::Zero(d32);
  VI32 sum0 = hn::ReorderWidenMulAccumulate(d32, a_even, b_even, hn::Zero(d32), sum1);
  sum0 = hn::ReorderWidenMulAccumulate(d32, a_odd, b_odd, sum0, sum1);
  return hn::RearrangeToOddPlusEven(sum0, sum1);
#endif
}

// y[k] = SumF(v[k]) + add[k] for k < 4, or SumF(v[k]) where add is null. On
// 256-bit x86 targets the four reductions share their shuffles, each lane
// adding the very pairs SumF (and GGML's hsum_float_8) adds:
// (v0+v4) and (v2+v6) first, ... then ((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7)).
HWY_INLINE void StoreSums4(const VF* v, const float* HWY_RESTRICT add, float* HWY_RESTRICT y) {
#if HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  // (a_k + a_k+4, c_k + c_k+4) and (b.., d..) for k < 4.
  const __m256 ac = _mm256_add_ps(_mm256_permute2f128_ps(v[0].raw, v[2].raw, 0x20),
                                  _mm256_permute2f128_ps(v[0].raw, v[2].raw, 0x31));
  const __m256 bd = _mm256_add_ps(_mm256_permute2f128_ps(v[1].raw, v[3].raw, 0x20),
                                  _mm256_permute2f128_ps(v[1].raw, v[3].raw, 0x31));
  // (a02, a13, b02, b13 | c02, c13, d02, d13).
  const __m256 p = _mm256_add_ps(_mm256_shuffle_ps(ac, bd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(ac, bd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 even = _mm256_permutevar8x32_ps(p, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
  const __m256 odd = _mm256_permutevar8x32_ps(p, _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7));
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(even), _mm256_castps256_ps128(odd));
  if (add != nullptr) sum = _mm_add_ps(sum, _mm_loadu_ps(add));
  _mm_storeu_ps(y, sum);
#else
  for (int k = 0; k < 4; ++k) y[k] = add != nullptr ? SumF(v[k]) + add[k] : SumF(v[k]);
#endif
}

// DotU8I8(a, Load(p)) with the load folded into the multiply: the compiler
// would otherwise keep each loaded x vector in a register for reuse, and
// the register file then runs out for the tile's accumulators.
HWY_INLINE VI32 DotU8I8Mem(VU8 a, const int8_t* HWY_RESTRICT p) {
#if HWY_TARGET == HWY_AVX2
  __m256i prod;
  asm("vpmaddubsw %2, %1, %0" : "=x"(prod) : "x"(a.raw), "m"(*reinterpret_cast<const __m256i*>(p)));
  return VI32{_mm256_madd_epi16(prod, _mm256_set1_epi16(1))};
#else
  return DotU8I8(a, hn::Load(DI8(), p));
#endif
}

// x where s > 0, -x where s < 0 (x where s == 0: callers multiply by |s|).
HWY_INLINE VI8 ApplySign(VI8 x, VI8 s) {
#if HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  return VI8{_mm256_sign_epi8(x.raw, s.raw)};
#elif HWY_TARGET == HWY_SSSE3 || HWY_TARGET == HWY_SSE4
  return VI8{_mm_sign_epi8(x.raw, s.raw)};
#else
  const DI8 d;
  return hn::IfThenElse(hn::Lt(s, hn::Zero(d)), hn::Neg(x), x);
#endif
}

// y[(i + c) * ldy + r] = the sum of acc[r][c]'s lanes (+ add[c * G + r]
// where add is given), for a tile of RM weight rows x RN activation rows.
template <int RM, int RN, int G>
HWY_INLINE void StoreTile(const VF (&acc)[RM][RN], const float* HWY_RESTRICT add, float* HWY_RESTRICT y,
                          int64_t i, int64_t ldy) {
  for (int c = 0; c < RN; ++c) {
    const float* a = add != nullptr ? add + c * G : nullptr;
    if constexpr (RM == 4) {
      const VF v[4] = {acc[0][c], acc[1][c], acc[2][c], acc[3][c]};
      StoreSums4(v, a, y + (i + c) * ldy);
    } else {
      for (int r = 0; r < RM; ++r) y[(i + c) * ldy + r] = a != nullptr ? SumF(acc[r][c]) + a[r] : SumF(acc[r][c]);
    }
  }
}

// Activation rows [i0, i1) in column tiles: f.template operator()<RN>(i)
// for tiles of kRN from i0, then one of the remainder (kRN <= 4).
template <int kRN, class F>
HWY_INLINE void ForColumnTiles(int64_t i0, int64_t i1, F&& f) {
  static_assert(kRN >= 1 && kRN <= 4);
  int64_t i = i0;
  for (; i + kRN <= i1; i += kRN) f.template operator()<kRN>(i);
  switch (i1 - i) {
    case 0:
      break;
    case 1:
      if constexpr (kRN > 1) f.template operator()<1>(i);
      break;
    case 2:
      if constexpr (kRN > 2) f.template operator()<2>(i);
      break;
    case 3:
      if constexpr (kRN > 3) f.template operator()<3>(i);
      break;
    default:
      MNEMO_CHECK(false);
  }
}

// Weight rows [r0, r1) in groups of kMaxRowGroup, then 4, then 1:
// f.template operator()<G>(r) for each group starting at r. Callers size
// their per-group scratch for kMaxRowGroup rows.
constexpr int kMaxRowGroup = 8;
template <class F>
HWY_INLINE void ForRowGroups(int64_t r0, int64_t r1, F&& f) {
  for (int64_t r = r0; r < r1;) {
    if (r1 - r >= kMaxRowGroup) {
      f.template operator()<kMaxRowGroup>(r);
      r += kMaxRowGroup;
    } else if (r1 - r >= 4) {
      f.template operator()<4>(r);
      r += 4;
    } else {
      f.template operator()<1>(r);
      r += 1;
    }
  }
}

// ---------------------------------------------------------------- Q4_0, Q4_1

using D2 = hn::Full64<float>;
using V2 = hn::Vec<D2>;

// The fp16 values at p[0..1] and p[2..3] as two float lanes (one F16C
// instruction; it reads 8 bytes, every block has more).
HWY_INLINE V2 LoadHalfPair(const uint8_t* p) {
#if MNEMO_HAVE_F16C
  return V2{_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))};
#else
  uint16_t h[2];
  std::memcpy(h, p, 4);
  alignas(16) const float f[4] = {F16ToF32(h[0]), F16ToF32(h[1]), 0.0f, 0.0f};
  return hn::Load(D2(), f);
#endif
}

// 16 bytes of nibbles -> 32 u8 values in element order (low nibbles are
// elements 0..15, high nibbles 16..31).
HWY_INLINE void UnpackNibbles(const uint8_t* HWY_RESTRICT qs, VU8 out[kParts]) {
  const DU8 du8;
  if constexpr (kParts == 1) {
    // The 16 bytes in both halves; the upper half shifted right by 4 within
    // 32-bit lanes, so that masking leaves the high nibbles there.
    const hn::Repartition<uint32_t, DU8> du32;
    const hn::Half<decltype(du32)> dh32;
    const auto shift = hn::Combine(du32, hn::Set(dh32, 4u), hn::Zero(dh32));
    const auto v = hn::BitCast(du32, hn::LoadDup128(du8, qs));
    out[0] = hn::And(hn::BitCast(du8, v >> shift), hn::Set(du8, 0x0F));
  } else {
    const auto v = hn::LoadU(du8, qs);
    out[0] = hn::And(v, hn::Set(du8, 0x0F));
    out[1] = hn::ShiftRight<4>(v);
  }
}

// One activation row (decode): RM weight rows; scales converted inline, the
// m * s term (or Q4_0's d * s, times -8) accumulated in lane 1 of a pair.
template <int RM, size_t kBlockBytes, size_t kQsOffset, bool kQ41>
HWY_INLINE void TileQ4N1(const uint8_t* HWY_RESTRICT w, size_t ws, int64_t nb,
                         const int8_t* HWY_RESTRICT xq, const float* HWY_RESTRICT xds,
                         float* HWY_RESTRICT y) {
  const DF df;
  const DI8 di8;
  const D2 d2;
  VF acc[RM];
  V2 ms[RM];
  for (int r = 0; r < RM; ++r) {
    acc[r] = hn::Zero(df);
    ms[r] = hn::Zero(d2);
  }
  for (int64_t b = 0; b < nb; ++b) {
    VI8 xv[kParts];
    for (int p = 0; p < kParts; ++p) xv[p] = hn::Load(di8, xq + b * 32 + p * kN8);
    const V2 xp = hn::LoadU(d2, xds + 2 * b);  // (dx, s)
    for (int r = 0; r < RM; ++r) {
      const uint8_t* blk = w + r * ws + b * kBlockBytes;
#if MNEMO_PF
      hwy::Prefetch(blk + MNEMO_PF);
#endif
      V2 wdm = LoadHalfPair(blk);  // (d, m); Q4_0: (d, junk)
      if constexpr (!kQ41) wdm = hn::Broadcast<0>(wdm);
      const V2 p = hn::Mul(wdm, xp);  // lane 0: d * dx
      ms[r] = hn::MulAdd(wdm, xp, ms[r]);  // lane 1: += m * s, fused as GGML's
      VU8 wv[kParts];
      UnpackNibbles(blk + kQsOffset, wv);
      VI32 dot = DotU8I8(wv[0], xv[0]);
      if constexpr (kParts == 2) dot = hn::Add(dot, DotU8I8(wv[1], xv[1]));
      acc[r] = hn::MulAdd(hn::ConvertTo(df, dot), hn::Set(df, hn::GetLane(p)), acc[r]);
    }
  }
  for (int r = 0; r < RM; ++r) {
    y[r] = SumF(acc[r]) + (kQ41 ? 1.0f : -8.0f) * hn::ExtractLane(ms[r], 1);
  }
}

// The products wd * dx for every (r, c, b) of G weight rows and RN
// activation rows, formed beforehand into `dd` (laid out [b][c][r]) one
// G-lane multiply per (b, c): the same single rounding GGML's scalar
// d0 * d1 has, with the multiply off the inner loop. wd holds the G rows'
// scales interleaved by block. Q4_0 is Q4_1 with m = -8d:
// sum (q - 8) d x = d sum(q x) - 8 d sum(x).
template <int G, int RN>
HWY_INLINE void ScaleProducts(const float* HWY_RESTRICT wd, int64_t nb, const float* const* xd,
                              float* HWY_RESTRICT dd) {
  const hn::CappedTag<float, G> dr;
  constexpr int kN = static_cast<int>(hn::MaxLanes(dr));
  for (int64_t b = 0; b < nb; ++b) {
    for (int k = 0; k < G; k += kN) {
      const auto w = hn::LoadU(dr, wd + b * G + k);
      for (int c = 0; c < RN; ++c) {
        hn::StoreU(hn::Mul(hn::Set(dr, xd[c][b]), w), dr, dd + (b * RN + c) * G + k);
      }
    }
  }
}

#if HWY_TARGET == HWY_AVX3_DL
// ------------------------------------------------ 512-bit pair tiles (VNNI)
//
// Two weight rows share a 512-bit vector with their 4-byte groups
// interleaved (even i32 lanes: row r, odd lanes: row r + 1), against x
// with each 4-byte group twice. One vpdpbusd, one cvt and one fma (the
// scale pair broadcast from memory) then advance both rows' eight lanes:
// the very lanes, products and roundings the 256-bit tiles compute, in
// half the instructions where 512-bit ops issue at the 256-bit rate.

// acc + the u8 x s8 products of u and s, 4 per i32 lane (Highway's AVX3_DL
// target string does not enable the VNNI intrinsics in GCC 12).
HWY_INLINE __m512i DpBusd512(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// Stores the 32 bytes v of weight row r, block b of a group of G rows, in
// the pair layout pw[b][r / 2][64].
HWY_INLINE void StorePairRow(uint8_t* HWY_RESTRICT pw, int64_t b, int G, int r, VU8 v) {
  const __mmask16 m = (r & 1) != 0 ? 0xAAAA : 0x5555;
  _mm512_mask_storeu_epi32(pw + (b * G + (r & ~1)) * 32, m,
                           _mm512_maskz_expand_epi32(m, _mm512_castsi256_si512(v.raw)));
}

// xw[((i - i0) * nb + b) * 64]: block b of activation row i with each
// 4-byte group twice; 64-byte aligned.
HWY_INLINE void DupActivations(const ActView& x, int64_t i0, int64_t i1, int64_t nb,
                               uint8_t* HWY_RESTRICT xw) {
  const __m512i idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  for (int64_t i = i0; i < i1; ++i) {
    const int8_t* q = x.qs(i);
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 32));
      _mm512_store_si512(xw + ((i - i0) * nb + b) * 64,
                         _mm512_permutexvar_epi32(idx, _mm512_castsi256_si512(v)));
    }
  }
}

// Scratch for `rows` activation rows of nb blocks duplicated (64 bytes a
// block), then room for their -128 sums in that layout (64) and in the
// 256-bit tiles' (32); 64-byte aligned.
HWY_INLINE uint8_t* DupScratch(int64_t rows, int64_t nb) {
  thread_local std::vector<uint8_t> buf;
  const size_t bytes = static_cast<size_t>(rows * nb) * 160 + 64;
  if (buf.size() < bytes) buf.resize(bytes);
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) &
                                    ~uintptr_t{63});
}

// G pair-packed weight rows x RN activation rows from xw (duplicated, rows
// nb * 64 bytes apart), over all blocks; dd, add, y as TileQ4's. With ns
// (the biased Q8_0 form) each dot product starts from ns's lanes, laid out
// as xw's, else from 0.
template <int G, int RN>
HWY_INLINE void TilePairs(const uint8_t* HWY_RESTRICT pw, int64_t nb, const float* HWY_RESTRICT dd,
                          const uint8_t* HWY_RESTRICT xw, const int32_t* HWY_RESTRICT ns,
                          const float* HWY_RESTRICT add, float* HWY_RESTRICT y, int64_t i,
                          int64_t ldy) {
  static_assert(G % 4 == 0);
  constexpr int P = G / 2;
  __m512 acc[P][RN];
  for (int p = 0; p < P; ++p)
    for (int c = 0; c < RN; ++c) acc[p][c] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i xv[RN];
    for (int c = 0; c < RN; ++c) {
      xv[c] = _mm512_load_si512(xw + (c * nb + b) * 64);
    }
    for (int p = 0; p < P; ++p) {
      const __m512i w = _mm512_load_si512(pw + (b * G + 2 * p) * 32);
      for (int c = 0; c < RN; ++c) {
        const __m512i init =
            ns != nullptr ? _mm512_load_si512(ns + (c * nb + b) * 16) : _mm512_setzero_si512();
        const __m512i dot = DpBusd512(init, w, xv[c]);
        double scales;  // dd of rows 2p and 2p + 1, adjacent
        std::memcpy(&scales, dd + (b * RN + c) * G + 2 * p, sizeof(scales));
        acc[p][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                    _mm512_castpd_ps(_mm512_set1_pd(scales)), acc[p][c]);
      }
    }
  }
  // Each row's eight lanes back in order, then summed as the 256-bit tiles do.
  const __m512i deinterleave =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int r0 = 0; r0 < G; r0 += 4) {
    VF part[4][RN];
    for (int p = r0 / 2; p < r0 / 2 + 2; ++p) {
      for (int c = 0; c < RN; ++c) {
        const __m512 v = _mm512_permutexvar_ps(deinterleave, acc[p][c]);
        part[2 * p - r0][c] = VF{_mm512_castps512_ps256(v)};
        part[2 * p + 1 - r0][c] = VF{_mm512_extractf32x8_ps(v, 1)};
      }
    }
    StoreTile<4, RN, G>(part, add != nullptr ? add + r0 : nullptr, y + r0, i, ldy);
  }
}

// All G pair-packed weight rows x RN activation rows from i (xw, ns at
// row i): the scale products once, then one pair tile.
template <int G, int RN>
HWY_INLINE void ColumnsPairs(const uint8_t* pw, int64_t nb, const float* wd, float* dd,
                             const ActView& x, int64_t i, const uint8_t* xw, const int32_t* ns,
                             const float* add, float* y, int64_t ldy) {
  const float* xd[RN];
  for (int c = 0; c < RN; ++c) xd[c] = x.d(i + c);
  ScaleProducts<G, RN>(wd, nb, xd, dd);
  TilePairs<G, RN>(pw, nb, dd, xw, ns, add, y, i, ldy);
}
#endif  // HWY_TARGET == HWY_AVX3_DL

// A Q4 group's scratch: the unpacked nibbles (align-byte aligned), then
// the rows' scales wd and mins wm, the scale products dd of rn activation
// rows, the m * s sums ms.
struct Q4Scratch {
  uint8_t* uw;
  float *wd, *wm, *dd, *ms;
};
HWY_INLINE Q4Scratch CarveQ4Scratch(float* scratch, int G, int64_t nb, int rn, uintptr_t align) {
  Q4Scratch s;
  s.uw = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(scratch) + align - 1) & ~(align - 1));
  s.wd = reinterpret_cast<float*>(s.uw + 32 * G * nb);
  s.wm = s.wd + G * nb;
  s.dd = s.wm + G * nb;
  s.ms = s.dd + rn * G * nb;
  return s;
}

// The nibbles of G weight rows unpacked once into `uw` ([b][r][32] u8,
// 32-byte aligned) and their scales decoded into wd and wm ([b][r]), so that
// every tile over activation rows reuses them from L1. Reads each row front
// to back (one sequential stream for the prefetchers), and prefetches the
// next group's rows at the same pace: the tiles give them time to arrive.
template <int G, size_t kBlockBytes, size_t kQsOffset, bool kQ41>
HWY_INLINE void PackQ4(const uint8_t* HWY_RESTRICT w, size_t ws, int64_t nb,
                       uint8_t* HWY_RESTRICT uw, float* HWY_RESTRICT wd,
                       float* HWY_RESTRICT wm) {
  const DU8 du8;
  for (int r = 0; r < G; ++r) {
    const uint8_t* row = w + r * ws;
#pragma GCC unroll 4
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * kBlockBytes;
      hwy::Prefetch(blk + G * ws);
      const V2 dm = LoadHalfPair(blk);
      const float d = hn::GetLane(dm);
      wd[b * G + r] = d;
      wm[b * G + r] = kQ41 ? hn::ExtractLane(dm, 1) : -8.0f * d;
      VU8 v[kParts];
      UnpackNibbles(blk + kQsOffset, v);
      for (int p = 0; p < kParts; ++p) hn::Store(v[p], du8, uw + (b * G + r) * 32 + p * kN8);
    }
  }
}

// RM packed weight rows (of a group of G, starting at uw, dd, ms and y) x
// RN activation rows from i, over all blocks. The inner loop keeps one
// weight vector in a register and reads x from memory, so that the RM * RN
// accumulators fit the register file (AVX2 has 16).
template <int RM, int G, int RN>
HWY_INLINE void TileQ4(const uint8_t* HWY_RESTRICT uw, int64_t nb, const float* HWY_RESTRICT dd,
                       const float* HWY_RESTRICT ms, const ActView& x, int64_t i,
                       float* HWY_RESTRICT y, int64_t ldy) {
  const DF df;
  const DU8 du8;
  VF acc[RM][RN];
  for (int r = 0; r < RM; ++r)
    for (int c = 0; c < RN; ++c) acc[r][c] = hn::Zero(df);
  const int8_t* xq[RN];
  for (int c = 0; c < RN; ++c) xq[c] = x.qs(i + c);
#pragma GCC unroll 2
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < RM; ++r) {
      VU8 wv[kParts];
      for (int p = 0; p < kParts; ++p) wv[p] = hn::Load(du8, uw + (b * G + r) * 32 + p * kN8);
      for (int c = 0; c < RN; ++c) {
        VI32 dot = DotU8I8Mem(wv[0], xq[c] + b * 32);
        if constexpr (kParts == 2) dot = hn::Add(dot, DotU8I8Mem(wv[1], xq[c] + b * 32 + kN8));
        acc[r][c] =
            hn::MulAdd(hn::ConvertTo(df, dot), hn::Set(df, dd[(b * RN + c) * G + r]), acc[r][c]);
      }
    }
  }
  StoreTile<RM, RN, G>(acc, ms, y, i, ldy);
}

// Sums over blocks of m * s, fused and in block order as GGML's vec_dot (so
// results are bit-identical to llama.cpp's AVX2 build), for NC activation
// rows from i: the G weight rows are the lanes, wm holds their m
// interleaved by block. NC independent chains hide the FMA latency.
template <int G, int NC>
HWY_INLINE void SumMsGroup(const float* HWY_RESTRICT wm, int64_t nb, const ActView& x, int64_t i,
                           float* HWY_RESTRICT ms) {
  const hn::CappedTag<float, G> dr;
  constexpr int kN = static_cast<int>(hn::MaxLanes(dr));
  const float* xs[NC];
  for (int g = 0; g < NC; ++g) xs[g] = x.s(i + g);
  for (int k = 0; k < G; k += kN) {
    hn::Vec<decltype(dr)> summ[NC];
    for (int g = 0; g < NC; ++g) summ[g] = hn::Zero(dr);
    for (int64_t b = 0; b < nb; ++b) {
      const auto m = hn::LoadU(dr, wm + b * G + k);
      for (int g = 0; g < NC; ++g) summ[g] = hn::MulAdd(m, hn::Set(dr, xs[g][b]), summ[g]);
    }
    for (int g = 0; g < NC; ++g) hn::StoreU(summ[g], dr, ms + g * G + k);
  }
}

// ms[(i - i0) * G + r]: the m * s sum of weight row r and activation row i.
template <int G>
HWY_INLINE void SumMs(const float* wm, int64_t nb, const ActView& x, int64_t i0, int64_t i1,
                      float* ms) {
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) SumMsGroup<G, 8>(wm, nb, x, i, ms + (i - i0) * G);
  for (; i < i1; ++i) SumMsGroup<G, 1>(wm, nb, x, i, ms + (i - i0) * G);
}

// All G packed weight rows x RN activation rows from i: the scale products
// once for the group, then tiles of up to kRM rows.
template <int G, int RN>
HWY_INLINE void ColumnsQ4(const uint8_t* uw, int64_t nb, const float* wd, const float* ms,
                          float* dd, const ActView& x, int64_t i, float* y, int64_t ldy) {
  constexpr int kRM = G < MNEMO_Q4_RM ? G : MNEMO_Q4_RM;
  static_assert(G % kRM == 0);
  const float* xd[RN];
  for (int c = 0; c < RN; ++c) xd[c] = x.d(i + c);
  ScaleProducts<G, RN>(wd, nb, xd, dd);
  for (int r = 0; r < G; r += kRM) {
    TileQ4<kRM, G, RN>(uw + r * 32, nb, dd + r, ms + r, x, i, y + r, ldy);
  }
}

#if HWY_TARGET == HWY_AVX3_DL
// PackQ4 into the pair layout of TilePairs (pw: [b][r / 2][64]), two rows
// at a time: their 16 nibble bytes side by side, each 4-byte group of
// either row put in its lane (twice: once for its low nibbles, once for
// its high nibbles), shifted and masked.
template <int G, size_t kBlockBytes, size_t kQsOffset, bool kQ41>
HWY_INLINE void PackQ4Pairs(const uint8_t* HWY_RESTRICT w, size_t ws, int64_t nb,
                            uint8_t* HWY_RESTRICT pw, float* HWY_RESTRICT wd,
                            float* HWY_RESTRICT wm) {
  const __m512i spread = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 0, 4, 1, 5, 2, 6, 3, 7);
  const __m512i shift = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int r = 0; r < G; r += 2) {
    const uint8_t* row0 = w + r * ws;
    const uint8_t* row1 = row0 + ws;
#pragma GCC unroll 2
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk0 = row0 + b * kBlockBytes;
      const uint8_t* blk1 = row1 + b * kBlockBytes;
      hwy::Prefetch(blk0 + G * ws);
      hwy::Prefetch(blk1 + G * ws);
      const V2 dm0 = LoadHalfPair(blk0);
      const V2 dm1 = LoadHalfPair(blk1);
      wd[b * G + r] = hn::GetLane(dm0);
      wd[b * G + r + 1] = hn::GetLane(dm1);
      wm[b * G + r] = kQ41 ? hn::ExtractLane(dm0, 1) : -8.0f * hn::GetLane(dm0);
      wm[b * G + r + 1] = kQ41 ? hn::ExtractLane(dm1, 1) : -8.0f * hn::GetLane(dm1);
      const __m256i q = _mm256_inserti128_si256(
          _mm256_castsi128_si256(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk0 + kQsOffset))),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk1 + kQsOffset)), 1);
      const __m512i z = _mm512_permutexvar_epi32(spread, _mm512_castsi256_si512(q));
      _mm512_store_si512(pw + (b * G + r) * 32,
                         _mm512_and_si512(_mm512_srlv_epi32(z, shift), low4));
    }
  }
}

#endif

// One group of G weight rows against activation rows [i0, i1), in column
// tiles: of up to MNEMO_WIDE_RN in pair tiles where xw is given (x
// duplicated, DupActivations of [i0, i1)), else of up to MNEMO_Q4_RN.
template <int G, bool kQ41>
HWY_INLINE void GroupQ4(const uint8_t* w, size_t ws, int64_t nb, const ActView& x, int64_t i0,
                        int64_t i1, float* y, int64_t ldy, float* scratch, const uint8_t* xw) {
  constexpr size_t kBB = kQ41 ? sizeof(BlockQ4_1) : sizeof(BlockQ4_0);
  constexpr size_t kQO = kQ41 ? 4 : 2;
  const Q4Scratch sc = CarveQ4Scratch(scratch, G, nb, MNEMO_Q4_MAX_RN, 64);
  bool pairs = false;
#if HWY_TARGET == HWY_AVX3_DL
  pairs = G % 4 == 0 && xw != nullptr;
  if constexpr (G % 4 == 0) {
    if (pairs) PackQ4Pairs<G, kBB, kQO, kQ41>(w, ws, nb, sc.uw, sc.wd, sc.wm);
  }
#endif
  if (!pairs) PackQ4<G, kBB, kQO, kQ41>(w, ws, nb, sc.uw, sc.wd, sc.wm);
  SumMs<G>(sc.wm, nb, x, i0, i1, sc.ms);
#if HWY_TARGET == HWY_AVX3_DL
  if constexpr (G % 4 == 0) {
    if (pairs) {
      ForColumnTiles<MNEMO_WIDE_RN>(i0, i1, [&]<int RN>(int64_t i) {
        ColumnsPairs<G, RN>(sc.uw, nb, sc.wd, sc.dd, x, i, xw + (i - i0) * nb * 64, nullptr,
                            sc.ms + (i - i0) * G, y, ldy);
      });
      return;
    }
  }
#endif
  (void)xw;
  ForColumnTiles<MNEMO_Q4_RN>(i0, i1, [&]<int RN>(int64_t i) {
    ColumnsQ4<G, RN>(sc.uw, nb, sc.wd, sc.ms + (i - i0) * G, sc.dd, x, i, y, ldy);
  });
}

template <bool kQ41>
void GemmQ4(const GemmArgs& a, int64_t r0, int64_t r1, int64_t i0, int64_t i1) {
  constexpr size_t kBB = kQ41 ? sizeof(BlockQ4_1) : sizeof(BlockQ4_0);
  constexpr size_t kQO = kQ41 ? 4 : 2;
  const int64_t nb = a.format.blocks;
  const ActView x{a.x, a.format.row_bytes, &a.format};
  if (i1 - i0 == 1) {
    const int8_t* xq = x.qs(i0);
    const float* xds = x.ds(i0);
    float* y = a.y + i0 * a.ldy;
    int64_t r = r0;
    constexpr int kRM1 = MNEMO_N1_RM;
    for (; r + kRM1 <= r1; r += kRM1) {
      TileQ4N1<kRM1, kBB, kQO, kQ41>(a.w + r * a.w_row_bytes, a.w_row_bytes, nb, xq, xds, y + r);
    }
    for (; r < r1; ++r) {
      TileQ4N1<1, kBB, kQO, kQ41>(a.w + r * a.w_row_bytes, a.w_row_bytes, nb, xq, xds, y + r);
    }
    return;
  }
  // Groups of 8 weight rows share the m * s sums and scale products over
  // 8 lanes; 4 and 1 for the rest of the range.
  constexpr int kG = kMaxRowGroup;
  float* scratch = ScaleScratch(
      static_cast<size_t>((8 + 2 + MNEMO_Q4_MAX_RN) * kG * nb + kG * (i1 - i0) + 16));
  const uint8_t* xw = nullptr;
#if HWY_TARGET == HWY_AVX3_DL
  if (WideTiles()) {
    uint8_t* dup = DupScratch(i1 - i0, nb);
    DupActivations(x, i0, i1, nb, dup);
    xw = dup;
  }
#endif
  ForRowGroups(r0, r1, [&]<int G>(int64_t r) {
    GroupQ4<G, kQ41>(a.w + r * a.w_row_bytes, a.w_row_bytes, nb, x, i0, i1, a.y + r, a.ldy, scratch,
                     xw);
  });
}

// ---------------------------------------------------------------------- Q8_0
//
// Signed x signed: maddubs(|w|, x * sign(w)) = sum x w. |w| as u8 is right
// even for w = -128, which GGML's quantizer never writes but the format allows.

template <int RM>
HWY_INLINE void TileQ8_0N1(const uint8_t* HWY_RESTRICT w, size_t ws, int64_t nb,
                           const int8_t* HWY_RESTRICT xq, const float* HWY_RESTRICT xds,
                           float* HWY_RESTRICT y) {
  const DF df;
  const DI8 di8;
  const DU8 du8;
  const D2 d2;
  VF acc[RM];
  for (int r = 0; r < RM; ++r) acc[r] = hn::Zero(df);
  for (int64_t b = 0; b < nb; ++b) {
    VI8 xv[kParts];
    for (int p = 0; p < kParts; ++p) xv[p] = hn::Load(di8, xq + b * 32 + p * kN8);
    const V2 xp = hn::LoadU(d2, xds + 2 * b);
    for (int r = 0; r < RM; ++r) {
      const uint8_t* blk = w + r * ws + b * sizeof(BlockQ8_0);
#if MNEMO_PF
      hwy::Prefetch(blk + MNEMO_PF);
#endif
      const V2 p = hn::Mul(LoadHalfPair(blk), xp);  // lane 0: d * dx
      const auto* q = reinterpret_cast<const int8_t*>(blk + 2);
      const VI8 w0 = hn::LoadU(di8, q);
      VI32 dot = DotU8I8(hn::BitCast(du8, hn::Abs(w0)), ApplySign(xv[0], w0));
      if constexpr (kParts == 2) {
        const VI8 w1 = hn::LoadU(di8, q + kN8);
        dot = hn::Add(dot, DotU8I8(hn::BitCast(du8, hn::Abs(w1)), ApplySign(xv[1], w1)));
      }
      acc[r] = hn::MulAdd(hn::ConvertTo(df, dot), hn::Set(df, hn::GetLane(p)), acc[r]);
    }
  }
  for (int r = 0; r < RM; ++r) y[r] = SumF(acc[r]);
}

// The G weight rows of a group copied once into 32-byte aligned scratch as
// |w| (u8, the unsigned operand of maddubs) and w (whose signs go onto x),
// with their scales decoded into wd ([b][r]), so that every tile over
// activation rows reuses them from L1: rows read straight from the matrix
// (34-byte blocks) split cache lines, and their abs was recomputed per tile.
// Prefetches the next group's rows at the same pace, as PackQ4 does.
template <int G>
HWY_INLINE void PackQ8_0(const uint8_t* HWY_RESTRICT w, size_t ws, int64_t nb,
                         uint8_t* HWY_RESTRICT aw, int8_t* HWY_RESTRICT sw,
                         float* HWY_RESTRICT wd) {
  const DI8 di8;
  const DU8 du8;
  for (int r = 0; r < G; ++r) {
    const uint8_t* row = w + r * ws;
#pragma GCC unroll 4
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * sizeof(BlockQ8_0);
      hwy::Prefetch(blk + G * ws);
      wd[b * G + r] = hn::GetLane(LoadHalfPair(blk));
      const auto* q = reinterpret_cast<const int8_t*>(blk + 2);
      for (int p = 0; p < kParts; ++p) {
        const VI8 v = hn::LoadU(di8, q + p * kN8);
        const size_t o = static_cast<size_t>(b * G + r) * 32 + p * kN8;
        hn::Store(v, di8, sw + o);
        // |-128| wraps to 0x80, which is 128 read as u8.
        hn::Store(hn::BitCast(du8, hn::Abs(v)), du8, aw + o);
      }
    }
  }
}

// RM packed weight rows (of a group of G, starting at aw, sw, dd and y) x RN
// activation rows from i. Per block the RN x vectors stay in registers; each
// weight row's |w| is loaded once for them and its w read from L1 by the
// sign instruction, so that the RM * RN accumulators fit the register file.
template <int RM, int G, int RN>
HWY_INLINE void TileQ8_0(const uint8_t* HWY_RESTRICT aw, const int8_t* HWY_RESTRICT sw, int64_t nb,
                         const float* HWY_RESTRICT dd, const ActView& x, int64_t i,
                         float* HWY_RESTRICT y, int64_t ldy) {
  const DF df;
  const DI8 di8;
  const DU8 du8;
  VF acc[RM][RN];
  for (int r = 0; r < RM; ++r)
    for (int c = 0; c < RN; ++c) acc[r][c] = hn::Zero(df);
  const int8_t* xq[RN];
  for (int c = 0; c < RN; ++c) xq[c] = x.qs(i + c);
  for (int64_t b = 0; b < nb; ++b) {
    VI8 xv[RN][kParts];
    for (int c = 0; c < RN; ++c)
      for (int p = 0; p < kParts; ++p) xv[c][p] = hn::Load(di8, xq[c] + b * 32 + p * kN8);
    for (int r = 0; r < RM; ++r) {
      const size_t o = static_cast<size_t>(b * G + r) * 32;
      VU8 wa[kParts];
      for (int p = 0; p < kParts; ++p) wa[p] = hn::Load(du8, aw + o + p * kN8);
      for (int c = 0; c < RN; ++c) {
        VI32 dot = DotU8I8(wa[0], ApplySign(xv[c][0], hn::Load(di8, sw + o)));
        if constexpr (kParts == 2) {
          dot = hn::Add(dot, DotU8I8(wa[1], ApplySign(xv[c][1], hn::Load(di8, sw + o + kN8))));
        }
        acc[r][c] =
            hn::MulAdd(hn::ConvertTo(df, dot), hn::Set(df, dd[(b * RN + c) * G + r]), acc[r][c]);
      }
    }
  }
  StoreTile<RM, RN, G>(acc, nullptr, y, i, ldy);
}

// All G packed weight rows x RN activation rows from i: the scale products
// once for the group, then tiles of up to kRM rows.
template <int G, int RN>
HWY_INLINE void ColumnsQ8_0(const uint8_t* aw, const int8_t* sw, int64_t nb, const float* wd,
                            float* dd, const ActView& x, int64_t i, float* y, int64_t ldy) {
  constexpr int kRM = G < MNEMO_Q8_RM ? G : MNEMO_Q8_RM;
  static_assert(G % kRM == 0);
  const float* xd[RN];
  for (int c = 0; c < RN; ++c) xd[c] = x.d(i + c);
  ScaleProducts<G, RN>(wd, nb, xd, dd);
  for (int r = 0; r < G; r += kRM) {
    TileQ8_0<kRM, G, RN>(aw + r * 32, sw + r * 32, nb, dd + r, x, i, y + r, ldy);
  }
}

// Floats of scratch GroupQ8_0 uses for G rows of nb blocks.
constexpr size_t Q8ScratchFloats(int G, int64_t nb) {
  return static_cast<size_t>((1 + MNEMO_Q8_RN + 16) * G * nb + 8);
}

template <int G>
HWY_INLINE void GroupQ8_0(const uint8_t* w, size_t ws, int64_t nb, const ActView& x, int64_t i0,
                          int64_t i1, float* y, int64_t ldy, float* scratch) {
  constexpr int kRN = MNEMO_Q8_RN;
  // Packed |w| and w first (32-byte aligned), then wd, dd.
  uint8_t* aw = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(scratch) + 31) & ~uintptr_t{31});
  int8_t* sw = reinterpret_cast<int8_t*>(aw + 32 * G * nb);
  float* wd = reinterpret_cast<float*>(sw + 32 * G * nb);
  float* dd = wd + G * nb;
  PackQ8_0<G>(w, ws, nb, aw, sw, wd);
  ForColumnTiles<kRN>(i0, i1, [&]<int RN>(int64_t i) {
    ColumnsQ8_0<G, RN>(aw, sw, nb, wd, dd, x, i, y, ldy);
  });
}

#if HWY_TARGET == HWY_AVX3_DL
// AVX-512 VNNI: vpdpbusd multiplies u8 by s8 into i32 with no i16 step (no
// saturation), so a weight w goes in as the u8 w + 128 and each lane's sum
// starts at -128 times the sum of x over its four bytes:
//   sum (w + 128) x - 128 sum x = sum w x,
// the very i32 lanes GGML's abs/sign form gives, without the per-row sign
// instruction and its second weight load.
#ifndef MNEMO_Q8V_RN
#define MNEMO_Q8V_RN 4
#endif

// acc + the u8 x s8 products of u and the 32 bytes at p, 4 per i32 lane.
HWY_INLINE VI32 DpBusdMem(VI32 acc, VU8 u, const int8_t* HWY_RESTRICT p) {
  asm("%{evex%} vpdpbusd %2, %1, %0"
      : "+v"(acc.raw)
      : "v"(u.raw), "m"(*reinterpret_cast<const __m256i*>(p)));
  return acc;
}

// ns[(i - i0) * nb + b]: -128 x (sum of activation row i's block b over
// each 4 bytes), one vector per block.
HWY_INLINE void NegSums128(const ActView& x, int64_t i0, int64_t i1, int64_t nb,
                           int32_t* HWY_RESTRICT ns) {
  const DU8 du8;
  const DI32 di32;
  const VU8 k128 = hn::Set(du8, 0x80);
  for (int64_t i = i0; i < i1; ++i) {
    const int8_t* xq = x.qs(i);
    for (int64_t b = 0; b < nb; ++b) {
      const VI32 s = DpBusdMem(hn::Zero(di32), k128, xq + b * 32);
      hn::Store(hn::Neg(s), di32, ns + ((i - i0) * nb + b) * 8);
    }
  }
}

// The G weight rows of a group as w + 128 (u8, 32-byte aligned, [b][r][32])
// with their scales decoded into wd ([b][r]); next group prefetched as
// PackQ4 does.
// With kPairs, bw is in the pair layout of TilePairs instead.
template <int G, bool kPairs = false>
HWY_INLINE void PackQ8_0Biased(const uint8_t* HWY_RESTRICT w, size_t ws, int64_t nb,
                               uint8_t* HWY_RESTRICT bw, float* HWY_RESTRICT wd) {
  const DU8 du8;
  const VU8 k128 = hn::Set(du8, 0x80);
  for (int r = 0; r < G; ++r) {
    const uint8_t* row = w + r * ws;
#pragma GCC unroll 4
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * sizeof(BlockQ8_0);
      hwy::Prefetch(blk + G * ws);
      wd[b * G + r] = hn::GetLane(LoadHalfPair(blk));
      const VU8 v = hn::Xor(hn::LoadU(du8, blk + 2), k128);
      if constexpr (kPairs) {
        StorePairRow(bw, b, G, r, v);
      } else {
        hn::Store(v, du8, bw + static_cast<size_t>(b * G + r) * 32);
      }
    }
  }
}

// RM biased weight rows (of a group of G) x RN activation rows from i: per
// (row, activation row, block) one vpdpbusd (x read from memory), one cvt
// and one fma.
template <int RM, int G, int RN>
HWY_INLINE void TileQ8_0Biased(const uint8_t* HWY_RESTRICT bw, int64_t nb,
                               const float* HWY_RESTRICT dd, const int32_t* HWY_RESTRICT ns,
                               const ActView& x, int64_t i, float* HWY_RESTRICT y, int64_t ldy) {
  const DF df;
  const DU8 du8;
  const DI32 di32;
  VF acc[RM][RN];
  for (int r = 0; r < RM; ++r)
    for (int c = 0; c < RN; ++c) acc[r][c] = hn::Zero(df);
  const int8_t* xq[RN];
  for (int c = 0; c < RN; ++c) xq[c] = x.qs(i + c);
  for (int64_t b = 0; b < nb; ++b) {
    VI32 n[RN];
    for (int c = 0; c < RN; ++c) n[c] = hn::Load(di32, ns + (c * nb + b) * 8);
    for (int r = 0; r < RM; ++r) {
      const VU8 wv = hn::Load(du8, bw + static_cast<size_t>(b * G + r) * 32);
      for (int c = 0; c < RN; ++c) {
        const VI32 dot = DpBusdMem(n[c], wv, xq[c] + b * 32);
        acc[r][c] =
            hn::MulAdd(hn::ConvertTo(df, dot), hn::Set(df, dd[(b * RN + c) * G + r]), acc[r][c]);
      }
    }
  }
  StoreTile<RM, RN, G>(acc, nullptr, y, i, ldy);
}

template <int G, int RN>
HWY_INLINE void ColumnsQ8_0Biased(const uint8_t* bw, int64_t nb, const float* wd, float* dd,
                                  const int32_t* ns, const ActView& x, int64_t i, float* y,
                                  int64_t ldy) {
  constexpr int kRM = G < 4 ? G : 4;
  static_assert(G % kRM == 0);
  const float* xd[RN];
  for (int c = 0; c < RN; ++c) xd[c] = x.d(i + c);
  ScaleProducts<G, RN>(wd, nb, xd, dd);
  for (int r = 0; r < G; r += kRM) {
    TileQ8_0Biased<kRM, G, RN>(bw + r * 32, nb, dd + r, ns, x, i, y + r, ldy);
  }
}

// Floats of scratch GroupQ8_0Biased uses for G rows of nb blocks (the
// activation sums come after).
constexpr size_t Q8BiasedScratchFloats(int G, int64_t nb) {
  return static_cast<size_t>((8 + 1 + MNEMO_Q8V_RN) * G * nb + 8);
}

template <int G>
HWY_INLINE void GroupQ8_0Biased(const uint8_t* w, size_t ws, int64_t nb, const ActView& x,
                                int64_t i0, int64_t i1, const int32_t* ns, float* y, int64_t ldy,
                                float* scratch) {
  constexpr int kRN = MNEMO_Q8V_RN;
  uint8_t* bw = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(scratch) + 31) & ~uintptr_t{31});
  float* wd = reinterpret_cast<float*>(bw + 32 * G * nb);
  float* dd = wd + G * nb;
  PackQ8_0Biased<G>(w, ws, nb, bw, wd);
  ForColumnTiles<kRN>(i0, i1, [&]<int RN>(int64_t i) {
    ColumnsQ8_0Biased<G, RN>(bw, nb, wd, dd, ns + (i - i0) * nb * 8, x, i, y, ldy);
  });
}

// -128 x the sums over each 4-byte group of the duplicated activations xw
// (rows x nb blocks), in xw's layout: ns[(row * nb + b) * 16].
HWY_INLINE void NegSums128Pairs(const uint8_t* HWY_RESTRICT xw, int64_t rows, int64_t nb,
                                int32_t* HWY_RESTRICT ns) {
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < rows * nb; ++k) {
    const __m512i s = DpBusd512(_mm512_setzero_si512(), k128, _mm512_load_si512(xw + k * 64));
    _mm512_store_si512(ns + k * 16, _mm512_sub_epi32(_mm512_setzero_si512(), s));
  }
}

// GroupQ8_0Biased with pair tiles: x duplicated in xw, ns its -128 sums.
template <int G>
HWY_INLINE void GroupQ8_0Pairs(const uint8_t* w, size_t ws, int64_t nb, const ActView& x,
                               int64_t i0, int64_t i1, const uint8_t* xw, const int32_t* ns,
                               float* y, int64_t ldy, float* scratch) {
  constexpr int kRN = MNEMO_WIDE_RN;
  uint8_t* bw =
      reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t{63});
  float* wd = reinterpret_cast<float*>(bw + 32 * G * nb);
  float* dd = wd + G * nb;
  PackQ8_0Biased<G, true>(w, ws, nb, bw, wd);
  ForColumnTiles<kRN>(i0, i1, [&]<int RN>(int64_t i) {
    ColumnsPairs<G, RN>(bw, nb, wd, dd, x, i, xw + (i - i0) * nb * 64, ns + (i - i0) * nb * 16,
                        nullptr, y, ldy);
  });
}
#endif  // HWY_TARGET == HWY_AVX3_DL

void GemmQ8_0(const GemmArgs& a, int64_t r0, int64_t r1, int64_t i0, int64_t i1) {
  const int64_t nb = a.format.blocks;
  const ActView x{a.x, a.format.row_bytes, &a.format};
  if (i1 - i0 == 1) {
    const int8_t* xq = x.qs(i0);
    const float* xds = x.ds(i0);
    float* y = a.y + i0 * a.ldy;
    int64_t r = r0;
    constexpr int kRM1 = MNEMO_N1_RM;
    for (; r + kRM1 <= r1; r += kRM1) {
      TileQ8_0N1<kRM1>(a.w + r * a.w_row_bytes, a.w_row_bytes, nb, xq, xds, y + r);
    }
    for (; r < r1; ++r) TileQ8_0N1<1>(a.w + r * a.w_row_bytes, a.w_row_bytes, nb, xq, xds, y + r);
    return;
  }
  constexpr int kG = kMaxRowGroup;
#if HWY_TARGET == HWY_AVX3_DL
  if (WideTiles()) {
    float* scratch = ScaleScratch(Q8BiasedScratchFloats(kG, nb) + 16);
    uint8_t* xw = DupScratch(i1 - i0, nb);
    DupActivations(x, i0, i1, nb, xw);
    int32_t* ns = reinterpret_cast<int32_t*>(xw + (i1 - i0) * nb * 64);
    NegSums128Pairs(xw, i1 - i0, nb, ns);
    int32_t* ns8 = nullptr;  // the 256-bit tiles' sums, for the last rows'
                             // single-row groups
    if ((r1 - r0) % 4 != 0) {
      ns8 = ns + (i1 - i0) * nb * 16;
      NegSums128(x, i0, i1, nb, ns8);
    }
    ForRowGroups(r0, r1, [&]<int G>(int64_t r) {
      if constexpr (G % 4 == 0) {
        GroupQ8_0Pairs<G>(a.w + r * a.w_row_bytes, a.w_row_bytes, nb, x, i0, i1, xw, ns, a.y + r,
                          a.ldy, scratch);
      } else {
        GroupQ8_0Biased<G>(a.w + r * a.w_row_bytes, a.w_row_bytes, nb, x, i0, i1, ns8, a.y + r,
                           a.ldy, scratch);
      }
    });
    return;
  }
  {
    const size_t group_floats = Q8BiasedScratchFloats(kG, nb);
    float* scratch = ScaleScratch(group_floats + static_cast<size_t>((i1 - i0) * nb * 8) + 16);
    int32_t* ns = reinterpret_cast<int32_t*>(
        (reinterpret_cast<uintptr_t>(scratch + group_floats) + 31) & ~uintptr_t{31});
    NegSums128(x, i0, i1, nb, ns);
    ForRowGroups(r0, r1, [&]<int G>(int64_t r) {
      GroupQ8_0Biased<G>(a.w + r * a.w_row_bytes, a.w_row_bytes, nb, x, i0, i1, ns, a.y + r, a.ldy, scratch);
    });
    return;
  }
#endif
  float* scratch = ScaleScratch(Q8ScratchFloats(kG, nb));
  ForRowGroups(r0, r1, [&]<int G>(int64_t r) {
    GroupQ8_0<G>(a.w + r * a.w_row_bytes, a.w_row_bytes, nb, x, i0, i1, a.y + r, a.ldy, scratch);
  });
}

// ---------------------------------------------------------------- Q4_K, Q6_K

// Q4_K x Q8_K for one weight row and one activation row.
float DotQ4K(const BlockQ4_K* HWY_RESTRICT w, const ActView& x, int64_t i, int64_t nb) {
  const DF df;
  const DU8 du8;
  const DI8 di8;
  const DI32 di32;
  const int8_t* xq = x.qs(i);
  const float* xd = x.d(i);
  const int16_t* bsums = x.bsums(i);
  VF acc = hn::Zero(df);
  float acc_min = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t sc[8], mn[8];
    for (int j = 0; j < 8; ++j) Q4KScaleMin(j, w[b].scales, &sc[j], &mn[j]);
    VI32 sumi = hn::Zero(di32);
    for (int chunk = 0; chunk < 4; ++chunk) {
      const VI32 s_lo = hn::Set(di32, sc[2 * chunk]);
      const VI32 s_hi = hn::Set(di32, sc[2 * chunk + 1]);
      for (int p = 0; p < kParts; ++p) {
        const VU8 q = hn::LoadU(du8, w[b].qs + chunk * 32 + p * kN8);
        const VI8 x_lo = hn::Load(di8, xq + b * kQKK + chunk * 64 + p * kN8);
        const VI8 x_hi = hn::Load(di8, xq + b * kQKK + chunk * 64 + 32 + p * kN8);
        sumi = hn::Add(sumi, hn::Mul(DotU8I8(hn::And(q, hn::Set(du8, 0x0F)), x_lo), s_lo));
        sumi = hn::Add(sumi, hn::Mul(DotU8I8(hn::ShiftRight<4>(q), x_hi), s_hi));
      }
    }
    int summ = 0;
    for (int j = 0; j < 16; ++j) summ += bsums[b * 16 + j] * mn[j / 2];
    acc = hn::MulAdd(hn::ConvertTo(df, sumi), hn::Set(df, HalfToFloat(w[b].d) * xd[b]), acc);
    acc_min += HalfToFloat(w[b].dmin) * xd[b] * static_cast<float>(summ);
  }
  return SumF(acc) - acc_min;
}

// Q6_K x Q8_K: 6-bit values taken as unsigned 0..63; the -32 offset comes
// back through the activation's 16-element sums.
float DotQ6K(const BlockQ6_K* HWY_RESTRICT w, const ActView& x, int64_t i, int64_t nb) {
  const DF df;
  const DU8 du8;
  const DI8 di8;
  const DI32 di32;
  const int8_t* xq = x.qs(i);
  const float* xd = x.d(i);
  const int16_t* bsums = x.bsums(i);
  const auto m4 = hn::Set(du8, 0x0F);
  const auto m2 = hn::Set(du8, 0x03);
  VF acc = hn::Zero(df);
  float acc_offset = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    // Scale of each i32 lane: lane k covers bytes 4k..4k+3, sub-block (4k)/16.
    alignas(64) int32_t lane_scale[kQKK / 4];
    for (int k = 0; k < kQKK / 4; ++k) lane_scale[k] = w[b].scales[k / 4];
    int offset = 0;
    for (int j = 0; j < 16; ++j) offset += w[b].scales[j] * bsums[b * 16 + j];
    VI32 sumi = hn::Zero(di32);
    const int8_t* xb = xq + b * kQKK;
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = w[b].ql + half * 64;
      const uint8_t* qh = w[b].qh + half * 32;
      for (int p = 0; p < kParts; ++p) {
        const int l0 = static_cast<int>(p * kN8);
        const VU8 ql0 = hn::LoadU(du8, ql + l0);
        const VU8 ql1 = hn::LoadU(du8, ql + 32 + l0);
        const VU8 h = hn::LoadU(du8, qh + l0);
        const VU8 a0 = hn::Or(hn::And(ql0, m4), hn::ShiftLeft<4>(hn::And(h, m2)));
        const VU8 a1 = hn::Or(hn::And(ql1, m4), hn::ShiftLeft<4>(hn::And(hn::ShiftRight<2>(h), m2)));
        const VU8 a2 = hn::Or(hn::ShiftRight<4>(ql0), hn::ShiftLeft<4>(hn::And(hn::ShiftRight<4>(h), m2)));
        const VU8 a3 = hn::Or(hn::ShiftRight<4>(ql1), hn::ShiftLeft<4>(hn::ShiftRight<6>(h)));
        const VU8 a[4] = {a0, a1, a2, a3};
        for (int k = 0; k < 4; ++k) {
          const int e = half * 128 + k * 32 + l0;  // element index of lane 0
          const VI8 xv = hn::Load(di8, xb + e);
          sumi = hn::Add(sumi, hn::Mul(DotU8I8(a[k], xv), hn::Load(di32, lane_scale + e / 4)));
        }
      }
    }
    const float d = HalfToFloat(w[b].d) * xd[b];
    acc = hn::MulAdd(hn::ConvertTo(df, sumi), hn::Set(df, d), acc);
    acc_offset += d * 32.0f * static_cast<float>(offset);
  }
  return SumF(acc) - acc_offset;
}

template <typename Block, float (*kDot)(const Block*, const ActView&, int64_t, int64_t)>
void GemmK(const GemmArgs& a, int64_t r0, int64_t r1, int64_t i0, int64_t i1) {
  const int64_t nb = a.format.blocks;
  const ActView x{a.x, a.format.row_bytes, &a.format};
  for (int64_t r = r0; r < r1; ++r) {
    const auto* w = reinterpret_cast<const Block*>(a.w + r * a.w_row_bytes);
    for (int64_t i = i0; i < i1; ++i) a.y[i * a.ldy + r] = kDot(w, x, i, nb);
  }
}

#else  // HWY_TARGET == HWY_SCALAR

// The single-lane fallback: plain integer dot products per block.
float DotQuantScalar(DType type, const uint8_t* w, const ActView& x, int64_t i, int64_t nb) {
  const int8_t* xq = x.qs(i);
  const float* xd = x.d(i);
  float sum = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    switch (type) {
      case DType::kQ4_0:
      case DType::kQ4_1: {
        const bool q41 = type == DType::kQ4_1;
        const uint8_t* blk = w + b * (q41 ? sizeof(BlockQ4_1) : sizeof(BlockQ4_0));
        uint16_t h[2];
        std::memcpy(h, blk, 4);
        const uint8_t* qs = blk + (q41 ? 4 : 2);
        int sumi = 0;
        for (int j = 0; j < 16; ++j) {
          sumi += (qs[j] & 0xF) * xq[b * 32 + j] + (qs[j] >> 4) * xq[b * 32 + 16 + j];
        }
        const float d = F16ToF32(h[0]);
        const float m = q41 ? F16ToF32(h[1]) : -8.0f * d;
        sum += static_cast<float>(sumi) * (d * xd[b]) + m * x.s(i)[b];
        break;
      }
      case DType::kQ8_0: {
        const auto* blk = reinterpret_cast<const BlockQ8_0*>(w) + b;
        int sumi = 0;
        for (int j = 0; j < 32; ++j) sumi += blk->qs[j] * xq[b * 32 + j];
        sum += static_cast<float>(sumi) * (F16ToF32(blk->d) * xd[b]);
        break;
      }
      case DType::kQ4_K: {
        const auto& blk = reinterpret_cast<const BlockQ4_K*>(w)[b];
        uint8_t q[kQKK], sc[8], mn[8];
        UnpackQ4_K(blk, q, sc, mn);
        int sumi = 0, summ = 0;
        for (int j = 0; j < kQKK; ++j) sumi += sc[j / 32] * q[j] * xq[b * kQKK + j];
        for (int j = 0; j < 16; ++j) summ += x.bsums(i)[b * 16 + j] * mn[j / 2];
        sum += F16ToF32(blk.d) * xd[b] * static_cast<float>(sumi) -
               F16ToF32(blk.dmin) * xd[b] * static_cast<float>(summ);
        break;
      }
      case DType::kQ6_K: {
        const auto& blk = reinterpret_cast<const BlockQ6_K*>(w)[b];
        int8_t q[kQKK];
        UnpackQ6_K(blk, q);
        int sumi = 0;
        for (int j = 0; j < kQKK; ++j) sumi += blk.scales[j / 16] * q[j] * xq[b * kQKK + j];
        sum += F16ToF32(blk.d) * xd[b] * static_cast<float>(sumi);
        break;
      }
      default:
        MNEMO_CHECK(false);
    }
  }
  return sum;
}

void GemmQuantScalar(const GemmArgs& a, int64_t r0, int64_t r1, int64_t i0, int64_t i1) {
  const ActView x{a.x, a.format.row_bytes, &a.format};
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t i = i0; i < i1; ++i) {
      a.y[i * a.ldy + r] =
          DotQuantScalar(a.w_type, a.w + r * a.w_row_bytes, x, i, a.format.blocks);
    }
  }
}

#endif  // HWY_TARGET != HWY_SCALAR

// ------------------------------------------------------------ F32, F16, BF16

template <DType kType>
HWY_INLINE VF LoadAsF32(const uint8_t* p, int64_t k) {
  const DF df;
  if constexpr (kType == DType::kF32) {
    return hn::LoadU(df, reinterpret_cast<const float*>(p) + k);
  } else if constexpr (kType == DType::kF16) {
    return LoadF16(df, reinterpret_cast<const uint16_t*>(p) + k);
  } else {
    const hn::Rebind<uint16_t, DF> du16;
    const hn::RebindToUnsigned<DF> du32;
    const auto u = hn::PromoteTo(du32, hn::LoadU(du16, reinterpret_cast<const uint16_t*>(p) + k));
    return hn::BitCast(df, hn::ShiftLeft<16>(u));
  }
}

template <DType kType>
float ScalarAt(const uint8_t* p, int64_t k) {
  if constexpr (kType == DType::kF32) {
    return reinterpret_cast<const float*>(p)[k];
  } else if constexpr (kType == DType::kF16) {
    return F16ToF32(reinterpret_cast<const uint16_t*>(p)[k]);
  } else {
    return BF16ToF32(reinterpret_cast<const uint16_t*>(p)[k]);
  }
}

template <DType kType>
void GemmFloat(const GemmArgs& a, int64_t r0, int64_t r1, int64_t i0, int64_t i1) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t cols = a.format.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = a.w + r * a.w_row_bytes;
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* x = a.x + i * a.format.row_bytes;
      VF acc0 = hn::Zero(df), acc1 = hn::Zero(df);
      int64_t k = 0;
      for (; k + 2 * N <= cols; k += 2 * N) {
        acc0 = hn::MulAdd(LoadAsF32<kType>(w, k), LoadAsF32<kType>(x, k), acc0);
        acc1 = hn::MulAdd(LoadAsF32<kType>(w, k + N), LoadAsF32<kType>(x, k + N), acc1);
      }
      for (; k + N <= cols; k += N) {
        acc0 = hn::MulAdd(LoadAsF32<kType>(w, k), LoadAsF32<kType>(x, k), acc0);
      }
      float sum = SumF(hn::Add(acc0, acc1));
      for (; k < cols; ++k) sum += ScalarAt<kType>(w, k) * ScalarAt<kType>(x, k);
      a.y[i * a.ldy + r] = sum;
    }
  }
}

void GemmImpl(const GemmArgs& a, int64_t r0, int64_t r1, int64_t i0, int64_t i1) {
  switch (a.w_type) {
#if HWY_TARGET != HWY_SCALAR
    case DType::kQ4_0:
      return GemmQ4<false>(a, r0, r1, i0, i1);
    case DType::kQ4_1:
      return GemmQ4<true>(a, r0, r1, i0, i1);
    case DType::kQ8_0:
      return GemmQ8_0(a, r0, r1, i0, i1);
    case DType::kQ4_K:
      return GemmK<BlockQ4_K, DotQ4K>(a, r0, r1, i0, i1);
    case DType::kQ6_K:
      return GemmK<BlockQ6_K, DotQ6K>(a, r0, r1, i0, i1);
#else
    case DType::kQ4_0:
    case DType::kQ4_1:
    case DType::kQ8_0:
    case DType::kQ4_K:
    case DType::kQ6_K:
      return GemmQuantScalar(a, r0, r1, i0, i1);
#endif
    case DType::kF32:
      return GemmFloat<DType::kF32>(a, r0, r1, i0, i1);
    case DType::kF16:
      return GemmFloat<DType::kF16>(a, r0, r1, i0, i1);
    case DType::kBF16:
      return GemmFloat<DType::kBF16>(a, r0, r1, i0, i1);
    default:
      MNEMO_CHECK_MSG(false, "not a weight type");
  }
}

// ------------------------------------------------------ Activation quantizer

void QuantizeQ8Blocks(const ActFormat& f, const float* HWY_RESTRICT x, uint8_t* row) {
  const hn::ScalableTag<float> df;
  const hn::RebindToSigned<decltype(df)> di32;
  const hn::Rebind<int8_t, decltype(di32)> di8;
  const size_t N = hn::Lanes(df);
  auto* qs = reinterpret_cast<int8_t*>(row);
  auto* dd = reinterpret_cast<float*>(row + f.d_offset);
  auto* ss = reinterpret_cast<float*>(row + f.s_offset);
  auto* ds = reinterpret_cast<float*>(row + f.ds_offset);
  for (int64_t b = 0; b < f.blocks; ++b) {
    const float* xb = x + b * kQK;
    auto vmax = hn::Zero(df);
    for (size_t j = 0; j < kQK; j += N) vmax = hn::Max(vmax, hn::Abs(hn::LoadU(df, xb + j)));
    const float amax = hn::GetLane(hn::MaxOfLanes(df, vmax));
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    const auto vid = hn::Set(df, id);
    auto vsum = hn::Zero(di32);
    for (size_t j = 0; j < kQK; j += N) {
      const auto q = hn::NearestInt(hn::Mul(hn::LoadU(df, xb + j), vid));
      vsum = hn::Add(vsum, q);
      hn::StoreU(hn::DemoteTo(di8, q), di8, qs + b * kQK + j);
    }
    const float sum = static_cast<float>(hn::GetLane(hn::SumOfLanes(di32, vsum)));
    dd[b] = RoundF16(d);
    ss[b] = f.type == DType::kQ8_1 ? RoundF16(d * sum) : dd[b] * sum;
    ds[2 * b] = dd[b];
    ds[2 * b + 1] = ss[b];
  }
}

void QuantizeQ8KBlocks(const ActFormat& f, const float* HWY_RESTRICT x, uint8_t* row) {
  const hn::ScalableTag<float> df;
  const hn::RebindToSigned<decltype(df)> di32;
  const hn::Rebind<int8_t, decltype(di32)> di8;
  const size_t N = hn::Lanes(df);
  auto* qs = reinterpret_cast<int8_t*>(row);
  auto* dd = reinterpret_cast<float*>(row + f.d_offset);
  auto* bsums = reinterpret_cast<int16_t*>(row + f.s_offset);
  for (int64_t b = 0; b < f.blocks; ++b) {
    const float* xb = x + b * kQKK;
    int8_t* qb = qs + b * kQKK;
    auto vmax = hn::Zero(df);
    for (size_t j = 0; j < kQKK; j += N) vmax = hn::Max(vmax, hn::Abs(hn::LoadU(df, xb + j)));
    const float amax = hn::GetLane(hn::MaxOfLanes(df, vmax));
    if (amax == 0.0f) {
      std::memset(qb, 0, kQKK);
      std::memset(bsums + b * 16, 0, 32);
      dd[b] = 0.0f;
      continue;
    }
    // The reference keeps the sign of the first element of largest magnitude.
    float max = 0.0f;
    for (int j = 0; j < kQKK; ++j) {
      if (std::fabs(xb[j]) == amax) {
        max = xb[j];
        break;
      }
    }
    const float iscale = -127.0f / max;
    const auto vis = hn::Set(df, iscale);
    const auto v127 = hn::Set(di32, 127);
    for (int g = 0; g < kQKK / 16; ++g) {
      auto vsum = hn::Zero(di32);
      for (size_t j = g * 16; j < static_cast<size_t>(g + 1) * 16; j += N) {
        const auto q = hn::Min(hn::NearestInt(hn::Mul(vis, hn::LoadU(df, xb + j))), v127);
        vsum = hn::Add(vsum, q);
        hn::StoreU(hn::DemoteTo(di8, q), di8, qb + j);
      }
      bsums[b * 16 + g] = static_cast<int16_t>(hn::GetLane(hn::SumOfLanes(di32, vsum)));
    }
    dd[b] = 1.0f / iscale;
  }
}

void F32ToF16RowImpl(const float* HWY_RESTRICT x, uint16_t* HWY_RESTRICT y, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  for (; i + N <= n; i += N) StoreF16(df, hn::LoadU(df, x + i), y + i);
  for (; i < n; ++i) y[i] = F32ToF16(x[i]);
}

void F32ToBF16Row(const float* HWY_RESTRICT x, uint16_t* HWY_RESTRICT y, int64_t n) {
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du32;
  const hn::Rebind<uint16_t, decltype(df)> du16;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto u = hn::BitCast(du32, hn::LoadU(df, x + i));
    const auto rounded = hn::ShiftRight<16>(
        hn::Add(u, hn::Add(hn::Set(du32, 0x7fff), hn::And(hn::ShiftRight<16>(u), hn::Set(du32, 1)))));
    const auto nan = hn::Or(hn::ShiftRight<16>(u), hn::Set(du32, 64));
    const auto is_nan = hn::Gt(hn::And(u, hn::Set(du32, 0x7fffffff)), hn::Set(du32, 0x7f800000));
    const hn::RebindToSigned<decltype(du32)> di32;
    hn::StoreU(hn::DemoteTo(du16, hn::BitCast(di32, hn::IfThenElse(is_nan, nan, rounded))), du16,
               y + i);
  }
  for (; i < n; ++i) y[i] = F32ToBF16(x[i]);
}

void QuantizeActRowImpl(const ActFormat& f, const float* x, void* row) {
  auto* out = static_cast<uint8_t*>(row);
  switch (f.type) {
    case DType::kQ8_0:
    case DType::kQ8_1:
      return QuantizeQ8Blocks(f, x, out);
    case DType::kQ8_K:
      return QuantizeQ8KBlocks(f, x, out);
    case DType::kF16:
      return F32ToF16RowImpl(x, reinterpret_cast<uint16_t*>(out), f.cols);
    case DType::kBF16:
      return F32ToBF16Row(x, reinterpret_cast<uint16_t*>(out), f.cols);
    case DType::kF32:
      std::memcpy(out, x, static_cast<size_t>(f.cols) * 4);
      return;
    default:
      MNEMO_CHECK_MSG(false, "not an activation type");
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace mnemo::kernels::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mnemo::kernels::cpu {

HWY_EXPORT(GemmImpl);
HWY_EXPORT(QuantizeActRowImpl);
HWY_EXPORT(F32ToF16RowImpl);

void Gemm(const GemmArgs& args, int64_t r0, int64_t r1, int64_t i0, int64_t i1) {
  HWY_DYNAMIC_DISPATCH(GemmImpl)(args, r0, r1, i0, i1);
}

void QuantizeActRow(const ActFormat& format, const float* x, void* row) {
  HWY_DYNAMIC_DISPATCH(QuantizeActRowImpl)(format, x, row);
}

void F32ToF16Row(const float* x, uint16_t* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(F32ToF16RowImpl)(x, y, n);
}

namespace {
bool DefaultWideTiles() {
  if (const char* env = std::getenv("MNEMO_WIDE_TILES"); env != nullptr && *env != '\0') {
    return std::strcmp(env, "0") != 0;
  }
#if HWY_ARCH_X86
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}
std::atomic<int> g_wide_tiles{-1};
}  // namespace

bool WideTiles() {
  static const bool kDefault = DefaultWideTiles();
  const int forced = g_wide_tiles.load(std::memory_order_relaxed);
  return forced < 0 ? kDefault : forced != 0;
}

void SetWideTilesForTest(int wide) { g_wide_tiles.store(wide < 0 ? -1 : wide != 0 ? 1 : 0); }

}  // namespace mnemo::kernels::cpu
#endif  // HWY_ONCE
