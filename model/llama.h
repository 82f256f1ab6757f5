// The llama-family transformer (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2)
// over a paged KV cache: weights bound from a GGUF file, and a forward pass
// that runs a batch of sequences at different positions in one step
// (prefill chunks of some and single decode tokens of others together).
//
// Thread-compatible: one thread drives Forward at a time. Weights are
// immutable after Load.
#pragma once

#include <cstdint>
#include <functional>
#include <string_view>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "attention/kv_cache.h"
#include "common/status.h"
#include "kernels/backend.h"
#include "model/gguf.h"

namespace mnemo::model {

struct LlamaConfig {
  std::string arch;  // GGUF general.architecture
  std::string name;  // general.name
  int32_t n_layers = 0;
  int32_t dim = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t ffn_dim = 0;
  int32_t vocab_size = 0;
  int32_t context_length = 0;  // trained context
  int32_t rope_dims = 0;
  float rope_base = 10000.0f;
  float rms_eps = 1e-5f;
  kernels::RopeStyle rope_style = kernels::RopeStyle::kAdjacent;
  bool qkv_bias = false;
  bool tied_output = false;

  kernels::KvLayout KvLayoutFor(int32_t page_tokens) const {
    return kernels::KvLayout{page_tokens, n_kv_heads, head_dim};
  }
};

// Reads and validates the hyperparameters of a llama-family GGUF.
Result<LlamaConfig> ReadLlamaConfig(const GgufFile& file);

// One entry of a forward batch: `tokens` are appended to sequence `seq` at its
// current length.
struct BatchSeq {
  attention::SeqId seq = 0;
  std::span<const int32_t> tokens;
  bool all_logits = false;  // logits for every token (scoring); else only the last
};

// Pages that arrive layer by layer (a session resumed from storage while a
// step already runs, or one streamed through a ring of pages): Forward
// calls WaitLayer(l) before it reads or writes any KV page of layer l, and
// LayerDone(l) once it no longer needs them. An error ends the step as any
// Forward error does.
class KvLayerGate {
 public:
  virtual ~KvLayerGate() = default;
  virtual Status WaitLayer(int32_t layer) = 0;
  virtual void LayerDone(int32_t layer) {}
};

class LlamaModel {
 public:
  // Binds the weights of `file` (kept alive by the model) on `backend`
  // (borrowed; must outlive the model).
  static Result<std::unique_ptr<LlamaModel>> Load(std::shared_ptr<const GgufFile> file,
                                                  kernels::Backend* backend);
  ~LlamaModel();

  const LlamaConfig& config() const { return cfg_; }
  const GgufFile& file() const { return *file_; }
  kernels::Backend* backend() const { return backend_; }
  // Identifies the weights and layout: XXH3 of the GGUF header and metadata,
  // plus the file size. KV computed under another fingerprint is not reusable.
  uint64_t fingerprint() const { return fingerprint_; }
  // Bytes of weights read per decoded token (every matrix once).
  size_t weight_bytes() const { return weight_bytes_; }

  // Runs one step over `batch` (each sequence at most once). Writes the new
  // tokens' K/V into `kv` and appends logits rows to `logits` (cleared
  // first): per entry, every token's row when all_logits, else the last
  // token's. On error no sequence's length changed. `gate` (optional) is
  // waited on before each layer's KV is used.
  Status Forward(std::span<const BatchSeq> batch, attention::KvCache* kv,
                 std::vector<float>* logits, KvLayerGate* gate = nullptr);

  // Debugging and numerical comparison with other implementations: when
  // set, Forward reports each intermediate activation (host copy, [rows][cols])
  // under llama.cpp's tensor names ("attn_norm", "Qcur", ..., "l_out" with
  // the layer; "result_norm", "result_output" with layer -1).
  using Observer = std::function<void(std::string_view name, int layer, const float* data,
                                      int64_t rows, int64_t cols)>;
  void set_observer(Observer observer) { observer_ = std::move(observer); }

 private:
  struct Layer {
    const float* attn_norm = nullptr;
    const float* ffn_norm = nullptr;
    const float* bq = nullptr;
    const float* bk = nullptr;
    const float* bv = nullptr;
    kernels::Weight wq, wk, wv, wo, w_gate, w_up, w_down;
  };
  LlamaModel() = default;
  Status Bind();
  // A matmul operand (Backend::UploadMatrix), or with matmul false a table
  // for GetRows (UploadWeight, GGUF's rows).
  Result<kernels::Weight> BindMatrix(const std::string& name, int64_t cols, int64_t rows,
                                     bool matmul = true);
  Result<const float*> BindVector(const std::string& name, int64_t n, bool optional);
  Status EnsureScratch(int64_t n_tokens, int64_t n_logits);
  void Observe(std::string_view name, int layer, const float* data, int64_t rows, int64_t cols);
  // Moves the rows that need logits (an entry's last, or all of an
  // all_logits entry) to the front of q_, x_, tok_seq_ and kv_len_, in
  // order, and sets run_rows_ to the rows each one's sequence has in the
  // step (which picks its attention algorithm).
  void KeepLogitRows(std::span<const BatchSeq> batch, int64_t q_dim);

  // constant after Load
  std::shared_ptr<const GgufFile> file_;
  kernels::Backend* backend_ = nullptr;
  LlamaConfig cfg_;
  uint64_t fingerprint_ = 0;
  size_t weight_bytes_ = 0;
  kernels::Weight tok_embd_, output_;
  const float* output_norm_ = nullptr;
  std::vector<Layer> layers_;
  std::vector<void*> owned_;  // backend buffers for uploaded vectors
  Observer observer_;
  std::vector<float> observed_;

  // Scratch, grown on demand (backend memory).
  int64_t scratch_tokens_ = 0;
  int64_t scratch_logits_ = 0;
  float* x_ = nullptr;     // [n][dim] residual stream
  float* xb_ = nullptr;    // [n][dim] normed
  float* q_ = nullptr;     // [n][n_heads*head_dim]
  float* k_ = nullptr;     // [n][n_kv*head_dim]
  float* v_ = nullptr;
  float* att_ = nullptr;   // [n][n_heads*head_dim]
  float* gate_ = nullptr;  // [n][ffn]
  float* up_ = nullptr;
  float* out_rows_ = nullptr;  // [n_logits][dim], normed
  float* logits_ = nullptr;    // [n_logits][vocab]
  // Per-step host metadata, reused across steps.
  std::vector<int32_t> ids_, pos_, tok_seq_, kv_len_, slot_;
  std::vector<int64_t> run_rows_;
  std::vector<void*> kv_page_;
  std::vector<const void*> page_ptrs_;
  std::vector<kernels::AttentionSeq> att_seqs_;
};

}  // namespace mnemo::model
