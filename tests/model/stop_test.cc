// StopMatcher: stop strings across token boundaries, several and overlapping
// stop strings, UTF-8 holding and replacement, tokenization independence,
// and FinishReason names.
#include "model/stop.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "model/sampler.h"  // SplitMix64 for portable random splits

namespace mnemo::model {
namespace {

const std::string kFffd = "\xEF\xBF\xBD";

StopMatcher Make(std::vector<std::string> stops) {
  auto m = StopMatcher::Create(stops);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return std::move(m).value();
}

// What the client would see: the emitted text of each Feed, then Flush if no
// stop matched.
struct Streamed {
  std::vector<std::string> chunks;
  std::string text;
  bool stopped = false;
  std::string stop;
};

Streamed Stream(StopMatcher& m, const std::vector<std::string>& deltas) {
  Streamed s;
  for (const std::string& d : deltas) {
    std::string out;
    s.stopped = m.Feed(d, &out);
    s.chunks.push_back(out);
    s.text += out;
    if (s.stopped) {
      s.stop = std::string(m.matched_stop());
      return s;
    }
  }
  std::string out;
  m.Flush(&out);
  s.chunks.push_back(out);
  s.text += out;
  return s;
}

TEST(StopMatcherTest, StopAcrossTokenBoundary) {
  StopMatcher m = Make({"\nUser:"});
  std::string out;
  EXPECT_FALSE(m.Feed("Hel", &out));
  EXPECT_EQ(out, "Hel");
  out.clear();
  EXPECT_TRUE(m.Feed("lo\nUser:", &out));
  EXPECT_EQ(out, "lo");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.matched_stop(), "\nUser:");
  EXPECT_EQ(m.held_bytes(), 0u);
  // Done: Flush adds nothing.
  out.clear();
  m.Flush(&out);
  EXPECT_EQ(out, "");
}

TEST(StopMatcherTest, HoldsPossibleStartThenReleases) {
  StopMatcher m = Make({"\nUser:"});
  std::string out;
  EXPECT_FALSE(m.Feed("Hello\nUs", &out));
  EXPECT_EQ(out, "Hello");
  EXPECT_EQ(m.held_bytes(), 3u);
  out.clear();
  EXPECT_FALSE(m.Feed("ual", &out));
  EXPECT_EQ(out, "\nUsual");
  EXPECT_EQ(m.held_bytes(), 0u);
  // A held prefix at the end of generation is ordinary text.
  out.clear();
  EXPECT_FALSE(m.Feed(" \nUser", &out));
  EXPECT_EQ(out, " ");
  out.clear();
  m.Flush(&out);
  EXPECT_EQ(out, "\nUser");
  EXPECT_FALSE(m.stopped());
}

TEST(StopMatcherTest, StopSplitOverManyTokens) {
  StopMatcher m = Make({"\nUser:"});
  const Streamed s = Stream(m, {"Sure", ".", "\n", "U", "se", "r", ":", " more"});
  EXPECT_TRUE(s.stopped);
  EXPECT_EQ(s.text, "Sure.");
  EXPECT_EQ(s.chunks, (std::vector<std::string>{"Sure", ".", "", "", "", "", ""}));
}

TEST(StopMatcherTest, MultipleStopStrings) {
  StopMatcher m = Make({"</s>", "###", "\n\n"});
  Streamed s = Stream(m, {"abc##", "#def"});
  EXPECT_TRUE(s.stopped);
  EXPECT_EQ(s.text, "abc");
  EXPECT_EQ(s.stop, "###");

  m.Reset();
  s = Stream(m, {"x</", "s", "> y"});
  EXPECT_EQ(s.text, "x");
  EXPECT_EQ(s.stop, "</s>");

  m.Reset();
  s = Stream(m, {"one\n", "two</", "x\n\nthree"});
  EXPECT_EQ(s.text, "one\ntwo</x");
  EXPECT_EQ(s.stop, "\n\n");
}

TEST(StopMatcherTest, OverlappingPrefixes) {
  // A failed partial match must not hide a match that starts inside it.
  StopMatcher m = Make({"aab"});
  Streamed s = Stream(m, {"a", "a", "a", "b", "tail"});
  EXPECT_TRUE(s.stopped);
  EXPECT_EQ(s.text, "a");

  // Shared prefixes: the first stop string to end wins.
  m = Make({"User:", "User"});
  s = Stream(m, {"Hi Us", "er: x"});
  EXPECT_EQ(s.text, "Hi ");
  EXPECT_EQ(s.stop, "User");

  // One stop string inside another: "bc" ends before "abcd" does, whatever
  // the token split.
  for (const auto& deltas : std::vector<std::vector<std::string>>{{"xabcd"}, {"xab", "cd"}}) {
    m = Make({"abcd", "bc"});
    s = Stream(m, deltas);
    EXPECT_EQ(s.text, "xa");
    EXPECT_EQ(s.stop, "bc");
  }

  // Two stop strings ending on the same byte: the longer one is cut.
  m = Make({"c", "abc"});
  s = Stream(m, {"xab", "c"});
  EXPECT_EQ(s.text, "x");
  EXPECT_EQ(s.stop, "abc");

  // Self-overlapping stop string.
  m = Make({"abab"});
  s = Stream(m, {"ab", "aab", "ab!"});  // "aba" fails at the 2nd 'a', which restarts
  EXPECT_EQ(s.text, "aba");
}

TEST(StopMatcherTest, NoStopStrings) {
  StopMatcher m = Make({});
  const Streamed s = Stream(m, {"Hello", ", ", "world", "\n"});
  EXPECT_FALSE(s.stopped);
  EXPECT_EQ(s.text, "Hello, world\n");
  // ASCII goes out immediately.
  EXPECT_EQ(s.chunks, (std::vector<std::string>{"Hello", ", ", "world", "\n", ""}));
  EXPECT_EQ(m.matched_stop(), "");
}

TEST(StopMatcherTest, StopNeverSeenFlushesEverything) {
  StopMatcher m = Make({"STOP"});
  const Streamed s = Stream(m, {"no ", "stop ", "here ST", "O"});
  EXPECT_FALSE(s.stopped);
  EXPECT_EQ(s.text, "no stop here STO");
}

TEST(StopMatcherTest, EmojiSplitIntoByteTokens) {
  const std::string emoji = "\xF0\x9F\x98\x80";  // U+1F600
  StopMatcher m = Make({});
  std::string out;
  EXPECT_FALSE(m.Feed("hi ", &out));
  EXPECT_EQ(out, "hi ");
  for (int i = 0; i < 3; ++i) {
    out.clear();
    EXPECT_FALSE(m.Feed(emoji.substr(static_cast<size_t>(i), 1), &out));
    EXPECT_EQ(out, "") << "byte " << i;
    EXPECT_EQ(m.held_bytes(), static_cast<size_t>(i + 1));
  }
  out.clear();
  EXPECT_FALSE(m.Feed(emoji.substr(3, 1), &out));
  EXPECT_EQ(out, emoji);
  EXPECT_EQ(m.held_bytes(), 0u);
}

TEST(StopMatcherTest, Utf8SplitWithStopStrings) {
  // "é" (C3 A9) split, then a multibyte stop string split too.
  StopMatcher m = Make({"。"});  // E3 80 82
  const Streamed s = Stream(m, {"caf\xC3", "\xA9 ok\xE3\x80", "\x82 more"});
  EXPECT_TRUE(s.stopped);
  EXPECT_EQ(s.text, "caf\xC3\xA9 ok");
  EXPECT_EQ(s.chunks[0], "caf");
  EXPECT_EQ(s.chunks[1], "\xC3\xA9 ok");
}

TEST(StopMatcherTest, InvalidAndTruncatedUtf8BecomeReplacement) {
  StopMatcher m = Make({});
  Streamed s = Stream(m, {"a\xFF", "b"});
  EXPECT_EQ(s.text, "a" + kFffd + "b");
  // Truncated 3-byte sequence followed by ASCII: one U+FFFD for the maximal
  // subpart, then the ASCII byte.
  m.Reset();
  s = Stream(m, {"\xE2\x82", "A"});
  EXPECT_EQ(s.text, kFffd + "A");
  // Surrogates and overlongs are invalid byte by byte.
  m.Reset();
  s = Stream(m, {"\xED\xA0\x80", "\xC0\xAF"});
  EXPECT_EQ(s.text, kFffd + kFffd + kFffd + kFffd + kFffd);
  // An incomplete tail at the end of generation.
  m.Reset();
  s = Stream(m, {"ok\xF0\x9F\x98"});
  EXPECT_EQ(s.chunks[0], "ok");
  EXPECT_EQ(s.text, "ok" + kFffd);
  // An incomplete tail cut by a stop string.
  m = Make({"STOP"});
  s = Stream(m, {"x\xF0\x9F", "STOP"});
  EXPECT_TRUE(s.stopped);
  EXPECT_EQ(s.text, "x" + kFffd);
}

// The emitted text depends only on the bytes, not on how they were cut.
TEST(StopMatcherTest, IndependentOfTokenization) {
  const std::vector<std::string> stops = {"\nUser:", "<|im_end|>", "aab", "\xE2\x80\x94--"};
  const std::vector<std::string> texts = {
      "Hello \xF0\x9F\x98\x80 world\nUse\nUser: after",
      "caf\xC3\xA9 <|im_e <|im_end|> tail",
      "aaaaaab",
      "no stop at all \xE4\xB8\xAD\xE6\x96\x87 \nUse",
      "dash \xE2\x80\x94- then \xE2\x80\x94-- end",
      "bad \xFF\xE2\x82 bytes \xF0\x9F",
  };
  SplitMix64 rng(2024);
  for (const std::string& text : texts) {
    StopMatcher whole = Make(stops);
    const Streamed want = Stream(whole, {text});
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<std::string> deltas;
      size_t i = 0;
      while (i < text.size()) {
        const size_t len = 1 + rng.Next() % 5;
        deltas.push_back(text.substr(i, len));
        i += len;
      }
      StopMatcher m = Make(stops);
      const Streamed got = Stream(m, deltas);
      ASSERT_EQ(got.text, want.text) << "text: " << text << " trial " << trial;
      ASSERT_EQ(got.stopped, want.stopped);
      ASSERT_EQ(got.stop, want.stop);
    }
  }
}

TEST(StopMatcherTest, CreateRejectsBadStopStrings) {
  auto code = [](std::vector<std::string> stops) {
    return StopMatcher::Create(stops).status().code();
  };
  EXPECT_EQ(code({"ok", ""}), StatusCode::kInvalidArgument);
  EXPECT_EQ(code({"\xFF"}), StatusCode::kInvalidArgument);
  EXPECT_EQ(code({"\xF0\x9F"}), StatusCode::kInvalidArgument);  // truncated
  EXPECT_EQ(code({std::string(StopMatcher::kMaxStopStringBytes + 1, 'x')}),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code(std::vector<std::string>(StopMatcher::kMaxStopStrings + 1, "x")),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(code({std::string(StopMatcher::kMaxStopStringBytes, 'x')}), StatusCode::kOk);
  EXPECT_EQ(code(std::vector<std::string>(StopMatcher::kMaxStopStrings, "dup")), StatusCode::kOk);
}

TEST(StopMatcherTest, ResetAllowsReuse) {
  StopMatcher m = Make({"END"});
  Streamed s = Stream(m, {"aEN", "D"});
  EXPECT_EQ(s.text, "a");
  m.Reset();
  EXPECT_FALSE(m.stopped());
  s = Stream(m, {"bE", "ND!"});
  EXPECT_EQ(s.text, "b");
  EXPECT_EQ(s.stop, "END");
}

TEST(FinishReasonTest, Names) {
  EXPECT_EQ(FinishReasonName(FinishReason::kStop), "stop");
  EXPECT_EQ(FinishReasonName(FinishReason::kEos), "eos");
  EXPECT_EQ(FinishReasonName(FinishReason::kLength), "length");
  EXPECT_EQ(FinishReasonName(FinishReason::kCancelled), "cancelled");
  EXPECT_EQ(FinishReasonName(FinishReason::kError), "error");
  EXPECT_EQ(FinishReasonName(FinishReason::kContextFull), "context_full");
  EXPECT_EQ(static_cast<int>(FinishReason::kContextFull), 5);
}

}  // namespace
}  // namespace mnemo::model
