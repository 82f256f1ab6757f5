// Stop-string matching (Aho-Corasick over bytes) and UTF-8 safe emission for
// streamed generation.
#include "model/stop.h"

#include <utility>

namespace mnemo::model {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

enum class Utf8 { kValid, kInvalid, kIncomplete };

// Classifies the sequence starting at s[0], looking at s[0, n) (n >= 1).
// kValid: *len is its length. kInvalid: *len is the maximal subpart to
// replace by one U+FFFD (>= 1). kIncomplete: a valid prefix runs off s + n.
// Ranges per the Unicode Standard, table 3-7 (no overlongs, surrogates or
// code points above U+10FFFF).
Utf8 ClassifyUtf8(const unsigned char* s, size_t n, size_t* len) {
  const unsigned char b = s[0];
  if (b < 0x80) {
    *len = 1;
    return Utf8::kValid;
  }
  size_t need = 0;
  unsigned char lo = 0x80;
  unsigned char hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    need = 2;
  } else if (b == 0xE0) {
    need = 3;
    lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 3;
  } else if (b == 0xED) {
    need = 3;
    hi = 0x9F;
  } else if (b == 0xF0) {
    need = 4;
    lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 4;
  } else if (b == 0xF4) {
    need = 4;
    hi = 0x8F;
  } else {
    *len = 1;  // stray continuation, C0/C1, F5..FF
    return Utf8::kInvalid;
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= n) return Utf8::kIncomplete;
    if (s[i] < lo || s[i] > hi) {
      *len = i;
      return Utf8::kInvalid;
    }
    lo = 0x80;
    hi = 0xBF;
  }
  *len = need;
  return Utf8::kValid;
}

bool IsValidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    size_t len = 0;
    if (ClassifyUtf8(p + i, s.size() - i, &len) != Utf8::kValid) return false;
    i += len;
  }
  return true;
}

}  // namespace

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kEos: return "eos";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
    case FinishReason::kContextFull: return "context_full";
  }
  return "unknown";
}

Result<StopMatcher> StopMatcher::Create(std::span<const std::string> stop_strings) {
  if (stop_strings.size() > kMaxStopStrings) {
    return Status::InvalidArgument("at most " + std::to_string(kMaxStopStrings) +
                                   " stop strings, got " + std::to_string(stop_strings.size()));
  }
  for (size_t i = 0; i < stop_strings.size(); ++i) {
    const std::string& s = stop_strings[i];
    if (s.empty()) {
      return Status::InvalidArgument("stop string " + std::to_string(i) + " is empty");
    }
    if (s.size() > kMaxStopStringBytes) {
      return Status::InvalidArgument("stop string " + std::to_string(i) + " has " +
                                     std::to_string(s.size()) + " bytes, limit " +
                                     std::to_string(kMaxStopStringBytes));
    }
    if (!IsValidUtf8(s)) {
      return Status::InvalidArgument("stop string " + std::to_string(i) + " is not valid UTF-8");
    }
  }
  return StopMatcher(std::vector<std::string>(stop_strings.begin(), stop_strings.end()));
}

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  nodes_.emplace_back();
  for (size_t p = 0; p < stops_.size(); ++p) {
    int32_t node = 0;
    for (char ch : stops_[p]) {
      const auto b = static_cast<uint8_t>(ch);
      int32_t c = Child(node, b);
      if (c < 0) {
        c = static_cast<int32_t>(nodes_.size());
        Node child;
        child.depth = nodes_[static_cast<size_t>(node)].depth + 1;
        nodes_.push_back(std::move(child));
        nodes_[static_cast<size_t>(node)].next.emplace_back(b, c);
      }
      node = c;
    }
    Node& end = nodes_[static_cast<size_t>(node)];
    if (end.pattern < 0) end.pattern = static_cast<int32_t>(p);  // duplicates: first wins
  }
  // Breadth-first, so every fail target is finished before it is used.
  std::vector<int32_t> queue;
  queue.reserve(nodes_.size());
  queue.push_back(0);
  for (size_t qi = 0; qi < queue.size(); ++qi) {
    const int32_t u = queue[qi];
    for (size_t e = 0; e < nodes_[static_cast<size_t>(u)].next.size(); ++e) {
      const auto [b, v] = nodes_[static_cast<size_t>(u)].next[e];
      const int32_t f = u == 0 ? 0 : Step(nodes_[static_cast<size_t>(u)].fail, b);
      Node& nv = nodes_[static_cast<size_t>(v)];
      nv.fail = f;
      const Node& nf = nodes_[static_cast<size_t>(f)];
      nv.dict = nf.pattern >= 0 ? f : nf.dict;
      queue.push_back(v);
    }
  }
}

int32_t StopMatcher::Child(int32_t node, uint8_t byte) const {
  for (const auto& [b, c] : nodes_[static_cast<size_t>(node)].next) {
    if (b == byte) return c;
  }
  return -1;
}

int32_t StopMatcher::Step(int32_t node, uint8_t byte) const {
  while (true) {
    const int32_t c = Child(node, byte);
    if (c >= 0) return c;
    if (node == 0) return 0;
    node = nodes_[static_cast<size_t>(node)].fail;
  }
}

void StopMatcher::EmitValid(size_t limit, bool final, std::string* emit) {
  const size_t view = final ? limit : pending_.size();
  const auto* s = reinterpret_cast<const unsigned char*>(pending_.data());
  size_t i = 0;
  while (i < limit) {
    size_t len = 0;
    const Utf8 kind = ClassifyUtf8(s + i, view - i, &len);
    if (kind == Utf8::kIncomplete) {
      if (!final) break;  // wait for the rest of the sequence
      emit->append(kReplacement);
      i = limit;
    } else if (kind == Utf8::kInvalid) {
      emit->append(kReplacement);
      i += len;
    } else {
      if (i + len > limit) break;  // cannot happen with UTF-8 stop strings
      emit->append(pending_, i, len);
      i += len;
    }
  }
  if (final) {
    pending_.clear();
  } else {
    pending_.erase(0, i);
  }
}

bool StopMatcher::Feed(std::string_view delta, std::string* emit) {
  MNEMO_CHECK(!stopped());
  const size_t base = pending_.size();
  pending_.append(delta);
  for (size_t j = 0; j < delta.size(); ++j) {
    state_ = Step(state_, static_cast<uint8_t>(delta[j]));
    const Node& node = nodes_[static_cast<size_t>(state_)];
    // The node's own string is the longest candidate ending here.
    const int32_t hit = node.pattern >= 0 ? state_ : node.dict;
    if (hit < 0) continue;
    const size_t end = base + j + 1;
    const size_t length = static_cast<size_t>(nodes_[static_cast<size_t>(hit)].depth);
    // Held-back bytes always cover the automaton depth, so the stop string
    // lies wholly in pending_.
    MNEMO_CHECK(length <= end);
    EmitValid(end - length, /*final=*/true, emit);
    matched_ = nodes_[static_cast<size_t>(hit)].pattern;
    state_ = 0;
    return true;
  }
  const size_t hold = static_cast<size_t>(nodes_[static_cast<size_t>(state_)].depth);
  MNEMO_CHECK(hold <= pending_.size());
  EmitValid(pending_.size() - hold, /*final=*/false, emit);
  return false;
}

void StopMatcher::Flush(std::string* emit) {
  if (stopped()) return;
  EmitValid(pending_.size(), /*final=*/true, emit);
  state_ = 0;
}

void StopMatcher::Reset() {
  pending_.clear();
  state_ = 0;
  matched_ = -1;
}

std::string_view StopMatcher::matched_stop() const {
  return stopped() ? std::string_view(stops_[static_cast<size_t>(matched_)]) : std::string_view();
}

}  // namespace mnemo::model
