// PageStore's engine-independent parts: request validation, the synchronous
// conveniences, slab files (geometry record, lock, preallocation, fdatasync),
// buffers, and the factory that picks an engine.
#include "tiering/page_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>

#include "tiering/page_store_internal.h"

namespace mnemo::tiering {
namespace internal {

Status ErrnoStatus(std::string_view what, int err) {
  std::string m(what);
  m += ": ";
  m += std::strerror(err);
  if (err == ENOSPC || err == EDQUOT) return Status::ResourceExhausted(std::move(m));
  return Status::IOError(std::move(m));
}

PageStoreStats StatCounters::Snapshot() const {
  constexpr auto kRelaxed = std::memory_order_relaxed;
  PageStoreStats s;
  s.reads = reads.load(kRelaxed);
  s.writes = writes.load(kRelaxed);
  s.read_bytes = read_bytes.load(kRelaxed);
  s.write_bytes = write_bytes.load(kRelaxed);
  s.errors = errors.load(kRelaxed);
  s.resubmissions = resubmissions.load(kRelaxed);
  s.overflowed = overflowed.load(kRelaxed);
  s.fixed_buffer_ios = fixed_buffer_ios.load(kRelaxed);
  s.syncs = syncs.load(kRelaxed);
  s.read_latency = read_latency.Snapshot();
  s.write_latency = write_latency.Snapshot();
  s.sync_latency = sync_latency.Snapshot();
  return s;
}

namespace {

constexpr char kMetaName[] = "PAGESTORE";
constexpr char kLockName[] = "LOCK";
constexpr char kMetaMagic[] = "mnemo-t2-page-store 1";

Status FsyncFd(int fd, std::string_view what) {
  while (::fsync(fd) != 0) {
    if (errno != EINTR) return ErrnoStatus(what, errno);
  }
  return Status::Ok();
}

// Writes the geometry record atomically: temp file, fsync, rename, fsync dir.
Status WriteMeta(const std::string& dir, int dir_fd, size_t block_bytes, uint64_t blocks_per_slab) {
  const std::string tmp = dir + "/" + kMetaName + ".tmp";
  const std::string text = std::string(kMetaMagic) + "\nblock_bytes " + std::to_string(block_bytes) +
                           "\nblocks_per_slab " + std::to_string(blocks_per_slab) + "\n";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus("create " + tmp, errno);
  size_t off = 0;
  while (off < text.size()) {
    ssize_t n = ::write(fd, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      Status st = ErrnoStatus("write " + tmp, n < 0 ? errno : EIO);
      ::close(fd);
      return st;
    }
    off += static_cast<size_t>(n);
  }
  Status st = FsyncFd(fd, "fsync " + tmp);
  ::close(fd);
  MNEMO_RETURN_IF_ERROR(st);
  const std::string path = dir + "/" + kMetaName;
  if (::rename(tmp.c_str(), path.c_str()) != 0) return ErrnoStatus("rename " + tmp, errno);
  return FsyncFd(dir_fd, "fsync " + dir);
}

Status ReadMeta(const std::string& path, size_t* block_bytes, uint64_t* blocks_per_slab) {
  std::ifstream f(path);
  if (!f) return Status::IOError("cannot read " + path);
  std::string magic;
  std::getline(f, magic);
  std::string k1, k2;
  // A newer layout says so in the magic's version: refuse it as such.
  const std::string_view prefix(kMetaMagic, sizeof(kMetaMagic) - 2);  // "mnemo-t2-page-store "
  if (magic != kMetaMagic && magic.starts_with(prefix)) {
    const std::string version = magic.substr(prefix.size());
    if (!version.empty() && version.find_first_not_of("0123456789") == std::string::npos && version.size() < 10 &&
        std::stoul(version) > 1)
      return Status::FailedPrecondition(path + " has page store format version " + version +
                                        ", newer than the version 1 this mnemod reads; it was written by a newer "
                                        "mnemod. Run that version, or move the data directory aside to start "
                                        "empty. Nothing was modified.");
  }
  f >> k1 >> *block_bytes >> k2 >> *blocks_per_slab;
  if (magic != kMetaMagic || k1 != "block_bytes" || k2 != "blocks_per_slab" || !f)
    return Status::Corruption(path + ": not a mnemo page store geometry record");
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<SlabFiles>> SlabFiles::Open(const PageStoreOptions& o) {
  if (o.dir.empty()) return Status::InvalidArgument("page store: dir is empty");
  if (o.block_bytes == 0 || o.block_bytes % kDirectIoAlignment != 0)
    return Status::InvalidArgument("page store: block_bytes " + std::to_string(o.block_bytes) +
                                   " is not a positive multiple of 4096");
  if (o.slab_bytes < o.block_bytes)
    return Status::InvalidArgument("page store: slab_bytes is smaller than one block");
  if (o.budget_bytes < o.block_bytes)
    return Status::InvalidArgument("page store: budget_bytes " + std::to_string(o.budget_bytes) +
                                   " is smaller than one block (" + std::to_string(o.block_bytes) + ")");
  if (o.queue_depth == 0 || o.queue_depth > 4096)
    return Status::InvalidArgument("page store: queue_depth must be in [1, 4096]");
  if (o.max_outstanding < 2 * o.queue_depth)
    return Status::InvalidArgument("page store: max_outstanding must be at least twice queue_depth");

  std::unique_ptr<SlabFiles> s(new SlabFiles());
  s->dir_ = o.dir;
  s->block_bytes_ = o.block_bytes;
  s->blocks_per_slab_ = o.slab_bytes / o.block_bytes;
  s->direct_io_ = o.direct_io;

  std::error_code ec;
  if (!std::filesystem::is_directory(o.dir, ec)) {
    if (!o.create_if_missing) return Status::NotFound("page store directory " + o.dir + " does not exist");
    std::filesystem::create_directories(o.dir, ec);
    if (ec) return ErrnoStatus("create directory " + o.dir, ec.value());
  }
  s->dir_fd_ = ::open(o.dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (s->dir_fd_ < 0) return ErrnoStatus("open " + o.dir, errno);
  const std::string lock_path = o.dir + "/" + kLockName;
  s->lock_fd_ = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (s->lock_fd_ < 0) return ErrnoStatus("open " + lock_path, errno);
  if (::flock(s->lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK)
      return Status::FailedPrecondition("page store " + o.dir + " is open elsewhere (" + lock_path +
                                        " is locked)");
    return ErrnoStatus("flock " + lock_path, errno);
  }

  // Geometry record: written once, checked on every reopen.
  const std::string meta_path = o.dir + "/" + kMetaName;
  struct stat st {};
  if (::stat(meta_path.c_str(), &st) == 0) {
    size_t bb = 0;
    uint64_t bps = 0;
    MNEMO_RETURN_IF_ERROR(ReadMeta(meta_path, &bb, &bps));
    if (bb != s->block_bytes_)
      return Status::InvalidArgument("page store " + o.dir + " holds blocks of " + std::to_string(bb) +
                                     " bytes; asked for blocks of " + std::to_string(s->block_bytes_));
    if (bps == 0) return Status::Corruption(meta_path + ": zero blocks per slab");
    if (bps != s->blocks_per_slab_) {
      // The slab size only places blocks in files: the recorded one stays.
      spdlog::info("page store {}: keeping its slab size of {} blocks (asked for {})", o.dir, bps,
                   s->blocks_per_slab_);
      s->blocks_per_slab_ = bps;
    }
  } else {
    if (::stat(s->SlabPath(0).c_str(), &st) == 0)
      return Status::Corruption("page store " + o.dir + " has slab files but no " + kMetaName);
    MNEMO_RETURN_IF_ERROR(WriteMeta(o.dir, s->dir_fd_, s->block_bytes_, s->blocks_per_slab_));
  }
  if (o.direct_io) {
    // Probe: some file systems (older tmpfs) refuse O_DIRECT at open.
    int probe = ::open(meta_path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (probe < 0) {
      if (errno == EINVAL)
        return Status::Unsupported("page store: the file system of " + o.dir + " does not support O_DIRECT");
      return ErrnoStatus("open " + meta_path, errno);
    }
    ::close(probe);
  }

  // Existing slabs: consecutive from 0.
  std::vector<uint64_t> sizes;
  while (::stat(s->SlabPath(static_cast<uint32_t>(sizes.size())).c_str(), &st) == 0)
    sizes.push_back(static_cast<uint64_t>(st.st_size));
  uint64_t existing_slots = 0;
  for (size_t i = 0; i < sizes.size(); ++i)
    existing_slots += i + 1 < sizes.size() ? s->blocks_per_slab_
                                           : std::min(s->blocks_per_slab_, sizes[i] / s->block_bytes_);
  const uint64_t budget_slots = o.budget_bytes / o.block_bytes;
  s->max_slots_ = std::max(budget_slots, existing_slots);
  if (existing_slots > budget_slots)
    spdlog::warn("page store {}: {} blocks exist, more than the budget's {}; keeping them", o.dir,
                 existing_slots, budget_slots);
  s->max_slabs_ = static_cast<uint32_t>((s->max_slots_ + s->blocks_per_slab_ - 1) / s->blocks_per_slab_);
  s->fds_.reset(new int[s->max_slabs_]);
  s->dirty_.reset(new std::atomic<uint8_t>[s->max_slabs_]);
  s->slab_blocks_.reset(new uint64_t[s->max_slabs_]);
  for (uint32_t i = 0; i < s->max_slabs_; ++i) {
    s->fds_[i] = -1;
    s->dirty_[i].store(0, std::memory_order_relaxed);
    s->slab_blocks_[i] = 0;
  }
  uint64_t slots = 0;
  for (uint32_t i = 0; i < sizes.size(); ++i) {
    const uint64_t blocks = i + 1 < sizes.size() ? s->blocks_per_slab_
                                                 : std::min(s->blocks_per_slab_, sizes[i] / s->block_bytes_);
    bool created = false;
    // Also completes a growth that a crash interrupted (a short middle slab).
    MNEMO_RETURN_IF_ERROR(s->GrowSlab(i, blocks, &created));
    s->slab_blocks_[i] = blocks;
    slots += blocks;
  }
  s->n_slabs_.store(static_cast<uint32_t>(sizes.size()), std::memory_order_release);
  s->capacity_slots_.store(slots, std::memory_order_release);
  return s;
}

SlabFiles::~SlabFiles() {
  if (fds_) {
    for (uint32_t i = 0; i < max_slabs_; ++i)
      if (fds_[i] >= 0) ::close(fds_[i]);
  }
  if (dir_fd_ >= 0) ::close(dir_fd_);
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the flock
}

std::string SlabFiles::SlabPath(uint32_t i) const {
  char name[32];
  std::snprintf(name, sizeof(name), "/slab-%06u", i);
  return dir_ + name;
}

Status SlabFiles::GrowSlab(uint32_t i, uint64_t blocks, bool* created) {
  const std::string path = SlabPath(i);
  *created = false;
  if (fds_[i] < 0) {
    struct stat st {};
    *created = ::stat(path.c_str(), &st) != 0;
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | (direct_io_ ? O_DIRECT : 0), 0644);
    if (fd < 0) {
      if (errno == EINVAL && direct_io_)
        return Status::Unsupported("page store: the file system of " + dir_ + " does not support O_DIRECT");
      return ErrnoStatus("open " + path, errno);
    }
    fds_[i] = fd;
  }
  const int fd = fds_[i];
  struct stat st {};
  if (::fstat(fd, &st) != 0) return ErrnoStatus("fstat " + path, errno);
  const off_t size = st.st_size;
  const off_t target = static_cast<off_t>(blocks * block_bytes_);
  if (size < target) {
    int rc;
    do {
      rc = ::fallocate(fd, 0, size, target - size);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0 && (errno == EOPNOTSUPP || errno == ENOSYS)) {
      static std::once_flag warned;
      std::call_once(warned, [&] {
        spdlog::warn("page store {}: fallocate unsupported; slab files are sparse (ENOSPC may surface on write)",
                     dir_);
      });
      rc = ::ftruncate(fd, target);
    }
    if (rc != 0) {
      Status err = ErrnoStatus("preallocate " + path + " to " + std::to_string(target) + " bytes", errno);
      (void)::ftruncate(fd, size);  // give back a partial allocation
      return err;
    }
    MNEMO_RETURN_IF_ERROR(FsyncFd(fd, "fsync " + path));
  }
  if (*created) MNEMO_RETURN_IF_ERROR(FsyncFd(dir_fd_, "fsync " + dir_));
  return Status::Ok();
}

Status SlabFiles::EnsureCapacity(uint64_t slots, const std::function<Status(uint32_t, int)>& on_new_slab) {
  if (slots <= capacity_slots()) return Status::Ok();
  if (slots > max_slots_)
    return Status::ResourceExhausted("T2 budget: " + std::to_string(slots) + " blocks requested, the budget holds " +
                                     std::to_string(max_slots_) + " of " + std::to_string(block_bytes_) + " bytes");
  std::lock_guard<std::mutex> l(grow_mu_);
  const uint64_t target = std::min(max_slots_, (slots + blocks_per_slab_ - 1) / blocks_per_slab_ * blocks_per_slab_);
  uint64_t cap = capacity_slots();
  while (cap < target) {
    const uint32_t i = static_cast<uint32_t>(cap / blocks_per_slab_);
    const uint64_t blocks = std::min(blocks_per_slab_, target - uint64_t{i} * blocks_per_slab_);
    bool created = false;
    MNEMO_RETURN_IF_ERROR(GrowSlab(i, blocks, &created));
    if (i >= n_slabs()) {
      MNEMO_RETURN_IF_ERROR(on_new_slab(i, fds_[i]));
      n_slabs_.store(i + 1, std::memory_order_release);
    }
    slab_blocks_[i] = blocks;
    cap = uint64_t{i} * blocks_per_slab_ + blocks;
    capacity_slots_.store(cap, std::memory_order_release);
  }
  return Status::Ok();
}

Status SlabFiles::Sync(StatCounters* stats) {
  std::lock_guard<std::mutex> l(sync_mu_);
  Status first;
  const uint32_t n = n_slabs();
  for (uint32_t i = 0; i < n; ++i) {
    if (dirty_[i].exchange(0, std::memory_order_acq_rel) == 0) continue;
    int rc;
    const uint64_t t0 = MonotonicNs();
    do {
      rc = ::fdatasync(fds_[i]);
    } while (rc != 0 && errno == EINTR);
    stats->sync_latency.Record(MonotonicNs() - t0);
    stats->syncs.fetch_add(1, std::memory_order_relaxed);
    if (rc != 0) {
      const int err = errno;
      dirty_[i].store(1, std::memory_order_release);
      if (first.ok()) first = ErrnoStatus("fdatasync " + SlabPath(i), err);
    }
  }
  return first;
}

}  // namespace internal

// ---------------------------------------------------------------------------
// PageStore: validation and the synchronous conveniences.

Status PageStore::Validate(const IoRequest& r) const {
  if (r.callback == nullptr) return Status::InvalidArgument("page store request without a callback");
  if (r.iov_count > 0) {
    if (r.op != IoOp::kRead) return Status::InvalidArgument("page store: only reads scatter (iov)");
    if (r.iov == nullptr || r.iov_count > kMaxIov)
      return Status::InvalidArgument("page store scatter read of " + std::to_string(r.iov_count) +
                                     " pieces (at most " + std::to_string(kMaxIov) + ")");
    size_t sum = 0;
    for (uint32_t i = 0; i < r.iov_count; ++i) {
      const iovec& v = r.iov[i];
      if (v.iov_base == nullptr || reinterpret_cast<uintptr_t>(v.iov_base) % kDirectIoAlignment != 0 ||
          v.iov_len == 0 || v.iov_len % kDirectIoAlignment != 0)
        return Status::InvalidArgument("page store scatter piece " + std::to_string(i) +
                                       " is not a 4096-aligned, 4096-multiple buffer");
      sum += v.iov_len;
    }
    if (sum != r.length)
      return Status::InvalidArgument("page store scatter pieces hold " + std::to_string(sum) +
                                     " bytes, the request " + std::to_string(r.length));
  } else if (r.buf == nullptr || reinterpret_cast<uintptr_t>(r.buf) % kDirectIoAlignment != 0) {
    return Status::InvalidArgument("page store request buffer is not aligned to 4096 bytes");
  }
  if (r.length == 0 || r.length % kDirectIoAlignment != 0 || r.offset % kDirectIoAlignment != 0 ||
      r.offset > block_bytes() || r.length > block_bytes() - r.offset)
    return Status::InvalidArgument("page store request range [" + std::to_string(r.offset) + ", +" +
                                   std::to_string(r.length) + ") is not 4096-aligned inside a block of " +
                                   std::to_string(block_bytes()) + " bytes");
  if (r.slot >= capacity_slots())
    return Status::OutOfRange("page store slot " + std::to_string(r.slot) + " is past the capacity of " +
                              std::to_string(capacity_slots()) + " blocks (EnsureCapacity first)");
  return Status::Ok();
}

namespace {

// Completion counter of one synchronous call; lives on its caller's stack.
struct Waiter {
  std::mutex mu;
  std::condition_variable cv;
  size_t outstanding = 0;  // guarded by mu
};

void WaiterDone(IoRequest* r) {
  auto* w = static_cast<Waiter*>(r->user);
  // Notify under the lock: once it is released the waiter may return and
  // destroy *w.
  std::lock_guard<std::mutex> l(w->mu);
  --w->outstanding;
  w->cv.notify_one();
}

}  // namespace

Status PageStore::Execute(std::span<IoRequest> reqs) {
  MNEMO_CHECK_MSG(!OnIoThread(), "synchronous PageStore call on the store's own I/O thread");
  if (reqs.empty()) return Status::Ok();
  const size_t window = std::max<size_t>(1, 2 * size_t{queue_depth()});
  Waiter w;
  std::vector<IoRequest*> batch;
  batch.reserve(std::min(window, reqs.size()));
  Status submit_error;
  size_t next = 0;
  std::unique_lock<std::mutex> lock(w.mu);
  while (next < reqs.size()) {
    w.cv.wait(lock, [&] { return w.outstanding < window; });
    const size_t n = std::min(window - w.outstanding, reqs.size() - next);
    batch.clear();
    for (size_t i = next; i < next + n; ++i) {
      reqs[i].callback = &WaiterDone;
      reqs[i].user = &w;
      reqs[i].status = Status::Ok();
      batch.push_back(&reqs[i]);
    }
    w.outstanding += n;
    lock.unlock();
    Status st = Submit(batch);
    lock.lock();
    if (!st.ok()) {  // nothing of this batch was queued
      w.outstanding -= n;
      submit_error = st;
      break;
    }
    next += n;
  }
  w.cv.wait(lock, [&] { return w.outstanding == 0; });
  lock.unlock();
  for (size_t i = 0; i < next; ++i)
    if (!reqs[i].status.ok()) return reqs[i].status;
  return submit_error;
}

Status PageStore::WriteBlocks(std::span<const BlockSlot> slots, std::span<const void* const> bufs) {
  if (slots.size() != bufs.size()) return Status::InvalidArgument("WriteBlocks: slots and buffers differ in count");
  std::vector<IoRequest> reqs(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    reqs[i].op = IoOp::kWrite;
    reqs[i].slot = slots[i];
    reqs[i].offset = 0;
    reqs[i].length = block_bytes();
    reqs[i].buf = const_cast<void*>(bufs[i]);  // written from, never into
  }
  return Execute(reqs);
}

Status PageStore::ReadBlocks(std::span<const BlockSlot> slots, std::span<void* const> bufs) {
  if (slots.size() != bufs.size()) return Status::InvalidArgument("ReadBlocks: slots and buffers differ in count");
  std::vector<IoRequest> reqs(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    reqs[i].op = IoOp::kRead;
    reqs[i].slot = slots[i];
    reqs[i].offset = 0;
    reqs[i].length = block_bytes();
    reqs[i].buf = bufs[i];
  }
  return Execute(reqs);
}

Status PageStore::Write(BlockSlot slot, size_t offset, size_t length, const void* buf) {
  IoRequest r;
  r.op = IoOp::kWrite;
  r.slot = slot;
  r.offset = offset;
  r.length = length;
  r.buf = const_cast<void*>(buf);
  return Execute({&r, 1});
}

Status PageStore::Read(BlockSlot slot, size_t offset, size_t length, void* buf) {
  IoRequest r;
  r.op = IoOp::kRead;
  r.slot = slot;
  r.offset = offset;
  r.length = length;
  r.buf = buf;
  return Execute({&r, 1});
}

// ---------------------------------------------------------------------------
// Buffers.

Result<AlignedBuffer> AlignedBuffer::Allocate(size_t bytes) {
  AlignedBuffer b;
  if (bytes == 0) return b;
  const size_t size = AlignUp(bytes, kDirectIoAlignment);
  // Anonymous mappings are page-aligned and zero-filled lazily.
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return Status::ResourceExhausted("cannot allocate an aligned buffer of " + std::to_string(size) + " bytes");
  b.data_ = static_cast<uint8_t*>(p);
  b.size_ = size;
  return b;
}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& o) noexcept {
  if (this != &o) {
    if (data_) ::munmap(data_, size_);
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

AlignedBuffer::~AlignedBuffer() {
  if (data_) ::munmap(data_, size_);
}

Result<std::unique_ptr<IoBufferArena>> IoBufferArena::Create(PageStore* store, size_t buffer_bytes,
                                                             size_t n_buffers) {
  if (buffer_bytes == 0 || n_buffers == 0 || n_buffers > UINT32_MAX)
    return Status::InvalidArgument("IoBufferArena: empty or oversized arena");
  buffer_bytes = AlignUp(buffer_bytes, kDirectIoAlignment);
  MNEMO_ASSIGN_OR_RETURN(AlignedBuffer mem, AlignedBuffer::Allocate(buffer_bytes * n_buffers));
  std::unique_ptr<IoBufferArena> a(new IoBufferArena(store, std::move(mem), buffer_bytes, n_buffers));
  Status st = store->RegisterBuffers(a->mem_.data(), a->mem_.size());
  if (st.ok()) {
    a->registered_ = true;
  } else {
    spdlog::warn("page store: I/O buffers not registered, using the plain path: {}", st.ToString());
  }
  return a;
}

IoBufferArena::IoBufferArena(PageStore* store, AlignedBuffer mem, size_t buffer_bytes, size_t n_buffers)
    : store_(store), mem_(std::move(mem)), buffer_bytes_(buffer_bytes), n_buffers_(n_buffers) {
  free_.reserve(n_buffers);
  for (size_t i = n_buffers; i-- > 0;) free_.push_back(static_cast<uint32_t>(i));
}

IoBufferArena::~IoBufferArena() {
  if (registered_) store_->UnregisterBuffers(mem_.data());
}

void* IoBufferArena::Acquire() {
  std::lock_guard<std::mutex> l(mu_);
  if (free_.empty()) return nullptr;
  const uint32_t i = free_.back();
  free_.pop_back();
  return buffer(i);
}

void IoBufferArena::Release(void* buf) {
  const auto off = static_cast<size_t>(static_cast<uint8_t*>(buf) - mem_.data());
  MNEMO_CHECK(off < mem_.size() && off % buffer_bytes_ == 0);
  std::lock_guard<std::mutex> l(mu_);
  MNEMO_CHECK(free_.size() < n_buffers_);
  free_.push_back(static_cast<uint32_t>(off / buffer_bytes_));
}

// ---------------------------------------------------------------------------
// Factory.

Result<std::optional<size_t>> RecordedBlockBytes(const std::string& dir) {
  const std::string meta_path = dir + "/" + internal::kMetaName;
  struct stat st {};
  if (::stat(meta_path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::optional<size_t>();
    return internal::ErrnoStatus("stat " + meta_path, errno);
  }
  size_t block_bytes = 0;
  uint64_t blocks_per_slab = 0;
  MNEMO_RETURN_IF_ERROR(internal::ReadMeta(meta_path, &block_bytes, &blocks_per_slab));
  return std::optional<size_t>(block_bytes);
}

Result<std::unique_ptr<PageStore>> OpenPageStore(const PageStoreOptions& options) {
  using Engine = PageStoreOptions::Engine;
  if (options.engine == Engine::kPread) return OpenPreadPageStore(options);
  if (options.engine == Engine::kUring) return OpenUringPageStore(options);
  auto uring = OpenUringPageStore(options);
  if (uring.ok()) {
    spdlog::info("T2 page store {}: io_uring, queue depth {}, {} blocks of {} bytes (budget {})", options.dir,
                 options.queue_depth, (*uring)->capacity_slots(), options.block_bytes, (*uring)->max_slots());
    return uring;
  }
  if (uring.status().code() != StatusCode::kUnsupported || uring.status().message().find("O_DIRECT") !=
                                                                std::string_view::npos)
    return uring.status();
  spdlog::warn("T2 page store {}: io_uring unavailable ({}); using pread/pwrite on {} threads", options.dir,
               uring.status().ToString(), options.pread_threads);
  return OpenPreadPageStore(options);
}

}  // namespace mnemo::tiering
