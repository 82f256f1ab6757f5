// mnemod's configuration: defaults, an optional TOML file (--config) and
// command-line flags, which win. One struct read by every daemon part.
//
// Immutable once parsed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "kernels/backend.h"

namespace mnemo::daemon {

struct DaemonConfig {
  // --- paths -----------------------------------------------------------------
  std::string model_path;   // --model; default: the model scripts/setup fetched
  std::string data_dir;     // --data-dir; default $STATE_DIRECTORY, else per-user
  std::string socket_path;  // --socket; default $RUNTIME_DIRECTORY/mnemod.sock, else per-user
  uint32_t socket_mode = 0660;  // --socket-mode (octal in file and flag)
  std::string config_path;  // --config (empty: none)

  // --- engine ----------------------------------------------------------------
  int threads = 0;                     // --threads; 0: all cores
  std::string math = "fast";           // --math exact|fast (kernels::MathMode)
  int32_t page_tokens = kernels::kDefaultPageTokens;  // --page-tokens
  // Whether --page-tokens (flag or config file) was given: when not, mnemod
  // keeps the page size its data directory was created with (an upgrade
  // that moved the default still opens older data).
  bool page_tokens_given = false;
  uint64_t t0_budget_bytes = 1ull << 30;   // --t0-budget (KV pages compute reads)
  uint64_t t0_reserve_bytes = 0;           // --t0-reserve (of it, backed by memory at start-up)
  uint64_t t1_budget_bytes = 4ull << 30;   // --t1-budget (host pool, tiering)
  uint64_t t2_budget_bytes = 64ull << 30;  // --t2-budget (NVMe, tiering)

  // --- scheduling ------------------------------------------------------------
  int32_t max_batch = 16;        // --max-batch: requests advanced per step
  int32_t step_tokens = 256;     // --step-tokens: token budget of a step while others decode
  int32_t prefill_chunk = 512;   // --prefill-chunk: tokens per step when only prefilling
  int32_t stream_window = 6;     // --stream-window: layer slots of a session streamed through T0; 0 off
  uint32_t default_max_tokens = 512;  // --default-max-tokens

  // --- limits (each hit is a typed error) -------------------------------------
  uint32_t max_connections = 256;       // --max-connections
  uint32_t max_frame_bytes = 1u << 20;  // --max-frame-bytes
  uint32_t max_sessions_per_uid = 256;  // --max-sessions-per-uid
  uint32_t max_context_tokens = 0;      // --max-context; 0: the model's trained context
  uint32_t max_queued_requests = 64;    // --max-queued: requests waiting for a batch slot
  uint32_t max_requests_per_connection = 64;  // --max-requests-per-connection (in flight)
  double idle_timeout_s = 600;          // --idle-timeout: a connection with nothing in flight
  double shutdown_grace_s = 10;         // --shutdown-grace: in-flight requests may finish

  // --- observability ----------------------------------------------------------
  std::string metrics_listen;  // --metrics-listen 127.0.0.1:PORT (empty: off)
  std::string log_level = "info";  // --log-level trace|debug|info|warn|error
};

struct ParsedArgs {
  DaemonConfig config;
  // --help / --version: the text was printed to stdout; exit with exit_code.
  bool exit_now = false;
  int exit_code = 0;
};

// Parses argv (and the --config file it names). InvalidArgument naming the
// flag or key for an unknown option, a malformed value or a value out of
// range; NotFound / IOError when the config file cannot be read.
Result<ParsedArgs> ParseDaemonArgs(int argc, const char* const* argv);

// "512M", "4G", "1.5GiB", "1024" (bytes), "64k" -> bytes. Binary units.
Result<uint64_t> ParseByteSize(std::string_view text);

// Default paths for the environment this process runs in (systemd's
// RUNTIME_DIRECTORY / STATE_DIRECTORY, XDG variables, uid).
std::string DefaultSocketPath();
std::string DefaultDataDir();
std::string DefaultModelPath();

}  // namespace mnemo::daemon
