// Tiny GGUF models for tests.
#include "tests/testutil/tiny_model.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <random>

namespace mnemo::testutil {
namespace {

std::string CodepointToUtf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// GPT-2's reversible byte -> printable code point map.
std::vector<std::string> ByteTokens() {
  std::vector<int> bs;
  for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
  std::vector<uint32_t> cp(256, 0);
  std::vector<bool> have(256, false);
  for (int b : bs) {
    cp[b] = static_cast<uint32_t>(b);
    have[b] = true;
  }
  uint32_t extra = 0;
  for (int b = 0; b < 256; ++b)
    if (!have[b]) cp[b] = 256 + extra++;
  std::vector<std::string> out;
  for (int b = 0; b < 256; ++b) out.push_back(CodepointToUtf8(cp[b]));
  return out;
}

}  // namespace

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  int32_t exp = static_cast<int32_t>((x >> 23) & 0xFF) - 127 + 15;
  uint32_t mant = x & 0x7FFFFF;
  if (((x >> 23) & 0xFF) == 0xFF) return static_cast<uint16_t>(sign | 0x7C00 | (mant ? 0x200 : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7C00);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000;
    const int shift = 14 - exp;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  const uint32_t mant = h & 0x3FF;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    f = mant ? NAN : INFINITY;
  } else {
    f = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits |= sign;
  std::memcpy(&f, &bits, 4);
  return f;
}

std::string Quantize(kernels::DType type, const std::vector<float>& v) {
  std::string out;
  auto put16 = [&](uint16_t h) { out.append(reinterpret_cast<const char*>(&h), 2); };
  switch (type) {
    case kernels::DType::kF32:
      out.assign(reinterpret_cast<const char*>(v.data()), v.size() * 4);
      return out;
    case kernels::DType::kF16:
      for (float f : v) put16(FloatToHalf(f));
      return out;
    case kernels::DType::kBF16:
      for (float f : v) {
        uint32_t x;
        std::memcpy(&x, &f, 4);
        x += 0x7FFF + ((x >> 16) & 1);
        put16(static_cast<uint16_t>(x >> 16));
      }
      return out;
    case kernels::DType::kQ8_0:
      for (size_t b = 0; b < v.size(); b += 32) {
        float amax = 0;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[b + i]));
        const float d = amax / 127.0f;
        put16(FloatToHalf(d));
        for (int i = 0; i < 32; ++i) {
          int q = d == 0 ? 0 : static_cast<int>(std::lround(v[b + i] / d));
          out += static_cast<char>(std::clamp(q, -127, 127));
        }
      }
      return out;
    case kernels::DType::kQ4_0:
      for (size_t b = 0; b < v.size(); b += 32) {
        float amax = 0, max = 0;
        for (int i = 0; i < 32; ++i)
          if (std::fabs(v[b + i]) > amax) {
            amax = std::fabs(v[b + i]);
            max = v[b + i];
          }
        const float d = max / -8.0f;
        const float id = d ? 1.0f / d : 0.0f;
        put16(FloatToHalf(d));
        for (int i = 0; i < 16; ++i) {
          int q0 = std::min(15, static_cast<int>(v[b + i] * id + 8.5f));
          int q1 = std::min(15, static_cast<int>(v[b + 16 + i] * id + 8.5f));
          out += static_cast<char>(q0 | (q1 << 4));
        }
      }
      return out;
    case kernels::DType::kQ4_1:
      for (size_t b = 0; b < v.size(); b += 32) {
        float mn = v[b], mx = v[b];
        for (int i = 0; i < 32; ++i) {
          mn = std::min(mn, v[b + i]);
          mx = std::max(mx, v[b + i]);
        }
        const float d = (mx - mn) / 15.0f;
        const float id = d ? 1.0f / d : 0.0f;
        put16(FloatToHalf(d));
        put16(FloatToHalf(mn));
        for (int i = 0; i < 16; ++i) {
          int q0 = std::min(15, static_cast<int>((v[b + i] - mn) * id + 0.5f));
          int q1 = std::min(15, static_cast<int>((v[b + 16 + i] - mn) * id + 0.5f));
          out += static_cast<char>(q0 | (q1 << 4));
        }
      }
      return out;
    default:
      std::abort();
  }
}

void AddTinyTokenizer(model::GgufWriter* w) {
  std::vector<std::string> tokens = ByteTokens();
  std::vector<int32_t> types(tokens.size(), 1);
  // A few merges so BPE has something to do: "Ġt" "he" "Ġthe" "in" "ing".
  const std::vector<std::string> merges = {"Ġ t", "h e", "Ġt he", "i n", "in g", "Ġ a"};
  for (const auto& m : merges) {
    std::string a = m.substr(0, m.find(' ')), b = m.substr(m.find(' ') + 1);
    tokens.push_back(a + b);
    types.push_back(1);
  }
  for (const char* s : {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}) {
    tokens.push_back(s);
    types.push_back(3);
  }
  const int32_t eot = static_cast<int32_t>(tokens.size()) - 3;
  w->SetString("tokenizer.ggml.model", "gpt2");
  w->SetString("tokenizer.ggml.pre", "smollm");
  w->SetStringArray("tokenizer.ggml.tokens", tokens);
  w->SetInt32Array("tokenizer.ggml.token_type", types);
  w->SetStringArray("tokenizer.ggml.merges", merges);
  w->SetUint32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(eot + 1));
  w->SetUint32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(eot + 2));
  w->SetUint32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(eot));
  w->SetUint32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(eot + 2));
  w->SetBool("tokenizer.ggml.add_bos_token", false);
  w->SetString("tokenizer.chat_template",
               "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' "
               "%}{{ '<|im_start|>system\\nYou are a tiny test model<|im_end|>\\n' }}{% endif "
               "%}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
               "'<|im_start|>assistant\\n' }}{% endif %}");
}

std::string MakeTinyModel(const TinyModelSpec& s) {
  model::GgufWriter w;
  const std::string a = s.arch + ".";
  const int32_t head_dim = s.dim / s.n_heads;
  w.SetString("general.architecture", s.arch);
  w.SetString("general.name", "mnemo tiny test model");
  w.SetUint32(a + "block_count", s.n_layers);
  w.SetUint32(a + "context_length", s.context_length);
  w.SetUint32(a + "embedding_length", s.dim);
  w.SetUint32(a + "feed_forward_length", s.ffn_dim);
  w.SetUint32(a + "attention.head_count", s.n_heads);
  w.SetUint32(a + "attention.head_count_kv", s.n_kv_heads);
  w.SetFloat32(a + "rope.freq_base", s.rope_base);
  w.SetFloat32(a + "attention.layer_norm_rms_epsilon", 1e-5f);
  w.SetUint32(a + "rope.dimension_count", head_dim);
  AddTinyTokenizer(&w);
  const int32_t vocab = 256 + 6 + 3;
  // Pad the vocabulary to a multiple of 32 rows is not required; keep exact.

  std::mt19937_64 rng(s.seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto randv = [&](size_t n, float scale) {
    std::vector<float> v(n);
    for (float& x : v) x = nd(rng) * scale;
    return v;
  };
  auto add = [&](const std::string& name, int64_t cols, int64_t rows, kernels::DType t,
                 float scale) {
    std::vector<int64_t> dims = rows > 0 ? std::vector<int64_t>{cols, rows}
                                         : std::vector<int64_t>{cols};
    Status st = w.AddTensor(name, dims, t,
                            Quantize(t, randv(static_cast<size_t>(cols * std::max<int64_t>(rows, 1)), scale)));
    if (!st.ok()) std::abort();
  };
  auto add_norm = [&](const std::string& name, int64_t n) {
    std::vector<float> g(n);
    for (float& x : g) x = 1.0f + 0.1f * nd(rng);
    Status st = w.AddTensor(name, {n}, kernels::DType::kF32, Quantize(kernels::DType::kF32, g));
    if (!st.ok()) std::abort();
  };
  const float ws = 1.0f / std::sqrt(static_cast<float>(s.dim));
  add("token_embd.weight", s.dim, vocab, s.embd_type, 1.0f);
  add_norm("output_norm.weight", s.dim);
  if (!s.tied_output) add("output.weight", s.dim, vocab, s.matrix_type, ws);
  for (int32_t l = 0; l < s.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    add_norm(p + "attn_norm.weight", s.dim);
    add_norm(p + "ffn_norm.weight", s.dim);
    add(p + "attn_q.weight", s.dim, s.n_heads * head_dim, s.matrix_type, ws);
    add(p + "attn_k.weight", s.dim, s.n_kv_heads * head_dim, s.matrix_type, ws);
    add(p + "attn_v.weight", s.dim, s.n_kv_heads * head_dim, s.matrix_type, ws);
    add(p + "attn_output.weight", s.n_heads * head_dim, s.dim, s.matrix_type, ws);
    add(p + "ffn_gate.weight", s.dim, s.ffn_dim, s.matrix_type, ws);
    add(p + "ffn_up.weight", s.dim, s.ffn_dim, s.matrix_type, ws);
    add(p + "ffn_down.weight", s.ffn_dim, s.dim, s.matrix_type,
        1.0f / std::sqrt(static_cast<float>(s.ffn_dim)));
    if (s.arch == "qwen2") {
      add(p + "attn_q.bias", s.n_heads * head_dim, 0, kernels::DType::kF32, 0.1f);
      add(p + "attn_k.bias", s.n_kv_heads * head_dim, 0, kernels::DType::kF32, 0.1f);
      add(p + "attn_v.bias", s.n_kv_heads * head_dim, 0, kernels::DType::kF32, 0.1f);
    }
  }
  return w.Serialize();
}

namespace {

// The temp directories this process made, removed when it exits normally
// (not by a forked child that exits: it shares the list, not the ownership).
struct TempDirs {
  std::mutex mu;
  std::vector<std::string> dirs;
  pid_t owner = getpid();
};

TempDirs& Made() {
  static TempDirs* t = [] {
    auto* d = new TempDirs;
    std::atexit([] {
      TempDirs& m = Made();
      if (getpid() != m.owner) return;
      std::lock_guard<std::mutex> l(m.mu);
      for (const std::string& dir : m.dirs) {
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);
      }
    });
    return d;
  }();
  return *t;
}

}  // namespace

std::string TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base ? base : "/tmp") + "/mnemo-test-XXXXXX";
  char* p = mkdtemp(tmpl.data());
  if (p == nullptr) std::abort();
  TempDirs& made = Made();
  std::lock_guard<std::mutex> l(made.mu);
  made.dirs.push_back(tmpl);
  return tmpl;
}

std::string WriteTinyModel(const TinyModelSpec& spec) {
  std::string path = TempDir() + "/tiny.gguf";
  model::GgufWriter w;
  std::string bytes = MakeTinyModel(spec);
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
  return path;
}

}  // namespace mnemo::testutil

namespace mnemo::testutil {

std::vector<float> Dequantize(kernels::DType type, const void* data, int64_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  std::vector<float> out(static_cast<size_t>(n));
  auto h = [&](size_t off) {
    uint16_t v;
    std::memcpy(&v, p + off, 2);
    return HalfToFloat(v);
  };
  switch (type) {
    case kernels::DType::kF32:
      std::memcpy(out.data(), p, n * 4);
      break;
    case kernels::DType::kF16:
      for (int64_t i = 0; i < n; ++i) out[i] = h(i * 2);
      break;
    case kernels::DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint32_t x = static_cast<uint32_t>(p[i * 2] | (p[i * 2 + 1] << 8)) << 16;
        std::memcpy(&out[i], &x, 4);
      }
      break;
    case kernels::DType::kQ8_0:
      for (int64_t b = 0; b < n / 32; ++b) {
        const float d = h(b * 34);
        for (int i = 0; i < 32; ++i) out[b * 32 + i] = d * static_cast<int8_t>(p[b * 34 + 2 + i]);
      }
      break;
    case kernels::DType::kQ4_0:
      for (int64_t b = 0; b < n / 32; ++b) {
        const float d = h(b * 18);
        for (int i = 0; i < 16; ++i) {
          const uint8_t q = p[b * 18 + 2 + i];
          out[b * 32 + i] = d * ((q & 15) - 8);
          out[b * 32 + 16 + i] = d * ((q >> 4) - 8);
        }
      }
      break;
    case kernels::DType::kQ4_1:
      for (int64_t b = 0; b < n / 32; ++b) {
        const float d = h(b * 20), m = h(b * 20 + 2);
        for (int i = 0; i < 16; ++i) {
          const uint8_t q = p[b * 20 + 4 + i];
          out[b * 32 + i] = d * (q & 15) + m;
          out[b * 32 + 16 + i] = d * (q >> 4) + m;
        }
      }
      break;
    default:
      std::abort();
  }
  return out;
}

}  // namespace mnemo::testutil
