// Sampling pipeline: penalties -> top-k -> top-p -> min-p -> temperature ->
// draw, arranged so that a fixed seed picks the same token on every platform.
#include "model/sampler.h"

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "kernels/cpu/simd.h"

// Reproducibility needs every multiply and add rounded on its own, yet
// compilers fuse a * b + c into an FMA wherever the target has one (GCC even
// across statements, and on aarch64 by default). Clang is told for the whole
// file; GCC for the exp code below, which therefore stays out of line (GCC
// would apply a caller's contraction to an inlined body). Everywhere else a
// product is either alone in its expression or exact, so fusing cannot change
// a bit.
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace mnemo::model {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Reserve at most this much for the penalty window up front; a larger
// repeat_last_n grows the buffers once, on first use.
constexpr size_t kPenaltyReserveMax = 4096;
// top-p over the full vocabulary buckets candidates by (max - logit) in steps
// of kTopPBucketSpan / kTopPBuckets; everything further below the max than
// kTopPBucketSpan (weight < e^-64) shares the last bucket.
constexpr size_t kTopPBuckets = 1024;
constexpr double kTopPBucketSpan = 64.0;
constexpr size_t kBoundaryReserve = 4096;

// Candidate order everywhere: logit descending, then id ascending.
template <typename C>
inline bool Better(const C& a, const C& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
}

// +inf behaves as the largest float so the softmax stays finite; NaN passes
// through and fails every comparison, so it is never kept.
inline float ClampInf(float v) { return std::min(v, FLT_MAX); }

// Calls fn(id, logit) for every id in order, with the penalized logit where
// `pen` (sorted by id) has one. The penalized ids are few, so the loop only
// compares against the next one; fn must be small enough to inline.
template <typename Pen, typename Fn>
inline void ForEachLogit(std::span<const float> logits, const std::vector<Pen>& pen, Fn&& fn) {
  const float* l = logits.data();
  const int32_t n = static_cast<int32_t>(logits.size());
  size_t p = 0;
  int32_t next = pen.empty() ? n : pen[0].id;
  for (int32_t i = 0; i < n; ++i) {
    float v = l[i];
    if (i == next) [[unlikely]] {
      v = pen[p].logit;
      ++p;
      next = p < pen.size() ? pen[p].id : n;
    }
    fn(i, v);
  }
}

// REQUIRES: logit <= max_logit, both finite. Converts through int32_t: a
// double-to-unsigned conversion is a slow branchy sequence on x86-64.
inline size_t BucketOf(float logit, double max_logit) {
  const double d = (max_logit - static_cast<double>(logit)) *
                   (static_cast<double>(kTopPBuckets) / kTopPBucketSpan);
  const double clamped = std::min(d, static_cast<double>(kTopPBuckets - 1));
  return static_cast<size_t>(static_cast<int32_t>(clamped));
}

std::string FormatFloat(float v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  return buf;
}

Status FiniteIn(const char* name, float v, float lo, float hi) {
  if (!std::isfinite(v) || v < lo || v > hi) {
    return Status::InvalidArgument(std::string(name) + " must be in [" + FormatFloat(lo) + ", " +
                                   FormatFloat(hi) + "], got " + FormatFloat(v));
  }
  return Status::Ok();
}

}  // namespace

// --- Portable exp -------------------------------------------------------------

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

// 2^(j/64), correctly rounded (computed once with 60-digit decimals).
constexpr double kExp2Table[64] = {
    0x1.0000000000000p+0, 0x1.02c9a3e778061p+0, 0x1.059b0d3158574p+0, 0x1.0874518759bc8p+0,
    0x1.0b5586cf9890fp+0, 0x1.0e3ec32d3d1a2p+0, 0x1.11301d0125b51p+0, 0x1.1429aaea92de0p+0,
    0x1.172b83c7d517bp+0, 0x1.1a35beb6fcb75p+0, 0x1.1d4873168b9aap+0, 0x1.2063b88628cd6p+0,
    0x1.2387a6e756238p+0, 0x1.26b4565e27cddp+0, 0x1.29e9df51fdee1p+0, 0x1.2d285a6e4030bp+0,
    0x1.306fe0a31b715p+0, 0x1.33c08b26416ffp+0, 0x1.371a7373aa9cbp+0, 0x1.3a7db34e59ff7p+0,
    0x1.3dea64c123422p+0, 0x1.4160a21f72e2ap+0, 0x1.44e086061892dp+0, 0x1.486a2b5c13cd0p+0,
    0x1.4bfdad5362a27p+0, 0x1.4f9b2769d2ca7p+0, 0x1.5342b569d4f82p+0, 0x1.56f4736b527dap+0,
    0x1.5ab07dd485429p+0, 0x1.5e76f15ad2148p+0, 0x1.6247eb03a5585p+0, 0x1.6623882552225p+0,
    0x1.6a09e667f3bcdp+0, 0x1.6dfb23c651a2fp+0, 0x1.71f75e8ec5f74p+0, 0x1.75feb564267c9p+0,
    0x1.7a11473eb0187p+0, 0x1.7e2f336cf4e62p+0, 0x1.82589994cce13p+0, 0x1.868d99b4492edp+0,
    0x1.8ace5422aa0dbp+0, 0x1.8f1ae99157736p+0, 0x1.93737b0cdc5e5p+0, 0x1.97d829fde4e50p+0,
    0x1.9c49182a3f090p+0, 0x1.a0c667b5de565p+0, 0x1.a5503b23e255dp+0, 0x1.a9e6b5579fdbfp+0,
    0x1.ae89f995ad3adp+0, 0x1.b33a2b84f15fbp+0, 0x1.b7f76f2fb5e47p+0, 0x1.bcc1e904bc1d2p+0,
    0x1.c199bdd85529cp+0, 0x1.c67f12e57d14bp+0, 0x1.cb720dcef9069p+0, 0x1.d072d4a07897cp+0,
    0x1.d5818dcfba487p+0, 0x1.da9e603db3285p+0, 0x1.dfc97337b9b5fp+0, 0x1.e502ee78b3ff6p+0,
    0x1.ea4afa2a490dap+0, 0x1.efa1bee615a27p+0, 0x1.f50765b6e4540p+0, 0x1.fa7c1819e90d8p+0,
};

// exp(x) for -700 <= x <= 0: x = (64k + j) ln2/64 + r with |r| <= ln2/128,
// so exp(x) = 2^k * 2^(j/64) * exp(r), exp(r) by its Taylor series to degree
// 5 (truncation < 4e-17), evaluated Estrin-style to keep the dependency chain
// short. The high part of ln2/64 has 33 significant bits, so n * kLn2By64Hi
// is exact for |n| < 2^20.
inline double ExpCore(double x) {
  constexpr double kInvLn2By64 = 0x1.71547652b82fep+6;
  constexpr double kLn2By64Hi = 0x1.62e42fef00000p-7;
  constexpr double kLn2By64Lo = 0x1.473de6af278edp-40;
  const double t = x * kInvLn2By64;
  const int n = static_cast<int>(t - 0.5);  // truncation toward zero rounds t <= 0
  const double nd = static_cast<double>(n);
  const double hi = x - nd * kLn2By64Hi;
  const double lo = nd * kLn2By64Lo;
  const double r = hi - lo;
  const double r2 = r * r;
  const double r4 = r2 * r2;
  const double a = 1.0 + r;
  const double b = 0.5 + r * (1.0 / 6);
  const double c = 1.0 / 24 + r * (1.0 / 120);
  const double p = a + (r2 * b + r4 * c);
  const int k = n >> 6;  // floor(n / 64); C++20 shifts are arithmetic
  const double frac = kExp2Table[n & 63];
  // k >= -1011 here, so 2^k is a normal double and the scaling is exact.
  const double scale = std::bit_cast<double>(static_cast<uint64_t>(k + 1023) << 52);
  const double m = frac * p;
  return m * scale;
}

}  // namespace

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((noinline))
#endif
double PortableExpNonPositive(double x) {
  if (!(x >= -700.0)) return 0.0;  // also NaN
  return ExpCore(std::min(x, 0.0));
}

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((noinline))
#endif
double Sampler::ExpWeights(const Candidate* c, size_t n, double max_logit, double divisor,
                           double* weight) {
  double sum = 0;
  for (size_t i = 0; i < n; ++i) {
    double x = static_cast<double>(c[i].logit) - max_logit;
    if (divisor != 1.0) x = x / divisor;
    const double w = x >= -700.0 ? ExpCore(std::min(x, 0.0)) : 0.0;
    weight[i] = w;
    sum = sum + w;
  }
  return sum;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// --- Params, generator, argmax ------------------------------------------------

Status SamplingParams::Validate() const {
  if (!std::isfinite(temperature)) {
    return Status::InvalidArgument("temperature must be finite, got " + FormatFloat(temperature));
  }
  if (top_k < 0) {
    return Status::InvalidArgument("top_k must be >= 0 (0 = off), got " + std::to_string(top_k));
  }
  MNEMO_RETURN_IF_ERROR(FiniteIn("top_p", top_p, 0.0f, 1.0f));
  MNEMO_RETURN_IF_ERROR(FiniteIn("min_p", min_p, 0.0f, 1.0f));
  if (!std::isfinite(repeat_penalty) || !(repeat_penalty > 0)) {
    return Status::InvalidArgument("repeat_penalty must be finite and > 0 (1 = off), got " +
                                   FormatFloat(repeat_penalty));
  }
  if (repeat_last_n < -1) {
    return Status::InvalidArgument("repeat_last_n must be >= -1 (0 = off, -1 = all), got " +
                                   std::to_string(repeat_last_n));
  }
  MNEMO_RETURN_IF_ERROR(FiniteIn("presence_penalty", presence_penalty, -2.0f, 2.0f));
  MNEMO_RETURN_IF_ERROR(FiniteIn("frequency_penalty", frequency_penalty, -2.0f, 2.0f));
  return Status::Ok();
}

uint64_t SplitMix64::Next() {
  ++counter_;
  uint64_t z = seed_ + counter_ * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

int32_t ArgmaxLowestId(std::span<const float> values) {
  MNEMO_CHECK(!values.empty());
  // NaN fails `>`, so it never wins; +inf wins as the largest value. SIMD:
  // greedy decode picks a token for every sequence of a step on one thread.
  return static_cast<int32_t>(
      kernels::cpu::ArgmaxF32(values.data(), static_cast<int64_t>(values.size())));
}

// --- Sampler ------------------------------------------------------------------

Result<Sampler> Sampler::Create(const SamplingParams& params, int32_t vocab_size) {
  MNEMO_RETURN_IF_ERROR(params.Validate());
  if (vocab_size <= 0) {
    return Status::InvalidArgument("vocab_size must be > 0, got " + std::to_string(vocab_size));
  }
  return Sampler(params, vocab_size);
}

Sampler::Sampler(const SamplingParams& params, int32_t vocab_size)
    : params_(params), vocab_size_(vocab_size), rng_(params.seed) {
  MNEMO_CHECK(params.Validate().ok());
  MNEMO_CHECK(vocab_size > 0);
  const size_t vocab = static_cast<size_t>(vocab_size_);
  if (params_.temperature > 0) {
    const bool top_k_on = params_.top_k > 0 && static_cast<size_t>(params_.top_k) < vocab;
    const size_t cap = top_k_on ? static_cast<size_t>(params_.top_k) : vocab;
    cand_.reserve(cap);
    weight_.reserve(cap);
    if (!top_k_on && params_.top_p < 1.0f) {
      boundary_.reserve(std::min(vocab, kBoundaryReserve));
      bucket_mass_.resize(kTopPBuckets);
      bucket_count_.resize(kTopPBuckets);
    }
  }
  if (PenaltiesActive()) {
    const size_t window =
        params_.repeat_last_n > 0 ? static_cast<size_t>(params_.repeat_last_n) : kPenaltyReserveMax;
    const size_t reserve = std::min({window, kPenaltyReserveMax, vocab});
    window_.reserve(reserve);
    penalized_.reserve(reserve);
  }
}

bool Sampler::PenaltiesActive() const {
  return params_.repeat_last_n != 0 &&
         (params_.repeat_penalty != 1.0f || params_.presence_penalty != 0.0f ||
          params_.frequency_penalty != 0.0f);
}

void Sampler::ComputePenalties(std::span<const float> logits,
                               std::span<const int32_t> recent_tokens) {
  penalized_.clear();
  if (!PenaltiesActive() || recent_tokens.empty()) return;
  size_t n = recent_tokens.size();
  if (params_.repeat_last_n > 0) n = std::min(n, static_cast<size_t>(params_.repeat_last_n));
  window_.clear();
  for (int32_t id : recent_tokens.last(n)) {
    if (id >= 0 && id < vocab_size_) window_.push_back(id);
  }
  std::sort(window_.begin(), window_.end());
  for (size_t i = 0; i < window_.size();) {
    const int32_t id = window_[i];
    size_t j = i + 1;
    while (j < window_.size() && window_[j] == id) ++j;
    const size_t count = j - i;
    i = j;
    // llama.cpp: dividing a negative logit would make the token more likely,
    // so non-positive logits are multiplied instead.
    float v = logits[static_cast<size_t>(id)];
    if (v <= 0) {
      v *= params_.repeat_penalty;
    } else {
      v /= params_.repeat_penalty;
    }
    // count * frequency is exact in double (a 24-bit mantissa times a count
    // below 2^29), so an FMA here rounds exactly as the separate add does.
    const double sub = static_cast<double>(count) * static_cast<double>(params_.frequency_penalty) +
                       static_cast<double>(params_.presence_penalty);
    v -= static_cast<float>(sub);
    penalized_.push_back({id, v});
  }
}

int32_t Sampler::PenalizedArgmax(std::span<const float> logits) const {
  if (penalized_.empty()) return ArgmaxLowestId(logits);
  int32_t best_id = 0;
  float best = kNegInf;
  ForEachLogit(logits, penalized_, [&](int32_t id, float v) {
    if (v > best) {
      best = v;
      best_id = id;
    }
  });
  return best_id;
}

// Keeps the k best in a heap whose front is the worst kept. Ids arrive in
// increasing order, so a newcomer beats the front exactly when its logit is
// strictly larger: one comparison against a register rejects almost every
// token, and the heap work stays out of the loop.
void Sampler::CollectTopK(std::span<const float> logits, size_t k) {
  cand_.clear();
  float threshold = kNegInf;  // rejects NaN and -inf until the heap is full
  ForEachLogit(logits, penalized_, [&](int32_t id, float raw) {
    const float v = ClampInf(raw);
    if (v > threshold) [[unlikely]] {
      threshold = PushTopK(v, id, k);
    }
  });
  std::sort(cand_.begin(), cand_.end(),
            [](const Candidate& a, const Candidate& b) { return Better(a, b); });
}

float Sampler::PushTopK(float logit, int32_t id, size_t k) {
  auto better = [](const Candidate& a, const Candidate& b) { return Better(a, b); };
  if (cand_.size() < k) {
    cand_.push_back({logit, id});
    std::push_heap(cand_.begin(), cand_.end(), better);
  } else {
    std::pop_heap(cand_.begin(), cand_.end(), better);
    cand_.back() = {logit, id};
    std::push_heap(cand_.begin(), cand_.end(), better);
  }
  return cand_.size() < k ? kNegInf : cand_.front().logit;
}

void Sampler::CollectAll(std::span<const float> logits) {
  cand_.clear();
  ForEachLogit(logits, penalized_, [&](int32_t id, float raw) {
    const float v = ClampInf(raw);
    if (v > kNegInf) cand_.push_back({v, id});
  });
}

// Smallest most-probable prefix whose mass reaches top_p of the candidates'
// softmax at temperature 1 (llama.cpp's order: top-p sees the top-k survivors
// renormalized, and temperature comes later).
size_t Sampler::TopPSorted(size_t n, double sum) {
  const double target = static_cast<double>(params_.top_p) * sum;
  double cum = 0;
  for (size_t i = 0; i < n; ++i) {
    cum = cum + weight_[i];
    if (cum >= target) return i + 1;
  }
  return n;
}

// Same cut without sorting the vocabulary: bucket masses (summed in id order)
// locate the bucket that holds the cut; everything above it is kept in id
// order, and only that bucket is sorted to find the exact token.
size_t Sampler::TopPBucketed(size_t n, double sum, double max_logit) {
  MNEMO_DCHECK(bucket_mass_.size() == kTopPBuckets && bucket_count_.size() == kTopPBuckets);
  const double target = static_cast<double>(params_.top_p) * sum;
  std::fill(bucket_mass_.begin(), bucket_mass_.end(), 0.0);
  std::fill(bucket_count_.begin(), bucket_count_.end(), 0u);
  for (size_t i = 0; i < n; ++i) {
    const size_t b = BucketOf(cand_[i].logit, max_logit);
    bucket_mass_[b] = bucket_mass_[b] + weight_[i];
    ++bucket_count_[b];
  }
  double cum = 0;
  size_t cut_bucket = kTopPBuckets;
  for (size_t b = 0; b < kTopPBuckets; ++b) {
    if (bucket_count_[b] == 0) continue;
    if (cum + bucket_mass_[b] >= target) {
      cut_bucket = b;
      break;
    }
    cum = cum + bucket_mass_[b];
  }
  if (cut_bucket == kTopPBuckets) return n;  // rounding kept the target out of reach

  // Branch-free compaction: whether a token is kept is a coin flip to the
  // branch predictor when the cut falls in the bulk of the distribution.
  boundary_.clear();
  size_t kept = 0;
  for (size_t i = 0; i < n; ++i) {
    const size_t b = BucketOf(cand_[i].logit, max_logit);
    cand_[kept] = cand_[i];
    weight_[kept] = weight_[i];
    kept += b < cut_bucket ? 1 : 0;
    if (b == cut_bucket) boundary_.push_back(cand_[i]);
  }
  std::sort(boundary_.begin(), boundary_.end(),
            [](const Candidate& a, const Candidate& b) { return Better(a, b); });
  std::copy(boundary_.begin(), boundary_.end(), cand_.begin() + static_cast<ptrdiff_t>(kept));
  ExpWeights(cand_.data() + kept, boundary_.size(), max_logit, 1.0, weight_.data() + kept);
  for (size_t j = 0; j < boundary_.size(); ++j) {
    cum = cum + weight_[kept + j];
    if (cum >= target) return kept + j + 1;
  }
  return kept + boundary_.size();
}

size_t Sampler::Prepare(std::span<const float> logits, std::span<const int32_t> recent_tokens,
                        double* total, bool* sorted) {
  MNEMO_CHECK(logits.size() == static_cast<size_t>(vocab_size_));
  ComputePenalties(logits, recent_tokens);

  const size_t vocab = static_cast<size_t>(vocab_size_);
  const bool top_k_on = params_.top_k > 0 && static_cast<size_t>(params_.top_k) < vocab;
  if (top_k_on) {
    CollectTopK(logits, static_cast<size_t>(params_.top_k));
    *sorted = true;
  } else {
    CollectAll(logits);
    *sorted = false;
  }
  size_t n = cand_.size();
  *total = 0;
  if (n == 0) return 0;
  float max_logit = cand_.front().logit;
  if (!*sorted) {
    for (const Candidate& c : cand_) max_logit = std::max(max_logit, c.logit);
  }
  const double m = max_logit;
  weight_.resize(n);

  // Truncation works on the temperature-1 softmax; its weights are reused
  // for the draw when the temperature is 1.
  const bool unit_weights = params_.top_p < 1.0f || params_.min_p > 0.0f;
  if (unit_weights) {
    const double sum = ExpWeights(cand_.data(), n, m, 1.0, weight_.data());
    if (params_.top_p < 1.0f) n = *sorted ? TopPSorted(n, sum) : TopPBucketed(n, sum, m);
  }
  // min-p: keep p_i >= min_p * p_max, i.e. exp(l_i - max) >= min_p. The max
  // survives every earlier stage, so it is still the reference. A stable
  // filter keeps whatever order the candidates had.
  if (params_.min_p > 0.0f) {
    const double min_p = params_.min_p;
    size_t kept = 0;
    for (size_t i = 0; i < n; ++i) {
      cand_[kept] = cand_[i];
      weight_[kept] = weight_[i];
      kept += weight_[i] >= min_p ? 1 : 0;
    }
    n = kept;
  }
  weight_.resize(n);

  // Temperature last: it reshapes the draw, not the truncation.
  const double temp = params_.temperature;
  if (unit_weights && temp == 1.0) {
    double sum = 0;
    for (size_t i = 0; i < n; ++i) sum = sum + weight_[i];
    *total = sum;
  } else {
    *total = ExpWeights(cand_.data(), n, m, temp, weight_.data());
  }
  return n;
}

int32_t Sampler::Sample(std::span<const float> logits, std::span<const int32_t> recent_tokens) {
  MNEMO_CHECK(logits.size() == static_cast<size_t>(vocab_size_));
  if (params_.temperature <= 0.0f) {
    ComputePenalties(logits, recent_tokens);
    return PenalizedArgmax(logits);
  }
  double total = 0;
  bool sorted = false;
  const size_t n = Prepare(logits, recent_tokens, &total, &sorted);
  // One draw per call whatever the candidate count, so the stream position
  // is simply the number of sampled tokens.
  const double u = rng_.NextDouble();
  if (n == 0) return PenalizedArgmax(logits);
  const double target = u * total;
  double cum = 0;
  size_t last_positive = 0;
  for (size_t i = 0; i < n; ++i) {
    if (weight_[i] <= 0) continue;
    cum = cum + weight_[i];
    last_positive = i;
    if (cum > target) return cand_[i].id;
  }
  // u * total rounded up to total: the last token with weight takes it.
  return cand_[last_positive].id;
}

void Sampler::Distribution(std::span<const float> logits, std::span<const int32_t> recent_tokens,
                           std::vector<TokenProb>* out) {
  MNEMO_CHECK(logits.size() == static_cast<size_t>(vocab_size_));
  out->clear();
  if (params_.temperature <= 0.0f) {
    ComputePenalties(logits, recent_tokens);
    out->push_back({PenalizedArgmax(logits), 1.0});
    return;
  }
  double total = 0;
  bool sorted = false;
  const size_t n = Prepare(logits, recent_tokens, &total, &sorted);
  if (n == 0) {
    out->push_back({PenalizedArgmax(logits), 1.0});
    return;
  }
  out->reserve(n);
  for (size_t i = 0; i < n; ++i) out->push_back({cand_[i].id, weight_[i] / total});
  if (!sorted) {
    std::sort(out->begin(), out->end(), [](const TokenProb& a, const TokenProb& b) {
      return a.prob > b.prob || (a.prob == b.prob && a.id < b.id);
    });
  }
}

}  // namespace mnemo::model
