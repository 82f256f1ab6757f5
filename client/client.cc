// The client's connection to mnemod: socket setup, the reader thread that
// decodes frames and routes each reply by request id, and the calls built on
// it. Owns the translation of socket errno values into Status.
#include "mnemo/client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <mutex>
#include <thread>
#include <type_traits>
#include <unordered_map>

#define XXH_INLINE_ALL  // header-only: the installed client needs no libxxhash
#include <xxhash.h>

#include "protocol/framing.h"
#include "protocol/messages.h"

namespace mnemo::client {

using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kReadChunkBytes = 64 * 1024;
constexpr std::string_view kLost = "connection to mnemod lost: ";

std::string ErrnoText(int err) { return std::strerror(err); }

std::string_view ResponseName(const protocol::ResponseBody& body) {
  static constexpr std::string_view kNames[] = {"HelloReply",  "TokenChunk",  "PrefillProgress", "Done",
                                                "Error",       "SessionInfo", "SessionList",     "Ack",
                                                "StatsReply",  "HealthReply", "ExportChunk",     "ExportDone"};
  static_assert(std::size(kNames) == std::variant_size_v<protocol::ResponseBody>);
  return kNames[body.index()];
}

bool IsStreamEvent(const protocol::ResponseBody& body) {
  return std::holds_alternative<TokenChunk>(body) || std::holds_alternative<PrefillProgress>(body) ||
         std::holds_alternative<protocol::ExportChunk>(body);
}

}  // namespace

std::string DefaultSocketPath() {
  if (const char* s = std::getenv("MNEMO_SOCKET"); s != nullptr && *s != '\0') return s;
  // XDG: a relative path is invalid and ignored (as mnemod does).
  // A per-user daemon's socket when one exists; else the system service's
  // (/run/mnemo, reachable through the mnemo group) when it exists.
  constexpr const char* kSystemSocket = "/run/mnemo/mnemod.sock";
  struct stat st;
  auto exists = [&](const std::string& p) { return ::stat(p.c_str(), &st) == 0; };
  if (const char* x = std::getenv("XDG_RUNTIME_DIR"); x != nullptr && x[0] == '/') {
    const std::string user = std::string(x) + "/mnemo/mnemod.sock";
    if (exists(user) || !exists(kSystemSocket)) return user;
    return kSystemSocket;
  }
  const uid_t uid = ::getuid();
  if (uid == 0) return kSystemSocket;
  const std::string user = "/tmp/mnemo-" + std::to_string(uid) + "/mnemod.sock";
  if (exists(user) || !exists(kSystemSocket)) return user;
  return kSystemSocket;
}

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kEos: return "eos";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
    case FinishReason::kContextFull: return "context_full";
  }
  return "unknown";
}

std::string_view HealthStatusName(HealthStatus status) {
  switch (status) {
    case HealthStatus::kServing: return "serving";
    case HealthStatus::kStarting: return "starting";
    case HealthStatus::kDraining: return "draining";
  }
  return "unknown";
}

namespace internal {

// One request's mailbox, filled by the reader thread. Every field is guarded
// by the owning Connection's mu_.
struct Call {
  std::deque<protocol::ResponseBody> events;  // in arrival order; the terminal reply last
  bool streaming = false;  // TokenChunk / PrefillProgress allowed (Generate)
  bool discard = false;    // nobody reads: drop everything until the terminal reply
  Status failure;          // ended locally: connection lost, protocol violation, overflow
  std::condition_variable cv;
  // ExportChunk bytes queued and unread. With max_buffered_bytes > 0 the
  // reader stops reading the socket while another chunk would take them
  // over it (one larger chunk is let into an empty queue), so the daemon's
  // socket and then its flow window hold the rest of the export back.
  size_t max_buffered_bytes = 0;
  size_t buffered_bytes = 0;
  size_t peak_buffered_bytes = 0;
  std::condition_variable space_cv;  // the reader waits on it for room
};

namespace {

size_t ExportBytes(const protocol::ResponseBody& body) {
  const auto* chunk = std::get_if<protocol::ExportChunk>(&body);
  return chunk ? chunk->data.size() : 0;
}

}  // namespace

// The socket and the reader thread.
//
// Thread-safe. Lifetime: shared by the Client and its GenerateStreams; the
// reader thread holds no reference, Close() (also run by the destructor)
// stops and joins it, so the last owner must not be the reader itself, and
// the reader never runs user code.
class Connection {
 public:
  struct Sent {
    uint64_t id = 0;
    std::shared_ptr<Call> call;
  };

  Connection(int fd, const ConnectOptions& options)
      : max_reply_frame_bytes_(options.max_reply_frame_bytes),
        max_queued_events_(options.max_queued_events),
        max_export_buffered_bytes_(options.max_export_buffered_bytes),
        fd_(fd) {}
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection() { Close(); }

  void Start() { reader_ = std::thread([this] { ReadLoop(); }); }

  size_t max_export_buffered_bytes() const { return max_export_buffered_bytes_; }

  void set_max_request_frame_bytes(uint32_t n) { max_request_frame_bytes_.store(n, std::memory_order_relaxed); }

  bool broken() const {
    std::lock_guard<std::mutex> lock(mu_);
    return !broken_.ok();
  }

  // Waits (until `deadline`) for the reader to reach the end of the stream,
  // and returns the last connection-level Error the daemon sent (OK if
  // none).
  Status WaitForDaemonError(Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    ended_cv_.wait_until(lock, deadline, [&] { return !broken_.ok(); });
    return last_connection_error_;
  }

  // Registers a call under a fresh id, then sends the request: the reply can
  // never arrive before its mailbox exists.
  // `max_buffered_bytes` (0: none) bounds the call's unread ExportChunk
  // bytes (Call).
  Result<Sent> Send(const protocol::RequestBody& body, bool streaming, bool discard,
                    size_t max_buffered_bytes = 0) {
    const uint64_t id = next_id_.fetch_add(1, std::memory_order_relaxed);
    std::string frame = protocol::EncodeRequest(id, body);
    const size_t body_bytes = frame.size() - protocol::kFrameHeaderBytes;
    const uint32_t limit = max_request_frame_bytes_.load(std::memory_order_relaxed);
    if (body_bytes > limit) {
      return Status::ResourceExhausted("request of " + std::to_string(body_bytes) +
                                       " bytes exceeds mnemod's frame limit of " + std::to_string(limit) + " bytes");
    }
    auto call = std::make_shared<Call>();
    call->streaming = streaming;
    call->discard = discard;
    call->max_buffered_bytes = max_buffered_bytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!broken_.ok()) return broken_;
      calls_.emplace(id, call);
    }
    Status written = WriteFrame(frame);
    if (!written.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      calls_.erase(id);
      return written;
    }
    return Sent{id, std::move(call)};
  }

  // Sends another frame of a request already registered under `id` (an
  // import's later pieces).
  Status SendMore(uint64_t id, const protocol::RequestBody& body) {
    std::string frame = protocol::EncodeRequest(id, body);
    const size_t body_bytes = frame.size() - protocol::kFrameHeaderBytes;
    const uint32_t limit = max_request_frame_bytes_.load(std::memory_order_relaxed);
    if (body_bytes > limit) {
      return Status::ResourceExhausted("request of " + std::to_string(body_bytes) +
                                       " bytes exceeds mnemod's frame limit of " + std::to_string(limit) + " bytes");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!broken_.ok()) return broken_;
    }
    return WriteFrame(frame);
  }

  // True once the call has a reply or failed (without consuming it).
  bool Answered(const Call& call) const {
    std::lock_guard<std::mutex> lock(mu_);
    return !call.events.empty() || !call.failure.ok();
  }

  // Blocks for the call's next event, or its failure. With a deadline, a
  // timeout is Unavailable("timed out").
  Result<protocol::ResponseBody> Wait(Call& call, const Clock::time_point* deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    auto ready = [&] { return !call.events.empty() || !call.failure.ok(); };
    if (deadline != nullptr) {
      if (!call.cv.wait_until(lock, *deadline, ready)) return Status::Unavailable("timed out");
    } else {
      call.cv.wait(lock, ready);
    }
    if (!call.events.empty()) {
      protocol::ResponseBody body = std::move(call.events.front());
      call.events.pop_front();
      if (const size_t n = ExportBytes(body); n > 0) {
        call.buffered_bytes -= n;
        call.space_cv.notify_all();
      }
      return body;
    }
    return call.failure;
  }

  // The most ExportChunk bytes `call` held unread at once.
  size_t PeakBufferedBytes(const Call& call) const {
    std::lock_guard<std::mutex> lock(mu_);
    return call.peak_buffered_bytes;
  }

  // The caller stops reading `call`: what still arrives for it is dropped,
  // and a generation still running is cancelled.
  void Abandon(uint64_t id, Call& call) {
    bool live;
    {
      std::lock_guard<std::mutex> lock(mu_);
      call.discard = true;
      call.events.clear();
      call.buffered_bytes = 0;
      call.space_cv.notify_all();
      auto it = calls_.find(id);
      live = it != calls_.end() && it->second.get() == &call;
    }
    if (live) (void)CancelNoWait(id);
  }

  // Sends Cancel for `target` unless it already ended; the Ack is dropped.
  Status CancelNoWait(uint64_t target) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (calls_.find(target) == calls_.end()) return Status::Ok();
    }
    auto sent = Send(protocol::CancelRequest{target}, /*streaming=*/false, /*discard=*/true);
    return sent.status();
  }

  void Close() {
    std::lock_guard<std::mutex> close_lock(close_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      closing_ = true;
      for (auto& [id, call] : calls_) call->space_cv.notify_all();  // a reader waiting for room
    }
    if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);  // wakes the reader and any blocked writer
    if (reader_.joinable()) reader_.join();
    std::lock_guard<std::mutex> write_lock(write_mu_);
    if (fd_ >= 0) {
      ::close(fd_);
      fd_ = -1;
    }
    std::lock_guard<std::mutex> lock(mu_);
    FailAllLocked(Status::Unavailable(std::string(kLost) + "the client closed it"));
  }

 private:
  Status WriteFrame(std::string_view frame) {
    std::lock_guard<std::mutex> lock(write_mu_);
    if (fd_ < 0) return Status::Unavailable(std::string(kLost) + "the client closed it");
    const char* p = frame.data();
    size_t left = frame.size();
    while (left > 0) {
      const ssize_t n = ::send(fd_, p, left, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        const int err = errno;
        // Part of a frame may be on the wire: the stream is out of sync. The
        // read side stays open so that the reader still sees what the daemon
        // sent before it hung up (e.g. why it refused the connection).
        ::shutdown(fd_, SHUT_WR);
        return Status::Unavailable(std::string(kLost) + "send: " + ErrnoText(err));
      }
      p += n;
      left -= static_cast<size_t>(n);
    }
    return Status::Ok();
  }

  void ReadLoop() {
    const int fd = fd_;  // stable until Close() has joined this thread
    protocol::DecoderLimits limits;
    limits.max_frame_bytes = max_reply_frame_bytes_;
    protocol::FrameDecoder decoder(limits);
    std::vector<char> buf(kReadChunkBytes);
    Status end;
    while (end.ok()) {
      const ssize_t n = ::read(fd, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n == 0) {
        end = Status::Unavailable(std::string(kLost) + "mnemod closed the connection");
      } else if (n < 0) {
        end = Status::Unavailable(std::string(kLost) + "read: " + ErrnoText(errno));
      } else {
        decoder.Feed(std::string_view(buf.data(), static_cast<size_t>(n)));
        end = Drain(decoder);
        if (!end.ok()) ::shutdown(fd, SHUT_RDWR);
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (closing_ && end.code() == StatusCode::kUnavailable) {
      end = Status::Unavailable(std::string(kLost) + "the client closed it");
    } else if (!last_connection_error_.ok() && end.code() == StatusCode::kUnavailable) {
      // Say why the daemon hung up (idle timeout, shutdown, a bad frame).
      end = Status::Unavailable(std::string(end.message()) + " (mnemod said " + last_connection_error_.ToString() +
                                ")");
    }
    FailAllLocked(end);
  }

  // Hands every complete frame to its call. Not OK when the byte stream is
  // beyond repair: the connection must close.
  Status Drain(protocol::FrameDecoder& decoder) {
    for (;;) {
      auto next = decoder.Next();
      if (!next.ok()) {
        if (decoder.failed()) return Status::Corruption("mnemod sent a malformed frame: " + next.status().ToString());
        // A verified frame of a type this build does not know: a newer daemon.
        std::lock_guard<std::mutex> lock(mu_);
        FailCallLocked(decoder.error_id(),
                       Status::Unsupported("mnemod sent a reply this client does not understand: " +
                                           std::string(next.status().message())));
        continue;
      }
      if (!next->has_value()) return Status::Ok();
      const protocol::FrameView& view = **next;
      auto parsed = protocol::ParseResponse(view.frame);
      std::unique_lock<std::mutex> lock(mu_);
      if (!parsed.ok()) {
        FailCallLocked(view.id, Status::Corruption("mnemod sent an invalid reply: " +
                                                   std::string(parsed.status().message())));
        continue;
      }
      WaitForRoomLocked(lock, *parsed);
      if (closing_) return Status::Unavailable(std::string(kLost) + "the client closed it");
      RouteLocked(std::move(parsed).value());
    }
  }

  // Blocks the reader (and so the socket) while `response`, an ExportChunk,
  // would take its call's unread bytes over the call's bound; returns when
  // there is room, the call stops reading (Abandon) or ends, or Close.
  void WaitForRoomLocked(std::unique_lock<std::mutex>& lock, const protocol::Response& response) {
    const size_t n = ExportBytes(response.body);
    if (n == 0 || response.id == 0) return;
    auto it = calls_.find(response.id);
    if (it == calls_.end() || it->second->max_buffered_bytes == 0) return;
    std::shared_ptr<Call> call = it->second;  // stays valid while we wait
    call->space_cv.wait(lock, [&] {
      return closing_ || call->discard || !call->failure.ok() || call->buffered_bytes == 0 ||
             call->buffered_bytes + n <= call->max_buffered_bytes;
    });
  }

  void RouteLocked(protocol::Response response) {
    if (response.id == 0) {
      // About the connection as a whole (e.g. too many connections): every
      // waiting call learns it. Anything else with id 0 answers nothing.
      if (auto* e = std::get_if<protocol::ErrorReply>(&response.body)) {
        Status s = e->ToStatus();
        last_connection_error_ = s;  // usually followed by the daemon closing
        for (auto& [id, call] : calls_) EndCallLocked(*call, s);
        calls_.clear();
      }
      return;
    }
    auto it = calls_.find(response.id);
    if (it == calls_.end()) return;  // a call that already ended locally
    Call& call = *it->second;
    if (IsStreamEvent(response.body)) {
      if (!call.streaming) {
        EndCallLocked(call, Status::Corruption("mnemod sent " + std::string(ResponseName(response.body)) +
                                               " for a request that is not Generate"));
        calls_.erase(it);
        return;
      }
      if (call.discard || !call.failure.ok()) return;  // dropped until the terminal reply
      if (call.events.size() >= max_queued_events_) {
        // Stays registered to absorb the rest; the reader thread must never block.
        call.failure = Status::ResourceExhausted("client fell behind: more than " +
                                                 std::to_string(max_queued_events_) + " unread events");
        call.cv.notify_all();
        return;
      }
      call.buffered_bytes += ExportBytes(response.body);
      call.peak_buffered_bytes = std::max(call.peak_buffered_bytes, call.buffered_bytes);
      call.events.push_back(std::move(response.body));
      call.cv.notify_all();
      return;
    }
    // After an overflow the reader saw the terminal reply but the consumer
    // must see the overflow, not a stream with a silent gap.
    if (!call.discard && call.failure.ok()) call.events.push_back(std::move(response.body));
    if (call.failure.ok()) call.failure = Status::FailedPrecondition("request already answered");
    call.cv.notify_all();
    calls_.erase(it);
  }

  void EndCallLocked(Call& call, const Status& status) {
    if (call.failure.ok()) call.failure = status;
    call.cv.notify_all();
  }

  void FailCallLocked(uint64_t id, const Status& status) {
    if (id == 0) {
      for (auto& [cid, call] : calls_) EndCallLocked(*call, status);
      calls_.clear();
      return;
    }
    auto it = calls_.find(id);
    if (it == calls_.end()) return;
    EndCallLocked(*it->second, status);
    calls_.erase(it);
  }

  void FailAllLocked(const Status& status) {
    if (broken_.ok()) broken_ = status;
    ended_cv_.notify_all();
    for (auto& [id, call] : calls_) EndCallLocked(*call, broken_);
    calls_.clear();
  }

  // --- constant after construction -------------------------------------------
  const uint32_t max_reply_frame_bytes_;
  const size_t max_queued_events_;
  const size_t max_export_buffered_bytes_;
  std::thread reader_;  // set by Start(), joined by Close()

  std::atomic<uint64_t> next_id_{1};
  std::atomic<uint32_t> max_request_frame_bytes_{protocol::kDefaultMaxFrameBytes};

  std::mutex close_mu_;  // serializes Close()

  // --- guarded by write_mu_ (whole frames go out under it) -------------------
  std::mutex write_mu_;
  int fd_;  // -1 once closed; the reader reads its copy

  // --- guarded by mu_ ---------------------------------------------------------
  mutable std::mutex mu_;
  std::unordered_map<uint64_t, std::shared_ptr<Call>> calls_;  // calls awaiting their terminal reply
  Status broken_;  // non-OK once the connection is unusable
  Status last_connection_error_;  // the daemon's last Error with id 0
  std::condition_variable ended_cv_;  // broken_ became non-OK
  bool closing_ = false;
};

}  // namespace internal

namespace {

// Connects a non-blocking socket to `path` by `deadline`, then makes it
// blocking. The one place socket errno values become Status.
Result<int> ConnectSocket(const std::string& path, std::chrono::milliseconds timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty()) return Status::InvalidArgument("socket path is empty");
  if (path.size() >= sizeof(addr.sun_path)) {
    return Status::InvalidArgument("socket path longer than " + std::to_string(sizeof(addr.sun_path) - 1) +
                                   " bytes: " + path);
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return Status::FromErrno("socket", errno);
  auto fail = [&](Status s) -> Result<int> {
    ::close(fd);
    return s;
  };
  const bool forever = timeout.count() <= 0;
  const Clock::time_point deadline = Clock::now() + timeout;
  auto timed_out = [&] {
    return Status::Unavailable("timed out after " + std::to_string(timeout.count()) + " ms connecting to mnemod at " +
                               path);
  };
  auto refused = [&](int err) -> Status {
    switch (err) {
      case ENOENT:
      case ENOTDIR:
        return Status::NotFound("no mnemod socket at " + path + " (is mnemod running? --socket or $MNEMO_SOCKET)");
      case ECONNREFUSED:
        return Status::Unavailable("mnemod is not accepting connections at " + path + " (not running?)");
      case EACCES:
      case EPERM:
        return Status::PermissionDenied("connect " + path + ": " + ErrnoText(err));
      default:
        return Status::Unavailable("connect " + path + ": " + ErrnoText(err));
    }
  };
  for (;;) {
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) break;
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN) {
      // The daemon's accept backlog is full: it is busy, not gone.
      if (!forever && Clock::now() >= deadline) return fail(timed_out());
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    if (err != EINPROGRESS) return fail(refused(err));
    pollfd p{fd, POLLOUT, 0};
    int rc;
    do {
      const int64_t left_ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      rc = ::poll(&p, 1, forever ? -1 : static_cast<int>(std::max<int64_t>(0, left_ms)));
    } while (rc < 0 && errno == EINTR);
    if (rc == 0) return fail(timed_out());
    if (rc < 0) return fail(Status::FromErrno("poll", errno));
    int so_error = 0;
    socklen_t len = sizeof(so_error);
    if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len) < 0) so_error = errno;
    if (so_error != 0) return fail(refused(so_error));
    break;
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) return fail(Status::FromErrno("fcntl", errno));
  return fd;
}

// A reply that is not an Error into T, or Corruption for another type.
template <class T>
Result<T> Expect(Result<protocol::ResponseBody> reply, std::string_view request) {
  if (!reply.ok()) return reply.status();
  if (auto* v = std::get_if<T>(&reply.value())) return std::move(*v);
  return Status::Corruption("mnemod answered " + std::string(request) + " with " +
                            std::string(ResponseName(reply.value())));
}

}  // namespace

// ---------------------------------------------------------------- stream

GenerateStream::GenerateStream(std::shared_ptr<internal::Connection> conn, std::shared_ptr<internal::Call> call,
                               uint64_t id)
    : conn_(std::move(conn)), call_(std::move(call)), id_(id) {}

GenerateStream::GenerateStream(GenerateStream&& other) noexcept
    : conn_(std::move(other.conn_)), call_(std::move(other.call_)), id_(other.id_), finished_(other.finished_) {
  other.finished_ = true;
}

GenerateStream& GenerateStream::operator=(GenerateStream&& other) noexcept {
  if (this != &other) {
    Abandon();
    conn_ = std::move(other.conn_);
    call_ = std::move(other.call_);
    id_ = other.id_;
    finished_ = other.finished_;
    other.finished_ = true;
  }
  return *this;
}

GenerateStream::~GenerateStream() { Abandon(); }

void GenerateStream::Abandon() {
  if (call_ && !finished_) conn_->Abandon(id_, *call_);
  finished_ = true;
}

Result<StreamEvent> GenerateStream::Next() {
  if (finished_ || !call_) return Status::FailedPrecondition("generation stream already finished");
  auto event = conn_->Wait(*call_, nullptr);
  if (!event.ok()) {
    // Overflow leaves the request running on the daemon: stop it.
    conn_->Abandon(id_, *call_);
    finished_ = true;
    return event.status();
  }
  protocol::ResponseBody& body = event.value();
  if (auto* chunk = std::get_if<TokenChunk>(&body)) return StreamEvent(std::move(*chunk));
  if (auto* progress = std::get_if<PrefillProgress>(&body)) return StreamEvent(*progress);
  finished_ = true;
  if (auto* done = std::get_if<Done>(&body)) return StreamEvent(*done);
  if (auto* error = std::get_if<protocol::ErrorReply>(&body)) return error->ToStatus();
  return Status::Corruption("mnemod answered Generate with " + std::string(ResponseName(body)));
}

Status GenerateStream::Cancel() {
  if (!conn_) return Status::FailedPrecondition("generation stream was moved from");
  return conn_->CancelNoWait(id_);
}

// ---------------------------------------------------------------- client

Client::Client(std::shared_ptr<internal::Connection> conn, std::string socket_path, HelloReply hello)
    : conn_(std::move(conn)), socket_path_(std::move(socket_path)), hello_(std::move(hello)) {}

Client::Client(Client&& other) noexcept = default;

Client& Client::operator=(Client&& other) noexcept {
  if (this != &other) {
    Close();
    conn_ = std::move(other.conn_);
    socket_path_ = std::move(other.socket_path_);
    hello_ = std::move(other.hello_);
  }
  return *this;
}

Client::~Client() { Close(); }

void Client::Close() {
  if (conn_) conn_->Close();
}

bool Client::connected() const { return conn_ && !conn_->broken(); }

Result<Client> Client::Connect(const ConnectOptions& options) {
  const std::string path = options.socket_path.empty() ? DefaultSocketPath() : options.socket_path;
  if (options.client_name.size() > protocol::kMaxClientNameBytes || !protocol::IsValidUtf8(options.client_name)) {
    return Status::InvalidArgument("client name must be valid UTF-8 of at most " +
                                   std::to_string(protocol::kMaxClientNameBytes) + " bytes");
  }
  if (options.max_reply_frame_bytes == 0 || options.max_reply_frame_bytes > protocol::kMaxFrameBytesCeiling) {
    return Status::InvalidArgument("max_reply_frame_bytes must be in [1, " +
                                   std::to_string(protocol::kMaxFrameBytesCeiling) + "]");
  }
  if (options.max_queued_events == 0) return Status::InvalidArgument("max_queued_events must be positive");
  if (options.max_export_buffered_bytes == 0)
    return Status::InvalidArgument("max_export_buffered_bytes must be positive");
  const Clock::time_point deadline = Clock::now() + options.connect_timeout;
  MNEMO_ASSIGN_OR_RETURN(const int fd, ConnectSocket(path, options.connect_timeout));
  auto conn = std::make_shared<internal::Connection>(fd, options);
  conn->Start();

  protocol::HelloRequest hello_req;
  hello_req.protocol_version = protocol::kProtocolVersion;
  hello_req.client_name = options.client_name;
  const bool forever = options.connect_timeout.count() <= 0;
  auto sent = conn->Send(hello_req, /*streaming=*/false, /*discard=*/false);
  if (!sent.ok()) {
    // A daemon that refuses the connection (too many) says why and hangs up,
    // possibly before Hello went out: report its reason, not the broken pipe.
    const Clock::time_point soon = Clock::now() + std::chrono::seconds(1);
    Status why = conn->WaitForDaemonError(forever ? soon : std::min(soon, deadline));
    if (!why.ok()) return why;
    return sent.status();
  }
  auto reply = conn->Wait(*sent->call, forever ? nullptr : &deadline);
  if (!reply.ok() && reply.status().message() == "timed out") {
    conn->Close();
    return Status::Unavailable("mnemod at " + path + " did not answer Hello within " +
                               std::to_string(options.connect_timeout.count()) + " ms");
  }
  if (reply.ok()) {
    if (auto* e = std::get_if<protocol::ErrorReply>(&reply.value())) return e->ToStatus();
  }
  MNEMO_ASSIGN_OR_RETURN(HelloReply hello, Expect<HelloReply>(std::move(reply), "Hello"));
  if (hello.protocol_version != protocol::kProtocolVersion) {
    return Status::Unsupported("mnemod at " + path + " speaks protocol version " +
                               std::to_string(hello.protocol_version) + ", this client version " +
                               std::to_string(protocol::kProtocolVersion));
  }
  conn->set_max_request_frame_bytes(hello.max_frame_bytes == 0 ? protocol::kDefaultMaxFrameBytes
                                                               : hello.max_frame_bytes);
  return Client(std::move(conn), path, std::move(hello));
}

namespace {

// Sends one request and waits for its terminal reply; an Error reply becomes
// its Status.
Result<protocol::ResponseBody> RoundTrip(internal::Connection* conn, const protocol::RequestBody& body) {
  if (conn == nullptr) return Status::FailedPrecondition("client was moved from");
  MNEMO_ASSIGN_OR_RETURN(auto sent, conn->Send(body, /*streaming=*/false, /*discard=*/false));
  MNEMO_ASSIGN_OR_RETURN(auto reply, conn->Wait(*sent.call, nullptr));
  if (auto* e = std::get_if<protocol::ErrorReply>(&reply)) return e->ToStatus();
  return reply;
}

}  // namespace

Result<SessionInfo> Client::CreateSession(std::optional<std::string> name) {
  if (name) MNEMO_RETURN_IF_ERROR(protocol::ValidateSessionName(*name));
  return Expect<SessionInfo>(RoundTrip(conn_.get(), protocol::CreateSessionRequest{std::move(name)}),
                             "CreateSession");
}

Result<std::vector<SessionInfo>> Client::ListSessions() {
  MNEMO_ASSIGN_OR_RETURN(auto list, Expect<protocol::SessionList>(
                                        RoundTrip(conn_.get(), protocol::ListSessionsRequest{}), "ListSessions"));
  return std::move(list.sessions);
}

Result<SessionInfo> Client::GetSession(std::string_view session) {
  MNEMO_RETURN_IF_ERROR(protocol::ValidateSessionName(session));
  return Expect<SessionInfo>(RoundTrip(conn_.get(), protocol::GetSessionRequest{std::string(session)}),
                             "GetSession");
}

Result<SessionInfo> Client::ForkSession(std::string_view src, std::string_view dst) {
  MNEMO_RETURN_IF_ERROR(protocol::ValidateSessionName(src).WithContext("fork source"));
  MNEMO_RETURN_IF_ERROR(protocol::ValidateSessionName(dst).WithContext("fork destination"));
  if (src == dst) return Status::InvalidArgument("fork source and destination are the same session");
  MNEMO_ASSIGN_OR_RETURN(auto reply,
                         RoundTrip(conn_.get(), protocol::ForkSessionRequest{std::string(src), std::string(dst)}));
  // A daemon may acknowledge without the new session's description.
  if (std::holds_alternative<protocol::Ack>(reply)) return GetSession(dst);
  return Expect<SessionInfo>(std::move(reply), "ForkSession");
}

Status Client::DeleteSession(std::string_view session) {
  MNEMO_RETURN_IF_ERROR(protocol::ValidateSessionName(session));
  MNEMO_ASSIGN_OR_RETURN(auto reply, RoundTrip(conn_.get(), protocol::DeleteSessionRequest{std::string(session)}));
  if (std::holds_alternative<protocol::Ack>(reply) || std::holds_alternative<SessionInfo>(reply)) {
    return Status::Ok();
  }
  return Status::Corruption("mnemod answered DeleteSession with " + std::string(ResponseName(reply)));
}

Result<StatsReply> Client::Stats(bool prometheus) {
  return Expect<StatsReply>(RoundTrip(conn_.get(), protocol::StatsRequest{prometheus}), "Stats");
}

Result<HealthReply> Client::Health() {
  return Expect<HealthReply>(RoundTrip(conn_.get(), protocol::HealthRequest{}), "Health");
}

Status Client::Cancel(uint64_t request_id) {
  if (request_id == 0) return Status::InvalidArgument("request id 0 is reserved");
  return Expect<protocol::Ack>(RoundTrip(conn_.get(), protocol::CancelRequest{request_id}), "Cancel").status();
}

Result<GenerateStream> Client::StartGenerate(const GenerateRequest& request) {
  if (!conn_) return Status::FailedPrecondition("client was moved from");
  MNEMO_RETURN_IF_ERROR(protocol::ValidateGenerate(request));
  MNEMO_ASSIGN_OR_RETURN(auto sent, conn_->Send(request, /*streaming=*/true, /*discard=*/false));
  return GenerateStream(conn_, std::move(sent.call), sent.id);
}

Result<Done> Client::Generate(const GenerateRequest& request, const Callbacks& callbacks) {
  MNEMO_ASSIGN_OR_RETURN(GenerateStream stream, StartGenerate(request));
  bool cancelled = false;
  for (;;) {
    MNEMO_ASSIGN_OR_RETURN(StreamEvent event, stream.Next());
    if (auto* chunk = std::get_if<TokenChunk>(&event)) {
      if (!cancelled && callbacks.on_chunk && !callbacks.on_chunk(*chunk)) {
        cancelled = true;
        MNEMO_RETURN_IF_ERROR(stream.Cancel());
      }
    } else if (auto* progress = std::get_if<PrefillProgress>(&event)) {
      if (!cancelled && callbacks.on_progress) callbacks.on_progress(*progress);
    } else {
      return std::get<Done>(event);
    }
  }
}

Result<GenerateResult> Client::GenerateText(const GenerateRequest& request) {
  MNEMO_ASSIGN_OR_RETURN(GenerateStream stream, StartGenerate(request));
  GenerateResult out;
  for (;;) {
    MNEMO_ASSIGN_OR_RETURN(StreamEvent event, stream.Next());
    if (auto* chunk = std::get_if<TokenChunk>(&event)) {
      out.text += chunk->text;
      out.token_ids.insert(out.token_ids.end(), chunk->token_ids.begin(), chunk->token_ids.end());
    } else if (auto* done = std::get_if<Done>(&event)) {
      out.done = *done;
      return out;
    }
  }
}

// ------------------------------------------------------------ export / import

Result<ExportDone> Client::ExportSession(std::string_view session,
                                         const std::function<Status(std::string_view)>& sink, ExportStats* stats) {
  if (!conn_) return Status::FailedPrecondition("client was moved from");
  MNEMO_RETURN_IF_ERROR(protocol::ValidateSessionName(session));
  MNEMO_ASSIGN_OR_RETURN(auto sent, conn_->Send(protocol::ExportSessionRequest{std::string(session)},
                                                /*streaming=*/true, /*discard=*/false,
                                                conn_->max_export_buffered_bytes()));
  struct Report {
    internal::Connection* conn;
    internal::Call* call;
    ExportStats* stats;
    ~Report() {
      if (stats != nullptr) stats->peak_buffered_bytes = conn->PeakBufferedBytes(*call);
    }
  } report{conn_.get(), sent.call.get(), stats};
  XXH3_state_t hash;
  XXH3_64bits_reset(&hash);
  uint64_t received = 0;
  for (;;) {
    Result<protocol::ResponseBody> event = conn_->Wait(*sent.call, nullptr);
    if (!event.ok()) return event.status();
    if (auto* e = std::get_if<protocol::ErrorReply>(&*event)) return e->ToStatus();
    if (auto* chunk = std::get_if<protocol::ExportChunk>(&*event)) {
      if (chunk->offset != received) {
        conn_->Abandon(sent.id, *sent.call);
        return Status::Corruption("mnemod sent export bytes at offset " + std::to_string(chunk->offset) +
                                  ", expected " + std::to_string(received));
      }
      XXH3_64bits_update(&hash, chunk->data.data(), chunk->data.size());
      received += chunk->data.size();
      if (Status st = sink(chunk->data); !st.ok()) {
        conn_->Abandon(sent.id, *sent.call);
        return st;
      }
      continue;
    }
    if (auto* done = std::get_if<ExportDone>(&*event)) {
      if (done->bytes != received || done->checksum != XXH3_64bits_digest(&hash))
        return Status::Corruption("export of session '" + std::string(session) + "' arrived damaged: " +
                                  std::to_string(received) + " bytes received of " + std::to_string(done->bytes) +
                                  (done->bytes == received ? ", checksum mismatch" : ""));
      return *done;
    }
    return Status::Corruption("mnemod answered ExportSession with " + std::string(ResponseName(*event)));
  }
}

Result<ExportDone> Client::ExportSessionToFile(std::string_view session, const std::string& path,
                                               ExportStats* stats) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status::FromErrno("open " + tmp, errno);
  auto sink = [&](std::string_view piece) -> Status {
    while (!piece.empty()) {
      const ssize_t n = ::write(fd, piece.data(), piece.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno("write " + tmp, errno);
      }
      piece.remove_prefix(static_cast<size_t>(n));
    }
    return Status::Ok();
  };
  Result<ExportDone> done = ExportSession(session, sink, stats);
  Status st = done.status();
  if (st.ok() && ::fsync(fd) != 0) st = Status::FromErrno("fsync " + tmp, errno);
  if (::close(fd) != 0 && st.ok()) st = Status::FromErrno("close " + tmp, errno);
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) st = Status::FromErrno("rename " + tmp, errno);
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  return done;
}

Result<SessionInfo> Client::ImportSession(const std::function<Result<std::string>()>& source,
                                          std::optional<std::string> new_name) {
  if (!conn_) return Status::FailedPrecondition("client was moved from");
  if (new_name) MNEMO_RETURN_IF_ERROR(protocol::ValidateSessionName(*new_name));
  MNEMO_ASSIGN_OR_RETURN(std::string piece, source());
  protocol::ImportSessionRequest req;
  req.name = std::move(new_name);
  uint64_t offset = 0;
  // Reads ahead one piece so the last one is marked.
  std::string next;
  auto read_next = [&]() -> Status {
    next.clear();
    MNEMO_ASSIGN_OR_RETURN(next, source());
    return Status::Ok();
  };
  // Pieces larger than a frame allows are split (mnemod's frame limit may
  // be configured as low as 4 KiB; a frame adds at most ~300 bytes).
  const size_t piece_max = std::min<size_t>(protocol::kTransferChunkBytes,
                                            std::max<size_t>(hello_.max_frame_bytes, 2048) - 1024);
  auto split = [&](std::string& p, std::string* rest) {
    if (p.size() > piece_max) {
      rest->assign(p, piece_max);
      p.resize(piece_max);
    }
  };
  std::string rest;
  split(piece, &rest);
  if (rest.empty()) MNEMO_RETURN_IF_ERROR(read_next());
  req.offset = 0;
  req.data = std::move(piece);
  req.last = rest.empty() && next.empty();
  offset = req.data.size();
  MNEMO_ASSIGN_OR_RETURN(auto sent, conn_->Send(req, /*streaming=*/false, /*discard=*/false));
  protocol::ImportSessionRequest more;
  bool last = req.last;
  while (!last) {
    // The daemon answers early when the import fails: stop sending then.
    if (conn_->Answered(*sent.call)) break;
    std::string p;
    if (!rest.empty()) {
      p = std::move(rest);
      rest.clear();
    } else {
      p = std::move(next);
      next.clear();
    }
    split(p, &rest);
    if (rest.empty()) {
      if (Status st = read_next(); !st.ok()) {
        conn_->Abandon(sent.id, *sent.call);
        return st;
      }
    }
    more.offset = offset;
    more.data = std::move(p);
    more.last = rest.empty() && next.empty();
    offset += more.data.size();
    last = more.last;
    if (Status st = conn_->SendMore(sent.id, more); !st.ok()) return st;
  }
  MNEMO_ASSIGN_OR_RETURN(auto reply, conn_->Wait(*sent.call, nullptr));
  if (auto* e = std::get_if<protocol::ErrorReply>(&reply)) return e->ToStatus();
  return Expect<SessionInfo>(std::move(reply), "ImportSession");
}

Result<SessionInfo> Client::ImportSessionFromFile(const std::string& path, std::optional<std::string> new_name) {
  const int fd = path == "-" ? ::dup(STDIN_FILENO) : ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno("open " + path, errno);
  auto source = [&]() -> Result<std::string> {
    std::string buf(protocol::kTransferChunkBytes, '\0');
    size_t have = 0;
    while (have < buf.size()) {
      const ssize_t n = ::read(fd, buf.data() + have, buf.size() - have);
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno("read " + path, errno);
      }
      if (n == 0) break;
      have += static_cast<size_t>(n);
    }
    buf.resize(have);
    return buf;
  };
  Result<SessionInfo> r = ImportSession(source, std::move(new_name));
  ::close(fd);
  return r;
}

}  // namespace mnemo::client
