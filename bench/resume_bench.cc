// mnemo-bench resume: the client phases of the resume benchmark
// (bench/compare_resume.sh runs them around daemon restarts and fio).
//
//   create  on a running mnemod: a session whose first turn is a real chat
//           prompt of about --history-tokens tokens (real prefill, greedy);
//           then (a) the re-prefill reference: fresh sessions prefilling the
//           same history plus the new message, time to first token; then
//           --forks copies of the session (forks share its T2 blocks), one
//           per later restart, so every resume reads the same 8k tokens.
//   fork    the same forks of an existing session (one `synth` wrote).
//   turn    after a restart: a --message-tokens user message on a session
//           whose pages are only on T2; time to first token through the
//           client (request sent -> first token received) and the daemon's
//           own, the prompt tokens it prefilled, and where the pages were;
//           then the same message once more with the KV now in T0 (the
//           compute part of the first figure).
//
// Messages are built with the model's tokenizer (loaded here, before any
// timing), so their token counts are exact.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "mnemo/client.h"
#include "model/engine.h"
#include "tiering/layout.h"

namespace mnemo::bench {

int CmdResume(int argc, char** argv);

namespace {

using client::Client;
using nlohmann::json;


[[noreturn]] void Die(const std::string& msg) { DieAs("mnemo-bench resume", msg); }
[[noreturn]] void Die(const Status& s) { Die(s.ToString()); }

struct ResumeOptions {
  std::string phase;
  std::string socket;
  std::string model = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string session = "resume";
  uint32_t history_tokens = 8192;
  uint32_t message_tokens = 32;
  uint32_t max_tokens = 4;
  uint32_t forks = 0;
  uint32_t prefill_reps = 1;
  bool json = false;
};

ResumeOptions ParseOptions(int argc, char** argv) {
  ResumeOptions o;
  if (argc < 1) Die("give a phase: create, fork or turn");
  o.phase = argv[0];
  auto num = [&](int& i, const std::string& flag) -> uint32_t {
    if (i + 1 >= argc) Die(flag + " needs a value");
    char* end = nullptr;
    const long v = std::strtol(argv[++i], &end, 10);
    if (end == argv[i] || *end != '\0' || v < 0) Die(flag + " expects a count, got '" + argv[i] + "'");
    return static_cast<uint32_t>(v);
  };
  auto str = [&](int& i, const std::string& flag) -> std::string {
    if (i + 1 >= argc) Die(flag + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--socket") {
      o.socket = str(i, a);
    } else if (a == "--model") {
      o.model = str(i, a);
    } else if (a == "--session") {
      o.session = str(i, a);
    } else if (a == "--history-tokens") {
      o.history_tokens = num(i, a);
    } else if (a == "--message-tokens") {
      o.message_tokens = num(i, a);
    } else if (a == "--max-tokens") {
      o.max_tokens = num(i, a);
    } else if (a == "--forks") {
      o.forks = num(i, a);
    } else if (a == "--prefill-reps") {
      o.prefill_reps = num(i, a);
    } else if (a == "--json") {
      o.json = true;
    } else {
      Die("unknown option " + a);
    }
  }
  if (o.phase != "create" && o.phase != "fork" && o.phase != "turn") Die("unknown phase '" + o.phase + "'");
  if (o.max_tokens == 0) Die("--max-tokens must be > 0");
  return o;
}

const char* kText =
    "The history of computing is a story of ideas that took decades to mature. Early machines filled rooms and "
    "consumed enormous amounts of power, yet they could only perform a few thousand operations per second. "
    "Engineers learned to build memory from magnetic cores, then from transistors, and finally from integrated "
    "circuits that packed billions of switches onto a sliver of silicon. Storage followed a similar path: punched "
    "cards gave way to magnetic tape, tape to spinning disks, and disks to flash memory that answers in "
    "microseconds. Each step changed which problems were worth solving. ";

// Tokenizer-exact message texts.
class Texts {
 public:
  explicit Texts(const std::string& model_path) {
    model::EngineOptions eo;
    eo.model_path = model_path;
    eo.threads = 1;
    eo.kv_budget_bytes = size_t{1} << 20;
    auto e = model::Engine::Open(eo);
    if (!e.ok()) Die(e.status().WithContext("loading " + model_path));
    engine_ = std::move(e).value();
    words_ = engine_->tokenizer().Encode(kText, false, false);
  }
  model::Engine& engine() const { return *engine_; }

  // A message whose content is `n` text tokens, starting `offset` tokens
  // into the text (repeated as needed).
  std::string Content(size_t n, size_t offset) const {
    std::vector<int32_t> ids;
    for (size_t i = 0; i < n; ++i) ids.push_back(words_[(offset + i) % words_.size()]);
    return engine_->tokenizer().Decode(ids, false);
  }
  // Tokens of a first chat turn with this user message.
  size_t FirstTurnTokens(const std::string& content) const {
    auto t = engine_->TokenizeChat(content);
    if (!t.ok()) Die(t.status());
    return t->size();
  }
  // The longest content whose first chat turn has at most `target` tokens.
  std::string FirstTurnOf(size_t target) const {
    const size_t overhead = FirstTurnTokens("");
    if (target <= overhead + 1) Die("--history-tokens is too small for a chat turn");
    size_t n = target - overhead;
    std::string c = Content(n, 0);
    // Decoding and re-encoding a token run can merge a token or two at the
    // seams: shrink until it fits.
    while (n > 1 && FirstTurnTokens(c) > target) c = Content(--n, 0);
    return c;
  }

 private:
  std::unique_ptr<model::Engine> engine_;
  std::vector<int32_t> words_;
};

Client ConnectOrDie(const std::string& socket) {
  client::ConnectOptions co;
  co.socket_path = socket;
  co.client_name = "mnemo-bench-resume";
  auto c = Client::Connect(co);
  if (!c.ok()) Die(c.status().WithContext("connecting to mnemod"));
  return std::move(c).value();
}

// One generation, timed from the request leaving to the first token (or,
// when the first token ends the turn, to Done).
struct Timed {
  double client_ttft_ms = 0;
  bool first_was_token = false;
  std::string text;
  client::Done done;
};

Result<Timed> TryRunTimed(Client& c, const client::GenerateRequest& req) {
  Timed t;
  const double t0 = Now();
  auto stream = c.StartGenerate(req);
  if (!stream.ok()) return stream.status();
  for (;;) {
    auto ev = stream->Next();
    if (!ev.ok()) return ev.status();  // the daemon names the session
    if (auto* chunk = std::get_if<client::TokenChunk>(&*ev)) {
      if (!t.first_was_token && t.client_ttft_ms == 0) {
        t.client_ttft_ms = (Now() - t0) * 1e3;
        t.first_was_token = true;
      }
      t.text += chunk->text;
    } else if (auto* done = std::get_if<client::Done>(&*ev)) {
      if (t.client_ttft_ms == 0) t.client_ttft_ms = (Now() - t0) * 1e3;
      t.done = *done;
      return t;
    }
  }
}

Timed RunTimed(Client& c, const client::GenerateRequest& req) {
  Result<Timed> t = TryRunTimed(c, req);
  if (!t.ok()) Die(t.status());
  return std::move(t).value();
}

json DoneJson(const Timed& t) {
  return json{{"client_ttft_ms", t.client_ttft_ms},
              {"first_event_was_token", t.first_was_token},
              {"server_ttft_ms", t.done.ttft_ms},
              {"prompt_tokens", t.done.prompt_tokens},
              {"generated_tokens", t.done.generated_tokens},
              {"finish_reason", std::string(client::FinishReasonName(t.done.finish_reason))},
              {"persisted", t.done.persisted},
              {"persist_error", t.done.persist_error}};
}

json InfoJson(const client::SessionInfo& s, int32_t n_layers) {
  // Bytes a resume reads from T2: every layer page padded to the direct
  // I/O alignment, as BlockLayout stores it.
  const uint64_t page_bytes = s.kv_pages ? s.kv_bytes / s.kv_pages : 0;
  const uint64_t stride = tiering::AlignUp(page_bytes, tiering::kDirectIoAlignment);
  return json{{"name", s.name},
              {"tokens", s.tokens},
              {"turns", s.turns},
              {"kv_pages", s.kv_pages},
              {"kv_bytes", s.kv_bytes},
              {"t0_pages", s.t0_pages},
              {"t1_pages", s.t1_pages},
              {"t2_pages", s.t2_pages},
              {"persisted", s.persisted},
              {"t2_read_bytes", static_cast<uint64_t>(s.t2_pages) * stride},
              {"block_bytes", static_cast<uint64_t>(n_layers) * stride}};
}

client::GenerateRequest Chat(const std::string& session, std::vector<client::ChatMessage> msgs,
                             uint32_t max_tokens) {
  client::GenerateRequest g;
  g.session = session;
  g.messages = std::move(msgs);
  g.max_tokens = max_tokens;
  g.sampling.temperature = 0;
  return g;
}

// The new message of every resume turn.
std::string NewMessage(const Texts& t, const ResumeOptions& o) { return t.Content(o.message_tokens, 7); }

json Forks(Client& c, const ResumeOptions& o) {
  json names = json::array();
  for (uint32_t i = 1; i <= o.forks; ++i) {
    const std::string name = o.session + "-" + std::to_string(i);
    auto f = c.ForkSession(o.session, name);
    if (!f.ok()) Die(f.status().WithContext("forking " + o.session));
    names.push_back(name);
  }
  return names;
}

int Create(const ResumeOptions& o, bool real_turn) {
  Texts texts(o.model);
  const int32_t n_layers = texts.engine().model().config().n_layers;
  Client c = ConnectOrDie(o.socket);
  json out{{"phase", o.phase}, {"session", o.session}};
  std::string first_content;
  if (real_turn) {
    // The first turn's prompt plus its reply make up the history.
    first_content = texts.FirstTurnOf(o.history_tokens - o.max_tokens);
    auto s = c.CreateSession(o.session);
    if (!s.ok()) Die(s.status());
    const Timed first = RunTimed(c, Chat(o.session, {{"user", first_content}}, o.max_tokens));
    out["first_turn"] = DoneJson(first);
    if (!first.done.persisted) Die("the first turn was not persisted: " + first.done.persist_error);
    // (a) Re-prefilling: a fresh session given the same history and the
    // new message at once.
    json runs = json::array();
    for (uint32_t r = 0; r < o.prefill_reps; ++r) {
      const std::string name = o.session + "-prefill-" + std::to_string(r);
      if (auto p = c.CreateSession(name); !p.ok()) Die(p.status());
      const Timed t = RunTimed(c, Chat(name,
                                       {{"user", first_content},
                                        {"assistant", first.text},
                                        {"user", NewMessage(texts, o)}},
                                       1));
      runs.push_back(DoneJson(t));
      if (Status st = c.DeleteSession(name); !st.ok()) Die(st);
    }
    out["prefill"] = runs;
  }
  auto info = c.GetSession(o.session);
  if (!info.ok()) Die(info.status());
  out["history"] = InfoJson(*info, n_layers);
  out["forks"] = Forks(c, o);
  std::printf("%s\n", o.json ? out.dump().c_str() : out.dump(2).c_str());
  return 0;
}

int Turn(const ResumeOptions& o) {
  Texts texts(o.model);
  const int32_t n_layers = texts.engine().model().config().n_layers;
  const std::string message = NewMessage(texts, o);
  Client c = ConnectOrDie(o.socket);
  auto before = c.GetSession(o.session);
  if (!before.ok()) Die(before.status());
  const Result<Timed> t = TryRunTimed(c, Chat(o.session, {{"user", message}}, o.max_tokens));
  json out{{"phase", "turn"},
           {"session", o.session},
           {"message_tokens", o.message_tokens},
           {"before", InfoJson(*before, n_layers)},
           {"pages_only_on_t2", before->t0_pages == 0 && before->t1_pages == 0 && before->t2_pages > 0}};
  if (t.ok()) {
    out["turn"] = DoneJson(*t);
    auto after = c.GetSession(o.session);
    if (!after.ok()) Die(after.status());
    out["after"] = InfoJson(*after, n_layers);
    // The same message again, now that the KV is in T0: what computing the
    // message costs without any loading (splits the resume TTFT).
    const Result<Timed> warm = TryRunTimed(c, Chat(o.session, {{"user", message}}, o.max_tokens));
    if (warm.ok()) out["warm_turn"] = DoneJson(*warm);
  } else {
    // A refused resume (e.g. a session larger than the T0 budget) is a
    // result to report, with its typed code.
    out["error"] = json{{"code", std::string(StatusCodeName(t.status().code()))},
                        {"message", std::string(t.status().message())}};
  }
  std::printf("%s\n", o.json ? out.dump().c_str() : out.dump(2).c_str());
  return t.ok() ? 0 : 1;
}

}  // namespace

int CmdResume(int argc, char** argv) {
  const ResumeOptions o = ParseOptions(argc, argv);
  if (o.phase == "create") return Create(o, /*real_turn=*/true);
  if (o.phase == "fork") return Create(o, /*real_turn=*/false);
  return Turn(o);
}

}  // namespace mnemo::bench
