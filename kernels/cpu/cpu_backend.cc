// The CPU Backend: splits each operation into tasks for its thread pool and
// runs the runtime-dispatched SIMD kernels on them.
#include <sched.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "common/check.h"
#include "kernels/backend.h"
#include "kernels/cpu/interleaved.h"
#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"
#include "kernels/cpu/thread_pool.h"

namespace mnemo::kernels {
namespace cpu {
namespace {

// Matmuls with at most this many activation rows stream the weights once,
// computing every row of x per weight tile (decode); larger ones tile x too.
constexpr int64_t kDecodeRows = 16;
// Activation rows per task in the tiled (prefill) regime: x tile in L2.
constexpr int64_t kPrefillRowsX = 48;
// Weight rows per task in the tiled regime.
constexpr int64_t kPrefillRowsW = 64;
// Most weights one MatMulShared call runs as one job.
constexpr size_t kMaxShared = 8;
// Element-wise ops smaller than this run on the calling thread alone.
constexpr int64_t kParallelElems = 1 << 15;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

int DefaultThreads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Thread-compatible (see Backend).
class CpuBackend final : public Backend {
 public:
  CpuBackend(int threads, MathMode math)
      : pool_(threads), scratch_(static_cast<size_t>(threads)), math_(math) {}
  ~CpuBackend() override {
    for (void* p : interleaved_) std::free(p);
  }

  std::string_view name() const override { return "cpu"; }
  int threads() const override { return pool_.size(); }

  // Buffers of 2 MiB and more (KV page chunks) start on a huge-page
  // boundary and ask for transparent huge pages (madvise mode, the usual
  // default), so that first use faults them in 2 MiB at a time.
  void* AllocBuffer(size_t bytes) override {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t align = bytes >= kHuge ? kHuge : bytes >= 4096 ? 4096 : 64;
    const size_t size = std::max<size_t>((bytes + align - 1) / align * align, align);
    void* p = std::aligned_alloc(align, size);
    if (p != nullptr && align == kHuge) (void)madvise(p, size, MADV_HUGEPAGE);
    return p;
  }
  void FreeBuffer(void* p) override { std::free(p); }
  void Prefault(void* p, size_t bytes) override {
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif
    // The whole pages inside the buffer in one call where the kernel can;
    // else a write to each page (the buffer is ours and unused: zeros).
    const uintptr_t b = reinterpret_cast<uintptr_t>(p);
    const uintptr_t lo = (b + 4095) & ~uintptr_t{4095}, hi = (b + bytes) & ~uintptr_t{4095};
    if (hi > lo && madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE) == 0) return;
    volatile uint8_t* c = static_cast<uint8_t*>(p);
    for (size_t o = 0; o < bytes; o += 4096) c[o] = 0;
  }
  Result<const void*> UploadWeight(const void* host, size_t bytes) override { return host; }
  // kFast: Q4_0, Q4_1 and Q8_0 weights are copied into the interleaved layout
  // (about their GGUF size again; the mmap'd file pages can then be dropped).
  Result<Weight> UploadMatrix(const Weight& host) override {
    if (math_ != MathMode::kFast || !HasInterleavedLayout(host.type) ||
        host.layout != WeightLayout::kRows) {
      return host;
    }
    const size_t bytes = InterleavedBytes(host.type, host.rows, host.cols);
    void* p = AllocBuffer(bytes);
    if (p == nullptr) return Status::ResourceExhausted("out of memory for the interleaved weights");
    interleaved_.push_back(p);
    Interleave(host.type, host.data, host.rows, host.cols, p);
    Weight w = host;
    w.data = p;
    w.layout = WeightLayout::kInterleaved;
    return w;
  }
  MathMode math_mode() const override { return math_; }
  void CopyToHost(void* dst_host, const void* src, size_t bytes) override {
    std::memcpy(dst_host, src, bytes);
  }
  void CopyFromHost(void* dst, const void* src_host, size_t bytes) override {
    std::memcpy(dst, src_host, bytes);
  }

  void MatMul(const Weight& w, const float* x, int64_t n, float* y) override {
    MatMulShared({&w, 1}, x, n, &y);
  }
  void MatMulShared(std::span<const Weight> w, const float* x, int64_t n,
                    float* const* y) override;
  void GetRows(const Weight& table, const int32_t* ids, int64_t n, float* out) override;
  void RmsNorm(const float* x, const float* gain, int64_t n, int64_t dim, float eps,
               float* y) override;
  void Rope(float* x, int64_t n, int32_t n_heads, int32_t head_dim, int32_t rot_dims,
            const int32_t* pos, float freq_base, RopeStyle style) override;
  void SiluMul(float* gate, const float* up, int64_t count) override;
  void Add(float* y, const float* x, int64_t count) override;
  void AddBias(float* y, const float* bias, int64_t n, int64_t dim) override;
  void WriteKv(const KvWriteArgs& args) override;
  void Attention(const AttentionArgs& args) override;

 private:
  uint8_t* ActBuffer(size_t bytes) {
    if (act_bytes_ < bytes) {
      act_bytes_ = (bytes + 4095) / 4096 * 4096;
      act_.reset(static_cast<uint8_t*>(std::aligned_alloc(4096, act_bytes_)));
      MNEMO_CHECK(act_ != nullptr);
    }
    return act_.get();
  }

  // Splits [0, count) into chunks for element-wise ops.
  template <class F>
  void ForChunks(int64_t count, F&& fn) {
    if (count < kParallelElems || pool_.size() == 1) {
      fn(int64_t{0}, count);
      return;
    }
    const int64_t chunk = std::max<int64_t>(4096, CeilDiv(count, 4 * pool_.size()) / 64 * 64);
    pool_.ParallelFor(CeilDiv(count, chunk), [&](int64_t t, int) {
      fn(t * chunk, std::min(count, (t + 1) * chunk));
    });
  }

  ThreadPool pool_;
  // Per-worker scratch (attention), sized on the driving thread before a job.
  std::vector<std::vector<float>> scratch_;
  std::vector<std::pair<int64_t, int64_t>> blocks_;  // attention token runs
  std::unique_ptr<uint8_t, FreeDeleter> act_;  // quantized activations
  size_t act_bytes_ = 0;
  const MathMode math_;
  std::vector<void*> interleaved_;  // UploadMatrix's copies
};

void CpuBackend::MatMulShared(std::span<const Weight> ws, const float* x, int64_t n,
                              float* const* ys) {
  if (n <= 0 || ws.empty()) return;
  const Weight& w0 = ws[0];
  for (const Weight& w : ws) {
    MNEMO_CHECK(IsWeightType(w.type));
    MNEMO_CHECK(w.cols % Info(w.type).block_elems == 0);
  }
  // One quantization of x serves weights of one activation type and width;
  // anything else runs as separate matmuls.
  for (const Weight& w : ws) {
    if (VecDotType(w.type) != VecDotType(w0.type) || w.cols != w0.cols) {
      for (size_t k = 0; k < ws.size(); ++k) MatMulShared(ws.subspan(k, 1), x, n, ys + k);
      return;
    }
  }
  MNEMO_CHECK(ws.size() <= kMaxShared);
  const ActFormat format = MakeActFormat(VecDotType(w0.type), w0.cols);
  uint8_t* act = ActBuffer(static_cast<size_t>(n) * format.row_bytes);

  // 1. Quantize x as llama.cpp does for this weight type.
  const int64_t q_rows_per_task = 8;
  if (n >= 2 * q_rows_per_task && pool_.size() > 1) {
    pool_.ParallelFor(CeilDiv(n, q_rows_per_task), [&](int64_t t, int) {
      for (int64_t i = t * q_rows_per_task; i < std::min(n, (t + 1) * q_rows_per_task); ++i) {
        QuantizeActRow(format, x + i * w0.cols, act + i * format.row_bytes);
      }
    });
  } else {
    for (int64_t i = 0; i < n; ++i) {
      QuantizeActRow(format, x + i * w0.cols, act + i * format.row_bytes);
    }
  }

  // 2. Output rows of every weight in block-aligned chunks, as one job; x
  // tiled only for long batches.
  struct Plan {
    GemmArgs args;
    int64_t rows_w, rows_x, tasks_w, first_task;
    bool interleaved;
  };
  Plan plans[kMaxShared];
  int64_t n_tasks = 0;
  for (size_t k = 0; k < ws.size(); ++k) {
    const Weight& w = ws[k];
    Plan& p = plans[k];
    p.args.w_type = w.type;
    p.args.w = static_cast<const uint8_t*>(w.data);
    p.args.w_row_bytes = w.row_bytes();
    p.args.x = act;
    p.args.format = format;
    p.args.y = ys[k];
    p.args.ldy = w.rows;
    p.interleaved = w.layout == WeightLayout::kInterleaved;
    if (n <= kDecodeRows) {
      p.rows_x = n;
      // Enough tasks per thread to absorb imbalance, each a multiple of the
      // 4-row tile (of the 16-row group when interleaved).
      const int64_t tile = p.interleaved ? kGroupRows : 4;
      p.rows_w = std::max<int64_t>(16, CeilDiv(CeilDiv(w.rows, 8 * pool_.size()), tile) * tile);
    } else {
      p.rows_x = kPrefillRowsX;
      p.rows_w = kPrefillRowsW;
    }
    p.tasks_w = CeilDiv(w.rows, p.rows_w);
    p.first_task = n_tasks;
    n_tasks += p.tasks_w * CeilDiv(n, p.rows_x);
  }
  const size_t n_weights = ws.size();
  pool_.ParallelFor(n_tasks, [&](int64_t t, int) {
    size_t k = 0;
    while (k + 1 < n_weights && t >= plans[k + 1].first_task) ++k;
    const Plan& p = plans[k];
    const int64_t rows = p.args.ldy;
    const int64_t tx = (t - p.first_task) / p.tasks_w;
    const int64_t tw = (t - p.first_task) % p.tasks_w;
    const int64_t r0 = tw * p.rows_w, r1 = std::min(rows, (tw + 1) * p.rows_w);
    const int64_t i0 = tx * p.rows_x, i1 = std::min(n, (tx + 1) * p.rows_x);
    if (p.interleaved) {
      GemmInterleaved(p.args, r0, r1, i0, i1);
    } else {
      Gemm(p.args, r0, r1, i0, i1);
    }
  });
}

void CpuBackend::GetRows(const Weight& table, const int32_t* ids, int64_t n, float* out) {
  MNEMO_CHECK(table.layout == WeightLayout::kRows);
  const size_t row_bytes = table.row_bytes();
  for (int64_t i = 0; i < n; ++i) {
    MNEMO_CHECK(ids[i] >= 0 && ids[i] < table.rows);
    ref::DequantizeRow(table.type, static_cast<const uint8_t*>(table.data) + ids[i] * row_bytes,
                       out + i * table.cols, table.cols);
  }
}

void CpuBackend::RmsNorm(const float* x, const float* gain, int64_t n, int64_t dim, float eps,
                         float* y) {
  if (n * dim < kParallelElems || n == 1) {
    for (int64_t i = 0; i < n; ++i) RmsNormRow(x + i * dim, gain, dim, eps, y + i * dim);
    return;
  }
  pool_.ParallelFor(n, [&](int64_t i, int) { RmsNormRow(x + i * dim, gain, dim, eps, y + i * dim); });
}

void CpuBackend::Rope(float* x, int64_t n, int32_t n_heads, int32_t head_dim, int32_t rot_dims,
                      const int32_t* pos, float freq_base, RopeStyle style) {
  MNEMO_CHECK(rot_dims % 2 == 0 && rot_dims <= head_dim && rot_dims <= 1024);
  const int32_t half = rot_dims / 2;
  // theta_i = pos * base^(-2i/rot_dims), built by repeated multiplication
  // in float exactly as GGML's rope cache, so angles match llama.cpp's.
  const float theta_scale = std::pow(freq_base, -2.0f / static_cast<float>(rot_dims));
  auto row = [&](int64_t t) {
    float cos_sin[1024];
    float theta = static_cast<float>(pos[t]);
    for (int32_t i = 0; i < half; ++i) {
      cos_sin[i] = std::cos(theta);
      cos_sin[half + i] = std::sin(theta);
      theta *= theta_scale;
    }
    RopeRow(x + t * static_cast<int64_t>(n_heads) * head_dim, n_heads, head_dim, rot_dims, cos_sin,
            style);
  };
  if (n < 4) {
    for (int64_t t = 0; t < n; ++t) row(t);
    return;
  }
  pool_.ParallelFor(n, [&](int64_t t, int) { row(t); });
}

void CpuBackend::SiluMul(float* gate, const float* up, int64_t count) {
  ForChunks(count, [&](int64_t b, int64_t e) { cpu::SiluMul(gate + b, up + b, e - b); });
}

void CpuBackend::Add(float* y, const float* x, int64_t count) {
  ForChunks(count, [&](int64_t b, int64_t e) { AddInPlace(y + b, x + b, e - b); });
}

void CpuBackend::AddBias(float* y, const float* bias, int64_t n, int64_t dim) {
  if (n * dim < kParallelElems || n == 1) {
    for (int64_t t = 0; t < n; ++t) AddInPlace(y + t * dim, bias, dim);
    return;
  }
  pool_.ParallelFor(n, [&](int64_t t, int) { AddInPlace(y + t * dim, bias, dim); });
}

void CpuBackend::WriteKv(const KvWriteArgs& a) {
  const KvLayout& L = a.layout;
  const int64_t kv_dim = static_cast<int64_t>(L.n_kv_heads) * L.head_dim;
  auto token = [&](int64_t t) {
    MNEMO_CHECK(a.slot[t] >= 0 && a.slot[t] < L.page_tokens);
    auto* page = static_cast<uint16_t*>(a.page[t]);
    for (int32_t h = 0; h < L.n_kv_heads; ++h) {
      F32ToF16Row(a.k + t * kv_dim + h * L.head_dim, page + L.k_offset(h, a.slot[t]), L.head_dim);
      F32ToF16Row(a.v + t * kv_dim + h * L.head_dim, page + L.v_offset(h, a.slot[t]), L.head_dim);
    }
  };
  if (a.n_tokens * kv_dim < kParallelElems) {
    for (int64_t t = 0; t < a.n_tokens; ++t) token(t);
    return;
  }
  pool_.ParallelFor(a.n_tokens, [&](int64_t t, int) { token(t); });
}

void CpuBackend::Attention(const AttentionArgs& a) {
  MNEMO_CHECK(a.layout.n_kv_heads > 0 && a.n_heads % a.layout.n_kv_heads == 0);
  const size_t floats = AttentionScratchFloats(a);
  for (auto& s : scratch_) {
    if (s.size() < floats) s.resize(floats);
  }
  // Runs of consecutive tokens of one sequence (prefill) share each pass over
  // the K/V pages; a lone token (decode) takes the per-token path, except in
  // MathMode::kFast, where every block takes the tiled one. A run of
  // R tokens splits into equal blocks of at most kAttentionBlockTokens,
  // enough of them that with the kv heads they share out evenly over the
  // threads when the call is that one run (a turn over a long history: 44
  // tokens, 3 kv heads, 2 threads make 2 blocks of 22, six items, rather
  // than 16 + 16 + 12, nine). Each block reads the sequence's K and V pages
  // once, so fewer, larger blocks also read less.
  const int32_t kv_heads = a.layout.n_kv_heads;
  blocks_.clear();
  for (int64_t t = 0; t < a.n_tokens;) {
    MNEMO_CHECK(a.seq[t] >= 0 && a.seq[t] < a.n_seqs);
    int64_t e = t + 1;
    while (e < a.n_tokens && a.seq[e] == a.seq[t]) ++e;
    const int64_t run = e - t;
    int64_t nb = (run + kAttentionBlockTokens - 1) / kAttentionBlockTokens;
    if (run == a.n_tokens) {
      const int64_t threads = pool_.size();
      for (int64_t k = nb; k < nb + threads && k <= run; ++k) {
        if ((k * kv_heads) % threads == 0) {
          nb = k;
          break;
        }
      }
    }
    for (int64_t b = 0; b < nb; ++b) blocks_.push_back({t + run * b / nb, t + run * (b + 1) / nb});
    t = e;
  }
  pool_.ParallelFor(static_cast<int64_t>(blocks_.size()) * kv_heads, [&](int64_t item, int worker) {
    const auto [t0, t1] = blocks_[static_cast<size_t>(item / kv_heads)];
    const int32_t kvh = static_cast<int32_t>(item % kv_heads);
    float* scratch = scratch_[static_cast<size_t>(worker)].data();
    if (math_ == MathMode::kFast) {
      AttentionTiled(a, t0, t1, kvh, scratch);
    } else if (t1 - t0 == 1) {
      AttentionItem(a, t0, kvh, scratch);
    } else {
      AttentionBlock(a, t0, t1, kvh, scratch);
    }
  });
}

}  // namespace
}  // namespace cpu

std::unique_ptr<Backend> MakeCpuBackend(int threads, MathMode math) {
  if (threads <= 0) threads = cpu::DefaultThreads();
  threads = std::min(threads, 256);
  if (math == MathMode::kFast && !cpu::CpuHasAvx512Vnni()) math = MathMode::kExact;
  return std::make_unique<cpu::CpuBackend>(threads, math);
}

}  // namespace mnemo::kernels
