// Unix-socket server: accept loop, per-connection framing, limits and reply
// streaming.
#include <utility>  // before Asio: Boost 1.74 uses std::exchange unqualified-included

#include "daemon/server.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <deque>
#include <utility>
#include <filesystem>
#include <unordered_set>

#include <spdlog/spdlog.h>

namespace mnemo::daemon {
namespace asio = boost::asio;
using local = asio::local::stream_protocol;

namespace {

bool IsTerminalBody(const protocol::ResponseBody& b) {
  return !std::holds_alternative<protocol::TokenChunk>(b) &&
         !std::holds_alternative<protocol::PrefillProgress>(b) && !std::holds_alternative<protocol::ExportChunk>(b);
}

Status CheckSocketPath(const std::string& path) {
  sockaddr_un addr{};
  if (path.empty()) return Status::InvalidArgument("empty socket path");
  if (path.size() >= sizeof(addr.sun_path))
    return Status::InvalidArgument("socket path longer than " + std::to_string(sizeof(addr.sun_path) - 1) +
                                   " bytes: " + path);
  return Status::Ok();
}

// True when something accepts connections on `path`.
bool SomeoneListens(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  memcpy(addr.sun_path, path.data(), path.size());
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

}  // namespace

// One client. Lives while its socket is open or replies are still queued.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(Server* server, uint64_t id, local::socket socket)
      : server_(server),
        id_(id),
        socket_(std::move(socket)),
        idle_timer_(server->io_),
        decoder_(protocol::DecoderLimits{.max_frame_bytes = server->options_.max_frame_bytes}) {}

  void Start() {
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(socket_.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      spdlog::warn("connection {}: SO_PEERCRED failed: {}", id_, strerror(errno));
      Close();
      return;
    }
    uid_ = cred.uid;
    pid_ = cred.pid;
    spdlog::debug("connection {} from pid {} uid {}", id_, pid_, uid_);
    ArmIdleTimer();
    Read();
  }

  // Queues one response frame. Safe to call after Close (dropped).
  void Send(uint64_t request_id, protocol::ResponseBody body) {
    if (closed_) return;
    if (std::holds_alternative<protocol::ErrorReply>(body) && server_->metrics_)
      server_->metrics_->CountError(std::get<protocol::ErrorReply>(body).code);
    if (request_id != 0 && IsTerminalBody(body)) {
      in_flight_.erase(request_id);
      if (in_flight_.empty()) ArmIdleTimer();
    }
    Outgoing out;
    if (auto* chunk = std::get_if<protocol::ExportChunk>(&body)) {
      if (auto it = windows_.find(request_id); it != windows_.end()) {
        out.window = it->second;
        out.credit = chunk->data.size();
      }
    }
    if (request_id != 0 && IsTerminalBody(body)) windows_.erase(request_id);
    out.frame = protocol::EncodeResponse(request_id, body);
    pending_bytes_ += out.frame.size();
    out_.push_back(std::move(out));
    if (pending_bytes_ > server_->options_.max_pending_output_bytes) {
      spdlog::warn("connection {} (uid {}): client does not read its replies; {} bytes queued; closing",
                   id_, uid_, pending_bytes_);
      Close();
      return;
    }
    Write();
  }

  // Closes once the queued output is written.
  void CloseAfterFlush() {
    close_after_flush_ = true;
    if (!writing_) Close();
  }

  void Close() {
    if (closed_) return;
    closed_ = true;
    boost::system::error_code ec;
    idle_timer_.cancel();
    socket_.shutdown(local::socket::shutdown_both, ec);
    socket_.close(ec);
    server_->scheduler_->CancelConnection(id_);
    for (auto& [id, w] : windows_) w->Cancel(Status::Cancelled("connection closed"));
    windows_.clear();
    for (auto& [id, imp] : imports_) {
      imp.job->Abort();
      CountImportEnded(StatusCode::kCancelled);
    }
    imports_.clear();
    server_->Remove(id_);
  }

 private:
  void ArmIdleTimer() {
    idle_timer_.expires_after(server_->options_.idle_timeout);
    idle_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
      if (ec || self->closed_) return;
      if (!self->in_flight_.empty()) return;  // re-armed when the last request ends
      self->Send(0, protocol::ErrorReply::FromStatus(Status::ResourceExhausted(
                        "connection idle for longer than the limit; closed")));
      self->reading_stopped_ = true;
      self->CloseAfterFlush();
    });
  }

  void Read() {
    socket_.async_read_some(asio::buffer(buf_), [self = shared_from_this()](
                                                    const boost::system::error_code& ec, size_t n) {
      if (self->closed_ || self->reading_stopped_) return;
      if (ec) {
        if (ec != asio::error::eof && ec != asio::error::connection_reset && ec != asio::error::operation_aborted)
          spdlog::debug("connection {}: read: {}", self->id_, ec.message());
        self->Close();
        return;
      }
      self->decoder_.Feed(std::string_view(self->buf_.data(), n));
      if (self->in_flight_.empty()) self->ArmIdleTimer();
      self->Drain();
      if (self->closed_ || self->reading_stopped_) return;
      if (self->import_queued_bytes_ > self->server_->options_.max_import_queued_bytes) {
        self->read_paused_ = true;  // resumed as the store catches up (ImportPieceDone)
      } else {
        self->Read();
      }
    });
  }

  // Handles every complete frame buffered.
  void Drain() {
    for (;;) {
      Result<std::optional<protocol::FrameView>> next = decoder_.Next();
      if (!next.ok()) {
        if (decoder_.failed()) {
          // Out of sync with the stream: report and close.
          spdlog::info("connection {} (uid {}): closing: {}", id_, uid_, next.status().ToString());
          Send(0, protocol::ErrorReply::FromStatus(next.status()));
          reading_stopped_ = true;
          CloseAfterFlush();
          return;
        }
        Send(decoder_.error_id(), protocol::ErrorReply::FromStatus(next.status()));
        continue;
      }
      if (!next->has_value()) return;
      const protocol::FrameView& view = **next;
      Result<protocol::Request> req = protocol::ParseRequest(view.frame);
      if (!req.ok()) {
        Send(view.id, protocol::ErrorReply::FromStatus(req.status()));
        continue;
      }
      Dispatch(std::move(req).value());
      if (closed_) return;
    }
  }

  void Dispatch(protocol::Request req) {
    using namespace protocol;
    const uint64_t id = req.id;
    if (auto* piece = std::get_if<ImportSessionRequest>(&req.body)) {
      if (imports_.count(id) || piece->offset != 0) {
        ImportPiece(id, std::move(*piece));
        return;
      }
    }
    if (auto* c = std::get_if<CancelRequest>(&req.body)) {
      // Once its last piece is in, an import completes like any request
      // that ends before its cancel arrives.
      auto it = imports_.find(c->target_id);
      if (it != imports_.end() && !it->second.last_seen)
        FailImport(c->target_id, Status::Cancelled("import cancelled"));
    }
    if (in_flight_.count(id)) {
      Send(0, ErrorReply::FromStatus(Status::InvalidArgument(
                  "request id " + std::to_string(id) + " is already in flight on this connection")));
      return;
    }
    if (in_flight_.size() >= server_->options_.max_requests_per_connection) {
      Send(id, ErrorReply::FromStatus(Status::ResourceExhausted(
                   "too many requests in flight on this connection (limit " +
                   std::to_string(server_->options_.max_requests_per_connection) + ")")));
      return;
    }
    Server& server = *server_;
    if (auto* h = std::get_if<HelloRequest>(&req.body)) {
      if (server.metrics_) server.metrics_->CountRequest("hello");
      HelloReply r;
      r.protocol_version = kProtocolVersion;
      r.daemon_version = server.options_.daemon_version;
      r.model_name = server.options_.model_name;
      r.context_limit = server.options_.context_limit;
      r.max_frame_bytes = server.options_.max_frame_bytes;
      r.math = server.options_.math;
      if (h->protocol_version != kProtocolVersion)
        spdlog::info("connection {}: client speaks protocol {}, daemon {}", id_, h->protocol_version,
                     kProtocolVersion);
      Send(id, std::move(r));
    } else if (std::holds_alternative<HealthRequest>(req.body)) {
      if (server.metrics_) server.metrics_->CountRequest("health");
      HealthReply r;
      r.status = server.draining_ ? HealthStatus::kDraining : HealthStatus::kServing;
      r.model_loaded = true;
      r.uptime_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - server.started_).count();
      r.message = server.draining_ ? "shutting down" : "serving";
      Send(id, std::move(r));
    } else if (auto* st = std::get_if<StatsRequest>(&req.body)) {
      if (server.metrics_) server.metrics_->CountRequest("stats");
      StatsReply r;
      if (server.metrics_) {
        server.metrics_->SetConnections(static_cast<uint32_t>(server.connections_.size()));
        server.scheduler_->PublishTiers();
        r = server.metrics_->Snapshot();
        if (st->prometheus) r.prometheus_text = server.metrics_->PrometheusText();
      }
      r.connections = static_cast<uint32_t>(server.connections_.size());
      r.requests_running = server.scheduler_->running();
      r.requests_waiting = server.scheduler_->waiting();
      r.sessions = server.scheduler_->sessions();
      Send(id, std::move(r));
    } else if (auto* piece = std::get_if<ImportSessionRequest>(&req.body)) {
      StartImport(id, std::move(*piece));
    } else {
      ToScheduler(std::move(req));
    }
  }

  // --- import: pieces go to the tier manager's transfer thread in order; the
  // finished import is committed by the scheduler -------------------------------

  void StartImport(uint64_t id, protocol::ImportSessionRequest piece) {
    if (server_->metrics_) {
      server_->metrics_->CountRequest("import_session");
      server_->metrics_->TransferStarted(Metrics::Transfer::kImport);
    }
    if (!server_->options_.tier) {
      CountImportEnded(StatusCode::kUnsupported);
      Send(id, protocol::ErrorReply::FromStatus(Status::Unsupported(
                   "session import needs durable sessions: this mnemod runs without T2 storage (--t2-budget 0)")));
      if (!piece.last) dropped_imports_.insert(id);
      return;
    }
    dropped_imports_.erase(id);
    in_flight_.insert(id);
    idle_timer_.cancel();
    Import& imp = imports_[id];
    imp.name = piece.name;
    imp.job = server_->options_.tier->StartImport("import of " + std::string(piece.name ? "'" + *piece.name + "'"
                                                                                      : std::string("a session")) +
                                                  " by uid " + std::to_string(uid_));
    ImportPiece(id, std::move(piece));
  }

  void ImportPiece(uint64_t id, protocol::ImportSessionRequest piece) {
    auto it = imports_.find(id);
    if (it == imports_.end()) {
      // The rest of an import that already failed (its error was sent).
      if (dropped_imports_.count(id)) {
        if (piece.last) dropped_imports_.erase(id);
        return;
      }
      Send(id, protocol::ErrorReply::FromStatus(Status::InvalidArgument(
                   "ImportSession piece at offset " + std::to_string(piece.offset) +
                   " for request id " + std::to_string(id) + ", which has no import in progress")));
      return;
    }
    Import& imp = it->second;
    if (piece.offset != imp.next_offset) {
      FailImport(id, Status::InvalidArgument("ImportSession piece at offset " + std::to_string(piece.offset) +
                                             ", expected " + std::to_string(imp.next_offset)),
                 piece.last);
      return;
    }
    imp.next_offset += piece.data.size();
    const size_t n = piece.data.size();
    if (server_->metrics_) server_->metrics_->TransferBytes(Metrics::Transfer::kImport, n);
    import_queued_bytes_ += n;
    std::weak_ptr<Connection> weak = shared_from_this();
    asio::io_context* io = &server_->io_;
    std::shared_ptr<tiering::ImportJob> job = imp.job;
    job->Feed(std::move(piece.data), [weak, io, id, job, n](Status st) {
      asio::post(*io, [weak, id, job, n, st = std::move(st)] {
        if (auto c = weak.lock()) c->ImportPieceDone(id, job, n, st);
      });
    });
    if (!piece.last) return;
    imp.last_seen = true;
    job->Finish([weak, io, id, job](Result<tiering::Manifest> r) {
      asio::post(*io, [weak, id, job, r = std::move(r)]() mutable {
        if (auto c = weak.lock()) c->ImportFinished(id, job, std::move(r));
      });
    });
  }

  void ImportPieceDone(uint64_t id, const std::shared_ptr<tiering::ImportJob>& job, size_t n, const Status& st) {
    import_queued_bytes_ -= n;
    if (!st.ok()) {
      auto it = imports_.find(id);
      if (it != imports_.end() && it->second.job == job) FailImport(id, st);
    }
    if (read_paused_ && !closed_ && !reading_stopped_ &&
        import_queued_bytes_ <= server_->options_.max_import_queued_bytes / 2) {
      read_paused_ = false;
      Read();
    }
  }

  void ImportFinished(uint64_t id, const std::shared_ptr<tiering::ImportJob>& job, Result<tiering::Manifest> r) {
    auto it = imports_.find(id);
    if (it == imports_.end() || it->second.job != job) return;  // failed or cancelled meanwhile
    if (!r.ok()) {
      FailImport(id, r.status());
      return;
    }
    ImportCommit c;
    c.conn = id_;
    c.id = id;
    c.uid = uid_;
    c.name = it->second.name;
    c.job = job;
    c.manifest = std::move(r).value();
    std::weak_ptr<Connection> weak = shared_from_this();
    asio::io_context* io = &server_->io_;
    c.reply = [weak, io, id, job](protocol::ResponseBody body) {
      asio::post(*io, [weak, id, job, body = std::move(body)]() mutable {
        auto c = weak.lock();
        if (!c) return;
        auto it = c->imports_.find(id);
        if (it == c->imports_.end() || it->second.job != job) return;  // already answered
        c->imports_.erase(it);
        const auto* e = std::get_if<protocol::ErrorReply>(&body);
        c->CountImportEnded(e ? e->code : StatusCode::kOk);
        c->Send(id, std::move(body));
      });
    };
    server_->scheduler_->CommitImport(std::move(c));
  }

  // Ends import `id` with `status`: its reply, its T2 slots freed, and the
  // pieces still to come ignored.
  void FailImport(uint64_t id, const Status& status, bool last_piece_now = false) {
    auto it = imports_.find(id);
    if (it == imports_.end()) return;
    it->second.job->Abort();
    if (!it->second.last_seen && !last_piece_now) dropped_imports_.insert(id);
    imports_.erase(it);
    CountImportEnded(status.code());
    Send(id, protocol::ErrorReply::FromStatus(status));
  }

  void CountImportEnded(StatusCode code) {
    if (server_->metrics_) server_->metrics_->TransferEnded(Metrics::Transfer::kImport, code);
  }

  void ToScheduler(protocol::Request req) {
    if (server_->metrics_) server_->metrics_->CountRequest(RequestTypeName(req.body));
    in_flight_.insert(req.id);
    idle_timer_.cancel();
    Job job;
    job.conn = id_;
    job.id = req.id;
    job.uid = uid_;
    job.body = std::move(req.body);
    if (std::holds_alternative<protocol::ExportSessionRequest>(job.body)) {
      job.window = std::make_shared<FlowWindow>(server_->options_.export_window_bytes,
                                                server_->options_.export_stall_timeout);
      windows_[req.id] = job.window;
    }
    std::weak_ptr<Connection> weak = shared_from_this();
    asio::io_context* io = &server_->io_;
    const uint64_t request_id = req.id;
    job.reply = [weak, io, request_id](protocol::ResponseBody body) {
      asio::post(*io, [weak, request_id, body = std::move(body)]() mutable {
        if (auto c = weak.lock()) c->Send(request_id, std::move(body));
      });
    };
    server_->scheduler_->Submit(std::move(job));
  }

  static const char* RequestTypeName(const protocol::RequestBody& b) {
    static constexpr const char* kNames[] = {"hello",        "create_session", "generate",
                                             "cancel",       "list_sessions",  "get_session",
                                             "fork_session", "delete_session", "stats",
                                             "health",       "export_session", "import_session"};
    static_assert(std::size(kNames) == std::variant_size_v<protocol::RequestBody>);
    return kNames[b.index()];
  }

  void Write() {
    if (writing_ || out_.empty() || closed_) return;
    writing_ = true;
    asio::async_write(socket_, asio::buffer(out_.front().frame),
                      [self = shared_from_this()](const boost::system::error_code& ec, size_t n) {
                        self->writing_ = false;
                        if (self->closed_) return;
                        if (ec) {
                          self->Close();
                          return;
                        }
                        Outgoing& done = self->out_.front();
                        self->pending_bytes_ -= done.frame.size();
                        if (done.window) done.window->Release(done.credit);
                        self->out_.pop_front();
                        if (!self->out_.empty()) {
                          self->Write();
                        } else if (self->close_after_flush_) {
                          self->Close();
                        }
                      });
  }

  Server* const server_;
  const uint64_t id_;
  local::socket socket_;
  asio::steady_timer idle_timer_;
  protocol::FrameDecoder decoder_;
  uid_t uid_ = 0;
  pid_t pid_ = 0;
  std::array<char, 64 * 1024> buf_;
  std::unordered_set<uint64_t> in_flight_;
  struct Outgoing {
    std::string frame;
    std::shared_ptr<FlowWindow> window;  // an ExportChunk's: credit returned once written
    size_t credit = 0;
  };
  std::deque<Outgoing> out_;
  // Exports in flight, by request id.
  std::unordered_map<uint64_t, std::shared_ptr<FlowWindow>> windows_;
  struct Import {
    std::shared_ptr<tiering::ImportJob> job;
    std::optional<std::string> name;
    uint64_t next_offset = 0;
    bool last_seen = false;
  };
  std::unordered_map<uint64_t, Import> imports_;
  // Imports that failed before their last piece arrived: the rest is dropped.
  std::unordered_set<uint64_t> dropped_imports_;
  size_t import_queued_bytes_ = 0;  // fed to the tier manager, not yet written
  bool read_paused_ = false;
  size_t pending_bytes_ = 0;
  bool writing_ = false;
  bool closed_ = false;
  bool close_after_flush_ = false;
  bool reading_stopped_ = false;
};

Server::Server(asio::io_context& io, ServerOptions options, Scheduler* scheduler, Metrics* metrics)
    : io_(io),
      options_(std::move(options)),
      scheduler_(scheduler),
      metrics_(metrics),
      started_(std::chrono::steady_clock::now()),
      acceptor_(io) {}

Server::~Server() { StopAccepting(); }

Status Server::Listen() {
  const std::string& path = options_.socket_path;
  MNEMO_RETURN_IF_ERROR(CheckSocketPath(path));
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  if (!dir.empty()) {
    std::error_code ec;
    if (!std::filesystem::exists(dir, ec)) {
      std::filesystem::create_directories(dir, ec);
      if (ec) return Status::IOError("cannot create socket directory " + dir.string() + ": " + ec.message());
      // Clients of other uids reach the socket through its group; the
      // directory only needs to be traversable.
      ::chmod(dir.c_str(), getuid() == 0 ? 0755 : 0700);
    }
  }
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return Status::FailedPrecondition(path + " exists and is not a socket; refusing to replace it");
    if (SomeoneListens(path))
      return Status::AlreadyExists("another mnemod is already serving on " + path);
    spdlog::info("replacing stale socket {}", path);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Status::FromErrno("unlink " + path, errno);
  }
  boost::system::error_code ec;
  acceptor_.open(local(), ec);
  if (!ec) acceptor_.bind(local::endpoint(path), ec);
  if (ec) return Status::IOError("cannot bind " + path + ": " + ec.message());
  owns_socket_file_ = true;
  if (::chmod(path.c_str(), options_.socket_mode) != 0) return Status::FromErrno("chmod " + path, errno);
  acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Status::IOError("cannot listen on " + path + ": " + ec.message());
  return Status::Ok();
}

Status Server::Adopt(int fd) {
  boost::system::error_code ec;
  acceptor_.assign(local(), fd, ec);
  if (ec) return Status::IOError("cannot adopt the activated socket: " + ec.message());
  owns_socket_file_ = false;
  return Status::Ok();
}

void Server::StartAccepting() { Accept(); }

void Server::Accept() {
  acceptor_.async_accept([this](const boost::system::error_code& ec, local::socket socket) {
    if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;
    if (ec) {
      spdlog::warn("accept: {}", ec.message());
      // EMFILE and friends: retry shortly rather than spinning.
      auto timer = std::make_shared<asio::steady_timer>(io_, std::chrono::milliseconds(100));
      timer->async_wait([this, timer](const boost::system::error_code&) { Accept(); });
      return;
    }
    if (connections_.size() >= options_.max_connections) {
      // Tell the client why before closing.
      auto frame = std::make_shared<std::string>(protocol::EncodeError(
          0, Status::ResourceExhausted("connection limit of " + std::to_string(options_.max_connections) +
                                       " reached; try again later")));
      auto sock = std::make_shared<local::socket>(std::move(socket));
      asio::async_write(*sock, asio::buffer(*frame), [sock, frame](const boost::system::error_code&, size_t) {
        boost::system::error_code ignored;
        sock->shutdown(local::socket::shutdown_both, ignored);
        sock->close(ignored);
      });
      if (metrics_) metrics_->CountError(StatusCode::kResourceExhausted);
    } else {
      const uint64_t id = next_conn_id_++;
      auto c = std::make_shared<Connection>(this, id, std::move(socket));
      connections_.emplace(id, c);
      if (metrics_) metrics_->SetConnections(static_cast<uint32_t>(connections_.size()));
      c->Start();
    }
    Accept();
  });
}

void Server::Remove(uint64_t conn_id) {
  connections_.erase(conn_id);
  if (metrics_) metrics_->SetConnections(static_cast<uint32_t>(connections_.size()));
}

void Server::StopAccepting() {
  boost::system::error_code ec;
  if (acceptor_.is_open()) acceptor_.close(ec);
  if (owns_socket_file_) {
    ::unlink(options_.socket_path.c_str());
    owns_socket_file_ = false;
  }
}

void Server::CloseAll() {
  std::vector<std::shared_ptr<Connection>> all;
  for (auto& [id, c] : connections_) all.push_back(c);
  for (auto& c : all) c->CloseAfterFlush();
}

}  // namespace mnemo::daemon
