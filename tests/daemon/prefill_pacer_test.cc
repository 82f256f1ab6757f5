// PrefillPacer against a synthetic step-cost model: no clocks, the step
// times are what the model says.
#include "daemon/prefill_pacer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

namespace mnemo::daemon {
namespace {

// A compute-bound step: fixed cost, then per decode row and per prompt row.
double StepMs(int64_t decoders, int64_t prompt_rows) { return 4.0 + 3.0 * decoders + 2.0 * prompt_rows; }

// One scheduler step with `decoders` decode rows while prompts wait:
// returns the prompt rows it carried.
int64_t Step(PrefillPacer& p, int64_t decoders) {
  const int64_t budget = p.Budget(decoders);
  p.Observe(decoders, budget, budget, StepMs(decoders, budget));
  return budget;
}

TEST(PrefillPacerTest, MeasuresTheDecodersAloneFirst) {
  PrefillPacer p({.initial_rows = 256, .max_rows = 512});
  EXPECT_EQ(p.Budget(3), 0) << "no reference yet: the first step with decoders carries no prompt rows";
  p.Observe(3, 0, 0, StepMs(3, 0));
  EXPECT_DOUBLE_EQ(p.decode_step_ms(), StepMs(3, 0));
  EXPECT_EQ(p.reference_decoders(), 3);
  EXPECT_EQ(p.Budget(3), 256);
}

TEST(PrefillPacerTest, ALoneDecoderStillLetsPromptsInAtTheFloor) {
  PrefillPacer p({.initial_rows = 8, .max_rows = 512, .step_factor = 2.0, .min_target_ms = 50.0});
  for (int i = 0; i < 100; ++i) Step(p, 1);
  // 2x the 7 ms decode step is 14 ms; the floor of 50 ms lets ~20 rows in.
  EXPECT_DOUBLE_EQ(p.Target(), 50.0);
  const int64_t rows = p.Budget(1);
  EXPECT_LE(StepMs(1, rows), 50.0 * 1.15 + 2.0);
  EXPECT_GE(StepMs(1, rows), 0.5 * 50.0);
  EXPECT_GE(rows, 10);
}

// Requests that join one after another: the chunk follows the decode step
// of the batch that formed, not the lone first decoder's.
TEST(PrefillPacerTest, ABurstIsPacedAgainstTheBatchThatFormed) {
  PrefillPacer p({.initial_rows = 256, .max_rows = 512, .step_factor = 2.0, .min_target_ms = 0.0});
  int64_t references = 0;
  for (int64_t n = 1; n <= 16; ++n) {
    for (int i = 0; i < 3; ++i) references += Step(p, n) == 0;
  }
  for (int i = 0; i < 60; ++i) references += Step(p, 16) == 0;
  EXPECT_GE(p.reference_decoders(), 13) << "the reference is still that of " << p.reference_decoders()
                                        << " decoders";
  EXPECT_LE(references, 14) << "a decode-only step each time the batch grew by a quarter, no more";
  // Target: about 2 x (4 + 3 x 16) = 104 ms, so up to ~26 prompt rows beside
  // 16 decoders (the growth stops within 0.8 of the target). Against the
  // lone decoder's 7 ms the chunk would sit at min_rows.
  const int64_t rows = p.Budget(16);
  EXPECT_GE(rows, 8);
  EXPECT_LE(StepMs(16, rows), p.Target() * 1.15 + 2.0);
}

TEST(PrefillPacerTest, ADecoderCountThatKeepsChangingDoesNotStallPrompts) {
  PrefillPacer p({.initial_rows = 64, .max_rows = 512, .min_steps_between_references = 4});
  int64_t decode_only = 0;
  for (int i = 0; i < 40; ++i) decode_only += Step(p, i % 2 ? 8 : 1) == 0;
  EXPECT_LE(decode_only, 40 / 5 + 1);
  EXPECT_GE(decode_only, 2);
}

// A long prompt arrives beside a decoder: the first chunk follows the
// measured cost of a prompt row, not the initial 256 rows.
TEST(PrefillPacerTest, TheFirstChunkFollowsTheMeasuredRowCost) {
  PrefillPacer p({.initial_rows = 256, .max_rows = 512, .step_factor = 2.0, .min_target_ms = 25.0});
  p.Observe(0, 100, 512, StepMs(0, 100));  // a prompt alone: 2.04 ms a row
  EXPECT_NEAR(p.prompt_row_ms(), 2.04, 1e-9);
  EXPECT_EQ(p.Budget(1), 0);
  p.Observe(1, 0, 0, StepMs(1, 0));  // the decoder alone: 7 ms
  // Target max(14, 25) = 25 ms: (25 - 7) / 2.04 = 8 rows.
  EXPECT_EQ(p.Budget(1), 8);
  EXPECT_LE(StepMs(1, p.Budget(1)), 25.0);
}

TEST(PrefillPacerTest, StaysWithinItsBounds) {
  PrefillPacer p({.initial_rows = 256, .max_rows = 300, .min_rows = 4, .min_target_ms = 0.0});
  p.Observe(1, 0, 0, 1.0);
  for (int i = 0; i < 50; ++i) p.Observe(1, p.Budget(1), p.Budget(1), 0.5);  // always fast
  EXPECT_EQ(p.Budget(1), 300);
  for (int i = 0; i < 50; ++i) p.Observe(1, p.Budget(1), p.Budget(1), 1000.0);  // always slow
  EXPECT_EQ(p.Budget(1), 4);
}

TEST(SharePrefillRowsTest, ShortPromptsGoFirstAndTheOldestAlwaysMoves) {
  // An 8000-token prompt arrived first, then three short turns.
  const std::vector<int64_t> needs = {8000, 60, 40, 58};
  EXPECT_EQ(SharePrefillRows(needs, 256), (std::vector<int64_t>{98, 60, 40, 58}));
  // A small budget: the oldest gets its quarter, the shortest the rest.
  EXPECT_EQ(SharePrefillRows(needs, 80), (std::vector<int64_t>{20, 0, 40, 20}));
  // Everything fits: everyone gets what it needs.
  EXPECT_EQ(SharePrefillRows(std::vector<int64_t>{30, 20}, 512), (std::vector<int64_t>{30, 20}));
  // A decode-only step carries no prompt rows.
  EXPECT_EQ(SharePrefillRows(needs, 0), (std::vector<int64_t>{0, 0, 0, 0}));
  // The oldest moves even on a budget of a few rows; nobody gets a single
  // row of a longer prompt (it would compute as a decode row).
  EXPECT_EQ(SharePrefillRows(std::vector<int64_t>{500, 10}, 4), (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(SharePrefillRows(std::vector<int64_t>{500, 10}, 3), (std::vector<int64_t>{3, 0}));
  EXPECT_EQ(SharePrefillRows(std::vector<int64_t>{500, 10}, 1), (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(SharePrefillRows(std::vector<int64_t>{3, 2, 9}, 6), (std::vector<int64_t>{3, 2, 0}));
  const std::vector<int64_t> none;
  EXPECT_TRUE(SharePrefillRows(none, 100).empty());
}

}  // namespace
}  // namespace mnemo::daemon
