// The compute Backend: the one door from model/ and attention/ to hardware.
// Coarse operations over activation buffers and weights that live in the
// backend's memory (host memory for the CPU backend, HBM for a CUDA backend).
//
// Thread-compatible: one thread (the engine's step loop) drives a Backend at
// a time; each operation may use the backend's own worker threads inside.
// Activation and weight pointers passed to operations are backend memory
// obtained from AllocBuffer or UploadWeight; small index arrays (token ids,
// positions, sequence indices, KV lengths, page-pointer and slot arrays) are
// host memory, which a device backend uploads itself. Everything is borrowed
// for the duration of the call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string_view>

#include "common/status.h"
#include "kernels/dtype.h"

namespace mnemo::kernels {

// How a weight's bytes are arranged in backend memory.
enum class WeightLayout : uint8_t {
  kRows,         // GGUF's: one row after another
  kInterleaved,  // the backend's own layout for MathMode::kFast (UploadMatrix)
};

// A 2-D weight matrix: `rows` output features of `cols` input features
// encoded as `type` (GGUF's ne[0] = cols, ne[1] = rows). `data` is backend
// memory (see Backend::UploadWeight and UploadMatrix); with layout kRows each
// row is contiguous, row_bytes() apart.
struct Weight {
  DType type = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data = nullptr;
  WeightLayout layout = WeightLayout::kRows;
  size_t row_bytes() const { return RowBytes(type, cols); }
};

// The arithmetic of the quantized matmuls.
enum class MathMode : uint8_t {
  // llama.cpp's rounding, bit for bit (its x86 CPU build without repacking):
  // logits and greedy output equal llama.cpp's.
  kExact,
  // Q4_0, Q4_1 and Q8_0 weights in an interleaved layout, each 32-element block
  // summed exactly in integers and rounded once (kernels/cpu/interleaved.h):
  // batched matmuls 2-3x faster on AVX-512 VNNI. Attention takes the tiled
  // algorithm for every query row (f32 accumulation; llama.cpp's decode and
  // short prompts accumulate V in fp16 key by key): decode attention ~1.3x
  // faster. Results differ from llama.cpp's in the last bits; output stays
  // deterministic and the same whether a sequence runs alone or batched.
  // Needs AVX-512 VNNI; elsewhere the backend stays exact.
  kFast,
};
inline std::string_view MathModeName(MathMode mode) {
  return mode == MathMode::kFast ? "fast" : "exact";
}
// "exact" or "fast"; nullopt otherwise.
inline std::optional<MathMode> ParseMathMode(std::string_view name) {
  if (name == "exact") return MathMode::kExact;
  if (name == "fast") return MathMode::kFast;
  return std::nullopt;
}

enum class RopeStyle : uint8_t {
  kAdjacent,  // llama: rotate pairs (x[2i], x[2i+1])
  kHalves,    // neox/qwen2: rotate pairs (x[i], x[i + rot_dims/2])
};

// Tokens per KV page unless configured (mnemod --page-tokens): 64 tokens
// of the default model are 48 KiB a layer. Pages of 16 tokens made a resume
// from T2 handle four times as many pages (checksums, page-table entries,
// scatter-read segments) for the same bytes, ~0.1 s more for 8k tokens
// (docs/benchmarks.md); the cost of larger pages is the partly filled last
// page of each sequence and the last block a turn rewrites on T2.
inline constexpr int32_t kDefaultPageTokens = 64;

// Geometry of one KV page: `page_tokens` consecutive tokens of one sequence
// for one layer, K then V, each [n_kv_heads][page_tokens][head_dim] fp16.
struct KvLayout {
  int32_t page_tokens = kDefaultPageTokens;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  size_t page_bytes() const {
    return 2u * static_cast<size_t>(page_tokens) * n_kv_heads * head_dim * sizeof(uint16_t);
  }
  // Element offset of K[head][slot][0] and V[head][slot][0] within a page
  // viewed as uint16_t[].
  size_t k_offset(int head, int slot) const {
    return (static_cast<size_t>(head) * page_tokens + slot) * head_dim;
  }
  size_t v_offset(int head, int slot) const {
    return static_cast<size_t>(n_kv_heads) * page_tokens * head_dim + k_offset(head, slot);
  }
};

// One sequence's pages for the layer being computed, in token order.
struct AttentionSeq {
  const void* const* pages = nullptr;  // n_pages page base pointers
  int32_t n_pages = 0;
};

// Batched causal attention for one layer. Query row t attends to the first
// kv_len[t] tokens of sequence seq[t] (its own token included, already
// written with WriteKv).
struct AttentionArgs {
  KvLayout layout;
  int32_t n_heads = 0;  // query heads; a multiple of layout.n_kv_heads (GQA)
  float scale = 1.0f;   // usually 1/sqrt(head_dim)
  int64_t n_tokens = 0;
  const float* q = nullptr;        // [n_tokens][n_heads*head_dim]
  float* out = nullptr;            // [n_tokens][n_heads*head_dim]
  const int32_t* seq = nullptr;    // [n_tokens] index into seqs
  const int32_t* kv_len = nullptr; // [n_tokens]
  const AttentionSeq* seqs = nullptr;
  int32_t n_seqs = 0;
  // Optional [n_tokens]: the query rows token t's sequence has in the whole
  // step when only some of them are computed here (a model's last layer
  // needs only the rows that give logits). It picks the algorithm, so that
  // each computed row's result is the same as with every row present.
  // Null: the rows present.
  const int64_t* run_rows = nullptr;
};

// Where each new token's K and V go: page base pointer and slot in the page.
struct KvWriteArgs {
  KvLayout layout;
  int64_t n_tokens = 0;
  const float* k = nullptr;       // [n_tokens][n_kv_heads*head_dim]
  const float* v = nullptr;       // [n_tokens][n_kv_heads*head_dim]
  void* const* page = nullptr;    // [n_tokens]
  const int32_t* slot = nullptr;  // [n_tokens], 0 <= slot < page_tokens
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string_view name() const = 0;
  // Worker threads the backend computes with (CPU) or 1.
  virtual int threads() const = 0;

  // --- Memory ---------------------------------------------------------------
  // 64-byte aligned (page-aligned for sizes >= 4 KiB). Null when exhausted.
  virtual void* AllocBuffer(size_t bytes) = 0;
  virtual void FreeBuffer(void* p) = 0;
  // Backs [p, p + bytes) of a buffer from AllocBuffer with memory now rather
  // than at first use (host memory is faulted in lazily). Default: nothing.
  virtual void Prefault(void* p, size_t bytes) {}
  // Makes a host weight usable by the backend. The CPU backend returns `host`
  // itself (zero-copy over the mmap'd model); a device backend copies.
  // `host` must outlive the returned pointer on the CPU backend.
  virtual Result<const void*> UploadWeight(const void* host, size_t bytes) = 0;
  // Makes a host weight (layout kRows) usable as a MatMul operand, in the
  // layout the backend's math mode reads best; the result may not serve
  // GetRows. Default: UploadWeight of its bytes, layout unchanged.
  virtual Result<Weight> UploadMatrix(const Weight& host) {
    Weight w = host;
    MNEMO_ASSIGN_OR_RETURN(w.data, UploadWeight(host.data, host.row_bytes() * host.rows));
    return w;
  }
  // The arithmetic MatMul applies to UploadMatrix'd weights.
  virtual MathMode math_mode() const { return MathMode::kExact; }
  virtual void CopyToHost(void* dst_host, const void* src, size_t bytes) = 0;
  virtual void CopyFromHost(void* dst, const void* src_host, size_t bytes) = 0;

  // --- Operations (f32 activations, row-major) -------------------------------
  // y[n][w.rows] = x[n][w.cols] · wᵀ. Activations are quantized to the
  // weight's dot-product type first, as llama.cpp does (Q8_1 for Q4_1, Q8_0 for
  // Q4_0/Q8_0, Q8_K for K-quants, f16 for F16, bf16 for BF16).
  virtual void MatMul(const Weight& w, const float* x, int64_t n, float* y) = 0;
  // MatMul(w[k], x, n, y[k]) for every k: several weights over one input
  // (Q/K/V, gate/up), which a backend may run as one operation, quantizing x
  // once. Results are those of the separate calls.
  virtual void MatMulShared(std::span<const Weight> w, const float* x, int64_t n,
                            float* const* y) {
    for (size_t k = 0; k < w.size(); ++k) MatMul(w[k], x, n, y[k]);
  }
  // out[i][:] = dequantized row ids[i] of `table` (layout kRows).
  virtual void GetRows(const Weight& table, const int32_t* ids, int64_t n, float* out) = 0;
  // y = x / rms(x) * gain, per row of `dim`; y may alias x.
  virtual void RmsNorm(const float* x, const float* gain, int64_t n, int64_t dim, float eps,
                       float* y) = 0;
  // Rotates the first rot_dims of each head of x[n][n_heads*head_dim] in place
  // by angle pos[t] * base^(-2i/rot_dims).
  virtual void Rope(float* x, int64_t n, int32_t n_heads, int32_t head_dim, int32_t rot_dims,
                    const int32_t* pos, float freq_base, RopeStyle style) = 0;
  // gate[i] = silu(gate[i]) * up[i].
  virtual void SiluMul(float* gate, const float* up, int64_t count) = 0;
  // y[i] += x[i].
  virtual void Add(float* y, const float* x, int64_t count) = 0;
  // y[t][j] += bias[j] for t < n, j < dim.
  virtual void AddBias(float* y, const float* bias, int64_t n, int64_t dim) = 0;
  // Converts K and V to fp16 into their page slots.
  virtual void WriteKv(const KvWriteArgs& args) = 0;
  virtual void Attention(const AttentionArgs& args) = 0;
};

// The CPU backend with `threads` workers (0: all cores). Never fails: the CPU
// path always exists. MathMode::kFast where the CPU lacks AVX-512 VNNI gives
// an exact backend (see math_mode()).
std::unique_ptr<Backend> MakeCpuBackend(int threads, MathMode math = MathMode::kExact);

}  // namespace mnemo::kernels
