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
//    (OneChunkToken).
//  - Split KV (one row, padded cache >= 512 keys, i.e. decode past 256
//    tokens): the one-chunk algorithm on kLlamaThreads key ranges, merged
//    (OneChunkToken with split).
// Keys past a row's causal limit are masked to -inf in llama.cpp; they add
// exact zeros there (x + 0, fma(0, v, acc)) or are skipped, so mnemo simply
// leaves them out. Bit-exactness needs fused multiply-adds and F16C
// conversions: x86 AVX2 and AVX-512 targets. Other targets compute the same
// sequence less exactly (unfused multiply-adds).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/check.h"
#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/attention.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/cpu/f16-inl.h"

#ifndef MNEMO_KERNELS_CPU_ATTENTION_CONSTANTS_
#define MNEMO_KERNELS_CPU_ATTENTION_CONSTANTS_
namespace mnemo::kernels::cpu {
namespace {
// GGML_FA_TILE_Q and GGML_FA_TILE_KV: a sequence with at least kTile query
// rows takes the tiled path, whose key tiles are kTile wide.
constexpr int64_t kTile = 64;
// Decode (one query row) splits the keys into this many ranges when
// llama.cpp's padded cache length reaches kSplitKeys: llama.cpp uses one
// range per thread, so this reproduces llama.cpp run with 2 threads, as the
// reference data is.
constexpr int64_t kLlamaThreads = 2;
constexpr int64_t kSplitKeys = 512;
// llama.cpp pads the cache length its attention sees to a multiple of this.
constexpr int64_t kCachePad = 256;
}  // namespace
}  // namespace mnemo::kernels::cpu
#endif

HWY_BEFORE_NAMESPACE();
namespace mnemo::kernels::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;
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

// exp(x) by the exact sequence of operations of ggml_v_expf (the same as
// ops.cc's, which SiLU uses).
template <class D, class V = hn::Vec<D>>
HWY_INLINE V GgmlExp(D d, V x) {
  const hn::RebindToSigned<D> di;
  const V r = hn::Set(d, 0x1.8p23f);
  const V z = hn::MulAdd(x, hn::Set(d, 0x1.715476p+0f), r);
  const V n = hn::Sub(z, r);
  const V b = hn::NegMulAdd(n, hn::Set(d, 0x1.7f7d1cp-20f),
                            hn::NegMulAdd(n, hn::Set(d, 0x1.62e4p-1f), x));
  const auto e = hn::ShiftLeft<23>(hn::BitCast(di, z));
  const V k = hn::BitCast(d, hn::Add(e, hn::BitCast(di, hn::Set(d, 1.0f))));
  const auto c = hn::Gt(hn::Abs(n), hn::Set(d, 126.0f));
  const V u = hn::Mul(b, b);
  const V j = hn::MulAdd(
      hn::MulAdd(hn::MulAdd(hn::Set(d, 0x1.0e4020p-7f), b, hn::Set(d, 0x1.573e2ep-5f)), u,
                 hn::MulAdd(hn::Set(d, 0x1.555e66p-3f), b, hn::Set(d, 0x1.fffdb6p-2f))),
      u, hn::Mul(hn::Set(d, 0x1.ffffecp-1f), b));
  const V normal = hn::MulAdd(j, k, k);
  if (hn::AllFalse(d, c)) return normal;
  const auto g = hn::And(hn::BitCast(di, hn::VecFromMask(d, hn::Le(n, hn::Zero(d)))),
                         hn::Set(di, static_cast<int32_t>(0x82000000u)));
  const V s1 = hn::BitCast(d, hn::Add(g, hn::Set(di, 0x7f000000)));
  const V s2 = hn::BitCast(d, hn::Sub(e, g));
  const auto huge = hn::Gt(hn::Abs(n), hn::Set(d, 192.0f));
  return hn::IfThenElse(huge, hn::Mul(s1, s1),
                        hn::IfThenElse(c, hn::Mul(hn::MulAdd(s2, j, s2), s1), normal));
}

// K or V row of key `pos` of kv head `h` in a sequence's pages.
HWY_INLINE const uint16_t* KRow(const AttentionSeq& seq, const KvLayout& L, int32_t h,
                                int64_t pos) {
  const auto* page = static_cast<const uint16_t*>(seq.pages[pos / L.page_tokens]);
  return page + L.k_offset(h, static_cast<int>(pos % L.page_tokens));
}
HWY_INLINE const uint16_t* VRow(const AttentionSeq& seq, const KvLayout& L, int32_t h,
                                int64_t pos) {
  const auto* page = static_cast<const uint16_t*>(seq.pages[pos / L.page_tokens]);
  return page + L.v_offset(h, static_cast<int>(pos % L.page_tokens));
}

HWY_INLINE void HalfRowToF32(const uint16_t* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(LoadF16(df, x + i), df, y + i);
  for (; i < n; ++i) y[i] = F16ToF32(x[i]);
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

// acc[0..D) = acc + sum over j < n, in order, of p[j] * v[j][0..D): one FMA
// chain per output (simd_gemm), with the keys past n contributing exact
// zeros in llama.cpp.
HWY_INLINE void TilePv(float* HWY_RESTRICT acc, const float* HWY_RESTRICT p,
                       const float* HWY_RESTRICT v, int64_t n, int64_t D) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t d = 0;
  for (; d + 4 * N <= D; d += 4 * N) {
    VF o0 = hn::LoadU(df, acc + d), o1 = hn::LoadU(df, acc + d + N);
    VF o2 = hn::LoadU(df, acc + d + 2 * N), o3 = hn::LoadU(df, acc + d + 3 * N);
    for (int64_t j = 0; j < n; ++j) {
      const VF pj = hn::Set(df, p[j]);
      const float* vj = v + j * D + d;
      o0 = hn::MulAdd(pj, hn::LoadU(df, vj), o0);
      o1 = hn::MulAdd(pj, hn::LoadU(df, vj + N), o1);
      o2 = hn::MulAdd(pj, hn::LoadU(df, vj + 2 * N), o2);
      o3 = hn::MulAdd(pj, hn::LoadU(df, vj + 3 * N), o3);
    }
    hn::StoreU(o0, df, acc + d);
    hn::StoreU(o1, df, acc + d + N);
    hn::StoreU(o2, df, acc + d + 2 * N);
    hn::StoreU(o3, df, acc + d + 3 * N);
  }
  for (; d + N <= D; d += N) {
    VF o = hn::LoadU(df, acc + d);
    for (int64_t j = 0; j < n; ++j) o = hn::MulAdd(hn::Set(df, p[j]), hn::LoadU(df, v + j * D + d), o);
    hn::StoreU(o, df, acc + d);
  }
  for (; d < D; ++d) {
    float o = acc[d];
    for (int64_t j = 0; j < n; ++j) o = std::fma(p[j], v[j * D + d], o);
    acc[d] = o;
  }
}

// Sum of e[0..kTile) as ggml_vec_soft_max_f32 (AVX2) forms it: each group
// of 8 summed ((e0+e4)+(e2+e6))+((e1+e5)+(e3+e7)) in float, the groups in
// double.
HWY_INLINE double TileExpSum(const float* HWY_RESTRICT e) {
  double sum = 0.0;
  for (int64_t g = 0; g < kTile; g += 8) {
    const float* x = e + g;
    const float t0 = x[0] + x[4], t1 = x[1] + x[5], t2 = x[2] + x[6], t3 = x[3] + x[7];
    sum += static_cast<double>((t0 + t2) + (t1 + t3));
  }
  return sum;
}

// Query tokens [t0, t1) of one sequence, the query heads of kv head kvh.
void TiledRows(const AttentionArgs& a, int64_t t0, int64_t t1, int32_t kvh, float* scratch) {
  const KvLayout& L = a.layout;
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int32_t group = a.n_heads / L.n_kv_heads;
  const int64_t D = L.head_dim;
  const int64_t rows = (t1 - t0) * group;
  float* kt = scratch;        // [D][kTile], K tile transposed
  float* vf = kt + D * kTile;  // [kTile][D]
  float* s = vf + kTile * D;   // [kTile]
  float* tmp = s + kTile;      // [D]
  float* acc = tmp + D;        // [rows][D]
  float* m = acc + rows * D;   // [rows]
  float* l = m + rows;         // [rows]
  for (int64_t r = 0; r < rows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  std::memset(acc, 0, sizeof(float) * static_cast<size_t>(rows * D));

  const int64_t q_stride = static_cast<int64_t>(a.n_heads) * D;
  const AttentionSeq& seq = a.seqs[a.seq[t0]];
  int64_t max_len = 0;
  for (int64_t t = t0; t < t1; ++t) max_len = std::max<int64_t>(max_len, a.kv_len[t]);
  MNEMO_CHECK(max_len <= static_cast<int64_t>(seq.n_pages) * L.page_tokens);

  for (int64_t c0 = 0; c0 < max_len; c0 += kTile) {
    const int64_t n = std::min(kTile, max_len - c0);
    for (int64_t j = 0; j < n; ++j) {
      HalfRowToF32(KRow(seq, L, kvh, c0 + j), tmp, D);
      for (int64_t d = 0; d < D; ++d) kt[d * kTile + j] = tmp[d];
      HalfRowToF32(VRow(seq, L, kvh, c0 + j), vf + j * D, D);
    }
    // Columns past the keys of any row: finite, and masked below.
    for (int64_t d = 0; d < D && n < kTile; ++d) {
      std::fill(kt + d * kTile + n, kt + (d + 1) * kTile, 0.0f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = t0 + r / group;
      const int64_t valid = std::min(kTile, a.kv_len[t] - c0);
      if (valid <= 0) continue;  // a fully masked tile: skipped in llama.cpp too
      const float* q = a.q + t * q_stride + (static_cast<int64_t>(kvh) * group + r % group) * D;
      TileScores(q, kt, D, a.scale, s);
      for (int64_t j = valid; j < kTile; ++j) s[j] = -INFINITY;
      float tile_max = -INFINITY;
      for (int64_t j = 0; j < valid; ++j) tile_max = std::max(tile_max, s[j]);
      const float m_new = std::fmax(m[r], tile_max);
      float* o = acc + r * D;
      if (m_new > m[r]) {
        const float ms = std::exp(m[r] - m_new);
        const VF vms = hn::Set(df, ms);
        int64_t d = 0;
        for (; d + N <= D; d += N) hn::StoreU(hn::Mul(hn::LoadU(df, o + d), vms), df, o + d);
        for (; d < D; ++d) o[d] *= ms;
        l[r] *= ms;
      }
      m[r] = m_new;
      const VF vmax = hn::Set(df, m_new);
      for (int64_t j = 0; j < kTile; j += N) {
        hn::StoreU(GgmlExp(df, hn::Sub(hn::LoadU(df, s + j), vmax)), df, s + j);
      }
      l[r] = static_cast<float>(static_cast<double>(l[r]) + TileExpSum(s));
      TilePv(o, s, vf, valid, D);
    }
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

// ggml_vec_dot_f16 (AVX2) of an f16 K row and the f16-rounded query q:
// four 8-lane FMA accumulators over steps of 32, reduced
// (x0+x2)+(x1+x3), then lane l with l+4, then (t0+t1)+(t2+t3); the D % 32
// leftover products are added in double.
HWY_INLINE float DotF16(const uint16_t* HWY_RESTRICT k, const float* HWY_RESTRICT q, int64_t D) {
  const D8 d8;
  constexpr size_t N8 = hn::MaxLanes(D8());
  constexpr size_t G = 8 / N8;  // vectors per ggml __m256
  static_assert(N8 * G == 8);
  V8 acc[4 * G];
  for (size_t i = 0; i < 4 * G; ++i) acc[i] = hn::Zero(d8);
  const int64_t np = D & ~int64_t{31};
  for (int64_t i = 0; i < np; i += 32) {
    for (size_t v = 0; v < 4 * G; ++v) {
      acc[v] = hn::MulAdd(LoadF16(d8, k + i + v * N8), hn::LoadU(d8, q + i + v * N8), acc[v]);
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
  for (int64_t i = np; i < D; ++i) total += static_cast<double>(F16ToF32(k[i]) * q[i]);
  return static_cast<float>(total);
}

// Online-softmax state of one query head over one key range.
struct ChunkState {
  float m;
  float s;
};

// Keys [c0, c1) of token t for the heads of kv head kvh, continuing
// `state` and the f16-valued accumulators acc[group][D]. sc, ms, vs:
// [group][kTile] scratch.
HWY_INLINE void OneChunkKeys(const AttentionArgs& a, const AttentionSeq& seq, int32_t kvh,
                             const float* HWY_RESTRICT q16, int64_t c0, int64_t c1,
                             ChunkState* state, float* HWY_RESTRICT acc, float* HWY_RESTRICT sc,
                             float* HWY_RESTRICT ms, float* HWY_RESTRICT vs) {
  const KvLayout& L = a.layout;
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int32_t group = a.n_heads / L.n_kv_heads;
  const int64_t D = L.head_dim;
  for (int64_t j0 = c0; j0 < c1; j0 += kTile) {
    const int64_t n = std::min(kTile, c1 - j0);
    // Scores: s*scale (+ a zero mask, exact).
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* k = KRow(seq, L, kvh, j0 + j);
      for (int32_t h = 0; h < group; ++h) sc[h * kTile + j] = DotF16(k, q16 + h * D, D) * a.scale;
    }
    // The per-key recurrence: a new maximum rescales what came before
    // (ms), any other key is weighted by expf(s - M) (vs).
    for (int32_t h = 0; h < group; ++h) {
      ChunkState st = state[h];
      for (int64_t j = 0; j < n; ++j) {
        const float s = sc[h * kTile + j];
        float m_scale = 1.0f, v_scale = 1.0f;
        if (s > st.m) {
          const float m_old = st.m;
          st.m = s;
          m_scale = std::exp(m_old - s);
        } else {
          v_scale = std::exp(s - st.m);
        }
        ms[h * kTile + j] = m_scale;
        vs[h * kTile + j] = v_scale;
        st.s = std::fma(st.s, m_scale, v_scale);
      }
      state[h] = st;
    }
    // V: acc = f16(acc * ms) on a new maximum, then acc = f16(v * vs + acc)
    // (ggml_vec_scale_f16, ggml_vec_mad_f16), in registers.
    for (int32_t h = 0; h < group; ++h) {
      float* o = acc + h * D;
      const float* hm = ms + h * kTile;
      const float* hv = vs + h * kTile;
      int64_t d = 0;
      for (; d + 4 * N <= D; d += 4 * N) {
        VF o0 = hn::LoadU(df, o + d), o1 = hn::LoadU(df, o + d + N);
        VF o2 = hn::LoadU(df, o + d + 2 * N), o3 = hn::LoadU(df, o + d + 3 * N);
        for (int64_t j = 0; j < n; ++j) {
          if (hm[j] != 1.0f) {
            const VF f = hn::Set(df, hm[j]);
            o0 = RoundToF16(df, hn::Mul(o0, f));
            o1 = RoundToF16(df, hn::Mul(o1, f));
            o2 = RoundToF16(df, hn::Mul(o2, f));
            o3 = RoundToF16(df, hn::Mul(o3, f));
          }
          const VF w = hn::Set(df, hv[j]);
          const uint16_t* v = VRow(seq, L, kvh, j0 + j) + d;
          o0 = RoundToF16(df, hn::MulAdd(LoadF16(df, v), w, o0));
          o1 = RoundToF16(df, hn::MulAdd(LoadF16(df, v + N), w, o1));
          o2 = RoundToF16(df, hn::MulAdd(LoadF16(df, v + 2 * N), w, o2));
          o3 = RoundToF16(df, hn::MulAdd(LoadF16(df, v + 3 * N), w, o3));
        }
        hn::StoreU(o0, df, o + d);
        hn::StoreU(o1, df, o + d + N);
        hn::StoreU(o2, df, o + d + 2 * N);
        hn::StoreU(o3, df, o + d + 3 * N);
      }
      for (; d + N <= D; d += N) {
        VF o0 = hn::LoadU(df, o + d);
        for (int64_t j = 0; j < n; ++j) {
          if (hm[j] != 1.0f) o0 = RoundToF16(df, hn::Mul(o0, hn::Set(df, hm[j])));
          const uint16_t* v = VRow(seq, L, kvh, j0 + j) + d;
          o0 = RoundToF16(df, hn::MulAdd(LoadF16(df, v), hn::Set(df, hv[j]), o0));
        }
        hn::StoreU(o0, df, o + d);
      }
      for (; d < D; ++d) {
        float x = o[d];
        for (int64_t j = 0; j < n; ++j) {
          if (hm[j] != 1.0f) x = RoundF16(x * hm[j]);
          x = RoundF16(std::fma(F16ToF32(VRow(seq, L, kvh, j0 + j)[d]), hv[j], x));
        }
        o[d] = x;
      }
    }
  }
}

// Query token t, the query heads of kv head kvh; `split`: the split-KV
// decode path.
void OneChunkToken(const AttentionArgs& a, int64_t t, int32_t kvh, bool split, float* scratch) {
  const KvLayout& L = a.layout;
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int32_t group = a.n_heads / L.n_kv_heads;
  const int64_t D = L.head_dim;
  float* q16 = scratch;           // [group][D]
  float* acc = q16 + group * D;   // [group][D], f16 values
  float* sum = acc + group * D;   // [group][D], merged partials
  float* sc = sum + group * D;    // [group][kTile]
  float* ms = sc + group * kTile;  // [group][kTile]
  float* vs = ms + group * kTile;  // [group][kTile]
  ChunkState state[64];
  ChunkState merged[64];
  MNEMO_CHECK(group <= 64);

  const int64_t q_stride = static_cast<int64_t>(a.n_heads) * D;
  const float* q = a.q + t * q_stride + static_cast<int64_t>(kvh) * group * D;
  for (int64_t i = 0; i < group * D; ++i) q16[i] = RoundF16(q[i]);
  const AttentionSeq& seq = a.seqs[a.seq[t]];
  const int64_t len = a.kv_len[t];
  MNEMO_CHECK(len <= static_cast<int64_t>(seq.n_pages) * L.page_tokens);
  float* out = a.out + t * q_stride + static_cast<int64_t>(kvh) * group * D;

  if (!split) {
    for (int32_t h = 0; h < group; ++h) state[h] = {-INFINITY, 0.0f};
    std::memset(acc, 0, sizeof(float) * static_cast<size_t>(group * D));
    OneChunkKeys(a, seq, kvh, q16, 0, len, state, acc, sc, ms, vs);
    for (int32_t h = 0; h < group; ++h) {
      const float inv = state[h].s == 0.0f ? 0.0f : 1.0f / state[h].s;
      for (int64_t d = 0; d < D; ++d) out[h * D + d] = acc[h * D + d] * inv;
    }
    return;
  }

  // llama.cpp's padded cache length, split into one range per thread.
  const int64_t n_kv = std::max(kCachePad, (len + kCachePad - 1) / kCachePad * kCachePad);
  const int64_t range = (n_kv + kLlamaThreads - 1) / kLlamaThreads;
  for (int32_t h = 0; h < group; ++h) merged[h] = {-INFINITY, 0.0f};
  std::memset(sum, 0, sizeof(float) * static_cast<size_t>(group * D));
  for (int64_t c0 = 0; c0 < len; c0 += range) {
    for (int32_t h = 0; h < group; ++h) state[h] = {-INFINITY, 0.0f};
    std::memset(acc, 0, sizeof(float) * static_cast<size_t>(group * D));
    OneChunkKeys(a, seq, kvh, q16, c0, std::min(c0 + range, len), state, acc, sc, ms, vs);
    for (int32_t h = 0; h < group; ++h) {
      if (state[h].s == 0.0f) continue;
      const float m_new = std::fmax(merged[h].m, state[h].m);
      const float f_old = std::exp(merged[h].m - m_new);
      const float f_new = std::exp(state[h].m - m_new);
      float* o = sum + h * D;
      const float* p = acc + h * D;
      const VF vo = hn::Set(df, f_old), vn = hn::Set(df, f_new);
      int64_t d = 0;
      for (; d + N <= D; d += N) {
        hn::StoreU(hn::MulAdd(hn::LoadU(df, o + d), vo, hn::Mul(hn::LoadU(df, p + d), vn)), df,
                   o + d);
      }
      for (; d < D; ++d) o[d] = std::fma(o[d], f_old, p[d] * f_new);
      merged[h].s = std::fma(merged[h].s, f_old, state[h].s * f_new);
      merged[h].m = m_new;
    }
  }
  for (int32_t h = 0; h < group; ++h) {
    const float inv = merged[h].s == 0.0f ? 1.0f : 1.0f / merged[h].s;
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = sum[h * D + d] * inv;
  }
}

// ---------------------------------------------------------------------------

// Query rows the sequence of token t has in this call (its tokens are
// consecutive).
int64_t SeqRows(const AttentionArgs& a, int64_t t) {
  int64_t b = t, e = t + 1;
  while (b > 0 && a.seq[b - 1] == a.seq[t]) --b;
  while (e < a.n_tokens && a.seq[e] == a.seq[t]) ++e;
  return e - b;
}

void AttentionRowsImpl(const AttentionArgs& a, int64_t t0, int64_t t1, int32_t kvh,
                       float* scratch) {
  const int64_t rows = SeqRows(a, t0);
  if (rows >= kTile) {
    TiledRows(a, t0, t1, kvh, scratch);
    return;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n_kv = std::max(kCachePad, (a.kv_len[t] + kCachePad - 1) / kCachePad * kCachePad);
    OneChunkToken(a, t, kvh, rows == 1 && n_kv >= kSplitKeys, scratch);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace mnemo::kernels::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mnemo::kernels::cpu {

HWY_EXPORT(AttentionRowsImpl);

size_t AttentionScratchFloats(const AttentionArgs& args) {
  const size_t group = static_cast<size_t>(args.n_heads / args.layout.n_kv_heads);
  const size_t D = static_cast<size_t>(args.layout.head_dim);
  const size_t T = static_cast<size_t>(kTile);
  const size_t rows = group * kAttentionBlockTokens;
  const size_t tiled = 2 * D * T + T + D + rows * D + 2 * rows;
  const size_t one_chunk = 3 * group * D + 3 * group * T;
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

}  // namespace mnemo::kernels::cpu
#endif  // HWY_ONCE
