// Causal attention over fp16 KV pages with an online softmax, one (query
// token, kv head) item at a time: the query heads that share a kv head (GQA)
// are processed together so each K and V row is converted once.
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

// y = y * scale + p * v over n floats.
HWY_INLINE void ScaleAxpy(float* HWY_RESTRICT y, float scale, float p, const float* HWY_RESTRICT v,
                          int64_t n) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const VF vs = hn::Set(df, scale);
  const VF vp = hn::Set(df, p);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    hn::StoreU(hn::MulAdd(hn::LoadU(df, v + i), vp, hn::Mul(hn::LoadU(df, y + i), vs)), df, y + i);
  }
  for (; i < n; ++i) y[i] = y[i] * scale + p * v[i];
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
        mx = std::fmax(mx, s[j]);
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
      float* acc_h = acc + static_cast<size_t>(h) * D;
      float scale = correction;
      for (j = 0; j < n; ++j) {
        ScaleAxpy(acc_h, scale, s[j], vf + static_cast<int64_t>(j) * D, D);
        scale = 1.0f;
      }
    }
  }
  float* out = a.out + t * q_stride + static_cast<int64_t>(kv_head) * group * D;
  for (int32_t h = 0; h < group; ++h) {
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    for (int32_t d = 0; d < D; ++d) out[h * D + d] = acc[h * D + d] * inv;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace mnemo::kernels::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mnemo::kernels::cpu {

HWY_EXPORT(AttentionItemImpl);

size_t AttentionScratchFloats(const AttentionArgs& args) {
  const size_t group = static_cast<size_t>(args.n_heads / args.layout.n_kv_heads);
  const size_t P = static_cast<size_t>(args.layout.page_tokens);
  const size_t D = static_cast<size_t>(args.layout.head_dim);
  return 2 * P * D + group * P + group * D + 2 * group + 16;
}

void AttentionItem(const AttentionArgs& args, int64_t t, int32_t kv_head, float* scratch) {
  HWY_DYNAMIC_DISPATCH(AttentionItemImpl)(args, t, kv_head, scratch);
}

}  // namespace mnemo::kernels::cpu
#endif  // HWY_ONCE
