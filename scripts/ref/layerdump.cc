// layerdump: runs llama.cpp on the first N tokens of a text file in one batch
// and writes each intermediate activation it names (attn_norm-L, Qcur-L, ...,
// l_out-L, result_norm, result_output) to DIR/<name>.bin as raw float32
// [tokens][cols]. `mnemo-bench layers` runs mnemo on the same tokens and
// compares tensor by tensor: the first tensor that differs locates a
// numerical divergence. Built by scripts/ref/make_reference.sh.
//
// Usage: layerdump MODEL.gguf TEXT.txt OUT_DIR [N_TOKENS=512] [THREADS=2]
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

namespace {

std::string g_out_dir;

// The names mnemo's LlamaModel::set_observer reports.
bool Wanted(const std::string& name) {
  static const char* kStems[] = {"attn_norm", "Qcur",   "Kcur",       "Vcur",    "kqv_out",
                                 "attn_out",  "ffn_inp", "ffn_norm",  "ffn_gate", "ffn_up",
                                 "ffn_swiglu", "ffn_out", "l_out"};
  if (name == "result_norm" || name == "result_output") return true;
  // "<stem>-<layer>" exactly: views and permutations carry suffixes.
  const size_t dash = name.rfind('-');
  if (dash == std::string::npos || dash + 1 == name.size() ||
      name.find_first_not_of("0123456789", dash + 1) != std::string::npos)
    return false;
  for (const char* s : kStems)
    if (name.compare(0, dash, s) == 0) return true;
  return false;
}

bool OnTensor(ggml_tensor* t, bool ask, void*) {
  const std::string name = t->name;
  if (ask) return Wanted(name);
  if (!Wanted(name) || t->type != GGML_TYPE_F32) return true;
  std::vector<float> buf(static_cast<size_t>(ggml_nelements(t)));
  ggml_backend_tensor_get(t, buf.data(), 0, buf.size() * sizeof(float));
  // A name can be reported several times (before and after a reshape or
  // RoPE); the last report is the one mnemo's observer matches.
  const std::string path = g_out_dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) {
    std::perror(path.c_str());
    std::exit(1);
  }
  std::fwrite(buf.data(), sizeof(float), buf.size(), f);
  std::fclose(f);
  return true;
}

void QuietLog(ggml_log_level level, const char* text, void*) {
  if (level >= GGML_LOG_LEVEL_WARN) std::fputs(text, stderr);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: layerdump MODEL.gguf TEXT.txt OUT_DIR [N_TOKENS] [THREADS]\n");
    return 2;
  }
  g_out_dir = argv[3];
  const int n_tokens = argc > 4 ? std::atoi(argv[4]) : 512;
  const int threads = argc > 5 ? std::atoi(argv[5]) : 2;
  llama_log_set(QuietLog, nullptr);
  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (model == nullptr) return 1;
  const llama_vocab* vocab = llama_model_get_vocab(model);
  std::ifstream in(argv[2]);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<llama_token> toks(text.size() + 16);
  const int n = llama_tokenize(vocab, text.c_str(), static_cast<int32_t>(text.size()), toks.data(),
                               static_cast<int32_t>(toks.size()), /*add_special=*/true,
                               /*parse_special=*/false);
  if (n < n_tokens) {
    std::fprintf(stderr, "layerdump: text has %d tokens, fewer than %d\n", n, n_tokens);
    return 1;
  }
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = cp.n_batch = cp.n_ubatch = static_cast<uint32_t>(n_tokens);
  cp.n_threads = cp.n_threads_batch = threads;
  cp.cb_eval = OnTensor;
  llama_context* ctx = llama_init_from_model(model, cp);
  llama_batch b = llama_batch_init(n_tokens, 0, 1);
  for (int i = 0; i < n_tokens; ++i) {
    b.token[i] = toks[i];
    b.pos[i] = i;
    b.n_seq_id[i] = 1;
    b.seq_id[i][0] = 0;
    b.logits[i] = 1;
  }
  b.n_tokens = n_tokens;
  const int rc = llama_decode(ctx, b);
  llama_batch_free(b);
  llama_free(ctx);
  llama_model_free(model);
  if (rc != 0) {
    std::fprintf(stderr, "layerdump: llama_decode failed (%d)\n", rc);
    return 1;
  }
  std::fprintf(stderr, "layerdump: %d tokens evaluated, tensors in %s\n", n_tokens, argv[3]);
  return 0;
}
