// mnemo-kernels-bench: throughput of the CPU backend's hot kernels on the
// shapes of SmolLM2-135M, reported against the read bandwidth measured in
// the same run (decode) and as GFLOP/s (prefill).
//
// Usage: mnemo-kernels-bench [threads] [filter]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/quants.h"
#include "kernels/cpu/simd.h"
#include "kernels/cpu/thread_pool.h"

namespace mnemo::kernels::cpu {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Best of `reps` timings of fn, in seconds.
double Best(int reps, const std::function<void()>& fn) {
  fn();  // warm up
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return best;
}

std::vector<uint8_t> RandomBytes(std::mt19937& rng, size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; i += 4) {
    const uint32_t r = rng();
    std::memcpy(v.data() + i, &r, std::min<size_t>(4, n - i));
  }
  return v;
}

// Weights of `type` with random quants and fp16 scales in a sane range.
std::vector<uint8_t> RandomWeight(std::mt19937& rng, DType type, int64_t rows, int64_t cols) {
  std::vector<uint8_t> w = RandomBytes(rng, RowBytes(type, cols) * static_cast<size_t>(rows));
  const int64_t blocks = rows * cols / Info(type).block_elems;
  const size_t bb = static_cast<size_t>(Info(type).block_bytes);
  for (int64_t b = 0; b < blocks; ++b) {
    uint16_t h[2] = {F32ToF16(0.01f), F32ToF16(-0.05f)};
    if (type == DType::kQ4_0 || type == DType::kQ4_1 || type == DType::kQ8_0) {
      std::memcpy(w.data() + b * bb, h, type == DType::kQ4_1 ? 4 : 2);
    }
  }
  return w;
}

std::vector<float> RandomFloats(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

// Read bandwidth: every thread sums its share of a buffer far larger than
// the caches.
double ReadBandwidth(ThreadPool& pool, size_t bytes) {
  std::vector<uint64_t> buf(bytes / 8, 1);
  std::vector<uint64_t> sums(64);
  const int64_t chunks = 256;
  const size_t per = buf.size() / chunks;
  const double t = Best(5, [&] {
    pool.ParallelFor(chunks, [&](int64_t c, int worker) {
      const uint64_t* p = buf.data() + c * per;
      uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (size_t i = 0; i < per; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
      }
      sums[static_cast<size_t>(worker) * 8] += s0 + s1 + s2 + s3;
    });
  });
  return static_cast<double>(per * chunks * 8) / t / 1e9;
}

struct Mat {
  std::string name;
  DType type;
  int64_t rows, cols;
};

void Run(int threads, const std::string& filter) {
  std::mt19937 rng(1);
  auto backend = MakeCpuBackend(threads);
  std::printf("mnemo-kernels-bench: %d threads, SIMD target %s\n", backend->threads(),
              SimdTargetName(SimdTargets().front()).c_str());
  auto want = [&](const char* name) { return filter.empty() || filter == name; };

  double bw = 0;
  {
    ThreadPool pool(threads);
    bw = ReadBandwidth(pool, size_t{512} << 20);
    std::printf("read bandwidth (%d threads, 512 MiB): %.1f GB/s\n", threads, bw);
  }

  // SmolLM2-135M: 30 layers of Q4_1 projections, tied Q8_0 output.
  const int64_t dim = 576, ffn = 1536, kv = 192, vocab = 49152, layers = 30;
  const std::vector<Mat> layer = {{"q", DType::kQ4_1, dim, dim},  {"k", DType::kQ4_1, kv, dim},
                                  {"v", DType::kQ4_1, kv, dim},   {"o", DType::kQ4_1, dim, dim},
                                  {"gate", DType::kQ4_1, ffn, dim}, {"up", DType::kQ4_1, ffn, dim},
                                  {"down", DType::kQ4_1, dim, ffn}};
  std::vector<std::vector<uint8_t>> weights;
  std::vector<Weight> ws;
  size_t layer_bytes = 0;
  for (int64_t l = 0; l < layers; ++l) {
    for (const Mat& m : layer) {
      weights.push_back(RandomWeight(rng, m.type, m.rows, m.cols));
      ws.push_back(Weight{m.type, m.rows, m.cols, weights.back().data()});
      layer_bytes += weights.back().size();
    }
  }
  auto out_w = RandomWeight(rng, DType::kQ8_0, vocab, dim);
  const Weight out{DType::kQ8_0, vocab, dim, out_w.data()};
  auto x = RandomFloats(rng, 512 * ffn);
  std::vector<float> y(512 * static_cast<size_t>(vocab > ffn ? ffn : vocab) * 4);
  std::vector<float> logits(16 * static_cast<size_t>(vocab));

  if (want("decode")) {
    std::printf("\n-- decode: every weight of the model once per step (%.1f MB Q4_1 + %.1f MB Q8_0)\n",
                layer_bytes / 1e6, out_w.size() / 1e6);
    for (int64_t n : {1, 2, 4, 8, 16}) {
      const double t_layers = Best(5, [&] {
        for (const Weight& w : ws) backend->MatMul(w, x.data(), n, y.data());
      });
      const double t_out = Best(5, [&] { backend->MatMul(out, x.data(), n, logits.data()); });
      const double gbs_l = layer_bytes / t_layers / 1e9;
      const double gbs_o = out_w.size() / t_out / 1e9;
      std::printf(
          "n=%-2lld Q4_1 layers %6.2f ms %5.1f GB/s (%3.0f%% of read bw) | Q8_0 output %6.2f ms "
          "%5.1f GB/s (%3.0f%%) | all %6.2f ms\n",
          static_cast<long long>(n), t_layers * 1e3, gbs_l, 100 * gbs_l / bw, t_out * 1e3, gbs_o,
          100 * gbs_o / bw, (t_layers + t_out) * 1e3);
    }
  }

  if (want("prefill")) {
    std::printf("\n-- prefill: n=512 rows of x (GFLOP/s = 2*rows*cols*n / t)\n");
    const int64_t n = 512;
    double total_flop = 0, total_t = 0;
    for (size_t i = 0; i < layer.size(); ++i) {
      const Weight& w = ws[i];
      const double t = Best(3, [&] { backend->MatMul(w, x.data(), n, y.data()); });
      const double flop = 2.0 * w.rows * w.cols * n;
      total_flop += flop;
      total_t += t;
      std::printf("%-5s %4lldx%-4lld Q4_1 %7.2f ms %6.1f GFLOP/s\n", layer[i].name.c_str(),
                  static_cast<long long>(w.rows), static_cast<long long>(w.cols), t * 1e3,
                  flop / t / 1e9);
    }
    std::printf("layer total: %.2f ms, %.1f GFLOP/s -> %.0f ms for 30 layers\n", total_t * 1e3,
                total_flop / total_t / 1e9, total_t * 30 * 1e3);
    const Weight o512{DType::kQ8_0, 4096, dim, out_w.data()};
    const double t = Best(3, [&] { backend->MatMul(o512, x.data(), n, y.data()); });
    std::printf("Q8_0  4096x576 n=512: %7.2f ms %6.1f GFLOP/s\n", t * 1e3,
                2.0 * 4096 * dim * n / t / 1e9);
  }

  if (want("attention")) {
    std::printf("\n-- attention (9 heads, 3 kv heads, head_dim 64, 16-token pages)\n");
    KvLayout L;
    L.page_tokens = 16;
    L.n_kv_heads = 3;
    L.head_dim = 64;
    const int64_t ctx = 512;
    std::vector<std::vector<uint16_t>> pages(ctx / L.page_tokens);
    std::vector<const void*> page_ptrs;
    for (auto& p : pages) {
      p.resize(L.page_bytes() / 2);
      for (auto& h : p) h = F32ToF16(0.01f * static_cast<float>(rng() % 200) - 1.0f);
      page_ptrs.push_back(p.data());
    }
    AttentionSeq seq{page_ptrs.data(), static_cast<int32_t>(page_ptrs.size())};
    std::vector<int32_t> seq_ids(ctx, 0), kv_len(ctx);
    for (int64_t t = 0; t < ctx; ++t) kv_len[t] = static_cast<int32_t>(t + 1);
    auto q = RandomFloats(rng, ctx * 9 * 64);
    std::vector<float> o(q.size());
    AttentionArgs a;
    a.layout = L;
    a.n_heads = 9;
    a.scale = 0.125f;
    a.q = q.data();
    a.out = o.data();
    a.seq = seq_ids.data();
    a.kv_len = kv_len.data();
    a.seqs = &seq;
    a.n_seqs = 1;
    a.n_tokens = ctx;
    const double tp = Best(3, [&] { backend->Attention(a); });
    const double macs = 2.0 * 9 * 64 * (ctx * (ctx + 1) / 2.0);
    std::printf("prefill 512 causal: %.2f ms (%.1f GFLOP/s) -> %.0f ms for 30 layers\n", tp * 1e3,
                2 * macs / tp / 1e9, tp * 30 * 1e3);
    a.n_tokens = 1;
    std::vector<int32_t> last = {static_cast<int32_t>(ctx)};
    a.kv_len = last.data();
    const double td = Best(20, [&] { backend->Attention(a); });
    std::printf("decode at kv_len 512: %.1f us -> %.2f ms for 30 layers\n", td * 1e6, td * 30 * 1e3);
  }

  if (want("ops")) {
    std::printf("\n-- per-op cost at decode size (dim 576)\n");
    auto g = RandomFloats(rng, ffn);
    auto u = RandomFloats(rng, ffn);
    auto gain = RandomFloats(rng, dim);
    const int reps = 2000;
    auto per = [&](const std::function<void()>& fn) {
      return Best(5, [&] {
               for (int i = 0; i < reps; ++i) fn();
             }) /
             reps * 1e6;
    };
    std::printf("rmsnorm %.2f us, silu_mul(1536) %.2f us, add %.2f us, matmul q 576x576 %.2f us, "
                "gate 1536x576 %.2f us, down 576x1536 %.2f us\n",
                per([&] { backend->RmsNorm(x.data(), gain.data(), 1, dim, 1e-5f, y.data()); }),
                per([&] { backend->SiluMul(g.data(), u.data(), ffn); }),
                per([&] { backend->Add(g.data(), u.data(), dim); }),
                per([&] { backend->MatMul(ws[0], x.data(), 1, y.data()); }),
                per([&] { backend->MatMul(ws[4], x.data(), 1, y.data()); }),
                per([&] { backend->MatMul(ws[6], x.data(), 1, y.data()); }));
  }
}

}  // namespace
}  // namespace mnemo::kernels::cpu

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const std::string filter = argc > 2 ? argv[2] : "";
  mnemo::kernels::cpu::Run(threads, filter);
  return 0;
}
