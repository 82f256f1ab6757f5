// Codepoint classes, llama.cpp-compatible UTF-8 decoding, the GPT-2 byte
// alphabet and llama.cpp's pre-tokenizer regexes as hand-written matchers.
#include "model/unicode.h"

#include <algorithm>
#include <array>
#include <memory>

#include "common/check.h"
#include "model/unicode_data.h"

namespace mnemo::model::unicode {
namespace {

constexpr uint32_t kMaxCodepoint = 0x10FFFF;
constexpr uint32_t kBmpSize = 0x10000;

uint16_t LookupRanges(uint32_t cpt) {
  const uint32_t* begin = unicode_data::kRanges;
  const uint32_t* end = begin + unicode_data::kRangesSize;
  // First entry whose start exceeds cpt, then step back to the run holding it.
  const uint32_t* it = std::upper_bound(begin, end, (cpt << 9) | 0x1FFu);
  MNEMO_CHECK(it != begin);
  return static_cast<uint16_t>(it[-1] & 0x1FFu);
}

// Flags of the Basic Multilingual Plane, expanded once: nearly all text lives
// there and a table load beats a binary search on the pre-tokenizer hot path.
const uint16_t* BmpTable() {
  static const std::unique_ptr<uint16_t[]> table = [] {
    auto t = std::make_unique<uint16_t[]>(kBmpSize);
    for (size_t i = 0; i < unicode_data::kRangesSize; ++i) {
      const uint32_t first = unicode_data::kRanges[i] >> 9;
      if (first >= kBmpSize) break;
      const uint32_t last = i + 1 < unicode_data::kRangesSize
                                ? std::min(unicode_data::kRanges[i + 1] >> 9, kBmpSize)
                                : kBmpSize;
      std::fill(t.get() + first, t.get() + last,
                static_cast<uint16_t>(unicode_data::kRanges[i] & 0x1FFu));
    }
    return t;
  }();
  return table.get();
}

struct ByteAlphabet {
  std::array<uint32_t, 256> cpt{};
  std::array<char[3], 256> text{};
  std::array<uint8_t, 256> text_len{};
  std::array<int16_t, 512> byte_of_cpt{};  // codepoints < 0x200 only
};

ByteAlphabet BuildByteAlphabet() {
  ByteAlphabet a;
  a.byte_of_cpt.fill(-1);
  uint32_t next_extra = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    a.cpt[b] = printable ? static_cast<uint32_t>(b) : next_extra++;
  }
  for (int b = 0; b < 256; ++b) {
    std::string s;
    AppendUtf8(a.cpt[b], &s);
    a.text_len[b] = static_cast<uint8_t>(s.size());
    std::copy(s.begin(), s.end(), a.text[b]);
    a.byte_of_cpt[a.cpt[b]] = static_cast<int16_t>(b);
  }
  return a;
}

// Pre-tokenizers. Each splits the codepoints of a text fragment, already cut
// into chunks (lengths in codepoints) by earlier stages, into finer chunks;
// nothing crosses a chunk boundary, which acts as end of text. These are
// hand-written matchers for the regexes llama.cpp runs per pre-type, written
// to reproduce its own custom matchers and its std::regex fallbacks.

constexpr uint32_t kOutOfRange = 0xFFFFFFFFu;

struct CodepointText {
  const uint32_t* cpt;
  const uint16_t* flags;
};

class ChunkWriter {
 public:
  ChunkWriter(size_t begin, std::vector<uint32_t>* out) : prev_(begin), out_(out) {}
  // Closes the chunk ending at `end`; returns its length.
  size_t EmitTo(size_t end) {
    const size_t len = end - prev_;
    if (len > 0) out_->push_back(static_cast<uint32_t>(len));
    prev_ = end;
    return len;
  }

 private:
  size_t prev_;
  std::vector<uint32_t>* out_;
};

constexpr uint16_t kLNW = kCpLetter | kCpNumber | kCpWhitespace;

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
void SplitGpt2(const CodepointText& t, const std::vector<uint32_t>& in,
               std::vector<uint32_t>* out) {
  size_t begin = 0;
  for (uint32_t chunk_len : in) {
    const size_t end = begin + chunk_len;
    auto cpt_at = [&](size_t p) { return p < end ? t.cpt[p] : kOutOfRange; };
    auto flags_at = [&](size_t p) -> uint16_t { return p < end ? t.flags[p] : 0; };
    ChunkWriter w(begin, out);
    for (size_t pos = begin; pos < end;) {
      const uint32_t c = t.cpt[pos];
      const uint16_t f = t.flags[pos];
      if (c == '\'' && pos + 1 < end) {
        const uint32_t n1 = t.cpt[pos + 1];
        if (n1 == 's' || n1 == 't' || n1 == 'm' || n1 == 'd') {
          pos += w.EmitTo(pos + 2);
          continue;
        }
        if (pos + 2 < end) {
          const uint32_t n2 = t.cpt[pos + 2];
          if ((n1 == 'r' && n2 == 'e') || (n1 == 'v' && n2 == 'e') || (n1 == 'l' && n2 == 'l')) {
            pos += w.EmitTo(pos + 3);
            continue;
          }
        }
      }
      // An optional leading space joins the run that follows it.
      uint16_t f2 = c == ' ' ? flags_at(pos + 1) : f;
      if (f2 & kCpLetter) {
        pos += c == ' ';
        while (f2 & kCpLetter) f2 = flags_at(++pos);
        w.EmitTo(pos);
        continue;
      }
      if (f2 & kCpNumber) {
        pos += c == ' ';
        while (f2 & kCpNumber) f2 = flags_at(++pos);
        w.EmitTo(pos);
        continue;
      }
      if (!(f2 & kLNW) && f2 != 0) {
        pos += c == ' ';
        while (!(f2 & kLNW) && f2 != 0) f2 = flags_at(++pos);
        w.EmitTo(pos);
        continue;
      }
      size_t n_ws = 0;
      while (flags_at(pos + n_ws) & kCpWhitespace) ++n_ws;
      if (n_ws > 1 && cpt_at(pos + n_ws) != kOutOfRange) {  // \s+(?!\S): leave one
        pos += n_ws - 1;
        w.EmitTo(pos);
        continue;
      }
      if (n_ws > 0) {
        pos += n_ws;
        w.EmitTo(pos);
        continue;
      }
      w.EmitTo(++pos);
    }
    begin = end;
  }
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}|
//  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// max_digits 3 is Llama 3, 1 is Qwen2.
void SplitLlama3(const CodepointText& t, const std::vector<uint32_t>& in, size_t max_digits,
                 std::vector<uint32_t>* out) {
  size_t begin = 0;
  for (uint32_t chunk_len : in) {
    const size_t end = begin + chunk_len;
    auto cpt_at = [&](size_t p) { return p < end ? t.cpt[p] : kOutOfRange; };
    auto flags_at = [&](size_t p) -> uint16_t { return p < end ? t.flags[p] : 0; };
    ChunkWriter w(begin, out);
    for (size_t pos = begin; pos < end;) {
      const uint32_t c = t.cpt[pos];
      const uint16_t f = t.flags[pos];
      if (c == '\'' && pos + 1 < end) {
        const uint32_t n1 = LowerIfAscii(t.cpt[pos + 1]);
        if (n1 == 's' || n1 == 't' || n1 == 'm' || n1 == 'd') {
          pos += w.EmitTo(pos + 2);
          continue;
        }
        if (pos + 2 < end) {
          const uint32_t n2 = LowerIfAscii(t.cpt[pos + 2]);
          if ((n1 == 'r' && n2 == 'e') || (n1 == 'v' && n2 == 'e') || (n1 == 'l' && n2 == 'l')) {
            pos += w.EmitTo(pos + 3);
            continue;
          }
        }
      }
      if (!(c == '\r' || c == '\n' || (f & kCpNumber))) {
        if ((f & kCpLetter) || (flags_at(pos + 1) & kCpLetter)) {
          ++pos;
          while (flags_at(pos) & kCpLetter) ++pos;
          w.EmitTo(pos);
          continue;
        }
      }
      if (f & kCpNumber) {
        size_t group_begin = pos;
        while (flags_at(pos) & kCpNumber) {
          if (++pos - group_begin >= max_digits) {
            w.EmitTo(pos);
            group_begin = pos;
          }
        }
        w.EmitTo(pos);
        continue;
      }
      uint16_t f2 = c == ' ' ? flags_at(pos + 1) : f;
      // llama.cpp tests the current codepoint's flags here (not f2), so a
      // space ending the chunk is taken by this branch; same chunk either way.
      if (!(f2 & kLNW) && f != 0) {
        pos += c == ' ';
        while (!(f2 & kLNW) && f2 != 0) f2 = flags_at(++pos);
        uint32_t c2 = cpt_at(pos);
        while (c2 == '\r' || c2 == '\n') c2 = cpt_at(++pos);
        w.EmitTo(pos);
        continue;
      }
      size_t n_ws = 0;
      size_t last_newline_end = 0;
      while (flags_at(pos + n_ws) & kCpWhitespace) {
        const uint32_t c2 = cpt_at(pos + n_ws);
        if (c2 == '\r' || c2 == '\n') last_newline_end = pos + n_ws + 1;
        ++n_ws;
      }
      if (last_newline_end > 0) {  // \s*[\r\n]+
        pos = last_newline_end;
        w.EmitTo(pos);
        continue;
      }
      if (n_ws > 1 && cpt_at(pos + n_ws) != kOutOfRange) {
        pos += n_ws - 1;
        w.EmitTo(pos);
        continue;
      }
      if (n_ws > 0) {
        pos += n_ws;
        w.EmitTo(pos);
        continue;
      }
      w.EmitTo(++pos);
    }
    begin = end;
  }
}

// The regexes llama.cpp runs through std::regex see a "collapsed" text where
// every codepoint >= 128 is one byte naming its category (whitespace first);
// these predicates say what \p{N} and [\p{P}\$\+<=>\^~\|] match there.
bool CollapsedIsNumber(uint32_t cpt, uint16_t flags) {
  if (cpt < 128) return cpt >= '0' && cpt <= '9';
  return !(flags & kCpWhitespace) && (flags & kCpCategoryMask) == kCpNumber;
}

bool CollapsedIsDefaultPunct(uint32_t cpt, uint16_t flags) {
  if (cpt < 128) {
    // The ASCII part llama.cpp substitutes for \p{P}, plus $ + < = > ^ ~ |.
    static constexpr std::string_view kAscii = "!\"#%&'()*,-./:;?@[\\]_{}$+<=>^~|";
    return kAscii.find(static_cast<char>(cpt)) != std::string_view::npos;
  }
  return !(flags & kCpWhitespace) && (flags & kCpCategoryMask) == kCpPunctuation;
}

// Isolates each match of `pred` (runs when `runs`, else single codepoints).
template <typename Pred>
void IsolateMatches(const CodepointText& t, const std::vector<uint32_t>& in, bool runs, Pred pred,
                    std::vector<uint32_t>* out) {
  size_t begin = 0;
  for (uint32_t chunk_len : in) {
    const size_t end = begin + chunk_len;
    ChunkWriter w(begin, out);
    for (size_t pos = begin; pos < end;) {
      if (!pred(t.cpt[pos], t.flags[pos])) {
        ++pos;
        continue;
      }
      w.EmitTo(pos);
      ++pos;
      if (runs) {
        while (pos < end && pred(t.cpt[pos], t.flags[pos])) ++pos;
      }
      w.EmitTo(pos);
    }
    w.EmitTo(end);
    begin = end;
  }
}

// [0-9][0-9][0-9]: leftmost non-overlapping triples of ASCII digits.
void IsolateDigitTriples(const CodepointText& t, const std::vector<uint32_t>& in,
                         std::vector<uint32_t>* out) {
  size_t begin = 0;
  for (uint32_t chunk_len : in) {
    const size_t end = begin + chunk_len;
    ChunkWriter w(begin, out);
    int run = 0;
    for (size_t pos = begin; pos < end; ++pos) {
      const uint32_t c = t.cpt[pos];
      run = (c >= '0' && c <= '9') ? run + 1 : 0;
      if (run == 3) {
        w.EmitTo(pos - 2);
        w.EmitTo(pos + 1);
        run = 0;
      }
    }
    w.EmitTo(end);
    begin = end;
  }
}

const ByteAlphabet& Alphabet() {
  static const ByteAlphabet alphabet = BuildByteAlphabet();
  return alphabet;
}

}  // namespace

uint16_t CodepointFlags(uint32_t cpt) {
  if (cpt < kBmpSize) return BmpTable()[cpt];
  if (cpt > kMaxCodepoint) return kCpUndefined;
  return LookupRanges(cpt);
}

uint32_t LowerIfAscii(uint32_t cpt) {
  if (cpt >= 'A' && cpt <= 'Z') return cpt + ('a' - 'A');
  for (size_t i = 0; i < unicode_data::kLowerToAsciiSize; ++i) {
    if (unicode_data::kLowerToAscii[i][0] == cpt) return unicode_data::kLowerToAscii[i][1];
  }
  return cpt;
}

void DecodeUtf8(std::string_view text, std::vector<uint32_t>* out) {
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  out->reserve(out->size() + n);
  size_t i = 0;
  auto cont = [&](size_t k) { return i + k < n && (s[i + k] & 0xC0) == 0x80; };
  while (i < n) {
    const uint8_t b = s[i];
    if (b < 0x80) {
      out->push_back(b);
      i += 1;
    } else if (b < 0xC0) {  // stray continuation byte
      out->push_back(kReplacementChar);
      i += 1;
    } else if (b < 0xE0) {
      if (cont(1)) {
        out->push_back(((b & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu));
        i += 2;
      } else {
        out->push_back(kReplacementChar);
        i += 1;
      }
    } else if (b < 0xF0) {
      if (cont(1) && cont(2)) {
        out->push_back(((b & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu));
        i += 3;
      } else {
        out->push_back(kReplacementChar);
        i += 1;
      }
    } else if (b < 0xF8) {
      if (cont(1) && cont(2) && cont(3)) {
        const uint32_t cpt = ((b & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) |
                             ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu);
        out->push_back(cpt <= kMaxCodepoint ? cpt : kReplacementChar);
        i += 4;
      } else {
        out->push_back(kReplacementChar);
        i += 1;
      }
    } else {
      out->push_back(kReplacementChar);
      i += 1;
    }
  }
}

void AppendUtf8(uint32_t cpt, std::string* out) {
  MNEMO_CHECK(cpt <= kMaxCodepoint);
  if (cpt < 0x80) {
    out->push_back(static_cast<char>(cpt));
  } else if (cpt < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cpt >> 6)));
    out->push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else if (cpt < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cpt >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cpt >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cpt >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cpt >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cpt >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  }
}

uint32_t ByteToCodepoint(uint8_t b) { return Alphabet().cpt[b]; }

std::string_view ByteToText(uint8_t b) {
  const ByteAlphabet& a = Alphabet();
  return std::string_view(a.text[b], a.text_len[b]);
}

int CodepointToByte(uint32_t cpt) { return cpt < 512 ? Alphabet().byte_of_cpt[cpt] : -1; }

void SplitWords(PreTokenizer pre, std::span<const uint32_t> cpts, std::span<const uint16_t> flags,
                std::vector<uint32_t>* lengths, std::vector<uint32_t>* scratch) {
  MNEMO_CHECK(cpts.size() == flags.size());
  const CodepointText t{cpts.data(), flags.data()};
  std::vector<uint32_t>* a = lengths;
  std::vector<uint32_t>* b = scratch;
  a->assign(1, static_cast<uint32_t>(cpts.size()));
  if (cpts.empty()) {
    a->clear();
    return;
  }
  // Each stage refines the chunks of the previous one; the result must end
  // in *lengths, so stages alternate between the two buffers.
  auto stage = [&](auto&& fn) {
    b->clear();
    fn(*a, b);
    std::swap(a, b);
  };
  switch (pre) {
    case PreTokenizer::kGpt2:
      stage([&](auto& in, auto* out) { SplitGpt2(t, in, out); });
      break;
    case PreTokenizer::kDigitsThenGpt2:
      stage([&](auto& in, auto* out) { IsolateMatches(t, in, false, CollapsedIsNumber, out); });
      stage([&](auto& in, auto* out) { SplitGpt2(t, in, out); });
      break;
    case PreTokenizer::kLlama3:
      stage([&](auto& in, auto* out) { SplitLlama3(t, in, 3, out); });
      break;
    case PreTokenizer::kQwen2:
      stage([&](auto& in, auto* out) { SplitLlama3(t, in, 1, out); });
      break;
    case PreTokenizer::kDefault:
      stage(
          [&](auto& in, auto* out) { IsolateMatches(t, in, true, CollapsedIsDefaultPunct, out); });
      stage([&](auto& in, auto* out) { SplitGpt2(t, in, out); });
      stage([&](auto& in, auto* out) { IsolateMatches(t, in, true, CollapsedIsNumber, out); });
      stage([&](auto& in, auto* out) { IsolateDigitTriples(t, in, out); });
      break;
  }
  if (a != lengths) lengths->swap(*a);
}

std::vector<std::string> SplitWords(PreTokenizer pre, std::string_view text) {
  std::vector<uint32_t> cpts;
  DecodeUtf8(text, &cpts);
  std::vector<uint16_t> flags(cpts.size());
  for (size_t i = 0; i < cpts.size(); ++i) flags[i] = CodepointFlags(cpts[i]);
  std::vector<uint32_t> lengths, scratch;
  SplitWords(pre, cpts, flags, &lengths, &scratch);
  std::vector<std::string> words;
  size_t begin = 0;
  for (uint32_t len : lengths) {
    std::string w;
    for (size_t i = begin; i < begin + len; ++i) AppendUtf8(cpts[i], &w);
    words.push_back(std::move(w));
    begin += len;
  }
  return words;
}

}  // namespace mnemo::model::unicode
