// The engine on the real default model against llama.cpp's reference data
// (tests/data/ref, produced by scripts/ref/make_reference.sh): teacher-forced
// top-1 agreement and perplexity, and greedy chat continuations.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/engine.h"

namespace mnemo::model {
namespace {

using nlohmann::json;

std::string Src(const std::string& rel) { return std::string(MNEMO_SOURCE_DIR) + "/" + rel; }

json ReadJson(const std::string& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << path;
  return json::parse(f);
}

template <kernels::MathMode kMath>
class ModelWith : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string path = Src("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if (!std::filesystem::exists(path)) return;
    EngineOptions o;
    o.model_path = path;
    o.threads = 2;
    o.kv_budget_bytes = size_t{256} << 20;
    o.math = kMath;
    auto e = Engine::Open(o);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    engine_ = std::move(e).value().release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    engine_ = nullptr;
  }
  void SetUp() override {
    if (engine_ == nullptr)
      GTEST_SKIP() << "default model not fetched (run scripts/fetch-model); the CI test "
                      "command fetches it, so this skip only happens in partial local runs";
    if (engine_->backend().math_mode() != kMath)
      GTEST_SKIP() << "this CPU lacks AVX-512 VNNI, which --math fast needs";
  }
  static Engine* engine_;
};
template <kernels::MathMode kMath>
Engine* ModelWith<kMath>::engine_ = nullptr;

// llama.cpp's arithmetic, bit for bit.
using DefaultModel = ModelWith<kernels::MathMode::kExact>;
// The interleaved matmul (kernels/cpu/interleaved.h): other last bits, the
// same model.
using FastMathModel = ModelWith<kernels::MathMode::kFast>;

struct Scores {
  int positions = 0;
  int top1_agree = 0;
  double ref_ppl = 0;
  double ppl = 0;
  double max_top_logit_diff = 0;
};

Scores ScoreText(Engine& e, const std::string& name) {
  json ref = ReadJson(Src("tests/data/ref/logits_" + name + ".json"));
  std::vector<int32_t> toks = ref["tokens"].get<std::vector<int32_t>>();
  // Our tokenizer must agree on the text itself.
  std::ifstream tf(Src("tests/data/ref/" + ref["text_file"].get<std::string>()));
  std::string text((std::istreambuf_iterator<char>(tf)), std::istreambuf_iterator<char>());
  std::vector<int32_t> ours = e.tokenizer().Encode(text, ref["add_bos"].get<bool>(), false);
  EXPECT_GE(ours.size(), toks.size());
  EXPECT_TRUE(std::equal(toks.begin(), toks.end(), ours.begin())) << name << ": tokenization differs";

  auto seq = e.kv().CreateSeq();
  std::vector<float> logits;
  BatchSeq b{seq, toks, true};
  Status s = e.model().Forward({&b, 1}, &e.kv(), &logits);
  EXPECT_TRUE(s.ok()) << s.ToString();
  (void)e.kv().FreeSeq(seq);
  const int V = e.model().config().vocab_size;
  Scores r;
  r.ref_ppl = ref["perplexity"].get<double>();
  double nll = 0;
  for (size_t i = 0; i < toks.size(); ++i) {
    const float* row = logits.data() + i * V;
    const int best = static_cast<int>(std::max_element(row, row + V) - row);
    const auto& top = ref["top_ids"][i];
    r.top1_agree += best == top[0].get<int>();
    ++r.positions;
    r.max_top_logit_diff = std::max(
        r.max_top_logit_diff, std::fabs(row[top[0].get<int>()] - ref["top_logits"][i][0].get<double>()));
    if (i + 1 < toks.size()) {
      double mx = row[best], z = 0;
      for (int j = 0; j < V; ++j) z += std::exp(static_cast<double>(row[j]) - mx);
      nll -= row[toks[i + 1]] - mx - std::log(z);
    }
  }
  r.ppl = std::exp(nll / static_cast<double>(toks.size() - 1));
  return r;
}

void ExpectTeacherForcedMatch(Engine& e, double min_agreement) {
  int positions = 0, agree = 0;
  for (const char* name : {"essay", "story", "technical"}) {
    Scores s = ScoreText(e, name);
    positions += s.positions;
    agree += s.top1_agree;
    std::printf("%-10s top-1 %d/%d  ppl %.4f vs llama.cpp %.4f (%.3f%%)  max top logit diff %.3f\n",
                name, s.top1_agree, s.positions, s.ppl, s.ref_ppl,
                100.0 * (s.ppl / s.ref_ppl - 1.0), s.max_top_logit_diff);
    EXPECT_LT(std::fabs(s.ppl / s.ref_ppl - 1.0), 0.01) << name << ": perplexity off by more than 1%";
    EXPECT_GE(s.positions, 512);
  }
  EXPECT_GE(static_cast<double>(agree) / positions, min_agreement)
      << "top-1 agreement " << agree << "/" << positions;
}

// How `e`'s greedy chat continuations compare with the reference's over
// their first 32 tokens.
struct GreedyMatches {
  int identical = 0;             // continuations the same throughout
  std::vector<size_t> prefixes;  // per case: leading tokens the same
};

void GreedyChatMatches(Engine& e, GreedyMatches* out) {
  json ref = ReadJson(Src("tests/data/ref/greedy.json"));
  ASSERT_GE(ref["cases"].size(), 10u);
  for (const json& c : ref["cases"]) {
    const std::string user = c["user"].get<std::string>();
    auto prompt = e.TokenizeChat(user);
    ASSERT_TRUE(prompt.ok()) << prompt.status().ToString();
    EXPECT_EQ(*prompt, c["prompt_ids"].get<std::vector<int32_t>>()) << c["name"] << ": chat prompt differs";
    GenerateOptions g;
    g.max_tokens = 32;
    auto seq = e.kv().CreateSeq();
    auto r = e.Generate(seq, c["prompt_ids"].get<std::vector<int32_t>>(), g);
    (void)e.kv().FreeSeq(seq);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    std::vector<int32_t> want = c["ids"].get<std::vector<int32_t>>();
    if (want.size() > 32) want.resize(32);
    const bool same = r->tokens == want;
    out->identical += same;
    size_t prefix = 0;
    while (prefix < want.size() && prefix < r->tokens.size() && r->tokens[prefix] == want[prefix]) ++prefix;
    out->prefixes.push_back(prefix);
    std::printf("%-12s %s (first %zu tokens the same)  %s\n", c["name"].get<std::string>().c_str(),
                same ? "same" : "DIFFERS", prefix, r->text.substr(0, 60).c_str());
  }
}

TEST_F(DefaultModel, TeacherForcedTop1AndPerplexityMatchLlamaCpp) {
  ExpectTeacherForcedMatch(*engine_, 0.99);
}

TEST_F(DefaultModel, GreedyChatContinuationsMatchLlamaCpp) {
  GreedyMatches m;
  GreedyChatMatches(*engine_, &m);
  const int identical = m.identical, total = static_cast<int>(m.prefixes.size());
  // Near-ties may flip a token when activations round differently: at least
  // 90% (9 of 10) must be identical for their first 32 tokens.
  EXPECT_GE(identical * 10, total * 9) << identical << " of " << total << " identical";
}

// Other rounding, the same model. This model amplifies rounding: merely
// swapping the order of the two FMAs of a Q4_1 block moved perplexity by up
// to 0.6% and top-1 agreement with llama.cpp between 1473 and 1474 of 1536
// (max top-logit difference ~0.65 either way); a broken kernel scores far
// worse.
TEST_F(FastMathModel, TeacherForcedTop1AndPerplexityMatchLlamaCpp) {
  ExpectTeacherForcedMatch(*engine_, 0.95);
}

TEST_F(FastMathModel, GreedyChatContinuationsStartAsLlamaCpps) {
  GreedyMatches m;
  GreedyChatMatches(*engine_, &m);
  const int total = static_cast<int>(m.prefixes.size());
  int first_same = 0;
  for (size_t prefix : m.prefixes) first_same += prefix > 0;
  // Measured: 14 of 16 (two prompts have near-ties at their first token).
  EXPECT_GE(first_same * 4, total * 3) << first_same << " of " << total;
}

}  // namespace
}  // namespace mnemo::model
