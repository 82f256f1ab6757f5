// Fork/join: generation counter, spin-then-futex wait, open/close joining,
// shared task counter.
#include "kernels/cpu/thread_pool.h"

#include <chrono>
#include <string>

#include "common/check.h"
#include "common/thread_name.h"

namespace mnemo::kernels::cpu {
namespace {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// How long an idle worker spins before sleeping: long enough to cover the
// gap between two ops of a decode step, short enough not to burn a core
// while the engine waits for requests.
constexpr auto kSpin = std::chrono::microseconds(300);

// How long the caller spins at a join before it sleeps (~100 us): longer
// than the imbalance of a step's ops, shorter than a preempted worker's
// absence.
constexpr uint32_t kJoinSpins = 4096;

constexpr uint64_t kOpen = uint64_t{1} << 31;
constexpr uint64_t kJoinedMask = kOpen - 1;
inline uint32_t GenOf(uint64_t s) { return static_cast<uint32_t>(s >> 32); }

}  // namespace

ThreadPool::ThreadPool(int threads) : segments_(new Segment[static_cast<size_t>(threads)]) {
  MNEMO_CHECK(threads >= 1);
  workers_.reserve(static_cast<size_t>(threads - 1));
  for (int i = 1; i < threads; ++i) {
    workers_.emplace_back([this, i] {
      SetThreadName(("mnemo-cpu-" + std::to_string(i)).c_str());
      WorkerLoop(i);
    });
  }
}

ThreadPool::~ThreadPool() {
  stop_ = true;
  generation_.fetch_add(1);
  generation_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::DrainTasks(int worker) {
  const int n = size();
  for (int k = 0; k < n; ++k) {
    Segment& seg = segments_[static_cast<size_t>((worker + k) % n)];
    for (;;) {
      const int64_t t = seg.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= seg.end) break;
      fn_(ctx_, t, worker);
    }
  }
}

void ThreadPool::Run(int64_t n_tasks, TaskFn fn, void* ctx) {
  n_tasks_ = n_tasks;
  fn_ = fn;
  ctx_ = ctx;
  const int n = size();
  for (int w = 0; w < n; ++w) {
    segments_[static_cast<size_t>(w)].next.store(n_tasks * w / n, std::memory_order_relaxed);
    segments_[static_cast<size_t>(w)].end = n_tasks * (w + 1) / n;
  }
  finished_.store(0, std::memory_order_relaxed);
  const uint32_t gen = generation_.load(std::memory_order_relaxed) + 1;
  // Release: a worker whose join CAS reads this sees the job above.
  state_.store((static_cast<uint64_t>(gen) << 32) | kOpen, std::memory_order_release);
  // seq_cst pairs with the worker's sleepers_ increment: either we see the
  // sleeper and notify, or the sleeper sees the new generation.
  generation_.store(gen);
  if (sleepers_.load() > 0) generation_.notify_all();
  DrainTasks(0);
  // Close the job; only the workers that joined can still be running tasks.
  const uint64_t closed = state_.fetch_and(~kOpen, std::memory_order_acq_rel);
  const uint32_t joined = static_cast<uint32_t>(closed & kJoinedMask);
  uint32_t spins = 0;
  for (;;) {
    uint32_t f = finished_.load(std::memory_order_acquire);
    if (f == joined) break;
    if (++spins <= kJoinSpins) {
      CpuRelax();
      continue;
    }
    // A worker is off its core mid-task (preempted, say by an I/O thread):
    // sleep rather than spin or yield, so that this core goes idle and the
    // kernel moves the late worker onto it. seq_cst pairs with the
    // worker's finished_ increment: either it sees joiner_sleeps_ and
    // wakes us, or we see its increment.
    joiner_sleeps_.store(true);
    f = finished_.load();
    if (f != joined) finished_.wait(f);
    joiner_sleeps_.store(false, std::memory_order_relaxed);
  }
}

void ThreadPool::WorkerLoop(int worker) {
  uint32_t seen = 0;
  for (;;) {
    uint32_t gen = generation_.load(std::memory_order_acquire);
    if (gen == seen) {
      const auto deadline = std::chrono::steady_clock::now() + kSpin;
      for (uint32_t i = 1;; ++i) {
        CpuRelax();
        gen = generation_.load(std::memory_order_acquire);
        if (gen != seen) break;
        if ((i & 63) == 0 && std::chrono::steady_clock::now() > deadline) {
          sleepers_.fetch_add(1);
          generation_.wait(seen);
          sleepers_.fetch_sub(1);
          gen = generation_.load(std::memory_order_acquire);
          if (gen != seen) break;
        }
      }
    }
    seen = gen;
    if (stop_) return;
    // Join the newest job if it is still open.
    uint64_t s = state_.load(std::memory_order_acquire);
    bool joined = false;
    while ((s & kOpen) != 0) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel,
                                       std::memory_order_acquire)) {
        joined = true;
        break;
      }
    }
    if (!joined) continue;  // closed already: wait for the next generation
    seen = GenOf(s);
    DrainTasks(worker);
    finished_.fetch_add(1);
    if (joiner_sleeps_.load()) finished_.notify_all();
  }
}

}  // namespace mnemo::kernels::cpu
