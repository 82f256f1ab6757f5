// Builders and validators for every protocol message.
#include "protocol/messages.h"

#include <cmath>
#include <type_traits>

namespace mnemo::protocol {
namespace {

namespace fb = flatbuffers;

static_assert(static_cast<int>(wire::ErrorCode::MAX) == static_cast<int>(StatusCode::kUnavailable));
static_assert(static_cast<int>(wire::ErrorCode::InvalidArgument) == static_cast<int>(StatusCode::kInvalidArgument));
static_assert(static_cast<int>(wire::ErrorCode::ResourceExhausted) == static_cast<int>(StatusCode::kResourceExhausted));
static_assert(static_cast<int>(wire::FinishReason::MAX) == static_cast<int>(FinishReason::kContextFull));
static_assert(static_cast<int>(wire::HealthStatus::MAX) == static_cast<int>(HealthStatus::kDraining));

template <class... Ts>
struct Overloaded : Ts... {
  using Ts::operator()...;
};
template <class... Ts>
Overloaded(Ts...) -> Overloaded<Ts...>;

std::string_view View(const fb::String* s) { return s ? std::string_view(s->data(), s->size()) : std::string_view(); }
std::string Str(const fb::String* s) { return std::string(View(s)); }

fb::Offset<fb::String> OptString(fb::FlatBufferBuilder& b, std::string_view s) {
  return s.empty() ? fb::Offset<fb::String>() : b.CreateString(s);
}

std::string Finish(fb::FlatBufferBuilder& b, uint64_t id, wire::Message type, fb::Offset<void> msg) {
  wire::FrameBuilder fr(b);
  fr.add_id(id);
  fr.add_message_type(type);
  fr.add_message(msg);
  wire::FinishFrameBuffer(b, fr.Finish());
  return EncodeFrame(b);
}

Status Invalid(std::string_view what) { return Status::InvalidArgument(std::string(what)); }

Status CheckText(std::string_view field, std::string_view s, size_t max_bytes) {
  if (s.size() > max_bytes) return Invalid(std::string(field) + " longer than " + std::to_string(max_bytes) + " bytes");
  if (!IsValidUtf8(s)) return Invalid(std::string(field) + " is not valid UTF-8");
  return Status::Ok();
}

Status CheckFloat(std::string_view field, const std::optional<float>& v, float lo, float hi, bool lo_open = false) {
  if (!v) return Status::Ok();
  const float x = *v;
  if (!std::isfinite(x) || x < lo || x > hi || (lo_open && x == lo)) {
    return Invalid(std::string(field) + " = " + std::to_string(x) + " out of range " + (lo_open ? "(" : "[") +
                   std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
  return Status::Ok();
}

template <class T>
std::optional<T> Opt(fb::Optional<T> v) {
  if (!v.has_value()) return std::nullopt;
  return *v;
}

// ------------------------------------------------------------ build: requests

fb::Offset<void> Build(fb::FlatBufferBuilder& b, const HelloRequest& m) {
  auto name = OptString(b, m.client_name);
  wire::HelloBuilder mb(b);
  mb.add_protocol_version(m.protocol_version);
  mb.add_client_name(name);
  return mb.Finish().Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const CreateSessionRequest& m) {
  auto name = m.name ? b.CreateString(*m.name) : fb::Offset<fb::String>();
  wire::CreateSessionBuilder mb(b);
  mb.add_name(name);
  return mb.Finish().Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const GenerateRequest& m) {
  auto session = b.CreateString(m.session);
  fb::Offset<fb::Vector<fb::Offset<wire::ChatMessage>>> messages;
  if (!m.messages.empty()) {
    std::vector<fb::Offset<wire::ChatMessage>> v;
    v.reserve(m.messages.size());
    for (const auto& cm : m.messages) {
      v.push_back(wire::CreateChatMessage(b, b.CreateString(cm.role), b.CreateString(cm.content)));
    }
    messages = b.CreateVector(v);
  }
  auto text = m.text ? b.CreateString(*m.text) : fb::Offset<fb::String>();
  const SamplingOptions& s = m.sampling;
  wire::SamplingParamsBuilder sb(b);
  if (s.temperature) sb.add_temperature(*s.temperature);
  if (s.top_k) sb.add_top_k(*s.top_k);
  if (s.top_p) sb.add_top_p(*s.top_p);
  if (s.min_p) sb.add_min_p(*s.min_p);
  if (s.repeat_penalty) sb.add_repeat_penalty(*s.repeat_penalty);
  if (s.repeat_last_n) sb.add_repeat_last_n(*s.repeat_last_n);
  if (s.presence_penalty) sb.add_presence_penalty(*s.presence_penalty);
  if (s.frequency_penalty) sb.add_frequency_penalty(*s.frequency_penalty);
  if (s.seed) sb.add_seed(*s.seed);
  auto sampling = sb.Finish();
  auto stop = m.stop.empty() ? fb::Offset<fb::Vector<fb::Offset<fb::String>>>() : b.CreateVectorOfStrings(m.stop);
  wire::GenerateBuilder mb(b);
  mb.add_session(session);
  mb.add_messages(messages);
  mb.add_text(text);
  mb.add_sampling(sampling);
  mb.add_max_tokens(m.max_tokens);
  mb.add_stop(stop);
  return mb.Finish().Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const CancelRequest& m) {
  return wire::CreateCancel(b, m.target_id).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const ListSessionsRequest&) {
  return wire::CreateListSessions(b).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const GetSessionRequest& m) {
  return wire::CreateGetSession(b, b.CreateString(m.session)).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const ForkSessionRequest& m) {
  auto src = b.CreateString(m.src);
  auto dst = b.CreateString(m.dst);
  return wire::CreateForkSession(b, src, dst).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const DeleteSessionRequest& m) {
  return wire::CreateDeleteSession(b, b.CreateString(m.session)).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const StatsRequest& m) {
  return wire::CreateStats(b, m.prometheus).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const HealthRequest&) { return wire::CreateHealth(b).Union(); }
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const ExportSessionRequest& m) {
  return wire::CreateExportSession(b, b.CreateString(m.session)).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const ImportSessionRequest& m) {
  auto name = m.name ? b.CreateString(*m.name) : fb::Offset<fb::String>();
  auto data = b.CreateVector(reinterpret_cast<const uint8_t*>(m.data.data()), m.data.size());
  return wire::CreateImportSession(b, name, m.offset, data, m.last).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const ExportChunk& m) {
  auto data = b.CreateVector(reinterpret_cast<const uint8_t*>(m.data.data()), m.data.size());
  return wire::CreateExportChunk(b, m.offset, data).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const ExportDone& m) {
  return wire::CreateExportDone(b, m.bytes, m.checksum).Union();
}

// ----------------------------------------------------------- build: responses

fb::Offset<wire::SessionInfo> BuildInfo(fb::FlatBufferBuilder& b, const SessionInfo& m) {
  auto name = b.CreateString(m.name);
  auto parent = OptString(b, m.parent);
  wire::SessionInfoBuilder mb(b);
  mb.add_name(name);
  mb.add_parent(parent);
  mb.add_tokens(m.tokens);
  mb.add_turns(m.turns);
  mb.add_kv_pages(m.kv_pages);
  mb.add_kv_bytes(m.kv_bytes);
  mb.add_created_unix_ms(m.created_unix_ms);
  mb.add_last_used_unix_ms(m.last_used_unix_ms);
  mb.add_persisted(m.persisted);
  mb.add_t0_pages(m.t0_pages);
  mb.add_t1_pages(m.t1_pages);
  mb.add_t2_pages(m.t2_pages);
  return mb.Finish();
}

fb::Offset<void> Build(fb::FlatBufferBuilder& b, const HelloReply& m) {
  auto dv = b.CreateString(m.daemon_version);
  auto mn = b.CreateString(m.model_name);
  auto math = b.CreateString(m.math);
  return wire::CreateHelloReply(b, m.protocol_version, dv, mn, m.context_limit, m.max_frame_bytes, math)
      .Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const TokenChunk& m) {
  auto text = b.CreateString(m.text);
  auto ids = b.CreateVector(m.token_ids);
  return wire::CreateTokenChunk(b, text, ids).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const PrefillProgress& m) {
  return wire::CreatePrefillProgress(b, m.processed, m.total).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const Done& m) {
  fb::Offset<wire::Error> err = 0;
  if (m.persist_error_code != StatusCode::kOk) {
    auto msg = b.CreateString(m.persist_error);
    err = wire::CreateError(b, static_cast<wire::ErrorCode>(m.persist_error_code), msg);
  }
  return wire::CreateDone(b, static_cast<wire::FinishReason>(m.finish_reason), m.prompt_tokens, m.generated_tokens,
                          m.ttft_ms, m.decode_tokens_per_s, m.persisted, err)
      .Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const ErrorReply& m) {
  auto msg = b.CreateString(m.message);
  return wire::CreateError(b, static_cast<wire::ErrorCode>(m.code), msg).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const SessionInfo& m) { return BuildInfo(b, m).Union(); }
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const SessionList& m) {
  std::vector<fb::Offset<wire::SessionInfo>> v;
  v.reserve(m.sessions.size());
  for (const auto& s : m.sessions) v.push_back(BuildInfo(b, s));
  return wire::CreateSessionList(b, b.CreateVector(v)).Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const Ack&) { return wire::CreateAck(b).Union(); }
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const StatsReply& m) {
  std::vector<fb::Offset<wire::TierUsage>> tiers;
  for (const auto& t : m.tiers) {
    std::vector<fb::Offset<wire::IoLatency>> io;
    for (const auto& h : t.io_latency) {
      io.push_back(wire::CreateIoLatency(b, b.CreateString(h.op), h.count, h.sum_s, h.max_s,
                                         b.CreateVector(h.bucket_bounds_s), b.CreateVector(h.bucket_counts)));
    }
    auto name = b.CreateString(t.tier);
    auto iov = io.empty() ? fb::Offset<fb::Vector<fb::Offset<wire::IoLatency>>>() : b.CreateVector(io);
    tiers.push_back(wire::CreateTierUsage(b, name, t.pages, t.bytes, t.budget_bytes, t.hits, t.misses,
                                          t.bytes_read, t.bytes_written, iov, t.prefetch_hits,
                                          t.prefetch_stalls, t.prefetch_stall_s));
  }
  std::vector<fb::Offset<wire::ErrorCount>> errors;
  for (const auto& [code, count] : m.errors) {
    errors.push_back(wire::CreateErrorCount(b, static_cast<wire::ErrorCode>(code), count));
  }
  auto tv = b.CreateVector(tiers);
  auto ev = b.CreateVector(errors);
  auto prom = OptString(b, m.prometheus_text);
  auto transfer = [&](const TransferCounts& t) {
    std::vector<fb::Offset<wire::ErrorCount>> failed;
    for (const auto& [code, count] : t.failed)
      failed.push_back(wire::CreateErrorCount(b, static_cast<wire::ErrorCode>(code), count));
    return wire::CreateTransferCounts(b, t.started, t.completed, b.CreateVector(failed), t.bytes);
  };
  auto exports = transfer(m.exports);
  auto imports = transfer(m.imports);
  wire::StatsReplyBuilder mb(b);
  mb.add_requests_running(m.requests_running);
  mb.add_requests_waiting(m.requests_waiting);
  mb.add_connections(m.connections);
  mb.add_sessions(m.sessions);
  mb.add_prompt_tokens_total(m.prompt_tokens_total);
  mb.add_generated_tokens_total(m.generated_tokens_total);
  mb.add_ttft_ms_p50(m.ttft_ms_p50);
  mb.add_ttft_ms_p99(m.ttft_ms_p99);
  mb.add_inter_token_ms_p50(m.inter_token_ms_p50);
  mb.add_inter_token_ms_p99(m.inter_token_ms_p99);
  mb.add_uptime_s(m.uptime_s);
  mb.add_tiers(tv);
  mb.add_errors(ev);
  mb.add_prometheus_text(prom);
  mb.add_exports(exports);
  mb.add_imports(imports);
  return mb.Finish().Union();
}
fb::Offset<void> Build(fb::FlatBufferBuilder& b, const HealthReply& m) {
  auto msg = OptString(b, m.message);
  return wire::CreateHealthReply(b, static_cast<wire::HealthStatus>(m.status), m.model_loaded, m.uptime_s, msg)
      .Union();
}

template <class T>
constexpr wire::Message TypeOf() {
  if constexpr (std::is_same_v<T, HelloRequest>) return wire::Message::Hello;
  else if constexpr (std::is_same_v<T, CreateSessionRequest>) return wire::Message::CreateSession;
  else if constexpr (std::is_same_v<T, GenerateRequest>) return wire::Message::Generate;
  else if constexpr (std::is_same_v<T, CancelRequest>) return wire::Message::Cancel;
  else if constexpr (std::is_same_v<T, ListSessionsRequest>) return wire::Message::ListSessions;
  else if constexpr (std::is_same_v<T, GetSessionRequest>) return wire::Message::GetSession;
  else if constexpr (std::is_same_v<T, ForkSessionRequest>) return wire::Message::ForkSession;
  else if constexpr (std::is_same_v<T, DeleteSessionRequest>) return wire::Message::DeleteSession;
  else if constexpr (std::is_same_v<T, StatsRequest>) return wire::Message::Stats;
  else if constexpr (std::is_same_v<T, HealthRequest>) return wire::Message::Health;
  else if constexpr (std::is_same_v<T, HelloReply>) return wire::Message::HelloReply;
  else if constexpr (std::is_same_v<T, TokenChunk>) return wire::Message::TokenChunk;
  else if constexpr (std::is_same_v<T, PrefillProgress>) return wire::Message::PrefillProgress;
  else if constexpr (std::is_same_v<T, Done>) return wire::Message::Done;
  else if constexpr (std::is_same_v<T, ErrorReply>) return wire::Message::Error;
  else if constexpr (std::is_same_v<T, SessionInfo>) return wire::Message::SessionInfo;
  else if constexpr (std::is_same_v<T, SessionList>) return wire::Message::SessionList;
  else if constexpr (std::is_same_v<T, Ack>) return wire::Message::Ack;
  else if constexpr (std::is_same_v<T, StatsReply>) return wire::Message::StatsReply;
  else if constexpr (std::is_same_v<T, ExportSessionRequest>) return wire::Message::ExportSession;
  else if constexpr (std::is_same_v<T, ImportSessionRequest>) return wire::Message::ImportSession;
  else if constexpr (std::is_same_v<T, ExportChunk>) return wire::Message::ExportChunk;
  else if constexpr (std::is_same_v<T, ExportDone>) return wire::Message::ExportDone;
  else return wire::Message::HealthReply;
}

template <class Variant>
std::string EncodeVariant(uint64_t id, const Variant& body) {
  fb::FlatBufferBuilder b(256);
  return std::visit(
      [&](const auto& m) {
        using T = std::decay_t<decltype(m)>;
        auto off = Build(b, m);
        return Finish(b, id, TypeOf<T>(), off);
      },
      body);
}

// ------------------------------------------------------------ parse: responses

Result<TierUsage> ToTierUsage(const wire::TierUsage* t) {
  TierUsage u;
  u.tier = Str(t->tier());
  u.pages = t->pages();
  u.bytes = t->bytes();
  u.budget_bytes = t->budget_bytes();
  u.hits = t->hits();
  u.misses = t->misses();
  u.bytes_read = t->bytes_read();
  u.bytes_written = t->bytes_written();
  u.prefetch_hits = t->prefetch_hits();
  u.prefetch_stalls = t->prefetch_stalls();
  u.prefetch_stall_s = t->prefetch_stall_s();
  if (const auto* io = t->io_latency()) {
    if (io->size() > kMaxIoLatencies)
      return Invalid("StatsReply: tier " + u.tier + " has " + std::to_string(io->size()) + " latency histograms");
    for (const auto* h : *io) {
      IoLatency l;
      l.op = Str(h->op());
      l.count = h->count();
      l.sum_s = h->sum_s();
      l.max_s = h->max_s();
      const size_t nb = h->bucket_bounds_s() ? h->bucket_bounds_s()->size() : 0;
      const size_t nc = h->bucket_counts() ? h->bucket_counts()->size() : 0;
      if (nb > kMaxLatencyBuckets || (nc != nb + 1 && !(nb == 0 && nc == 0)))
        return Invalid("StatsReply: latency histogram " + u.tier + "/" + l.op + " has " + std::to_string(nb) +
                       " bounds and " + std::to_string(nc) + " counts");
      for (size_t i = 0; i < nb; ++i) {
        const double bound = h->bucket_bounds_s()->Get(static_cast<fb::uoffset_t>(i));
        if (!std::isfinite(bound) || (i > 0 && bound <= l.bucket_bounds_s.back()))
          return Invalid("StatsReply: latency histogram " + u.tier + "/" + l.op + " bounds are not ascending");
        l.bucket_bounds_s.push_back(bound);
      }
      for (size_t i = 0; i < nc; ++i) l.bucket_counts.push_back(h->bucket_counts()->Get(static_cast<fb::uoffset_t>(i)));
      u.io_latency.push_back(std::move(l));
    }
  }
  return u;
}

SessionInfo ToInfo(const wire::SessionInfo* m) {
  SessionInfo s;
  s.name = Str(m->name());
  s.parent = Str(m->parent());
  s.tokens = m->tokens();
  s.turns = m->turns();
  s.kv_pages = m->kv_pages();
  s.kv_bytes = m->kv_bytes();
  s.created_unix_ms = m->created_unix_ms();
  s.last_used_unix_ms = m->last_used_unix_ms();
  s.persisted = m->persisted();
  s.t0_pages = m->t0_pages();
  s.t1_pages = m->t1_pages();
  s.t2_pages = m->t2_pages();
  return s;
}

template <class T, class U>
Result<U> Wrap(Result<T> r) {
  if (!r.ok()) return r.status();
  return U{std::move(r).value()};
}

}  // namespace

// ------------------------------------------------------------------ public

bool IsValidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (n - i < len) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff)) {
      return false;
    }
    i += len;
  }
  return true;
}

Status ValidateSessionName(std::string_view name) {
  if (name.empty()) return Invalid("session name is empty");
  if (name.size() > kMaxSessionNameBytes) {
    return Invalid("session name longer than " + std::to_string(kMaxSessionNameBytes) + " bytes");
  }
  if (name[0] == '.') return Invalid("session name starts with '.'");
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-' || c == ':' || c == '@';
    if (!ok) return Invalid("session name has a character outside [A-Za-z0-9._:@-]");
  }
  return Status::Ok();
}

bool IsTerminal(wire::Message type) {
  return type != wire::Message::TokenChunk && type != wire::Message::PrefillProgress &&
         type != wire::Message::ExportChunk && !IsRequest(type) && type != wire::Message::NONE &&
         type <= wire::Message::MAX;
}

bool IsRequest(wire::Message type) {
  return (type >= wire::Message::Hello && type <= wire::Message::Health) || type == wire::Message::ExportSession ||
         type == wire::Message::ImportSession;
}

std::string EncodeRequest(uint64_t id, const RequestBody& body) { return EncodeVariant(id, body); }
std::string EncodeResponse(uint64_t id, const ResponseBody& body) { return EncodeVariant(id, body); }

Status ValidateGenerate(const GenerateRequest& r) {
  MNEMO_RETURN_IF_ERROR(ValidateSessionName(r.session).WithContext("Generate"));
  if (r.messages.empty() == !r.text.has_value()) {
    return Invalid("Generate: exactly one of messages and text must be set");
  }
  if (r.messages.size() > kMaxMessages) return Invalid("Generate: more than " + std::to_string(kMaxMessages) + " messages");
  for (const auto& m : r.messages) {
    if (m.role.empty()) return Invalid("Generate: message role is empty");
    MNEMO_RETURN_IF_ERROR(CheckText("Generate: message role", m.role, kMaxRoleBytes));
    MNEMO_RETURN_IF_ERROR(CheckText("Generate: message content", m.content, kMaxFrameBytesCeiling));
  }
  if (r.text) MNEMO_RETURN_IF_ERROR(CheckText("Generate: text", *r.text, kMaxFrameBytesCeiling));
  const SamplingOptions& s = r.sampling;
  MNEMO_RETURN_IF_ERROR(CheckFloat("Generate: temperature", s.temperature, 0, kMaxTemperature));
  if (s.top_k && *s.top_k < 0) return Invalid("Generate: top_k is negative");
  MNEMO_RETURN_IF_ERROR(CheckFloat("Generate: top_p", s.top_p, 0, 1));
  MNEMO_RETURN_IF_ERROR(CheckFloat("Generate: min_p", s.min_p, 0, 1));
  MNEMO_RETURN_IF_ERROR(CheckFloat("Generate: repeat_penalty", s.repeat_penalty, 0, kMaxRepeatPenalty, true));
  if (s.repeat_last_n && *s.repeat_last_n < -1) return Invalid("Generate: repeat_last_n below -1");
  MNEMO_RETURN_IF_ERROR(CheckFloat("Generate: presence_penalty", s.presence_penalty, -2, 2));
  MNEMO_RETURN_IF_ERROR(CheckFloat("Generate: frequency_penalty", s.frequency_penalty, -2, 2));
  if (r.stop.size() > kMaxStopStrings) {
    return Invalid("Generate: more than " + std::to_string(kMaxStopStrings) + " stop strings");
  }
  for (const auto& st : r.stop) {
    if (st.empty()) return Invalid("Generate: empty stop string");
    MNEMO_RETURN_IF_ERROR(CheckText("Generate: stop string", st, kMaxStopStringBytes));
  }
  return Status::Ok();
}

Result<HelloRequest> ParseHello(const wire::Hello* m) {
  HelloRequest r;
  r.protocol_version = m->protocol_version();
  if (r.protocol_version == 0) return Invalid("Hello: protocol_version is 0");
  r.client_name = Str(m->client_name());
  MNEMO_RETURN_IF_ERROR(CheckText("Hello: client_name", r.client_name, kMaxClientNameBytes));
  return r;
}

Result<CreateSessionRequest> ParseCreateSession(const wire::CreateSession* m) {
  CreateSessionRequest r;
  if (m->name() != nullptr) {
    r.name = Str(m->name());
    MNEMO_RETURN_IF_ERROR(ValidateSessionName(*r.name).WithContext("CreateSession"));
  }
  return r;
}

Result<GenerateRequest> ParseGenerate(const wire::Generate* m) {
  GenerateRequest r;
  r.session = Str(m->session());
  if (const auto* msgs = m->messages()) {
    if (msgs->size() > kMaxMessages) return Invalid("Generate: more than " + std::to_string(kMaxMessages) + " messages");
    if (msgs->size() == 0) return Invalid("Generate: messages is present but empty");
    r.messages.reserve(msgs->size());
    for (const auto* cm : *msgs) r.messages.push_back({Str(cm->role()), Str(cm->content())});
  }
  if (m->text() != nullptr) r.text = Str(m->text());
  if (const auto* s = m->sampling()) {
    r.sampling.temperature = Opt(s->temperature());
    r.sampling.top_k = Opt(s->top_k());
    r.sampling.top_p = Opt(s->top_p());
    r.sampling.min_p = Opt(s->min_p());
    r.sampling.repeat_penalty = Opt(s->repeat_penalty());
    r.sampling.repeat_last_n = Opt(s->repeat_last_n());
    r.sampling.presence_penalty = Opt(s->presence_penalty());
    r.sampling.frequency_penalty = Opt(s->frequency_penalty());
    r.sampling.seed = Opt(s->seed());
  }
  r.max_tokens = m->max_tokens();
  if (const auto* stop = m->stop()) {
    if (stop->size() > kMaxStopStrings) {
      return Invalid("Generate: more than " + std::to_string(kMaxStopStrings) + " stop strings");
    }
    for (const auto* st : *stop) r.stop.push_back(Str(st));
  }
  MNEMO_RETURN_IF_ERROR(ValidateGenerate(r));
  return r;
}

Result<CancelRequest> ParseCancel(const wire::Cancel* m) {
  if (m->target_id() == 0) return Invalid("Cancel: target_id is 0");
  return CancelRequest{m->target_id()};
}

Result<GetSessionRequest> ParseGetSession(const wire::GetSession* m) {
  GetSessionRequest r{Str(m->session())};
  MNEMO_RETURN_IF_ERROR(ValidateSessionName(r.session).WithContext("GetSession"));
  return r;
}

Result<ForkSessionRequest> ParseForkSession(const wire::ForkSession* m) {
  ForkSessionRequest r{Str(m->src()), Str(m->dst())};
  MNEMO_RETURN_IF_ERROR(ValidateSessionName(r.src).WithContext("ForkSession src"));
  MNEMO_RETURN_IF_ERROR(ValidateSessionName(r.dst).WithContext("ForkSession dst"));
  if (r.src == r.dst) return Invalid("ForkSession: src and dst are the same");
  return r;
}

Result<DeleteSessionRequest> ParseDeleteSession(const wire::DeleteSession* m) {
  DeleteSessionRequest r{Str(m->session())};
  MNEMO_RETURN_IF_ERROR(ValidateSessionName(r.session).WithContext("DeleteSession"));
  return r;
}

Result<ExportSessionRequest> ParseExportSession(const wire::ExportSession* m) {
  ExportSessionRequest r{Str(m->session())};
  MNEMO_RETURN_IF_ERROR(ValidateSessionName(r.session).WithContext("ExportSession"));
  return r;
}

Result<ImportSessionRequest> ParseImportSession(const wire::ImportSession* m) {
  ImportSessionRequest r;
  if (m->name() != nullptr) {
    r.name = Str(m->name());
    MNEMO_RETURN_IF_ERROR(ValidateSessionName(*r.name).WithContext("ImportSession"));
    if (m->offset() != 0) return Invalid("ImportSession: name is set on a piece other than the first");
  }
  r.offset = m->offset();
  if (m->data()) r.data.assign(reinterpret_cast<const char*>(m->data()->data()), m->data()->size());
  r.last = m->last();
  return r;
}

Result<Request> ParseRequest(const wire::Frame* f) {
  const uint64_t id = f->id();
  if (id == 0) return Invalid("request id 0 is reserved");
  if (f->message() == nullptr) return Invalid("frame without a message");
  auto body = [&]() -> Result<RequestBody> {
    switch (f->message_type()) {
      case wire::Message::Hello: return Wrap<HelloRequest, RequestBody>(ParseHello(f->message_as_Hello()));
      case wire::Message::CreateSession:
        return Wrap<CreateSessionRequest, RequestBody>(ParseCreateSession(f->message_as_CreateSession()));
      case wire::Message::Generate: return Wrap<GenerateRequest, RequestBody>(ParseGenerate(f->message_as_Generate()));
      case wire::Message::Cancel: return Wrap<CancelRequest, RequestBody>(ParseCancel(f->message_as_Cancel()));
      case wire::Message::ListSessions: return RequestBody{ListSessionsRequest{}};
      case wire::Message::GetSession:
        return Wrap<GetSessionRequest, RequestBody>(ParseGetSession(f->message_as_GetSession()));
      case wire::Message::ForkSession:
        return Wrap<ForkSessionRequest, RequestBody>(ParseForkSession(f->message_as_ForkSession()));
      case wire::Message::DeleteSession:
        return Wrap<DeleteSessionRequest, RequestBody>(ParseDeleteSession(f->message_as_DeleteSession()));
      case wire::Message::Stats: return RequestBody{StatsRequest{f->message_as_Stats()->prometheus()}};
      case wire::Message::Health: return RequestBody{HealthRequest{}};
      case wire::Message::ExportSession:
        return Wrap<ExportSessionRequest, RequestBody>(ParseExportSession(f->message_as_ExportSession()));
      case wire::Message::ImportSession:
        return Wrap<ImportSessionRequest, RequestBody>(ParseImportSession(f->message_as_ImportSession()));
      default:
        return Invalid("message type " + std::to_string(static_cast<unsigned>(f->message_type())) +
                       " is not a request");
    }
  }();
  if (!body.ok()) return body.status();
  return Request{id, std::move(body).value()};
}

Result<Response> ParseResponse(const wire::Frame* f) {
  if (f->message() == nullptr) return Invalid("frame without a message");
  Response out{f->id(), Ack{}};
  switch (f->message_type()) {
    case wire::Message::HelloReply: {
      const auto* m = f->message_as_HelloReply();
      out.body = HelloReply{m->protocol_version(), Str(m->daemon_version()), Str(m->model_name()),
                            m->context_limit(), m->max_frame_bytes(), Str(m->math())};
      break;
    }
    case wire::Message::TokenChunk: {
      const auto* m = f->message_as_TokenChunk();
      TokenChunk c{Str(m->text()), {}};
      if (m->token_ids()) c.token_ids.assign(m->token_ids()->begin(), m->token_ids()->end());
      out.body = std::move(c);
      break;
    }
    case wire::Message::PrefillProgress: {
      const auto* m = f->message_as_PrefillProgress();
      if (m->processed() > m->total()) return Invalid("PrefillProgress: processed > total");
      out.body = PrefillProgress{m->processed(), m->total()};
      break;
    }
    case wire::Message::Done: {
      const auto* m = f->message_as_Done();
      if (m->finish_reason() > wire::FinishReason::MAX) {
        return Invalid("Done: unknown finish reason " + std::to_string(static_cast<unsigned>(m->finish_reason())));
      }
      Done d{static_cast<FinishReason>(m->finish_reason()), m->prompt_tokens(), m->generated_tokens(),
             m->ttft_ms(), m->decode_tokens_per_s(), m->persisted(), StatusCode::kOk, {}};
      if (const auto* pe = m->persist_error()) {
        if (pe->code() > wire::ErrorCode::MAX || pe->code() == wire::ErrorCode::Ok)
          return Invalid("Done: bad persist error code " + std::to_string(static_cast<unsigned>(pe->code())));
        d.persist_error_code = static_cast<StatusCode>(pe->code());
        d.persist_error = Str(pe->message());
      }
      out.body = std::move(d);
      break;
    }
    case wire::Message::Error: {
      const auto* m = f->message_as_Error();
      ErrorReply e{static_cast<StatusCode>(m->code()), Str(m->message())};
      // A code from a newer peer, or Ok, which is no error: keep the reply an error.
      if (m->code() == wire::ErrorCode::Ok || m->code() > wire::ErrorCode::MAX) {
        e.message = "error code " + std::to_string(static_cast<unsigned>(m->code())) + ": " + e.message;
        e.code = StatusCode::kInternal;
      }
      out.body = std::move(e);
      break;
    }
    case wire::Message::SessionInfo: out.body = ToInfo(f->message_as_SessionInfo()); break;
    case wire::Message::SessionList: {
      SessionList l;
      if (const auto* v = f->message_as_SessionList()->sessions()) {
        for (const auto* s : *v) l.sessions.push_back(ToInfo(s));
      }
      out.body = std::move(l);
      break;
    }
    case wire::Message::Ack: out.body = Ack{}; break;
    case wire::Message::StatsReply: {
      const auto* m = f->message_as_StatsReply();
      StatsReply s;
      s.requests_running = m->requests_running();
      s.requests_waiting = m->requests_waiting();
      s.connections = m->connections();
      s.sessions = m->sessions();
      s.prompt_tokens_total = m->prompt_tokens_total();
      s.generated_tokens_total = m->generated_tokens_total();
      s.ttft_ms_p50 = m->ttft_ms_p50();
      s.ttft_ms_p99 = m->ttft_ms_p99();
      s.inter_token_ms_p50 = m->inter_token_ms_p50();
      s.inter_token_ms_p99 = m->inter_token_ms_p99();
      s.uptime_s = m->uptime_s();
      if (m->tiers()) {
        for (const auto* t : *m->tiers()) {
          Result<TierUsage> u = ToTierUsage(t);
          if (!u.ok()) return u.status();
          s.tiers.push_back(std::move(u).value());
        }
      }
      if (m->errors()) {
        for (const auto* e : *m->errors()) {
          if (e->code() > wire::ErrorCode::MAX) continue;  // from a newer peer
          s.errors.emplace_back(static_cast<StatusCode>(e->code()), e->count());
        }
      }
      s.prometheus_text = Str(m->prometheus_text());
      auto transfer = [](const wire::TransferCounts* w, TransferCounts* t) {
        if (w == nullptr) return;  // an older peer
        t->started = w->started();
        t->completed = w->completed();
        t->bytes = w->bytes();
        if (w->failed()) {
          for (const auto* e : *w->failed()) {
            if (e->code() > wire::ErrorCode::MAX) continue;  // from a newer peer
            t->failed.emplace_back(static_cast<StatusCode>(e->code()), e->count());
          }
        }
      };
      transfer(m->exports(), &s.exports);
      transfer(m->imports(), &s.imports);
      out.body = std::move(s);
      break;
    }
    case wire::Message::HealthReply: {
      const auto* m = f->message_as_HealthReply();
      if (m->status() > wire::HealthStatus::MAX) return Invalid("HealthReply: unknown status");
      out.body = HealthReply{static_cast<HealthStatus>(m->status()), m->model_loaded(), m->uptime_s(),
                             Str(m->message())};
      break;
    }
    case wire::Message::ExportChunk: {
      const auto* m = f->message_as_ExportChunk();
      ExportChunk c;
      c.offset = m->offset();
      if (m->data()) c.data.assign(reinterpret_cast<const char*>(m->data()->data()), m->data()->size());
      out.body = std::move(c);
      break;
    }
    case wire::Message::ExportDone: {
      const auto* m = f->message_as_ExportDone();
      out.body = ExportDone{m->bytes(), m->checksum()};
      break;
    }
    default:
      return Invalid("message type " + std::to_string(static_cast<unsigned>(f->message_type())) +
                     " is not a response");
  }
  return out;
}

}  // namespace mnemo::protocol
