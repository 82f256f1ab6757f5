// Chunked prefill beside decoding requests: how many prompt rows a model
// step may carry while others wait for their next token.
//
// A step with prompt rows may take up to step_factor times a decode-only
// step of the same decoders, and at least min_target_ms: the chunk is
// measured, not modelled, because a prompt row's cost depends on the
// machine, the batch and how deep into its context it attends. The
// reference decode-only time is re-measured (one step without prompt rows)
// whenever the number of decoders has moved by more than a quarter since it
// was taken: a burst of requests that join one after another would otherwise
// size every chunk against the one-decoder step of the first, and their
// prompts would trickle in a few tokens a step. The floor keeps a lone
// decoder (a few milliseconds a step) from holding the prompts of those
// behind it to a handful of tokens. Each time the reference is taken, the
// chunk starts again from what the target allows at the measured cost of a
// prompt row (steps that only prefill measure it), and feedback goes on
// from there: a long prompt arriving beside a decoder does not start with a
// chunk sized for another batch.
//
// Thread-compatible; the scheduler thread owns it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

namespace mnemo::daemon {

class PrefillPacer {
 public:
  struct Options {
    double initial_rows = 256;  // until the first measurement
    double max_rows = 512;      // the prefill chunk
    double min_rows = 4;        // a prompt moves every step all the same
    double step_factor = 2.0;
    double min_target_ms = 25.0;
    // Steps between two forced decode-only steps at most (a decoder count
    // that changes every step must not stall the prompts).
    int64_t min_steps_between_references = 4;
  };

  explicit PrefillPacer(const Options& o) : o_(o), rows_(o.initial_rows) {}

  // Prompt rows the next step may carry beside n_decoders decode rows (> 0);
  // 0 asks for a decode-only step that measures the reference.
  int64_t Budget(int64_t n_decoders) const {
    if (NeedsReference(n_decoders)) return 0;
    return static_cast<int64_t>(std::max(rows_, o_.min_rows));
  }

  // After a step with n_decoders decode rows and prefill_rows prompt rows,
  // given `budget` rows, that took step_ms.
  void Observe(int64_t n_decoders, int64_t prefill_rows, int64_t budget, double step_ms) {
    if (n_decoders == 0) {  // prompts alone: what a prompt row costs
      if (prefill_rows > 0) {
        const double r = step_ms / static_cast<double>(prefill_rows);
        row_ms_ = row_ms_ > 0 ? 0.8 * row_ms_ + 0.2 * r : r;
      }
      return;
    }
    ++steps_since_reference_;
    if (prefill_rows == 0) {
      if (decode_ms_ > 0 && !Moved(n_decoders)) {
        decode_ms_ = 0.8 * decode_ms_ + 0.2 * step_ms;
      } else {
        decode_ms_ = step_ms;
        ref_decoders_ = n_decoders;
        if (row_ms_ > 0) rows_ = std::clamp((Target() - decode_ms_) / row_ms_, o_.min_rows, o_.max_rows);
      }
      steps_since_reference_ = 0;
      return;
    }
    if (decode_ms_ <= 0) return;
    const double target = Target();
    if (step_ms > target) {
      rows_ = std::max(rows_ * std::max(0.5, target / step_ms), o_.min_rows);
    } else if (step_ms < 0.8 * target && prefill_rows >= budget) {
      rows_ = std::min(rows_ * 1.15 + 1, o_.max_rows);
    }
  }

  // What a step with prompt rows may take now (0: not measured yet).
  double Target() const {
    return decode_ms_ > 0 ? std::max(o_.step_factor * decode_ms_, o_.min_target_ms) : 0;
  }
  double decode_step_ms() const { return decode_ms_; }
  int64_t reference_decoders() const { return ref_decoders_; }
  double rows() const { return rows_; }
  double prompt_row_ms() const { return row_ms_; }

 private:
  bool Moved(int64_t n) const { return 4 * n > 5 * ref_decoders_ || 5 * n < 4 * ref_decoders_; }
  bool NeedsReference(int64_t n) const {
    if (decode_ms_ <= 0) return true;
    return Moved(n) && steps_since_reference_ >= o_.min_steps_between_references;
  }

  const Options o_;
  double rows_;
  double decode_ms_ = 0;  // moving average of decode-only steps
  double row_ms_ = 0;     // moving average of a prompt row in prompt-only steps
  int64_t ref_decoders_ = 0;
  int64_t steps_since_reference_ = 0;
};

// Splits a step's `budget` prompt rows among the prompts that need needs[i]
// rows, given in arrival order: the oldest gets at least a quarter of the
// budget, then the smallest remaining needs go first. A burst of short turns
// is not held behind one long prompt, and the long prompt still advances
// every step. A prompt never gets exactly one row while it needs more: one
// row computes as a decode row does, and the prompt's KV would then depend on
// how the steps happened to cut it.
inline std::vector<int64_t> SharePrefillRows(std::span<const int64_t> needs, int64_t budget) {
  std::vector<int64_t> grants(needs.size(), 0);
  if (needs.empty() || budget < 2) return grants;
  grants[0] = std::min(needs[0], std::max<int64_t>(2, budget / 4));
  budget -= grants[0];
  std::vector<size_t> order(needs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return needs[a] - grants[a] < needs[b] - grants[b]; });
  for (size_t i : order) {
    int64_t g = std::min(needs[i] - grants[i], budget);
    if (grants[i] + g == 1 && needs[i] > 1) g = 0;
    grants[i] += g;
    budget -= g;
  }
  return grants;
}

}  // namespace mnemo::daemon
