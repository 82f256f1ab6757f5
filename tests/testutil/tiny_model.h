// Writes tiny random-weight llama-family GGUF files with a byte-level BPE
// vocabulary, so that model tests run in milliseconds without the real model.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "model/gguf_writer.h"

namespace mnemo::testutil {

struct TinyModelSpec {
  std::string arch = "llama";
  int32_t n_layers = 2;
  int32_t dim = 64;
  int32_t n_heads = 4;
  int32_t n_kv_heads = 2;
  int32_t ffn_dim = 128;
  int32_t context_length = 512;
  float rope_base = 10000.0f;
  kernels::DType matrix_type = kernels::DType::kQ4_1;
  kernels::DType embd_type = kernels::DType::kQ8_0;
  bool tied_output = true;
  uint64_t seed = 1;
};

// For GoogleTest parameter names and failure messages.
inline void PrintTo(const TinyModelSpec& s, std::ostream* os) {
  *os << s.arch << " dim " << s.dim << " layers " << s.n_layers << " "
      << kernels::Info(s.matrix_type).name << "/" << kernels::Info(s.embd_type).name
      << (s.tied_output ? " tied" : " untied");
}

// Vocabulary: 256 byte tokens (GPT-2 byte-to-unicode form), a handful of
// merges, and <|endoftext|>, <|im_start|>, <|im_end|> as control tokens.
void AddTinyTokenizer(model::GgufWriter* w);
// The full model file.
std::string MakeTinyModel(const TinyModelSpec& spec);
// Writes MakeTinyModel to a fresh temp file and returns its path.
std::string WriteTinyModel(const TinyModelSpec& spec);

// Encodes `values` (a multiple of the block size) as `type`. Supports F32,
// F16, BF16, Q8_0, Q4_0, Q4_1.
std::string Quantize(kernels::DType type, const std::vector<float>& values);
uint16_t FloatToHalf(float f);
float HalfToFloat(uint16_t h);

// A fresh temp directory, removed with everything in it when the test
// process exits normally.
std::string TempDir();

}  // namespace mnemo::testutil

namespace mnemo::testutil {
// Inverse of Quantize for the same types.
std::vector<float> Dequantize(kernels::DType type, const void* data, int64_t n);
}  // namespace mnemo::testutil
