// Per-target fp16 <-> f32 vector conversion with IEEE semantics (round to
// nearest even, infinities, subnormals). F16C targets use the hardware;
// elsewhere Highway 1.0.3's emulation truncates and mishandles infinities,
// so this emulates the bit-exact scalar algorithm of quants.h in lanes.
//
// Include after hwy/highway.h inside a foreach_target translation unit.

#if defined(MNEMO_KERNELS_CPU_F16_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MNEMO_KERNELS_CPU_F16_INL_H_
#undef MNEMO_KERNELS_CPU_F16_INL_H_
#else
#define MNEMO_KERNELS_CPU_F16_INL_H_
#endif

#include <cstdint>

#include "hwy/highway.h"
#include "kernels/cpu/quants.h"

HWY_BEFORE_NAMESPACE();
namespace mnemo::kernels::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

#undef MNEMO_HAVE_F16C
#if HWY_ARCH_X86 && (HWY_TARGET <= HWY_AVX2)
#define MNEMO_HAVE_F16C 1
#else
#define MNEMO_HAVE_F16C 0
#endif

// Lanes(df) halves at p -> floats.
template <class DF>
HWY_INLINE hn::Vec<DF> LoadF16(DF df, const uint16_t* HWY_RESTRICT p) {
#if MNEMO_HAVE_F16C
  const hn::Rebind<hwy::float16_t, DF> dh;
  return hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(p)));
#else
  const hn::RebindToUnsigned<DF> du;
  const hn::Rebind<uint16_t, DF> du16;
  const auto w = hn::ShiftLeft<16>(hn::PromoteTo(du, hn::LoadU(du16, p)));
  const auto sign = hn::And(w, hn::Set(du, 0x80000000u));
  const auto two_w = hn::Add(w, w);
  const auto normalized = hn::Mul(
      hn::BitCast(df, hn::Add(hn::ShiftRight<4>(two_w), hn::Set(du, 0xE0u << 23))),
      hn::Set(df, 0x1.0p-112f));
  const auto denormalized =
      hn::Sub(hn::BitCast(df, hn::Or(hn::ShiftRight<17>(two_w), hn::Set(du, 126u << 23))),
              hn::Set(df, 0.5f));
  const auto is_denormal = hn::RebindMask(df, hn::Lt(two_w, hn::Set(du, 1u << 27)));
  const auto magnitude = hn::IfThenElse(is_denormal, denormalized, normalized);
  return hn::Or(hn::BitCast(df, sign), magnitude);
#endif
}

// Stores Lanes(df) floats as halves at p, rounding to nearest even.
template <class DF>
HWY_INLINE void StoreF16(DF df, hn::Vec<DF> v, uint16_t* HWY_RESTRICT p) {
#if MNEMO_HAVE_F16C
  const hn::Rebind<hwy::float16_t, DF> dh;
  hn::StoreU(hn::DemoteTo(dh, v), dh, reinterpret_cast<hwy::float16_t*>(p));
#else
  const hn::RebindToUnsigned<DF> du;
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint16_t, DF> du16;
  auto base = hn::Mul(hn::Mul(hn::Abs(v), hn::Set(df, 0x1.0p+112f)), hn::Set(df, 0x1.0p-110f));
  const auto w = hn::BitCast(du, v);
  const auto shl1_w = hn::Add(w, w);
  const auto sign = hn::And(w, hn::Set(du, 0x80000000u));
  // Unsigned max via signed compare is wrong for the top bit: both values
  // have it clear after the shift below, so compare the shifted forms.
  const auto bias_hi = hn::ShiftRight<1>(hn::And(shl1_w, hn::Set(du, 0xFF000000u)));
  const auto bias = hn::BitCast(
      du, hn::Max(hn::BitCast(di, bias_hi), hn::Set(di, static_cast<int32_t>(0x71000000u >> 1))));
  base = hn::Add(hn::BitCast(df, hn::Add(bias, hn::Set(du, 0x07800000u))), base);
  const auto bits = hn::BitCast(du, base);
  const auto exp_bits = hn::And(hn::ShiftRight<13>(bits), hn::Set(du, 0x00007C00u));
  const auto mantissa_bits = hn::And(bits, hn::Set(du, 0x00000FFFu));
  const auto nonsign = hn::Add(exp_bits, mantissa_bits);
  const auto is_nan = hn::Gt(hn::BitCast(di, hn::ShiftRight<1>(shl1_w)),
                             hn::Set(di, static_cast<int32_t>(0xFF000000u >> 1)));
  const auto magnitude = hn::IfThenElse(hn::RebindMask(du, is_nan), hn::Set(du, 0x7E00u), nonsign);
  const auto h = hn::Or(hn::ShiftRight<16>(sign), magnitude);
  hn::StoreU(hn::DemoteTo(du16, hn::BitCast(di, h)), du16, p);
#endif
}

// y[0, n) = x[0, n) converted from fp16.
HWY_INLINE void HalfRowToF32(const uint16_t* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(LoadF16(df, x + i), df, y + i);
  for (; i < n; ++i) y[i] = F16ToF32(x[i]);
}

}  // namespace HWY_NAMESPACE
}  // namespace mnemo::kernels::cpu
HWY_AFTER_NAMESPACE();

#endif  // MNEMO_KERNELS_CPU_F16_INL_H_
