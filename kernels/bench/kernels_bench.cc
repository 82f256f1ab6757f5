// mnemo-kernels-bench: the CPU backend's kernels at the default model's
// shapes, under Google Benchmark. What the engine's speed rests on, one
// kernel at a time: quantized matmuls (one activation row, the decode
// regime, which streams the weights; 16 rows, batched decode, which is
// compute bound; 512 rows, prefill), attention (a turn over a long
// history, batched decode), and the activation quantization every matmul
// starts with.
//
// Counters: `MAC/s` (multiply-accumulates per second, the compute rate),
// `weight_B/s` (weight bytes streamed per second: for one row, compare with
// the machine's memory bandwidth), `key_rows/s` for attention (query rows
// times keys visited per second).
//
//   mnemo-kernels-bench                                 # everything, 1 thread and all cores
//   mnemo-kernels-bench --benchmark_filter='BM_Model'   # one decode step's matmuls
//   mnemo-kernels-bench --benchmark_filter='BM_MatMul/3/'  # Q4_1 (DType 3)
//
// Ratios to read: BM_ModelMatMuls at n=1 against BM_ReadBandwidth with the
// same threads (decode streams every weight once per token: the weight
// bytes per second should approach the read bandwidth); MAC/s at n=16 and
// 512 against the core's peak (compute bound).
//
// No assertion here: timings belong to benchmarks, never to tests (CTest's
// KernelsBenchSmoke runs it briefly to keep it working).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/quants.h"

namespace mnemo::kernels {
namespace {

int AllCores() { return std::max(1, static_cast<int>(std::thread::hardware_concurrency())); }

// MNEMO_BENCH_MATH=fast runs the matmuls in MathMode::kFast.
MathMode BenchMath() {
  const char* env = std::getenv("MNEMO_BENCH_MATH");
  return ParseMathMode(env != nullptr ? env : "").value_or(MathMode::kExact);
}

// One backend per thread count, kept across benchmarks (its pool spins up
// once).
Backend& CpuWithThreads(int threads) {
  static std::map<int, std::unique_ptr<Backend>> backends;
  auto& b = backends[threads];
  if (!b) b = MakeCpuBackend(threads, BenchMath());
  return *b;
}

// Random payload bytes with sane block scales (random f16 scales could be
// infinities or NaNs, which no real file has and which would time slow
// paths).
std::vector<uint8_t> RandomWeights(DType type, int64_t rows, int64_t cols) {
  std::mt19937 rng(static_cast<uint32_t>(rows * 31 + cols));
  const size_t row_bytes = RowBytes(type, cols);
  std::vector<uint8_t> w(row_bytes * static_cast<size_t>(rows));
  for (uint8_t& b : w) b = static_cast<uint8_t>(rng());
  if (type == DType::kF16) {
    auto* h = reinterpret_cast<uint16_t*>(w.data());
    std::uniform_real_distribution<float> u(-0.1f, 0.1f);
    for (int64_t i = 0; i < rows * cols; ++i) h[i] = cpu::F32ToF16(u(rng));
    return w;
  }
  if (Info(type).block_elems == 1) return w;  // no block scales
  // Where each block keeps its fp16 scales: d first (Q6_K: last), then
  // Q4_1's m or Q4_K's dmin.
  const uint16_t d = cpu::F32ToF16(0.01f), m = cpu::F32ToF16(-0.05f);
  const size_t bb = static_cast<size_t>(Info(type).block_bytes);
  const bool second = type == DType::kQ4_1 || type == DType::kQ4_K;
  const size_t d_at = type == DType::kQ6_K ? bb - 2 : 0;
  for (size_t o = 0; o < w.size(); o += bb) {
    std::memcpy(w.data() + o + d_at, &d, 2);
    if (second) std::memcpy(w.data() + o + 2, type == DType::kQ4_1 ? &m : &d, 2);
  }
  return w;
}

std::vector<float> RandomFloats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& f : v) f = nd(rng);
  return v;
}

// args: weight type, rows, cols, activation rows, threads.
void BM_MatMul(benchmark::State& state) {
  const auto type = static_cast<DType>(state.range(0));
  const int64_t rows = state.range(1), cols = state.range(2), n = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  Backend& be = CpuWithThreads(threads);
  const auto w = RandomWeights(type, rows, cols);
  const Weight weight = be.UploadMatrix(Weight{type, rows, cols, w.data()}).value();
  const auto x = RandomFloats(static_cast<size_t>(n * cols), 7);
  std::vector<float> y(static_cast<size_t>(n * rows));
  for (auto _ : state) {
    be.MatMul(weight, x.data(), n, y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double calls = static_cast<double>(state.iterations());
  state.counters["MAC/s"] = benchmark::Counter(calls * static_cast<double>(rows * cols * n),
                                               benchmark::Counter::kIsRate);
  state.counters["weight_B/s"] = benchmark::Counter(calls * static_cast<double>(w.size()),
                                                    benchmark::Counter::kIsRate);
  state.SetLabel(std::string(Info(type).name) + " " + std::to_string(rows) + "x" +
                 std::to_string(cols) + " n=" + std::to_string(n) + " threads=" +
                 std::to_string(threads));
}

// The default model's matrices (SmolLM2-135M: hidden 576, FFN 1536, 3 KV
// heads of 64, vocabulary 49152) and the types its file and Q4_K_M files
// use.
void MatMulArgs(benchmark::internal::Benchmark* b) {
  struct Case {
    DType type;
    int64_t rows, cols;
  };
  const Case cases[] = {
      {DType::kQ4_1, 576, 576},    // attn_q, attn_output
      {DType::kQ4_1, 1536, 576},   // ffn_gate, ffn_up
      {DType::kQ4_1, 576, 1536},   // ffn_down
      {DType::kQ8_0, 49152, 576},  // token_embd as the output projection
      {DType::kQ4_K, 1536, 768},   {DType::kQ6_K, 1536, 768}, {DType::kQ4_0, 1536, 576},
      {DType::kF16, 1536, 576},
  };
  for (const Case& c : cases) {
    for (int64_t n : {1, 16, 512}) {
      if (c.rows * n > 49152 * 16) continue;  // the output projection at prefill: minutes
      for (int threads : {1, AllCores()}) {
        b->Args({static_cast<int64_t>(c.type), c.rows, c.cols, n, threads});
        if (AllCores() == 1) break;
      }
    }
  }
}
BENCHMARK(BM_MatMul)->Apply(MatMulArgs)->Unit(benchmark::kMicrosecond)->UseRealTime();

// args: query tokens per sequence, sequences, context (keys before the new
// tokens), threads, layers. SmolLM2's 9 query heads over 3 KV heads of 64.
// With layers > 1 each call reads the next layer's pages, so that, as in the
// daemon's step, the KV is not already in the caches.
void BM_Attention(benchmark::State& state) {
  const int64_t tokens = state.range(0), n_seqs = state.range(1), ctx = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  const int64_t layers = state.range(4);
  Backend& be = CpuWithThreads(threads);
  KvLayout layout;
  layout.n_kv_heads = 3;
  layout.head_dim = 64;
  const int32_t heads = 9;
  const int64_t total = ctx + tokens;
  const int64_t pages_per_seq = (total + layout.page_tokens - 1) / layout.page_tokens;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  // The pages in one buffer from the backend, as the daemon's KV chunks are
  // (huge pages where the kernel gives them).
  const size_t n_pages = static_cast<size_t>(pages_per_seq * n_seqs * layers);
  const size_t page_halves = layout.page_bytes() / sizeof(uint16_t);
  std::unique_ptr<void, std::function<void(void*)>> buf(be.AllocBuffer(n_pages * layout.page_bytes()),
                                                         [&be](void* p) { be.FreeBuffer(p); });
  auto* halves = static_cast<uint16_t*>(buf.get());
  for (size_t i = 0; i < n_pages * page_halves; ++i) halves[i] = cpu::F32ToF16(nd(rng));
  std::vector<const void*> page_ptrs(n_pages);
  for (size_t i = 0; i < n_pages; ++i) page_ptrs[i] = halves + i * page_halves;
  std::vector<AttentionSeq> seqs(static_cast<size_t>(n_seqs * layers));  // [layer][seq]
  for (int64_t s = 0; s < n_seqs * layers; ++s) {
    seqs[static_cast<size_t>(s)].pages = page_ptrs.data() + s * pages_per_seq;
    seqs[static_cast<size_t>(s)].n_pages = static_cast<int32_t>(pages_per_seq);
  }
  const int64_t rows = tokens * n_seqs;
  const auto q = RandomFloats(static_cast<size_t>(rows * heads * layout.head_dim), 5);
  std::vector<float> out(q.size());
  std::vector<int32_t> seq_of(static_cast<size_t>(rows)), kv_len(static_cast<size_t>(rows));
  for (int64_t s = 0; s < n_seqs; ++s) {
    for (int64_t t = 0; t < tokens; ++t) {
      seq_of[static_cast<size_t>(s * tokens + t)] = static_cast<int32_t>(s);
      kv_len[static_cast<size_t>(s * tokens + t)] = static_cast<int32_t>(ctx + t + 1);
    }
  }
  AttentionArgs a;
  a.layout = layout;
  a.n_heads = heads;
  a.scale = 0.125f;
  a.n_tokens = rows;
  a.q = q.data();
  a.out = out.data();
  a.seq = seq_of.data();
  a.kv_len = kv_len.data();
  a.seqs = seqs.data();
  a.n_seqs = static_cast<int32_t>(n_seqs);
  int64_t layer = 0;
  for (auto _ : state) {
    a.seqs = seqs.data() + layer * n_seqs;
    layer = (layer + 1) % layers;
    be.Attention(a);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  double key_rows = 0;
  for (int64_t r = 0; r < rows; ++r) key_rows += static_cast<double>(kv_len[static_cast<size_t>(r)]) * heads;
  state.counters["key_rows/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * key_rows, benchmark::Counter::kIsRate);
  // Q.K and P.V: two head_dim-long multiply-accumulates per key and row.
  state.counters["MAC/s"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * key_rows * 2 * layout.head_dim, benchmark::Counter::kIsRate);
  state.SetLabel(std::to_string(n_seqs) + " seq x " + std::to_string(tokens) + " tokens over " +
                 std::to_string(ctx) + " keys, threads=" + std::to_string(threads) +
                 (layers > 1 ? ", " + std::to_string(layers) + " layers" : ""));
}

void AttentionArgsList(benchmark::internal::Benchmark* b) {
  for (int threads : {1, AllCores()}) {
    b->Args({44, 1, 8118, threads, 1});  // a 32-token turn resumed over an 8k history (tiled)
    b->Args({1, 16, 512, threads, 1});   // batched decode of 16 sequences (one-chunk)
    b->Args({1, 16, 300, threads, 1});
    b->Args({1, 16, 300, threads, 30});  // the same, all 30 layers' KV in turn (cold caches)
    b->Args({1, 1, 8192, threads, 1});   // one sequence's decode over 8k (split KV)
    b->Args({1, 1, 8192, threads, 30});
    b->Args({512, 1, 0, threads, 1});    // a fresh 512-token prompt (causal, tiled)
    if (AllCores() == 1) break;
  }
}
BENCHMARK(BM_Attention)->Apply(AttentionArgsList)->Unit(benchmark::kMicrosecond)->UseRealTime();


// Read bandwidth: every thread sums its share of a buffer far larger than
// the caches. arg: threads.
void BM_ReadBandwidth(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  static std::vector<uint64_t> buf((size_t{512} << 20) / 8, 1);
  std::vector<uint64_t> sums(static_cast<size_t>(threads) * 8);
  const size_t per = buf.size() / static_cast<size_t>(threads);
  for (auto _ : state) {
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        const uint64_t* p = buf.data() + static_cast<size_t>(t) * per;
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (size_t i = 0; i + 4 <= per; i += 4) {
          s0 += p[i];
          s1 += p[i + 1];
          s2 += p[i + 2];
          s3 += p[i + 3];
        }
        sums[static_cast<size_t>(t) * 8] += s0 + s1 + s2 + s3;
      });
    }
    for (auto& w : workers) w.join();
    benchmark::DoNotOptimize(sums.data());
  }
  state.counters["read_B/s"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * static_cast<double>(per * static_cast<size_t>(threads) * 8),
      benchmark::Counter::kIsRate);
  state.SetLabel("512 MiB, threads=" + std::to_string(threads));
}

void PerThreadCount(benchmark::internal::Benchmark* b) {
  b->Arg(1);
  if (AllCores() > 1) b->Arg(AllCores());
}
BENCHMARK(BM_ReadBandwidth)->Apply(PerThreadCount)->Unit(benchmark::kMillisecond)->UseRealTime();

// Every matmul of one SmolLM2-135M step: 30 layers of Q4_1 projections
// (q, k, v, o, gate, up, down) and the tied Q8_0 output projection, for n
// activation rows. args: n, threads.
void BM_ModelMatMuls(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  Backend& be = CpuWithThreads(threads);
  const int64_t dim = 576, ffn = 1536, kv = 192, vocab = 49152, layers = 30;
  struct Mat {
    int64_t rows, cols;
  };
  const Mat layer[] = {{dim, dim}, {kv, dim}, {kv, dim}, {dim, dim}, {ffn, dim}, {ffn, dim}, {dim, ffn}};
  static std::vector<std::vector<uint8_t>> store;
  static std::vector<Weight> ws;
  if (ws.empty()) {
    for (int64_t l = 0; l < layers; ++l) {
      for (const Mat& m : layer) {
        store.push_back(RandomWeights(DType::kQ4_1, m.rows, m.cols));
        ws.push_back(be.UploadMatrix(Weight{DType::kQ4_1, m.rows, m.cols, store.back().data()})
                         .value());
      }
    }
    store.push_back(RandomWeights(DType::kQ8_0, vocab, dim));
    ws.push_back(be.UploadMatrix(Weight{DType::kQ8_0, vocab, dim, store.back().data()}).value());
  }
  const auto x = RandomFloats(static_cast<size_t>(n * ffn), 11);
  std::vector<float> y(static_cast<size_t>(n * vocab));
  double bytes = 0, macs = 0;
  for (const Weight& w : ws) {
    bytes += static_cast<double>(w.row_bytes() * static_cast<size_t>(w.rows));
    macs += static_cast<double>(w.rows * w.cols * n);
  }
  for (auto _ : state) {
    for (const Weight& w : ws) be.MatMul(w, x.data(), n, y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double steps = static_cast<double>(state.iterations());
  state.counters["weight_B/s"] = benchmark::Counter(steps * bytes, benchmark::Counter::kIsRate);
  state.counters["MAC/s"] = benchmark::Counter(steps * macs, benchmark::Counter::kIsRate);
  state.counters["rows/s"] = benchmark::Counter(steps * static_cast<double>(n), benchmark::Counter::kIsRate);
  state.SetLabel("n=" + std::to_string(n) + " threads=" + std::to_string(threads));
}

void ModelArgs(benchmark::internal::Benchmark* b) {
  for (int64_t n : {1, 16}) {
    b->Args({n, 1});
    if (AllCores() > 1) b->Args({n, AllCores()});
  }
}
BENCHMARK(BM_ModelMatMuls)->Apply(ModelArgs)->Unit(benchmark::kMillisecond)->UseRealTime();

// The element-wise operations of a decode step at the model's width.
// arg: 0 RmsNorm(576), 1 SiluMul(1536), 2 Add(576), 3 Rope(9 heads).
void BM_DecodeOp(benchmark::State& state) {
  Backend& be = CpuWithThreads(1);
  const auto a = RandomFloats(1536, 1), b = RandomFloats(1536, 2);
  std::vector<float> x = a, y(1536);
  const int32_t pos = 100;
  const char* names[] = {"rmsnorm 576", "silu_mul 1536", "add 576", "rope 9x64"};
  for (auto _ : state) {
    switch (state.range(0)) {
      case 0:
        be.RmsNorm(a.data(), b.data(), 1, 576, 1e-5f, y.data());
        break;
      case 1:
        be.SiluMul(x.data(), b.data(), 1536);
        break;
      case 2:
        be.Add(x.data(), b.data(), 576);
        break;
      default:
        be.Rope(x.data(), 1, 9, 64, 64, &pos, 10000.0f, RopeStyle::kAdjacent);
        break;
    }
    benchmark::DoNotOptimize(x.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetLabel(names[state.range(0)]);
}
BENCHMARK(BM_DecodeOp)->DenseRange(0, 3)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace mnemo::kernels

BENCHMARK_MAIN();
