// mnemo: the command-line client of mnemod (chat, one-shot generation,
// session management, export and import, stats and health) over
// mnemo/client.h.
//
// Exit status: 0 on success, 1 with "mnemo: <Code>: message" on stderr when a
// call fails, 2 for bad usage, 130 after Ctrl-C ended a generation.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "mnemo/client.h"

namespace mnemo::cli {
namespace {

using client::Client;
using client::Done;
using client::GenerateRequest;
using client::GenerateStream;
using client::SessionInfo;
using nlohmann::json;

constexpr int kExitError = 1;
constexpr int kExitInterrupted = 130;

int Fail(const Status& status) {
  std::fprintf(stderr, "mnemo: %s\n", status.ToString().c_str());
  return kExitError;
}

void PrintJson(const json& j) { std::printf("%s\n", j.dump().c_str()); }

// ------------------------------------------------------------------ Ctrl-C
// SIGINT writes a byte to a pipe; a watcher thread turns it into a Cancel of
// the generation in progress, so the connection never dies mid-frame. With
// no generation in progress (or at the second Ctrl-C) the process exits.

int g_signal_pipe[2] = {-1, -1};
std::mutex g_active_mu;
GenerateStream* g_active = nullptr;  // guarded by g_active_mu
bool g_cancel_sent = false;          // guarded by g_active_mu

void OnSigint(int) {
  const char byte = 1;
  const ssize_t n = ::write(g_signal_pipe[1], &byte, 1);
  (void)n;
}

void WatchSigint() {
  char byte;
  for (;;) {
    const ssize_t n = ::read(g_signal_pipe[0], &byte, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    std::lock_guard<std::mutex> lock(g_active_mu);
    if (g_active != nullptr && !g_cancel_sent) {
      g_cancel_sent = true;
      (void)g_active->Cancel();
      continue;
    }
    const char nl = '\n';
    (void)!::write(STDERR_FILENO, &nl, 1);
    ::_exit(kExitInterrupted);
  }
}

void InstallSigintHandler() {
  if (::pipe2(g_signal_pipe, O_CLOEXEC) != 0) return;  // Ctrl-C then simply kills
  struct sigaction sa {};
  sa.sa_handler = OnSigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &sa, nullptr);
  std::thread(WatchSigint).detach();
}

// Makes `stream` the one Ctrl-C cancels while in scope.
class ActiveStream {
 public:
  explicit ActiveStream(GenerateStream* stream) {
    std::lock_guard<std::mutex> lock(g_active_mu);
    g_active = stream;
    g_cancel_sent = false;
  }
  ~ActiveStream() {
    std::lock_guard<std::mutex> lock(g_active_mu);
    g_active = nullptr;
  }
  bool interrupted() const {
    std::lock_guard<std::mutex> lock(g_active_mu);
    return g_cancel_sent;
  }
};

// -------------------------------------------------------------- progress

// A one-line prefill progress bar on stderr, only when it is a terminal.
class ProgressBar {
 public:
  ProgressBar() : enabled_(::isatty(STDERR_FILENO) == 1) {}
  ~ProgressBar() { Clear(); }

  void Draw(const client::PrefillProgress& p) {
    if (!enabled_ || p.total == 0) return;
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(static_cast<uint64_t>(p.processed) * kWidth / p.total);
    std::string bar(filled, '#');
    bar.append(kWidth - filled, '.');
    std::fprintf(stderr, "\r\033[Kprefill [%s] %u/%u tokens", bar.c_str(), p.processed, p.total);
    std::fflush(stderr);
    shown_ = true;
  }
  void Clear() {
    if (!shown_) return;
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
    shown_ = false;
  }

 private:
  const bool enabled_;
  bool shown_ = false;
};

// ------------------------------------------------------------- formatting

std::string FormatBytes(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", v, kUnits[u]);
  return buf;
}

std::string FormatAgo(uint64_t unix_ms) {
  if (unix_ms == 0) return "-";
  const auto now_ms = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
  const uint64_t s = now_ms > unix_ms ? (now_ms - unix_ms) / 1000 : 0;
  if (s < 60) return std::to_string(s) + "s ago";
  if (s < 3600) return std::to_string(s / 60) + "m ago";
  if (s < 86400) return std::to_string(s / 3600) + "h ago";
  return std::to_string(s / 86400) + "d ago";
}

std::string FormatTime(uint64_t unix_ms) {
  if (unix_ms == 0) return "-";
  const std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  ::localtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

json SessionJson(const SessionInfo& s) {
  return {{"name", s.name},         {"parent", s.parent},
          {"tokens", s.tokens},     {"turns", s.turns},
          {"kv_pages", s.kv_pages}, {"kv_bytes", s.kv_bytes},
          {"created_unix_ms", s.created_unix_ms}, {"last_used_unix_ms", s.last_used_unix_ms},
          {"persisted", s.persisted},
          {"pages", {{"t0", s.t0_pages}, {"t1", s.t1_pages}, {"t2", s.t2_pages}}}};
}

json DoneJson(const client::GenerateResult& r) {
  return {{"text", r.text},
          {"token_ids", r.token_ids},
          {"finish_reason", client::FinishReasonName(r.done.finish_reason)},
          {"prompt_tokens", r.done.prompt_tokens},
          {"generated_tokens", r.done.generated_tokens},
          {"ttft_ms", r.done.ttft_ms},
          {"decode_tokens_per_s", r.done.decode_tokens_per_s},
          {"persisted", r.done.persisted},
          {"persist_error", r.done.persist_error_code == StatusCode::kOk
                                ? json(nullptr)
                                : json{{"code", std::string(StatusCodeName(r.done.persist_error_code))},
                                       {"message", r.done.persist_error}}}};
}

// ---------------------------------------------------------------- options

struct GlobalOptions {
  std::string socket;
  bool json = false;
};

struct GenOptions {
  float temperature = 0;
  float top_p = 0;
  int32_t top_k = 0;
  float min_p = 0;
  float repeat_penalty = 0;
  uint64_t seed = 0;
  uint32_t max_tokens = 0;
  std::vector<std::string> stop;
  bool raw = false;
  // Set when the flag was given: unset fields take the daemon's defaults.
  CLI::Option* temperature_opt = nullptr;
  CLI::Option* top_p_opt = nullptr;
  CLI::Option* top_k_opt = nullptr;
  CLI::Option* min_p_opt = nullptr;
  CLI::Option* repeat_penalty_opt = nullptr;
  CLI::Option* seed_opt = nullptr;
};

void AddGenFlags(CLI::App* cmd, GenOptions* o) {
  o->temperature_opt = cmd->add_option("--temperature", o->temperature, "sampling temperature; 0 = greedy");
  o->top_p_opt = cmd->add_option("--top-p", o->top_p, "nucleus sampling threshold [0, 1]");
  o->top_k_opt = cmd->add_option("--top-k", o->top_k, "keep the K most likely tokens; 0 = off");
  o->min_p_opt = cmd->add_option("--min-p", o->min_p, "drop tokens below MIN_P x the top probability");
  o->repeat_penalty_opt = cmd->add_option("--repeat-penalty", o->repeat_penalty, "penalty for repeated tokens");
  o->seed_opt = cmd->add_option("--seed", o->seed, "sampling seed (default: drawn by mnemod)");
  cmd->add_option("--max-tokens", o->max_tokens, "most tokens to generate (default: mnemod's)");
  cmd->add_option("--stop", o->stop, "stop string; repeatable")->take_all();
  cmd->add_flag("--raw", o->raw, "send the text verbatim instead of as a user chat message");
}

GenerateRequest MakeRequest(const std::string& session, const std::string& text, const GenOptions& o) {
  GenerateRequest req;
  req.session = session;
  if (o.raw) {
    req.text = text;
  } else {
    req.messages = {{"user", text}};
  }
  if (o.temperature_opt->count() > 0) req.sampling.temperature = o.temperature;
  if (o.top_p_opt->count() > 0) req.sampling.top_p = o.top_p;
  if (o.top_k_opt->count() > 0) req.sampling.top_k = o.top_k;
  if (o.min_p_opt->count() > 0) req.sampling.min_p = o.min_p;
  if (o.repeat_penalty_opt->count() > 0) req.sampling.repeat_penalty = o.repeat_penalty;
  if (o.seed_opt->count() > 0) req.sampling.seed = o.seed;
  req.max_tokens = o.max_tokens;
  req.stop = o.stop;
  return req;
}

Result<Client> ConnectTo(const GlobalOptions& g) {
  client::ConnectOptions options;
  options.socket_path = g.socket;
  options.client_name = "mnemo-cli";
  return Client::Connect(options);
}

// The named session, created when it does not exist yet.
Result<SessionInfo> OpenSession(Client& c, const std::string& name) {
  auto info = c.GetSession(name);
  if (info.ok() || info.status().code() != StatusCode::kNotFound) return info;
  auto created = c.CreateSession(name);
  if (created.ok() || created.status().code() != StatusCode::kAlreadyExists) return created;
  return c.GetSession(name);  // created meanwhile by another client
}

// One turn: streams the reply to stdout (unless `quiet`), the prefill
// progress to a terminal's stderr. A Ctrl-C cancels it; *interrupted says so.
Result<client::GenerateResult> RunTurn(Client& c, const GenerateRequest& req, bool quiet, bool* interrupted) {
  MNEMO_ASSIGN_OR_RETURN(GenerateStream stream, c.StartGenerate(req));
  ActiveStream active(&stream);
  ProgressBar bar;
  client::GenerateResult out;
  for (;;) {
    auto event = stream.Next();
    *interrupted = active.interrupted();
    if (!event.ok()) {
      if (*interrupted && event.status().code() == StatusCode::kCancelled) {
        out.done.finish_reason = client::FinishReason::kCancelled;
        return out;
      }
      return event.status();
    }
    if (auto* chunk = std::get_if<client::TokenChunk>(&event.value())) {
      bar.Clear();
      if (!quiet) {
        std::fwrite(chunk->text.data(), 1, chunk->text.size(), stdout);
        std::fflush(stdout);
      }
      out.text += chunk->text;
      out.token_ids.insert(out.token_ids.end(), chunk->token_ids.begin(), chunk->token_ids.end());
    } else if (auto* progress = std::get_if<client::PrefillProgress>(&event.value())) {
      bar.Draw(*progress);
    } else {
      out.done = std::get<Done>(event.value());
      return out;
    }
  }
}

void NoteFinish(const Done& done) {
  if (done.finish_reason == client::FinishReason::kContextFull) {
    std::fprintf(stderr, "mnemo: the session's context is full\n");
  } else if (done.finish_reason == client::FinishReason::kError) {
    std::fprintf(stderr, "mnemo: generation ended with an error\n");
  }
  if (done.persist_error_code != StatusCode::kOk)
    std::fprintf(stderr, "mnemo: warning: %s\n", done.persist_error.c_str());
}

// --------------------------------------------------------------- commands

int CmdGen(const GlobalOptions& g, const std::string& session, const std::vector<std::string>& words,
           const GenOptions& o) {
  std::string text;
  for (const auto& w : words) {
    if (!text.empty()) text += ' ';
    text += w;
  }
  const GenerateRequest req = MakeRequest(session, text, o);
  if (Status s = protocol::ValidateGenerate(req); !s.ok()) return Fail(s);
  auto c = ConnectTo(g);
  if (!c.ok()) return Fail(c.status());
  if (auto info = OpenSession(*c, session); !info.ok()) return Fail(info.status());
  InstallSigintHandler();
  bool interrupted = false;
  auto r = RunTurn(*c, req, /*quiet=*/g.json, &interrupted);
  if (!r.ok()) {
    if (!g.json) std::printf("\n");
    return Fail(r.status());
  }
  if (g.json) {
    PrintJson(DoneJson(*r));
  } else {
    std::printf("\n");
  }
  NoteFinish(r->done);
  if (interrupted) return kExitInterrupted;
  return r->done.finish_reason == client::FinishReason::kError ? kExitError : 0;
}

// Reads one chat input: a line; lines ending in '\' continue it; a line
// `"""` opens a block that the next `"""` line closes. False at EOF or /exit.
bool ReadInput(bool interactive, std::string* out) {
  out->clear();
  bool block = false;
  bool more = false;
  std::string line;
  for (;;) {
    if (interactive) {
      std::fputs(block || more ? "... " : "> ", stdout);
      std::fflush(stdout);
    }
    if (!std::getline(std::cin, line)) return block || more ? !out->empty() : false;
    if (line == "\"\"\"") {
      if (block) return true;
      if (!more && out->empty()) {
        block = true;
        continue;
      }
    }
    if (!block && !more && (line == "/exit" || line == "/quit")) return false;
    if (!block && !line.empty() && line.back() == '\\') {
      line.pop_back();
      *out += line;
      *out += '\n';
      more = true;
      continue;
    }
    *out += line;
    if (block) {
      *out += '\n';
      continue;
    }
    return true;
  }
}

int CmdChat(const GlobalOptions& g, const std::string& session_arg, const GenOptions& o) {
  auto c = ConnectTo(g);
  if (!c.ok()) return Fail(c.status());
  auto info = session_arg.empty() ? c->CreateSession() : OpenSession(*c, session_arg);
  if (!info.ok()) return Fail(info.status());
  const std::string session = info->name;
  const bool interactive = ::isatty(STDIN_FILENO) == 1;
  if (interactive) {
    std::fprintf(stderr, "mnemo: session %s (%u tokens) on %s, model %s, context %u tokens; /exit or Ctrl-D ends\n",
                 session.c_str(), info->tokens, c->socket_path().c_str(), c->hello().model_name.c_str(),
                 c->hello().context_limit);
  } else if (session_arg.empty() && !g.json) {
    std::fprintf(stderr, "mnemo: session %s\n", session.c_str());
  }
  InstallSigintHandler();
  std::string text;
  while (ReadInput(interactive, &text)) {
    if (text.find_first_not_of(" \t\n") == std::string::npos) continue;
    if (!c->connected()) {
      // mnemod closes idle connections (--idle-timeout): the session lives on.
      auto again = ConnectTo(g);
      if (!again.ok()) return Fail(again.status());
      *c = std::move(again).value();
    }
    const GenerateRequest req = MakeRequest(session, text, o);
    bool interrupted = false;
    auto r = RunTurn(*c, req, /*quiet=*/g.json, &interrupted);
    if (!r.ok()) {
      if (!g.json) std::printf("\n");
      Fail(r.status());
      if (!c->connected()) return kExitError;
      continue;  // e.g. an invalid flag value or a full context: the next turn may work
    }
    if (g.json) {
      json j = DoneJson(*r);
      j["session"] = session;
      PrintJson(j);
    } else {
      std::printf("\n");
    }
    std::fflush(stdout);
    NoteFinish(r->done);
  }
  return 0;
}

int CmdSessions(const GlobalOptions& g) {
  auto c = ConnectTo(g);
  if (!c.ok()) return Fail(c.status());
  auto list = c->ListSessions();
  if (!list.ok()) return Fail(list.status());
  if (g.json) {
    json arr = json::array();
    for (const auto& s : *list) arr.push_back(SessionJson(s));
    PrintJson(arr);
    return 0;
  }
  std::printf("%-32s %8s %6s %10s %9s %10s  %s\n", "NAME", "TOKENS", "TURNS", "KV", "PERSISTED", "LAST USED",
              "PARENT");
  for (const auto& s : *list) {
    std::printf("%-32s %8u %6u %10s %9s %10s  %s\n", s.name.c_str(), s.tokens, s.turns, FormatBytes(s.kv_bytes).c_str(),
                s.persisted ? "yes" : "no", FormatAgo(s.last_used_unix_ms).c_str(),
                s.parent.empty() ? "-" : s.parent.c_str());
  }
  return 0;
}

void PrintSession(const SessionInfo& s) {
  std::printf("name:       %s\n", s.name.c_str());
  std::printf("parent:     %s\n", s.parent.empty() ? "-" : s.parent.c_str());
  std::printf("tokens:     %u\n", s.tokens);
  std::printf("turns:      %u\n", s.turns);
  std::printf("kv pages:   %u (%s)\n", s.kv_pages, FormatBytes(s.kv_bytes).c_str());
  std::printf("created:    %s\n", FormatTime(s.created_unix_ms).c_str());
  std::printf("last used:  %s (%s)\n", FormatTime(s.last_used_unix_ms).c_str(), FormatAgo(s.last_used_unix_ms).c_str());
  std::printf("persisted:  %s\n", s.persisted ? "yes" : "no");
  std::printf("pages:      T0 %u (compute pool), T1 %u (host cache), T2 %u (NVMe)\n", s.t0_pages, s.t1_pages,
              s.t2_pages);
}

int CmdShow(const GlobalOptions& g, const std::string& session) {
  auto c = ConnectTo(g);
  if (!c.ok()) return Fail(c.status());
  auto info = c->GetSession(session);
  if (!info.ok()) return Fail(info.status());
  if (g.json) {
    PrintJson(SessionJson(*info));
  } else {
    PrintSession(*info);
  }
  return 0;
}

int CmdFork(const GlobalOptions& g, const std::string& src, const std::string& dst) {
  auto c = ConnectTo(g);
  if (!c.ok()) return Fail(c.status());
  auto info = c->ForkSession(src, dst);
  if (!info.ok()) return Fail(info.status());
  if (g.json) {
    PrintJson(SessionJson(*info));
  } else {
    std::printf("%s: forked from %s (%u tokens)\n", info->name.c_str(), src.c_str(), info->tokens);
  }
  return 0;
}

int CmdRm(const GlobalOptions& g, const std::string& session) {
  auto c = ConnectTo(g);
  if (!c.ok()) return Fail(c.status());
  if (Status s = c->DeleteSession(session); !s.ok()) return Fail(s);
  if (g.json) PrintJson({{"deleted", session}});
  return 0;
}

// `mnemo export SESSION FILE`: FILE is written as FILE.tmp and renamed once
// complete and synced; "-" writes the file to stdout.
int CmdExport(const GlobalOptions& g, const std::string& session, const std::string& file) {
  auto c = ConnectTo(g);
  if (!c.ok()) return Fail(c.status());
  if (file == "-" && g.json) return Fail(Status::InvalidArgument("--json and FILE '-' both use stdout"));
  auto to_stdout = [&]() -> Result<client::ExportDone> {
    MNEMO_ASSIGN_OR_RETURN(client::ExportDone d, c->ExportSession(session, [](std::string_view piece) -> Status {
      if (std::fwrite(piece.data(), 1, piece.size(), stdout) != piece.size())
        return Status::IOError("writing the export to stdout failed");
      return Status::Ok();
    }));
    if (std::fflush(stdout) != 0) return Status::IOError("writing the export to stdout failed");
    return d;
  };
  Result<client::ExportDone> done = file == "-" ? to_stdout() : c->ExportSessionToFile(session, file);
  if (!done.ok()) return Fail(done.status());
  char sum[17];
  std::snprintf(sum, sizeof(sum), "%016" PRIx64, done->checksum);
  if (g.json) {
    PrintJson({{"session", session}, {"file", file}, {"bytes", done->bytes}, {"xxh3", sum}});
  } else if (file != "-") {
    std::printf("%s: exported to %s (%s, xxh3 %s)\n", session.c_str(), file.c_str(), FormatBytes(done->bytes).c_str(),
                sum);
  }
  return 0;
}

// `mnemo import FILE [--name NAME]`; "-" reads stdin.
int CmdImport(const GlobalOptions& g, const std::string& file, const std::string& name) {
  auto c = ConnectTo(g);
  if (!c.ok()) return Fail(c.status());
  auto info = c->ImportSessionFromFile(file, name.empty() ? std::nullopt : std::optional<std::string>(name));
  if (!info.ok()) return Fail(info.status());
  if (g.json) {
    PrintJson(SessionJson(*info));
  } else {
    std::printf("%s: imported from %s (%u tokens, %u turns)\n", info->name.c_str(), file.c_str(), info->tokens,
                info->turns);
  }
  return 0;
}

int CmdStats(const GlobalOptions& g, bool prometheus) {
  auto c = ConnectTo(g);
  if (!c.ok()) return Fail(c.status());
  auto st = c->Stats(prometheus);
  if (!st.ok()) return Fail(st.status());
  if (g.json) {
    json tiers = json::array();
    for (const auto& t : st->tiers) {
      json io = json::array();
      for (const auto& h : t.io_latency) {
        io.push_back({{"op", h.op},
                      {"count", h.count},
                      {"sum_s", h.sum_s},
                      {"max_s", h.max_s},
                      {"p50_s", h.QuantileS(0.50)},
                      {"p99_s", h.QuantileS(0.99)},
                      {"bucket_bounds_s", h.bucket_bounds_s},
                      {"bucket_counts", h.bucket_counts}});
      }
      tiers.push_back({{"tier", t.tier},
                       {"pages", t.pages},
                       {"bytes", t.bytes},
                       {"budget_bytes", t.budget_bytes},
                       {"hits", t.hits},
                       {"misses", t.misses},
                       {"bytes_read", t.bytes_read},
                       {"bytes_written", t.bytes_written},
                       {"io_latency", io},
                       {"prefetch_hits", t.prefetch_hits},
                       {"prefetch_stalls", t.prefetch_stalls},
                       {"prefetch_stall_s", t.prefetch_stall_s}});
    }
    json errors = json::object();
    for (const auto& [code, count] : st->errors) errors[std::string(StatusCodeName(code))] = count;
    auto transfer = [](const protocol::TransferCounts& t) {
      json failed = json::object();
      for (const auto& [code, count] : t.failed) failed[std::string(StatusCodeName(code))] = count;
      return json{{"started", t.started}, {"completed", t.completed}, {"failed", failed}, {"bytes", t.bytes}};
    };
    json j = {{"requests_running", st->requests_running},
              {"requests_waiting", st->requests_waiting},
              {"connections", st->connections},
              {"sessions", st->sessions},
              {"prompt_tokens_total", st->prompt_tokens_total},
              {"generated_tokens_total", st->generated_tokens_total},
              {"ttft_ms_p50", st->ttft_ms_p50},
              {"ttft_ms_p99", st->ttft_ms_p99},
              {"inter_token_ms_p50", st->inter_token_ms_p50},
              {"inter_token_ms_p99", st->inter_token_ms_p99},
              {"uptime_s", st->uptime_s},
              {"tiers", tiers},
              {"errors", errors},
              {"exports", transfer(st->exports)},
              {"imports", transfer(st->imports)}};
    if (prometheus) j["prometheus_text"] = st->prometheus_text;
    PrintJson(j);
    return 0;
  }
  if (prometheus) {
    std::fwrite(st->prometheus_text.data(), 1, st->prometheus_text.size(), stdout);
    return 0;
  }
  std::printf("uptime:            %.1f s\n", st->uptime_s);
  std::printf("connections:       %u\n", st->connections);
  std::printf("sessions:          %u\n", st->sessions);
  std::printf("requests:          %u running, %u waiting\n", st->requests_running, st->requests_waiting);
  std::printf("tokens:            %" PRIu64 " prompt, %" PRIu64 " generated\n", st->prompt_tokens_total,
              st->generated_tokens_total);
  std::printf("ttft:              p50 %.1f ms, p99 %.1f ms\n", st->ttft_ms_p50, st->ttft_ms_p99);
  std::printf("inter-token:       p50 %.1f ms, p99 %.1f ms\n", st->inter_token_ms_p50, st->inter_token_ms_p99);
  for (const auto& t : st->tiers) {
    std::printf("tier %-4s          %" PRIu64 " pages, %s of %s\n", t.tier.c_str(), t.pages,
                FormatBytes(t.bytes).c_str(), FormatBytes(t.budget_bytes).c_str());
    if (t.hits + t.misses > 0)
      std::printf("  lookups          %" PRIu64 " hits, %" PRIu64 " misses (%s)\n", t.hits, t.misses,
                  t.tier == "T0" ? "requests" : "blocks");
    if (t.bytes_read + t.bytes_written > 0)
      std::printf("  moved            %s read, %s written\n", FormatBytes(t.bytes_read).c_str(),
                  FormatBytes(t.bytes_written).c_str());
    for (const auto& h : t.io_latency) {
      if (h.count == 0) continue;
      std::printf("  %-5s            %" PRIu64 " ops, p50 <= %.3f ms, p99 <= %.3f ms, max %.3f ms\n", h.op.c_str(),
                  h.count, h.QuantileS(0.50) * 1e3, h.QuantileS(0.99) * 1e3, h.max_s * 1e3);
    }
    if (t.prefetch_hits + t.prefetch_stalls > 0)
      std::printf("  prefetch         %" PRIu64 " pages ready, %" PRIu64 " waited for (%.1f ms stalled)\n",
                  t.prefetch_hits, t.prefetch_stalls, t.prefetch_stall_s * 1e3);
  }
  // exports: 3 started, 2 completed, 1 failed (1 Cancelled), 9.2 MiB sent
  const std::pair<const char*, const protocol::TransferCounts*> transfers[] = {{"exports", &st->exports},
                                                                               {"imports", &st->imports}};
  for (const auto& [name, t] : transfers) {
    if (t->started == 0) continue;
    uint64_t failed = 0;
    std::string codes;
    for (const auto& [code, count] : t->failed) {
      failed += count;
      codes += (codes.empty() ? "" : ", ") + std::to_string(count) + " " + std::string(StatusCodeName(code));
    }
    std::printf("%-18s %" PRIu64 " started, %" PRIu64 " completed, %" PRIu64 " failed%s, %s %s\n", name,
                t->started, t->completed, failed, codes.empty() ? "" : (" (" + codes + ")").c_str(),
                FormatBytes(t->bytes).c_str(), t == &st->exports ? "sent" : "received");
  }
  for (const auto& [code, count] : st->errors) {
    std::printf("errors %-18s %" PRIu64 "\n", std::string(StatusCodeName(code)).c_str(), count);
  }
  return 0;
}

// Exit 0 only when mnemod is serving with its model loaded, so scripts can
// wait on it.
int CmdHealth(const GlobalOptions& g) {
  auto c = ConnectTo(g);
  if (!c.ok()) return Fail(c.status());
  auto h = c->Health();
  if (!h.ok()) return Fail(h.status());
  const bool healthy = h->status == client::HealthStatus::kServing && h->model_loaded;
  if (g.json) {
    PrintJson({{"status", client::HealthStatusName(h->status)},
               {"model_loaded", h->model_loaded},
               {"uptime_s", h->uptime_s},
               {"message", h->message},
               {"daemon_version", c->hello().daemon_version},
               {"model", c->hello().model_name},
               {"context_limit", c->hello().context_limit},
               {"math", c->hello().math}});
  } else {
    const std::string math = c->hello().math.empty() ? "" : " (--math " + c->hello().math + ")";
    std::printf("%s: %s, model %s%s%s, up %.1f s%s%s\n", c->socket_path().c_str(),
                std::string(client::HealthStatusName(h->status)).c_str(), c->hello().model_name.c_str(),
                h->model_loaded ? " loaded" : " not loaded", math.c_str(), h->uptime_s,
                h->message.empty() ? "" : ": ", h->message.c_str());
  }
  if (healthy) return 0;
  if (!g.json) {
    std::fprintf(stderr, "mnemo: Unavailable: mnemod is %s%s\n", std::string(client::HealthStatusName(h->status)).c_str(),
                 h->model_loaded ? "" : " without a model");
  }
  return kExitError;
}

int Main(int argc, char** argv) {
  CLI::App app{"mnemo: talk to mnemod, the long-context memory daemon"};
  app.require_subcommand(1);
  app.fallthrough();  // global flags also after the command
  GlobalOptions g;
  app.add_option("--socket", g.socket, "mnemod's socket (default: " + client::DefaultSocketPath() + ")");
  app.add_flag("--json", g.json, "print results as JSON");

  GenOptions chat_opts;
  std::string chat_session;
  auto* chat = app.add_subcommand("chat", "interactive chat on a session (created when missing)");
  chat->add_option("SESSION", chat_session, "session name (default: a new session)");
  AddGenFlags(chat, &chat_opts);

  GenOptions gen_opts;
  std::string gen_session;
  std::vector<std::string> gen_words;
  auto* gen = app.add_subcommand("gen", "one turn on a session (created when missing), streamed to stdout");
  gen->add_option("SESSION", gen_session, "session name")->required();
  gen->add_option("TEXT", gen_words, "the message")->required();
  AddGenFlags(gen, &gen_opts);

  auto* sessions = app.add_subcommand("sessions", "list sessions");
  std::string show_session;
  auto* show = app.add_subcommand("show", "describe a session");
  show->add_option("SESSION", show_session)->required();
  std::string fork_src, fork_dst;
  auto* fork = app.add_subcommand("fork", "fork SRC into a new session DST sharing its history");
  fork->add_option("SRC", fork_src)->required();
  fork->add_option("DST", fork_dst)->required();
  std::string rm_session;
  auto* rm = app.add_subcommand("rm", "delete a session");
  rm->add_option("SESSION", rm_session)->required();
  std::string export_session, export_file;
  auto* exp = app.add_subcommand("export", "write a session (history and KV) to one checksummed FILE");
  exp->footer("`mnemo import FILE` reads it on any mnemod with the same model file and --page-tokens. "
              "The session's latest turn must be persisted; mnemod needs --t2-budget > 0.");
  exp->add_option("SESSION", export_session)->required();
  exp->add_option("FILE", export_file, "written as FILE.tmp, renamed when complete; '-': stdout")->required();
  std::string import_file, import_name;
  auto* imp = app.add_subcommand("import", "create a session from a FILE written by `mnemo export`");
  imp->footer("The whole file is verified (checksums, model, KV layout) before the session is created; "
              "it continues without recomputing its history. mnemod needs --t2-budget > 0.");
  imp->add_option("FILE", import_file, "'-': stdin")->required();
  imp->add_option("--name", import_name, "name of the new session (default: the exported session's)");
  bool prometheus = false;
  auto* stats = app.add_subcommand("stats", "daemon statistics");
  stats->add_flag("--prometheus", prometheus, "Prometheus text exposition");
  auto* health = app.add_subcommand("health", "is mnemod serving? (exit 0 when it is)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // --help is a ParseError too
  }
  if (*chat) return CmdChat(g, chat_session, chat_opts);
  if (*gen) return CmdGen(g, gen_session, gen_words, gen_opts);
  if (*sessions) return CmdSessions(g);
  if (*show) return CmdShow(g, show_session);
  if (*fork) return CmdFork(g, fork_src, fork_dst);
  if (*rm) return CmdRm(g, rm_session);
  if (*exp) return CmdExport(g, export_session, export_file);
  if (*imp) return CmdImport(g, import_file, import_name);
  if (*stats) return CmdStats(g, prometheus);
  if (*health) return CmdHealth(g);
  return 2;
}

}  // namespace
}  // namespace mnemo::cli

int main(int argc, char** argv) {
  try {
    return mnemo::cli::Main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mnemo: Internal: %s\n", e.what());
    return 1;
  }
}
