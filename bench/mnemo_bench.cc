// mnemo-bench: engine benchmarks whose figures the comparison scripts set
// against llama.cpp and the machine's limits measured in the same run.
//
//   generate    prefill + decode one sequence (speed, peak RSS, tokens)
//   perplexity  teacher-forced scoring of a text in windows of --ctx tokens
//   batch       decode tokens/s of N sequences together against one alone
//   membw       single-thread memory read bandwidth (the decode ceiling)
//   serve       a multi-client chat load against a running mnemod (serve_bench.cc)
//   t2          T2 page store throughput (t2_bench.cc)
//   synth       a session with synthetic KV written into a data directory (synth_bench.cc)
//   resume      client phases of the resume benchmark (resume_bench.cc)
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "model/engine.h"
#include "model/sampler.h"

namespace mnemo {
namespace {

using bench::DieAs;
using bench::Now;
using nlohmann::json;

size_t PeakRssBytes() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<size_t>(ru.ru_maxrss) * 1024;
}

[[noreturn]] void Die(const std::string& msg) { DieAs("mnemo-bench", msg); }

// --flag value / --flag (boolean) parsing.
class Args {
 public:
  Args(int argc, char** argv, int first) {
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) Die("unexpected argument '" + a + "'");
      a = a.substr(2);
      if (i + 1 < argc && std::strncmp(argv[i + 1], "--", 2) != 0) {
        kv_[a] = argv[++i];
      } else {
        kv_[a] = "";
      }
    }
  }
  bool Has(const std::string& k) {
    used_.push_back(k);
    return kv_.count(k) != 0;
  }
  std::string Str(const std::string& k, const std::string& def = "") {
    used_.push_back(k);
    auto it = kv_.find(k);
    return it == kv_.end() ? def : it->second;
  }
  double Num(const std::string& k, double def) {
    std::string s = Str(k);
    if (s.empty()) return def;
    char* end = nullptr;
    double v = std::strtod(s.c_str(), &end);
    if (*end != '\0') Die("--" + k + " expects a number, got '" + s + "'");
    return v;
  }
  void CheckAllUsed() {
    for (auto& [k, v] : kv_)
      if (std::find(used_.begin(), used_.end(), k) == used_.end()) Die("unknown option --" + k);
  }

 private:
  std::map<std::string, std::string> kv_;
  std::vector<std::string> used_;
};

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Die("cannot read '" + path + "'");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::unique_ptr<model::Engine> OpenEngine(Args& args, size_t kv_budget = size_t{1} << 30) {
  model::EngineOptions o;
  o.model_path = args.Str("model", "models/SmolLM2-135M-Instruct.Q4_1.gguf");
  o.threads = static_cast<int>(args.Num("threads", 0));
  o.page_tokens = static_cast<int32_t>(args.Num("page-tokens", kernels::kDefaultPageTokens));
  o.prefill_chunk = static_cast<int32_t>(args.Num("chunk", 512));
  o.kv_budget_bytes = static_cast<size_t>(args.Num("kv-budget-mib", kv_budget >> 20)) << 20;
  const std::string math = args.Str("math", "exact");
  const std::optional<kernels::MathMode> mode = kernels::ParseMathMode(math);
  if (!mode) Die("--math must be exact or fast, not '" + math + "'");
  o.math = *mode;
  auto e = model::Engine::Open(o);
  if (!e.ok()) Die(e.status().ToString());
  return std::move(e).value();
}

// A deterministic synthetic prompt of exactly n tokens: a fixed English
// passage, tokenized and repeated.
std::vector<int32_t> SyntheticPrompt(const model::Engine& e, int n) {
  static const char* kPassage =
      "The history of computing is a story of ideas that took decades to mature. Early "
      "machines filled rooms and consumed enormous amounts of power, yet they could only "
      "perform a few thousand operations per second. Engineers learned to build memory from "
      "magnetic cores, then from transistors, and finally from integrated circuits that "
      "packed billions of switches onto a sliver of silicon. ";
  std::vector<int32_t> base = e.tokenizer().Encode(kPassage, false, false);
  std::vector<int32_t> out;
  while (static_cast<int>(out.size()) < n)
    out.insert(out.end(), base.begin(), base.end());
  out.resize(n);
  return out;
}

int CmdGenerate(Args& args) {
  auto e = OpenEngine(args);
  std::vector<int32_t> prompt;
  if (args.Has("prompt-tokens")) {
    prompt = SyntheticPrompt(*e, static_cast<int>(args.Num("prompt-tokens", 512)));
  } else {
    std::string text = args.Has("prompt-file") ? ReadFile(args.Str("prompt-file")) : args.Str("prompt");
    if (text.empty()) Die("give --prompt TEXT, --prompt-file F or --prompt-tokens N");
    if (args.Has("chat")) {
      auto t = e->TokenizeChat(text);
      if (!t.ok()) Die(t.status().ToString());
      prompt = *t;
    } else {
      prompt = e->TokenizePrompt(text);
    }
  }
  model::GenerateOptions g;
  g.max_tokens = static_cast<int32_t>(args.Num("max-tokens", 128));
  g.sampling.temperature = static_cast<float>(args.Num("temperature", 0));
  g.sampling.top_k = static_cast<int32_t>(args.Num("top-k", 0));
  g.sampling.top_p = static_cast<float>(args.Num("top-p", 1));
  g.sampling.min_p = static_cast<float>(args.Num("min-p", 0));
  g.sampling.repeat_penalty = static_cast<float>(args.Num("repeat-penalty", 1));
  g.sampling.seed = static_cast<uint64_t>(args.Num("seed", 0));
  if (args.Has("stop")) g.stop.push_back(args.Str("stop"));
  const bool as_json = args.Has("json");
  // Raw mode generates exactly max-tokens tokens (no EOS stop) for timing.
  const bool ignore_eos = args.Has("ignore-eos");
  args.CheckAllUsed();
  if (!as_json) {
    g.on_token = [](int32_t, std::string_view text) {
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
      return true;
    };
  }
  auto seq = e->kv().CreateSeq();
  Result<model::GenerateResult> r = Status::Internal("unset");
  if (ignore_eos) {
    // Timing runs: every step decodes, whatever the model says.
    model::GenerateResult res;
    res.prompt_tokens = static_cast<int64_t>(prompt.size());
    const double t0 = Now();
    auto logits = e->Prefill(seq, prompt);
    if (!logits.ok()) Die(logits.status().ToString());
    const double t1 = Now();
    res.prefill_seconds = t1 - t0;
    model::Sampler sampler(g.sampling, e->model().config().vocab_size);
    std::vector<float> lg = *logits;
    for (int32_t i = 0; i < g.max_tokens; ++i) {
      int32_t tok = sampler.Sample(lg, res.tokens);
      res.tokens.push_back(tok);
      if (i + 1 == g.max_tokens) break;
      model::BatchSeq b{seq, std::span<const int32_t>(&res.tokens.back(), 1), false};
      Status s = e->model().Forward({&b, 1}, &e->kv(), &lg);
      if (!s.ok()) Die(s.ToString());
    }
    res.decode_seconds = Now() - t1;
    res.ttft_seconds = res.prefill_seconds;
    res.text = e->tokenizer().Decode(res.tokens, false);
    r = std::move(res);
  } else {
    r = e->Generate(seq, prompt, g);
  }
  if (!r.ok()) Die(r.status().ToString());
  const model::GenerateResult& res = *r;
  const double decode_tps =
      res.tokens.size() > 1 && res.decode_seconds > 0
          ? static_cast<double>(ignore_eos ? res.tokens.size() : res.tokens.size() - 1) /
                res.decode_seconds
          : 0.0;
  if (as_json) {
    json j;
    j["prompt_tokens"] = prompt;
    j["tokens"] = res.tokens;
    j["text"] = res.text;
    j["finish_reason"] = std::string(model::FinishReasonName(res.finish));
    j["prefill_tokens_per_s"] = static_cast<double>(prompt.size()) / res.prefill_seconds;
    j["decode_tokens_per_s"] = decode_tps;
    j["ttft_ms"] = res.ttft_seconds * 1e3;
    j["peak_rss_bytes"] = PeakRssBytes();
    j["model_bytes"] = e->model().file().file_size();
    j["weight_bytes_per_token"] = e->model().weight_bytes();
    j["threads"] = e->backend().threads();
    j["math"] = std::string(kernels::MathModeName(e->backend().math_mode()));
    std::cout << j.dump() << "\n";
  } else {
    std::fprintf(stderr, "\n[%zu prompt tokens, %.1f tok/s prefill; %zu generated, %.1f tok/s decode; %s]\n",
                 prompt.size(), static_cast<double>(prompt.size()) / res.prefill_seconds,
                 res.tokens.size(), decode_tps,
                 std::string(model::FinishReasonName(res.finish)).c_str());
  }
  return 0;
}

int CmdPerplexity(Args& args) {
  auto e = OpenEngine(args);
  const std::string text = ReadFile(args.Str("text-file"));
  const int ctx = static_cast<int>(args.Num("ctx", 512));
  const bool as_json = args.Has("json");
  args.CheckAllUsed();
  if (ctx < 2) Die("--ctx must be >= 2");
  std::vector<int32_t> toks = e->tokenizer().Encode(text, true, false);
  const int V = e->model().config().vocab_size;
  double nll = 0;
  int64_t scored = 0;
  std::vector<float> logits;
  for (size_t w = 0; w + ctx <= toks.size(); w += ctx) {
    auto seq = e->kv().CreateSeq();
    for (int off = 0; off < ctx; off += 512) {
      const int n = std::min(512, ctx - off);
      model::BatchSeq b{seq, std::span<const int32_t>(toks.data() + w + off, n), true};
      Status s = e->model().Forward({&b, 1}, &e->kv(), &logits);
      if (!s.ok()) Die(s.ToString());
      for (int i = 0; i < n; ++i) {
        const int pos = off + i;
        if (pos + 1 >= ctx) break;
        const float* row = logits.data() + static_cast<size_t>(i) * V;
        double mx = row[0];
        for (int j = 1; j < V; ++j) mx = std::max(mx, static_cast<double>(row[j]));
        double z = 0;
        for (int j = 0; j < V; ++j) z += std::exp(row[j] - mx);
        nll += -(row[toks[w + pos + 1]] - mx - std::log(z));
        ++scored;
      }
    }
    (void)e->kv().FreeSeq(seq);
  }
  if (scored == 0) Die("text has fewer than --ctx tokens");
  const double ppl = std::exp(nll / static_cast<double>(scored));
  if (as_json) {
    std::cout << json{{"tokens", scored}, {"ppl", ppl}}.dump() << "\n";
  } else {
    std::printf("scored %lld tokens, perplexity %.4f\n", static_cast<long long>(scored), ppl);
  }
  return 0;
}

// Decode throughput of `n` sequences stepping together, each first prefilled
// with `ctx` tokens.
double BatchedDecodeTps(model::Engine& e, int n, int ctx, int steps) {
  std::vector<attention::SeqId> seqs;
  std::vector<int32_t> prompt = SyntheticPrompt(e, ctx);
  std::vector<int32_t> last(n);
  for (int i = 0; i < n; ++i) {
    seqs.push_back(e.kv().CreateSeq());
    auto lg = e.Prefill(seqs.back(), prompt);
    if (!lg.ok()) Die(lg.status().ToString());
    last[i] = model::ArgmaxLowestId(*lg);
  }
  const int V = e.model().config().vocab_size;
  std::vector<float> logits;
  std::vector<model::BatchSeq> batch(n);
  const double t0 = Now();
  for (int s = 0; s < steps; ++s) {
    for (int i = 0; i < n; ++i) batch[i] = {seqs[i], std::span<const int32_t>(&last[i], 1), false};
    Status st = e.model().Forward(batch, &e.kv(), &logits);
    if (!st.ok()) Die(st.ToString());
    for (int i = 0; i < n; ++i) {
      last[i] = model::ArgmaxLowestId(
          std::span<const float>(logits).subspan(static_cast<size_t>(i) * V, static_cast<size_t>(V)));
    }
  }
  const double dt = Now() - t0;
  for (auto s : seqs) (void)e.kv().FreeSeq(s);
  return static_cast<double>(n) * steps / dt;
}

int CmdBatch(Args& args) {
  auto e = OpenEngine(args, size_t{2} << 30);
  const int n = static_cast<int>(args.Num("seqs", 16));
  const int ctx = static_cast<int>(args.Num("ctx", 128));
  const int steps = static_cast<int>(args.Num("steps", 32));
  const int reps = static_cast<int>(args.Num("reps", 3));
  const bool as_json = args.Has("json");
  args.CheckAllUsed();
  if (n < 1 || ctx < 1 || steps < 1 || reps < 1) Die("--seqs, --ctx, --steps and --reps must be >= 1");
  // One sequence, then n, alternately, reps times and once more alone: the
  // best of each, so that a burst of load from a neighbour on a shared host
  // lands on one run, not on the ratio.
  std::vector<double> singles{BatchedDecodeTps(*e, 1, ctx, steps)}, manys;
  for (int r = 0; r < reps; ++r) {
    manys.push_back(BatchedDecodeTps(*e, n, ctx, steps));
    singles.push_back(BatchedDecodeTps(*e, 1, ctx, steps));
  }
  const double single = *std::max_element(singles.begin(), singles.end());
  const double many = *std::max_element(manys.begin(), manys.end());
  json j{{"seqs", n},
         {"ctx", ctx},
         {"reps", reps},
         {"single_tokens_per_s", single},
         {"batched_tokens_per_s", many},
         {"single_runs", singles},
         {"batched_runs", manys},
         {"ratio", many / single}};
  if (as_json) {
    std::cout << j.dump() << "\n";
  } else {
    std::cout << j.dump(2) << "\n";
  }
  return 0;
}

// The compute share of a resumed turn: a context of --ctx tokens in the KV
// cache, then --tokens new tokens prefilled on top of it (forked off the
// context each rep, so every rep sees the same history). Prints the best and
// median time of the extension and its tokens/s.
int CmdExtend(Args& args) {
  auto e = OpenEngine(args, size_t{4} << 30);
  const int ctx = static_cast<int>(args.Num("ctx", 8192));
  const int n = static_cast<int>(args.Num("tokens", 32));
  const int reps = static_cast<int>(args.Num("reps", 5));
  const bool as_json = args.Has("json");
  args.CheckAllUsed();
  if (ctx < 1 || n < 1 || reps < 1) Die("--ctx, --tokens and --reps must be >= 1");
  const std::vector<int32_t> all = SyntheticPrompt(*e, ctx + n);
  const auto history = std::span<const int32_t>(all).first(static_cast<size_t>(ctx));
  const auto fresh = std::span<const int32_t>(all).subspan(static_cast<size_t>(ctx));
  auto base = e->kv().CreateSeq();
  const double t0 = Now();
  if (auto l = e->Prefill(base, history); !l.ok()) Die(l.status().ToString());
  const double context_s = Now() - t0;
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    auto fork = e->kv().Fork(base);
    if (!fork.ok()) Die(fork.status().ToString());
    const double a = Now();
    if (auto l = e->Prefill(*fork, fresh); !l.ok()) Die(l.status().ToString());
    times.push_back(Now() - a);
    if (Status s = e->kv().FreeSeq(*fork); !s.ok()) Die(s.ToString());
  }
  std::sort(times.begin(), times.end());
  const double median = times[times.size() / 2];
  json j{{"ctx", ctx},
         {"tokens", n},
         {"context_prefill_s", context_s},
         {"extend_ms_best", times.front() * 1e3},
         {"extend_ms_median", median * 1e3},
         {"extend_tokens_per_s", n / median}};
  std::cout << (as_json ? j.dump() : j.dump(2)) << "\n";
  return 0;
}

// Runs the forward pass over the first --tokens tokens of a text as one
// batch with an observer, and compares every intermediate tensor with the
// float32 dumps that scripts/ref/layerdump.cc wrote from llama.cpp.
int CmdLayers(Args& args) {
  auto e = OpenEngine(args);
  const std::string text = ReadFile(args.Str("text-file"));
  const std::string dir = args.Str("dump-dir");
  const int n = static_cast<int>(args.Num("tokens", 512));
  const bool as_json = args.Has("json");
  args.CheckAllUsed();
  if (dir.empty()) Die("--dump-dir is required");
  std::vector<int32_t> toks = e->tokenizer().Encode(text, true, false);
  if (static_cast<int>(toks.size()) < n) Die("text has fewer than --tokens tokens");
  toks.resize(n);
  json rows = json::array();
  std::string first_diff;
  e->model().set_observer([&](std::string_view name, int layer, const float* d, int64_t r,
                              int64_t c) {
    const std::string tensor = std::string(name) + (layer >= 0 ? "-" + std::to_string(layer) : "");
    std::ifstream f(dir + "/" + tensor + ".bin", std::ios::binary);
    if (!f) return;
    std::vector<float> ref(static_cast<size_t>(r * c));
    f.read(reinterpret_cast<char*>(ref.data()), static_cast<std::streamsize>(ref.size() * 4));
    if (static_cast<size_t>(f.gcount()) != ref.size() * 4) Die(tensor + ": dump has the wrong size");
    double max_diff = 0, diff2 = 0, ref2 = 0;
    int64_t differing = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const double delta = static_cast<double>(d[i]) - ref[i];
      differing += delta != 0;
      max_diff = std::max(max_diff, std::fabs(delta));
      diff2 += delta * delta;
      ref2 += static_cast<double>(ref[i]) * ref[i];
    }
    if (differing > 0 && first_diff.empty()) first_diff = tensor;
    rows.push_back({{"tensor", tensor},
                    {"max_diff", max_diff},
                    {"rel_rms", ref2 > 0 ? std::sqrt(diff2 / ref2) : 0.0},
                    {"differing", differing}});
  });
  auto seq = e->kv().CreateSeq();
  std::vector<float> logits;
  model::BatchSeq b{seq, toks, true};
  Status s = e->model().Forward({&b, 1}, &e->kv(), &logits);
  if (!s.ok()) Die(s.ToString());
  if (rows.empty()) Die("no dumps matched in " + dir);
  if (as_json) {
    std::cout << json{{"tensors", rows}, {"first_difference", first_diff}}.dump() << "\n";
  } else {
    for (const json& r : rows)
      std::printf("%-18s max %-12.5g rel_rms %-10.3g differing %lld\n",
                  r["tensor"].get<std::string>().c_str(), r["max_diff"].get<double>(),
                  r["rel_rms"].get<double>(), static_cast<long long>(r["differing"].get<int64_t>()));
    std::printf("first difference: %s\n", first_diff.empty() ? "none (bit-identical)" : first_diff.c_str());
  }
  return 0;
}

// Single-thread sequential read bandwidth over a buffer much larger than the
// caches: the physical ceiling of a memory-bound decode step.
int CmdMembw(Args& args) {
  const size_t mib = static_cast<size_t>(args.Num("mib", 512));
  const bool as_json = args.Has("json");
  args.CheckAllUsed();
  const size_t n = mib << 20;
  std::vector<uint64_t> buf(n / 8);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = i;
  double best = 0;
  volatile uint64_t sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = Now();
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (size_t i = 0; i + 4 <= buf.size(); i += 4) {
      a0 += buf[i];
      a1 += buf[i + 1];
      a2 += buf[i + 2];
      a3 += buf[i + 3];
    }
    sink = sink + a0 + a1 + a2 + a3;
    best = std::max(best, static_cast<double>(n) / (Now() - t0));
  }
  if (as_json) {
    std::cout << json{{"read_bytes_per_s", best}}.dump() << "\n";
  } else {
    std::printf("%.2f GB/s\n", best / 1e9);
  }
  return 0;
}

}  // namespace

namespace bench {
int CmdServe(int argc, char** argv);  // serve_bench.cc
int CmdT2(int argc, char** argv);     // t2_bench.cc
int CmdSynth(int argc, char** argv);  // synth_bench.cc
int CmdResume(int argc, char** argv); // resume_bench.cc
}  // namespace bench
}  // namespace mnemo

int main(int argc, char** argv) {
  using namespace mnemo;
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    std::fprintf(stderr,
                 "usage: mnemo-bench COMMAND [options]\n"
                 "  generate   --model M (--prompt TEXT | --prompt-file F | --prompt-tokens N) [--chat]\n"
                 "             --max-tokens N --temperature T [--top-k K --top-p P --min-p P --seed S\n"
                 "             --repeat-penalty R --stop S --ignore-eos] --threads T [--json]\n"
                 "  perplexity --model M --text-file F --ctx N [--threads T] [--json]\n"
                 "  batch      --model M --seqs N --ctx C --steps S [--reps R] [--threads T] [--json]\n"
                 "  membw      [--mib N] [--json]\n"
                 "  extend     --model M --ctx C --tokens N [--reps R --threads T] [--json]\n"
                 "             (prefill N tokens on top of a C-token context: a resumed turn's compute)\n"
                 "  layers     --model M --text-file F --dump-dir D [--tokens N] [--json]\n"
                 "             (compare every activation with llama.cpp's, see scripts/ref/layerdump.cc)\n"
                 "  serve      [--socket S] --clients N --turns T [--max-tokens M --prompt-tokens P\n"
                 "             --long-prompt-tokens L --temperature T --seed S] [--json]\n"
                 "             (a chat load against a running mnemod, see serve_bench.cc)\n"
                 "  t2         --dir D [--size 2G --block 1M --page 48K --qd 16 --rand-ops N --engine uring|pread\n"
                 "             --phase all|write|read|rand --keep] [--json]\n"
                 "             (T2 page store throughput, see t2_bench.cc and compare_fio.sh)\n"
                 "  synth      --session NAME --tokens N [--uid U --turn-tokens T --seed S --text-file F]\n"
                 "             [mnemod flags: --model M --data-dir D --page-tokens P --t2-budget B ...] [--json]\n"
                 "             (writes a session with synthetic KV into a stopped mnemod's data directory,\n"
                 "             see synth_bench.cc)\n"
                 "  resume     create|turn [--socket S ...] [--json]\n"
                 "             (client phases of the resume benchmark, see resume_bench.cc and compare_resume.sh)\n");
    return argc < 2 ? 2 : 0;
  }
  if (std::strcmp(argv[1], "serve") == 0) return bench::CmdServe(argc - 2, argv + 2);
  if (std::strcmp(argv[1], "t2") == 0) return bench::CmdT2(argc - 2, argv + 2);
  if (std::strcmp(argv[1], "synth") == 0) return bench::CmdSynth(argc - 2, argv + 2);
  if (std::strcmp(argv[1], "resume") == 0) return bench::CmdResume(argc - 2, argv + 2);
  Args args(argc, argv, 2);
  const std::string cmd = argv[1];
  if (cmd == "generate") return CmdGenerate(args);
  if (cmd == "perplexity") return CmdPerplexity(args);
  if (cmd == "batch") return CmdBatch(args);
  if (cmd == "membw") return CmdMembw(args);
  if (cmd == "extend") return CmdExtend(args);
  if (cmd == "layers") return CmdLayers(args);
  Die("unknown command '" + cmd + "'");
}
