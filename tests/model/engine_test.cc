// The generation loop on a tiny random model: limits, stop conditions,
// reproducible sampling, context limit and chat rendering.
#include "model/engine.h"

#include <gtest/gtest.h>

#include "tests/testutil/tiny_model.h"

namespace mnemo::model {
namespace {

std::unique_ptr<Engine> OpenTiny(int32_t max_context = 0, size_t kv_budget = 16 << 20) {
  EngineOptions o;
  o.model_path = testutil::WriteTinyModel({});
  o.threads = 2;
  o.page_tokens = 4;
  o.prefill_chunk = 5;  // force several prefill steps
  o.max_context = max_context;
  o.kv_budget_bytes = kv_budget;
  auto e = Engine::Open(o);
  EXPECT_TRUE(e.ok()) << e.status().ToString();
  return std::move(e).value();
}

TEST(Engine, OpenReportsBadModelFiles) {
  EngineOptions o;
  o.model_path = "/nonexistent.gguf";
  EXPECT_EQ(Engine::Open(o).status().code(), StatusCode::kIOError);
  std::string bytes = testutil::MakeTinyModel({});
  const std::string path = testutil::TempDir() + "/truncated.gguf";
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(bytes.data(), 1, bytes.size() / 2, f);
  std::fclose(f);
  o.model_path = path;
  Status s = Engine::Open(o).status();
  EXPECT_EQ(s.code(), StatusCode::kCorruption) << s.ToString();
  EXPECT_NE(s.message().find("truncated"), std::string_view::npos) << s.ToString();
}

TEST(Engine, GreedyIsDeterministicAndRespectsMaxTokens) {
  auto e = OpenTiny();
  std::vector<int32_t> prompt = e->TokenizePrompt("the thing in the ring");
  ASSERT_FALSE(prompt.empty());
  GenerateOptions g;
  g.max_tokens = 12;
  auto a = e->Generate(e->kv().CreateSeq(), prompt, g);
  auto b = e->Generate(e->kv().CreateSeq(), prompt, g);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_LE(a->tokens.size(), 12u);
  if (a->finish == FinishReason::kLength) {
    EXPECT_EQ(a->tokens.size(), 12u);
  }
  EXPECT_EQ(a->prompt_tokens, static_cast<int64_t>(prompt.size()));
}

TEST(Engine, SeededSamplingIsReproducible) {
  auto e = OpenTiny();
  std::vector<int32_t> prompt = e->TokenizePrompt("a b c");
  GenerateOptions g;
  g.max_tokens = 16;
  g.sampling.temperature = 30.0f;  // the tiny model's logits are sharp
  g.sampling.seed = 42;
  auto a = e->Generate(e->kv().CreateSeq(), prompt, g);
  auto b = e->Generate(e->kv().CreateSeq(), prompt, g);
  g.sampling.seed = 43;
  auto c = e->Generate(e->kv().CreateSeq(), prompt, g);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_NE(a->tokens, c->tokens);  // 16 draws from a flattened distribution
}

TEST(Engine, StopStringEndsGenerationAndIsNotEmitted) {
  auto e = OpenTiny();
  std::vector<int32_t> prompt = e->TokenizePrompt("hello");
  GenerateOptions g;
  g.max_tokens = 24;
  auto free_run = e->Generate(e->kv().CreateSeq(), prompt, g);
  ASSERT_TRUE(free_run.ok());
  ASSERT_GE(free_run->text.size(), 4u);
  // Stop on a piece of what greedy decoding produces anyway.
  g.stop = {free_run->text.substr(2, 2)};
  std::string streamed;
  g.on_token = [&](int32_t, std::string_view t) {
    streamed += t;
    return true;
  };
  auto r = e->Generate(e->kv().CreateSeq(), prompt, g);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->finish, FinishReason::kStop);
  EXPECT_EQ(r->text, free_run->text.substr(0, free_run->text.find(g.stop[0])));
  EXPECT_EQ(streamed, r->text);
}

TEST(Engine, CallbackCancels) {
  auto e = OpenTiny();
  GenerateOptions g;
  g.max_tokens = 50;
  int calls = 0;
  g.on_token = [&](int32_t, std::string_view) { return ++calls < 3; };
  auto r = e->Generate(e->kv().CreateSeq(), e->TokenizePrompt("x y z"), g);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->finish, FinishReason::kCancelled);
  EXPECT_EQ(calls, 3);
}

TEST(Engine, ContextLimitIsTyped) {
  auto e = OpenTiny(/*max_context=*/16);
  std::vector<int32_t> long_prompt(20, 70);
  GenerateOptions g;
  auto r = e->Generate(e->kv().CreateSeq(), long_prompt, g);
  EXPECT_EQ(r.status().code(), StatusCode::kOutOfRange);
  std::vector<int32_t> prompt(10, 70);
  g.max_tokens = 100;
  auto seq = e->kv().CreateSeq();
  auto ok = e->Generate(seq, prompt, g);
  ASSERT_TRUE(ok.ok());
  if (ok->finish != FinishReason::kEos) {
    EXPECT_EQ(ok->finish, FinishReason::kContextFull);
    EXPECT_EQ(*e->kv().Length(seq), 16);
  }
}

TEST(Engine, KvExhaustionIsTypedAndOtherSequencesContinue) {
  // Two layers of 4-token pages, 12 KiB budget: a handful of pages.
  auto probe = OpenTiny();
  const size_t page = probe->pool().page_bytes();
  auto e = OpenTiny(0, 8 * page);  // 4 pages per layer: 16 tokens in all
  GenerateOptions g;
  g.max_tokens = 2;
  std::vector<int32_t> p8(8, 70), p12(12, 71);
  auto a = e->kv().CreateSeq();
  ASSERT_TRUE(e->Generate(a, p8, g).ok());
  auto b = e->kv().CreateSeq();
  auto r = e->Generate(b, p12, g);
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted) << r.status().ToString();
  ASSERT_TRUE(e->kv().FreeSeq(b).ok());
  std::vector<int32_t> p2(2, 72);
  EXPECT_TRUE(e->Generate(a, p2, g).ok());
}

TEST(Engine, ChatRenderingUsesTheTemplateDefaultSystemPrompt) {
  auto e = OpenTiny();
  auto toks = e->TokenizeChat("hi");
  ASSERT_TRUE(toks.ok()) << toks.status().ToString();
  const std::string text = e->tokenizer().Decode(*toks, /*render_special=*/true);
  EXPECT_EQ(text,
            "<|im_start|>system\nYou are a tiny test model<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
            "<|im_start|>assistant\n");
}

}  // namespace
}  // namespace mnemo::model
