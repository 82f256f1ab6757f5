// A fork/join thread pool for the CPU backend: the caller is worker 0 and
// the other workers wait for a generation counter to change, spinning
// briefly (a decode step issues hundreds of jobs of a few microseconds)
// before sleeping on a futex.
//
// Thread-compatible: one thread calls Run/ParallelFor at a time (the
// backend's driver); the job itself runs on all workers concurrently.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

namespace mnemo::kernels::cpu {

class ThreadPool {
 public:
  // `threads` workers including the caller; at least 1.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(task, worker) once for every task in [0, n_tasks). Each worker
  // owns a contiguous segment of the tasks and runs it in order (one
  // sequential stream of weights per thread for the prefetchers), then
  // steals what is left of the others' segments. Returns when all are done.
  // `worker` is in [0, size()) and unique among concurrently running calls.
  template <class F>
  void ParallelFor(int64_t n_tasks, F&& fn) {
    if (n_tasks <= 0) return;
    if (n_tasks == 1 || workers_.empty()) {
      for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
      return;
    }
    Run(n_tasks, [](void* ctx, int64_t task, int worker) { (*static_cast<F*>(ctx))(task, worker); },
        &fn);
  }

 private:
  using TaskFn = void (*)(void* ctx, int64_t task, int worker);

  void Run(int64_t n_tasks, TaskFn fn, void* ctx);
  void WorkerLoop(int worker);
  void DrainTasks(int worker);

  // Constant after construction.
  std::vector<std::thread> workers_;

  // The current job: written by the caller before it opens the job in
  // state_, read by workers after they join it.
  int64_t n_tasks_ = 0;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  bool stop_ = false;

  // Workers wait (spin, then futex) for generation_ to change.
  alignas(64) std::atomic<uint32_t> generation_{0};
  // Job generation (high 32 bits) | open flag (bit 31) | workers joined.
  // A worker may only join an open job, so the caller never waits for a
  // worker that was not scheduled while the job ran; it closes the job when
  // its own share is done and waits just for those that joined.
  alignas(64) std::atomic<uint64_t> state_{0};
  struct alignas(64) Segment {
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::unique_ptr<Segment[]> segments_;  // one per worker, constant count
  alignas(64) std::atomic<uint32_t> finished_{0};  // joined workers done
  std::atomic<bool> joiner_sleeps_{false};          // the caller blocked on finished_
  alignas(64) std::atomic<int> sleepers_{0};       // workers blocked in wait()
};

}  // namespace mnemo::kernels::cpu
