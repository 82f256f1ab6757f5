// Llama-family hyperparameters, weight binding and the batched forward pass.
#include "model/llama.h"

#include <xxhash.h>

#include <cmath>
#include <cstring>

namespace mnemo::model {

using kernels::DType;
using kernels::Weight;

Result<LlamaConfig> ReadLlamaConfig(const GgufFile& f) {
  LlamaConfig c;
  MNEMO_ASSIGN_OR_RETURN(c.arch, f.GetString("general.architecture"));
  if (c.arch != "llama" && c.arch != "qwen2" && c.arch != "mistral")
    return Status::Unsupported("model architecture '" + c.arch +
                               "' (supported: llama, mistral, qwen2)");
  MNEMO_ASSIGN_OR_RETURN(c.name, f.GetStringOr("general.name", c.arch));
  const std::string a = c.arch + ".";
  auto get_int = [&](const char* key, int64_t lo, int64_t hi, int32_t* out) -> Status {
    Result<int64_t> v = f.GetInt(a + key);
    if (!v.ok()) return v.status();
    if (*v < lo || *v > hi)
      return Status::Corruption(a + key + " = " + std::to_string(*v) + " is out of range");
    *out = static_cast<int32_t>(*v);
    return Status::Ok();
  };
  MNEMO_RETURN_IF_ERROR(get_int("block_count", 1, 1024, &c.n_layers));
  MNEMO_RETURN_IF_ERROR(get_int("embedding_length", 1, 1 << 16, &c.dim));
  MNEMO_RETURN_IF_ERROR(get_int("feed_forward_length", 1, 1 << 18, &c.ffn_dim));
  MNEMO_RETURN_IF_ERROR(get_int("attention.head_count", 1, 1024, &c.n_heads));
  MNEMO_RETURN_IF_ERROR(get_int("context_length", 1, 1 << 24, &c.context_length));
  if (f.Has(a + "attention.head_count_kv")) {
    MNEMO_RETURN_IF_ERROR(get_int("attention.head_count_kv", 1, 1024, &c.n_kv_heads));
  } else {
    c.n_kv_heads = c.n_heads;
  }
  if (c.dim % c.n_heads != 0) return Status::Corruption("embedding_length not divisible by heads");
  c.head_dim = c.dim / c.n_heads;
  if (f.Has(a + "attention.key_length")) {
    MNEMO_RETURN_IF_ERROR(get_int("attention.key_length", 1, 1024, &c.head_dim));
  }
  if (c.n_heads % c.n_kv_heads != 0)
    return Status::Corruption("head_count " + std::to_string(c.n_heads) +
                              " is not a multiple of head_count_kv " +
                              std::to_string(c.n_kv_heads));
  if (c.head_dim % 2 != 0) return Status::Corruption("head dimension must be even");
  c.rope_dims = c.head_dim;
  if (f.Has(a + "rope.dimension_count")) {
    MNEMO_RETURN_IF_ERROR(get_int("rope.dimension_count", 2, c.head_dim, &c.rope_dims));
  }
  MNEMO_ASSIGN_OR_RETURN(double base, f.GetFloatOr(a + "rope.freq_base", 10000.0));
  MNEMO_ASSIGN_OR_RETURN(double eps, f.GetFloatOr(a + "attention.layer_norm_rms_epsilon", 1e-5));
  if (!(base > 0) || !std::isfinite(base)) return Status::Corruption("rope.freq_base must be > 0");
  if (!(eps > 0) || eps > 1) return Status::Corruption("layer_norm_rms_epsilon out of range");
  c.rope_base = static_cast<float>(base);
  c.rms_eps = static_cast<float>(eps);
  MNEMO_ASSIGN_OR_RETURN(std::string scaling, f.GetStringOr(a + "rope.scaling.type", "none"));
  if (scaling != "none")
    return Status::Unsupported("rope scaling '" + scaling + "' is not supported yet");
  if (f.FindTensor("rope_freqs.weight") != nullptr)
    return Status::Unsupported("per-dimension rope frequency factors (Llama 3.1) are not supported yet");
  c.rope_style = c.arch == "qwen2" ? kernels::RopeStyle::kHalves : kernels::RopeStyle::kAdjacent;
  c.qkv_bias = c.arch == "qwen2";
  const GgufTensorInfo* emb = f.FindTensor("token_embd.weight");
  if (emb == nullptr) return Status::Corruption("tensor 'token_embd.weight' is missing");
  if (emb->dims.size() != 2 || emb->dims[0] != c.dim)
    return Status::Corruption("token_embd.weight has the wrong shape");
  c.vocab_size = static_cast<int32_t>(emb->dims[1]);
  c.tied_output = f.FindTensor("output.weight") == nullptr;
  return c;
}

LlamaModel::~LlamaModel() {
  float* bufs[] = {x_, xb_, q_, k_, v_, att_, gate_, up_, out_rows_, logits_};
  for (float* b : bufs)
    if (b) backend_->FreeBuffer(b);
  for (void* p : owned_) backend_->FreeBuffer(p);
}

Result<std::unique_ptr<LlamaModel>> LlamaModel::Load(std::shared_ptr<const GgufFile> file,
                                                     kernels::Backend* backend) {
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  m->file_ = std::move(file);
  m->backend_ = backend;
  MNEMO_ASSIGN_OR_RETURN(m->cfg_, ReadLlamaConfig(*m->file_));
  MNEMO_RETURN_IF_ERROR(m->Bind());
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  XXH3_64bits_update(st, m->file_->base(), m->file_->data_offset());
  uint64_t size = m->file_->file_size();
  XXH3_64bits_update(st, &size, sizeof size);
  m->fingerprint_ = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return m;
}

Result<Weight> LlamaModel::BindMatrix(const std::string& name, int64_t cols, int64_t rows,
                                      bool matmul) {
  const GgufTensorInfo* t = file_->FindTensor(name);
  if (t == nullptr) return Status::Corruption("tensor '" + name + "' is missing");
  if (t->dims.size() != 2 || t->dims[0] != cols || t->dims[1] != rows)
    return Status::Corruption("tensor '" + name + "' has shape [" + std::to_string(t->dims[0]) +
                              (t->dims.size() > 1 ? ", " + std::to_string(t->dims[1]) : "") +
                              "], expected [" + std::to_string(cols) + ", " +
                              std::to_string(rows) + "]");
  Weight w;
  w.type = t->type;
  w.cols = cols;
  w.rows = rows;
  w.data = t->data;
  if (matmul) {
    MNEMO_ASSIGN_OR_RETURN(w, backend_->UploadMatrix(w));
    // A copy in the backend's own layout: the file's pages are not read again.
    if (w.layout != kernels::WeightLayout::kRows) file_->Release(t->data, t->bytes);
  } else {
    MNEMO_ASSIGN_OR_RETURN(w.data, backend_->UploadWeight(t->data, t->bytes));
  }
  weight_bytes_ += t->bytes;
  return w;
}

Result<const float*> LlamaModel::BindVector(const std::string& name, int64_t n, bool optional) {
  const GgufTensorInfo* t = file_->FindTensor(name);
  if (t == nullptr) {
    if (optional) return static_cast<const float*>(nullptr);
    return Status::Corruption("tensor '" + name + "' is missing");
  }
  if (t->elements() != n || t->dims[0] != n)
    return Status::Corruption("tensor '" + name + "' has " + std::to_string(t->elements()) +
                              " elements, expected " + std::to_string(n));
  // Norm gains and biases are used as f32; convert other encodings once.
  std::vector<float> host(static_cast<size_t>(n));
  if (t->type == DType::kF32) {
    std::memcpy(host.data(), t->data, n * sizeof(float));
  } else {
    return Status::Unsupported("tensor '" + name + "' must be F32");
  }
  void* buf = backend_->AllocBuffer(n * sizeof(float));
  if (buf == nullptr) return Status::ResourceExhausted("backend out of memory");
  owned_.push_back(buf);
  backend_->CopyFromHost(buf, host.data(), n * sizeof(float));
  weight_bytes_ += t->bytes;
  return static_cast<const float*>(buf);
}

Status LlamaModel::Bind() {
  const LlamaConfig& c = cfg_;
  const int64_t q_dim = int64_t{c.n_heads} * c.head_dim;
  const int64_t kv_dim = int64_t{c.n_kv_heads} * c.head_dim;
  MNEMO_ASSIGN_OR_RETURN(tok_embd_,
                         BindMatrix("token_embd.weight", c.dim, c.vocab_size, /*matmul=*/false));
  if (c.tied_output) {
    MNEMO_ASSIGN_OR_RETURN(output_, backend_->UploadMatrix(tok_embd_));
    // GetRows reads a few rows of the table a step; they fault back in.
    if (output_.layout != kernels::WeightLayout::kRows) {
      file_->Release(tok_embd_.data, tok_embd_.row_bytes() * tok_embd_.rows);
    }
  } else {
    MNEMO_ASSIGN_OR_RETURN(output_, BindMatrix("output.weight", c.dim, c.vocab_size));
  }
  MNEMO_ASSIGN_OR_RETURN(output_norm_, BindVector("output_norm.weight", c.dim, false));
  layers_.resize(c.n_layers);
  for (int32_t i = 0; i < c.n_layers; ++i) {
    Layer& L = layers_[i];
    const std::string p = "blk." + std::to_string(i) + ".";
    MNEMO_ASSIGN_OR_RETURN(L.attn_norm, BindVector(p + "attn_norm.weight", c.dim, false));
    MNEMO_ASSIGN_OR_RETURN(L.ffn_norm, BindVector(p + "ffn_norm.weight", c.dim, false));
    MNEMO_ASSIGN_OR_RETURN(L.wq, BindMatrix(p + "attn_q.weight", c.dim, q_dim));
    MNEMO_ASSIGN_OR_RETURN(L.wk, BindMatrix(p + "attn_k.weight", c.dim, kv_dim));
    MNEMO_ASSIGN_OR_RETURN(L.wv, BindMatrix(p + "attn_v.weight", c.dim, kv_dim));
    MNEMO_ASSIGN_OR_RETURN(L.wo, BindMatrix(p + "attn_output.weight", q_dim, c.dim));
    MNEMO_ASSIGN_OR_RETURN(L.w_gate, BindMatrix(p + "ffn_gate.weight", c.dim, c.ffn_dim));
    MNEMO_ASSIGN_OR_RETURN(L.w_up, BindMatrix(p + "ffn_up.weight", c.dim, c.ffn_dim));
    MNEMO_ASSIGN_OR_RETURN(L.w_down, BindMatrix(p + "ffn_down.weight", c.ffn_dim, c.dim));
    MNEMO_ASSIGN_OR_RETURN(L.bq, BindVector(p + "attn_q.bias", q_dim, !c.qkv_bias));
    MNEMO_ASSIGN_OR_RETURN(L.bk, BindVector(p + "attn_k.bias", kv_dim, !c.qkv_bias));
    MNEMO_ASSIGN_OR_RETURN(L.bv, BindVector(p + "attn_v.bias", kv_dim, !c.qkv_bias));
  }
  return Status::Ok();
}

Status LlamaModel::EnsureScratch(int64_t n, int64_t n_logits) {
  const LlamaConfig& c = cfg_;
  bool failed = false;
  auto grow = [&](float** p, int64_t elems) {
    if (*p) backend_->FreeBuffer(*p);
    *p = static_cast<float*>(backend_->AllocBuffer(static_cast<size_t>(elems) * sizeof(float)));
    failed |= *p == nullptr;
  };
  if (n > scratch_tokens_) {
    const int64_t q_dim = int64_t{c.n_heads} * c.head_dim;
    const int64_t kv_dim = int64_t{c.n_kv_heads} * c.head_dim;
    grow(&x_, n * c.dim);
    grow(&xb_, n * std::max<int64_t>(c.dim, q_dim));
    grow(&q_, n * q_dim);
    grow(&k_, n * kv_dim);
    grow(&v_, n * kv_dim);
    grow(&att_, n * q_dim);
    grow(&gate_, n * c.ffn_dim);
    grow(&up_, n * c.ffn_dim);
    scratch_tokens_ = failed ? 0 : n;
  }
  if (n_logits > scratch_logits_ && !failed) {
    grow(&out_rows_, n_logits * c.dim);
    grow(&logits_, n_logits * c.vocab_size);
    scratch_logits_ = failed ? 0 : n_logits;
  }
  if (failed)
    return Status::ResourceExhausted("backend out of memory for the activations of " +
                                     std::to_string(n) + " tokens");
  return Status::Ok();
}

void LlamaModel::KeepLogitRows(std::span<const BatchSeq> batch, int64_t q_dim) {
  const int64_t dim = cfg_.dim;
  run_rows_.clear();
  int64_t r = 0, t = 0;
  auto keep = [&](int64_t from, int64_t rows) {
    if (from != r) {  // from > r: rows only move forward
      std::memmove(q_ + r * q_dim, q_ + from * q_dim, static_cast<size_t>(q_dim) * sizeof(float));
      std::memmove(x_ + r * dim, x_ + from * dim, static_cast<size_t>(dim) * sizeof(float));
      tok_seq_[r] = tok_seq_[from];
      kv_len_[r] = kv_len_[from];
    }
    run_rows_.push_back(rows);
    ++r;
  };
  for (const BatchSeq& e : batch) {
    const int64_t len = static_cast<int64_t>(e.tokens.size());
    if (e.all_logits) {
      for (int64_t i = 0; i < len; ++i) keep(t + i, len);
    } else {
      keep(t + len - 1, len);
    }
    t += len;
  }
}

void LlamaModel::Observe(std::string_view name, int layer, const float* data, int64_t rows,
                         int64_t cols) {
  if (!observer_) return;
  observed_.resize(static_cast<size_t>(rows * cols));
  backend_->CopyToHost(observed_.data(), data, observed_.size() * sizeof(float));
  observer_(name, layer, observed_.data(), rows, cols);
}

Status LlamaModel::Forward(std::span<const BatchSeq> batch, attention::KvCache* kv,
                           std::vector<float>* logits, KvLayerGate* gate) {
  const LlamaConfig& c = cfg_;
  logits->clear();
  if (batch.empty()) return Status::Ok();
  if (kv->n_layers() != c.n_layers) return Status::InvalidArgument("KV cache has wrong layer count");

  // Validate, then reserve KV for every entry; roll back all on failure.
  int64_t n = 0, n_logits = 0;
  std::vector<int64_t> start(batch.size());
  for (size_t b = 0; b < batch.size(); ++b) {
    const BatchSeq& e = batch[b];
    if (e.tokens.empty()) return Status::InvalidArgument("batch entry without tokens");
    for (size_t j = 0; j < b; ++j)
      if (batch[j].seq == e.seq) return Status::InvalidArgument("sequence twice in one batch");
    MNEMO_ASSIGN_OR_RETURN(start[b], kv->Length(e.seq));
    for (int32_t t : e.tokens)
      if (t < 0 || t >= c.vocab_size)
        return Status::InvalidArgument("token id " + std::to_string(t) + " outside vocabulary of " +
                                       std::to_string(c.vocab_size));
    n += static_cast<int64_t>(e.tokens.size());
    n_logits += e.all_logits ? static_cast<int64_t>(e.tokens.size()) : 1;
  }
  for (size_t b = 0; b < batch.size(); ++b) {
    Status s = kv->Reserve(batch[b].seq, static_cast<int64_t>(batch[b].tokens.size()));
    if (!s.ok()) {
      for (size_t j = 0; j <= b; ++j) (void)kv->Truncate(batch[j].seq, start[j]);
      return s;
    }
  }

  if (Status s = EnsureScratch(n, n_logits); !s.ok()) {
    for (size_t b = 0; b < batch.size(); ++b) (void)kv->Truncate(batch[b].seq, start[b]);
    return s;
  }
  ids_.resize(n);
  pos_.resize(n);
  tok_seq_.resize(n);
  kv_len_.resize(n);
  slot_.resize(n);
  kv_page_.resize(n);
  {
    int64_t t = 0;
    for (size_t b = 0; b < batch.size(); ++b) {
      for (size_t i = 0; i < batch[b].tokens.size(); ++i, ++t) {
        ids_[t] = batch[b].tokens[i];
        pos_[t] = static_cast<int32_t>(start[b] + static_cast<int64_t>(i));
        tok_seq_[t] = static_cast<int32_t>(b);
        kv_len_[t] = pos_[t] + 1;
      }
    }
  }

  kernels::Backend& be = *backend_;
  const int64_t q_dim = int64_t{c.n_heads} * c.head_dim;
  const int64_t kv_dim = int64_t{c.n_kv_heads} * c.head_dim;
  const kernels::KvLayout layout = kv->pool()->layout();
  const int32_t pt = layout.page_tokens;
  be.GetRows(tok_embd_, ids_.data(), n, x_);

  att_seqs_.resize(batch.size());
  // Past the last layer's K and V, only the rows that need logits matter:
  // its attention, output projection and FFN run on those alone (llama.cpp
  // trims its last layer the same way, after the attention). m counts the
  // rows computed. With an observer every row runs, so that each tensor is
  // seen whole, as llama.cpp computes it.
  int64_t m = n;
  const bool trim = n_logits < n && !observer_;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const Layer& L = layers_[l];
    be.RmsNorm(x_, L.attn_norm, n, c.dim, c.rms_eps, xb_);
    Observe("attn_norm", l, xb_, n, c.dim);
    {
      const Weight qkv[] = {L.wq, L.wk, L.wv};
      float* const out[] = {q_, k_, v_};
      be.MatMulShared(qkv, xb_, n, out);
    }
    if (L.bq) be.AddBias(q_, L.bq, n, q_dim);
    if (L.bk) be.AddBias(k_, L.bk, n, kv_dim);
    if (L.bv) be.AddBias(v_, L.bv, n, kv_dim);
    be.Rope(q_, n, c.n_heads, c.head_dim, c.rope_dims, pos_.data(), c.rope_base, c.rope_style);
    be.Rope(k_, n, c.n_kv_heads, c.head_dim, c.rope_dims, pos_.data(), c.rope_base, c.rope_style);
    Observe("Qcur", l, q_, n, q_dim);
    Observe("Kcur", l, k_, n, kv_dim);
    Observe("Vcur", l, v_, n, kv_dim);

    if (gate) {
      if (Status s = gate->WaitLayer(l); !s.ok()) {
        for (size_t b = 0; b < batch.size(); ++b) (void)kv->Truncate(batch[b].seq, start[b]);
        return s;
      }
    }
    // Page tables of this layer.
    // (Pointers are taken after the table is complete: push_back may move it.)
    page_ptrs_.clear();
    for (size_t b = 0; b < batch.size(); ++b) {
      const attention::SeqKv* s = kv->Get(batch[b].seq);
      att_seqs_[b].n_pages = static_cast<int32_t>(s->layers[l].size());
      for (attention::PageId p : s->layers[l]) page_ptrs_.push_back(kv->pool()->Data(p));
    }
    for (size_t b = 0, first = 0; b < batch.size(); first += att_seqs_[b].n_pages, ++b)
      att_seqs_[b].pages = page_ptrs_.data() + first;
    for (int64_t t = 0; t < n; ++t) {
      const int32_t b = tok_seq_[t];
      kv_page_[t] = const_cast<void*>(att_seqs_[b].pages[pos_[t] / pt]);
      slot_[t] = pos_[t] % pt;
    }
    kernels::KvWriteArgs w;
    w.layout = layout;
    w.n_tokens = n;
    w.k = k_;
    w.v = v_;
    w.page = kv_page_.data();
    w.slot = slot_.data();
    be.WriteKv(w);

    if (trim && l == c.n_layers - 1) {
      KeepLogitRows(batch, q_dim);
      m = n_logits;
    }
    kernels::AttentionArgs a;
    a.layout = layout;
    a.n_heads = c.n_heads;
    a.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    a.n_tokens = m;
    a.q = q_;
    a.out = att_;
    a.seq = tok_seq_.data();
    a.kv_len = kv_len_.data();
    a.seqs = att_seqs_.data();
    a.n_seqs = static_cast<int32_t>(batch.size());
    if (m < n) a.run_rows = run_rows_.data();
    be.Attention(a);
    if (gate) gate->LayerDone(l);

    Observe("kqv_out", l, att_, m, q_dim);
    be.MatMul(L.wo, att_, m, xb_);
    Observe("attn_out", l, xb_, m, c.dim);
    be.Add(x_, xb_, m * c.dim);
    Observe("ffn_inp", l, x_, m, c.dim);
    be.RmsNorm(x_, L.ffn_norm, m, c.dim, c.rms_eps, xb_);
    Observe("ffn_norm", l, xb_, m, c.dim);
    {
      const Weight gate_up[] = {L.w_gate, L.w_up};
      float* const out[] = {gate_, up_};
      be.MatMulShared(gate_up, xb_, m, out);
    }
    Observe("ffn_gate", l, gate_, m, c.ffn_dim);
    Observe("ffn_up", l, up_, m, c.ffn_dim);
    be.SiluMul(gate_, up_, m * c.ffn_dim);
    Observe("ffn_swiglu", l, gate_, m, c.ffn_dim);
    be.MatMul(L.w_down, gate_, m, xb_);
    Observe("ffn_out", l, xb_, m, c.dim);
    be.Add(x_, xb_, m * c.dim);
    Observe("l_out", l, x_, m, c.dim);
  }

  // Norm and project only the rows that need logits (at the front of x_
  // already when the last layer was trimmed).
  if (m != n_logits) KeepLogitRows(batch, q_dim);
  be.RmsNorm(x_, output_norm_, n_logits, c.dim, c.rms_eps, out_rows_);
  Observe("result_norm", -1, out_rows_, n_logits, c.dim);
  be.MatMul(output_, out_rows_, n_logits, logits_);
  Observe("result_output", -1, logits_, n_logits, c.vocab_size);
  logits->resize(static_cast<size_t>(n_logits) * c.vocab_size);
  be.CopyToHost(logits->data(), logits_, logits->size() * sizeof(float));

  for (size_t b = 0; b < batch.size(); ++b)
    kv->Advance(batch[b].seq, static_cast<int64_t>(batch[b].tokens.size()));
  return Status::Ok();
}

}  // namespace mnemo::model
