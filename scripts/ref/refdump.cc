// refdump: writes mnemo's reference data (tokenizer ids, teacher-forced
// logits, greedy chat continuations) as llama.cpp computes them.
//
// Built by scripts/ref/make_reference.sh against a llama.cpp build outside
// the project; uses only the public llama.h API plus the nlohmann/json copy
// that llama.cpp vendors. Single-threaded driver; llama.cpp threads inside.
//
// Usage:
//   refdump --model M.gguf --out DIR [--threads N] [--meta KEY=VALUE]...
//           [--tokenizer] [--greedy] [--logits NAME=FILE.txt]...

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "llama.h"

namespace {

using nlohmann::ordered_json;

constexpr int kTopK = 10;
constexpr int kEvalTokens = 512;
constexpr int kGreedyTokens = 64;
constexpr int kContextTokens = 512;

constexpr const char* kSystemPrompt =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

[[noreturn]] void Die(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "refdump: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
  std::exit(1);
}

// llama.cpp logs every tensor at INFO; keep warnings and errors only.
void QuietLog(ggml_log_level level, const char* text, void* /*user*/) {
  if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR) {
    std::fputs(text, stderr);
  }
}

// Shortest decimal that round-trips the float, stored as a double so the
// JSON holds "12.345678" instead of the double expansion of the float.
double ShortFloat(float value) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), value);
  if (ec != std::errc()) Die("to_chars failed");
  *end = '\0';
  return std::strtod(buf, nullptr);
}

double ShortDouble(double value) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", value);
  return std::strtod(buf, nullptr);
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Die("cannot read %s", path.c_str());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteJsonOrDie(const std::string& path, const ordered_json& doc) {
  std::string text;
  try {
    // Strict: every string we store must already be valid UTF-8.
    text = doc.dump(1, ' ', false, ordered_json::error_handler_t::strict);
  } catch (const std::exception& e) {
    Die("%s: %s", path.c_str(), e.what());
  }
  std::ofstream out(path, std::ios::binary);
  out << text << "\n";
  if (!out) Die("cannot write %s", path.c_str());
  std::fprintf(stderr, "refdump: wrote %s (%zu bytes)\n", path.c_str(),
               text.size() + 1);
}

std::vector<llama_token> Tokenize(const llama_vocab* vocab,
                                  const std::string& text, bool add_special,
                                  bool parse_special) {
  int32_t n = llama_tokenize(vocab, text.data(),
                             static_cast<int32_t>(text.size()), nullptr, 0,
                             add_special, parse_special);
  if (n == INT32_MIN) Die("tokenize overflow");
  std::vector<llama_token> ids(n < 0 ? -n : n);
  n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()),
                     ids.data(), static_cast<int32_t>(ids.size()), add_special,
                     parse_special);
  if (n < 0) Die("tokenize failed");
  ids.resize(n);
  return ids;
}

std::string Piece(const llama_vocab* vocab, llama_token id, bool special) {
  char buf[256];
  int32_t n = llama_token_to_piece(vocab, id, buf, sizeof(buf), 0, special);
  if (n < 0) Die("piece of token %d longer than %zu", id, sizeof(buf));
  return std::string(buf, n);
}

// Concatenation of llama_token_to_piece, the way a streaming client decodes.
std::string Detokenize(const llama_vocab* vocab,
                       const std::vector<llama_token>& ids, bool special) {
  std::string text;
  for (llama_token id : ids) text += Piece(vocab, id, special);
  return text;
}

bool IsValidUtf8(const std::string& s) {
  try {
    (void)ordered_json(s).dump();
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

struct Env {
  llama_model* model = nullptr;
  const llama_vocab* vocab = nullptr;
  int threads = 2;
  ordered_json generator;
};

llama_context* NewContextOrDie(const Env& env) {
  llama_context_params params = llama_context_default_params();
  params.n_ctx = kContextTokens;
  params.n_batch = kContextTokens;
  params.n_ubatch = kContextTokens;
  params.n_threads = env.threads;
  params.n_threads_batch = env.threads;
  llama_context* ctx = llama_init_from_model(env.model, params);
  if (ctx == nullptr) Die("llama_init_from_model failed");
  return ctx;
}

ordered_json ContextJson(const Env& env) {
  llama_context_params d = llama_context_default_params();
  return ordered_json{
      {"n_ctx", kContextTokens},
      {"n_batch", kContextTokens},
      {"n_ubatch", kContextTokens},
      {"n_threads", env.threads},
      {"flash_attn_type", llama_flash_attn_type_name(d.flash_attn_type)},
      {"type_k", static_cast<int>(d.type_k)},
      {"type_v", static_cast<int>(d.type_v)},
      {"note", "llama_context_default_params() apart from the fields above"},
  };
}

// ---------------------------------------------------------------- tokenizer

struct TokCase {
  const char* name;
  std::string text;
};

std::vector<TokCase> TokenizerCases() {
  return {
      {"empty", ""},
      {"single_space", " "},
      {"two_spaces", "  "},
      {"single_letter", "a"},
      {"single_newline", "\n"},
      {"hello", "Hello world"},
      {"hello_leading_space", " Hello world"},
      {"prose",
       "The quick brown fox jumps over the lazy dog. It wasn't the dog's "
       "fault, was it? Nobody could say for sure, and so the matter rested."},
      {"contractions",
       "I've been there; you'll see. She's here, we'd go, they're gone, "
       "I'm fine, don't worry, it'll be OK."},
      {"contractions_upper",
       "IT'S HERE. I'VE SEEN IT. YOU'LL KNOW. WE'RE DONE. DON'T! He'S "
       "odd, She'Ll see."},
      {"apostrophes_mixed",
       "John'S book, O'Neil's 'quoted' text, rock 'n' roll and the '90s."},
      {"accents_latin",
       "Café déjà vu: naïve façade, señor Müller's Ångström crème brûlée."},
      {"german", "Größenwahn auf der Straße ist übermäßig ÄRGERLICH."},
      {"cjk_chinese", "你好，世界！今天天气很好。我们去公园散步吧。"},
      {"japanese", "こんにちは、世界。カタカナとひらがなと漢字。"},
      {"korean", "안녕하세요 세계, 반갑습니다."},
      {"cyrillic",
       "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей "
       "чаю."},
      {"arabic", "مرحبا بالعالم! هذا اختبار بسيط للنص العربي."},
      {"hebrew_greek_hindi", "שלום עולם · Καλημέρα κόσμε · नमस्ते दुनिया"},
      {"thai", "สวัสดีชาวโลก"},
      {"emoji_basic", "I love 🍕 and 🎉! 😀😃😄 ok"},
      {"emoji_zwj",
       "Family: 👨‍👩‍👧‍👦, rainbow flag 🏳️‍🌈, woman technologist 👩🏽‍💻."},
      {"emoji_flags_tones", "🇺🇸🇯🇵 👍🏿 👋🏻 ❤️ ✔️"},
      {"digits_short", "0 1 12 123 1234 12345"},
      {"digits_long", "1234567 12345678901234567890 000000007"},
      {"decimals", "3.14159 2.71828 -0.5 1e-10 6.022e23 .5 5."},
      {"numbers_in_text",
       "In 2024, revenue grew 37% to $1,234,567.89 (vs. $987,654 in 2023)."},
      {"dates_times", "Call 555-0123 on 2024-01-15 at 10:30am, or 23:59:59."},
      {"space_runs", "a    b        c  d"},
      {"tabs", "\tindented\t\ttabs\t"},
      {"newlines", "line1\nline2\n\nline4\n\n\n"},
      {"mixed_whitespace", " \t \n  \r\n\t\t  x  \n "},
      {"leading_trailing_spaces", "   leading and trailing   "},
      {"only_newlines", "\n\n\n"},
      {"crlf", "Windows\r\nline\r\nendings\r\n"},
      {"code_python",
       "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + "
       "fib(n - 2)\n\n\nprint([fib(i) for i in range(10)])\n"},
      {"code_c",
       "#include <stdio.h>\n\nint main(void) {\n\tfor (int i = 0; i < 10; "
       "++i) {\n\t\tprintf(\"%d\\n\", i * i);\n\t}\n\treturn 0;\n}\n"},
      {"json_snippet",
       "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}"},
      {"chatml_short", "<|im_start|>user\nhi<|im_end|>"},
      {"chatml_full",
       std::string("<|im_start|>system\n") + kSystemPrompt +
           "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
           "<|im_start|>assistant\n"},
      {"special_inline", "text<|endoftext|>more text"},
      {"special_lookalikes", "<|im_start |> <im_start> <|unknown|> <|"},
      {"punctuation_runs",
       "!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) ;;; ::"},
      {"punctuation_unicode",
       "Wait... what?!? (Really) [yes] {no} <maybe> — “quotes” ‘single’ "
       "«guillemets» …"},
      {"url",
       "https://www.example.com/path/to/page?query=value&other=123#section"},
      {"email_localhost",
       "Contact john.doe+test@example.org or http://localhost:8080/api/v1."},
      {"markdown",
       "# Title\n\n- item one\n- item two\n\n**bold** and _italic_ and "
       "`code`"},
      {"math_symbols", "∑ x² + √y ≤ ∞, α β γ ∂f/∂x ≈ 0.001"},
      {"long_words",
       "Supercalifragilisticexpialidocious antidisestablishmentarianism "
       "pneumonoultramicroscopicsilicovolcanoconiosis"},
      {"repeated_char", std::string(48, 'a')},
      {"mixed_scripts", "Hello世界Привет123abc"},
      {"unicode_spaces", "non\u00a0breaking\u2009thin\u200bzero\u3000wide"},
      {"control_chars", "bell\x07 and del\x7f and esc\x1b[0m"},
  };
}

void DumpTokenizer(const Env& env, const std::string& out_dir) {
  ordered_json cases = ordered_json::array();
  for (const TokCase& c : TokenizerCases()) {
    ordered_json variants = ordered_json::array();
    for (bool parse_special : {true, false}) {
      // add_special=true lets the model's own flags decide (no BOS/EOS here).
      std::vector<llama_token> ids =
          Tokenize(env.vocab, c.text, /*add_special=*/true, parse_special);
      std::vector<llama_token> bare =
          Tokenize(env.vocab, c.text, /*add_special=*/false, parse_special);
      std::string detok = Detokenize(env.vocab, ids, /*special=*/true);
      std::string detok_plain = Detokenize(env.vocab, ids, /*special=*/false);
      if (!IsValidUtf8(detok) || !IsValidUtf8(detok_plain)) {
        Die("case %s: detokenized text is not valid UTF-8", c.name);
      }
      variants.push_back({
          {"add_special", true},
          {"parse_special", parse_special},
          {"specials_added", ids != bare},
          {"ids", ids},
          {"detok", detok},
          {"detok_plain", detok_plain},
          {"roundtrip", detok == c.text},
      });
    }
    cases.push_back({{"name", c.name}, {"text", c.text}, {"variants", variants}});
  }
  ordered_json doc = {
      {"generator", env.generator},
      {"vocab",
       {
           {"n_tokens", llama_vocab_n_tokens(env.vocab)},
           {"add_bos", llama_vocab_get_add_bos(env.vocab)},
           {"add_eos", llama_vocab_get_add_eos(env.vocab)},
           {"bos", llama_vocab_bos(env.vocab)},
           {"eos", llama_vocab_eos(env.vocab)},
           {"eot", llama_vocab_eot(env.vocab)},
       }},
      {"cases", cases},
  };
  WriteJsonOrDie(out_dir + "/tokenizer.json", doc);
}

// ------------------------------------------------------------------- logits

void DumpLogits(const Env& env, const std::string& name,
                const std::string& text_path, const std::string& out_dir) {
  const std::string text = ReadFileOrDie(text_path);
  const bool add_bos = llama_vocab_get_add_bos(env.vocab);
  std::vector<llama_token> all =
      Tokenize(env.vocab, text, /*add_special=*/true, /*parse_special=*/false);
  if (static_cast<int>(all.size()) < kEvalTokens + 1) {
    Die("%s: %zu tokens, need more than %d", text_path.c_str(), all.size(),
        kEvalTokens);
  }
  std::vector<llama_token> tokens(all.begin(), all.begin() + kEvalTokens);

  llama_context* ctx = NewContextOrDie(env);
  llama_batch batch = llama_batch_init(kEvalTokens, 0, 1);
  for (int i = 0; i < kEvalTokens; ++i) {
    batch.token[i] = tokens[i];
    batch.pos[i] = i;
    batch.n_seq_id[i] = 1;
    batch.seq_id[i][0] = 0;
    batch.logits[i] = 1;
  }
  batch.n_tokens = kEvalTokens;
  if (llama_decode(ctx, batch) != 0) Die("%s: llama_decode failed", name.c_str());

  const int n_vocab = llama_vocab_n_tokens(env.vocab);
  ordered_json top_ids = ordered_json::array();
  ordered_json top_logits = ordered_json::array();
  ordered_json logsumexp = ordered_json::array();
  ordered_json next_logprob = ordered_json::array();
  double nll_sum = 0.0;
  std::vector<int> order(n_vocab);
  for (int i = 0; i < kEvalTokens; ++i) {
    const float* logits = llama_get_logits_ith(ctx, i);
    if (logits == nullptr) Die("no logits at %d", i);
    std::iota(order.begin(), order.end(), 0);
    // Ties break on the lower id, so the order is fully determined.
    std::partial_sort(order.begin(), order.begin() + kTopK, order.end(),
                      [&](int a, int b) {
                        return logits[a] > logits[b] ||
                               (logits[a] == logits[b] && a < b);
                      });
    double max_logit = logits[order[0]];
    double sum = 0.0;
    for (int v = 0; v < n_vocab; ++v) sum += std::exp(logits[v] - max_logit);
    const double lse = max_logit + std::log(sum);
    ordered_json ids = ordered_json::array();
    ordered_json vals = ordered_json::array();
    for (int k = 0; k < kTopK; ++k) {
      ids.push_back(order[k]);
      vals.push_back(ShortFloat(logits[order[k]]));
    }
    top_ids.push_back(ids);
    top_logits.push_back(vals);
    logsumexp.push_back(ShortDouble(lse));
    if (i + 1 < kEvalTokens) {
      const double lp = logits[tokens[i + 1]] - lse;
      nll_sum -= lp;
      next_logprob.push_back(ShortDouble(lp));
    }
  }
  llama_batch_free(batch);
  llama_free(ctx);

  const int n_pred = kEvalTokens - 1;
  const double mean_nll = nll_sum / n_pred;
  const double ppl = std::exp(mean_nll);
  std::fprintf(stderr, "refdump: %s: %zu tokens, ppl(511) = %.4f\n",
               name.c_str(), all.size(), ppl);

  ordered_json doc = {
      {"generator", env.generator},
      {"name", name},
      {"text_file", "texts/" + name + ".txt"},
      {"n_text_tokens", all.size()},
      {"add_bos", add_bos},
      {"parse_special", false},
      {"n_eval", kEvalTokens},
      {"top_k", kTopK},
      {"context", ContextJson(env)},
      {"tokens", tokens},
      {"top_ids", top_ids},
      {"top_logits", top_logits},
      {"logsumexp", logsumexp},
      {"next_logprob", next_logprob},
      {"n_predictions", n_pred},
      {"mean_nll", ShortDouble(mean_nll)},
      {"perplexity", ShortDouble(ppl)},
  };
  WriteJsonOrDie(out_dir + "/logits_" + name + ".json", doc);
}

// ------------------------------------------------------------------- greedy

struct ChatCase {
  const char* name;
  const char* user;
};

const std::vector<ChatCase>& ChatCases() {
  static const std::vector<ChatCase> cases = {
      {"capital_france", "What is the capital of France?"},
      {"python_prime",
       "Write a Python function that checks whether a number is prime."},
      {"list_red_fruits", "List five fruits that are red."},
      {"math_multiply", "What is 12 times 15?"},
      {"story_robot",
       "Write a short story about a robot who learns to paint."},
      {"explain_photosynthesis", "Explain photosynthesis in simple terms."},
      {"author_romeo", "Who wrote Romeo and Juliet?"},
      {"sleep_tips", "Give me three tips for better sleep."},
      {"translate_spanish", "Translate 'good morning' into Spanish."},
      {"list_vs_tuple",
       "What is the difference between a list and a tuple in Python?"},
      {"haiku_ocean", "Write a haiku about the ocean."},
      {"leap_year", "How many days are in a leap year?"},
      {"greeting", "Hi!"},
      {"sky_blue", "Why is the sky blue?"},
      {"sql_query",
       "Write a SQL query that selects all users older than 30 from a table "
       "named users."},
      {"summarize_cinderella",
       "Summarize the plot of Cinderella in two sentences."},
  };
  return cases;
}

std::string RenderChatml(const std::string& user) {
  return std::string("<|im_start|>system\n") + kSystemPrompt +
         "<|im_end|>\n<|im_start|>user\n" + user +
         "<|im_end|>\n<|im_start|>assistant\n";
}

// Cross-checks our rendering against llama.cpp's built-in template code.
void CheckTemplate(const Env& env, const std::string& user,
                   const std::string& ours) {
  const char* tmpl = llama_model_chat_template(env.model, nullptr);
  if (tmpl == nullptr) Die("model has no chat template");
  llama_chat_message msgs[2] = {{"system", kSystemPrompt},
                                {"user", user.c_str()}};
  std::vector<char> buf(ours.size() * 2 + 256);
  int32_t n = llama_chat_apply_template(tmpl, msgs, 2, /*add_ass=*/true,
                                        buf.data(),
                                        static_cast<int32_t>(buf.size()));
  if (n < 0 || n > static_cast<int32_t>(buf.size())) {
    Die("llama_chat_apply_template failed (%d)", n);
  }
  if (std::string(buf.data(), n) != ours) {
    Die("ChatML rendering differs from llama_chat_apply_template");
  }
}

int Argmax(const float* logits, int n_vocab, float* margin) {
  int best = 0;
  for (int v = 1; v < n_vocab; ++v) {
    if (logits[v] > logits[best]) best = v;
  }
  float second = -INFINITY;
  for (int v = 0; v < n_vocab; ++v) {
    if (v != best && logits[v] > second) second = logits[v];
  }
  *margin = logits[best] - second;
  return best;
}

void DumpGreedy(const Env& env, const std::string& out_dir) {
  const int n_vocab = llama_vocab_n_tokens(env.vocab);
  llama_context* ctx = NewContextOrDie(env);
  ordered_json cases = ordered_json::array();
  for (const ChatCase& c : ChatCases()) {
    const std::string prompt = RenderChatml(c.user);
    CheckTemplate(env, c.user, prompt);
    std::vector<llama_token> prompt_ids =
        Tokenize(env.vocab, prompt, /*add_special=*/true, /*parse_special=*/true);

    llama_memory_clear(llama_get_memory(ctx), /*data=*/true);
    const int n_prompt = static_cast<int>(prompt_ids.size());
    llama_batch batch = llama_batch_init(n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; ++i) {
      batch.token[i] = prompt_ids[i];
      batch.pos[i] = i;
      batch.n_seq_id[i] = 1;
      batch.seq_id[i][0] = 0;
      batch.logits[i] = i == n_prompt - 1;
    }
    batch.n_tokens = n_prompt;
    if (llama_decode(ctx, batch) != 0) Die("%s: prompt decode failed", c.name);
    llama_batch_free(batch);

    std::vector<llama_token> ids;
    ordered_json margins = ordered_json::array();
    std::string stop = "length";
    llama_pos pos = n_prompt;
    for (int step = 0; step < kGreedyTokens; ++step) {
      float margin = 0;
      llama_token next = Argmax(llama_get_logits_ith(ctx, -1), n_vocab, &margin);
      ids.push_back(next);
      margins.push_back(ShortFloat(margin));
      if (llama_vocab_is_eog(env.vocab, next)) {
        stop = "eog";
        break;
      }
      llama_batch one = llama_batch_init(1, 0, 1);
      one.token[0] = next;
      one.pos[0] = pos++;
      one.n_seq_id[0] = 1;
      one.seq_id[0][0] = 0;
      one.logits[0] = 1;
      one.n_tokens = 1;
      if (llama_decode(ctx, one) != 0) Die("%s: decode failed", c.name);
      llama_batch_free(one);
    }
    std::vector<llama_token> text_ids = ids;
    if (stop == "eog") text_ids.pop_back();
    const std::string text = Detokenize(env.vocab, text_ids, /*special=*/false);
    if (!IsValidUtf8(text)) Die("%s: generated text not UTF-8", c.name);
    std::fprintf(stderr, "refdump: greedy %s (%zu, %s): %s\n", c.name,
                 ids.size(), stop.c_str(), text.c_str());
    cases.push_back({
        {"name", c.name},
        {"user", c.user},
        {"prompt", prompt},
        {"prompt_ids", prompt_ids},
        {"ids", ids},
        {"stop", stop},
        {"text", text},
        {"margins", margins},
    });
  }
  llama_free(ctx);

  std::vector<llama_token> eog;
  for (int v = 0; v < n_vocab; ++v) {
    if (llama_vocab_is_eog(env.vocab, v)) eog.push_back(v);
  }
  ordered_json doc = {
      {"generator", env.generator},
      {"system_prompt", kSystemPrompt},
      {"template", "chatml with system prompt and generation prompt"},
      {"add_special", true},
      {"parse_special", true},
      {"n_predict", kGreedyTokens},
      {"eog_ids", eog},
      {"context", ContextJson(env)},
      {"cases", cases},
  };
  WriteJsonOrDie(out_dir + "/greedy.json", doc);
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path;
  std::string out_dir;
  bool do_tokenizer = false;
  bool do_greedy = false;
  std::vector<std::pair<std::string, std::string>> logits_jobs;
  Env env;
  env.generator = ordered_json::object();
  env.generator["tool"] = "scripts/ref/refdump.cc";

  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Die("%s needs a value", arg.c_str());
      return argv[++i];
    };
    if (arg == "--model") {
      model_path = value();
    } else if (arg == "--out") {
      out_dir = value();
    } else if (arg == "--threads") {
      env.threads = std::atoi(value().c_str());
    } else if (arg == "--meta") {
      std::string kv = value();
      size_t eq = kv.find('=');
      if (eq == std::string::npos) Die("--meta wants KEY=VALUE");
      env.generator[kv.substr(0, eq)] = kv.substr(eq + 1);
    } else if (arg == "--tokenizer") {
      do_tokenizer = true;
    } else if (arg == "--greedy") {
      do_greedy = true;
    } else if (arg == "--logits") {
      std::string kv = value();
      size_t eq = kv.find('=');
      if (eq == std::string::npos) Die("--logits wants NAME=FILE");
      logits_jobs.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
    } else {
      Die("unknown argument %s", arg.c_str());
    }
  }
  if (model_path.empty() || out_dir.empty()) Die("--model and --out required");
  if (env.threads <= 0) Die("--threads must be positive");
  env.generator["threads"] = env.threads;

  llama_log_set(QuietLog, nullptr);
  llama_backend_init();
  llama_model_params mparams = llama_model_default_params();
  env.model = llama_model_load_from_file(model_path.c_str(), mparams);
  if (env.model == nullptr) Die("cannot load %s", model_path.c_str());
  env.vocab = llama_model_get_vocab(env.model);
  char desc[256];
  llama_model_desc(env.model, desc, sizeof(desc));
  env.generator["model_desc"] = desc;
  env.generator["llama_version"] = llama_version();

  if (do_tokenizer) DumpTokenizer(env, out_dir);
  for (const auto& [name, path] : logits_jobs) {
    DumpLogits(env, name, path, out_dir);
  }
  if (do_greedy) DumpGreedy(env, out_dir);

  llama_model_free(env.model);
  llama_backend_free();
  return 0;
}
