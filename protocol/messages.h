// The builders that encode every protocol message (plain forms in types.h)
// into frames and the validators that turn a verified wire message into them.
// Daemon and client share these, so field rules live in exactly one place.
//
// Conversation: each request (id != 0) receives zero or more TokenChunk /
// PrefillProgress / ExportChunk frames, then exactly one terminal frame: its
// reply (HelloReply, SessionInfo, SessionList, Ack, StatsReply, HealthReply,
// Done, ExportDone) or an Error. Errors about the connection as a whole
// carry id 0. An import is the one request sent as several frames (every
// ImportSession piece on one id), answered once.
//
// Thread-safe: the functions are pure; the structs are plain values.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "common/status.h"
#include "protocol/framing.h"
#include "protocol/mnemo_generated.h"
#include "protocol/types.h"

namespace mnemo::protocol {

// True for the message types that end a request's stream.
bool IsTerminal(wire::Message type);
bool IsRequest(wire::Message type);

// ------------------------------------------------------------------ encode
// Each returns one complete frame (header included). Encoding does not
// validate: the receiving side does (ParseRequest / ParseResponse).

std::string EncodeRequest(uint64_t id, const RequestBody& body);
std::string EncodeResponse(uint64_t id, const ResponseBody& body);
inline std::string EncodeError(uint64_t id, const Status& status) {
  return EncodeResponse(id, ErrorReply::FromStatus(status));
}

// ------------------------------------------------------------------- parse
// InvalidArgument for a field out of range, a missing required field, a
// response where a request is expected (and vice versa), or invalid UTF-8
// in text fields.

Result<HelloRequest> ParseHello(const wire::Hello* m);
Result<CreateSessionRequest> ParseCreateSession(const wire::CreateSession* m);
Result<GenerateRequest> ParseGenerate(const wire::Generate* m);
Result<CancelRequest> ParseCancel(const wire::Cancel* m);
Result<GetSessionRequest> ParseGetSession(const wire::GetSession* m);
Result<ForkSessionRequest> ParseForkSession(const wire::ForkSession* m);
Result<DeleteSessionRequest> ParseDeleteSession(const wire::DeleteSession* m);
Result<ExportSessionRequest> ParseExportSession(const wire::ExportSession* m);
Result<ImportSessionRequest> ParseImportSession(const wire::ImportSession* m);

// A verified frame (FrameView::frame) into a request; checks id != 0.
Result<Request> ParseRequest(const wire::Frame* frame);
Result<Response> ParseResponse(const wire::Frame* frame);

}  // namespace mnemo::protocol
