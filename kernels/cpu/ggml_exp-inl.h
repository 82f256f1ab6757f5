// GGML's vector exp (ggml_v_expf), operation for operation, per SIMD target:
// SiLU and attention's softmax use it so that their results agree with
// llama.cpp bit for bit (a polynomial adapted from Arm's optimized routines;
// max error ~1.5 ulp).
//
// Include after hwy/highway.h inside a foreach_target translation unit.

#if defined(MNEMO_KERNELS_CPU_GGML_EXP_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MNEMO_KERNELS_CPU_GGML_EXP_INL_H_
#undef MNEMO_KERNELS_CPU_GGML_EXP_INL_H_
#else
#define MNEMO_KERNELS_CPU_GGML_EXP_INL_H_
#endif

#include <cstdint>

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace mnemo::kernels::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

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

}  // namespace HWY_NAMESPACE
}  // namespace mnemo::kernels::cpu
HWY_AFTER_NAMESPACE();

#endif  // MNEMO_KERNELS_CPU_GGML_EXP_INL_H_
