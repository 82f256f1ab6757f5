// mnemo's C++ client: one connection to mnemod over its Unix socket, session
// calls, and streaming text generation. Installed as <mnemo/client.h>
// (CMake: find_package(mnemo) and link mnemo::client).
//
// Every call returns Status / Result<T>; errors the daemon reports keep the
// daemon's code (NotFound for an unknown session, OutOfRange for a prompt
// over the context limit, ...). Requests are validated locally first, so a
// malformed one fails early with InvalidArgument without a round trip.
// When the connection drops, every waiting call and every later call gets
// Unavailable ("connection to mnemod lost: ..."); a daemon that sends bytes
// which are not valid frames gets Corruption. Nothing here throws.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "common/status.h"
#include "protocol/types.h"

namespace mnemo::client {

// The protocol's plain message types, under the client's namespace.
using protocol::ChatMessage;
using protocol::Done;
using protocol::ExportDone;
using protocol::FinishReason;
using protocol::GenerateRequest;
using protocol::HealthReply;
using protocol::HealthStatus;
using protocol::HelloReply;
using protocol::PrefillProgress;
using protocol::SamplingOptions;
using protocol::SessionInfo;
using protocol::StatsReply;
using protocol::TierUsage;
using protocol::TokenChunk;

// The socket mnemod listens on by default: $MNEMO_SOCKET if set, else
// $XDG_RUNTIME_DIR/mnemo/mnemod.sock if XDG_RUNTIME_DIR is set, else
// /run/mnemo/mnemod.sock for root, else /tmp/mnemo-<uid>/mnemod.sock; a
// per-user path that does not exist yields to the system service's socket
// /run/mnemo/mnemod.sock when that one exists.
std::string DefaultSocketPath();

// "stop", "eos", "length", "cancelled", "error", "context_full".
std::string_view FinishReasonName(FinishReason reason);
// "serving", "starting", "draining".
std::string_view HealthStatusName(HealthStatus status);

struct ConnectOptions {
  std::string socket_path;  // empty: DefaultSocketPath()
  // Bounds connecting and the Hello exchange together; zero waits forever.
  std::chrono::milliseconds connect_timeout{5000};
  std::string client_name = "mnemo-client";  // shown in the daemon's logs
  // Largest reply frame accepted; a larger length prefix is Corruption.
  uint32_t max_reply_frame_bytes = protocol::kMaxFrameBytesCeiling;
  // Unread chunk/progress events buffered per generation; a consumer that
  // falls further behind gets ResourceExhausted and the request is cancelled.
  size_t max_queued_events = size_t{1} << 16;
  // Unread export bytes held per ExportSession, whatever the session's
  // size: past it the client stops reading the socket until the sink has
  // taken the pieces, and the daemon's flow control holds back the rest. One
  // piece (at most protocol::kTransferChunkBytes) always fits.
  size_t max_export_buffered_bytes = size_t{4} << 20;
};

// What an export held in the client (tests, tuning).
struct ExportStats {
  // The most ExportChunk bytes received and not yet handed to the sink at
  // once; at most max(ConnectOptions::max_export_buffered_bytes, one piece).
  uint64_t peak_buffered_bytes = 0;
};

namespace internal {
class Connection;
struct Call;
}  // namespace internal

// One event of a generation: a chunk of text, prefill progress, or the
// terminal Done (an Error arrives as the Result's status instead).
using StreamEvent = std::variant<TokenChunk, PrefillProgress, Done>;

// A generation in flight, pulled event by event.
//
// Thread-compatible for Next(); Cancel() and id() may be called from any
// thread at any time, also while another thread blocks in Next(). Destroying
// an unfinished stream cancels the request. The stream keeps the connection
// alive, but closing the Client makes Next() return Unavailable.
class GenerateStream {
 public:
  GenerateStream(GenerateStream&& other) noexcept;
  GenerateStream& operator=(GenerateStream&& other) noexcept;
  GenerateStream(const GenerateStream&) = delete;
  GenerateStream& operator=(const GenerateStream&) = delete;
  ~GenerateStream();

  // The request id: what Client::Cancel() takes.
  uint64_t id() const { return id_; }

  // Blocks for the next event. The stream ends with Done, or with an error
  // (the daemon's code, Cancelled, Unavailable when the connection dropped);
  // after that it returns FailedPrecondition.
  Result<StreamEvent> Next();

  // Asks the daemon to stop; the stream then ends with Done (finish reason
  // Cancelled) or a Cancelled error. Does not wait for either. Only fails
  // when the request cannot be sent (Unavailable).
  Status Cancel();

  // True once Next() has returned the terminal event or an error.
  bool finished() const { return finished_; }

 private:
  friend class Client;
  GenerateStream(std::shared_ptr<internal::Connection> conn, std::shared_ptr<internal::Call> call, uint64_t id);
  void Abandon();

  std::shared_ptr<internal::Connection> conn_;
  std::shared_ptr<internal::Call> call_;
  uint64_t id_ = 0;
  bool finished_ = false;
};

// Callbacks of Client::Generate, run on the calling thread, in stream order.
struct Callbacks {
  // Returning false cancels the generation; later chunks are not delivered.
  std::function<bool(const TokenChunk&)> on_chunk;
  std::function<void(const PrefillProgress&)> on_progress;
};

struct GenerateResult {
  std::string text;                // the chunks' text, concatenated
  std::vector<int32_t> token_ids;  // the generated tokens
  Done done;
};

// A connection to mnemod.
//
// mnemod closes connections idle for longer than its --idle-timeout; the
// next call then returns Unavailable and the caller connects again.
//
// Thread-safe: any number of threads may issue calls at once; their requests
// travel interleaved on the one connection and each reply is routed to its
// caller by request id. A background thread reads the socket. Move and
// destruction need external synchronization; destruction closes the
// connection and makes waiting calls and live streams return Unavailable.
class Client {
 public:
  // Connects, exchanges Hello and keeps the daemon's reply.
  // NotFound: no socket at the path; Unavailable: nothing accepts on it, or
  // no Hello reply within connect_timeout; PermissionDenied: the socket's
  // mode shuts this user out; Unsupported: another protocol version.
  static Result<Client> Connect(const ConnectOptions& options = {});

  Client(Client&& other) noexcept;
  Client& operator=(Client&& other) noexcept;
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  ~Client();

  // The daemon's Hello reply: versions, model, context and frame limits.
  const HelloReply& hello() const { return hello_; }
  const std::string& socket_path() const { return socket_path_; }
  // False once the connection dropped or was closed.
  bool connected() const;
  // Closes the connection now; later calls return Unavailable. Idempotent.
  void Close();

  // Sessions. `name` nullopt: the daemon picks one.
  Result<SessionInfo> CreateSession(std::optional<std::string> name = std::nullopt);
  Result<std::vector<SessionInfo>> ListSessions();
  Result<SessionInfo> GetSession(std::string_view session);
  // Returns the new session `dst`, sharing `src`'s history.
  Result<SessionInfo> ForkSession(std::string_view src, std::string_view dst);
  Status DeleteSession(std::string_view session);

  Result<StatsReply> Stats(bool prometheus = false);
  Result<HealthReply> Health();

  // Session export and import: a session travels as one checksummed file
  // (the daemon's export format) between daemons with the same model file
  // and KV layout. Both need a mnemod with T2 storage (else Unsupported).
  //
  // Streams session `session` as an export file to `sink`, piece by piece
  // in order (pieces are borrowed for the call; a non-OK return cancels the
  // export and is returned). The size and XXH3 of what arrived are checked
  // against the daemon's: Corruption on a mismatch. FailedPrecondition
  // while the session's latest turn is not persisted or a generation runs.
  // Memory stays within ConnectOptions::max_export_buffered_bytes: a slow
  // sink slows the daemon down. While the bound is reached the connection
  // reads nothing else, so other calls on this Client wait for the sink;
  // the sink must not wait for them. `stats` (optional) is filled in however
  // the export ends.
  Result<ExportDone> ExportSession(std::string_view session,
                                   const std::function<Status(std::string_view piece)>& sink,
                                   ExportStats* stats = nullptr);
  // To a file: written to `path`.tmp as pieces arrive, synced, then renamed
  // to `path`; on any error the temporary file is removed and `path` is
  // untouched.
  Result<ExportDone> ExportSessionToFile(std::string_view session, const std::string& path,
                                         ExportStats* stats = nullptr);
  // Imports an export file whose bytes `source` returns piece by piece (an
  // empty piece ends the file; an error aborts the import). The session is
  // named `new_name`, else as in the file. The daemon verifies the whole
  // file before anything becomes visible: Corruption for a damaged or
  // truncated file, FailedPrecondition for another model or KV layout,
  // AlreadyExists for a name this user already has.
  Result<SessionInfo> ImportSession(const std::function<Result<std::string>()>& source,
                                    std::optional<std::string> new_name = std::nullopt);
  Result<SessionInfo> ImportSessionFromFile(const std::string& path,
                                            std::optional<std::string> new_name = std::nullopt);

  // Cancels the generation with request id `request_id` (GenerateStream::id)
  // and waits for the daemon's acknowledgement. Idempotent: cancelling a
  // request that already finished (or never existed) is acknowledged too,
  // since a request can always end just before its cancel arrives.
  Status Cancel(uint64_t request_id);

  // Generation, three ways.
  Result<GenerateStream> StartGenerate(const GenerateRequest& request);
  // Streams events to `callbacks` on this thread; returns the terminal Done
  // (finish reason Cancelled after a callback asked to stop, unless the
  // daemon answered the cancel with a Cancelled error, which is returned).
  Result<Done> Generate(const GenerateRequest& request, const Callbacks& callbacks);
  // Blocks until the generation ends and returns everything it produced.
  Result<GenerateResult> GenerateText(const GenerateRequest& request);

 private:
  Client(std::shared_ptr<internal::Connection> conn, std::string socket_path, HelloReply hello);

  // --- constant after Connect ------------------------------------------------
  std::shared_ptr<internal::Connection> conn_;
  std::string socket_path_;
  HelloReply hello_;
};

}  // namespace mnemo::client
