// Element-wise kernels (RMSNorm, RoPE, SiLU*mul, add, softmax, fp16
// conversion), compiled once per Highway target, and the target controls.
#include <cmath>
#include <cstring>

#include "common/check.h"
#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/cpu/ops.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
#include "kernels/cpu/f16-inl.h"
#include "kernels/cpu/ggml_exp-inl.h"

HWY_BEFORE_NAMESPACE();
namespace mnemo::kernels::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

void RmsNormRowImpl(const float* HWY_RESTRICT x, const float* HWY_RESTRICT gain, int64_t dim,
                    float eps, float* y) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  // Squares rounded to float, summed in double, as llama.cpp does: the norm
  // scale then agrees to the last bit, and with it the rounding of the next
  // matmul's activation quantization (a one-ulp difference flips quantized
  // values that sit on a rounding boundary).
  double sum = 0.0;
  for (int64_t j = 0; j < dim; ++j) sum += static_cast<double>(x[j] * x[j]);
  const float mean = static_cast<float>(sum / static_cast<double>(dim));
  const float scale = 1.0f / std::sqrt(mean + eps);
  const VF vscale = hn::Set(df, scale);
  int64_t i = 0;
  for (; i + N <= dim; i += N) {
    hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(df, x + i), vscale), hn::LoadU(df, gain + i)), df, y + i);
  }
  for (; i < dim; ++i) y[i] = x[i] * scale * gain[i];
}

void RopeRowImpl(float* HWY_RESTRICT x, int32_t n_heads, int32_t head_dim, int32_t rot_dims,
                 const float* HWY_RESTRICT cos_sin, RopeStyle style) {
  const DF df;
  const int32_t N = static_cast<int32_t>(hn::Lanes(df));
  const int32_t half = rot_dims / 2;
  const float* cs = cos_sin;
  const float* sn = cos_sin + half;
  for (int32_t h = 0; h < n_heads; ++h) {
    float* xh = x + static_cast<int64_t>(h) * head_dim;
    int32_t i = 0;
    if (style == RopeStyle::kAdjacent) {
      for (; i + N <= half; i += N) {
        VF a, b;
        hn::LoadInterleaved2(df, xh + 2 * i, a, b);
        const VF c = hn::LoadU(df, cs + i);
        const VF s = hn::LoadU(df, sn + i);
        // The FMA pattern GCC emits for GGML's rotate_pairs (x0*c - x1*s,
        // x0*s + x1*c): x1*s and x1*c are rounded, the x0 products fused,
        // so rotated values agree with llama.cpp bit for bit.
        const VF ra = hn::MulSub(a, c, hn::Mul(b, s));
        const VF rb = hn::MulAdd(a, s, hn::Mul(b, c));
        hn::StoreInterleaved2(ra, rb, df, xh + 2 * i);
      }
      for (; i < half; ++i) {
        const float a = xh[2 * i], b = xh[2 * i + 1];
        xh[2 * i] = std::fma(a, cs[i], -(b * sn[i]));
        xh[2 * i + 1] = std::fma(a, sn[i], b * cs[i]);
      }
    } else {
      for (; i + N <= half; i += N) {
        const VF a = hn::LoadU(df, xh + i);
        const VF b = hn::LoadU(df, xh + i + half);
        const VF c = hn::LoadU(df, cs + i);
        const VF s = hn::LoadU(df, sn + i);
        hn::StoreU(hn::MulSub(a, c, hn::Mul(b, s)), df, xh + i);
        hn::StoreU(hn::MulAdd(a, s, hn::Mul(b, c)), df, xh + i + half);
      }
      for (; i < half; ++i) {
        const float a = xh[i], b = xh[i + half];
        xh[i] = std::fma(a, cs[i], -(b * sn[i]));
        xh[i + half] = std::fma(a, sn[i], b * cs[i]);
      }
    }
  }
}

void SiluMulImpl(float* HWY_RESTRICT gate, const float* HWY_RESTRICT up, int64_t count) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const VF one = hn::Set(df, 1.0f);
  int64_t i = 0;
  for (; i + N <= count; i += N) {
    const VF g = hn::LoadU(df, gate + i);
    const VF e = GgmlExp(df, hn::Sub(hn::Zero(df), g));
    hn::StoreU(hn::Mul(hn::Div(g, hn::Add(one, e)), hn::LoadU(df, up + i)), df, gate + i);
  }
  for (; i < count; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void AddInPlaceImpl(float* HWY_RESTRICT y, const float* HWY_RESTRICT x, int64_t count) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  for (; i + N <= count; i += N) {
    hn::StoreU(hn::Add(hn::LoadU(df, y + i), hn::LoadU(df, x + i)), df, y + i);
  }
  for (; i < count; ++i) y[i] += x[i];
}

void SoftmaxImpl(float* HWY_RESTRICT x, int64_t n) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  VF vmax = hn::Set(df, -INFINITY);
  int64_t i = 0;
  for (; i + N <= n; i += N) vmax = hn::Max(vmax, hn::LoadU(df, x + i));
  float mx = hn::GetLane(hn::MaxOfLanes(df, vmax));
  for (; i < n; ++i) mx = std::fmax(mx, x[i]);
  const VF vm = hn::Set(df, mx);
  VF vsum = hn::Zero(df);
  i = 0;
  for (; i + N <= n; i += N) {
    const VF e = hn::Exp(df, hn::Sub(hn::LoadU(df, x + i), vm));
    hn::StoreU(e, df, x + i);
    vsum = hn::Add(vsum, e);
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, vsum));
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  const VF vinv = hn::Set(df, inv);
  i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Mul(hn::LoadU(df, x + i), vinv), df, x + i);
  for (; i < n; ++i) x[i] *= inv;
}

void F16ToF32RowImpl(const uint16_t* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n) {
  HalfRowToF32(x, y, n);
}

// Each lane keeps the first index of its largest value (strict >, so NaN
// never wins and ties keep the earlier index); then the lowest index among
// the lanes holding the overall largest, then the tail in order.
int64_t ArgmaxF32Impl(const float* HWY_RESTRICT x, int64_t n) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t best_id = 0;
  float best = -INFINITY;
  int64_t i = 0;
  if (n >= N && n <= INT32_MAX) {
    VF vbest = hn::Set(df, -INFINITY);
    auto vid = hn::Zero(di);
    auto idx = hn::Iota(di, 0);
    const auto step = hn::Set(di, static_cast<int32_t>(N));
    for (; i + N <= n; i += N) {
      const VF v = hn::LoadU(df, x + i);
      const auto gt = hn::Gt(v, vbest);
      vbest = hn::IfThenElse(gt, v, vbest);
      vid = hn::IfThenElse(hn::RebindMask(di, gt), idx, vid);
      idx = hn::Add(idx, step);
    }
    best = hn::GetLane(hn::MaxOfLanes(df, vbest));
    const auto at_best = hn::RebindMask(di, hn::Eq(vbest, hn::Set(df, best)));
    best_id = hn::GetLane(hn::MinOfLanes(di, hn::IfThenElse(at_best, vid, hn::Set(di, INT32_MAX))));
  }
  for (; i < n; ++i) {
    if (x[i] > best) {
      best = x[i];
      best_id = i;
    }
  }
  return best_id;
}

}  // namespace HWY_NAMESPACE
}  // namespace mnemo::kernels::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mnemo::kernels::cpu {

HWY_EXPORT(RmsNormRowImpl);
HWY_EXPORT(RopeRowImpl);
HWY_EXPORT(SiluMulImpl);
HWY_EXPORT(AddInPlaceImpl);
HWY_EXPORT(SoftmaxImpl);
HWY_EXPORT(F16ToF32RowImpl);
HWY_EXPORT(ArgmaxF32Impl);

void RmsNormRow(const float* x, const float* gain, int64_t dim, float eps, float* y) {
  HWY_DYNAMIC_DISPATCH(RmsNormRowImpl)(x, gain, dim, eps, y);
}
void RopeRow(float* x, int32_t n_heads, int32_t head_dim, int32_t rot_dims, const float* cos_sin,
             RopeStyle style) {
  HWY_DYNAMIC_DISPATCH(RopeRowImpl)(x, n_heads, head_dim, rot_dims, cos_sin, style);
}
void SiluMul(float* gate, const float* up, int64_t count) {
  HWY_DYNAMIC_DISPATCH(SiluMulImpl)(gate, up, count);
}
void AddInPlace(float* y, const float* x, int64_t count) {
  HWY_DYNAMIC_DISPATCH(AddInPlaceImpl)(y, x, count);
}
void Softmax(float* x, int64_t n) { HWY_DYNAMIC_DISPATCH(SoftmaxImpl)(x, n); }
void F16ToF32Row(const uint16_t* x, float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(F16ToF32RowImpl)(x, y, n);
}
int64_t ArgmaxF32(const float* x, int64_t n) { return HWY_DYNAMIC_DISPATCH(ArgmaxF32Impl)(x, n); }

std::vector<int64_t> SimdTargets() {
  // Evaluated in this file so it reflects the targets the kernels were
  // compiled for, not those of the caller's translation unit.
  std::vector<int64_t> out;
  const int64_t supported = hwy::SupportedTargets();
  for (int64_t bit = 1; bit != 0 && bit <= HWY_SCALAR; bit <<= 1) {
    if ((HWY_TARGETS & bit) && (supported & bit)) out.push_back(bit);
  }
  return out;
}

std::string SimdTargetName(int64_t target) { return hwy::TargetName(target); }

void SetSimdTargetForTest(int64_t target) { hwy::SetSupportedTargetsForTest(target); }

}  // namespace mnemo::kernels::cpu
#endif  // HWY_ONCE
