// Causal attention over fp16 KV pages with an online softmax, one (query
// token, kv head) item at a time: the query heads that share a kv head (GQA)
// are processed together so each K and V row is converted once.
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
#include "hwy/contrib/math/math-inl.h"
#include "kernels/cpu/f16-inl.h"

HWY_BEFORE_NAMESPACE();
namespace mnemo::kernels::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

HWY_INLINE void HalfRowToF32(const uint16_t* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(LoadF16(df, x + i), df, y + i);
  for (; i < n; ++i) y[i] = F16ToF32(x[i]);
}

HWY_INLINE float Dot(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, int64_t n) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  VF s0 = hn::Zero(df), s1 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    s0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), s0);
    s1 = hn::MulAdd(hn::LoadU(df, a + i + N), hn::LoadU(df, b + i + N), s1);
  }
  for (; i + N <= n; i += N) s0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), s0);
  float sum = hn::GetLane(hn::SumOfLanes(df, hn::Add(s0, s1)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// acc[0..D) = acc * correction + sum over j < n of p[j] * v[j][0..D), with
// up to 8 vectors of acc in registers: independent FMA chains, v rows read
// once per chunk group.
template <int G>
HWY_INLINE void PvGroup(float* HWY_RESTRICT acc, float correction, const float* HWY_RESTRICT p,
                        const float* HWY_RESTRICT v, int64_t n, int64_t D) {
  const DF df;
  const size_t N = hn::Lanes(df);
  const VF vc = hn::Set(df, correction);
  VF o[G];
  for (int k = 0; k < G; ++k) o[k] = hn::Mul(hn::LoadU(df, acc + k * N), vc);
  for (int64_t j = 0; j < n; ++j) {
    const VF pj = hn::Set(df, p[j]);
    for (int k = 0; k < G; ++k) o[k] = hn::MulAdd(pj, hn::LoadU(df, v + j * D + k * N), o[k]);
  }
  for (int k = 0; k < G; ++k) hn::StoreU(o[k], df, acc + k * N);
}

HWY_INLINE void AccumulatePv(float* HWY_RESTRICT acc, float correction,
                             const float* HWY_RESTRICT p, const float* HWY_RESTRICT v, int64_t n,
                             int64_t D) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t d = 0;
  for (; d + 8 * N <= D; d += 8 * N) PvGroup<8>(acc + d, correction, p, v + d, n, D);
  for (; d + 4 * N <= D; d += 4 * N) PvGroup<4>(acc + d, correction, p, v + d, n, D);
  for (; d + N <= D; d += N) PvGroup<1>(acc + d, correction, p, v + d, n, D);
  for (; d < D; ++d) {
    float o = acc[d] * correction;
    for (int64_t j = 0; j < n; ++j) o += p[j] * v[j * D + d];
    acc[d] = o;
  }
}

// s[c .. c + NC*N) = scale * sum over d of q[d] * kt[d][c ..], kt rows Pp
// apart: broadcast-FMAs, two independent chains per chunk.
template <int NC>
HWY_INLINE void ScoreChunks(const float* HWY_RESTRICT q, const float* HWY_RESTRICT kt, int64_t Pp,
                            int64_t D, float scale, float* HWY_RESTRICT s) {
  const DF df;
  const size_t N = hn::Lanes(df);
  VF a0[NC], a1[NC];
  for (int k = 0; k < NC; ++k) a0[k] = a1[k] = hn::Zero(df);
  int64_t d = 0;
  for (; d + 2 <= D; d += 2) {
    const VF q0 = hn::Set(df, q[d]);
    const VF q1 = hn::Set(df, q[d + 1]);
    for (int k = 0; k < NC; ++k) {
      a0[k] = hn::MulAdd(q0, hn::LoadU(df, kt + d * Pp + k * N), a0[k]);
      a1[k] = hn::MulAdd(q1, hn::LoadU(df, kt + (d + 1) * Pp + k * N), a1[k]);
    }
  }
  if (d < D) {
    const VF q0 = hn::Set(df, q[d]);
    for (int k = 0; k < NC; ++k) a0[k] = hn::MulAdd(q0, hn::LoadU(df, kt + d * Pp + k * N), a0[k]);
  }
  const VF vs = hn::Set(df, scale);
  for (int k = 0; k < NC; ++k) hn::StoreU(hn::Mul(hn::Add(a0[k], a1[k]), vs), df, s + k * N);
}

void AttentionItemImpl(const AttentionArgs& a, int64_t t, int32_t kv_head, float* scratch) {
  const KvLayout& L = a.layout;
  const int32_t group = a.n_heads / L.n_kv_heads;
  const int32_t D = L.head_dim;
  const int32_t P = L.page_tokens;
  float* kf = scratch;                             // [P][D]
  float* vf = kf + static_cast<size_t>(P) * D;     // [P][D]
  float* scores = vf + static_cast<size_t>(P) * D; // [group][P]
  float* acc = scores + static_cast<size_t>(group) * P;  // [group][D]
  float* m = acc + static_cast<size_t>(group) * D;       // [group]
  float* l = m + group;                                  // [group]
  for (int32_t h = 0; h < group; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
  }
  std::memset(acc, 0, sizeof(float) * static_cast<size_t>(group) * D);

  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t q_stride = static_cast<int64_t>(a.n_heads) * D;
  const float* q = a.q + t * q_stride + static_cast<int64_t>(kv_head) * group * D;
  const AttentionSeq& seq = a.seqs[a.seq[t]];
  const int64_t len = a.kv_len[t];
  MNEMO_CHECK(len <= static_cast<int64_t>(seq.n_pages) * P);

  for (int64_t start = 0, pg = 0; start < len; start += P, ++pg) {
    const int32_t n = static_cast<int32_t>(len - start < P ? len - start : P);
    const auto* page = static_cast<const uint16_t*>(seq.pages[pg]);
    HalfRowToF32(page + L.k_offset(kv_head, 0), kf, static_cast<int64_t>(n) * D);
    HalfRowToF32(page + L.v_offset(kv_head, 0), vf, static_cast<int64_t>(n) * D);
    for (int32_t h = 0; h < group; ++h) {
      float* s = scores + static_cast<size_t>(h) * P;
      float mx = m[h];
      for (int32_t j = 0; j < n; ++j) {
        s[j] = Dot(q + static_cast<int64_t>(h) * D, kf + static_cast<int64_t>(j) * D, D) * a.scale;
        mx = s[j] > mx ? s[j] : mx;
      }
      // Rescale what was accumulated under the old running max.
      const float correction = std::exp(m[h] - mx);
      m[h] = mx;
      int32_t j = 0;
      float sum = 0.0f;
      const VF vmx = hn::Set(df, mx);
      for (; j + N <= n; j += N) {
        const VF e = hn::Exp(df, hn::Sub(hn::LoadU(df, s + j), vmx));
        hn::StoreU(e, df, s + j);
        sum += hn::GetLane(hn::SumOfLanes(df, e));
      }
      for (; j < n; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      l[h] = l[h] * correction + sum;
      AccumulatePv(acc + static_cast<size_t>(h) * D, correction, s, vf, n, D);
    }
  }
  float* out = a.out + t * q_stride + static_cast<int64_t>(kv_head) * group * D;
  for (int32_t h = 0; h < group; ++h) {
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    for (int32_t d = 0; d < D; ++d) out[h * D + d] = acc[h * D + d] * inv;
  }
}


// Query tokens [t0, t1) of one sequence (prefill) and kv head kv_head: K
// and V pages are converted once for all (t1 - t0) * group query rows, K
// transposed so that each query row's scores for a page come from
// broadcast-multiply-adds without horizontal sums.
void AttentionBlockImpl(const AttentionArgs& a, int64_t t0, int64_t t1, int32_t kv_head,
                        float* scratch) {
  const KvLayout& L = a.layout;
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int32_t group = a.n_heads / L.n_kv_heads;
  const int64_t D = L.head_dim;
  const int64_t P = L.page_tokens;
  const int64_t Pp = (P + N - 1) / N * N;  // padded row of the transposed K
  const int64_t rows = (t1 - t0) * group;
  float* kt = scratch;          // [D][Pp]
  float* vf = kt + D * Pp;      // [P][D]
  float* s = vf + P * D;        // [Pp]
  float* tmp = s + Pp;          // [D]
  float* acc = tmp + D;         // [rows][D]
  float* m = acc + rows * D;    // [rows]
  float* l = m + rows;          // [rows]
  for (int64_t r = 0; r < rows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  std::memset(acc, 0, sizeof(float) * static_cast<size_t>(rows * D));
  // Unused columns of kt may hold stale values: keep them finite.
  std::memset(kt, 0, sizeof(float) * static_cast<size_t>(D * Pp));

  const int64_t q_stride = static_cast<int64_t>(a.n_heads) * D;
  const AttentionSeq& seq = a.seqs[a.seq[t0]];
  int64_t max_len = 0;
  for (int64_t t = t0; t < t1; ++t) max_len = std::max<int64_t>(max_len, a.kv_len[t]);
  MNEMO_CHECK(max_len <= static_cast<int64_t>(seq.n_pages) * P);

  for (int64_t start = 0, pg = 0; start < max_len; start += P, ++pg) {
    const int64_t n = std::min(P, max_len - start);
    const auto* page = static_cast<const uint16_t*>(seq.pages[pg]);
    const uint16_t* kp = page + L.k_offset(kv_head, 0);
    for (int64_t j = 0; j < n; ++j) {
      HalfRowToF32(kp + j * D, tmp, D);
      for (int64_t d = 0; d < D; ++d) kt[d * Pp + j] = tmp[d];
    }
    HalfRowToF32(page + L.v_offset(kv_head, 0), vf, n * D);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = t0 + r / group;
      const int64_t valid = std::min<int64_t>(n, a.kv_len[t] - start);
      if (valid <= 0) continue;
      const float* q = a.q + t * q_stride + (static_cast<int64_t>(kv_head) * group + r % group) * D;
      // Scores for the page's slots, N at a time.
      int64_t c = 0;
      for (; c + 4 * N <= Pp; c += 4 * N) ScoreChunks<4>(q, kt + c, Pp, D, a.scale, s + c);
      for (; c + 2 * N <= Pp; c += 2 * N) ScoreChunks<2>(q, kt + c, Pp, D, a.scale, s + c);
      for (; c < Pp; c += N) ScoreChunks<1>(q, kt + c, Pp, D, a.scale, s + c);
      float mx = m[r];
      for (int64_t j = 0; j < valid; ++j) mx = s[j] > mx ? s[j] : mx;
      for (int64_t j = valid; j < Pp; ++j) s[j] = -INFINITY;
      const float correction = std::exp(m[r] - mx);
      m[r] = mx;
      VF vsum = hn::Zero(df);
      const VF vmx = hn::Set(df, mx);
      for (int64_t c = 0; c < Pp; c += N) {
        const VF e = hn::Exp(df, hn::Sub(hn::LoadU(df, s + c), vmx));
        hn::StoreU(e, df, s + c);
        vsum = hn::Add(vsum, e);
      }
      l[r] = l[r] * correction + hn::GetLane(hn::SumOfLanes(df, vsum));
      AccumulatePv(acc + r * D, correction, s, vf, valid, D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / group;
    float* out = a.out + t * q_stride + (static_cast<int64_t>(kv_head) * group + r % group) * D;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) out[d] = acc[r * D + d] * inv;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace mnemo::kernels::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mnemo::kernels::cpu {

HWY_EXPORT(AttentionItemImpl);
HWY_EXPORT(AttentionBlockImpl);

size_t AttentionScratchFloats(const AttentionArgs& args) {
  const size_t group = static_cast<size_t>(args.n_heads / args.layout.n_kv_heads);
  const size_t P = static_cast<size_t>(args.layout.page_tokens);
  const size_t Pp = P + 64;  // padded to any vector width
  const size_t D = static_cast<size_t>(args.layout.head_dim);
  const size_t rows = group * kAttentionBlockTokens;
  const size_t item = 2 * P * D + group * P + group * D + 2 * group;
  const size_t block = D * Pp + P * D + Pp + D + rows * D + 2 * rows;
  return std::max(item, block) + 16;
}

void AttentionBlock(const AttentionArgs& args, int64_t t0, int64_t t1, int32_t kv_head,
                    float* scratch) {
  MNEMO_CHECK(t1 - t0 <= kAttentionBlockTokens);
  HWY_DYNAMIC_DISPATCH(AttentionBlockImpl)(args, t0, t1, kv_head, scratch);
}

void AttentionItem(const AttentionArgs& args, int64_t t, int32_t kv_head, float* scratch) {
  HWY_DYNAMIC_DISPATCH(AttentionItemImpl)(args, t, kv_head, scratch);
}

}  // namespace mnemo::kernels::cpu
#endif  // HWY_ONCE
