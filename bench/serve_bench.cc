// mnemo-bench serve: a multi-client chat load against a running mnemod,
// through the real client library. N clients, each on its own connection
// with its own session, run T turns; the report gives aggregate generated
// tokens/s over the wall time, time to first token and inter-token gaps
// (p50/p99), and, with --long-prompt-tokens, the inter-token gaps of the
// other clients while one long prompt was being prefilled.
//
// bench/llama_server_load.py drives the same workload (same prompts) against
// llama.cpp's llama-server; bench/compare_serve.sh runs both.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "mnemo/client.h"

namespace mnemo::bench {

int CmdServe(int argc, char** argv);

namespace {

using client::Client;
using nlohmann::json;


[[noreturn]] void Die(const std::string& msg) { DieAs("mnemo-bench serve", msg); }

struct ServeOptions {
  std::string socket;
  int clients = 1;
  int turns = 4;
  uint32_t max_tokens = 128;
  int prompt_tokens = 0;       // pad each user message to about this many tokens
  int long_prompt_tokens = 0;  // 0: no long-prompt client
  uint32_t long_max_tokens = 8;
  float temperature = 0;  // greedy unless asked otherwise
  std::optional<uint64_t> seed;
  bool keep_sessions = false;
  bool json = false;
};

ServeOptions ParseOptions(int argc, char** argv) {
  ServeOptions o;
  auto num = [&](int& i, const char* flag) -> double {
    if (i + 1 >= argc) Die(std::string(flag) + " needs a value");
    char* end = nullptr;
    const double v = std::strtod(argv[++i], &end);
    if (end == argv[i] || *end != '\0') Die(std::string(flag) + " expects a number, got '" + argv[i] + "'");
    return v;
  };
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--socket") {
      if (i + 1 >= argc) Die("--socket needs a value");
      o.socket = argv[++i];
    } else if (a == "--clients") {
      o.clients = static_cast<int>(num(i, "--clients"));
    } else if (a == "--turns") {
      o.turns = static_cast<int>(num(i, "--turns"));
    } else if (a == "--max-tokens") {
      o.max_tokens = static_cast<uint32_t>(num(i, "--max-tokens"));
    } else if (a == "--prompt-tokens") {
      o.prompt_tokens = static_cast<int>(num(i, "--prompt-tokens"));
    } else if (a == "--long-prompt-tokens") {
      o.long_prompt_tokens = static_cast<int>(num(i, "--long-prompt-tokens"));
    } else if (a == "--long-max-tokens") {
      o.long_max_tokens = static_cast<uint32_t>(num(i, "--long-max-tokens"));
    } else if (a == "--temperature") {
      o.temperature = static_cast<float>(num(i, "--temperature"));
    } else if (a == "--seed") {
      o.seed = static_cast<uint64_t>(num(i, "--seed"));
    } else if (a == "--keep-sessions") {
      o.keep_sessions = true;
    } else if (a == "--json") {
      o.json = true;
    } else {
      Die("unknown argument '" + a + "'");
    }
  }
  if (o.clients < 1 || o.clients > 1024) Die("--clients must be in [1, 1024]");
  if (o.turns < 1) Die("--turns must be positive");
  if (o.max_tokens < 1) Die("--max-tokens must be positive");
  if (o.prompt_tokens < 0 || o.long_prompt_tokens < 0) Die("prompt sizes must not be negative");
  return o;
}

// ------------------------------------------------------------------ prompts
// Kept identical to bench/llama_server_load.py so both servers see the same
// conversation: one filler word is about one token for SmolLM2's tokenizer.

constexpr const char* kTopics[] = {
    "a lighthouse keeper who finds a message in a bottle",
    "a robot learning to paint in an abandoned city",
    "two rival bakers in a small mountain village",
    "a cartographer mapping an island that keeps changing",
    "a young astronaut on her first trip to Mars",
    "a detective solving a mystery on a night train",
    "a dragon who is afraid of heights",
    "a musician who can hear the thoughts of trees",
};
constexpr const char* kFiller[] = {"river", "stone", "window", "garden", "morning", "letter", "candle", "forest",
                                   "bridge", "harbor", "winter", "market", "lantern", "valley", "meadow", "tower"};

std::string Filler(int words) {
  std::string s;
  for (int i = 0; i < words; ++i) {
    if (i > 0) s += ' ';
    s += kFiller[i % std::size(kFiller)];
  }
  return s;
}

// Turn `turn` of client `client`; padded to about `pad_tokens` tokens.
std::string TurnPrompt(int client, int turn, int pad_tokens) {
  std::string p = turn == 0 ? "Write a long story about " : "Continue the story, adding a new chapter about ";
  p += kTopics[(client + turn) % std::size(kTopics)];
  p += ". Make it detailed and long.";
  constexpr int kBaseTokens = 20;
  if (pad_tokens > kBaseTokens) p += " Use these words: " + Filler(pad_tokens - kBaseTokens) + ".";
  return p;
}

std::string LongPrompt(int tokens) {
  return "Summarize the following list of words in one sentence: " + Filler(std::max(tokens - 12, 1)) + ".";
}

// ---------------------------------------------------------------- measuring

// One inter-token gap: chunk arrival `end_s`, previous chunk `start_s`, and
// the per-token gap (the interval split over the chunk's tokens).
struct Gap {
  double start_s;
  double end_s;
  double per_token_ms;
  int tokens;
};

struct Turn {
  double send_s = 0;
  double first_chunk_s = 0;  // 0: no chunk arrived
  double done_s = 0;
  client::Done done;
};

struct ClientRecord {
  std::vector<Turn> turns;
  std::vector<Gap> gaps;
  Status error;
};

// Runs one generation, timing every chunk. `gaps` may be null.
Status TimedTurn(Client& c, const client::GenerateRequest& req, Turn* turn, std::vector<Gap>* gaps) {
  turn->send_s = Now();
  MNEMO_ASSIGN_OR_RETURN(client::GenerateStream stream, c.StartGenerate(req));
  double last_s = 0;
  for (;;) {
    MNEMO_ASSIGN_OR_RETURN(client::StreamEvent event, stream.Next());
    const double t = Now();
    if (auto* chunk = std::get_if<client::TokenChunk>(&event)) {
      const int k = std::max<int>(1, static_cast<int>(chunk->token_ids.size()));
      if (turn->first_chunk_s == 0) {
        turn->first_chunk_s = t;
      } else if (gaps != nullptr) {
        gaps->push_back({last_s, t, (t - last_s) * 1e3 / k, k});
      }
      last_s = t;
    } else if (auto* done = std::get_if<client::Done>(&event)) {
      turn->done_s = t;
      turn->done = *done;
      return Status::Ok();
    }
  }
}

struct Percentiles {
  double p50 = 0, p99 = 0, mean = 0;
  size_t count = 0;
};

// Nearest-rank percentiles over weighted samples (value, weight).
Percentiles Summarize(std::vector<std::pair<double, int>> v) {
  Percentiles p;
  if (v.empty()) return p;
  std::sort(v.begin(), v.end());
  size_t total = 0;
  double sum = 0;
  for (const auto& [x, w] : v) {
    total += static_cast<size_t>(w);
    sum += x * w;
  }
  auto rank = [&](double q) {
    const size_t want = std::max<size_t>(1, static_cast<size_t>(std::ceil(q * static_cast<double>(total))));
    size_t seen = 0;
    for (const auto& [x, w] : v) {
      seen += static_cast<size_t>(w);
      if (seen >= want) return x;
    }
    return v.back().first;
  };
  p.p50 = rank(0.50);
  p.p99 = rank(0.99);
  p.mean = sum / static_cast<double>(total);
  p.count = total;
  return p;
}

json ToJson(const Percentiles& p) { return {{"p50", p.p50}, {"p99", p.p99}, {"mean", p.mean}, {"count", p.count}}; }

// Turns completed by the regular clients; the long prompt starts at half.
struct Progress {
  std::mutex mu;
  std::condition_variable cv;
  int turns_done = 0;   // guarded by mu
  int clients_done = 0; // guarded by mu
};

Result<Client> Open(const ServeOptions& o, const std::string& name) {
  client::ConnectOptions co;
  co.socket_path = o.socket;
  co.client_name = "mnemo-bench-serve";
  co.connect_timeout = std::chrono::seconds(30);
  MNEMO_ASSIGN_OR_RETURN(Client c, Client::Connect(co));
  MNEMO_RETURN_IF_ERROR(c.CreateSession(name).status());
  return c;
}

client::GenerateRequest Request(const ServeOptions& o, const std::string& session, std::string text,
                                uint32_t max_tokens, uint64_t seed_offset) {
  client::GenerateRequest req;
  req.session = session;
  req.messages = {{"user", std::move(text)}};
  req.sampling.temperature = o.temperature;
  if (o.seed) req.sampling.seed = *o.seed + seed_offset;
  req.max_tokens = max_tokens;
  return req;
}

}  // namespace

int CmdServe(int argc, char** argv) {
  const ServeOptions o = ParseOptions(argc, argv);
  const std::string prefix = "bench-" + std::to_string(::getpid()) + "-" +
                             std::to_string(static_cast<uint64_t>(Now() * 1000) % 1000000);

  // Every connection and session exists before the clock starts.
  std::vector<std::optional<Client>> clients(o.clients);
  std::vector<std::string> names(o.clients);
  for (int i = 0; i < o.clients; ++i) {
    names[i] = prefix + "-c" + std::to_string(i);
    auto c = Open(o, names[i]);
    if (!c.ok()) Die("client " + std::to_string(i) + ": " + c.status().ToString());
    clients[i].emplace(std::move(c).value());
  }
  const client::HelloReply hello = clients[0]->hello();
  const uint64_t projected = static_cast<uint64_t>(o.turns) * (std::max(o.prompt_tokens, 24) + o.max_tokens + 16);
  if (hello.context_limit != 0 && projected > hello.context_limit) {
    std::fprintf(stderr, "mnemo-bench serve: warning: %d turns may need ~%llu tokens per session, over the %u-token "
                         "context; turns will end early\n",
                 o.turns, static_cast<unsigned long long>(projected), hello.context_limit);
  }
  std::optional<Client> long_client;
  const std::string long_name = prefix + "-long";
  if (o.long_prompt_tokens > 0) {
    auto c = Open(o, long_name);
    if (!c.ok()) Die("long-prompt client: " + c.status().ToString());
    long_client.emplace(std::move(c).value());
  }

  std::vector<ClientRecord> records(o.clients);
  Progress progress;
  const int total_turns = o.clients * o.turns;
  const double start_s = Now();
  std::vector<std::thread> threads;
  for (int i = 0; i < o.clients; ++i) {
    threads.emplace_back([&, i] {
      ClientRecord& rec = records[i];
      for (int t = 0; t < o.turns && rec.error.ok(); ++t) {
        Turn turn;
        rec.error = TimedTurn(*clients[i], Request(o, names[i], TurnPrompt(i, t, o.prompt_tokens), o.max_tokens,
                                                   static_cast<uint64_t>(i) * 1000 + t),
                              &turn, &rec.gaps);
        if (rec.error.ok()) rec.turns.push_back(turn);
        std::lock_guard<std::mutex> lock(progress.mu);
        ++progress.turns_done;
        progress.cv.notify_all();
      }
      std::lock_guard<std::mutex> lock(progress.mu);
      ++progress.clients_done;
      progress.cv.notify_all();
    });
  }
  Turn long_turn;
  Status long_error;
  bool long_ran = false;
  if (long_client) {
    threads.emplace_back([&] {
      {
        std::unique_lock<std::mutex> lock(progress.mu);
        progress.cv.wait(lock, [&] {
          return progress.turns_done * 2 >= total_turns || progress.clients_done == o.clients;
        });
        if (progress.clients_done == o.clients) return;  // nothing left to disturb
      }
      long_ran = true;
      long_error = TimedTurn(*long_client, Request(o, long_name, LongPrompt(o.long_prompt_tokens), o.long_max_tokens, 7),
                             &long_turn, nullptr);
    });
  }
  for (auto& t : threads) t.join();
  const double wall_s = Now() - start_s;

  if (!o.keep_sessions) {
    for (int i = 0; i < o.clients; ++i) (void)clients[i]->DeleteSession(names[i]);
    if (long_client) (void)long_client->DeleteSession(long_name);
  }

  // ---------------------------------------------------------------- report
  int errors = 0;
  std::string first_error;
  uint64_t generated = 0, prompt = 0;
  std::map<std::string, int> finish;
  std::vector<std::pair<double, int>> ttft, itl, itl_during, itl_outside;
  // The long prompt's prefill: from its send to its first token.
  const double win_start = long_turn.send_s;
  const double win_end = long_turn.first_chunk_s != 0 ? long_turn.first_chunk_s : long_turn.done_s;
  const bool have_window = long_ran && long_error.ok() && win_end > win_start;
  for (const ClientRecord& rec : records) {
    if (!rec.error.ok()) {
      ++errors;
      if (first_error.empty()) first_error = rec.error.ToString();
    }
    for (const Turn& t : rec.turns) {
      generated += t.done.generated_tokens;
      prompt += t.done.prompt_tokens;
      ++finish[std::string(client::FinishReasonName(t.done.finish_reason))];
      if (t.first_chunk_s != 0) ttft.push_back({(t.first_chunk_s - t.send_s) * 1e3, 1});
    }
    for (const Gap& g : rec.gaps) {
      itl.push_back({g.per_token_ms, g.tokens});
      if (have_window) {
        const bool overlaps = g.start_s < win_end && g.end_s > win_start;
        (overlaps ? itl_during : itl_outside).push_back({g.per_token_ms, g.tokens});
      }
    }
  }
  if (long_ran && !long_error.ok()) {
    ++errors;
    if (first_error.empty()) first_error = "long prompt: " + long_error.ToString();
  }
  const uint64_t long_generated = long_ran && long_error.ok() ? long_turn.done.generated_tokens : 0;
  const double tokens_per_s = static_cast<double>(generated + long_generated) / wall_s;
  const Percentiles ttft_p = Summarize(ttft), itl_p = Summarize(itl);

  json out = {{"clients", o.clients},
              {"turns", o.turns},
              {"max_tokens", o.max_tokens},
              {"prompt_tokens_target", o.prompt_tokens},
              {"model", hello.model_name},
              {"daemon_version", hello.daemon_version},
              {"wall_s", wall_s},
              {"requests", total_turns},
              {"errors", errors},
              {"generated_tokens", generated + long_generated},
              {"prompt_tokens", prompt},
              {"tokens_per_s", tokens_per_s},
              {"finish_reasons", finish},
              {"ttft_ms", ToJson(ttft_p)},
              {"inter_token_ms", ToJson(itl_p)}};
  if (!first_error.empty()) out["first_error"] = first_error;
  if (long_client) {
    json lj = {{"tokens_target", o.long_prompt_tokens}, {"ran", long_ran}};
    if (long_ran && long_error.ok()) {
      lj["prompt_tokens"] = long_turn.done.prompt_tokens;
      lj["prefill_ms"] = (win_end - win_start) * 1e3;
      lj["inter_token_ms_during_prefill"] = ToJson(Summarize(itl_during));
      lj["inter_token_ms_outside_prefill"] = ToJson(Summarize(itl_outside));
    }
    out["long_prompt"] = lj;
  }

  FILE* human = o.json ? stderr : stdout;
  std::fprintf(human, "serve: %d clients x %d turns, max %u tokens, model %s\n", o.clients, o.turns, o.max_tokens,
               hello.model_name.c_str());
  std::fprintf(human, "  %.1f generated tokens/s (%llu tokens in %.2f s), %d errors\n", tokens_per_s,
               static_cast<unsigned long long>(generated + long_generated), wall_s, errors);
  std::fprintf(human, "  ttft        p50 %8.1f ms  p99 %8.1f ms\n", ttft_p.p50, ttft_p.p99);
  std::fprintf(human, "  inter-token p50 %8.2f ms  p99 %8.2f ms  (%zu tokens)\n", itl_p.p50, itl_p.p99, itl_p.count);
  if (have_window) {
    const Percentiles d = Summarize(itl_during), u = Summarize(itl_outside);
    std::fprintf(human, "  long prompt: %u tokens prefilled in %.1f ms\n", long_turn.done.prompt_tokens,
                 (win_end - win_start) * 1e3);
    std::fprintf(human, "    inter-token during its prefill  p50 %8.2f ms  p99 %8.2f ms  (%zu tokens)\n", d.p50, d.p99,
                 d.count);
    std::fprintf(human, "    inter-token otherwise           p50 %8.2f ms  p99 %8.2f ms  (%zu tokens)\n", u.p50, u.p99,
                 u.count);
  }
  if (!first_error.empty()) std::fprintf(human, "  first error: %s\n", first_error.c_str());
  if (o.json) std::printf("%s\n", out.dump(2).c_str());
  return errors == 0 ? 0 : 1;
}

}  // namespace mnemo::bench
