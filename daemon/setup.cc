// Start-up pieces of mnemod shared with mnemo-bench synth.
#include "daemon/setup.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <memory>
#include <optional>

#include <spdlog/spdlog.h>

#include "model/gguf.h"
#include "model/llama.h"

namespace mnemo::daemon {

Result<int> LockDataDir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::IOError("cannot create data directory " + dir + ": " + ec.message());
  const std::string path = dir + "/mnemod.lock";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return Status::FromErrno("open " + path, errno);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK)
      return Status::AlreadyExists("another mnemod is using the data directory " + dir);
    return Status::FromErrno("flock " + path, err);
  }
  return fd;
}

Status AdoptDataDirPageTokens(DaemonConfig& cfg) {
  if (cfg.t2_budget_bytes == 0) return Status::Ok();
  Result<std::unique_ptr<model::GgufFile>> file = model::GgufFile::Open(cfg.model_path);
  if (!file.ok()) return Status::Ok();
  Result<model::LlamaConfig> mc = model::ReadLlamaConfig(**file);
  if (!mc.ok()) return Status::Ok();
  const tiering::KvGeometry kv{mc->n_layers, cfg.page_tokens, mc->n_kv_heads, mc->head_dim,
                               tiering::KvDtype::kF16};
  Result<std::optional<int32_t>> stored = tiering::DataDirPageTokens(cfg.data_dir, kv);
  if (!stored.ok()) return stored.status().WithContext("data directory " + cfg.data_dir);
  if (!stored->has_value() || **stored == cfg.page_tokens) return Status::Ok();
  if (cfg.page_tokens_given)
    return Status::FailedPrecondition(
        "data directory " + cfg.data_dir + " was created with " + std::to_string(**stored) +
        "-token KV pages, and its sessions are stored in them; --page-tokens " + std::to_string(cfg.page_tokens) +
        " cannot open it. Leave --page-tokens out (or set it to " + std::to_string(**stored) +
        "), or give another --data-dir");
  spdlog::info("data directory {} was created with {}-token KV pages: using them (the default is {})",
               cfg.data_dir, **stored, cfg.page_tokens);
  cfg.page_tokens = **stored;
  return Status::Ok();
}

model::EngineOptions EngineOptionsFor(const DaemonConfig& cfg) {
  model::EngineOptions eo;
  eo.model_path = cfg.model_path;
  eo.threads = cfg.threads;
  eo.math = kernels::ParseMathMode(cfg.math).value_or(kernels::MathMode::kExact);
  eo.page_tokens = cfg.page_tokens;
  eo.kv_budget_bytes = cfg.t0_budget_bytes;
  eo.kv_reserve_bytes = cfg.t0_reserve_bytes;
  eo.prefill_chunk = cfg.prefill_chunk;
  eo.max_context = static_cast<int32_t>(cfg.max_context_tokens);
  return eo;
}

tiering::TierOptions TierOptionsFor(const DaemonConfig& cfg, model::Engine& engine) {
  const model::LlamaConfig& mc = engine.model().config();
  tiering::TierOptions to;
  to.data_dir = cfg.data_dir;
  to.t1_budget_bytes = cfg.t1_budget_bytes;
  to.t2_budget_bytes = cfg.t2_budget_bytes;
  to.model_fingerprint = engine.model().fingerprint();
  to.kv = tiering::KvGeometry{mc.n_layers, cfg.page_tokens, mc.n_kv_heads, mc.head_dim, tiering::KvDtype::kF16};
  to.page_bytes = engine.pool().page_bytes();
  return to;
}

}  // namespace mnemo::daemon
