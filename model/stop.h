// Stop conditions for streaming generation: why a generation ended, and the
// matcher that turns per-token text deltas into text that is safe to stream
// (never part of a stop string, never a partial UTF-8 sequence).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace mnemo::model {

// Stable values: they travel over the wire and into metrics.
enum class FinishReason : uint8_t {
  kStop = 0,         // a stop string matched
  kEos = 1,          // the model produced an end-of-generation token
  kLength = 2,       // max tokens reached
  kCancelled = 3,    // the client cancelled or went away
  kError = 4,        // generation failed; the request carries a Status
  kContextFull = 5,  // the session reached the model's context limit
};

// "stop", "eos", "length", "cancelled", "error", "context_full".
std::string_view FinishReasonName(FinishReason reason);

// Byte-level stop-string matching over a stream of text deltas, with UTF-8
// hygiene on what it lets through.
//
// Matching is on raw bytes, left to right, with an Aho-Corasick automaton:
// the first stop string to *end* in the stream wins (the longest one if
// several end on the same byte), so the result depends only on the bytes,
// not on how the tokenizer cut them into deltas. Text that could still be the
// start of a stop string is held back until it cannot.
//
// Emitted text is always valid UTF-8: an incomplete trailing sequence is held
// until its last byte arrives; bytes that cannot form a valid sequence are
// replaced by U+FFFD (one per maximal invalid subpart, as WHATWG decoders
// do); at Flush or a stop, an incomplete tail becomes U+FFFD.
//
// Thread-compatible: one per running request.
class StopMatcher {
 public:
  static constexpr size_t kMaxStopStrings = 32;
  static constexpr size_t kMaxStopStringBytes = 512;

  // InvalidArgument for an empty string, invalid UTF-8, more than
  // kMaxStopStrings strings or one longer than kMaxStopStringBytes. No stop
  // strings is fine (then only UTF-8 holding applies).
  static Result<StopMatcher> Create(std::span<const std::string> stop_strings);

  StopMatcher(StopMatcher&&) = default;
  StopMatcher& operator=(StopMatcher&&) = default;
  StopMatcher(const StopMatcher&) = delete;
  StopMatcher& operator=(const StopMatcher&) = delete;

  // Consumes the detokenized bytes of one token and appends what is now safe
  // to stream to *emit. Returns true when a stop string matched: *emit then
  // received all remaining text before the stop string, the stop string and
  // everything after it are dropped, and the matcher is done.
  // REQUIRES: !stopped().
  [[nodiscard]] bool Feed(std::string_view delta, std::string* emit);

  // End of generation (EOS, length, cancel...): appends everything held back.
  // The matcher is then empty and could take a new stream. No-op once
  // stopped.
  void Flush(std::string* emit);

  // Forgets held text and any match, keeping the stop strings.
  void Reset();

  bool stopped() const { return matched_ >= 0; }
  // The stop string that matched; empty unless stopped().
  std::string_view matched_stop() const;
  // Bytes currently held back (prefix of a stop string, or incomplete UTF-8).
  size_t held_bytes() const { return pending_.size(); }

 private:
  struct Node {
    int32_t fail = 0;      // longest proper suffix that is a trie node
    int32_t depth = 0;     // bytes from the root
    int32_t pattern = -1;  // stop string spelled by this node, if any
    int32_t dict = -1;     // nearest node on the fail chain with a pattern
    std::vector<std::pair<uint8_t, int32_t>> next;
  };

  explicit StopMatcher(std::vector<std::string> stops);
  int32_t Child(int32_t node, uint8_t byte) const;
  int32_t Step(int32_t node, uint8_t byte) const;
  // Moves pending_[0, i) to *emit as valid UTF-8 for the largest i <= limit
  // that does not split a sequence. With `final`, bytes at or past `limit`
  // are discarded and an incomplete tail is replaced, so i = limit.
  void EmitValid(size_t limit, bool final, std::string* emit);

  // --- constant after construction -------------------------------------------
  std::vector<std::string> stops_;
  std::vector<Node> nodes_;  // nodes_[0] is the root

  // --- stream state ----------------------------------------------------------
  std::string pending_;  // received, not yet emitted
  int32_t state_ = 0;    // automaton node after the last byte received
  int32_t matched_ = -1;
};

}  // namespace mnemo::model
