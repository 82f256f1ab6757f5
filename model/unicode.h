// Unicode helpers for the tokenizer: codepoint classes, UTF-8 decoding, the
// GPT-2 byte-level alphabet and the pre-tokenizers (word splitters), each
// defined the way llama.cpp's unicode.cpp defines it (that, not the Unicode
// standard or a regex engine, is what token ids must match).
//
// Stateless functions over immutable tables: safe from any thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace mnemo::model::unicode {

// Codepoint flags. The low byte is the general category (exactly one bit set
// per codepoint, as in llama.cpp's unicode_cpt_flags); kCpWhitespace is
// llama.cpp's own whitespace set (\t-\r, space, U+0085, U+00A0, U+1680,
// U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000: not U+001C-U+001F).
inline constexpr uint16_t kCpUndefined = 0x001;
inline constexpr uint16_t kCpNumber = 0x002;       // \p{N}
inline constexpr uint16_t kCpLetter = 0x004;       // \p{L}
inline constexpr uint16_t kCpSeparator = 0x008;    // \p{Z}
inline constexpr uint16_t kCpMark = 0x010;         // \p{M}
inline constexpr uint16_t kCpPunctuation = 0x020;  // \p{P}
inline constexpr uint16_t kCpSymbol = 0x040;       // \p{S}
inline constexpr uint16_t kCpControl = 0x080;      // \p{C}
inline constexpr uint16_t kCpCategoryMask = 0x0FF;
inline constexpr uint16_t kCpWhitespace = 0x100;  // \s

// Flags of `cpt`; kCpUndefined beyond U+10FFFF. Never 0.
uint16_t CodepointFlags(uint32_t cpt);

// The lowercase of `cpt` when that is ASCII (A-Z, U+0130, U+212A), else `cpt`.
// Enough for the case-insensitive contractions ('S, 'LL...) of the Llama 3
// pre-tokenizer, which only compare against ASCII letters.
uint32_t LowerIfAscii(uint32_t cpt);

inline constexpr uint32_t kReplacementChar = 0xFFFD;

// Decodes UTF-8 as llama.cpp's unicode_cpts_from_utf8 does: a byte that does
// not start a well-formed sequence (stray continuation byte, truncated
// sequence, 0xF8-0xFF) becomes U+FFFD and decoding resumes at the next byte.
// Like llama.cpp it accepts overlong forms and surrogates (they re-encode to
// other bytes). Sequences decoding above U+10FFFF, on which llama.cpp throws,
// become one U+FFFD for the four bytes. Appends to *out.
void DecodeUtf8(std::string_view text, std::vector<uint32_t>* out);

// Appends the UTF-8 encoding of `cpt` (<= U+10FFFF, surrogates included).
void AppendUtf8(uint32_t cpt, std::string* out);

// GPT-2 byte-level alphabet: byte b stands for the printable codepoint
// ByteToCodepoint(b) (b itself for '!'-'~', 0xA1-0xAC, 0xAE-0xFF; 0x100 + n
// for the n-th remaining byte).
uint32_t ByteToCodepoint(uint8_t b);
// UTF-8 text of ByteToCodepoint(b) (1 or 2 bytes).
std::string_view ByteToText(uint8_t b);
// Inverse of ByteToCodepoint; -1 for codepoints outside the alphabet.
int CodepointToByte(uint32_t cpt);

// The regex sets llama.cpp runs before BPE (llama_vocab pre-types).
enum class PreTokenizer : uint8_t {
  // DEFAULT: [\p{P}\$\+<=>\^~\|]+ runs, then GPT-2, then \p{N}+ runs, then
  // [0-9][0-9][0-9] triples, each isolated.
  kDefault,
  // GPT2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2,
  // SMOLLM, STARCODER...: every \p{N} isolated, then GPT-2.
  kDigitsThenGpt2,
  // LLAMA3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
  //  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  kLlama3,
  // QWEN2: the Llama 3 regex with \p{N} instead of \p{N}{1,3}.
  kQwen2,
};

// Splits codepoints (with their CodepointFlags) into words, as llama.cpp's
// unicode_regex_split does: *lengths receives each word's length in
// codepoints, in order, summing to cpts.size(). *scratch is working memory.
void SplitWords(PreTokenizer pre, std::span<const uint32_t> cpts, std::span<const uint16_t> flags,
                std::vector<uint32_t>* lengths, std::vector<uint32_t>* scratch);
// Convenience (tests, tools): decodes `text` as DecodeUtf8 does and returns
// the words re-encoded as UTF-8.
std::vector<std::string> SplitWords(PreTokenizer pre, std::string_view text);

}  // namespace mnemo::model::unicode
