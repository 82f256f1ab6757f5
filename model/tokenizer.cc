// Byte-level BPE: special-token partitioning, the per-model pre-tokenizers,
// merges and detokenization, each reproducing llama.cpp's llama-vocab.cpp and
// unicode.cpp behaviour (including their quirks, which token ids depend on).
#include "model/tokenizer.h"

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "common/check.h"
#include "model/gguf.h"
#include "model/unicode.h"

namespace mnemo::model {

namespace uc = unicode;

namespace {

// llama_token_attr bits.
constexpr uint16_t kAttrUnknown = 1 << 0;
constexpr uint16_t kAttrUnused = 1 << 1;
constexpr uint16_t kAttrNormal = 1 << 2;
constexpr uint16_t kAttrControl = 1 << 3;
constexpr uint16_t kAttrUserDefined = 1 << 4;
constexpr uint16_t kAttrByte = 1 << 5;
constexpr uint16_t kAttrLstrip = 1 << 7;
constexpr uint16_t kAttrRstrip = 1 << 8;

constexpr size_t kMaxVocab = size_t{1} << 22;
constexpr size_t kMaxTokenBytes = size_t{1} << 16;
constexpr size_t kMaxMerges = size_t{1} << 23;
// llama.cpp's default special ids for a gpt2 vocabulary.
constexpr int32_t kDefaultGpt2BosEos = 11;

uint16_t AttrFromType(int32_t type) {
  switch (static_cast<TokenType>(type)) {
    case TokenType::kUnknown:
      return kAttrUnknown;
    case TokenType::kUnused:
      return kAttrUnused;
    case TokenType::kNormal:
      return kAttrNormal;
    case TokenType::kControl:
      return kAttrControl;
    case TokenType::kUserDefined:
      return kAttrUserDefined;
    case TokenType::kByte:
      return kAttrByte;
    default:
      return 0;  // undefined
  }
}

// ASCII isspace, as llama.cpp's lstrip/rstrip see bytes.
bool IsAsciiSpace(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

// ---------------------------------------------------------------------------
// Pre-tokenizer traits: which splitter llama.cpp runs for a tokenizer.ggml.pre
// value, and the flags its loader sets alongside.

using Pre = Tokenizer::PreKind;

struct PreInfo {
  const char* name;
  Pre kind;
  bool clean_spaces;
  bool ignore_merges;
  bool add_bos;
};

constexpr PreInfo kPreTypes[] = {
    {"default", Pre::kDefault, true, false, false},
    // LLAMA_VOCAB_PRE_TYPE_LLAMA3
    {"llama3", Pre::kLlama3, true, true, true},
    {"llama-v3", Pre::kLlama3, true, true, true},
    {"llama-bpe", Pre::kLlama3, true, true, true},
    {"falcon3", Pre::kLlama3, true, true, true},
    {"falcon-h1", Pre::kLlama3, true, true, true},
    {"pixtral", Pre::kLlama3, true, true, true},
    {"midm-2.0", Pre::kLlama3, true, true, true},
    {"lfm2", Pre::kLlama3, true, true, true},
    {"jina-v5-nano", Pre::kLlama3, true, true, true},
    // DBRX, SMAUG: the Llama 3 regex without ignore_merges
    {"dbrx", Pre::kLlama3, true, false, false},
    {"smaug-bpe", Pre::kLlama3, true, false, false},
    // GPT2, MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING
    {"gpt-2", Pre::kGpt2, true, false, false},
    {"phi-2", Pre::kGpt2, true, false, false},
    {"jina-es", Pre::kGpt2, true, false, false},
    {"jina-de", Pre::kGpt2, true, false, false},
    {"gigachat", Pre::kGpt2, true, false, false},
    {"jina-v2-es", Pre::kGpt2, true, false, false},
    {"jina-v2-de", Pre::kGpt2, true, false, false},
    {"a.x-4.0", Pre::kGpt2, true, false, false},
    {"mellum", Pre::kGpt2, true, false, false},
    {"modern-bert", Pre::kGpt2, true, false, false},
    {"jina-v1-en", Pre::kGpt2, true, false, false},
    {"jina-v2-code", Pre::kGpt2, true, false, false},
    {"roberta-bpe", Pre::kGpt2, true, false, false},
    {"mpt", Pre::kGpt2, true, false, false},
    {"olmo", Pre::kGpt2, true, false, false},
    {"jais", Pre::kGpt2, true, false, false},
    {"exaone4", Pre::kGpt2, true, false, false},
    {"trillion", Pre::kGpt2, false, false, false},
    {"granite-docling", Pre::kGpt2, false, false, false},
    // STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA,
    // MELLUM2: every digit isolated, then the GPT-2 regex
    {"starcoder", Pre::kDigitsThenGpt2, true, false, false},
    {"refact", Pre::kDigitsThenGpt2, true, false, false},
    {"command-r", Pre::kDigitsThenGpt2, false, false, false},
    {"smollm", Pre::kDigitsThenGpt2, false, false, false},
    {"codeshell", Pre::kDigitsThenGpt2, true, false, false},
    {"exaone", Pre::kDigitsThenGpt2, true, false, false},
    {"minerva-7b", Pre::kDigitsThenGpt2, true, false, false},
    {"mellum2", Pre::kDigitsThenGpt2, true, false, false},
    // QWEN2, STABLELM2, HUNYUAN, SOLAR_OPEN: Llama 3 regex, single digits
    {"qwen2", Pre::kQwen2, false, false, false},
    {"deepseek-r1-qwen", Pre::kQwen2, false, false, false},
    {"kormo", Pre::kQwen2, false, false, false},
    {"f2llmv2", Pre::kQwen2, false, false, false},
    {"megrez", Pre::kQwen2, true, false, false},
    {"stablelm2", Pre::kQwen2, true, false, false},
    {"hunyuan", Pre::kQwen2, false, false, false},
    {"solar-open", Pre::kQwen2, false, false, false},
};

const PreInfo* FindPre(std::string_view name) {
  if (name.empty()) name = "default";
  // "gpt2" is the tokenizer.ggml.model value; some hand-written configs put it
  // in .pre too. llama.cpp only knows "gpt-2" there: same pre-tokenizer.
  if (name == "gpt2") name = "gpt-2";
  for (const PreInfo& p : kPreTypes) {
    if (name == p.name) return &p;
  }
  return nullptr;
}

// ---------------------------------------------------------------------------

void AppendFallbackBytes(std::string_view s, const int32_t* single_char_token,
                         std::vector<int32_t>* out) {
  // llama.cpp looks each byte of an unknown symbol's text up as a one-byte
  // token and drops the bytes that are not tokens.
  for (char ch : s) {
    const int32_t id = single_char_token[static_cast<uint8_t>(ch)];
    if (id >= 0) out->push_back(id);
  }
}

std::string DecodeByteLevel(const std::string& text) {
  std::vector<uint32_t> cpts;
  uc::DecodeUtf8(text, &cpts);
  std::string out;
  out.reserve(text.size());
  for (uint32_t cpt : cpts) {
    const int b = uc::CodepointToByte(cpt);
    if (b >= 0) {
      out.push_back(static_cast<char>(b));
      continue;
    }
    // Not a byte-level character: llama.cpp's llama_decode_text marker.
    std::string utf8;
    uc::AppendUtf8(cpt, &utf8);
    out += "[UNK_BYTE_0x";
    static constexpr char kHex[] = "0123456789abcdef";
    for (char ch : utf8) {
      out.push_back(kHex[static_cast<uint8_t>(ch) >> 4]);
      out.push_back(kHex[static_cast<uint8_t>(ch) & 15]);
    }
    out += text;
    out += "]";
  }
  return out;
}

// llama.cpp's token_to_byte for a byte token "<0xAB>": strtol of text[3..5].
std::string ByteTokenPiece(const std::string& text) {
  if (text.size() < 3) return std::string();
  const std::string hex = text.substr(3, 2);
  const long v = std::strtol(hex.c_str(), nullptr, 16);
  return std::string(1, static_cast<char>(static_cast<uint8_t>(v)));
}

// llama_detokenize's clean_spaces passes, byte for byte (in place, as there).
void CleanSpaces(std::string* s) {
  char* text = s->data();
  int64_t total = static_cast<int64_t>(s->size());
  // " ?", " !", " .", " ,": drop the space.
  const int64_t total1 = total;
  total = total ? 1 : 0;
  for (int64_t i = 1; i < total1; ++i) {
    const char x = text[i];
    if (text[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ',')) --total;
    text[total++] = x;
  }
  // " ' ": drop both spaces around a lone apostrophe.
  const int64_t total2 = total;
  total = total ? 1 : 0;
  for (int64_t i = 1; i < total2; ++i) {
    const char x = text[i];
    if (x == '\'' && i + 1 < total2 && text[i - 1] == ' ' && text[i + 1] == ' ') {
      --total;
      text[++i] = '\0';
    }
    text[total++] = x;
  }
  // " 's", " 'm", " 're", " 've": drop the space.
  const int64_t total3 = total;
  total = total ? 1 : 0;
  for (int64_t i = 1; i < total3; ++i) {
    const char x = text[i];
    if (text[i - 1] == ' ' && x == '\'' && i + 1 < total3) {
      const char x1 = text[i + 1];
      if (x1 == 's' || x1 == 'm') {
        --total;
      } else if (x1 != 't' && x1 != 'd' && i + 2 < total3) {
        const char x2 = text[i + 2];
        if ((x1 == 'r' && x2 == 'e') || (x1 == 'v' && x2 == 'e')) --total;
      }
    }
    text[total++] = x;
  }
  s->resize(static_cast<size_t>(total));
}

bool Contains(const std::vector<std::string_view>& list, std::string_view s) {
  return std::find(list.begin(), list.end(), s) != list.end();
}

}  // namespace

// ---------------------------------------------------------------------------
// Merge ranks: an open-addressing table keyed by the (left, right) token ids.

struct Tokenizer::MergeTable {
  struct Entry {
    uint64_t key = kEmpty;
    int32_t rank = 0;
    int32_t result = 0;
  };
  static constexpr uint64_t kEmpty = ~uint64_t{0};

  std::vector<Entry> slots;
  uint64_t mask = 0;
  int shift = 64;

  static uint64_t Key(int32_t l, int32_t r) {
    return (uint64_t{static_cast<uint32_t>(l)} << 32) | static_cast<uint32_t>(r);
  }
  size_t Slot(uint64_t key) const { return (key * 0x9E3779B97F4A7C15ull) >> shift; }

  void Reserve(size_t n) {
    size_t cap = 16;
    shift = 60;
    while (cap < 2 * n) {
      cap <<= 1;
      --shift;
    }
    slots.assign(cap, Entry{});
    mask = cap - 1;
  }
  // Keeps the first rank of a repeated pair, as llama.cpp's map emplace does.
  void Insert(int32_t l, int32_t r, int32_t rank, int32_t result) {
    const uint64_t key = Key(l, r);
    for (size_t i = Slot(key);; i = (i + 1) & mask) {
      if (slots[i].key == key) return;
      if (slots[i].key == kEmpty) {
        slots[i] = Entry{key, rank, result};
        return;
      }
    }
  }
  const Entry* Find(int32_t l, int32_t r) const {
    const uint64_t key = Key(l, r);
    for (size_t i = Slot(key);; i = (i + 1) & mask) {
      if (slots[i].key == key) return &slots[i];
      if (slots[i].key == kEmpty) return nullptr;
    }
  }
};

// Per-call working memory (Encode allocates one; nothing is shared).
struct Tokenizer::Scratch {
  std::vector<uint32_t> cpts;
  std::vector<uint16_t> flags;
  std::vector<uint32_t> chunks, chunks_tmp;
  std::string word;
  std::string encoded;
  struct Symbol {
    int32_t id;  // kDead once merged into its left neighbour
    int32_t prev, next;
  };
  struct Bigram {
    int32_t rank, left, right, left_id, right_id, result;
  };
  std::vector<Symbol> symbols;
  std::vector<Bigram> heap;
};

namespace {
constexpr int32_t kDead = -2;
}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

Result<std::unique_ptr<Tokenizer>> Tokenizer::Create(TokenizerConfig cfg) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  MNEMO_RETURN_IF_ERROR(t->Init(std::move(cfg)));
  return t;
}

Status Tokenizer::Init(TokenizerConfig cfg) {
  if (cfg.model != "gpt2") {
    return Status::Unsupported("tokenizer model '" + cfg.model +
                               "' is not supported (only gpt2 byte-level BPE)");
  }
  const PreInfo* pre = FindPre(cfg.pre);
  if (pre == nullptr) {
    return Status::Unsupported("pre-tokenizer '" + cfg.pre +
                               "' is not supported (llama.cpp rejects names it does not know; "
                               "supported: the default, gpt-2, smollm/starcoder, llama-bpe and "
                               "qwen2 families)");
  }
  pre_kind_ = pre->kind;
  clean_spaces_ = pre->clean_spaces;
  ignore_merges_ = pre->ignore_merges;

  const size_t n = cfg.tokens.size();
  if (n == 0) return Status::InvalidArgument("tokenizer has no tokens");
  if (n > kMaxVocab) {
    return Status::InvalidArgument("vocabulary of " + std::to_string(n) + " tokens exceeds " +
                                   std::to_string(kMaxVocab));
  }
  if (!cfg.token_types.empty() && cfg.token_types.size() != n) {
    return Status::InvalidArgument("token_type has " + std::to_string(cfg.token_types.size()) +
                                   " entries for " + std::to_string(n) + " tokens");
  }
  const int32_t n_tokens = static_cast<int32_t>(n);

  tokens_ = std::move(cfg.tokens);
  attrs_.assign(n, kAttrNormal);
  token_to_id_.reserve(n);
  for (int32_t i = 0; i < n_tokens; ++i) {
    std::string& text = tokens_[i];
    if (text.empty()) text = "[EMPTY_" + std::to_string(i) + "]";  // as llama.cpp
    if (text.size() > kMaxTokenBytes) {
      return Status::InvalidArgument("token " + std::to_string(i) + " is " +
                                     std::to_string(text.size()) + " bytes long");
    }
    if (!token_to_id_.emplace(text, i).second) {
      return Status::InvalidArgument("token text of " + std::to_string(i) + " repeats token " +
                                     std::to_string(token_to_id_[text]));
    }
    if (!cfg.token_types.empty()) attrs_[i] = AttrFromType(cfg.token_types[i]);
  }

  // Merges.
  if (cfg.merges.size() > kMaxMerges) return Status::InvalidArgument("too many merges");
  merges_ = std::make_unique<MergeTable>();
  merges_->Reserve(cfg.merges.size());
  for (size_t r = 0; r < cfg.merges.size(); ++r) {
    const std::string& m = cfg.merges[r];
    const size_t sp = m.find(' ', 1);
    auto bad = [&](const char* why) {
      return Status::InvalidArgument("merge " + std::to_string(r) + " '" + m + "': " + why);
    };
    if (sp == std::string::npos || sp + 1 >= m.size()) return bad("not 'left right'");
    const std::string_view left(m.data(), sp);
    const std::string_view right(m.data() + sp + 1, m.size() - sp - 1);
    auto l = FindToken(left);
    auto rr = FindToken(right);
    if (!l || !rr) return bad("a part is not a token");
    std::string joined(left);
    joined += right;
    auto j = FindToken(joined);
    if (!j) return bad("the merged text is not a token");
    merges_->Insert(*l, *rr, static_cast<int32_t>(r), *j);
  }

  for (int b = 0; b < 256; ++b) {
    byte_token_[b] = FindToken(uc::ByteToText(static_cast<uint8_t>(b))).value_or(-1);
    const char ch = static_cast<char>(b);
    single_char_token_[b] = FindToken(std::string_view(&ch, 1)).value_or(-1);
  }

  // Special ids: llama.cpp's gpt2 defaults, then the metadata.
  auto check_id = [&](const std::optional<int32_t>& id, const char* what) -> Status {
    if (id && (*id < -1 || *id >= n_tokens)) {
      return Status::InvalidArgument(std::string(what) + " id " + std::to_string(*id) +
                                     " outside the vocabulary of " + std::to_string(n_tokens));
    }
    return Status::Ok();
  };
  MNEMO_RETURN_IF_ERROR(check_id(cfg.bos_id, "bos"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.eos_id, "eos"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.eot_id, "eot"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.eom_id, "eom"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.unk_id, "unk"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.sep_id, "sep"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.pad_id, "pad"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.mask_id, "mask"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.fim_pre_id, "fim_pre"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.fim_suf_id, "fim_suf"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.fim_mid_id, "fim_mid"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.fim_pad_id, "fim_pad"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.fim_rep_id, "fim_rep"));
  MNEMO_RETURN_IF_ERROR(check_id(cfg.fim_sep_id, "fim_sep"));
  const int32_t default_bos_eos = kDefaultGpt2BosEos < n_tokens ? kDefaultGpt2BosEos : -1;
  bos_id_ = cfg.bos_id.value_or(default_bos_eos);
  eos_id_ = cfg.eos_id.value_or(default_bos_eos);
  eot_id_ = cfg.eot_id.value_or(-1);
  int32_t eom_id = cfg.eom_id.value_or(-1);
  int32_t fim_pre = cfg.fim_pre_id.value_or(-1);
  int32_t fim_suf = cfg.fim_suf_id.value_or(-1);
  int32_t fim_mid = cfg.fim_mid_id.value_or(-1);
  int32_t fim_pad = cfg.fim_pad_id.value_or(-1);
  int32_t fim_rep = cfg.fim_rep_id.value_or(-1);
  int32_t fim_sep = cfg.fim_sep_id.value_or(-1);
  add_bos_ = cfg.add_bos.value_or(pre->add_bos);
  add_eos_ = cfg.add_eos.value_or(false);
  add_space_prefix_ = cfg.add_space_prefix;
  if (add_bos_ && bos_id_ < 0) return Status::InvalidArgument("add_bos without a BOS token");
  if (add_eos_ && eos_id_ < 0) return Status::InvalidArgument("add_eos without an EOS token");

  // Tokens llama.cpp recognizes by their text when the metadata is silent;
  // each becomes a control token.
  struct Detect {
    int32_t* id;
    std::vector<std::string_view> texts;
  };
  Detect detects[] = {
      {&eot_id_,
       {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
        "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"}},
      {&eom_id, {"<|eom_id|>"}},
      {&fim_pre,
       {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
        "<|code_prefix|>", "<|prefix|>"}},
      {&fim_suf,
       {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
        "<|code_suffix|>", "<|suffix|>"}},
      {&fim_mid,
       {"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
        "<|code_middle|>", "<|middle|>"}},
      {&fim_pad, {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"}},
      {&fim_rep, {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"}},
      {&fim_sep, {"<|file_sep|>"}},
  };
  for (int32_t i = 0; i < n_tokens; ++i) {
    for (Detect& d : detects) {
      if (*d.id == -1 && Contains(d.texts, tokens_[i])) {
        *d.id = i;
        attrs_[i] |= kAttrControl;
      }
    }
  }
  // Control tokens named "unused" are unused.
  for (int32_t i = 0; i < n_tokens; ++i) {
    if ((attrs_[i] & kAttrControl) && tokens_[i].find("unused") != std::string::npos) {
      attrs_[i] |= kAttrUnused;
    }
  }

  // End-of-generation set.
  is_eog_.assign(n, 0);
  for (int32_t id : {fim_pad, fim_rep, fim_sep}) {
    if (id >= 0) is_eog_[id] = 1;
  }
  static const std::vector<std::string_view> kEogTexts = {"<|eot_id|>",
                                                          "<|im_end|>",
                                                          "<|end|>",
                                                          "<|return|>",
                                                          "<|call|>",
                                                          "<|flush|>",
                                                          "<|calls|>",
                                                          "<end_of_turn>",
                                                          "<|endoftext|>",
                                                          "</s>",
                                                          "<|eom_id|>",
                                                          "<EOT>",
                                                          "_<EOT>",
                                                          "[EOT]",
                                                          "[EOS]",
                                                          "<|end_of_text|>",
                                                          "<end_of_utterance>",
                                                          "<eos>",
                                                          "<turn|>",
                                                          "<|tool_response>",
                                                          "<｜end▁of▁sentence｜>",
                                                          "[e~["};
  for (int32_t i = 0; i < n_tokens; ++i) {
    if (Contains(kEogTexts, tokens_[i])) {
      is_eog_[i] = 1;
      attrs_[i] |= kAttrControl;
    }
  }
  // gpt-oss: these always render.
  for (std::string_view s : {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}) {
    if (auto id = FindToken(s)) attrs_[*id] = kAttrUserDefined;
  }
  for (int32_t id : {eos_id_, eot_id_, eom_id}) {
    if (id >= 0) is_eog_[id] = 1;
  }
  {
    // o200k_harmony / solar-open: <|end|> is not an end of generation there.
    auto eog_with = [&](std::string_view s) {
      auto id = FindToken(s);
      return id && is_eog_[*id];
    };
    auto end = FindToken("<|end|>");
    const bool has_call = eog_with("<|call|>") || eog_with("<|calls|>");
    if (end && is_eog_[*end] && has_call && (eog_with("<|return|>") || eog_with("<|flush|>"))) {
      is_eog_[*end] = 0;
      attrs_[*end] = kAttrUserDefined;
    }
    // gemma4 / plamo: </s> is a normal token there.
    auto s = FindToken("</s>");
    if (s && is_eog_[*s] && (eog_with("<|tool_response>") || eog_with("<|plamo:eos|>"))) {
      is_eog_[*s] = 0;
      attrs_[*s] = kAttrNormal;
    }
  }
  for (int32_t i = 0; i < n_tokens; ++i) {
    if (is_eog_[i]) eog_ids_.push_back(i);
  }

  // Texts matched before pre-tokenization, longest first.
  for (int32_t i = 0; i < n_tokens; ++i) {
    if (attrs_[i] & (kAttrControl | kAttrUserDefined | kAttrUnknown)) special_ids_.push_back(i);
  }
  std::stable_sort(special_ids_.begin(), special_ids_.end(),
                   [&](int32_t a, int32_t b) { return tokens_[a].size() > tokens_[b].size(); });

  // Pieces (with special tokens rendered), as llama.cpp caches them.
  pieces_.resize(n);
  for (int32_t i = 0; i < n_tokens; ++i) {
    const uint16_t a = attrs_[i];
    if (a & (kAttrUnknown | kAttrControl | kAttrUserDefined)) {
      pieces_[i] = tokens_[i];
    } else if (a & kAttrNormal) {
      pieces_[i] = DecodeByteLevel(tokens_[i]);
    } else if (a & kAttrByte) {
      pieces_[i] = ByteTokenPiece(tokens_[i]);
    }
  }

  // Per-token strip attributes llama.cpp keys on the model name.
  std::string name = cfg.model_name;
  std::transform(name.begin(), name.end(), name.begin(),
                 [](char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c; });
  if (cfg.pre.find("jina-v2-de") != std::string::npos ||
      cfg.pre.find("jina-v2-es") != std::string::npos ||
      cfg.pre.find("jina-v2-code") != std::string::npos) {
    if (auto id = FindToken("<mask>")) attrs_[*id] |= kAttrLstrip;
  } else if (name.find("phi-3") != std::string::npos || name.find("phi3") != std::string::npos) {
    for (int32_t id : special_ids_) attrs_[id] |= kAttrRstrip;
    if (auto id = FindToken("</s>")) attrs_[*id] |= kAttrRstrip;
    for (std::string_view s : {"<unk>", "<s>", "<|endoftext|>"}) {
      if (auto id = FindToken(s)) attrs_[*id] &= ~kAttrRstrip;
    }
  } else if (name.find("modern-bert") != std::string::npos) {
    if (auto id = FindToken("[MASK]")) attrs_[*id] |= kAttrLstrip;
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special,
                                       bool parse_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  EncodeAppend(text, add_special, parse_special, &out);
  return out;
}

void Tokenizer::EncodeAppend(std::string_view text, bool add_special, bool parse_special,
                             std::vector<int32_t>* out) const {
  if (add_special && add_bos_) out->push_back(bos_id_);

  // Partition into raw text and special tokens, one special token at a time,
  // longest first, exactly as llama.cpp's tokenizer_st_partition.
  struct Fragment {
    size_t offset, length;
    int32_t token;  // -1: raw text
  };
  std::vector<Fragment> frags, next;
  if (!text.empty()) frags.push_back({0, text.size(), -1});
  for (int32_t id : special_ids_) {
    const uint16_t attr = attrs_[id];
    if (!parse_special && (attr & (kAttrControl | kAttrUnknown))) continue;
    const std::string& tok = tokens_[id];
    if (text.find(tok) == std::string_view::npos) continue;  // cheap global filter
    next.clear();
    for (const Fragment& f : frags) {
      if (f.token >= 0) {
        next.push_back(f);
        continue;
      }
      size_t off = f.offset;
      size_t len = f.length;
      while (true) {
        const size_t match = text.substr(0, off + len).find(tok, off);
        if (match == std::string_view::npos) {
          if (len > 0) next.push_back({off, len, -1});
          break;
        }
        size_t left_len = match - off;
        if (attr & kAttrLstrip) {
          while (left_len > 0 && IsAsciiSpace(text[off + left_len - 1])) --left_len;
        }
        if (left_len > 0) next.push_back({off, left_len, -1});
        next.push_back({0, 0, id});
        size_t right_off = match + tok.size();
        size_t right_len = off + len - right_off;
        if (attr & kAttrRstrip) {
          while (right_len > 0 && IsAsciiSpace(text[right_off])) {
            ++right_off;
            --right_len;
          }
        }
        off = right_off;
        len = right_len;
        if (len == 0) break;
      }
    }
    frags.swap(next);
  }

  Scratch s;
  for (const Fragment& f : frags) {
    if (f.token >= 0) {
      out->push_back(f.token);
    } else {
      EncodeText(text.substr(f.offset, f.length), &s, out);
    }
  }
  if (add_special && add_eos_) out->push_back(eos_id_);
}

void Tokenizer::EncodeText(std::string_view text, Scratch* s, std::vector<int32_t>* out) const {
  s->cpts.clear();
  uc::DecodeUtf8(text, &s->cpts);
  const size_t n = s->cpts.size();
  s->flags.resize(n);
  for (size_t i = 0; i < n; ++i) s->flags[i] = uc::CodepointFlags(s->cpts[i]);
  uc::SplitWords(pre_kind_, s->cpts, s->flags, &s->chunks, &s->chunks_tmp);
  size_t begin = 0;
  for (uint32_t len : s->chunks) {
    s->word.clear();
    for (size_t i = begin; i < begin + len; ++i) uc::AppendUtf8(s->cpts[i], &s->word);
    EncodeWord(s->word, s, out);
    begin += len;
  }
}

void Tokenizer::EncodeWord(std::string_view word, Scratch* s, std::vector<int32_t>* out) const {
  const size_t n = word.size();
  if (n == 0) return;
  MNEMO_CHECK(n < static_cast<size_t>(std::numeric_limits<int32_t>::max()));
  if (ignore_merges_) {
    s->encoded.clear();
    for (char ch : word) s->encoded += uc::ByteToText(static_cast<uint8_t>(ch));
    auto it = token_to_id_.find(std::string_view(s->encoded));
    if (it != token_to_id_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  auto emit_symbol = [&](size_t i, int32_t id) {
    if (id >= 0) {
      out->push_back(id);
    } else {
      AppendFallbackBytes(uc::ByteToText(static_cast<uint8_t>(word[i])), single_char_token_, out);
    }
  };
  if (n == 1) {
    emit_symbol(0, byte_token_[static_cast<uint8_t>(word[0])]);
    return;
  }

  // Each byte starts as its byte-level character; the lowest-ranked adjacent
  // pair merges first, the leftmost among equal ranks (llama.cpp's queue order).
  auto& sym = s->symbols;
  auto& heap = s->heap;
  sym.resize(n);
  heap.clear();
  const int32_t last = static_cast<int32_t>(n) - 1;
  for (int32_t i = 0; i <= last; ++i) {
    sym[i] = {byte_token_[static_cast<uint8_t>(word[i])], i - 1, i == last ? -1 : i + 1};
  }
  auto later = [](const Scratch::Bigram& x, const Scratch::Bigram& y) {
    return x.rank > y.rank || (x.rank == y.rank && x.left > y.left);
  };
  auto try_add = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const int32_t lid = sym[l].id, rid = sym[r].id;
    if (lid < 0 || rid < 0) return;
    const MergeTable::Entry* e = merges_->Find(lid, rid);
    if (e == nullptr) return;
    heap.push_back({e->rank, l, r, lid, rid, e->result});
    std::push_heap(heap.begin(), heap.end(), later);
  };
  for (int32_t i = 0; i < last; ++i) try_add(i, i + 1);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Scratch::Bigram bg = heap.back();
    heap.pop_back();
    Scratch::Symbol& l = sym[bg.left];
    Scratch::Symbol& r = sym[bg.right];
    if (l.id != bg.left_id || r.id != bg.right_id) continue;  // stale
    l.id = bg.result;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = bg.left;
    r.id = kDead;
    try_add(l.prev, bg.left);
    try_add(bg.left, l.next);
  }
  for (int32_t i = 0; i >= 0; i = sym[i].next) emit_symbol(i, sym[i].id);
}

// ---------------------------------------------------------------------------

std::string_view Tokenizer::Piece(int32_t id, bool render_special) const {
  if (id < 0 || id >= vocab_size()) return {};
  if (!render_special && (attrs_[id] & (kAttrUnknown | kAttrControl))) return {};
  return pieces_[id];
}

std::string Tokenizer::TokenToPiece(int32_t id, bool render_special) const {
  return std::string(Piece(id, render_special));
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool render_special) const {
  std::string text;
  bool remove_space = add_space_prefix_;
  for (int32_t id : ids) {
    std::string_view p = Piece(id, render_special);
    if (remove_space && !p.empty() && p.front() == ' ') p.remove_prefix(1);
    remove_space = false;
    text += p;
  }
  if (clean_spaces_) CleanSpaces(&text);
  return text;
}

bool Tokenizer::IsEog(int32_t id) const { return id >= 0 && id < vocab_size() && is_eog_[id]; }

bool Tokenizer::IsControl(int32_t id) const {
  return id >= 0 && id < vocab_size() && (attrs_[id] & (kAttrUnknown | kAttrControl));
}

std::optional<int32_t> Tokenizer::FindToken(std::string_view text) const {
  auto it = token_to_id_.find(text);
  if (it == token_to_id_.end()) return std::nullopt;
  return it->second;
}

const std::string& Tokenizer::TokenText(int32_t id) const {
  MNEMO_CHECK(id >= 0 && id < vocab_size());
  return tokens_[id];
}

// ---------------------------------------------------------------------------

Result<TokenizerConfig> TokenizerConfigFromGguf(const GgufFile& gguf) {
  TokenizerConfig cfg;
  MNEMO_ASSIGN_OR_RETURN(cfg.model, gguf.GetString("tokenizer.ggml.model"));
  MNEMO_ASSIGN_OR_RETURN(cfg.pre, gguf.GetStringOr("tokenizer.ggml.pre", ""));
  MNEMO_ASSIGN_OR_RETURN(cfg.tokens, gguf.GetStringArray("tokenizer.ggml.tokens"));
  if (gguf.Has("tokenizer.ggml.token_type")) {
    MNEMO_ASSIGN_OR_RETURN(std::vector<int64_t> types,
                           gguf.GetIntArray("tokenizer.ggml.token_type"));
    if (types.size() < cfg.tokens.size()) {
      return Status::Corruption("tokenizer.ggml.token_type has " + std::to_string(types.size()) +
                                " entries for " + std::to_string(cfg.tokens.size()) + " tokens");
    }
    types.resize(cfg.tokens.size());
    cfg.token_types.reserve(types.size());
    for (int64_t t : types) cfg.token_types.push_back(static_cast<int32_t>(t));
  }
  if (cfg.model == "gpt2") {
    MNEMO_ASSIGN_OR_RETURN(cfg.merges, gguf.GetStringArray("tokenizer.ggml.merges"));
  }
  const int64_t n = static_cast<int64_t>(cfg.tokens.size());
  struct IdKey {
    const char* key;
    std::optional<int32_t>* field;
  };
  // The deprecated prefix/suffix/middle keys come last: they win, as in llama.cpp.
  const IdKey keys[] = {
      {"tokenizer.ggml.bos_token_id", &cfg.bos_id},
      {"tokenizer.ggml.eos_token_id", &cfg.eos_id},
      {"tokenizer.ggml.eot_token_id", &cfg.eot_id},
      {"tokenizer.ggml.eom_token_id", &cfg.eom_id},
      {"tokenizer.ggml.unknown_token_id", &cfg.unk_id},
      {"tokenizer.ggml.seperator_token_id", &cfg.sep_id},
      {"tokenizer.ggml.padding_token_id", &cfg.pad_id},
      {"tokenizer.ggml.mask_token_id", &cfg.mask_id},
      {"tokenizer.ggml.fim_pre_token_id", &cfg.fim_pre_id},
      {"tokenizer.ggml.fim_suf_token_id", &cfg.fim_suf_id},
      {"tokenizer.ggml.fim_mid_token_id", &cfg.fim_mid_id},
      {"tokenizer.ggml.fim_pad_token_id", &cfg.fim_pad_id},
      {"tokenizer.ggml.fim_rep_token_id", &cfg.fim_rep_id},
      {"tokenizer.ggml.fim_sep_token_id", &cfg.fim_sep_id},
      {"tokenizer.ggml.prefix_token_id", &cfg.fim_pre_id},
      {"tokenizer.ggml.suffix_token_id", &cfg.fim_suf_id},
      {"tokenizer.ggml.middle_token_id", &cfg.fim_mid_id},
  };
  for (const IdKey& k : keys) {
    if (!gguf.Has(k.key)) continue;
    MNEMO_ASSIGN_OR_RETURN(int64_t v, gguf.GetInt(k.key));
    // llama.cpp ignores an id outside the vocabulary and keeps its default.
    if (v >= 0 && v < n) *k.field = static_cast<int32_t>(v);
  }
  if (gguf.Has("tokenizer.ggml.add_bos_token")) {
    MNEMO_ASSIGN_OR_RETURN(cfg.add_bos, gguf.GetBool("tokenizer.ggml.add_bos_token"));
  }
  if (gguf.Has("tokenizer.ggml.add_eos_token")) {
    MNEMO_ASSIGN_OR_RETURN(cfg.add_eos, gguf.GetBool("tokenizer.ggml.add_eos_token"));
  }
  MNEMO_ASSIGN_OR_RETURN(cfg.add_space_prefix,
                         gguf.GetBoolOr("tokenizer.ggml.add_space_prefix", false));
  MNEMO_ASSIGN_OR_RETURN(cfg.model_name, gguf.GetStringOr("general.name", ""));
  return cfg;
}

}  // namespace mnemo::model
