// Byte-level BPE tokenizer built from GGUF metadata. Token ids, special-token
// handling, end-of-generation tokens and decoded text follow llama.cpp's
// llama-vocab.cpp (BPE vocab type) exactly for the supported pre-tokenizers;
// where llama.cpp leaves a choice to hash-map iteration order (which of two
// candidate texts becomes eot_id) ids are taken in ascending order instead.
//
// Tokenizer is immutable after Create: safe for concurrent use.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "model/unicode.h"

namespace mnemo::model {

class GgufFile;

// tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
enum class TokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

// What the GGUF metadata says. Optional fields are nullopt when the key is
// absent; llama.cpp's defaults then apply (for a gpt2 vocab: BOS = EOS = 11
// when that id exists; EOT, EOM and FIM tokens found by their text). An id of
// -1 means "explicitly none".
struct TokenizerConfig {
  std::string model;                 // tokenizer.ggml.model: only "gpt2"
  std::string pre;                   // tokenizer.ggml.pre; "" = "default"
  std::vector<std::string> tokens;   // tokenizer.ggml.tokens
  std::vector<int32_t> token_types;  // tokenizer.ggml.token_type; empty = all normal
  std::vector<std::string> merges;   // tokenizer.ggml.merges, "left right", rank = index
  std::optional<int32_t> bos_id, eos_id, eot_id, eom_id, unk_id, sep_id, pad_id, mask_id;
  std::optional<int32_t> fim_pre_id, fim_suf_id, fim_mid_id, fim_pad_id, fim_rep_id, fim_sep_id;
  std::optional<bool> add_bos, add_eos;  // nullopt: the pre-tokenizer's default
  bool add_space_prefix = false;         // tokenizer.ggml.add_space_prefix (Decode only)
  std::string model_name;                // general.name: llama.cpp keys phi-3 attributes on it
};

// Reads the tokenizer.* keys (and general.name). Like llama.cpp, a special
// token id outside the vocabulary is ignored (the default applies).
Result<TokenizerConfig> TokenizerConfigFromGguf(const GgufFile& gguf);

class Tokenizer {
 public:
  // Which of llama.cpp's pre-tokenizer regex sets the model uses.
  using PreKind = unicode::PreTokenizer;

  // Validates `cfg`: model "gpt2" and a pre-tokenizer that llama.cpp knows
  // and this build implements (else Unsupported); unique token texts, one
  // token type per token, special ids inside the vocabulary, merges "a b"
  // whose parts and concatenation are tokens (else InvalidArgument).
  static Result<std::unique_ptr<Tokenizer>> Create(TokenizerConfig cfg);

  // Tokenizes `text` (any bytes; invalid UTF-8 is handled as llama.cpp does).
  // add_special: prepend BOS / append EOS when the config says so.
  // parse_special: texts of control tokens in `text` become those tokens;
  // user-defined tokens are always recognized (as llama.cpp does).
  std::vector<int32_t> Encode(std::string_view text, bool add_special, bool parse_special) const;
  // Same, appending to *out.
  void EncodeAppend(std::string_view text, bool add_special, bool parse_special,
                    std::vector<int32_t>* out) const;

  // Bytes of one token (may be part of a UTF-8 sequence). Control and unknown
  // tokens render only with render_special. Empty for an id out of range.
  std::string TokenToPiece(int32_t id, bool render_special) const;
  // As TokenToPiece, viewing storage owned by this Tokenizer.
  std::string_view Piece(int32_t id, bool render_special) const;
  // llama_detokenize(remove_special = false, unparse_special = render_special):
  // pieces concatenated, the first one's leading space dropped when the model
  // adds a space prefix, and llama.cpp's clean-up of " ," " 's"... applied for
  // the pre-tokenizers that ask for it.
  std::string Decode(std::span<const int32_t> ids, bool render_special) const;

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t bos_id() const { return bos_id_; }  // -1: none
  int32_t eos_id() const { return eos_id_; }  // -1: none
  int32_t eot_id() const { return eot_id_; }  // -1: none
  bool add_bos() const { return add_bos_; }
  bool add_eos() const { return add_eos_; }
  PreKind pre_kind() const { return pre_kind_; }
  // End of generation: EOS, EOT, EOM, FIM pad/repo/file-separator and the
  // tokens llama.cpp recognizes by text (<|im_end|>, <|endoftext|>, ...).
  bool IsEog(int32_t id) const;
  // Control or unknown token (rendered only on request).
  bool IsControl(int32_t id) const;
  const std::vector<int32_t>& eog_ids() const { return eog_ids_; }
  // Id of the token whose vocabulary text is exactly `text`.
  std::optional<int32_t> FindToken(std::string_view text) const;
  // Vocabulary text of `id` (byte-level encoded for normal tokens).
  const std::string& TokenText(int32_t id) const;

 private:
  struct Scratch;
  struct MergeTable;

  Tokenizer();
  Status Init(TokenizerConfig cfg);
  void EncodeText(std::string_view text, Scratch* s, std::vector<int32_t>* out) const;
  void EncodeWord(std::string_view word, Scratch* s, std::vector<int32_t>* out) const;

  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
  };

  // constant after construction
  std::vector<std::string> tokens_;
  std::vector<uint16_t> attrs_;      // llama_token_attr bits
  std::vector<std::string> pieces_;  // rendered with special tokens
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> token_to_id_;
  std::unique_ptr<MergeTable> merges_;
  int32_t byte_token_[256];           // token of the byte-level character for each byte
  int32_t single_char_token_[256];    // token whose text is that single raw byte
  std::vector<int32_t> special_ids_;  // matched in this order (longest text first)
  std::vector<uint8_t> is_eog_;
  std::vector<int32_t> eog_ids_;
  PreKind pre_kind_ = PreKind::kDefault;
  bool ignore_merges_ = false;
  bool clean_spaces_ = true;
  bool add_bos_ = false;
  bool add_eos_ = false;
  bool add_space_prefix_ = false;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  int32_t eot_id_ = -1;

 public:
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;
};

}  // namespace mnemo::model
