// Sessions: an agent's conversation (token history, KV sequence, owner) and
// the table that names them per owning uid. A session is visible only to
// the uid that created it: every lookup takes the caller's uid, and another
// uid's session is indistinguishable from one that does not exist.
//
// Thread-compatible: confined to the scheduler thread.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "attention/kv_cache.h"
#include "common/status.h"
#include "protocol/messages.h"
#include "tiering/tier_manager.h"

namespace mnemo::daemon {

struct ActiveRequest;

struct Session {
  std::string name;
  uid_t owner = 0;
  std::string parent;  // fork source, empty if none
  // The whole history. KV exists for tokens[0, kv length of seq); the rest
  // (usually the last sampled token, or all of it after the KV was dropped
  // under memory pressure) is fed at the start of the next turn.
  std::vector<int32_t> tokens;
  attention::SeqId seq = 0;  // 0: no KV resident
  // Template text that must precede the next chat message: the rest of the
  // last assistant turn's end marker (e.g. "\n" after "<|im_end|>").
  std::string close_text;
  bool chat_open = false;  // the history ends inside an assistant turn
  uint32_t turns = 0;
  uint64_t created_unix_ms = 0;
  uint64_t last_used_unix_ms = 0;
  ActiveRequest* active = nullptr;  // the running Generate, if any
  // --- durability (tiering) ---------------------------------------------------
  tiering::CommittedKv t2;  // what the index holds; turn_seq 0: nothing committed
  bool persisted = false;   // the last turn (or the creation) is committed
  // Why the session cannot be resumed (another model or KV layout); OK if it can.
  Status resume_error;
};

class SessionTable {
 public:
  explicit SessionTable(uint32_t max_sessions_per_uid) : max_per_uid_(max_sessions_per_uid) {}

  // NotFound for an unknown name or another uid's session.
  Result<Session*> Find(uid_t uid, const std::string& name);
  // AlreadyExists when the uid has a session of that name; ResourceExhausted
  // at the per-uid limit. An absent name gets a fresh unique one.
  Result<Session*> Create(uid_t uid, std::optional<std::string> name, uint64_t now_unix_ms);
  void Erase(uid_t uid, const std::string& name);
  // Re-creates a session recovered from storage (no limit check).
  Session* Restore(uid_t uid, const std::string& name);
  // The uid's sessions, ordered by name.
  std::vector<Session*> List(uid_t uid);
  // Every session of every uid (for eviction and stats).
  std::vector<Session*> All();
  size_t size() const { return sessions_.size(); }
  uint32_t CountFor(uid_t uid) const;

 private:
  const uint32_t max_per_uid_;
  std::map<std::pair<uid_t, std::string>, std::unique_ptr<Session>> sessions_;
  uint64_t next_auto_ = 1;
};

}  // namespace mnemo::daemon
