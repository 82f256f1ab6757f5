// The CPU attention kernel against a scalar model of llama.cpp's CPU flash
// attention (ggml 0.25.3, ops.cpp, AVX2+FMA build), float for float: the
// tiled prefill path, the one-chunk path with its f16 accumulator and the
// split-KV decode path. The model below is the specification; it was checked
// bit for bit against ggml_flash_attn_ext run by llama.cpp's own library.
// Targets with fused multiply-add and F16C must match exactly; the others
// compute the same sequence without fusion and are held to a tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "hwy/targets.h"
#include "kernels/backend.h"
#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"
#include "tests/kernels/kernel_test_util.h"

namespace mnemo::kernels::cpu {
namespace {

// --- The model of llama.cpp --------------------------------------------------

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ggml_v_expf, one lane (vec.h).
float GgmlExp(float x) {
  const float r = 0x1.8p23f;
  const float z = std::fma(x, 0x1.715476p+0f, r);
  const float n = z - r;
  const float b = std::fma(-n, 0x1.7f7d1cp-20f, std::fma(-n, 0x1.62e4p-1f, x));
  const uint32_t e = Bits(z) << 23;
  const float k = FromBits(e + Bits(1.0f));
  const float u = b * b;
  const float j = std::fma(std::fma(std::fma(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u,
                                    std::fma(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
                           u, 0x1.ffffecp-1f * b);
  if (!(std::fabs(n) > 126.0f)) return std::fma(j, k, k);
  const uint32_t g = n <= 0.0f ? 0x82000000u : 0u;
  const float s1 = FromBits(g + 0x7f000000u);
  const float s2 = FromBits(e - g);
  if (std::fabs(n) > 192.0f) return s1 * s1;
  return std::fma(s2, j, s2) * s1;
}

// ggml_vec_dot_f16 (vec.cpp, AVX2): four 8-lane FMA accumulators over
// 32-element steps; reduced (x0+x2)+(x1+x3), lanes l and l+4, then
// (t0+t1)+(t2+t3), as a double; leftover products added in double.
float DotF16(const uint16_t* k, const uint16_t* q, int D) {
  float acc[32] = {};
  const int np = D & ~31;
  for (int i = 0; i < np; i += 32) {
    for (int e = 0; e < 32; ++e) acc[e] = std::fma(F16ToF32(k[i + e]), F16ToF32(q[i + e]), acc[e]);
  }
  float y[8];
  for (int l = 0; l < 8; ++l) y[l] = (acc[l] + acc[16 + l]) + (acc[8 + l] + acc[24 + l]);
  const float t0 = y[0] + y[4], t1 = y[1] + y[5], t2 = y[2] + y[6], t3 = y[3] + y[7];
  double sum = (t0 + t1) + (t2 + t3);
  for (int i = np; i < D; ++i) sum += static_cast<double>(F16ToF32(k[i]) * F16ToF32(q[i]));
  return static_cast<float>(sum);
}

// One query row's keys and values, f16, key j at k[j], v[j].
struct Keys {
  std::vector<const uint16_t*> k, v;
};

struct Partial {
  float m = -INFINITY;
  float s = 0.0f;
  std::vector<float> vkq;
};

// ggml_compute_forward_flash_attn_ext_f16_one_chunk over keys [ic0, ic1),
// of which those below len are unmasked. The compiler contracts
// S = S*ms + vs into an FMA.
Partial OneChunk(const float* q, const Keys& kv, int D, float scale, int ic0, int ic1, int len) {
  std::vector<uint16_t> q16(D), acc(D, 0);
  for (int d = 0; d < D; ++d) q16[d] = F32ToF16(q[d]);
  Partial p;
  for (int ic = ic0; ic < std::min(ic1, len); ++ic) {
    const float s = DotF16(kv.k[ic], q16.data(), D) * scale;
    const float m_old = p.m;
    float ms = 1.0f, vs = 1.0f;
    if (s > p.m) {
      p.m = s;
      ms = std::exp(m_old - p.m);
      for (int d = 0; d < D; ++d) acc[d] = F32ToF16(F16ToF32(acc[d]) * ms);
    } else {
      vs = std::exp(s - p.m);
    }
    for (int d = 0; d < D; ++d) {
      acc[d] = F32ToF16(std::fma(F16ToF32(kv.v[ic][d]), vs, F16ToF32(acc[d])));
    }
    p.s = std::fma(p.s, ms, vs);
  }
  p.vkq.resize(D);
  for (int d = 0; d < D; ++d) p.vkq[d] = F16ToF32(acc[d]);
  return p;
}

std::vector<float> Normalize(float s, std::vector<float> v) {
  const float inv = s == 0.0f ? 0.0f : 1.0f / s;
  for (float& x : v) x *= inv;
  return v;
}

// The split-KV path: llama.cpp's padded cache length n_kv split into one
// range per thread, partials merged in order by
// ggml_flash_attn_ext_reduce_partials (its a*x + b*y contracted to
// fma(a, x, b*y)).
std::vector<float> SplitKv(const float* q, const Keys& kv, int D, float scale, int len, int n_kv,
                           int threads) {
  const int range = (n_kv + threads - 1) / threads;
  float m = -INFINITY, s = 0.0f;
  std::vector<float> acc(D, 0.0f);
  for (int c = 0; c < threads; ++c) {
    const int ic0 = c * range;
    if (ic0 >= n_kv) continue;
    const Partial p = OneChunk(q, kv, D, scale, ic0, std::min(ic0 + range, n_kv), len);
    if (p.s == 0.0f) continue;
    const float m_new = std::fmax(m, p.m);
    const float f_old = std::exp(m - m_new), f_new = std::exp(p.m - m_new);
    for (int d = 0; d < D; ++d) acc[d] = std::fma(acc[d], f_old, p.vkq[d] * f_new);
    s = std::fma(s, f_old, p.s * f_new);
    m = m_new;
  }
  if (s == 0.0f) return acc;
  return Normalize(s, acc);
}

// ggml_compute_forward_flash_attn_ext_tiled for one row: 64-key tiles from
// key 0, masked keys -inf; KQ and VKQ by simd_gemm (one FMA chain per
// output, in order); ggml_vec_soft_max_f32 sums groups of 8 in float and
// the groups in double.
std::vector<float> Tiled(const float* q, const Keys& kv, int D, float scale, int len) {
  constexpr int kTile = 64;
  float m = -INFINITY, s = 0.0f;
  std::vector<float> acc(D, 0.0f);
  for (int c0 = 0; c0 < len; c0 += kTile) {
    float kq[kTile];
    for (int j = 0; j < kTile; ++j) {
      kq[j] = -INFINITY;
      if (c0 + j >= len) continue;
      float a = 0.0f;
      for (int d = 0; d < D; ++d) a = std::fma(q[d], F16ToF32(kv.k[c0 + j][d]), a);
      kq[j] = a * scale;
    }
    float tile_max = -INFINITY;
    for (float x : kq) tile_max = std::max(tile_max, x);
    const float m_new = std::fmax(m, tile_max);
    if (m_new > m) {
      const float ms = std::exp(m - m_new);
      for (float& x : acc) x *= ms;
      s *= ms;
    }
    m = m_new;
    double sum = 0.0;
    for (int g = 0; g < kTile; g += 8) {
      float* e = kq + g;
      for (int l = 0; l < 8; ++l) e[l] = GgmlExp(e[l] - m_new);
      sum += static_cast<double>(((e[0] + e[4]) + (e[2] + e[6])) + ((e[1] + e[5]) + (e[3] + e[7])));
    }
    s = static_cast<float>(static_cast<double>(s) + sum);
    for (int d = 0; d < D; ++d) {
      for (int j = 0; j < kTile && c0 + j < len; ++j) {
        acc[d] = std::fma(kq[j], F16ToF32(kv.v[c0 + j][d]), acc[d]);
      }
    }
  }
  return Normalize(s, acc);
}

// What mnemo computes for a query row of a sequence with `rows` query rows
// in the call, the last of them with `last_len` keys: what llama.cpp
// computes (n_ctx >= 512, 2 threads) for that row in a ubatch of `rows`
// rows, except that a run of fewer than 64 rows over a context of 64 keys
// or more (a turn appended to a session's history) takes the tiled path,
// which llama.cpp keeps for ubatches of 64 rows: the one-chunk path's
// per-key f16 recurrence costs ~3x as much there.
std::vector<float> MnemoRow(const float* q, const Keys& kv, int D, float scale, int len, int rows,
                            int last_len) {
  if (rows >= 64 || (rows > 1 && last_len >= 64)) return Tiled(q, kv, D, scale, len);
  const int n_kv = std::max(256, (len + 255) / 256 * 256);
  if (rows == 1 && n_kv >= 512) return SplitKv(q, kv, D, scale, len, n_kv, 2);
  const Partial p = OneChunk(q, kv, D, scale, 0, n_kv, len);
  return Normalize(p.s, p.vkq);
}

// --- The test -------------------------------------------------------------------

struct Geometry {
  int32_t n_heads, n_kv_heads, head_dim, page_tokens;
};
void PrintTo(const Geometry& g, std::ostream* os) {
  *os << g.n_heads << " heads, " << g.n_kv_heads << " kv heads, dim " << g.head_dim << ", "
      << g.page_tokens << "-token pages";
}

// A query run: `rows` consecutive tokens of one sequence, the last with
// `last_len` keys.
struct QueryRun {
  int32_t rows;
  int32_t last_len;
};

bool ExactTarget(int64_t target) {
  const std::string name = SimdTargetName(target);
  return name == "AVX2" || name.rfind("AVX3", 0) == 0;
}

class AttentionNumericsTest
    : public ::testing::TestWithParam<std::tuple<int64_t, int, Geometry>> {
 protected:
  void SetUp() override {
    SetSimdTargetForTest(std::get<0>(GetParam()));
    backend_ = MakeCpuBackend(std::get<1>(GetParam()));
  }
  void TearDown() override {
    for (void* p : pages_) backend_->FreeBuffer(p);
    backend_.reset();
    SetSimdTargetForTest(0);
  }

  // One call of Attention over `runs`, each run its own sequence; every
  // output float compared to the model of llama.cpp. Then the same call in
  // MathMode::kFast (where the CPU has it), where every row takes the tiled
  // algorithm whatever its run.
  void Check(const std::vector<QueryRun>& runs, uint32_t seed) {
    testing::ForEachTileWidth([&] { CheckOnce(runs, seed); });
    auto fast = MakeCpuBackend(std::get<1>(GetParam()), MathMode::kFast);
    if (fast->math_mode() != MathMode::kFast) return;  // no AVX-512 VNNI: nothing else to run
    fast_ = fast.get();
    CheckOnce(runs, seed);
    fast_ = nullptr;
  }

  void CheckOnce(const std::vector<QueryRun>& runs, uint32_t seed) {
    const Geometry g = std::get<2>(GetParam());
    const bool exact = ExactTarget(std::get<0>(GetParam()));
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    KvLayout layout;
    layout.page_tokens = g.page_tokens;
    layout.n_kv_heads = g.n_kv_heads;
    layout.head_dim = g.head_dim;
    const int D = g.head_dim;
    const int group = g.n_heads / g.n_kv_heads;
    const int64_t q_dim = static_cast<int64_t>(g.n_heads) * D;

    std::vector<AttentionSeq> seqs(runs.size());
    std::vector<std::vector<const void*>> seq_pages(runs.size());
    std::vector<uint16_t*> writable;
    std::vector<int32_t> tok_seq, kv_len;
    for (size_t s = 0; s < runs.size(); ++s) {
      const int32_t len = runs[s].last_len;
      const int32_t n_pages = (len + g.page_tokens - 1) / g.page_tokens;
      for (int32_t p = 0; p < n_pages; ++p) {
        void* page = backend_->AllocBuffer(layout.page_bytes());
        std::memset(page, 0xFF, layout.page_bytes());  // NaN in unused slots
        pages_.push_back(page);
        seq_pages[s].push_back(page);
        writable.push_back(static_cast<uint16_t*>(page));
      }
      uint16_t* const* seq_writable = writable.data() + writable.size() - n_pages;
      // Keys with a spread of scores, values around 1: both accumulators see
      // real rounding.
      for (int32_t j = 0; j < len; ++j) {
        uint16_t* page = seq_writable[j / g.page_tokens];
        for (int h = 0; h < g.n_kv_heads; ++h) {
          for (int d = 0; d < D; ++d) {
            page[layout.k_offset(h, j % g.page_tokens) + d] = F32ToF16(2.0f * normal(rng));
            page[layout.v_offset(h, j % g.page_tokens) + d] = F32ToF16(normal(rng));
          }
        }
      }
      seqs[s].pages = seq_pages[s].data();
      seqs[s].n_pages = n_pages;
      for (int32_t r = 0; r < runs[s].rows; ++r) {
        tok_seq.push_back(static_cast<int32_t>(s));
        kv_len.push_back(len - runs[s].rows + 1 + r);
      }
    }
    const int64_t n_tokens = static_cast<int64_t>(tok_seq.size());
    std::vector<float> q(static_cast<size_t>(n_tokens * q_dim));
    for (float& x : q) x = 1.5f * normal(rng);
    std::vector<float> out(q.size(), NAN);
    AttentionArgs a;
    a.layout = layout;
    a.n_heads = g.n_heads;
    a.scale = 1.0f / std::sqrt(static_cast<float>(D));
    a.n_tokens = n_tokens;
    a.q = q.data();
    a.out = out.data();
    a.seq = tok_seq.data();
    a.kv_len = kv_len.data();
    a.seqs = seqs.data();
    a.n_seqs = static_cast<int32_t>(seqs.size());
    (fast_ != nullptr ? fast_ : backend_.get())->Attention(a);

    for (int64_t t = 0; t < n_tokens; ++t) {
      const int s = tok_seq[t];
      for (int h = 0; h < g.n_heads; ++h) {
        Keys kv;
        for (int32_t j = 0; j < kv_len[t]; ++j) {
          const auto* page = static_cast<const uint16_t*>(seq_pages[s][j / g.page_tokens]);
          kv.k.push_back(page + layout.k_offset(h / group, j % g.page_tokens));
          kv.v.push_back(page + layout.v_offset(h / group, j % g.page_tokens));
        }
        const float* qh = q.data() + t * q_dim + h * D;
        const std::vector<float> want =
            fast_ != nullptr
                ? Tiled(qh, kv, D, a.scale, kv_len[t])
                : MnemoRow(qh, kv, D, a.scale, kv_len[t], runs[s].rows, runs[s].last_len);
        const float* got = out.data() + t * q_dim + h * D;
        for (int d = 0; d < D; ++d) {
          if (exact) {
            ASSERT_EQ(got[d], want[d]) << (fast_ != nullptr ? "fast: " : "") << "token " << t
                                       << " (seq " << s << ", " << kv_len[t] << " keys) head " << h
                                       << " dim " << d;
          } else {
            ASSERT_NEAR(got[d], want[d], 5e-3f) << "token " << t << " head " << h << " dim " << d;
          }
        }
      }
    }
  }

  std::unique_ptr<Backend> backend_;
  Backend* fast_ = nullptr;  // set: CheckOnce runs Attention on this kFast backend
  std::vector<void*> pages_;
};

// Decode rows: the one-chunk path below 257 keys, split KV above.
TEST_P(AttentionNumericsTest, DecodeRows) {
  Check({{1, 1}, {1, 15}, {1, 16}, {1, 63}, {1, 64}, {1, 65}, {1, 200}, {1, 256}}, 1);
  Check({{1, 257}, {1, 513}, {1, 700}}, 2);
}

// Short prefill runs (fewer than 64 rows) within the first 64 keys: the
// one-chunk path, each row with its own causal limit.
TEST_P(AttentionNumericsTest, ShortRuns) {
  Check({{15, 15}, {16, 16}, {2, 63}, {63, 63}, {40, 50}}, 3);
}

// Short runs over a longer context (a turn appended to a session): the
// tiled path, rows on either side of the 64-key line included.
TEST_P(AttentionNumericsTest, ShortRunsOverLongContexts) {
  Check({{2, 64}, {2, 65}, {63, 200}, {10, 70}}, 4);
  Check({{5, 513}, {1, 513}}, 8);
}

// Runs of 64 rows and more: the tiled path, first tile partial or not.
TEST_P(AttentionNumericsTest, TiledRuns) {
  Check({{64, 64}, {65, 65}}, 5);
  Check({{100, 200}, {70, 513}}, 6);
}

// Everything in one call: decode rows, a short run and a tiled run of
// different sequences.
TEST_P(AttentionNumericsTest, MixedBatch) {
  Check({{1, 300}, {64, 80}, {7, 30}, {1, 16}, {1, 1}}, 7);
}

// The attention's expf (vectorized where the C library's algorithm is
// known) against the library itself: every 61st float of the range the
// softmax uses, [-104, 0] (below, expf is 0), and the special values.
TEST(LibmExpTest, EqualsTheCLibrary) {
  std::vector<float> x;
  for (float f : {0.0f, -0.0f, -INFINITY, INFINITY, NAN, -87.9f, -88.0f, -88.8f, -103.2f,
                  -103.3f, -104.0f, -1e30f, 88.0f, 1e-30f, -1e-30f, 1.0f}) {
    x.push_back(f);
  }
  for (uint32_t b = 0x80000000u; b <= 0xC2D00000u; b += 61) x.push_back(FromBits(b));
  std::vector<float> y(x.size());
  for (int64_t target : SimdTargets()) {
    SetSimdTargetForTest(target);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 28) && defined(__x86_64__)
    // glibc's x86-64 expf with FMA is the algorithm the vector version
    // repeats: there it must be in use, not the fallback.
    if (target == HWY_AVX2 || target == HWY_AVX3 || target == HWY_AVX3_DL) {
      EXPECT_TRUE(LibmExpVectorized()) << SimdTargetName(target);
    }
#endif
    LibmExpRow(x.data(), y.data(), static_cast<int64_t>(x.size()));
    for (size_t i = 0; i < x.size(); ++i) {
      const float want = std::exp(x[i]);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(y[i])) << SimdTargetName(target) << " x=" << x[i];
      } else {
        ASSERT_EQ(Bits(y[i]), Bits(want)) << SimdTargetName(target) << " x=" << x[i];
      }
    }
  }
  SetSimdTargetForTest(0);
}

INSTANTIATE_TEST_SUITE_P(
    AllTargets, AttentionNumericsTest,
    ::testing::Combine(::testing::ValuesIn(SimdTargets()), ::testing::Values(1, 2),
                       ::testing::Values(Geometry{9, 3, 64, 16}, Geometry{4, 2, 40, 5},
                                         Geometry{4, 1, 128, 16},
                                         // A tile per page: V read as one run.
                                         Geometry{9, 3, 64, 64})),
    [](const ::testing::TestParamInfo<std::tuple<int64_t, int, Geometry>>& info) {
      std::string name = SimdTargetName(std::get<0>(info.param));
      for (char& c : name) {
        if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
      }
      const Geometry g = std::get<2>(info.param);
      return name + "_t" + std::to_string(std::get<1>(info.param)) + "_h" +
             std::to_string(g.n_heads) + "kv" + std::to_string(g.n_kv_heads) + "d" +
             std::to_string(g.head_dim) + "p" + std::to_string(g.page_tokens);
    });

}  // namespace
}  // namespace mnemo::kernels::cpu
