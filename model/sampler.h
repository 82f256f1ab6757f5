// Token sampling for the generation engine: repetition penalties, top-k,
// top-p, min-p, temperature and a seeded draw that picks the same token for
// the same seed and logits on every platform and standard library.
//
// Reproducibility is why this file avoids <random>'s distributions and libm's
// exp: the PRNG is SplitMix64 (a counter-based u64 stream, so its state is
// two integers that a session manifest can persist), uniforms are built from
// its bits, and softmax weights come from a portable double-precision exp
// made of IEEE-exact operations with FMA contraction off. Candidates are
// visited in an order fixed by the data alone (id order, or logit descending
// with ties by id), never by a library's heap or partition internals, so
// every sum runs in the same order everywhere.
//
// Cost per call, vocabulary V: greedy and top-k are one pass over the logits
// (top-k keeps a k-heap; no sort of V). Without top-k, one exp pass over V,
// plus for top-p a bucket pass that sorts only the bucket holding the cut,
// plus one more exp pass over the survivors when temperature != 1.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"

namespace mnemo::model {

// Per-request sampling settings, as a client sends them. Plain value type.
struct SamplingParams {
  // <= 0: greedy argmax over the penalized logits (ties to the lowest id);
  // llama.cpp also treats negative temperatures as greedy.
  float temperature = 0;
  int32_t top_k = 0;  // 0 = off; larger than the vocabulary = off
  float top_p = 1;    // [0, 1]; 1 = off
  float min_p = 0;    // [0, 1]; 0 = off
  // llama.cpp semantics: for every token among the last repeat_last_n recent
  // tokens, a positive logit is divided by repeat_penalty and a non-positive
  // one multiplied; then count * frequency_penalty + presence_penalty is
  // subtracted. 1 / 0 / 0 = off.
  float repeat_penalty = 1;     // > 0
  int32_t repeat_last_n = 64;   // 0 = off; -1 = every recent token passed in
  float presence_penalty = 0;   // [-2, 2]
  float frequency_penalty = 0;  // [-2, 2]
  uint64_t seed = 0;

  // InvalidArgument naming the field for NaN/inf, negative or out-of-range
  // values. A Sampler requires params that pass.
  Status Validate() const;
};

// A token and its probability in the final (post-truncation, post-
// temperature) distribution.
struct TokenProb {
  int32_t id = 0;
  double prob = 0;
};

// SplitMix64 as a counter-based stream: output n is Mix(seed + (n+1)*gamma),
// so the whole generator state is (seed, n) and any position is reachable in
// O(1). Matches the reference SplitMix64 sequence for state = seed.
// Thread-compatible value type.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed = 0, uint64_t counter = 0) : seed_(seed), counter_(counter) {}
  uint64_t Next();
  // Uniform in [0, 1) with 53 random bits.
  double NextDouble() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }
  uint64_t seed() const { return seed_; }
  uint64_t counter() const { return counter_; }

 private:
  uint64_t seed_;
  uint64_t counter_;  // outputs drawn so far
};

// exp(x) for x <= 0 from IEEE-exact operations only (no libm, no FMA
// contraction), so every platform computes the same bits. Relative error
// within a few ulp of std::exp; returns 0 below -700 and for NaN. Exposed for
// tests.
double PortableExpNonPositive(double x);

// Index of the largest value; ties and NaNs resolve to the lowest index.
// REQUIRES: !values.empty().
int32_t ArgmaxLowestId(std::span<const float> values);

// Thread-compatible: one per running request; distinct samplers may run on
// different threads at once. Sample() allocates nothing beyond the buffers
// reserved at construction (O(V) floats without top-k, O(k) with it), except
// that the penalty window (repeat_last_n = -1 or > 4096) and the top-p
// boundary bucket (> 4096 tied tokens) grow once to their high-water mark.
class Sampler {
 public:
  // The part of a sampler that evolves: the generator position. Greedy
  // sampling never advances it; every other Sample() call advances it by
  // exactly one draw, so a session can persist it and resume the same stream.
  struct State {
    uint64_t seed = 0;
    uint64_t draws = 0;
    bool operator==(const State&) const = default;
  };

  // Validates params and vocab_size (> 0).
  static Result<Sampler> Create(const SamplingParams& params, int32_t vocab_size);
  // REQUIRES: params.Validate().ok() and vocab_size > 0 (checked).
  Sampler(const SamplingParams& params, int32_t vocab_size);

  Sampler(Sampler&&) = default;
  Sampler& operator=(Sampler&&) = default;
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // Picks the next token. `logits` has vocab_size entries (checked);
  // `recent_tokens` is the sequence so far, oldest first, of which the last
  // repeat_last_n feed the penalties (ids outside the vocabulary are
  // ignored). NaN and -inf logits are never drawn; +inf counts as the
  // largest finite float. If no finite logit remains the argmax is returned.
  // Both spans are borrowed for the duration of the call.
  int32_t Sample(std::span<const float> logits, std::span<const int32_t> recent_tokens);

  // The distribution Sample() would draw from, without drawing: the surviving
  // candidates with normalized probabilities, most probable first (ties: lower
  // id first). Greedy yields the argmax with probability 1. Does not touch
  // the generator; allocates only to grow `out`, whose contents are replaced.
  void Distribution(std::span<const float> logits, std::span<const int32_t> recent_tokens,
                    std::vector<TokenProb>* out);

  State state() const { return {rng_.seed(), rng_.counter()}; }
  // Resumes a stream saved by state(). Any State is valid.
  void set_state(const State& state) { rng_ = SplitMix64(state.seed, state.draws); }

  const SamplingParams& params() const { return params_; }
  int32_t vocab_size() const { return vocab_size_; }

 private:
  struct Candidate {
    float logit;
    int32_t id;
  };
  struct Penalized {
    int32_t id;
    float logit;
  };

  bool PenaltiesActive() const;
  // Fills penalized_ (sorted by id) from the recent-token window.
  void ComputePenalties(std::span<const float> logits, std::span<const int32_t> recent_tokens);
  // Greedy pick over the penalized logits.
  int32_t PenalizedArgmax(std::span<const float> logits) const;
  // Runs penalties, top-k, top-p, min-p and temperature; leaves the surviving
  // candidates in cand_[0, n) with their temperature weights in weight_[0, n)
  // and returns n (0 when no finite logit exists). *total = sum of weights in
  // candidate order; *sorted = whether cand_ is in descending order.
  size_t Prepare(std::span<const float> logits, std::span<const int32_t> recent_tokens,
                 double* total, bool* sorted);
  void CollectTopK(std::span<const float> logits, size_t k);
  // Adds a candidate to the top-k heap; returns the logit a newcomer must
  // beat (-inf until the heap holds k).
  float PushTopK(float logit, int32_t id, size_t k);
  void CollectAll(std::span<const float> logits);
  // top-p over cand_[0, n) whose weight_ holds exp(logit - max); returns the
  // kept count. Sorted candidates are scanned; unsorted ones are bucketed by
  // logit so that only the bucket holding the cut gets sorted.
  size_t TopPSorted(size_t n, double sum);
  size_t TopPBucketed(size_t n, double sum, double max_logit);
  // weight[i] = exp((c[i].logit - max_logit) / divisor); returns their sum in
  // index order. The only place softmax weights are computed.
  static double ExpWeights(const Candidate* c, size_t n, double max_logit, double divisor,
                           double* weight);

  // --- constant after construction -------------------------------------------
  SamplingParams params_;
  int32_t vocab_size_ = 0;

  // --- evolving state --------------------------------------------------------
  SplitMix64 rng_;

  // --- scratch, reused across calls ------------------------------------------
  std::vector<Candidate> cand_;
  std::vector<double> weight_;
  std::vector<Candidate> boundary_;     // top-p: the bucket holding the cut
  std::vector<double> bucket_mass_;     // top-p: kTopPBuckets entries
  std::vector<uint32_t> bucket_count_;  // top-p: kTopPBuckets entries
  std::vector<int32_t> window_;
  std::vector<Penalized> penalized_;
};

}  // namespace mnemo::model
