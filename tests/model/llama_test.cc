// The llama forward pass on tiny random models: against a dense double
// precision reference written here, and batched/paged/forked runs against
// one-token-at-a-time runs.
#include "model/llama.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <random>

#include "tests/testutil/tiny_model.h"

namespace mnemo::model {
namespace {

using attention::KvCache;
using attention::PagePool;
using kernels::DType;

struct Loaded {
  std::unique_ptr<kernels::Backend> backend;
  std::shared_ptr<GgufFile> file;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<KvCache> kv;
};

Loaded Load(const testutil::TinyModelSpec& spec, int threads = 2, int page_tokens = 4,
            size_t kv_budget = 64 << 20) {
  Loaded l;
  l.backend = kernels::MakeCpuBackend(threads);
  auto f = GgufFile::FromBytes(testutil::MakeTinyModel(spec));
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  l.file = std::move(f).value();
  auto m = LlamaModel::Load(l.file, l.backend.get());
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  l.model = std::move(m).value();
  auto p = PagePool::Create(l.backend.get(), l.model->config().KvLayoutFor(page_tokens), kv_budget);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  l.pool = std::move(p).value();
  l.kv = std::make_unique<KvCache>(l.pool.get(), l.model->config().n_layers);
  return l;
}

// Dense reference: weights dequantized, activations in double, no activation
// quantization, exact softmax.
class Reference {
 public:
  explicit Reference(const GgufFile& f, const LlamaConfig& c) : f_(f), c_(c) {}

  std::vector<double> Mat(const std::string& name) const {
    const GgufTensorInfo* t = f_.FindTensor(name);
    std::vector<float> v = testutil::Dequantize(t->type, t->data, t->elements());
    return std::vector<double>(v.begin(), v.end());
  }

  // Logits for every position of `tokens`.
  std::vector<std::vector<double>> Run(const std::vector<int32_t>& tokens) const {
    const int D = c_.dim, H = c_.n_heads, KH = c_.n_kv_heads, HD = c_.head_dim;
    const int T = static_cast<int>(tokens.size());
    auto emb = Mat("token_embd.weight");
    std::vector<std::vector<double>> x(T, std::vector<double>(D));
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < D; ++i) x[t][i] = emb[static_cast<size_t>(tokens[t]) * D + i];
    auto norm = [&](const std::vector<double>& v, const std::vector<double>& g) {
      double ss = 0;
      for (double a : v) ss += a * a;
      const double s = 1.0 / std::sqrt(ss / v.size() + c_.rms_eps);
      std::vector<double> o(v.size());
      for (size_t i = 0; i < v.size(); ++i) o[i] = v[i] * s * g[i];
      return o;
    };
    auto matvec = [](const std::vector<double>& w, const std::vector<double>& v, int rows) {
      const size_t cols = v.size();
      std::vector<double> o(rows);
      for (int r = 0; r < rows; ++r) {
        double s = 0;
        for (size_t i = 0; i < cols; ++i) s += w[r * cols + i] * v[i];
        o[r] = s;
      }
      return o;
    };
    auto rope = [&](std::vector<double>& v, int heads, int pos) {
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < c_.rope_dims / 2; ++i) {
          const double theta = pos * std::pow(c_.rope_base, -2.0 * i / c_.rope_dims);
          const int a = h * HD + (c_.rope_style == kernels::RopeStyle::kAdjacent ? 2 * i : i);
          const int b = c_.rope_style == kernels::RopeStyle::kAdjacent ? a + 1 : a + c_.rope_dims / 2;
          const double x0 = v[a], x1 = v[b];
          v[a] = x0 * std::cos(theta) - x1 * std::sin(theta);
          v[b] = x0 * std::sin(theta) + x1 * std::cos(theta);
        }
    };
    for (int l = 0; l < c_.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      auto an = Mat(p + "attn_norm.weight"), fn = Mat(p + "ffn_norm.weight");
      auto wq = Mat(p + "attn_q.weight"), wk = Mat(p + "attn_k.weight"),
           wv = Mat(p + "attn_v.weight"), wo = Mat(p + "attn_output.weight");
      auto wg = Mat(p + "ffn_gate.weight"), wu = Mat(p + "ffn_up.weight"),
           wd = Mat(p + "ffn_down.weight");
      std::vector<std::vector<double>> q(T), k(T), v(T);
      for (int t = 0; t < T; ++t) {
        auto h = norm(x[t], an);
        q[t] = matvec(wq, h, H * HD);
        k[t] = matvec(wk, h, KH * HD);
        v[t] = matvec(wv, h, KH * HD);
        if (c_.qkv_bias) {
          auto bq = Mat(p + "attn_q.bias"), bk = Mat(p + "attn_k.bias"), bv = Mat(p + "attn_v.bias");
          for (int i = 0; i < H * HD; ++i) q[t][i] += bq[i];
          for (int i = 0; i < KH * HD; ++i) k[t][i] += bk[i], v[t][i] += bv[i];
        }
        rope(q[t], H, t);
        rope(k[t], KH, t);
      }
      for (int t = 0; t < T; ++t) {
        std::vector<double> att(H * HD, 0.0);
        for (int h = 0; h < H; ++h) {
          const int kh = h / (H / KH);
          std::vector<double> s(t + 1);
          double mx = -1e300;
          for (int j = 0; j <= t; ++j) {
            double d = 0;
            for (int i = 0; i < HD; ++i) d += q[t][h * HD + i] * k[j][kh * HD + i];
            s[j] = d / std::sqrt(static_cast<double>(HD));
            mx = std::max(mx, s[j]);
          }
          double z = 0;
          for (double& e : s) z += (e = std::exp(e - mx));
          for (int j = 0; j <= t; ++j)
            for (int i = 0; i < HD; ++i) att[h * HD + i] += s[j] / z * v[j][kh * HD + i];
        }
        auto o = matvec(wo, att, D);
        for (int i = 0; i < D; ++i) x[t][i] += o[i];
        auto h = norm(x[t], fn);
        auto g = matvec(wg, h, c_.ffn_dim), u = matvec(wu, h, c_.ffn_dim);
        for (int i = 0; i < c_.ffn_dim; ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
        auto d = matvec(wd, g, D);
        for (int i = 0; i < D; ++i) x[t][i] += d[i];
      }
    }
    auto on = Mat("output_norm.weight");
    auto out = Mat(c_.tied_output ? "token_embd.weight" : "output.weight");
    std::vector<std::vector<double>> logits;
    for (int t = 0; t < T; ++t) logits.push_back(matvec(out, norm(x[t], on), c_.vocab_size));
    return logits;
  }

 private:
  const GgufFile& f_;
  const LlamaConfig& c_;
};

std::vector<int32_t> RandomTokens(int n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

// Max |a-b| relative to the spread of b.
double RelErr(std::span<const float> a, const std::vector<double>& b) {
  double mx = 0, ss = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    mx = std::max(mx, std::fabs(a[i] - b[i]));
    ss += b[i] * b[i];
  }
  return mx / std::sqrt(ss / b.size());
}

class LlamaVsReference : public ::testing::TestWithParam<testutil::TinyModelSpec> {};

TEST_P(LlamaVsReference, PrefillMatchesDenseReference) {
  Loaded l = Load(GetParam());
  const LlamaConfig& c = l.model->config();
  std::vector<int32_t> toks = RandomTokens(23, c.vocab_size, 3);
  auto seq = l.kv->CreateSeq();
  std::vector<float> logits;
  BatchSeq b{seq, toks, true};
  ASSERT_TRUE(l.model->Forward({&b, 1}, l.kv.get(), &logits).ok());
  ASSERT_EQ(logits.size(), toks.size() * c.vocab_size);
  auto ref = Reference(*l.file, c).Run(toks);
  int agree = 0;
  for (size_t t = 0; t < toks.size(); ++t) {
    std::span<const float> row(logits.data() + t * c.vocab_size, c.vocab_size);
    EXPECT_LT(RelErr(row, ref[t]), 0.08) << "position " << t;
    int best = static_cast<int>(std::max_element(row.begin(), row.end()) - row.begin());
    int rbest = static_cast<int>(std::max_element(ref[t].begin(), ref[t].end()) - ref[t].begin());
    agree += best == rbest;
  }
  EXPECT_GE(agree, static_cast<int>(toks.size()) - 2);
}

testutil::TinyModelSpec Spec(DType m, DType e, bool tied, const char* arch = "llama") {
  testutil::TinyModelSpec s;
  s.matrix_type = m;
  s.embd_type = e;
  s.tied_output = tied;
  s.arch = arch;
  return s;
}

// SmolLM2-135M's geometry (odd block counts per row, 9 heads over 3 KV heads,
// head_dim 64, rope base 1e5) with one layer.
testutil::TinyModelSpec SmolShape() {
  testutil::TinyModelSpec s;
  s.n_layers = 1;
  s.dim = 576;
  s.n_heads = 9;
  s.n_kv_heads = 3;
  s.ffn_dim = 1536;
  s.rope_base = 100000.0f;
  return s;
}

INSTANTIATE_TEST_SUITE_P(
    Types, LlamaVsReference,
    ::testing::Values(Spec(DType::kQ4_1, DType::kQ8_0, true), Spec(DType::kQ4_0, DType::kQ8_0, false),
                      Spec(DType::kQ8_0, DType::kQ8_0, false), Spec(DType::kF16, DType::kF16, true),
                      Spec(DType::kF32, DType::kF32, false), Spec(DType::kBF16, DType::kQ8_0, true),
                      Spec(DType::kQ4_1, DType::kQ8_0, true, "qwen2"), SmolShape()),
    [](const ::testing::TestParamInfo<testutil::TinyModelSpec>& info) {
      return std::string(kernels::Info(info.param.matrix_type).name) + "_" + info.param.arch + "_dim" +
             std::to_string(info.param.dim) + "_" + std::to_string(info.index);
    });

// Incremental decoding through pages equals one big prefill.
TEST(Llama, TokenByTokenEqualsPrefillAcrossPages) {
  Loaded l = Load({}, 2, /*page_tokens=*/4);
  const int V = l.model->config().vocab_size;
  std::vector<int32_t> toks = RandomTokens(19, V, 5);
  auto a = l.kv->CreateSeq();
  std::vector<float> all;
  BatchSeq ba{a, toks, true};
  ASSERT_TRUE(l.model->Forward({&ba, 1}, l.kv.get(), &all).ok());
  auto b = l.kv->CreateSeq();
  for (size_t t = 0; t < toks.size(); ++t) {
    std::vector<float> one;
    BatchSeq bb{b, std::span<const int32_t>(&toks[t], 1), false};
    ASSERT_TRUE(l.model->Forward({&bb, 1}, l.kv.get(), &one).ok());
    for (int i = 0; i < V; ++i) ASSERT_NEAR(one[i], all[t * V + i], 2e-3f) << t << " " << i;
  }
  EXPECT_EQ(*l.kv->Length(b), 19);
}

// A mixed batch (prefill chunks and single decode tokens at different
// positions) gives each sequence the logits it gets alone.
TEST(Llama, MixedBatchEqualsSeparateRuns) {
  Loaded l = Load({}, 2, 4);
  const int V = l.model->config().vocab_size;
  std::vector<std::vector<int32_t>> hist = {RandomTokens(9, V, 11), RandomTokens(1, V, 12),
                                            RandomTokens(17, V, 13)};
  std::vector<std::vector<int32_t>> next = {RandomTokens(1, V, 21), RandomTokens(6, V, 22),
                                            RandomTokens(1, V, 23)};
  std::vector<attention::SeqId> alone, together;
  std::vector<std::vector<float>> want;
  for (int s = 0; s < 3; ++s) {
    auto id = l.kv->CreateSeq();
    std::vector<float> out;
    BatchSeq h{id, hist[s], false};
    ASSERT_TRUE(l.model->Forward({&h, 1}, l.kv.get(), &out).ok());
    BatchSeq n{id, next[s], false};
    ASSERT_TRUE(l.model->Forward({&n, 1}, l.kv.get(), &out).ok());
    want.push_back(out);
    auto id2 = l.kv->CreateSeq();
    BatchSeq h2{id2, hist[s], false};
    ASSERT_TRUE(l.model->Forward({&h2, 1}, l.kv.get(), &out).ok());
    together.push_back(id2);
  }
  std::vector<BatchSeq> batch;
  for (int s = 0; s < 3; ++s) batch.push_back({together[s], next[s], false});
  std::vector<float> out;
  ASSERT_TRUE(l.model->Forward(batch, l.kv.get(), &out).ok());
  ASSERT_EQ(out.size(), 3u * V);
  for (int s = 0; s < 3; ++s)
    for (int i = 0; i < V; ++i) ASSERT_NEAR(out[s * V + i], want[s][i], 2e-3f) << s << " " << i;
}

// The last layer computes only the rows that give logits. Each kept row
// must come out bit for bit as with every row computed (all_logits), with
// the attention algorithm its whole run picks: a turn over a long history
// (tiled), a short fresh prompt (one chunk), a decode token past 512 keys
// (split), side by side in one batch. The KV written is the same too, and
// so are the logits with an observer set (every row computed, the logit
// rows picked after the last layer).
TEST(Llama, LastLayerOnlyForLogitRowsChangesNoBit) {
  testutil::TinyModelSpec spec = SmolShape();
  spec.n_layers = 2;
  spec.context_length = 1024;
  Loaded l = Load(spec, 2, 16);
  const int V = l.model->config().vocab_size;
  const std::vector<std::vector<int32_t>> hist = {RandomTokens(130, V, 31), {}, RandomTokens(600, V, 33)};
  const std::vector<std::vector<int32_t>> next = {RandomTokens(7, V, 41), RandomTokens(9, V, 42),
                                                  RandomTokens(1, V, 43)};
  const std::vector<int32_t> after = RandomTokens(3, V, 51);
  std::vector<std::vector<float>> last(3), then(3);
  for (int pass = 0; pass < 3; ++pass) {
    const int all = pass == 1;
    int observed = 0;
    if (pass == 2) l.model->set_observer([&](std::string_view, int, const float*, int64_t, int64_t) { ++observed; });
    std::vector<attention::SeqId> ids;
    for (int s = 0; s < 3; ++s) {
      ids.push_back(l.kv->CreateSeq());
      if (hist[s].empty()) continue;
      std::vector<float> out;
      BatchSeq h{ids[s], hist[s], false};
      ASSERT_TRUE(l.model->Forward({&h, 1}, l.kv.get(), &out).ok());
    }
    std::vector<BatchSeq> batch;
    for (int s = 0; s < 3; ++s) batch.push_back({ids[s], next[s], all == 1});
    std::vector<float> out;
    ASSERT_TRUE(l.model->Forward(batch, l.kv.get(), &out).ok());
    size_t row = 0;
    for (int s = 0; s < 3; ++s) {
      row += all ? next[s].size() : 1;
      last[pass].insert(last[pass].end(), out.begin() + (row - 1) * V, out.begin() + row * V);
    }
    ASSERT_EQ(row * V, out.size());
    batch.clear();
    for (int s = 0; s < 3; ++s) batch.push_back({ids[s], std::span<const int32_t>(&after[s], 1), false});
    ASSERT_TRUE(l.model->Forward(batch, l.kv.get(), &then[pass]).ok());
    for (attention::SeqId id : ids) ASSERT_TRUE(l.kv->FreeSeq(id).ok());
    if (pass == 2) {
      EXPECT_GT(observed, 0);
      l.model->set_observer(nullptr);
    }
  }
  ASSERT_EQ(last[0].size(), 3u * V);
  for (int pass = 1; pass < 3; ++pass) {
    SCOPED_TRACE(pass == 1 ? "all_logits" : "observer");
    for (size_t i = 0; i < last[0].size(); ++i)
      ASSERT_EQ(std::bit_cast<uint32_t>(last[0][i]), std::bit_cast<uint32_t>(last[pass][i])) << i / V << " " << i % V;
    for (size_t i = 0; i < then[0].size(); ++i)
      ASSERT_EQ(std::bit_cast<uint32_t>(then[0][i]), std::bit_cast<uint32_t>(then[pass][i])) << i / V << " " << i % V;
  }
}

TEST(Llama, ForkContinuesLikeTheOriginal) {
  Loaded l = Load({}, 1, 4);
  const int V = l.model->config().vocab_size;
  auto a = l.kv->CreateSeq();
  std::vector<int32_t> hist = RandomTokens(10, V, 31);  // last page half full
  std::vector<float> out;
  BatchSeq h{a, hist, false};
  ASSERT_TRUE(l.model->Forward({&h, 1}, l.kv.get(), &out).ok());
  const size_t pages_before = l.pool->used_pages();
  auto f = l.kv->Fork(a);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(l.pool->used_pages(), pages_before);  // shared, not copied
  std::vector<int32_t> x = RandomTokens(3, V, 32), y = RandomTokens(3, V, 33);
  std::vector<float> ox, oy, ox2;
  BatchSeq bx{a, x, false};
  ASSERT_TRUE(l.model->Forward({&bx, 1}, l.kv.get(), &ox).ok());
  BatchSeq by{*f, y, false};
  ASSERT_TRUE(l.model->Forward({&by, 1}, l.kv.get(), &oy).ok());
  // A fresh sequence with hist + x must match the original's continuation,
  // i.e. the fork's writes did not leak into the parent's pages.
  auto c = l.kv->CreateSeq();
  std::vector<int32_t> hx = hist;
  hx.insert(hx.end(), x.begin(), x.end());
  BatchSeq bc{c, hx, false};
  ASSERT_TRUE(l.model->Forward({&bc, 1}, l.kv.get(), &ox2).ok());
  for (int i = 0; i < V; ++i) ASSERT_NEAR(ox[i], ox2[i], 2e-3f);
  auto d = l.kv->CreateSeq();
  std::vector<int32_t> hy = hist;
  hy.insert(hy.end(), y.begin(), y.end());
  std::vector<float> oy2;
  BatchSeq bd{d, hy, false};
  ASSERT_TRUE(l.model->Forward({&bd, 1}, l.kv.get(), &oy2).ok());
  for (int i = 0; i < V; ++i) ASSERT_NEAR(oy[i], oy2[i], 2e-3f);
}

TEST(Llama, PoolExhaustionIsTypedAndChangesNothing) {
  testutil::TinyModelSpec spec;
  // 2 layers x 4-token pages: budget for 6 pages = 3 pages per layer = 12 tokens.
  Loaded probe = Load(spec, 1, 4);
  const size_t page = probe.model->config().KvLayoutFor(4).page_bytes();
  Loaded l = Load(spec, 1, 4, 6 * page);
  const int V = l.model->config().vocab_size;
  auto a = l.kv->CreateSeq();
  auto b = l.kv->CreateSeq();
  std::vector<float> out;
  std::vector<int32_t> t8 = RandomTokens(8, V, 41);
  BatchSeq ba{a, t8, false};
  ASSERT_TRUE(l.model->Forward({&ba, 1}, l.kv.get(), &out).ok());
  // b needs 2 pages per layer (4 pages) but only 2 are free.
  std::vector<BatchSeq> batch = {{a, RandomTokens(1, V, 42), false}, {b, t8, false}};
  Status s = l.model->Forward(batch, l.kv.get(), &out);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  EXPECT_EQ(*l.kv->Length(a), 8);
  EXPECT_EQ(*l.kv->Length(b), 0);
  EXPECT_EQ(l.pool->used_pages(), 4u);
  // Still usable afterwards.
  std::vector<int32_t> t4 = RandomTokens(4, V, 43);
  BatchSeq ok{b, t4, false};
  EXPECT_TRUE(l.model->Forward({&ok, 1}, l.kv.get(), &out).ok());
}

TEST(Llama, RejectsBadBatches) {
  Loaded l = Load({}, 1, 4);
  auto a = l.kv->CreateSeq();
  std::vector<float> out;
  std::vector<int32_t> bad = {l.model->config().vocab_size};
  BatchSeq b{a, bad, false};
  EXPECT_EQ(l.model->Forward({&b, 1}, l.kv.get(), &out).code(), StatusCode::kInvalidArgument);
  std::vector<int32_t> one = {1};
  std::vector<BatchSeq> twice = {{a, one, false}, {a, one, false}};
  EXPECT_EQ(l.model->Forward(twice, l.kv.get(), &out).code(), StatusCode::kInvalidArgument);
  BatchSeq unknown{999, one, false};
  EXPECT_EQ(l.model->Forward({&unknown, 1}, l.kv.get(), &out).code(), StatusCode::kNotFound);
}

TEST(Llama, RejectsUnsupportedArchitecture) {
  testutil::TinyModelSpec s;
  s.arch = "gpt2";
  auto f = GgufFile::FromBytes(testutil::MakeTinyModel(s));
  ASSERT_TRUE(f.ok());
  auto c = ReadLlamaConfig(**f);
  EXPECT_EQ(c.status().code(), StatusCode::kUnsupported);
  EXPECT_NE(c.status().message().find("gpt2"), std::string_view::npos);
}

}  // namespace
}  // namespace mnemo::model

