// mnemod: loads the model, binds the socket (or takes systemd's), serves
// until SIGTERM/SIGINT, then drains and exits 0.
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <utility>  // Boost 1.74's Asio needs std::exchange declared first

#include <boost/asio.hpp>
#include <cstdio>
#include <filesystem>
#include <thread>

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "daemon/config.h"
#include "daemon/metrics.h"
#include "daemon/scheduler.h"
#include "daemon/server.h"
#include "daemon/setup.h"
#include "daemon/systemd.h"
#include "model/engine.h"
#include "tiering/tier_manager.h"

namespace mnemo::daemon {
namespace {

// "<6>" etc.: journald reads the syslog priority from the line prefix.
class SyslogPriorityFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    static constexpr const char* kPrio[] = {"<7>", "<7>", "<6>", "<4>", "<3>", "<2>", "<6>"};
    const char* p = kPrio[static_cast<int>(msg.level)];
    dest.append(p, p + 3);
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<SyslogPriorityFlag>();
  }
};

void SetUpLogging(const std::string& level) {
  auto logger = spdlog::stderr_logger_mt("mnemod");
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  if (getenv("JOURNAL_STREAM")) {
    // journald timestamps each line itself.
    formatter->add_flag<SyslogPriorityFlag>('*').set_pattern("%*%v");
  } else {
    formatter->set_pattern("%Y-%m-%dT%H:%M:%S.%e %l %v");
  }
  logger->set_formatter(std::move(formatter));
  logger->set_level(spdlog::level::from_str(level));
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

int Fail(const Status& s) {
  spdlog::critical("{}", s.ToString());
  systemd::NotifyStatus("failed: " + s.ToString());
  return 1;
}

int Run(int argc, char** argv) {
  Result<ParsedArgs> parsed = ParseDaemonArgs(argc, argv);
  if (!parsed.ok()) {
    fprintf(stderr, "mnemod: %s\n", parsed.status().ToString().c_str());
    return 2;
  }
  if (parsed->exit_now) return parsed->exit_code;
  DaemonConfig& cfg = parsed->config;
  SetUpLogging(cfg.log_level);
  ::signal(SIGPIPE, SIG_IGN);

  // Signals are handled by the io thread: block them before any thread
  // starts so none of the worker threads takes them.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);

  Result<std::vector<int>> activated = systemd::ListenFds();
  if (!activated.ok()) return Fail(activated.status());
  if (activated->size() > 1) return Fail(Status::InvalidArgument("systemd passed more than one socket"));

  Result<int> lock = LockDataDir(cfg.data_dir);
  if (!lock.ok()) return Fail(lock.status());
  if (Status s = AdoptDataDirPageTokens(cfg); !s.ok()) return Fail(s);

  systemd::NotifyStatus("loading model " + cfg.model_path);
  spdlog::info("mnemod {} loading {}", MNEMO_VERSION, cfg.model_path);
  const model::EngineOptions eo = EngineOptionsFor(cfg);
  Result<std::unique_ptr<model::Engine>> engine = model::Engine::Open(eo);
  if (!engine.ok()) return Fail(engine.status().WithContext("loading " + cfg.model_path));
  const model::LlamaConfig& mc = (*engine)->model().config();
  spdlog::info("model '{}' ({}, {} layers), context {} tokens, KV budget {} MiB in {}-token pages", mc.name,
               mc.arch, mc.n_layers, (*engine)->max_context(), cfg.t0_budget_bytes >> 20, cfg.page_tokens);
  const kernels::MathMode math = (*engine)->backend().math_mode();
  if (math != eo.math) {
    spdlog::warn("--math {}: this CPU lacks AVX-512 VNNI; computing with --math {}",
                 kernels::MathModeName(eo.math), kernels::MathModeName(math));
  } else {
    spdlog::info("{} compute threads, --math {}", (*engine)->backend().threads(), kernels::MathModeName(math));
  }

  Metrics metrics;
  if (!cfg.metrics_listen.empty()) {
    if (Status s = metrics.Serve(cfg.metrics_listen); !s.ok()) return Fail(s);
    spdlog::info("metrics on http://{}/metrics", cfg.metrics_listen);
  }

  // Durable sessions: T2 pages and the index in the data directory.
  std::unique_ptr<tiering::TierManager> tier;
  if (cfg.t2_budget_bytes > 0) {
    systemd::NotifyStatus("opening session storage in " + cfg.data_dir);
    const tiering::TierOptions to = TierOptionsFor(cfg, **engine);
    Result<std::unique_ptr<tiering::TierManager>> t = tiering::TierManager::Open(to);
    if (!t.ok()) return Fail(t.status().WithContext("opening session storage in " + cfg.data_dir));
    tier = std::move(t).value();
  } else {
    spdlog::warn("--t2-budget 0: sessions live in memory only and are lost at exit");
  }

  SchedulerOptions so;
  so.tier = tier.get();
  so.max_batch = cfg.max_batch;
  so.step_tokens = cfg.step_tokens;
  so.prefill_chunk = cfg.prefill_chunk;
  so.max_stream_window = cfg.stream_window;
  so.default_max_tokens = cfg.default_max_tokens;
  so.max_queued = cfg.max_queued_requests;
  so.max_sessions_per_uid = cfg.max_sessions_per_uid;
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  Scheduler scheduler(engine->get(), so, &metrics);
  if (Status s = scheduler.Recover(); !s.ok()) return Fail(s.WithContext("recovering sessions"));
  scheduler.Start();

  boost::asio::io_context io(1);
  ServerOptions sopt;
  sopt.socket_path = cfg.socket_path;
  sopt.socket_mode = cfg.socket_mode;
  sopt.max_connections = cfg.max_connections;
  sopt.max_frame_bytes = cfg.max_frame_bytes;
  sopt.max_requests_per_connection = cfg.max_requests_per_connection;
  sopt.idle_timeout = std::chrono::milliseconds(static_cast<int64_t>(cfg.idle_timeout_s * 1000));
  sopt.tier = tier.get();
  sopt.daemon_version = MNEMO_VERSION;
  sopt.model_name = mc.name;
  sopt.context_limit = static_cast<uint32_t>((*engine)->max_context());
  sopt.math = std::string(kernels::MathModeName(math));
  Server server(io, sopt, &scheduler, &metrics);
  if (!activated->empty()) {
    if (Status s = server.Adopt(activated->front()); !s.ok()) return Fail(s);
    spdlog::info("serving on the socket passed by systemd");
  } else {
    if (Status s = server.Listen(); !s.ok()) return Fail(s);
    spdlog::info("serving on {}", cfg.socket_path);
  }
  server.StartAccepting();

  boost::asio::signal_set signals(io, SIGTERM, SIGINT);
  pthread_sigmask(SIG_UNBLOCK, &sigs, nullptr);
  boost::asio::steady_timer watchdog(io);
  const std::optional<std::chrono::microseconds> wd = systemd::WatchdogInterval();
  bool stopping = false;
  std::thread drainer;
  std::function<void()> ping = [&] {
    if (stopping || !wd) return;
    // A scheduler stuck in one step for several intervals is not healthy:
    // stop pinging and let systemd restart us.
    if (std::chrono::steady_clock::now() - scheduler.last_heartbeat() < std::max(*wd * 4, std::chrono::microseconds(60'000'000)))
      systemd::NotifyWatchdog();
    watchdog.expires_after(*wd);
    watchdog.async_wait([&](const boost::system::error_code& ec) {
      if (!ec) ping();
    });
  };
  ping();

  std::function<void(const boost::system::error_code&, int)> on_signal =
      [&](const boost::system::error_code& ec, int sig) {
        if (ec) return;
        if (stopping) {
          spdlog::warn("second signal: ending in-flight requests now");
          scheduler.Shutdown(std::chrono::milliseconds(0));
          return;
        }
        stopping = true;
        spdlog::info("signal {}: shutting down (grace {} s)", sig, cfg.shutdown_grace_s);
        systemd::NotifyStopping("draining");
        server.set_draining();
        server.StopAccepting();
        watchdog.cancel();
        signals.async_wait(on_signal);
        drainer = std::thread([&] {
          scheduler.Shutdown(std::chrono::milliseconds(static_cast<int64_t>(cfg.shutdown_grace_s * 1000)));
          boost::asio::post(io, [&] {
            server.CloseAll();
            signals.cancel();
          });
        });
      };
  signals.async_wait(on_signal);

  systemd::NotifyReady("serving " + mc.name + (activated->empty() ? " on " + cfg.socket_path : std::string()));
  io.run();
  if (drainer.joinable()) drainer.join();
  spdlog::info("mnemod stopped");
  return 0;
}

}  // namespace
}  // namespace mnemo::daemon

int main(int argc, char** argv) { return mnemo::daemon::Run(argc, argv); }
