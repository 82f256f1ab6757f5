// SessionTable: per-uid session namespaces with a per-uid bound.
#include "daemon/session.h"

#include <random>

namespace mnemo::daemon {

Result<Session*> SessionTable::Find(uid_t uid, const std::string& name) {
  auto it = sessions_.find({uid, name});
  // Same message whether the name is unknown or owned by another uid, so
  // probing reveals nothing about other tenants.
  if (it == sessions_.end()) return Status::NotFound("no session '" + name + "'");
  return it->second.get();
}

uint32_t SessionTable::CountFor(uid_t uid) const {
  uint32_t n = 0;
  for (auto it = sessions_.lower_bound({uid, std::string()});
       it != sessions_.end() && it->first.first == uid; ++it)
    ++n;
  return n;
}

Result<Session*> SessionTable::Create(uid_t uid, std::optional<std::string> name,
                                      uint64_t now_unix_ms) {
  if (name) {
    MNEMO_RETURN_IF_ERROR(protocol::ValidateSessionName(*name));
    if (sessions_.count({uid, *name})) return Status::AlreadyExists("session '" + *name + "' exists");
  }
  if (CountFor(uid) >= max_per_uid_)
    return Status::ResourceExhausted("session limit reached: " + std::to_string(max_per_uid_) +
                                     " sessions per user");
  if (!name) {
    static thread_local std::mt19937_64 rng(std::random_device{}());
    do {
      char buf[32];
      snprintf(buf, sizeof(buf), "s-%012llx",
               static_cast<unsigned long long>((rng() ^ next_auto_++) & 0xffffffffffffull));
      name = buf;
    } while (sessions_.count({uid, *name}));
  }
  auto s = std::make_unique<Session>();
  s->name = *name;
  s->owner = uid;
  s->created_unix_ms = s->last_used_unix_ms = now_unix_ms;
  Session* raw = s.get();
  sessions_.emplace(std::make_pair(uid, *name), std::move(s));
  return raw;
}

Session* SessionTable::Restore(uid_t uid, const std::string& name) {
  auto s = std::make_unique<Session>();
  s->name = name;
  s->owner = uid;
  Session* raw = s.get();
  sessions_[std::make_pair(uid, name)] = std::move(s);
  return raw;
}

void SessionTable::Erase(uid_t uid, const std::string& name) { sessions_.erase({uid, name}); }

std::vector<Session*> SessionTable::List(uid_t uid) {
  std::vector<Session*> out;
  for (auto it = sessions_.lower_bound({uid, std::string()});
       it != sessions_.end() && it->first.first == uid; ++it)
    out.push_back(it->second.get());
  return out;
}

std::vector<Session*> SessionTable::All() {
  std::vector<Session*> out;
  out.reserve(sessions_.size());
  for (auto& [k, v] : sessions_) out.push_back(v.get());
  return out;
}

}  // namespace mnemo::daemon
