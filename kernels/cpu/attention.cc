// Causal attention over fp16 KV pages that reproduces, bit for bit, the
// arithmetic of llama.cpp's CPU flash attention (ggml's
// ggml_compute_forward_flash_attn_ext_f16, ggml 0.25.3, x86 AVX2+FMA build)
// with an f16 KV cache. The model has near-ties between top tokens, and a
// one-ulp difference here flips the activation quantization of the next
// matmul, so "close" is not enough to agree with llama.cpp's tokens.
//
// llama.cpp picks one of three algorithms per ubatch; mnemo picks the same
// one per sequence from the query rows that sequence has in this call:
//  - Tiled (>= 64 rows, prefill): f32 Q·K over 64-key tiles aligned at key
//    0, per-tile max and ggml_v_expf softmax, f32 P·V (TiledRows).
//  - One chunk (fewer rows): Q rounded to f16, ggml_vec_dot_f16 scores, a
//    per-key online softmax with libm expf and an f16 V accumulator
//    (OneChunkRows).
//  One departure: 2 to 63 rows over a context of 64 keys or more (a turn
//  appended to a session's history, the common case of a daemon that keeps
//  sessions) take the tiled path, whose per-row result is the same whatever
//  the other rows; the one-chunk recurrence costs ~3x as much per key there
//  (a 32-token turn over 8k tokens: 0.82 s of attention against 0.26 s). A
//  fresh prompt of fewer than 64 tokens and every decode row still compute
//  as llama.cpp does.
//  - Split KV (one row, padded cache >= 512 keys, i.e. decode past 256
//    tokens): the one-chunk algorithm on kLlamaThreads key ranges, merged
//    (OneChunkRows with split).
// Keys past a row's causal limit are masked to -inf in llama.cpp; they add
// exact zeros there (x + 0, fma(0, v, acc)) or are skipped, so mnemo simply
// leaves them out. Bit-exactness needs fused multiply-adds and F16C
// conversions: x86 AVX2 and AVX-512 targets. Other targets compute the same
// sequence less exactly (unfused multiply-adds).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "common/check.h"
#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/attention.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "kernels/cpu/f16-inl.h"
#include "kernels/cpu/ggml_exp-inl.h"

#ifndef MNEMO_KERNELS_CPU_ATTENTION_CONSTANTS_
#define MNEMO_KERNELS_CPU_ATTENTION_CONSTANTS_
namespace mnemo::kernels::cpu {
namespace {
// GGML_FA_TILE_Q and GGML_FA_TILE_KV: a sequence with at least kTile query
// rows takes the tiled path, whose key tiles are kTile wide.
constexpr int64_t kTile = 64;
// Query rows the tiled path computes together (sharing each K and V load),
// at most: see kTiledRows.
constexpr int kRowsTogether = 6;
// Decode (one query row) splits the keys into this many ranges when
// llama.cpp's padded cache length reaches kSplitKeys: llama.cpp uses one
// range per thread, so this reproduces llama.cpp run with 2 threads, as the
// reference data is.
constexpr int64_t kLlamaThreads = 2;
constexpr int64_t kSplitKeys = 512;
// llama.cpp pads the cache length its attention sees to a multiple of this.
constexpr int64_t kCachePad = 256;
// How far ahead the decode path prefetches K rows from the pages.
constexpr int64_t kPrefetchKeys = 8;
}  // namespace
}  // namespace mnemo::kernels::cpu
#endif

HWY_BEFORE_NAMESPACE();
namespace mnemo::kernels::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Rows per group in the tiled path: 6 x 4 accumulators where the register
// file has 32 vectors (AVX-512: 1.4x over 3 rows, the K and V loads and
// conversions shared by twice the FMAs), 3 x 4 where it has 16.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
constexpr int kTiledRows = 6;
#else
constexpr int kTiledRows = 3;
#endif
static_assert(kTiledRows <= kRowsTogether);
// ggml's AVX2 reductions group lanes by __m256: 8 floats.
using D8 = hn::CappedTag<float, 8>;
using V8 = hn::Vec<D8>;

// Rounds each lane to the nearest-even fp16 value, as storing into ggml's
// f16 accumulator and reading it back does.
template <class D>
HWY_INLINE hn::Vec<D> RoundToF16(D d, hn::Vec<D> v) {
#if MNEMO_HAVE_F16C
  const hn::Rebind<hwy::float16_t, D> dh;
  return hn::PromoteTo(d, hn::DemoteTo(dh, v));
#else
  HWY_ALIGN uint16_t h[hn::MaxLanes(d)];
  StoreF16(d, v, h);
  return LoadF16(d, h);
#endif
}

// Converts K or V rows of keys [j0, j0 + n) of kv head kvh to f32 rows of
// out, page by page (a page's rows of one head are contiguous).
HWY_INLINE void KeysToF32(const AttentionSeq& seq, const KvLayout& L, int32_t kvh, bool values,
                          int64_t j0, int64_t n, float* HWY_RESTRICT out) {
  const int64_t P = L.page_tokens;
  const int64_t D = L.head_dim;
  for (int64_t j = 0; j < n;) {
    const int64_t slot = (j0 + j) % P;
    const int64_t m = std::min(n - j, P - slot);
    const auto* page = static_cast<const uint16_t*>(seq.pages[(j0 + j) / P]);
    const uint16_t* src = page + (values ? L.v_offset(kvh, static_cast<int>(slot))
                                         : L.k_offset(kvh, static_cast<int>(slot)));
    HalfRowToF32(src, out + j * D, m * D);
    j += m;
  }
}

// kt[d * kTile + j] = K[j0 + j][d] (f32) of kv head kvh for j < n: the K
// tile transposed, keys along the vector lanes.
HWY_INLINE void KeysTransposedF32(const AttentionSeq& seq, const KvLayout& L, int32_t kvh, int64_t j0, int64_t n,
                                  float* HWY_RESTRICT kt) {
  const int64_t P = L.page_tokens;
  const int64_t D = L.head_dim;
  auto key = [&](int64_t j) {
    const auto* page = static_cast<const uint16_t*>(seq.pages[(j0 + j) / P]);
    return page + L.k_offset(kvh, static_cast<int>((j0 + j) % P));
  };
  int64_t j = 0;
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2 && MNEMO_HAVE_F16C
  // Eight keys by eight dimensions at a time: converted, transposed in
  // registers, stored as eight rows of kt.
  if (D % 8 == 0) {
    for (; j + 8 <= n; j += 8) {
      const uint16_t* src[8];
      for (int k = 0; k < 8; ++k) src[k] = key(j + k);
      for (int64_t d = 0; d < D; d += 8) {
        __m256 r[8];
        for (int k = 0; k < 8; ++k)
          r[k] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src[k] + d)));
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
        float* out = kt + d * kTile + j;
        _mm256_storeu_ps(out + 0 * kTile, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_storeu_ps(out + 1 * kTile, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_storeu_ps(out + 2 * kTile, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_storeu_ps(out + 3 * kTile, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_storeu_ps(out + 4 * kTile, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_storeu_ps(out + 5 * kTile, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_storeu_ps(out + 6 * kTile, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_storeu_ps(out + 7 * kTile, _mm256_permute2f128_ps(u3, u7, 0x31));
      }
    }
  }
#endif
  for (; j < n; ++j) {
    const uint16_t* src = key(j);
    for (int64_t d = 0; d < D; ++d) kt[d * kTile + j] = F16ToF32(src[d]);
  }
}

// Prefetches the K and V rows of keys [j0, j0 + n) of kv head kvh into L2.
HWY_INLINE void PrefetchKvL2(const AttentionSeq& seq, const KvLayout& L, int32_t kvh, int64_t j0, int64_t n) {
  const int64_t P = L.page_tokens;
  const size_t row_bytes = static_cast<size_t>(L.head_dim) * sizeof(uint16_t);
  for (int64_t j = 0; j < n;) {
    const int64_t slot = (j0 + j) % P;
    const int64_t m = std::min(n - j, P - slot);
    const auto* page = static_cast<const char*>(seq.pages[(j0 + j) / P]);
    // A kv head's rows are consecutive within a page.
    const char* k = page + L.k_offset(kvh, static_cast<int>(slot)) * sizeof(uint16_t);
    const char* v = page + L.v_offset(kvh, static_cast<int>(slot)) * sizeof(uint16_t);
    for (size_t off = 0; off < static_cast<size_t>(m) * row_bytes; off += 64) {
      __builtin_prefetch(k + off, 0, 2);  // prefetcht1 on x86
      __builtin_prefetch(v + off, 0, 2);
    }
    j += m;
  }
}

// ---------------------------------------------------------------------------
// Tiled path (ggml_compute_forward_flash_attn_ext_tiled).

// s[0..kTile) = scale * (q · kt[:, j]): per key one FMA chain over d in
// order from 0 (simd_gemm into a zeroed KQ), then a separate multiply
// (ggml_vec_scale_f32).
HWY_INLINE void TileScores(const float* HWY_RESTRICT q, const float* HWY_RESTRICT kt, int64_t D,
                           float scale, float* HWY_RESTRICT s) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const size_t nv = static_cast<size_t>(kTile) / N;
  if (nv == 8) {
    VF a0 = hn::Zero(df), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t d = 0; d < D; ++d) {
      const VF qd = hn::Set(df, q[d]);
      const float* k = kt + d * kTile;
      a0 = hn::MulAdd(qd, hn::LoadU(df, k + 0 * N), a0);
      a1 = hn::MulAdd(qd, hn::LoadU(df, k + 1 * N), a1);
      a2 = hn::MulAdd(qd, hn::LoadU(df, k + 2 * N), a2);
      a3 = hn::MulAdd(qd, hn::LoadU(df, k + 3 * N), a3);
      a4 = hn::MulAdd(qd, hn::LoadU(df, k + 4 * N), a4);
      a5 = hn::MulAdd(qd, hn::LoadU(df, k + 5 * N), a5);
      a6 = hn::MulAdd(qd, hn::LoadU(df, k + 6 * N), a6);
      a7 = hn::MulAdd(qd, hn::LoadU(df, k + 7 * N), a7);
    }
    const VF vs = hn::Set(df, scale);
    hn::StoreU(hn::Mul(a0, vs), df, s + 0 * N);
    hn::StoreU(hn::Mul(a1, vs), df, s + 1 * N);
    hn::StoreU(hn::Mul(a2, vs), df, s + 2 * N);
    hn::StoreU(hn::Mul(a3, vs), df, s + 3 * N);
    hn::StoreU(hn::Mul(a4, vs), df, s + 4 * N);
    hn::StoreU(hn::Mul(a5, vs), df, s + 5 * N);
    hn::StoreU(hn::Mul(a6, vs), df, s + 6 * N);
    hn::StoreU(hn::Mul(a7, vs), df, s + 7 * N);
    return;
  }
  // Other widths: four vectors of keys at a time.
  for (size_t c = 0; c < nv; c += 4) {
    const size_t m = std::min<size_t>(4, nv - c);
    VF a[4] = {hn::Zero(df), hn::Zero(df), hn::Zero(df), hn::Zero(df)};
    for (int64_t d = 0; d < D; ++d) {
      const VF qd = hn::Set(df, q[d]);
      for (size_t i = 0; i < m; ++i) {
        a[i] = hn::MulAdd(qd, hn::LoadU(df, kt + d * kTile + (c + i) * N), a[i]);
      }
    }
    for (size_t i = 0; i < m; ++i) hn::StoreU(hn::Mul(a[i], hn::Set(df, scale)), df, s + (c + i) * N);
  }
}

// TileScores for R query rows at once (R x 4 accumulators: see kTiledRows),
// four vectors of keys at a time.
template <int R>
HWY_INLINE void TileScoresR(const float* const* HWY_RESTRICT q, const float* HWY_RESTRICT kt, int64_t D,
                            float scale, float* const* HWY_RESTRICT s) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const size_t nv = static_cast<size_t>(kTile) / N;
  const VF vs = hn::Set(df, scale);
  size_t c = 0;
  for (; c + 4 <= nv; c += 4) {
    VF a[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = hn::Zero(df);
    const float* k = kt + c * N;
    for (int64_t d = 0; d < D; ++d, k += kTile) {
      VF x[R];
      for (int r = 0; r < R; ++r) x[r] = hn::Set(df, q[r][d]);
      for (int i = 0; i < 4; ++i) {
        const VF kv = hn::LoadU(df, k + i * N);
        for (int r = 0; r < R; ++r) a[r][i] = hn::MulAdd(x[r], kv, a[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) hn::StoreU(hn::Mul(a[r][i], vs), df, s[r] + (c + i) * N);
  }
  if (c < nv) {  // vectors so wide that a tile is not a multiple of four
    for (int r = 0; r < R; ++r) TileScores(q[r], kt, D, scale, s[r]);
  }
}

// TilePv for R query rows at once over the first n keys, reading V straight
// from the fp16 pages (vrow(j): key j's V row) as it converts it: each V
// vector loaded once for the R rows, 4R independent FMA chains in flight. A
// row's keys past its own count have p = 0 exactly, and fma(0, v, o) = o,
// as in llama.cpp's masked tile.
template <int R, class VRow>
HWY_INLINE void TilePvF16R(float* const* HWY_RESTRICT acc, const float* const* HWY_RESTRICT p, VRow vrow,
                           int64_t n, int64_t D) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t d = 0;
  for (; d + 4 * N <= D; d += 4 * N) {
    VF a[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) a[r][i] = hn::LoadU(df, acc[r] + d + i * N);
    for (int64_t j = 0; j < n; ++j) {
      VF x[R];
      for (int r = 0; r < R; ++r) x[r] = hn::Set(df, p[r][j]);
      const uint16_t* vj = vrow(j) + d;
      for (int i = 0; i < 4; ++i) {
        const VF vv = LoadF16(df, vj + i * N);
        for (int r = 0; r < R; ++r) a[r][i] = hn::MulAdd(x[r], vv, a[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) hn::StoreU(a[r][i], df, acc[r] + d + i * N);
  }
  for (; d < D; ++d) {
    for (int r = 0; r < R; ++r) {
      float o = acc[r][d];
      for (int64_t j = 0; j < n; ++j) o = std::fma(p[r][j], F16ToF32(vrow(j)[d]), o);
      acc[r][d] = o;
    }
  }
}

// The float part of ggml_vec_soft_max_f32's (AVX2) sum of e[0..kTile):
// each group of 8 summed ((e0+e4)+(e2+e6))+((e1+e5)+(e3+e7)), into g[8].
// The groups are then added in double (TileExpSums).
HWY_INLINE void TileGroupSums(const float* HWY_RESTRICT e, float* HWY_RESTRICT g) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
  // The same float additions, eight groups at once: halves added (e_i +
  // e_{i+4}), then lanes two apart, then neighbours, two groups per 128-bit
  // lane at first and four at the end (float addition commutes exactly).
  __m256 t[4];
  for (int p = 0; p < 4; ++p) {
    const __m256 a = _mm256_loadu_ps(e + 16 * p), b = _mm256_loadu_ps(e + 16 * p + 8);
    // [t0..t3 of group 2p | t0..t3 of group 2p+1]
    t[p] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  // [t0+t2, t1+t3] of groups (0, 2 | 1, 3) and (4, 6 | 5, 7).
  const __m256 u0 = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 u1 = _mm256_add_ps(_mm256_shuffle_ps(t[2], t[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(t[2], t[3], _MM_SHUFFLE(3, 2, 3, 2)));
  // Group sums, lanes [0, 2, 4, 6 | 1, 3, 5, 7]: stored in group order.
  const __m256 w = _mm256_add_ps(_mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
  _mm256_storeu_ps(g, _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
  for (int64_t k = 0; k < kTile / 8; ++k) {
    const float* x = e + 8 * k;
    const float t0 = x[0] + x[4], t1 = x[1] + x[5], t2 = x[2] + x[6], t3 = x[3] + x[7];
    g[k] = (t0 + t2) + (t1 + t3);
  }
#endif
}

// sum[k] = the sum of e[k][0..kTile) as ggml_vec_soft_max_f32 forms it:
// the group sums added in double from 0, in order. The R rows' chains of
// dependent additions are interleaved.
template <int R>
HWY_INLINE void TileExpSums(float* const* HWY_RESTRICT e, double* HWY_RESTRICT sum) {
  static_assert(kTile == 64);
  alignas(32) float g[R][8];
  for (int k = 0; k < R; ++k) TileGroupSums(e[k], g[k]);
  for (int k = 0; k < R; ++k) sum[k] = 0.0;
  for (int i = 0; i < 8; ++i)
    for (int k = 0; k < R; ++k) sum[k] += static_cast<double>(g[k][i]);
}

// Query tokens [t0, t1) of one sequence, the query heads of kv head kvh.
void TiledRows(const AttentionArgs& a, int64_t t0, int64_t t1, int32_t kvh, float* scratch) {
  const KvLayout& L = a.layout;
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int32_t group = a.n_heads / L.n_kv_heads;
  const int64_t D = L.head_dim;
  const int64_t rows = (t1 - t0) * group;
  float* kt = scratch;         // [D][kTile], K tile transposed
  float* s = kt + D * kTile;   // [kRowsTogether][kTile]
  float* acc = s + kRowsTogether * kTile;  // [rows][D]
  float* m = acc + rows * D;   // [rows]
  float* l = m + rows;         // [rows]
  // [rows], at an even float offset (8-byte aligned).
  int64_t* live = reinterpret_cast<int64_t*>(scratch + ((l + rows - scratch + 1) & ~int64_t{1}));
  int64_t* live_valid = live + rows;                        // [rows]
  const float** q_row = reinterpret_cast<const float**>(live_valid + rows);  // [rows]
  for (int64_t r = 0; r < rows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  std::memset(acc, 0, sizeof(float) * static_cast<size_t>(rows * D));

  const int64_t q_stride = static_cast<int64_t>(a.n_heads) * D;
  // Row r: head r % group (of those sharing kvh) of token t0 + r / group.
  for (int64_t t = t0, r = 0; t < t1; ++t)
    for (int32_t h = 0; h < group; ++h, ++r)
      q_row[r] = a.q + t * q_stride + (static_cast<int64_t>(kvh) * group + h) * D;
  const AttentionSeq& seq = a.seqs[a.seq[t0]];
  int64_t max_len = 0;
  for (int64_t t = t0; t < t1; ++t) max_len = std::max<int64_t>(max_len, a.kv_len[t]);
  MNEMO_CHECK(max_len <= static_cast<int64_t>(seq.n_pages) * L.page_tokens);

  for (int64_t c0 = 0; c0 < max_len; c0 += kTile) {
    const int64_t n = std::min(kTile, max_len - c0);
    KeysTransposedF32(seq, L, kvh, c0, n, kt);
    // V rows: consecutive (v_tile) when the tile lies in one page, else
    // listed per key.
    const uint16_t* v_tile = nullptr;
    const uint16_t* vrow[kTile];
    if (c0 % L.page_tokens + n <= L.page_tokens) {
      v_tile = static_cast<const uint16_t*>(seq.pages[c0 / L.page_tokens]) +
               L.v_offset(kvh, static_cast<int>(c0 % L.page_tokens));
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const auto* page = static_cast<const uint16_t*>(seq.pages[(c0 + j) / L.page_tokens]);
        vrow[j] = page + L.v_offset(kvh, static_cast<int>((c0 + j) % L.page_tokens));
      }
    }
    // Columns past the keys of any row: finite, and masked below.
    for (int64_t d = 0; d < D && n < kTile; ++d) {
      std::fill(kt + d * kTile + n, kt + (d + 1) * kTile, 0.0f);
    }
    // The rows with keys in this tile, kTiledRows at a time (a row's
    // arithmetic is the same alone or grouped).
    int64_t n_live = 0;
    for (int64_t t = t0, r = 0; t < t1; ++t) {
      const int64_t valid = std::min(kTile, a.kv_len[t] - c0);
      for (int32_t h = 0; h < group; ++h, ++r) {
        if (valid <= 0) continue;  // a fully masked tile: skipped in llama.cpp too
        live[n_live] = r;
        live_valid[n_live++] = valid;
      }
    }
    auto query = [&](int64_t r) { return q_row[r]; };
    // Masks, softmax-updates the state of rows rr[0..R) for their scores
    // sr[k]; leaves the exponentials in sr. Each row's arithmetic is its
    // own; the R rows are interleaved for the out-of-order core.
    auto softmax = [&]<int R>(const int64_t* rr, const int64_t* valid, float* const* sr) {
      for (int k = 0; k < R; ++k)
        for (int64_t j = valid[k]; j < kTile; ++j) sr[k][j] = -INFINITY;
      // The scores are finite (masked ones -inf): the maximum is the same in
      // any order.
      VF vmx[R];
      for (int k = 0; k < R; ++k) vmx[k] = hn::Set(df, -INFINITY);
      for (int64_t j = 0; j < kTile; j += N)
        for (int k = 0; k < R; ++k) vmx[k] = hn::Max(vmx[k], hn::LoadU(df, sr[k] + j));
      VF vmax[R];
      for (int k = 0; k < R; ++k) {
        const int64_t r = rr[k];
        const float m_new = std::fmax(m[r], hn::GetLane(hn::MaxOfLanes(df, vmx[k])));
        if (m_new > m[r]) {
          const float ms = std::exp(m[r] - m_new);
          const VF vms = hn::Set(df, ms);
          float* o = acc + r * D;
          int64_t d = 0;
          for (; d + N <= D; d += N) hn::StoreU(hn::Mul(hn::LoadU(df, o + d), vms), df, o + d);
          for (; d < D; ++d) o[d] *= ms;
          l[r] *= ms;
        }
        m[r] = m_new;
        vmax[k] = hn::Set(df, m_new);
      }
      for (int64_t j = 0; j < kTile; j += N)
        for (int k = 0; k < R; ++k)
          hn::StoreU(GgmlExp(df, hn::Sub(hn::LoadU(df, sr[k] + j), vmax[k])), df, sr[k] + j);
      double sum[R];
      TileExpSums<R>(sr, sum);
      for (int k = 0; k < R; ++k) l[rr[k]] = static_cast<float>(static_cast<double>(l[rr[k]]) + sum[k]);
    };
    // The next tile's K and V rows go to L2 while this one computes, a few
    // keys per group of rows: a tile lies in other pages than the last,
    // where the hardware prefetcher starts cold. (They are read from
    // memory once per call.)
    const int64_t next_n = std::min(kTile, max_len - c0 - kTile);
    const int64_t groups = (n_live + kTiledRows - 1) / kTiledRows;
    // One group alone (a decode token in MathMode::kFast) takes its share in
    // three pieces, before each phase: a whole tile at once stalls on the
    // fill buffers of Intel's cores.
    const int64_t pieces = groups == 1 ? 3 : 1;
    const int64_t per_group = groups > 0 ? (next_n + groups * pieces - 1) / (groups * pieces) : next_n;
    int64_t next_j = 0;
    auto prefetch_some = [&] {
      if (next_j >= next_n) return;
      const int64_t k = std::min(per_group, next_n - next_j);
      PrefetchKvL2(seq, L, kvh, c0 + kTile + next_j, k);
      next_j += k;
    };
    auto rows_of = [&]<int R>(int64_t i) {
      const float* qs[R];
      float* ss[R];
      float* os[R];
      int64_t n_max = 0;
      for (int k = 0; k < R; ++k) {
        qs[k] = query(live[i + k]);
        ss[k] = s + k * kTile;
        os[k] = acc + live[i + k] * D;
        n_max = std::max(n_max, live_valid[i + k]);
      }
      TileScoresR<R>(qs, kt, D, a.scale, ss);
      if (pieces > 1) prefetch_some();
      softmax.template operator()<R>(live + i, live_valid + i, ss);
      if (pieces > 1) prefetch_some();
      if (v_tile) {  // the tile's V rows are consecutive in one page
        TilePvF16R<R>(os, ss, [v_tile, D](int64_t j) { return v_tile + j * D; }, n_max, D);
      } else {
        TilePvF16R<R>(os, ss, [&vrow](int64_t j) { return vrow[j]; }, n_max, D);
      }
    };
    int64_t i = 0;
    for (; i + kTiledRows <= n_live; i += kTiledRows) {
      prefetch_some();
      rows_of.template operator()<kTiledRows>(i);
    }
    if constexpr (kTiledRows > 3) {
      for (; i + 3 <= n_live; i += 3) {
        prefetch_some();
        rows_of.template operator()<3>(i);
      }
    }
    for (; i < n_live; ++i) {
      prefetch_some();
      rows_of.template operator()<1>(i);
    }
    if (next_j < next_n) PrefetchKvL2(seq, L, kvh, c0 + kTile + next_j, next_n - next_j);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / group;
    float* out = a.out + t * q_stride + (static_cast<int64_t>(kvh) * group + r % group) * D;
    const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];
    for (int64_t d = 0; d < D; ++d) out[d] = acc[r * D + d] * inv;
  }
}

// ---------------------------------------------------------------------------
// One-chunk and split-KV paths
// (ggml_compute_forward_flash_attn_ext_f16_one_chunk and
// ggml_flash_attn_ext_reduce_partials).

// ggml_vec_dot_f16 (AVX2) of a K row (converted from f16) and the
// f16-rounded query q: four 8-lane FMA accumulators over steps of 32,
// reduced (x0+x2)+(x1+x3), then lane l with l+4, then (t0+t1)+(t2+t3); the
// D % 32 leftover products are added in double.
HWY_INLINE float DotF16(const float* HWY_RESTRICT k, const float* HWY_RESTRICT q, int64_t D) {
  const D8 d8;
  constexpr size_t N8 = hn::MaxLanes(D8());
  constexpr size_t G = 8 / N8;  // vectors per ggml __m256
  static_assert(N8 * G == 8);
  V8 acc[4 * G];
  for (size_t i = 0; i < 4 * G; ++i) acc[i] = hn::Zero(d8);
  const int64_t np = D & ~int64_t{31};
  for (int64_t i = 0; i < np; i += 32) {
    for (size_t v = 0; v < 4 * G; ++v) {
      acc[v] = hn::MulAdd(hn::LoadU(d8, k + i + v * N8), hn::LoadU(d8, q + i + v * N8), acc[v]);
    }
  }
  HWY_ALIGN float y[8];
  for (size_t p = 0; p < G; ++p) {
    hn::Store(hn::Add(hn::Add(acc[p], acc[p + 2 * G]), hn::Add(acc[p + G], acc[p + 3 * G])), d8,
              y + p * N8);
  }
  const float t0 = y[0] + y[4], t1 = y[1] + y[5], t2 = y[2] + y[6], t3 = y[3] + y[7];
  const float sum = (t0 + t1) + (t2 + t3);
  if (np == D) return sum;
  double total = sum;
  for (int64_t i = np; i < D; ++i) total += static_cast<double>(k[i] * q[i]);
  return static_cast<float>(total);
}

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
// [a0+a1, a2+a3, b0+b1, b2+b3], as _mm_hadd_ps.
template <class D4, class V4 = hn::Vec<D4>>
HWY_INLINE V4 PairwiseAdd(D4 d4, V4 a, V4 b) {
  return hn::Add(hn::ConcatEven(d4, b, a), hn::ConcatOdd(d4, b, a));
}
#endif

// sc[j] = scale * DotF16(kf[j], q) for j < n. With 8-lane vectors and D a
// multiple of 32, the final reductions of four keys share vector adds.
HWY_INLINE void ScoresF16(const float* HWY_RESTRICT kf, int64_t n, const float* HWY_RESTRICT q,
                          int64_t D, float scale, float* HWY_RESTRICT sc) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
  {
    if (D % 32 == 0) {
      const D8 d8;
      const hn::Half<D8> d4;
      // Keys past n (up to the next multiple of 4, inside the kTile rows of
      // kf) fill lanes that are never stored.
      auto reduce = [&](const float* kr) {
        V8 a0 = hn::Zero(d8), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < D; i += 32) {
          a0 = hn::MulAdd(hn::LoadU(d8, kr + i), hn::LoadU(d8, q + i), a0);
          a1 = hn::MulAdd(hn::LoadU(d8, kr + i + 8), hn::LoadU(d8, q + i + 8), a1);
          a2 = hn::MulAdd(hn::LoadU(d8, kr + i + 16), hn::LoadU(d8, q + i + 16), a2);
          a3 = hn::MulAdd(hn::LoadU(d8, kr + i + 24), hn::LoadU(d8, q + i + 24), a3);
        }
        const V8 y = hn::Add(hn::Add(a0, a2), hn::Add(a1, a3));
        return hn::Add(hn::LowerHalf(d4, y), hn::UpperHalf(d4, y));
      };
      const auto vscale = hn::Set(d4, scale);
      for (int64_t j0 = 0; j0 < n; j0 += 4) {
        const float* kr = kf + j0 * D;
        const auto t0 = reduce(kr), t1 = reduce(kr + D), t2 = reduce(kr + 2 * D),
                   t3 = reduce(kr + 3 * D);
        const auto r = hn::Mul(PairwiseAdd(d4, PairwiseAdd(d4, t0, t1), PairwiseAdd(d4, t2, t3)),
                               vscale);
        if (j0 + 4 <= n) {
          hn::StoreU(r, d4, sc + j0);
        } else {
          HWY_ALIGN float tmp[4];
          hn::Store(r, d4, tmp);
          for (int64_t k = 0; j0 + k < n; ++k) sc[j0 + k] = tmp[k];
        }
      }
      return;
    }
  }
#endif
  for (int64_t j = 0; j < n; ++j) sc[j] = DotF16(kf + j * D, q, D) * scale;
}

// o[0 .. V*N) over keys j < n: o = f16(o * ms[j]) on a new maximum, then
// o = f16(v[j] * vs[j] + o) (ggml_vec_scale_f16, ggml_vec_mad_f16), kept in
// registers.
template <int V>
HWY_INLINE void PvF16Block(float* HWY_RESTRICT o, const float* HWY_RESTRICT vf, int64_t D,
                           const float* HWY_RESTRICT ms, const float* HWY_RESTRICT vs,
                           int64_t n) {
  const DF df;
  const size_t N = hn::Lanes(df);
  VF acc[V];
  for (int i = 0; i < V; ++i) acc[i] = hn::LoadU(df, o + i * N);
  for (int64_t j = 0; j < n; ++j) {
    if (ms[j] != 1.0f) {
      const VF f = hn::Set(df, ms[j]);
      for (int i = 0; i < V; ++i) acc[i] = RoundToF16(df, hn::Mul(acc[i], f));
    }
    const VF w = hn::Set(df, vs[j]);
    const float* v = vf + j * D;
    for (int i = 0; i < V; ++i) acc[i] = RoundToF16(df, hn::MulAdd(hn::LoadU(df, v + i * N), w, acc[i]));
  }
  for (int i = 0; i < V; ++i) hn::StoreU(acc[i], df, o + i * N);
}

HWY_INLINE void PvF16(float* HWY_RESTRICT o, const float* HWY_RESTRICT vf, int64_t D,
                      const float* HWY_RESTRICT ms, const float* HWY_RESTRICT vs, int64_t n) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t d = 0;
  for (; d + 8 * N <= D; d += 8 * N) PvF16Block<8>(o + d, vf + d, D, ms, vs, n);
  for (; d + 4 * N <= D; d += 4 * N) PvF16Block<4>(o + d, vf + d, D, ms, vs, n);
  for (; d + N <= D; d += N) PvF16Block<1>(o + d, vf + d, D, ms, vs, n);
  for (; d < D; ++d) {
    float x = o[d];
    for (int64_t j = 0; j < n; ++j) {
      if (ms[j] != 1.0f) x = RoundF16(x * ms[j]);
      x = RoundF16(std::fma(vf[j * D + d], vs[j], x));
    }
    o[d] = x;
  }
}

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
// expf as glibc (2.28 and later) computes it on x86-64 CPUs with FMA
// (__expf_fma, the ifunc llama.cpp's and mnemo's expf calls resolve to
// there), four at a time: the same double-precision operations with the
// same fusions, so the same floats. Arguments of 88 and more in magnitude,
// infinities and NaNs take the library's own path.
struct LibmExpF {
  // __exp2f_data: 2^(i/32) as double bits, then the constants.
  static constexpr uint64_t kTab[32] = {
      0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
      0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
      0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
      0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
      0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
      0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
      0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
      0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540};
  static constexpr uint64_t kInvLn2N = 0x40471547652b82fe;  // 32 / ln 2
  static constexpr uint64_t kShift = 0x4338000000000000;    // 0x1.8p52
  static constexpr uint64_t kC0 = 0x3ebc6af84b912394;
  static constexpr uint64_t kC1 = 0x3f2ebfce50fac4f3;
  static constexpr uint64_t kC2 = 0x3f962e42ff0c52d6;

  static __m256d Const(uint64_t bits) {
    return _mm256_castsi256_pd(_mm256_set1_epi64x(static_cast<int64_t>(bits)));
  }

  // y[0..4) = expf(x[0..4)); y may alias x.
  static void Exp4(const float* x, float* y) {
    const __m128 xf = _mm_loadu_ps(x);
    const __m256d xd = _mm256_cvtps_pd(xf);
    const __m256d inv = Const(kInvLn2N), shift = Const(kShift);
    const __m256d kd_shifted = _mm256_fmadd_pd(inv, xd, shift);
    const __m256i ki = _mm256_castpd_si256(kd_shifted);
    const __m256d kd = _mm256_sub_pd(kd_shifted, shift);
    const __m256d r = _mm256_fmsub_pd(inv, xd, kd);
    const __m256i idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
    const __m256i t = _mm256_add_epi64(
        _mm256_i64gather_epi64(reinterpret_cast<const long long*>(kTab), idx, 8),
        _mm256_slli_epi64(ki, 47));
    const __m256d z = _mm256_fmadd_pd(r, Const(kC0), Const(kC1));
    const __m256d r2 = _mm256_mul_pd(r, r);
    __m256d v = _mm256_fmadd_pd(r, Const(kC2), _mm256_set1_pd(1.0));
    v = _mm256_fmadd_pd(z, r2, v);
    v = _mm256_mul_pd(v, _mm256_castsi256_pd(t));
    __m128 out = _mm256_cvtpd_ps(v);
    // |x| >= 88 (top 12 bits of the magnitude >= those of 88.0f), inf, NaN.
    const __m128i top = _mm_and_si128(_mm_srli_epi32(_mm_castps_si128(xf), 20), _mm_set1_epi32(0x7ff));
    const int special = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(top, _mm_set1_epi32(0x42a))));
    if (special != 0) {
      alignas(16) float xs[4], ys[4];
      _mm_store_ps(xs, xf);
      _mm_store_ps(ys, out);
      for (int k = 0; k < 4; ++k) {
        if (special & (1 << k)) ys[k] = std::exp(xs[k]);
      }
      out = _mm_load_ps(ys);
    }
    _mm_storeu_ps(y, out);
  }

  // Whether Exp4 agrees with this process's expf (another C library, or a
  // CPU without FMA, computes differently): checked once on a spread of
  // arguments, including every 1/64 step of the range attention uses.
  static bool MatchesLibm() {
    static const bool ok = [] {
      alignas(16) float x[4], y[4];
      uint32_t lcg = 12345;
      for (int i = 0; i < 8192; ++i) {
        for (int k = 0; k < 4; ++k) {
          if (i < 2048) {
            x[k] = -static_cast<float>(i * 4 + k) / 16.0f;  // [-128, 0]
          } else {
            lcg = lcg * 1664525u + 1013904223u;
            uint32_t bits = (lcg >> 1) | (k & 1 ? 0x80000000u : 0u);
            std::memcpy(&x[k], &bits, 4);
          }
        }
        Exp4(x, y);
        for (int k = 0; k < 4; ++k) {
          const float want = std::exp(x[k]);
          if (std::memcmp(&want, &y[k], 4) != 0 && !(std::isnan(want) && std::isnan(y[k]))) {
            return false;
          }
        }
      }
      return true;
    }();
    return ok;
  }

  // y[j] = expf(x[j]) for j < n; x and y may alias.
  static void Row(const float* x, float* y, int64_t n) {
    if (!MatchesLibm()) {
      for (int64_t j = 0; j < n; ++j) y[j] = std::exp(x[j]);
      return;
    }
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) Exp4(x + j, y + j);
    if (j < n) {
      alignas(16) float tx[4] = {0.0f, 0.0f, 0.0f, 0.0f}, ty[4];
      for (int64_t k = 0; j + k < n; ++k) tx[k] = x[j + k];
      Exp4(tx, ty);
      for (int64_t k = 0; j + k < n; ++k) y[j + k] = ty[k];
    }
  }
};

// The weighted sum of OneChunkRowsF16 over elements [d, d + C * NW) of R
// rows' accumulators (acc: row r at acc + r * D), in registers.
template <int R, int NW, int C>
HWY_INLINE void PvRowsF16(const uint16_t* const* vp, int64_t n, int64_t d,
                          const float* HWY_RESTRICT ms, const float* HWY_RESTRICT vs,
                          float* HWY_RESTRICT acc, int64_t D) {
  using DW = hn::CappedTag<float, NW>;
  using VW = hn::Vec<DW>;
  const DW dw;
  VW o[R][C];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) o[r][i] = hn::LoadU(dw, acc + r * D + i * NW);
  for (int64_t j = 0; j < n; ++j) {
    for (int r = 0; r < R; ++r) {
      if (ms[r * kTile + j] != 1.0f) {
        const VW f = hn::Set(dw, ms[r * kTile + j]);
        for (int i = 0; i < C; ++i) o[r][i] = RoundToF16(dw, hn::Mul(o[r][i], f));
      }
    }
    for (int i = 0; i < C; ++i) {
      const VW v = LoadF16(dw, vp[j] + d + i * NW);
      for (int r = 0; r < R; ++r) {
        o[r][i] = RoundToF16(dw, hn::MulAdd(v, hn::Set(dw, vs[r * kTile + j]), o[r][i]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) hn::StoreU(o[r][i], dw, acc + r * D + i * NW);
}

// The one-chunk recurrence for R query rows of one token (heads sharing kv
// head kvh) over its `n` keys from j0, reading K and V straight from the
// fp16 pages: each key's K vector is converted once and used by all R rows,
// and the R rows' f16 accumulators advance together, so that their rounding
// chains overlap. Per row the operations are exactly those of ScoresF16,
// the per-key recurrence and PvF16. q16: [R][D]; m, l: [R]; acc: [R][D];
// sc, ms, vs: [R][kTile]. Requires D % 32 == 0. NW: lanes per vector, 8
// or 16. With 16 (AVX-512) each vector holds two of ggml's 8-lane
// accumulators side by side, which add up in the same order (the sum of
// the two halves of their sum is ggml's (a0 + a2) + (a1 + a3)), and the
// weighted sum is element-wise: the same bits in half the instructions,
// where 512-bit ops issue at the 256-bit rate (see WideTiles).
template <int R, int NW>
HWY_INLINE void OneChunkRowsF16(const AttentionSeq& seq, const KvLayout& L, int32_t kvh,
                                const float* HWY_RESTRICT q16, float scale, int64_t j0,
                                int64_t n, float* HWY_RESTRICT m, float* HWY_RESTRICT l,
                                float* HWY_RESTRICT acc, float* HWY_RESTRICT sc,
                                float* HWY_RESTRICT ms, float* HWY_RESTRICT vs) {
  static_assert(NW == 8 || NW == 16);
  constexpr int kAcc = 32 / NW;  // vectors per 32 elements
  using DW = hn::CappedTag<float, NW>;
  using VW = hn::Vec<DW>;
  const DW dw;
  const D8 d8;
  const hn::Half<D8> d4;
  const int64_t D = L.head_dim;
  const int64_t P = L.page_tokens;
  const uint16_t* kp[kTile];
  const uint16_t* vp[kTile];
  {
    // A page's rows of one head are consecutive: one division per tile.
    int64_t pg = j0 / P;
    int slot = static_cast<int>(j0 % P);
    for (int64_t j = 0; j < n; ++j) {
      const auto* page = static_cast<const uint16_t*>(seq.pages[pg]);
      kp[j] = page + L.k_offset(kvh, slot);
      vp[j] = page + L.v_offset(kvh, slot);
      if (++slot == P) {
        slot = 0;
        ++pg;
      }
    }
  }
  // Scores, four keys at a time sharing the final reductions (keys past n
  // repeat the last one, in lanes that are never stored). The pages are
  // rarely in cache (16 sequences' KV outgrow it): K is prefetched a few
  // keys ahead, and each key's V row while its score is formed, ready for
  // the weighted sum below.
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(uint16_t));
  auto prefetch_row = [&](const uint16_t* p) {
    for (int64_t o = 0; o < row_bytes; o += 64) hwy::Prefetch(reinterpret_cast<const uint8_t*>(p) + o);
  };
  for (int64_t j = 0; j < std::min<int64_t>(n, kPrefetchKeys); ++j) prefetch_row(kp[j]);
  const auto vscale = hn::Set(d4, scale);
  for (int64_t jb = 0; jb < n; jb += 4) {
    hn::Vec<decltype(d4)> t[R][4];
    for (int k = 0; k < 4; ++k) {
      if (jb + k < n) {
        if (jb + k + kPrefetchKeys < n) prefetch_row(kp[jb + k + kPrefetchKeys]);
        if constexpr (NW == 16) {
          // Into L2 only on Intel's cores (the 512-bit tiles' CPUs): there
          // an L1 prefetch ties up a fill buffer until the line arrives,
          // and the V rows are not needed before the tile's last score.
          // (Cold KV: 13% faster; warm: the same.)
          for (int64_t o = 0; o < row_bytes; o += 64) {
            __builtin_prefetch(reinterpret_cast<const uint8_t*>(vp[jb + k]) + o, 0, 2);
          }
        } else {
          prefetch_row(vp[jb + k]);
        }
      }
      const uint16_t* kr = kp[std::min(jb + k, n - 1)];
      VW a[R][kAcc];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < kAcc; ++v) a[r][v] = hn::Zero(dw);
      for (int64_t i = 0; i < D; i += 32) {
        for (int v = 0; v < kAcc; ++v) {
          const VW kv = LoadF16(dw, kr + i + v * NW);
          for (int r = 0; r < R; ++r) {
            a[r][v] = hn::MulAdd(kv, hn::LoadU(dw, q16 + r * D + i + v * NW), a[r][v]);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        V8 y;
        if constexpr (NW == 8) {
          y = hn::Add(hn::Add(a[r][0], a[r][2]), hn::Add(a[r][1], a[r][3]));
        } else {
          const VW s01 = hn::Add(a[r][0], a[r][1]);  // (a0 + a2 | a1 + a3)
          const hn::Half<DW> dh;
          y = V8{hn::Add(hn::LowerHalf(dh, s01), hn::UpperHalf(dh, s01)).raw};
        }
        t[r][k] = hn::Add(hn::LowerHalf(d4, y), hn::UpperHalf(d4, y));
      }
    }
    for (int r = 0; r < R; ++r) {
      const auto res = hn::Mul(
          PairwiseAdd(d4, PairwiseAdd(d4, t[r][0], t[r][1]), PairwiseAdd(d4, t[r][2], t[r][3])),
          vscale);
      float* out = sc + r * kTile + jb;
      if (jb + 4 <= n) {
        hn::StoreU(res, d4, out);
      } else {
        HWY_ALIGN float tmp[4];
        hn::Store(res, d4, tmp);
        for (int64_t k = 0; jb + k < n; ++k) out[k] = tmp[k];
      }
    }
  }
  // The per-key recurrence of each row (see OneChunkKeys), its exponentials
  // taken together: the arguments first (the running maximum only moves
  // on a new maximum), then expf of all, then the weights and the sum.
  // The R rows' chains (running maximum, running sum) advance in one loop,
  // each row's in its own order, so that their latencies overlap.
  float m_run[R], l_run[R];
  for (int r = 0; r < R; ++r) m_run[r] = m[r];
  for (int64_t j = 0; j < n; ++j) {
    for (int r = 0; r < R; ++r) {
      float* e = ms + r * kTile;  // arguments, then their exponentials
      float* w = vs + r * kTile;
      const float s = sc[r * kTile + j];
      if (s > m_run[r]) {
        e[j] = m_run[r] - s;
        w[j] = 0.0f;  // marks a new maximum
        m_run[r] = s;
      } else {
        e[j] = s - m_run[r];
        w[j] = 1.0f;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    LibmExpF::Row(ms + r * kTile, ms + r * kTile, n);
    l_run[r] = l[r];
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int r = 0; r < R; ++r) {
      float* e = ms + r * kTile;
      float* w = vs + r * kTile;
      const bool new_max = w[j] == 0.0f;
      const float m_scale = new_max ? e[j] : 1.0f;
      const float v_scale = new_max ? 1.0f : e[j];
      e[j] = m_scale;
      w[j] = v_scale;
      l_run[r] = std::fma(l_run[r], m_scale, v_scale);
    }
  }
  for (int r = 0; r < R; ++r) {
    m[r] = m_run[r];
    l[r] = l_run[r];
  }
  // o = f16(o * ms[j]) on a new maximum, then o = f16(v[j] * vs[j] + o),
  // 4 * NW elements of each row's accumulator at a time (D % (4 * NW) may
  // leave 32: then 2 vectors of 16).
  for (int64_t d = 0; d < D;) {
    if (d + 4 * NW <= D) {
      PvRowsF16<R, NW, 4>(vp, n, d, ms, vs, acc + d, D);
      d += 4 * NW;
    } else {
      PvRowsF16<R, NW, 32 / NW>(vp, n, d, ms, vs, acc + d, D);
      d += 32;
    }
  }
}
#endif

// One-chunk rows [r0, r1) of query tokens [t0, t1), row r being head
// r % group of token t0 + r / group, over keys [c0, c1) clipped to each
// row's kv_len: continues the running max m[r], sum l[r] and the f16-valued
// accumulators acc[r][D]. K and V tiles are converted once for all rows.
// sc, ms, vs: [kTile]; kf, vf: [kTile][D] scratch.
HWY_INLINE void OneChunkKeys(const AttentionArgs& a, int64_t t0, int32_t kvh,
                             const float* HWY_RESTRICT q16, int64_t rows, int64_t c0, int64_t c1,
                             float* HWY_RESTRICT m, float* HWY_RESTRICT l, float* HWY_RESTRICT acc,
                             float* HWY_RESTRICT sc, float* HWY_RESTRICT ms,
                             float* HWY_RESTRICT vs, float* HWY_RESTRICT kf,
                             float* HWY_RESTRICT vf) {
  const KvLayout& L = a.layout;
  const int32_t group = a.n_heads / L.n_kv_heads;
  const int64_t D = L.head_dim;
  const AttentionSeq& seq = a.seqs[a.seq[t0]];
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
  if (D % 32 == 0) {
    // Rows of one token (heads of kv head kvh) three at a time; kf holds
    // their scores and weights.
    float* sc3 = kf;
    float* ms3 = sc3 + 3 * kTile;
    float* vs3 = ms3 + 3 * kTile;
#if HWY_TARGET <= HWY_AVX3
    const bool wide = WideTiles();
    const bool tile_prefetch = !wide;
#else
    const bool tile_prefetch = true;
#endif
    auto rows_f16 = [&](auto rows_c, const float* q, int64_t j0, int64_t valid, int64_t r) {
      constexpr int kR = decltype(rows_c)::value;
#if HWY_TARGET <= HWY_AVX3
      if (wide) {
        OneChunkRowsF16<kR, 16>(seq, L, kvh, q, a.scale, j0, valid, m + r, l + r, acc + r * D, sc3,
                                ms3, vs3);
        return;
      }
#endif
      OneChunkRowsF16<kR, 8>(seq, L, kvh, q, a.scale, j0, valid, m + r, l + r, acc + r * D, sc3,
                             ms3, vs3);
    };
    for (int64_t j0 = c0; j0 < c1; j0 += kTile) {
      const int64_t n = std::min(kTile, c1 - j0);
      // The next tile's K and V rows go to L2 while this one computes:
      // 16 sequences' pages outgrow the caches, and each tile starts in
      // another page, where the hardware prefetcher starts cold.
      // (On Intel's cores the burst of prefetches stalls on their fill
      // buffers instead: 10% slower with the tile warm, no faster cold.)
      if (tile_prefetch && j0 + kTile < c1) {
        PrefetchKvL2(seq, L, kvh, j0 + kTile, std::min(kTile, c1 - j0 - kTile));
      }
      for (int64_t r = 0; r < rows;) {
        const int64_t valid = std::min(n, a.kv_len[t0 + r / group] - j0);
        const int64_t left = group - r % group;  // rows left of this token
        const int rr = static_cast<int>(std::min<int64_t>(3, left));
        if (valid > 0) {
          const float* q = q16 + r * D;
          if (rr == 3) {
            rows_f16(std::integral_constant<int, 3>{}, q, j0, valid, r);
          } else if (rr == 2) {
            rows_f16(std::integral_constant<int, 2>{}, q, j0, valid, r);
          } else {
            rows_f16(std::integral_constant<int, 1>{}, q, j0, valid, r);
          }
        }
        r += rr;
      }
    }
    return;
  }
#endif
  for (int64_t j0 = c0; j0 < c1; j0 += kTile) {
    const int64_t n = std::min(kTile, c1 - j0);
    KeysToF32(seq, L, kvh, /*values=*/false, j0, n, kf);
    KeysToF32(seq, L, kvh, /*values=*/true, j0, n, vf);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t valid = std::min(n, a.kv_len[t0 + r / group] - j0);
      if (valid <= 0) continue;  // masked keys: skipped in llama.cpp too
      // Scores: s*scale (+ a zero mask, exact).
      ScoresF16(kf, valid, q16 + r * D, D, a.scale, sc);
      // The per-key recurrence: a new maximum rescales what came before
      // (ms), any other key is weighted by expf(s - M) (vs).
      float m_run = m[r], l_run = l[r];
      for (int64_t j = 0; j < valid; ++j) {
        const float s = sc[j];
        float m_scale = 1.0f, v_scale = 1.0f;
        if (s > m_run) {
          m_scale = std::exp(m_run - s);
          m_run = s;
        } else {
          v_scale = std::exp(s - m_run);
        }
        ms[j] = m_scale;
        vs[j] = v_scale;
        l_run = std::fma(l_run, m_scale, v_scale);
      }
      m[r] = m_run;
      l[r] = l_run;
      PvF16(acc + r * D, vf, D, ms, vs, valid);
    }
  }
}

// Query tokens [t0, t1) of one sequence, the query heads of kv head kvh, by
// the one-chunk algorithm; `split` (one token only): the split-KV decode
// path.
void OneChunkRows(const AttentionArgs& a, int64_t t0, int64_t t1, int32_t kvh, bool split,
                  float* scratch) {
  const KvLayout& L = a.layout;
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int32_t group = a.n_heads / L.n_kv_heads;
  const int64_t D = L.head_dim;
  const int64_t rows = (t1 - t0) * group;
  float* q16 = scratch;           // [rows][D]
  float* acc = q16 + rows * D;    // [rows][D], f16 values
  float* sum = acc + rows * D;    // [rows][D], merged partials (split)
  float* m = sum + rows * D;      // [rows]
  float* l = m + rows;            // [rows]
  float* mm = l + rows;           // [rows], merged (split)
  float* ml = mm + rows;          // [rows], merged (split)
  float* sc = ml + rows;          // [kTile]
  float* ms = sc + kTile;         // [kTile]
  float* vs = ms + kTile;         // [kTile]
  float* kf = vs + kTile;         // [kTile][D]
  float* vf = kf + kTile * D;     // [kTile][D]
  MNEMO_CHECK(!split || t1 - t0 == 1);

  const int64_t q_stride = static_cast<int64_t>(a.n_heads) * D;
  const AttentionSeq& seq = a.seqs[a.seq[t0]];
  int64_t max_len = 0;
  for (int64_t t = t0; t < t1; ++t) {
    // ggml rounds Q to K's type, f16, for its dot product.
    const float* q = a.q + t * q_stride + static_cast<int64_t>(kvh) * group * D;
    float* qh = q16 + (t - t0) * group * D;
    int64_t i = 0;
    for (; i + N <= group * D; i += N) hn::StoreU(RoundToF16(df, hn::LoadU(df, q + i)), df, qh + i);
    for (; i < group * D; ++i) qh[i] = RoundF16(q[i]);
    max_len = std::max<int64_t>(max_len, a.kv_len[t]);
  }
  MNEMO_CHECK(max_len <= static_cast<int64_t>(seq.n_pages) * L.page_tokens);
  auto reset = [&] {
    for (int64_t r = 0; r < rows; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.0f;
    }
    std::memset(acc, 0, sizeof(float) * static_cast<size_t>(rows * D));
  };
  auto row_out = [&](int64_t r) {
    return a.out + (t0 + r / group) * q_stride + (static_cast<int64_t>(kvh) * group + r % group) * D;
  };

  if (!split) {
    reset();
    OneChunkKeys(a, t0, kvh, q16, rows, 0, max_len, m, l, acc, sc, ms, vs, kf, vf);
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];
      float* out = row_out(r);
      for (int64_t d = 0; d < D; ++d) out[d] = acc[r * D + d] * inv;
    }
    return;
  }

  // llama.cpp's padded cache length, split into one range per thread; the
  // partials merged in range order (ggml_flash_attn_ext_reduce_partials).
  const int64_t n_kv = std::max(kCachePad, (max_len + kCachePad - 1) / kCachePad * kCachePad);
  const int64_t range = (n_kv + kLlamaThreads - 1) / kLlamaThreads;
  for (int64_t r = 0; r < rows; ++r) {
    mm[r] = -INFINITY;
    ml[r] = 0.0f;
  }
  std::memset(sum, 0, sizeof(float) * static_cast<size_t>(rows * D));
  for (int64_t c0 = 0; c0 < max_len; c0 += range) {
    reset();
    OneChunkKeys(a, t0, kvh, q16, rows, c0, std::min(c0 + range, max_len), m, l, acc, sc, ms, vs,
                 kf, vf);
    for (int64_t r = 0; r < rows; ++r) {
      if (l[r] == 0.0f) continue;
      const float m_new = std::fmax(mm[r], m[r]);
      const float f_old = std::exp(mm[r] - m_new);
      const float f_new = std::exp(m[r] - m_new);
      float* o = sum + r * D;
      const float* p = acc + r * D;
      const VF vo = hn::Set(df, f_old), vn = hn::Set(df, f_new);
      int64_t d = 0;
      for (; d + N <= D; d += N) {
        hn::StoreU(hn::MulAdd(hn::LoadU(df, o + d), vo, hn::Mul(hn::LoadU(df, p + d), vn)), df,
                   o + d);
      }
      for (; d < D; ++d) o[d] = std::fma(o[d], f_old, p[d] * f_new);
      ml[r] = std::fma(ml[r], f_old, l[r] * f_new);
      mm[r] = m_new;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = ml[r] == 0.0f ? 1.0f : 1.0f / ml[r];
    float* out = row_out(r);
    for (int64_t d = 0; d < D; ++d) out[d] = sum[r * D + d] * inv;
  }
}

// ---------------------------------------------------------------------------

// The query rows the sequence of token t has in this call (its tokens are
// consecutive) and the longest context among them.
struct SeqRun {
  int64_t rows = 0;
  int64_t max_kv_len = 0;
};
SeqRun SeqRunOf(const AttentionArgs& a, int64_t t) {
  int64_t b = t;
  while (b > 0 && a.seq[b - 1] == a.seq[t]) --b;
  SeqRun r;
  for (int64_t e = b; e < a.n_tokens && a.seq[e] == a.seq[t]; ++e) {
    ++r.rows;
    r.max_kv_len = std::max<int64_t>(r.max_kv_len, a.kv_len[e]);
  }
  return r;
}

void LibmExpRowImpl(const float* x, float* y, int64_t n) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
  LibmExpF::Row(x, y, n);
#else
  for (int64_t j = 0; j < n; ++j) y[j] = std::exp(x[j]);
#endif
}

bool LibmExpVectorizedImpl() {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
  return LibmExpF::MatchesLibm();
#else
  return false;
#endif
}

void AttentionRowsImpl(const AttentionArgs& a, int64_t t0, int64_t t1, int32_t kvh,
                       float* scratch) {
  const SeqRun run = SeqRunOf(a, t0);
  const int64_t rows = a.run_rows ? a.run_rows[t0] : run.rows;
  if (rows > 1 && run.max_kv_len >= kTile) {
    TiledRows(a, t0, t1, kvh, scratch);
    return;
  }
  const int64_t n_kv = std::max(kCachePad, (a.kv_len[t0] + kCachePad - 1) / kCachePad * kCachePad);
  OneChunkRows(a, t0, t1, kvh, rows == 1 && n_kv >= kSplitKeys, scratch);
}

void AttentionTiledImpl(const AttentionArgs& a, int64_t t0, int64_t t1, int32_t kvh,
                        float* scratch) {
  TiledRows(a, t0, t1, kvh, scratch);
}

}  // namespace HWY_NAMESPACE
}  // namespace mnemo::kernels::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mnemo::kernels::cpu {

HWY_EXPORT(AttentionRowsImpl);
HWY_EXPORT(AttentionTiledImpl);
HWY_EXPORT(LibmExpRowImpl);
HWY_EXPORT(LibmExpVectorizedImpl);

void LibmExpRow(const float* x, float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(LibmExpRowImpl)(x, y, n);
}

bool LibmExpVectorized() { return HWY_DYNAMIC_DISPATCH(LibmExpVectorizedImpl)(); }

size_t AttentionScratchFloats(const AttentionArgs& args) {
  const size_t group = static_cast<size_t>(args.n_heads / args.layout.n_kv_heads);
  const size_t D = static_cast<size_t>(args.layout.head_dim);
  const size_t T = static_cast<size_t>(kTile);
  const size_t rows = group * kAttentionBlockTokens;
  // The K^T tile; kRowsTogether score rows; acc, m, l; two int64 index
  // lists and the rows' query pointers.
  const size_t tiled = D * T + kRowsTogether * T + rows * D + 3 * rows + 6 * rows;
  const size_t one_chunk = 3 * rows * D + 4 * rows + 3 * T + 2 * T * D;
  return std::max(tiled, one_chunk) + 16;
}

void AttentionBlock(const AttentionArgs& args, int64_t t0, int64_t t1, int32_t kv_head,
                    float* scratch) {
  MNEMO_CHECK(t1 - t0 <= kAttentionBlockTokens);
  HWY_DYNAMIC_DISPATCH(AttentionRowsImpl)(args, t0, t1, kv_head, scratch);
}

void AttentionItem(const AttentionArgs& args, int64_t t, int32_t kv_head, float* scratch) {
  HWY_DYNAMIC_DISPATCH(AttentionRowsImpl)(args, t, t + 1, kv_head, scratch);
}

void AttentionTiled(const AttentionArgs& args, int64_t t0, int64_t t1, int32_t kv_head,
                    float* scratch) {
  MNEMO_CHECK(t1 - t0 <= kAttentionBlockTokens);
  HWY_DYNAMIC_DISPATCH(AttentionTiledImpl)(args, t0, t1, kv_head, scratch);
}

}  // namespace mnemo::kernels::cpu
#endif  // HWY_ONCE
