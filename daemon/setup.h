// What mnemod builds from its configuration at start-up: the data directory
// lock, the engine options, and the session storage options (KV geometry and
// model fingerprint). Shared with mnemo-bench synth, which writes sessions
// straight into a data directory and must agree with mnemod on all of it.
//
// Thread-safe (pure functions, apart from the lock's file).
#pragma once

#include "common/status.h"
#include "daemon/config.h"
#include "model/engine.h"
#include "tiering/tier_manager.h"

namespace mnemo::daemon {

// One process per data directory: an exclusive flock on
// <dir>/mnemod.lock held for the process's life (the kernel drops it on any
// exit, kill -9 included). Creates the directory. Returns the lock's fd;
// AlreadyExists when another process holds it.
Result<int> LockDataDir(const std::string& dir);

// Matches cfg.page_tokens to an existing data directory, whose page store
// was laid out for one KV page size. Not given (cfg.page_tokens_given
// false): it becomes the directory's size, logged when that differs from
// the default, so that data written before a change of default still
// opens. Given and different: FailedPrecondition naming both sizes. A
// directory without a page store, T2 off, or a model that cannot be read
// here (Engine::Open reports it) leave cfg as it is. Reads only the model's
// GGUF header.
Status AdoptDataDirPageTokens(DaemonConfig& cfg);

// The engine mnemod runs with under `cfg`.
model::EngineOptions EngineOptionsFor(const DaemonConfig& cfg);

// The session storage of `cfg` for KV computed by `engine`: data directory,
// budgets, model fingerprint, KV geometry and page size.
tiering::TierOptions TierOptionsFor(const DaemonConfig& cfg, model::Engine& engine);

}  // namespace mnemo::daemon
