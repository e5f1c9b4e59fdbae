// TextStream and CompleteUtf8Prefix with real SentencePiece models: stories260K's 512-piece
// model (which spells every non-ASCII character as byte pieces, so one character arrives over
// two to four tokens) and Llama-2's 32000-piece model. Texts are streamed one token at a time;
// what the stream shows after each token is compared with a from-scratch model of the
// contract (decode the prefix, drop an unfinished character, cut at the first stop string,
// hold back the longest tail that could still become one), and every delta is checked with
// a UTF-8 validator written here from RFC 3629.
#include "engine/text_stream.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer.h"
#include "tests/testing/test_support.h"

namespace nibble::engine {
namespace {

using ::nibble::testing::LoadSharedTokenizer;

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// ---------------------------------------------------------------------------------------
// Helpers

// Strict UTF-8 per RFC 3629 §4: no overlong forms, no surrogates, nothing above U+10FFFF,
// no truncated sequences.
bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char b0 = static_cast<unsigned char>(s[i]);
    if (b0 <= 0x7F) {
      ++i;
      continue;
    }
    int length;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      length = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      length = 3;
      if (b0 == 0xE0) lo = 0xA0;  // overlong
      if (b0 == 0xED) hi = 0x9F;  // surrogates
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      length = 4;
      if (b0 == 0xF0) lo = 0x90;  // overlong
      if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return false;
    }
    if (i + length > s.size()) return false;
    const unsigned char b1 = static_cast<unsigned char>(s[i + 1]);
    if (b1 < lo || b1 > hi) return false;
    for (int j = 2; j < length; ++j) {
      const unsigned char b = static_cast<unsigned char>(s[i + j]);
      if (b < 0x80 || b > 0xBF) return false;
    }
    i += length;
  }
  return true;
}

// Loaded once per process; null (after a recorded failure) when the files are missing.
const Tokenizer* Stories() {
  static const std::unique_ptr<Tokenizer> tokenizer =
      LoadSharedTokenizer("models/stories260K/tok512.model");
  return tokenizer.get();
}

const Tokenizer* Llama2() {
  static const std::unique_ptr<Tokenizer> tokenizer =
      LoadSharedTokenizer("models/llama2-tokenizer/tokenizer.model");
  return tokenizer.get();
}

struct NamedTokenizer {
  const char* name;
  const Tokenizer* tokenizer;
};

std::vector<NamedTokenizer> Tokenizers() {
  return {{"stories260K", Stories()}, {"llama2", Llama2()}};
}

const std::vector<std::string>& MultiByteTexts() {
  static const std::vector<std::string> texts = {
      "Hello world",
      "Café crème, naïve façade — déjà vu.",
      "日本語のテキストと中文字符，还有한국어.",
      "Emoji: 🦙🚀👍🏽 and 👨‍👩‍👧 family!",
      "Ωmega ≈ 3·10⁸ m/s; ∑ ∫ √2 ≠ π",
      "Mixed\nlines\n\twith tabs 🎉 and ünïcödé",
      "🦙 starts and ends with emoji 🚀",
      "Once upon a time, there was a little girl named Lily. She liked ü and 猫.",
  };
  return texts;
}

std::vector<int32_t> Prefix(const std::vector<int32_t>& ids, size_t n) {
  return std::vector<int32_t>(ids.begin(), ids.begin() + n);
}

// What the stream may show once `prefix_ids` have been generated, computed from scratch:
// decode, drop a trailing unfinished character (raw bytes, or the U+FFFD that SentencePiece
// prints for each byte of an unfinished sequence), cut before the first stop string, else
// hold back the longest tail that is a proper prefix of some stop string.
struct Visible {
  std::string text;
  bool stopped = false;
};

Visible ModelVisible(const Tokenizer& tokenizer, const std::vector<int32_t>& prefix_ids,
                     const std::vector<std::string>& stops) {
  std::string text = tokenizer.Decode(prefix_ids);
  while (!text.empty() && !IsValidUtf8(text)) text.pop_back();
  while (text.size() >= kReplacement.size() &&
         std::string_view(text).substr(text.size() - kReplacement.size()) == kReplacement) {
    text.resize(text.size() - kReplacement.size());
  }
  size_t first = std::string::npos;
  for (const std::string& stop : stops) {
    if (stop.empty()) continue;
    first = std::min(first, text.find(stop));
  }
  if (first != std::string::npos) return {text.substr(0, first), true};
  size_t hold = 0;
  for (const std::string& stop : stops) {
    for (size_t len = 1; len < stop.size() && len <= text.size(); ++len) {
      if (text.compare(text.size() - len, len, stop, 0, len) == 0) hold = std::max(hold, len);
    }
  }
  return {text.substr(0, text.size() - hold), false};
}

// The first occurrence of any stop string in `text`, or npos.
size_t FirstStop(const std::string& text, const std::vector<std::string>& stops) {
  size_t first = std::string::npos;
  for (const std::string& stop : stops) {
    if (!stop.empty()) first = std::min(first, text.find(stop));
  }
  return first;
}

struct StreamResult {
  std::vector<std::string> deltas;  // one per Push, then Finish's
  std::string concatenated;
  bool stopped = false;
  size_t stopped_after = 0;  // tokens pushed when stopped() first became true
};

// Streams `ids` one at a time, checking every step against ModelVisible and every delta
// for validity; keeps pushing after a stop to check that nothing more comes out.
StreamResult StreamAndCheck(const Tokenizer& tokenizer, const std::vector<int32_t>& ids,
                            const std::vector<std::string>& stops, const std::string& label) {
  StreamResult result;
  TextStream stream(tokenizer, stops);
  for (size_t i = 0; i < ids.size(); ++i) {
    const bool was_stopped = stream.stopped();
    const std::string delta = stream.Push(ids[i]);
    EXPECT_TRUE(IsValidUtf8(delta)) << label << " token " << i << " delta is not UTF-8";
    result.deltas.push_back(delta);
    result.concatenated += delta;
    EXPECT_EQ(stream.text(), result.concatenated) << label << " token " << i;
    if (was_stopped) {
      EXPECT_EQ(delta, "") << label << " token " << i << ": text after a stop";
      EXPECT_TRUE(stream.stopped());
      continue;
    }
    const Visible expected = ModelVisible(tokenizer, Prefix(ids, i + 1), stops);
    EXPECT_EQ(stream.text(), expected.text) << label << " after token " << i;
    EXPECT_EQ(stream.stopped(), expected.stopped) << label << " after token " << i;
    if (stream.stopped() && !result.stopped) {
      result.stopped = true;
      result.stopped_after = i + 1;
    }
  }
  const std::string tail = stream.Finish();
  EXPECT_TRUE(IsValidUtf8(tail)) << label << " Finish() is not UTF-8";
  if (stream.stopped()) {
    EXPECT_EQ(tail, "") << label << ": Finish() after a stop";
  }
  result.deltas.push_back(tail);
  result.concatenated += tail;
  EXPECT_EQ(stream.text(), result.concatenated) << label;
  EXPECT_EQ(stream.Finish(), "") << label << ": a second Finish() repeats text";
  return result;
}

// True when the text [begin, begin + length) of the final decode arrives over more than one
// token: some prefix of the ids has started it (its decode reaches past `begin`) without
// finishing it (its text, less any unfinished character, ends before the end). A byte piece
// decodes to U+FFFD until its character completes, so the raw decode length is not enough.
bool ArrivesOverSeveralTokens(const Tokenizer& tokenizer, const std::vector<int32_t>& ids,
                              size_t begin, size_t length) {
  for (size_t n = 1; n <= ids.size(); ++n) {
    const std::string raw = tokenizer.Decode(Prefix(ids, n));
    const std::string complete = ModelVisible(tokenizer, Prefix(ids, n), {}).text;
    if (raw.size() > begin && complete.size() < begin + length) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------
// CompleteUtf8Prefix

TEST(CompleteUtf8PrefixTest, HandMadeStrings) {
  struct Case {
    std::string text;
    size_t expected;
  };
  const std::vector<Case> cases = {
      {"", 0},
      {"abc", 3},
      {"a\xC3", 1},                     // é missing its continuation
      {"a\xC3\xA9", 3},                 // é
      {"\xE6\x97", 0},                  // 日 missing one byte
      {"x\xE6", 1},
      {"x\xE6\x97\xA5", 4},             // 日
      {"x\xF0\x9F\xA6", 1},             // 🦙 missing one byte
      {"x\xF0\x9F", 1},
      {"x\xF0", 1},
      {"x\xF0\x9F\xA6\x99", 5},         // 🦙
      {"\xF0\x9F\xA6\x99\xF0\x9F\x9A", 4},  // 🦙 then most of 🚀
      {"\xC3\xA9\xE6\x97\xA5\xC3", 5},
      {"\xEF\xBF\xBD", 3},              // U+FFFD is a complete character
      // Not ours to repair: invalid bytes pass through rather than being held forever.
      {"\x80", 1},                      // lone continuation byte
      {"\x80\x80\x80", 3},
      {"a\x80", 2},                     // ASCII followed by a stray continuation byte
      {"\xFF", 1},                      // never a lead byte
      {"a\xF8\x80\x80", 4},
      {"\xC3\xA9\x80", 3},              // complete é plus a stray continuation byte
      {"\xE6\x97\xA5\x80\x80", 5},      // too many continuation bytes
  };
  for (const Case& c : cases) {
    std::string hex;
    for (unsigned char b : c.text) hex += "0123456789abcdef"[b >> 4], hex += "0123456789abcdef"[b & 15];
    EXPECT_EQ(CompleteUtf8Prefix(c.text), c.expected) << "bytes " << hex;
  }
}

TEST(CompleteUtf8PrefixTest, EveryTruncationOfValidTextEndsOnTheLastWholeCharacter) {
  // Random strings of 1- to 4-byte characters, cut at every byte: the answer is the last
  // character boundary at or before the cut, which we know from construction.
  std::mt19937 rng(7);
  const std::vector<std::string> alphabet = {"a", "Z", " ", "\n", "é", "ß", "Ω", "日", "語",
                                             "€", "한", "🦙", "🚀", "𝄞", "\xEF\xBF\xBD"};
  std::uniform_int_distribution<size_t> pick(0, alphabet.size() - 1);
  for (int trial = 0; trial < 500; ++trial) {
    std::string text;
    std::vector<size_t> boundaries = {0};
    const int chars = 1 + trial % 12;
    for (int c = 0; c < chars; ++c) {
      text += alphabet[pick(rng)];
      boundaries.push_back(text.size());
    }
    ASSERT_TRUE(IsValidUtf8(text));
    for (size_t cut = 0; cut <= text.size(); ++cut) {
      const size_t expected = *std::prev(std::upper_bound(boundaries.begin(), boundaries.end(), cut));
      ASSERT_EQ(CompleteUtf8Prefix(std::string_view(text).substr(0, cut)), expected)
          << "text " << text << " cut " << cut;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Streaming without stop strings

TEST(TextStreamTest, TokenizersLoad) {
  for (const NamedTokenizer& t : Tokenizers()) ASSERT_NE(t.tokenizer, nullptr) << t.name;
}

TEST(TextStreamTest, MultiByteTextStreamsAsValidDeltasThatAddUpToTheDecode) {
  for (const NamedTokenizer& t : Tokenizers()) {
    ASSERT_NE(t.tokenizer, nullptr) << t.name;
    int split_characters = 0;
    for (const std::string& text : MultiByteTexts()) {
      const std::vector<int32_t> ids = t.tokenizer->Encode(text);
      ASSERT_FALSE(ids.empty());
      const std::string decoded = t.tokenizer->Decode(ids);
      EXPECT_EQ(decoded, text) << t.name;  // these texts survive a round trip
      const std::string label = std::string(t.name) + " \"" + text + "\"";
      const StreamResult result = StreamAndCheck(*t.tokenizer, ids, {}, label);
      EXPECT_EQ(result.concatenated, decoded) << label;
      EXPECT_FALSE(result.stopped);
      // Count the characters that really arrived in pieces: a prefix decode that is not
      // yet clean text. The test means nothing for a tokenizer where there are none.
      for (size_t i = 1; i < ids.size(); ++i) {
        const std::string partial = t.tokenizer->Decode(Prefix(ids, i));
        if (partial.find(kReplacement) != std::string::npos || !IsValidUtf8(partial)) {
          ++split_characters;
        }
      }
    }
    EXPECT_GT(split_characters, 10) << t.name << ": no character was split across tokens";
  }
}

TEST(TextStreamTest, EachTokenIsShownAsSoonAsItsCharactersAreComplete) {
  // No stop strings: after the token that completes a character, everything up to it shows.
  const Tokenizer* tok = Stories();
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> ids = tok->Encode("Hi 🦙 é 日本");
  TextStream stream(*tok, {});
  std::vector<std::string> shown;
  for (int32_t id : ids) {
    stream.Push(id);
    shown.push_back(stream.text());
  }
  // stories260K: ▁H i ▁ <F0> <9F> <A6> <99> ▁ é ▁ <E6> <97> <A5> <E6> <9C> <AC>.
  ASSERT_EQ(ids.size(), 16u);
  EXPECT_EQ(shown[2], "Hi ");
  EXPECT_EQ(shown[3], "Hi ");  // 1 of 4 bytes of 🦙
  EXPECT_EQ(shown[5], "Hi ");  // 3 of 4
  EXPECT_EQ(shown[6], "Hi 🦙");
  EXPECT_EQ(shown[8], "Hi 🦙 é");
  EXPECT_EQ(shown[11], "Hi 🦙 é ");
  EXPECT_EQ(shown[12], "Hi 🦙 é 日");
  EXPECT_EQ(shown[14], "Hi 🦙 é 日");
  EXPECT_EQ(shown[15], "Hi 🦙 é 日本");
  EXPECT_EQ(stream.Finish(), "");
}

TEST(TextStreamTest, GenerationEndingInsideACharacterFinishesWithTheDecode) {
  // The model stopped after 2 of the 4 bytes of 🦙: nothing is shown while the character
  // might still complete; at the end, Finish() gives what the tokenizer decodes.
  for (const NamedTokenizer& t : Tokenizers()) {
    ASSERT_NE(t.tokenizer, nullptr) << t.name;
    std::vector<int32_t> ids = t.tokenizer->Encode("ok 🦙");
    std::vector<int32_t> truncated;
    for (int32_t id : ids) {
      truncated.push_back(id);
      if (t.tokenizer->IdToPiece(id) == "<0x9F>") break;  // the second byte of 🦙
    }
    ASSERT_LT(truncated.size(), ids.size()) << t.name << ": 🦙 not spelt in bytes";
    TextStream stream(*t.tokenizer, {});
    std::string shown;
    for (int32_t id : truncated) shown += stream.Push(id);
    EXPECT_EQ(shown, "ok ") << t.name;
    const std::string tail = stream.Finish();
    EXPECT_TRUE(IsValidUtf8(tail));
    EXPECT_EQ(shown + tail, t.tokenizer->Decode(truncated)) << t.name;
  }
}

// ---------------------------------------------------------------------------------------
// Stop strings

TEST(TextStreamTest, StopStringSplitAcrossTokensEndsTheTextExactlyBeforeIt) {
  const Tokenizer* tok = Stories();
  ASSERT_NE(tok, nullptr);
  const std::string text = "Once upon a time. The end of the story.";
  const std::vector<int32_t> ids = tok->Encode(text);
  ASSERT_EQ(tok->Decode(ids), text);
  const std::string stop = "The end";
  const size_t at = text.find(stop);
  // The premise: the stop string is spread over several tokens.
  ASSERT_TRUE(ArrivesOverSeveralTokens(*tok, ids, at, stop.size()));
  const StreamResult result = StreamAndCheck(*tok, ids, {stop}, "The end");
  EXPECT_TRUE(result.stopped);
  EXPECT_EQ(result.concatenated, "Once upon a time. ");
  // It stopped on the token that completed "The end", not later.
  EXPECT_EQ(tok->Decode(Prefix(ids, result.stopped_after)).size(), at + stop.size());
  // "The", " e" were pushed but never shown.
  for (const std::string& delta : result.deltas) {
    EXPECT_EQ(delta.find("The"), std::string::npos) << delta;
  }
}

TEST(TextStreamTest, StopStringInsideOneTokenCutsThatTokensText) {
  // Llama-2 encodes "Hello" as one token: a stop string inside it shows only what precedes.
  const Tokenizer* tok = Llama2();
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> ids = tok->Encode("Hello world");
  ASSERT_EQ(ids.size(), 2u);
  ASSERT_FALSE(ArrivesOverSeveralTokens(*tok, ids, 1, 3));  // "ell" comes in one token
  for (const auto& [stop, expected] : std::vector<std::pair<std::string, std::string>>{
           {"ell", "H"}, {"Hello", ""}, {"o w", "Hell"}, {"world", "Hello "}, {"d", "Hello worl"}}) {
    const StreamResult result = StreamAndCheck(*tok, ids, {stop}, "stop \"" + stop + "\"");
    EXPECT_TRUE(result.stopped) << stop;
    EXPECT_EQ(result.concatenated, expected) << stop;
  }
}

TEST(TextStreamTest, StopStringAtTheStartShowsNothing) {
  for (const NamedTokenizer& t : Tokenizers()) {
    ASSERT_NE(t.tokenizer, nullptr) << t.name;
    const std::vector<int32_t> ids = t.tokenizer->Encode("Once upon a time");
    const StreamResult result = StreamAndCheck(*t.tokenizer, ids, {"Once"}, t.name);
    EXPECT_TRUE(result.stopped);
    EXPECT_EQ(result.concatenated, "");
    EXPECT_EQ(result.stopped_after, 1u) << t.name;
  }
}

TEST(TextStreamTest, MultiByteStopStringsCompletingOverByteTokens) {
  const Tokenizer* tok = Stories();
  ASSERT_NE(tok, nullptr);
  const std::string text = "Hi 🦙 é 日本 🚀 end";
  const std::vector<int32_t> ids = tok->Encode(text);
  ASSERT_EQ(tok->Decode(ids), text);
  for (const auto& [stop, expected] : std::vector<std::pair<std::string, std::string>>{
           {"🦙", "Hi "}, {"本", "Hi 🦙 é 日"}, {" 日", "Hi 🦙 é"}, {"é 日本 🚀", "Hi 🦙 "},
           {"🚀 e", "Hi 🦙 é 日本 "}}) {
    const size_t at = text.find(stop);
    ASSERT_TRUE(ArrivesOverSeveralTokens(*tok, ids, at, stop.size())) << stop;
    const StreamResult result = StreamAndCheck(*tok, ids, {stop}, "stop \"" + stop + "\"");
    EXPECT_TRUE(result.stopped) << stop;
    EXPECT_EQ(result.concatenated, expected) << stop;
  }
}

TEST(TextStreamTest, StopStringStartingInEarlierTokensIsNeverShown) {
  // The stop string's first part arrives several tokens before its last: that first part
  // must be held (it is not known yet whether the stop string completes) and then
  // withdrawn. Llama-2 chat style: "\nUser:" after a reply.
  const Tokenizer* tok = Llama2();
  ASSERT_NE(tok, nullptr);
  const std::string text = "Sure, here it is.\nUser: thanks";
  const std::vector<int32_t> ids = tok->Encode(text);
  ASSERT_EQ(tok->Decode(ids), text);
  const std::string stop = "\nUser:";
  ASSERT_TRUE(ArrivesOverSeveralTokens(*tok, ids, text.find(stop), stop.size()));
  const StreamResult result = StreamAndCheck(*tok, ids, {stop}, "newline User");
  EXPECT_TRUE(result.stopped);
  EXPECT_EQ(result.concatenated, "Sure, here it is.");
  for (const std::string& delta : result.deltas) {
    EXPECT_EQ(delta.find('\n'), std::string::npos) << "the held newline leaked";
  }
}

TEST(TextStreamTest, HeldTextIsPartlyReleasedWhenAnotherStopStringStartsInsideIt) {
  // "a time." is held as a possible start of "a time. X"; then "e. T", which begins inside
  // the held text, completes: the stream releases the held text up to where "e. T" starts.
  const Tokenizer* tok = Stories();
  ASSERT_NE(tok, nullptr);
  const std::string text = "Once upon a time. The end";
  const std::vector<int32_t> ids = tok->Encode(text);
  ASSERT_EQ(tok->Decode(ids), text);
  const std::vector<std::string> stops = {"a time. X", "e. T"};
  const StreamResult result = StreamAndCheck(*tok, ids, stops, "overlapping");
  EXPECT_TRUE(result.stopped);
  EXPECT_EQ(result.concatenated, "Once upon a tim");
  ASSERT_GE(result.stopped_after, 1u);
  EXPECT_EQ(result.deltas[result.stopped_after - 1], "a tim");
}

TEST(TextStreamTest, FalseStartIsReleasedAndTheRealStopStringStillStops) {
  // "a ti" could begin "a time"; "a tiny" shows it was not, and is released; the later
  // "a time" stops.
  const Tokenizer* tok = Stories();
  ASSERT_NE(tok, nullptr);
  const std::string text = "She had a tiny cat. Once upon a time there";
  const std::vector<int32_t> ids = tok->Encode(text);
  ASSERT_EQ(tok->Decode(ids), text);
  const StreamResult result = StreamAndCheck(*tok, ids, {"a time"}, "false start");
  EXPECT_TRUE(result.stopped);
  EXPECT_EQ(result.concatenated, "She had a tiny cat. Once upon ");
}

TEST(TextStreamTest, PartialStopStringIsHeldThenReleasedByFinish) {
  for (const NamedTokenizer& t : Tokenizers()) {
    ASSERT_NE(t.tokenizer, nullptr) << t.name;
    const std::string text = "Once upon a time. The";
    const std::vector<int32_t> ids = t.tokenizer->Encode(text);
    ASSERT_EQ(t.tokenizer->Decode(ids), text);
    TextStream stream(*t.tokenizer, {"The end", "Zebra"});
    std::string shown;
    for (int32_t id : ids) shown += stream.Push(id);
    EXPECT_EQ(shown, "Once upon a time. ") << t.name;
    EXPECT_FALSE(stream.stopped());
    EXPECT_EQ(stream.Finish(), "The") << t.name;
    EXPECT_EQ(stream.text(), text);
    // And through the step-by-step check.
    const StreamResult result = StreamAndCheck(*t.tokenizer, ids, {"The end", "Zebra"}, t.name);
    EXPECT_FALSE(result.stopped);
    EXPECT_EQ(result.deltas.back(), "The");
    EXPECT_EQ(result.concatenated, text);
  }
}

TEST(TextStreamTest, FirstStopStringToCompleteWinsThenTheEarliestStart) {
  // Generation stops when a stop string first appears: "time" completes before the longer
  // "upon a time. The" could, so the text ends before "time". When two complete with the
  // same token, the one that starts earlier cuts.
  for (const NamedTokenizer& t : Tokenizers()) {
    ASSERT_NE(t.tokenizer, nullptr) << t.name;
    const std::vector<int32_t> ids = t.tokenizer->Encode("Once upon a time. The end");
    const StreamResult first =
        StreamAndCheck(*t.tokenizer, ids, {"end", "time", "upon a time. The"}, t.name);
    EXPECT_TRUE(first.stopped);
    EXPECT_EQ(first.concatenated, "Once upon a ") << t.name;
    const StreamResult earliest = StreamAndCheck(*t.tokenizer, ids, {"time", "a time"}, t.name);
    EXPECT_TRUE(earliest.stopped);
    EXPECT_EQ(earliest.concatenated, "Once upon ") << t.name;
  }
}

TEST(TextStreamTest, EmptyStopStringIsIgnoredAndAbsentStopChangesNothing) {
  const Tokenizer* tok = Stories();
  ASSERT_NE(tok, nullptr);
  const std::string text = "Once upon a time 🦙.";
  const std::vector<int32_t> ids = tok->Encode(text);
  const StreamResult result = StreamAndCheck(*tok, ids, {"", "never there"}, "empty");
  EXPECT_FALSE(result.stopped);
  EXPECT_EQ(result.concatenated, text);
}

TEST(TextStreamTest, PushAfterStopReturnsNothing) {
  const Tokenizer* tok = Stories();
  ASSERT_NE(tok, nullptr);
  const std::vector<int32_t> ids = tok->Encode("Once upon a time. The end");
  TextStream stream(*tok, {"upon"});
  std::string shown;
  size_t i = 0;
  for (; i < ids.size() && !stream.stopped(); ++i) shown += stream.Push(ids[i]);
  ASSERT_TRUE(stream.stopped());
  EXPECT_EQ(shown, "Once ");
  for (; i < ids.size(); ++i) EXPECT_EQ(stream.Push(ids[i]), "");
  EXPECT_EQ(stream.Finish(), "");
  EXPECT_EQ(stream.text(), "Once ");
}

TEST(TextStreamTest, RandomStopStringsMatchTheModelAtEveryStep) {
  // Stop strings cut from the text itself at random character boundaries (so they do occur),
  // plus each with its last character changed (so only its prefixes occur): every step must
  // agree with the from-scratch model and the end must be the text before the first match.
  std::mt19937 rng(11);
  for (const NamedTokenizer& t : Tokenizers()) {
    ASSERT_NE(t.tokenizer, nullptr) << t.name;
    for (const std::string& text : MultiByteTexts()) {
      const std::vector<int32_t> ids = t.tokenizer->Encode(text);
      const std::string decoded = t.tokenizer->Decode(ids);
      std::vector<size_t> boundaries;
      for (size_t i = 0; i <= decoded.size(); ++i) {
        if (i == decoded.size() || (static_cast<unsigned char>(decoded[i]) & 0xC0) != 0x80) {
          boundaries.push_back(i);
        }
      }
      std::uniform_int_distribution<size_t> pick(0, boundaries.size() - 2);
      for (int trial = 0; trial < 12; ++trial) {
        const size_t begin = boundaries[pick(rng)];
        const size_t max_chars = 1 + trial % 6;
        auto it = std::upper_bound(boundaries.begin(), boundaries.end(), begin);
        const size_t end = boundaries[std::min<size_t>(
            static_cast<size_t>(it - boundaries.begin()) + max_chars - 1, boundaries.size() - 1)];
        const std::string stop = decoded.substr(begin, end - begin);
        std::string near_miss = stop;
        near_miss.back() = near_miss.back() == '#' ? '%' : '#';
        if (!IsValidUtf8(near_miss)) near_miss = stop.substr(0, CompleteUtf8Prefix(
                                                     stop.substr(0, stop.size() - 1))) + "#";
        for (const std::vector<std::string>& stops :
             {std::vector<std::string>{stop}, std::vector<std::string>{near_miss},
              std::vector<std::string>{near_miss, stop}}) {
          const std::string label = std::string(t.name) + " \"" + text + "\" stops \"" +
                                    stops.front() + "\"" + (stops.size() > 1 ? "+1" : "");
          const StreamResult result = StreamAndCheck(*t.tokenizer, ids, stops, label);
          const size_t first = FirstStop(decoded, stops);
          EXPECT_EQ(result.stopped, first != std::string::npos) << label;
          EXPECT_EQ(result.concatenated,
                    first == std::string::npos ? decoded : decoded.substr(0, first))
              << label;
          if (HasFailure()) return;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Long outputs (the stream decodes a few recent tokens per Push, not the whole output)

// `count` random ids of the whole vocabulary, half of them byte pieces (so characters
// complete, stay unfinished, or start with a stray continuation byte), with control pieces
// (<s>, </s>) and <unk> among them.
std::vector<int32_t> RandomIds(const Tokenizer& tokenizer, size_t count, uint32_t seed) {
  std::vector<int32_t> byte_ids;
  for (int b = 0; b < 256; ++b) {
    char piece[8];
    std::snprintf(piece, sizeof(piece), "<0x%02X>", b);
    const int32_t id = tokenizer.PieceToId(piece);
    if (id >= 0) byte_ids.push_back(id);
  }
  EXPECT_EQ(byte_ids.size(), 256u) << "the vocabulary has byte-fallback pieces";
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> any(0, tokenizer.VocabSize() - 1);
  std::uniform_int_distribution<size_t> byte(0, byte_ids.size() - 1);
  std::uniform_int_distribution<int> kind(0, 99);
  std::vector<int32_t> ids;
  for (size_t i = 0; i < count; ++i) {
    const int k = kind(rng);
    if (k < 50) {
      ids.push_back(byte_ids[byte(rng)]);
    } else if (k < 53) {
      ids.push_back(k - 50);  // <unk>, <s>, </s>
    } else {
      ids.push_back(any(rng));
    }
  }
  return ids;
}

TEST(TextStreamTest, LongRandomOutputsAddUpToTheDecodeOfAllIdsBitForBit) {
  for (const NamedTokenizer& t : Tokenizers()) {
    ASSERT_NE(t.tokenizer, nullptr) << t.name;
    ASSERT_EQ(t.tokenizer->IdToPiece(1), "<s>") << t.name;
    for (uint32_t seed = 1; seed <= 4; ++seed) {
      const std::vector<int32_t> ids = RandomIds(*t.tokenizer, 2000, seed);
      const std::string decoded = t.tokenizer->Decode(ids);
      const std::string label = std::string(t.name) + " seed " + std::to_string(seed);
      if (seed == 1) {
        // Every step against the from-scratch model of the contract.
        const StreamResult result = StreamAndCheck(*t.tokenizer, ids, {}, label);
        EXPECT_EQ(result.concatenated, decoded) << label;
      } else {
        TextStream stream(*t.tokenizer, {});
        std::string concatenated;
        for (int32_t id : ids) concatenated += stream.Push(id);
        concatenated += stream.Finish();
        EXPECT_EQ(concatenated, decoded) << label;
      }
      // A stop string that first occurs late in the output.
      const size_t at = decoded.size() * 9 / 10;
      size_t begin = at;
      while (begin < decoded.size() && (static_cast<unsigned char>(decoded[begin]) & 0xC0) == 0x80) {
        ++begin;
      }
      size_t end = std::min(decoded.size(), begin + 6);
      end = begin + CompleteUtf8Prefix(std::string_view(decoded).substr(begin, end - begin));
      ASSERT_LT(begin, end) << label;
      const std::vector<std::string> stops = {decoded.substr(begin, end - begin)};
      const size_t first = FirstStop(decoded, stops);
      TextStream stream(*t.tokenizer, stops);
      std::string concatenated;
      for (int32_t id : ids) concatenated += stream.Push(id);
      concatenated += stream.Finish();
      EXPECT_TRUE(stream.stopped()) << label;
      EXPECT_EQ(concatenated, decoded.substr(0, first)) << label;
      if (HasFailure()) return;
    }
  }
}

TEST(TextStreamTest, LongRealTextStreamsAsItsDecode) {
  // Thousands of tokens of real multilingual text, with a <s> and a </s> inside it, whose
  // pieces carry SentencePiece's leading spaces.
  std::string text;
  for (int r = 0; r < 10; ++r) {
    for (const std::string& line : MultiByteTexts()) text += line + " ";
  }
  for (const NamedTokenizer& t : Tokenizers()) {
    ASSERT_NE(t.tokenizer, nullptr) << t.name;
    std::vector<int32_t> ids = {t.tokenizer->BosId()};
    for (int32_t id : t.tokenizer->Encode(text)) ids.push_back(id);
    ids.insert(ids.begin() + static_cast<std::ptrdiff_t>(ids.size() / 2), t.tokenizer->EosId());
    ids.insert(ids.begin() + static_cast<std::ptrdiff_t>(ids.size() / 3), t.tokenizer->BosId());
    ASSERT_GT(ids.size(), 1500u) << t.name;
    const StreamResult result = StreamAndCheck(*t.tokenizer, ids, {"zzz"}, t.name);
    EXPECT_EQ(result.concatenated, t.tokenizer->Decode(ids)) << t.name;
  }
}

}  // namespace
}  // namespace nibble::engine
