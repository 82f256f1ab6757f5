// mnemod's options: one table of option specs drives the CLI11 flags, the
// TOML keys, the help text and the range checks, so the three cannot drift.
#include "daemon/config.h"

#include <sys/un.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <variant>

#include "daemon/metrics.h"
#include "protocol/framing.h"

#ifndef MNEMO_VERSION
#define MNEMO_VERSION "unknown"
#endif
#ifndef MNEMO_DEFAULT_MODEL
#define MNEMO_DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#endif

namespace mnemo::daemon {
namespace {

// A config file larger than this is surely not one.
constexpr size_t kMaxConfigFileBytes = 1u << 20;

// ----------------------------------------------------------- value parsers

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool IEquals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

std::string Quote(std::string_view s) { return "'" + std::string(s) + "'"; }

Result<int64_t> ParseInteger(std::string_view text) {
  std::string_view t = Trim(text);
  int64_t v = 0;
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
  if (t.empty() || ec == std::errc::invalid_argument || end != t.data() + t.size()) {
    return Status::InvalidArgument(Quote(text) + " is not an integer");
  }
  if (ec == std::errc::result_out_of_range) return Status::InvalidArgument(Quote(text) + " is out of range");
  return v;
}

// Seconds: "10", "1.5", "250ms", "10s", "5m", "1h".
Result<double> ParseSeconds(std::string_view text) {
  std::string_view t = Trim(text);
  double v = 0;
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), v, std::chars_format::fixed);
  if (t.empty() || ec != std::errc() || !std::isfinite(v)) {
    return Status::InvalidArgument(Quote(text) + " is not a duration (e.g. 10, 1.5s, 250ms, 5m, 1h)");
  }
  std::string_view unit = Trim(std::string_view(end, t.data() + t.size() - end));
  double scale = 0;
  if (unit.empty() || IEquals(unit, "s")) {
    scale = 1;
  } else if (IEquals(unit, "ms")) {
    scale = 1e-3;
  } else if (IEquals(unit, "m") || IEquals(unit, "min")) {
    scale = 60;
  } else if (IEquals(unit, "h")) {
    scale = 3600;
  } else {
    return Status::InvalidArgument(Quote(text) + " is not a duration (e.g. 10, 1.5s, 250ms, 5m, 1h)");
  }
  return v * scale;
}

// File modes: octal digits, at most 0777.
Result<uint64_t> ParseMode(std::string_view text) {
  std::string_view t = Trim(text);
  if (t.size() > 2 && t[0] == '0' && (t[1] == 'o' || t[1] == 'O')) t.remove_prefix(2);
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), v, 8);
  if (t.empty() || ec != std::errc() || end != t.data() + t.size()) {
    return Status::InvalidArgument(Quote(text) + " is not an octal file mode (e.g. 0660)");
  }
  return v;
}

std::string FormatBytes(uint64_t b) {
  static constexpr std::pair<uint64_t, const char*> kUnits[] = {
      {1ull << 40, "T"}, {1ull << 30, "G"}, {1ull << 20, "M"}, {1ull << 10, "K"}};
  for (auto [scale, suffix] : kUnits) {
    if (b != 0 && b % scale == 0) return std::to_string(b / scale) + suffix;
  }
  return std::to_string(b);
}

std::string FormatSeconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%gs", s);
  return buf;
}

std::string FormatMode(uint64_t m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0%03llo", static_cast<unsigned long long>(m));
  return buf;
}

// ------------------------------------------------------------ option table

enum class Kind {
  kPath,      // non-empty string
  kSocket,    // non-empty, fits sockaddr_un
  kInteger,   // decimal integer in [min, max]
  kSize,      // ParseByteSize, in [min, max]
  kMode,      // octal, in [min, max]
  kSeconds,   // ParseSeconds, in [min_s, max_s]
  kLogLevel,  // one of kLogLevels
  kMath,      // kernels::ParseMathMode
  kListen,    // empty or HOST:PORT
};

constexpr std::string_view kLogLevels[] = {"trace", "debug", "info", "warn", "error"};

using Field = std::variant<std::string DaemonConfig::*, int32_t DaemonConfig::*, uint32_t DaemonConfig::*,
                           uint64_t DaemonConfig::*, double DaemonConfig::*>;

struct OptionSpec {
  const char* name;   // the flag without "--"; the TOML key with '-' or '_'
  const char* group;  // the help section and the optional TOML table
  Kind kind;
  Field field;
  int64_t min = 0;  // integer, size and mode kinds (sizes never exceed int64 here)
  int64_t max = 0;
  double min_s = 0;  // seconds kind
  double max_s = 0;
  const char* help = "";
};

constexpr int64_t kMaxSize = std::numeric_limits<int64_t>::max();

// Ranges: wide enough for any real host, narrow enough that a typo (an
// extra zero, a negative number) is caught here rather than as an
// allocation failure later.
const std::vector<OptionSpec>& Specs() {
  // clang-format off
  static const std::vector<OptionSpec> kSpecs = {
      {.name = "model", .group = "paths", .kind = Kind::kPath, .field = &DaemonConfig::model_path,
       .help = "GGUF model file ($MNEMO_MODEL overrides the built-in default)"},
      {.name = "data-dir", .group = "paths", .kind = Kind::kPath, .field = &DaemonConfig::data_dir,
       .help = "State directory: persisted sessions and KV pages"},
      {.name = "socket", .group = "paths", .kind = Kind::kSocket, .field = &DaemonConfig::socket_path,
       .help = "Unix socket clients connect to (ignored under socket activation)"},
      {.name = "socket-mode", .group = "paths", .kind = Kind::kMode, .field = &DaemonConfig::socket_mode,
       .min = 0, .max = 0777, .help = "Permissions of the socket file, octal"},

      {.name = "threads", .group = "engine", .kind = Kind::kInteger, .field = &DaemonConfig::threads,
       .min = 0, .max = 1024, .help = "Compute threads; 0: one per core"},
      {.name = "math", .group = "engine", .kind = Kind::kMath, .field = &DaemonConfig::math,
       .help = "Arithmetic: exact (llama.cpp's rounding, bit for bit) or fast (Q4_0/Q4_1/Q8_0 blocks summed "
               "exactly and rounded once, attention accumulated in f32: steps 1.3-2x faster on AVX-512 VNNI, "
               "last bits differ from llama.cpp; deterministic, the same alone or batched)"},
      {.name = "page-tokens", .group = "engine", .kind = Kind::kInteger, .field = &DaemonConfig::page_tokens,
       .min = 1, .max = 256, .help = "Tokens per KV page"},
      {.name = "t0-budget", .group = "engine", .kind = Kind::kSize, .field = &DaemonConfig::t0_budget_bytes,
       .min = 1, .max = kMaxSize, .help = "Bytes of KV pages the compute backend reads (T0)"},
      {.name = "t0-reserve", .group = "engine", .kind = Kind::kSize, .field = &DaemonConfig::t0_reserve_bytes,
       .min = 0, .max = kMaxSize,
       .help = "Bytes of the T0 budget allocated and faulted in at start-up, before READY (no page faults "
               "when a session's pages first land there; start-up fails if the host cannot back them); 0: "
               "lazily"},
      {.name = "t1-budget", .group = "engine", .kind = Kind::kSize, .field = &DaemonConfig::t1_budget_bytes,
       .min = 0, .max = kMaxSize, .help = "Bytes of the host page pool (T1); 0: tier off"},
      {.name = "t2-budget", .group = "engine", .kind = Kind::kSize, .field = &DaemonConfig::t2_budget_bytes,
       .min = 0, .max = kMaxSize, .help = "Bytes of NVMe page storage (T2); 0: tier off"},

      {.name = "max-batch", .group = "scheduling", .kind = Kind::kInteger, .field = &DaemonConfig::max_batch,
       .min = 1, .max = 256, .help = "Requests advanced together in one step"},
      {.name = "step-tokens", .group = "scheduling", .kind = Kind::kInteger,
       .field = &DaemonConfig::step_tokens, .min = 1, .max = 65536,
       .help = "Token budget of a step while others decode; >= max-batch"},
      {.name = "prefill-chunk", .group = "scheduling", .kind = Kind::kInteger,
       .field = &DaemonConfig::prefill_chunk, .min = 1, .max = 65536,
       .help = "Tokens per step when only prefilling"},
      {.name = "stream-window", .group = "scheduling", .kind = Kind::kInteger,
       .field = &DaemonConfig::stream_window, .min = 0, .max = 1024,
       .help = "Most layer slots a session larger than T0 streams through; 0 refuses such sessions"},
      {.name = "default-max-tokens", .group = "scheduling", .kind = Kind::kInteger,
       .field = &DaemonConfig::default_max_tokens, .min = 1, .max = 1 << 20,
       .help = "Generation limit of a request that sets none"},

      {.name = "max-connections", .group = "limits", .kind = Kind::kInteger,
       .field = &DaemonConfig::max_connections, .min = 1, .max = 65536, .help = "Open client connections"},
      {.name = "max-frame-bytes", .group = "limits", .kind = Kind::kSize,
       .field = &DaemonConfig::max_frame_bytes, .min = 4096, .max = protocol::kMaxFrameBytesCeiling,
       .help = "Largest protocol frame accepted or sent"},
      {.name = "max-sessions-per-uid", .group = "limits", .kind = Kind::kInteger,
       .field = &DaemonConfig::max_sessions_per_uid, .min = 1, .max = 1 << 20,
       .help = "Sessions one client uid may hold"},
      {.name = "max-context", .group = "limits", .kind = Kind::kInteger,
       .field = &DaemonConfig::max_context_tokens, .min = 0, .max = 1 << 24,
       .help = "Tokens per session; 0: the model's trained context"},
      {.name = "max-queued", .group = "limits", .kind = Kind::kInteger,
       .field = &DaemonConfig::max_queued_requests, .min = 0, .max = 65536,
       .help = "Requests waiting for a batch slot; more are refused"},
      {.name = "max-requests-per-connection", .group = "limits", .kind = Kind::kInteger,
       .field = &DaemonConfig::max_requests_per_connection, .min = 1, .max = 4096,
       .help = "Requests in flight on one connection"},
      {.name = "idle-timeout", .group = "limits", .kind = Kind::kSeconds, .field = &DaemonConfig::idle_timeout_s,
       .min_s = 0.001, .max_s = 7 * 86400.0, .help = "Close a connection with nothing in flight after this"},
      {.name = "shutdown-grace", .group = "limits", .kind = Kind::kSeconds,
       .field = &DaemonConfig::shutdown_grace_s, .min_s = 0, .max_s = 3600,
       .help = "On SIGTERM, how long in-flight requests may finish"},

      {.name = "metrics-listen", .group = "observability", .kind = Kind::kListen,
       .field = &DaemonConfig::metrics_listen, .help = "Serve Prometheus /metrics on HOST:PORT; empty: off"},
      {.name = "log-level", .group = "observability", .kind = Kind::kLogLevel,
       .field = &DaemonConfig::log_level, .help = "trace, debug, info, warn or error"},
  };
  // clang-format on
  return kSpecs;
}

constexpr const char* kGroups[] = {"paths", "engine", "scheduling", "limits", "observability"};

const char* TypeName(Kind kind) {
  switch (kind) {
    case Kind::kPath:
    case Kind::kSocket:
      return "PATH";
    case Kind::kInteger:
      return "INT";
    case Kind::kSize:
      return "SIZE";
    case Kind::kMode:
      return "MODE";
    case Kind::kSeconds:
      return "DURATION";
    case Kind::kLogLevel:
      return "LEVEL";
    case Kind::kMath:
      return "MODE";
    case Kind::kListen:
      return "HOST:PORT";
  }
  return "VALUE";
}

// Stores an already range-checked integer into whichever integer field.
void StoreInteger(const OptionSpec& spec, DaemonConfig& c, int64_t v) {
  std::visit(
      [&](auto member) {
        using T = std::remove_reference_t<decltype(c.*member)>;
        if constexpr (std::is_integral_v<T>) {
          c.*member = static_cast<T>(v);
        } else {
          MNEMO_CHECK_MSG(false, "integer option bound to a non-integer field");
        }
      },
      spec.field);
}

void StoreString(const OptionSpec& spec, DaemonConfig& c, std::string v) {
  auto* member = std::get_if<std::string DaemonConfig::*>(&spec.field);
  MNEMO_CHECK(member != nullptr);
  c.** member = std::move(v);
}

std::string Show(const OptionSpec& spec, const DaemonConfig& c) {
  return std::visit(
      [&](auto member) -> std::string {
        const auto& v = c.*member;
        using T = std::remove_cvref_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>) {
          return v.empty() ? "\"\"" : v;
        } else if constexpr (std::is_same_v<T, double>) {
          return FormatSeconds(v);
        } else {
          if (spec.kind == Kind::kSize) return FormatBytes(v);
          if (spec.kind == Kind::kMode) return FormatMode(v);
          return std::to_string(v);
        }
      },
      spec.field);
}

Status CheckRange(const OptionSpec& spec, int64_t v, std::string_view shown) {
  if (v < spec.min || v > spec.max) {
    std::string range = spec.kind == Kind::kSize   ? FormatBytes(spec.min) + ".." + FormatBytes(spec.max)
                        : spec.kind == Kind::kMode ? FormatMode(spec.min) + ".." + FormatMode(spec.max)
                                                   : std::to_string(spec.min) + ".." + std::to_string(spec.max);
    return Status::InvalidArgument(std::string(shown) + " is out of range " + range);
  }
  return Status::Ok();
}

Status ApplyInteger(const OptionSpec& spec, DaemonConfig& c, int64_t v) {
  MNEMO_RETURN_IF_ERROR(CheckRange(spec, v, std::to_string(v)));
  StoreInteger(spec, c, v);
  if (std::string_view(spec.name) == "page-tokens") c.page_tokens_given = true;
  return Status::Ok();
}

Status ApplySeconds(const OptionSpec& spec, DaemonConfig& c, double s) {
  if (!std::isfinite(s) || s < spec.min_s || s > spec.max_s) {
    return Status::InvalidArgument(FormatSeconds(s) + " is out of range " + FormatSeconds(spec.min_s) + ".." +
                                   FormatSeconds(spec.max_s));
  }
  c.*std::get<double DaemonConfig::*>(spec.field) = s;
  return Status::Ok();
}

// A value given as text: a flag's argument or a TOML string.
Status ApplyText(const OptionSpec& spec, DaemonConfig& c, std::string_view text) {
  switch (spec.kind) {
    case Kind::kPath:
      if (text.empty()) return Status::InvalidArgument("must not be empty");
      StoreString(spec, c, std::string(text));
      return Status::Ok();
    case Kind::kSocket:
      if (text.empty()) return Status::InvalidArgument("must not be empty");
      if (text.size() >= sizeof(sockaddr_un::sun_path)) {
        return Status::InvalidArgument(Quote(text) + " is longer than a Unix socket path may be (" +
                                       std::to_string(sizeof(sockaddr_un::sun_path) - 1) + " bytes)");
      }
      StoreString(spec, c, std::string(text));
      return Status::Ok();
    case Kind::kInteger: {
      MNEMO_ASSIGN_OR_RETURN(int64_t v, ParseInteger(text));
      return ApplyInteger(spec, c, v);
    }
    case Kind::kSize: {
      MNEMO_ASSIGN_OR_RETURN(uint64_t v, ParseByteSize(text));
      if (v > static_cast<uint64_t>(kMaxSize)) return Status::InvalidArgument(Quote(text) + " is too large");
      MNEMO_RETURN_IF_ERROR(CheckRange(spec, static_cast<int64_t>(v), Quote(text)));
      StoreInteger(spec, c, static_cast<int64_t>(v));
      return Status::Ok();
    }
    case Kind::kMode: {
      MNEMO_ASSIGN_OR_RETURN(uint64_t v, ParseMode(text));
      if (v > static_cast<uint64_t>(spec.max)) {
        return Status::InvalidArgument(Quote(text) + " is out of range " + FormatMode(spec.min) + ".." +
                                       FormatMode(spec.max));
      }
      StoreInteger(spec, c, static_cast<int64_t>(v));
      return Status::Ok();
    }
    case Kind::kSeconds: {
      MNEMO_ASSIGN_OR_RETURN(double s, ParseSeconds(text));
      return ApplySeconds(spec, c, s);
    }
    case Kind::kLogLevel:
      for (std::string_view level : kLogLevels) {
        if (text == level) {
          StoreString(spec, c, std::string(text));
          return Status::Ok();
        }
      }
      return Status::InvalidArgument(Quote(text) + " is not one of trace, debug, info, warn, error");
    case Kind::kMath:
      if (!kernels::ParseMathMode(text)) {
        return Status::InvalidArgument(Quote(text) + " is not one of exact, fast");
      }
      StoreString(spec, c, std::string(text));
      return Status::Ok();
    case Kind::kListen:
      if (!text.empty()) MNEMO_RETURN_IF_ERROR(ValidateListenAddress(text));
      StoreString(spec, c, std::string(text));
      return Status::Ok();
  }
  return Status::Internal("unhandled option kind");
}

// A value from the TOML file: strings parse like flags; integers are taken
// as they are (so `socket_mode = 0o660` and `t0_budget = 1073741824` work);
// floats only where fractions make sense.
Status ApplyToml(const OptionSpec& spec, DaemonConfig& c, const toml::node& node) {
  if (const auto* s = node.as_string()) return ApplyText(spec, c, s->get());
  const bool numeric = spec.kind == Kind::kInteger || spec.kind == Kind::kSize || spec.kind == Kind::kMode ||
                       spec.kind == Kind::kSeconds;
  if (const auto* i = node.as_integer(); i != nullptr && numeric) {
    const int64_t v = i->get();
    if (spec.kind == Kind::kSeconds) return ApplySeconds(spec, c, static_cast<double>(v));
    if (spec.kind == Kind::kMode && (v < 0 || v > spec.max)) {
      return Status::InvalidArgument(std::to_string(v) +
                                     " is out of range 0..0777 (write the mode as 0o660 or \"0660\")");
    }
    return ApplyInteger(spec, c, v);
  }
  if (const auto* f = node.as_floating_point(); f != nullptr && spec.kind == Kind::kSeconds) {
    return ApplySeconds(spec, c, f->get());
  }
  return Status::InvalidArgument(numeric ? "must be a number or a string" : "must be a string");
}

const OptionSpec* FindSpec(std::string_view key) {
  std::string flag(key);
  std::replace(flag.begin(), flag.end(), '_', '-');
  for (const auto& spec : Specs()) {
    if (flag == spec.name) return &spec;
  }
  return nullptr;
}

Result<std::string> ReadConfigFile(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    const int err = errno;
    std::string m = "config file " + path + ": " + std::strerror(err);
    if (err == ENOENT) return Status::NotFound(std::move(m));
    if (err == EACCES) return Status::PermissionDenied(std::move(m));
    return Status::IOError(std::move(m));
  }
  std::string text;
  char buf[8192];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) {
    text.append(buf, n);
    if (text.size() > kMaxConfigFileBytes) {
      std::fclose(f);
      return Status::InvalidArgument("config file " + path + ": larger than " + FormatBytes(kMaxConfigFileBytes));
    }
  }
  const bool failed = std::ferror(f) != 0;
  const int err = errno;
  std::fclose(f);
  if (failed) return Status::FromErrno("config file " + path, err);
  return text;
}

// Applies the file's keys: top-level, or inside a table named after the
// option's group ([limits] max_batch would be an error: it is scheduling).
Status ApplyConfigFile(const std::string& path, DaemonConfig& c) {
  MNEMO_ASSIGN_OR_RETURN(std::string text, ReadConfigFile(path));
  toml::table root;
  try {
    root = toml::parse(text, path);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    return Status::InvalidArgument("config file " + path + ":" + std::to_string(where.line) + ":" +
                                   std::to_string(where.column) + ": " + std::string(e.description()));
  }
  std::map<const OptionSpec*, std::string> seen;  // spec -> key as written
  auto apply_key = [&](const std::string& key, const toml::node& node, const char* table) -> Status {
    const std::string shown = table ? std::string(table) + "." + key : key;
    auto fail = [&](std::string m) {
      return Status::InvalidArgument("config file " + path + ": key '" + shown + "': " + m);
    };
    const OptionSpec* spec = FindSpec(key);
    if (spec == nullptr) {
      if (key == "config") return fail("a config file cannot name another");
      return fail("unknown option");
    }
    if (table != nullptr && std::strcmp(table, spec->group) != 0) {
      return fail(std::string("belongs in [") + spec->group + "] or at the top level");
    }
    if (auto [it, inserted] = seen.emplace(spec, shown); !inserted) {
      return fail("set twice (also as '" + it->second + "')");
    }
    Status st = ApplyToml(*spec, c, node);
    if (!st.ok()) return fail(std::string(st.message()));
    return Status::Ok();
  };
  for (const auto& [k, node] : root) {
    const std::string key(k.str());
    if (const auto* table = node.as_table()) {
      const char* group = nullptr;
      for (const char* g : kGroups) {
        if (key == g) group = g;
      }
      if (group == nullptr) {
        return Status::InvalidArgument("config file " + path + ": unknown table [" + key + "]");
      }
      for (const auto& [k2, node2] : *table) {
        MNEMO_RETURN_IF_ERROR(apply_key(std::string(k2.str()), node2, group));
      }
      continue;
    }
    MNEMO_RETURN_IF_ERROR(apply_key(key, node, nullptr));
  }
  return Status::Ok();
}

// Checks that involve more than one option.
Status CheckConsistency(const DaemonConfig& c) {
  if (c.step_tokens < c.max_batch) {
    return Status::InvalidArgument("--step-tokens: " + std::to_string(c.step_tokens) + " is below --max-batch (" +
                                   std::to_string(c.max_batch) +
                                   "): a step must fit one token of every batched request");
  }
  return Status::Ok();
}

// First entry of a colon-separated list ($RUNTIME_DIRECTORY may hold
// several); empty when unset or empty.
std::string FirstPath(const char* var) {
  const char* v = std::getenv(var);
  if (v == nullptr) return {};
  std::string_view s(v);
  return std::string(s.substr(0, s.find(':')));
}

// XDG base directories must be absolute; relative ones are ignored.
std::string XdgDir(const char* var) {
  const char* v = std::getenv(var);
  return v != nullptr && v[0] == '/' ? std::string(v) : std::string();
}

}  // namespace

Result<uint64_t> ParseByteSize(std::string_view text) {
  auto bad = [&] {
    return Status::InvalidArgument(Quote(text) + " is not a byte size (e.g. 65536, 64k, 512M, 4G, 1.5GiB)");
  };
  std::string_view t = Trim(text);
  if (!t.empty() && t.front() == '-') return Status::InvalidArgument(Quote(text) + " is negative");
  size_t i = 0;
  uint64_t whole = 0;
  size_t whole_digits = 0;
  for (; i < t.size() && t[i] >= '0' && t[i] <= '9'; ++i, ++whole_digits) {
    if (__builtin_mul_overflow(whole, 10, &whole) || __builtin_add_overflow(whole, uint64_t(t[i] - '0'), &whole)) {
      return Status::InvalidArgument(Quote(text) + " is too large");
    }
  }
  uint64_t frac = 0, frac_scale = 1;
  size_t frac_digits = 0;
  if (i < t.size() && t[i] == '.') {
    for (++i; i < t.size() && t[i] >= '0' && t[i] <= '9'; ++i, ++frac_digits) {
      if (frac_digits == 18) return bad();  // more precision than any byte count needs
      frac = frac * 10 + uint64_t(t[i] - '0');
      frac_scale *= 10;
    }
    if (frac_digits == 0) return bad();
  }
  if (whole_digits == 0) return bad();
  std::string_view unit = Trim(t.substr(i));
  // K, KB, KiB (any case) all mean 1024: binary units throughout.
  int shift = -1;
  if (unit.empty() || IEquals(unit, "b")) {
    shift = 0;
  } else {
    static constexpr std::pair<char, int> kPrefixes[] = {{'k', 10}, {'m', 20}, {'g', 30}, {'t', 40}, {'p', 50}};
    const char p = static_cast<char>(std::tolower(static_cast<unsigned char>(unit[0])));
    std::string_view rest = unit.substr(1);
    if (rest.empty() || IEquals(rest, "b") || IEquals(rest, "ib")) {
      for (auto [prefix, s] : kPrefixes) {
        if (p == prefix) shift = s;
      }
    }
  }
  if (shift < 0) return bad();
  if (shift == 0 && frac != 0) return Status::InvalidArgument(Quote(text) + " is not a whole number of bytes");
  const uint64_t mult = uint64_t{1} << shift;
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(whole, mult, &bytes)) return Status::InvalidArgument(Quote(text) + " is too large");
  // The fraction rounds down to whole bytes.
  const auto frac_bytes = static_cast<uint64_t>((static_cast<unsigned __int128>(frac) * mult) / frac_scale);
  if (__builtin_add_overflow(bytes, frac_bytes, &bytes)) return Status::InvalidArgument(Quote(text) + " is too large");
  return bytes;
}

std::string DefaultSocketPath() {
  if (std::string dir = FirstPath("RUNTIME_DIRECTORY"); !dir.empty()) return dir + "/mnemod.sock";
  if (std::string dir = XdgDir("XDG_RUNTIME_DIR"); !dir.empty()) return dir + "/mnemo/mnemod.sock";
  const uid_t uid = getuid();
  if (uid == 0) return "/run/mnemo/mnemod.sock";
  return "/tmp/mnemo-" + std::to_string(uid) + "/mnemod.sock";
}

std::string DefaultDataDir() {
  if (std::string dir = FirstPath("STATE_DIRECTORY"); !dir.empty()) return dir;
  if (std::string dir = XdgDir("XDG_DATA_HOME"); !dir.empty()) return dir + "/mnemo";
  const uid_t uid = getuid();
  if (uid == 0) return "/var/lib/mnemo";
  if (const char* home = std::getenv("HOME"); home != nullptr && home[0] == '/') {
    return std::string(home) + "/.local/share/mnemo";
  }
  // No home: a per-user directory that at least does not collide.
  return "/tmp/mnemo-" + std::to_string(uid) + "/data";
}

std::string DefaultModelPath() {
  if (const char* m = std::getenv("MNEMO_MODEL"); m != nullptr && m[0] != '\0') return m;
  return MNEMO_DEFAULT_MODEL;
}

Result<ParsedArgs> ParseDaemonArgs(int argc, const char* const* argv) {
  ParsedArgs out;
  DaemonConfig& config = out.config;
  config.model_path = DefaultModelPath();
  config.data_dir = DefaultDataDir();
  config.socket_path = DefaultSocketPath();

  CLI::App app("mnemod " MNEMO_VERSION
               " - serves LLM text generation and keeps agents' KV sessions, over a Unix socket.",
               "mnemod");
  app.footer(
      "Precedence: flags, then the --config file, then the defaults shown.\n"
      "The config file (TOML) takes the same names without dashes (max_batch = 16 or\n"
      "max-batch = 16), at the top level or in the table of the option's section\n"
      "([paths], [engine], [scheduling], [limits], [observability]).\n"
      "SIZE: bytes, or with a binary unit: 64k, 512M, 4G, 1.5GiB. DURATION: seconds,\n"
      "or 250ms, 10s, 5m, 1h. See docs/operations.md.");
  app.set_version_flag("--version", std::string(MNEMO_VERSION));
  app.get_formatter()->column_width(40);

  const auto& specs = Specs();
  std::vector<std::string> raw(specs.size());
  std::vector<CLI::Option*> opts(specs.size());
  std::string config_path;
  app.add_option("--config", config_path, "TOML file with any of the options below")
      ->type_name("PATH")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  for (size_t i = 0; i < specs.size(); ++i) {
    const auto& spec = specs[i];
    std::string group(spec.group);
    group[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(group[0])));
    opts[i] = app.add_option(std::string("--") + spec.name, raw[i], spec.help)
                  ->type_name(TypeName(spec.kind))
                  ->default_str(Show(spec, config))
                  ->group(group)
                  // A later flag overrides an earlier one (drop-ins append flags).
                  ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    out.exit_now = true;
    out.exit_code = app.exit(e, std::cout, std::cerr);
    std::cout.flush();
    return out;
  } catch (const CLI::ParseError& e) {
    return Status::InvalidArgument(e.what());
  }

  if (!config_path.empty()) {
    config.config_path = config_path;
    MNEMO_RETURN_IF_ERROR(ApplyConfigFile(config_path, config));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    if (opts[i]->count() == 0) continue;
    Status st = ApplyText(specs[i], config, raw[i]);
    if (!st.ok()) return st.WithContext(std::string("--") + specs[i].name);
  }
  MNEMO_RETURN_IF_ERROR(CheckConsistency(config));
  return out;
}

}  // namespace mnemo::daemon
