// Weights interleaved 16 rows at a time, for the fast matmul (MathMode::kFast).
//
// llama.cpp's Q4_0, Q4_1 and Q8_0 dot products keep each block's integer sum in
// eight 4-product lanes and round each lane into its own float accumulator:
// two float operations per four products, whatever the kernel. That is what
// bounds the bit-exact batched matmul. The interleaved layout sums each
// block of 32 products exactly in one int32 lane per weight row (vpdpbusd
// over rows stored side by side, four columns of each row per lane) and
// rounds once per block: per output row and column,
//
//   acc = 0
//   for each block b:  acc = fma(float(isum_b), d_w[b] * d_x[b], acc)
//                      acc = fma(m_w[b], s_x[b], acc)        (Q4_1 only)
//   y = acc
//
// with isum_b the exact integer dot product of the block's quants (Q4_0's
// taken as q - 8), d, m the
// weight's fp16 scale and min, d_x, s_x the activation row's (the same Q8_0 /
// Q8_1 activations llama.cpp uses). Every kernel here computes exactly that
// sequence, so a result does not depend on how many activation rows share a
// call or how the rows are split over threads. It is not llama.cpp's
// rounding: the last bits differ from the exact path's.
//
// Layout of a weight of `rows` x `cols` (rows padded to a multiple of 16 with
// zero rows): groups of 16 rows, each the group's blocks in order, each
// block
//   Q4_0: d[16] f32 | 4 x 64 bytes: byte 4r+i of part j holds row r's
//         qs[4j+i] (low nibble: element 4j+i, high: 16+4j+i)
//   Q4_1: d[16] f32 | m[16] f32 | 4 x 64 bytes as Q4_0's
//   Q8_0: d[16] f32 | 8 x 64 bytes: byte 4r+i of part j holds row r's
//         element 4j+i + 128 (as an unsigned byte)
// The kernel multiplies the stored unsigned quants (vpdpbusd) and starts
// each block's sum at -8 (Q4_0) or -128 (Q8_0) times the sum of its x
// quants, which gives the signed product exactly.
//
// Stateless; safe for concurrent calls on disjoint outputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/cpu/simd.h"
#include "kernels/dtype.h"

namespace mnemo::kernels::cpu {

inline constexpr int64_t kGroupRows = 16;

// Whether `type` has an interleaved layout (Q4_0, Q4_1, Q8_0).
bool HasInterleavedLayout(DType type);
// Bytes of a rows x cols weight of `type` in the interleaved layout.
size_t InterleavedBytes(DType type, int64_t rows, int64_t cols);
// Writes the interleaved layout of the GGUF rows at `src` to `dst`
// (InterleavedBytes of it, 64-byte aligned).
void Interleave(DType type, const void* src, int64_t rows, int64_t cols, void* dst);

// Whether this CPU has AVX-512 VNNI, which GemmInterleaved needs (a CPU
// without it computes MathMode::kExact: see MakeCpuBackend).
bool CpuHasAvx512Vnni();

// y[i][r] for weight rows r in [r0, r1) and activation rows i in [i0, i1),
// r0 a multiple of kGroupRows. args.w is Interleave's output; args.ldy is the
// weight's row count (rows at and past it are not written). AVX-512 VNNI
// only (CpuHasAvx512Vnni).
void GemmInterleaved(const GemmArgs& args, int64_t r0, int64_t r1, int64_t i0, int64_t i1);

namespace ref {
// The defining scalar form of GemmInterleaved, over the GGUF rows at args.w
// (args.w_row_bytes apart): the same bits, slowly.
void GemmInterleaved(const GemmArgs& args, int64_t r0, int64_t r1, int64_t i0, int64_t i1);
}  // namespace ref

}  // namespace mnemo::kernels::cpu
