// The socket side of mnemod: a Boost.Asio acceptor on a Unix stream socket
// (bound here or passed by systemd), one Connection per client that decodes
// frames, enforces the per-connection limits, answers Hello/Health/Stats and
// hands everything else to the Scheduler, whose replies it streams back by
// request id.
//
// Confined to the io_context's thread (one thread runs it); the Scheduler
// posts replies onto it.
#pragma once

#include <sys/types.h>

#include <utility>  // Boost 1.74's Asio needs std::exchange declared first

#include <boost/asio.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "common/status.h"
#include "daemon/metrics.h"
#include "daemon/scheduler.h"
#include "protocol/framing.h"
#include "protocol/messages.h"

namespace mnemo::daemon {

struct ServerOptions {
  std::string socket_path;
  uint32_t socket_mode = 0660;
  uint32_t max_connections = 256;
  uint32_t max_frame_bytes = protocol::kDefaultMaxFrameBytes;
  uint32_t max_requests_per_connection = 64;
  std::chrono::milliseconds idle_timeout{600'000};
  // Output queued for a client that does not read; past it the client is
  // disconnected (its requests cancelled) rather than buffered without end.
  size_t max_pending_output_bytes = 16u << 20;
  // Session export and import (null: the daemon has no T2 storage, and
  // both are refused). Borrowed; must outlive the server.
  tiering::TierManager* tier = nullptr;
  // Export frames queued and unwritten per export (flow control), and how
  // long an export waits for a client that stopped reading.
  size_t export_window_bytes = 4u << 20;
  std::chrono::milliseconds export_stall_timeout{120'000};
  // Import pieces received and not yet written to T2, per connection; past
  // it the connection stops reading until the store catches up.
  size_t max_import_queued_bytes = 8u << 20;
  // What Hello reports.
  std::string daemon_version;
  std::string model_name;
  uint32_t context_limit = 0;
  std::string math;  // kernels::MathModeName of the engine's backend
};

class Connection;

class Server {
 public:
  // `scheduler` and `metrics` are borrowed and must outlive the server.
  Server(boost::asio::io_context& io, ServerOptions options, Scheduler* scheduler, Metrics* metrics);
  ~Server();

  // Binds options.socket_path: creates its directory, replaces a stale
  // socket of a dead daemon, refuses (AlreadyExists) when a live daemon
  // answers on it, and sets the socket mode.
  Status Listen();
  // Takes over a listening socket passed by systemd (socket activation).
  Status Adopt(int fd);
  void StartAccepting();
  // Stops accepting; removes the socket file if this server created it.
  void StopAccepting();
  // Health reports Draining from now on.
  void set_draining() { draining_ = true; }
  // Closes every connection once its queued output is written.
  void CloseAll();
  size_t connections() const { return connections_.size(); }

 private:
  friend class Connection;
  void Accept();
  void Remove(uint64_t conn_id);

  // --- constant after construction -------------------------------------------
  boost::asio::io_context& io_;
  const ServerOptions options_;
  Scheduler* const scheduler_;
  Metrics* const metrics_;
  const std::chrono::steady_clock::time_point started_;

  // --- io thread only ----------------------------------------------------------
  boost::asio::local::stream_protocol::acceptor acceptor_;
  bool owns_socket_file_ = false;
  bool draining_ = false;
  uint64_t next_conn_id_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<Connection>> connections_;
};

}  // namespace mnemo::daemon
