// Entry points of the SIMD kernels, each compiled for every Highway target
// and dispatched at run time to the best one the CPU supports. The CPU
// backend splits work across threads and calls these on its pieces.
//
// Stateless; safe for concurrent calls on disjoint outputs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/quants.h"

namespace mnemo::kernels::cpu {

// --- Matmul -------------------------------------------------------------------

struct GemmArgs {
  DType w_type = DType::kF32;
  const uint8_t* w = nullptr;  // rows of w_row_bytes
  size_t w_row_bytes = 0;
  const uint8_t* x = nullptr;  // activation rows in `format`, format.row_bytes apart
  ActFormat format;            // MakeActFormat(VecDotType(w_type), cols)
  float* y = nullptr;          // y[i * ldy + r]
  int64_t ldy = 0;
};

// Quantizes one row of format.cols floats into the internal layout `row`.
void QuantizeActRow(const ActFormat& format, const float* x, void* row);

// y[i][r] for weight rows r in [r0, r1) and activation rows i in [i0, i1).
void Gemm(const GemmArgs& args, int64_t r0, int64_t r1, int64_t i0, int64_t i1);

// Whether the batched Q4_0, Q4_1 and Q8_0 matmuls (AVX-512 VNNI) and the
// decode attention (AVX-512) use 512-bit tiles rather than 256-bit ones.
// The bits are the same; the speed is not: Intel's cores issue two 512-bit
// dot products or FMAs per cycle, as many as 256-bit ones, while Zen 4
// splits each into two 256-bit halves. With them the decode attention also
// leaves out its prefetch of the next key tile, which Intel's cores stall
// on. Default: on Intel CPUs; MNEMO_WIDE_TILES=0 or 1 in the environment
// overrides it.
bool WideTiles();
// 1 on, 0 off, -1 back to the default. Not thread-safe: call while no
// kernel runs.
void SetWideTilesForTest(int wide);

// --- Element-wise -------------------------------------------------------------

// y = x * gain / sqrt(mean(x^2) + eps); y may alias x.
void RmsNormRow(const float* x, const float* gain, int64_t dim, float eps, float* y);

// Rotates the first rot_dims of each of n_heads heads of x (one token) in
// place. cos_sin: rot_dims/2 cosines followed by rot_dims/2 sines, one per
// rotated pair.
void RopeRow(float* x, int32_t n_heads, int32_t head_dim, int32_t rot_dims,
             const float* cos_sin, RopeStyle style);

void SiluMul(float* gate, const float* up, int64_t count);
void AddInPlace(float* y, const float* x, int64_t count);
// x = exp(x - max(x)) / sum, over n > 0 values.
void Softmax(float* x, int64_t n);
void F32ToF16Row(const float* x, uint16_t* y, int64_t n);
void F16ToF32Row(const uint16_t* x, float* y, int64_t n);
// The index of the largest of x[0..n): the lowest such index on ties; NaN
// never wins; 0 when nothing is larger than -inf (or n == 0).
int64_t ArgmaxF32(const float* x, int64_t n);

// --- Attention ----------------------------------------------------------------

// y[j] = std::exp(x[j]) bit for bit (the C library's expf, which llama.cpp's
// attention calls), four at a time where the library's algorithm is known;
// x and y may alias.
void LibmExpRow(const float* x, float* y, int64_t n);
// Whether LibmExpRow (and attention) use the vector version on the current
// target: it is checked against the library once and used only if equal.
bool LibmExpVectorized();

// Floats of scratch one AttentionItem call needs.
size_t AttentionScratchFloats(const AttentionArgs& args);

// Attention of query token t for all query heads that share kv head kv_head.
void AttentionItem(const AttentionArgs& args, int64_t t, int32_t kv_head, float* scratch);

// Most query tokens one AttentionBlock call takes.
inline constexpr int64_t kAttentionBlockTokens = 32;

// Attention of query tokens [t0, t1), all of one sequence, for the query
// heads of kv head kv_head: the K and V pages are converted once for all.
void AttentionBlock(const AttentionArgs& args, int64_t t0, int64_t t1, int32_t kv_head,
                    float* scratch);

// Attention of query tokens [t0, t1), all of one sequence, by the tiled
// algorithm whatever their number and context (MathMode::kFast): f32 scores
// and f32 accumulation of V over 64-key tiles aligned at key 0. A row's
// result depends on its query, its keys and nothing else (not the other
// rows, not the call's split), so decode gives a token the same result
// alone or batched; llama.cpp's decode instead accumulates V in fp16 key by
// key (AttentionItem), which costs ~4x as much per key.
void AttentionTiled(const AttentionArgs& args, int64_t t0, int64_t t1, int32_t kv_head,
                    float* scratch);

// --- Targets (for tests and benchmarks) ---------------------------------------

// The compiled targets this CPU supports, best first.
std::vector<int64_t> SimdTargets();
std::string SimdTargetName(int64_t target);
// Restricts dispatch to `target` (one of SimdTargets()); 0 restores the best.
// Not thread-safe: call while no kernel runs.
void SetSimdTargetForTest(int64_t target);

}  // namespace mnemo::kernels::cpu
