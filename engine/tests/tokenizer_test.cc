// The SentencePiece tokenizer against the two real models in ../shared: stories260K's 512-piece
// BPE model and Meta's 32000-piece Llama-2 model. Known ids come from the models' published
// vocabularies (Llama-2: "<0x0A>" = 13, "▁the" = 278, "Hello world" = 15043 3186).
#include "engine/tokenizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "tests/testing/test_support.h"

namespace nibble::engine {
namespace {

using ::nibble::testing::LoadSharedTokenizer;
using ::nibble::testing::Pieces;
using ::nibble::testing::ReadFile;
using ::nibble::testing::SharedDir;
using ::nibble::testing::TempDir;

std::unique_ptr<Tokenizer> Stories() {
  return LoadSharedTokenizer("models/stories260K/tok512.model");
}
std::unique_ptr<Tokenizer> Llama2() {
  return LoadSharedTokenizer("models/llama2-tokenizer/tokenizer.model");
}

const std::vector<std::string>& SampleTexts() {
  static const std::vector<std::string> texts = {
      "Once upon a time, there was a little girl named Lily.",
      "Hello world",
      "書生·浦語 café 🙂",
      "line one\nline two\n\n  indented\ttab",
      "digits 0123456789 and 3.14159",
      "emoji 🙂🙃 and accents: naïve façade Ångström",
      "x",
  };
  return texts;
}

// Runs of ' ' become one ' ' (the texts here have no leading or trailing spaces).
std::string CollapseSpaces(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == ' ' && !out.empty() && out.back() == ' ') continue;
    out.push_back(c);
  }
  return out;
}

TEST(SentencePieceTokenizerTest, Stories260KFacts) {
  auto tok = Stories();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->VocabSize(), 512);
  EXPECT_EQ(tok->BosId(), 1);
  EXPECT_EQ(tok->EosId(), 2);
  EXPECT_EQ(tok->IdToPiece(0), "<unk>");
  EXPECT_EQ(tok->IdToPiece(1), "<s>");
  EXPECT_EQ(tok->IdToPiece(2), "</s>");
  EXPECT_EQ(tok->IdToPiece(3), "<0x00>");
  EXPECT_EQ(tok->IdToPiece(258), "<0xFF>");
  EXPECT_EQ(tok->PieceToId("<0x0A>"), 13);
  EXPECT_EQ(tok->PieceToId("<unk>"), 0);
  EXPECT_EQ(tok->PieceToId("no such piece"), -1);
  EXPECT_EQ(tok->IdToPiece(512), "");
  EXPECT_EQ(tok->IdToPiece(-1), "");
  // "Once upon a time": the prompt of llama2.c's stories260K examples.
  EXPECT_EQ(tok->Encode("Once upon a time"), (std::vector<int32_t>{403, 407, 261, 378}));
  EXPECT_EQ(Pieces(*tok, tok->Encode("Once upon a time")),
            (std::vector<std::string>{"▁Once", "▁upon", "▁a", "▁time"}));
}

TEST(SentencePieceTokenizerTest, Llama2Facts) {
  auto tok = Llama2();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->VocabSize(), 32000);
  EXPECT_EQ(tok->BosId(), 1);
  EXPECT_EQ(tok->EosId(), 2);
  EXPECT_EQ(tok->PieceToId("<0x0A>"), 13);
  EXPECT_EQ(tok->PieceToId("▁the"), 278);
  EXPECT_EQ(tok->IdToPiece(278), "▁the");
  EXPECT_EQ(tok->PieceToId("<s>"), 1);
  EXPECT_EQ(tok->PieceToId("</s>"), 2);
  EXPECT_EQ(tok->PieceToId("<unk>"), 0);
  EXPECT_EQ(tok->PieceToId("<|im_end|>"), -1);
  EXPECT_EQ(tok->Encode("Hello world"), (std::vector<int32_t>{15043, 3186}));
  EXPECT_EQ(tok->Encode(""), std::vector<int32_t>{});
  // A newline has no piece of its own: byte fallback gives <0x0A>.
  const std::vector<int32_t> ids = tok->Encode("a\nb");
  EXPECT_NE(std::find(ids.begin(), ids.end(), 13), ids.end());
}

TEST(SentencePieceTokenizerTest, RoundTripsTextThroughByteFallback) {
  for (auto* load : {&Stories, &Llama2}) {
    auto tok = load();
    ASSERT_NE(tok, nullptr);
    SCOPED_TRACE("vocabulary of " + std::to_string(tok->VocabSize()));
    for (const std::string& text : SampleTexts()) {
      const std::vector<int32_t> ids = tok->Encode(text);
      ASSERT_FALSE(ids.empty()) << text;
      for (int32_t id : ids) {
        EXPECT_GE(id, 0);
        EXPECT_LT(id, tok->VocabSize());
        EXPECT_NE(id, 0) << "byte fallback should leave no <unk> in " << text;
      }
      // Llama-2 keeps runs of spaces; stories260K's normalizer (remove_extra_whitespaces)
      // collapses them.
      const std::string expected = tok->VocabSize() == 512 ? CollapseSpaces(text) : text;
      EXPECT_EQ(tok->Decode(ids), expected);
    }
  }
}

TEST(SentencePieceTokenizerTest, NonAsciiUsesBytePieces) {
  auto tok = Stories();
  ASSERT_NE(tok, nullptr);
  // 🙂 is U+1F642, F0 9F 99 82 in UTF-8; the 512-piece vocabulary has no piece for it.
  const std::vector<std::string> pieces = Pieces(*tok, tok->Encode("🙂"));
  EXPECT_EQ(pieces, (std::vector<std::string>{"▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"}));
  auto llama = Llama2();
  ASSERT_NE(llama, nullptr);
  const std::vector<std::string> llama_pieces = Pieces(*llama, llama->Encode("書生·浦語 café 🙂"));
  // Llama-2 knows 書 and 生 but spells 浦 (E6 B5 A6) and the emoji in bytes.
  EXPECT_EQ(llama_pieces,
            (std::vector<std::string>{"▁", "書", "生", "·", "<0xE6>", "<0xB5>", "<0xA6>", "語",
                                      "▁c", "afé", "▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"}));
}

TEST(SentencePieceTokenizerTest, DecodesPieces) {
  auto tok = Llama2();
  ASSERT_NE(tok, nullptr);
  const int32_t the = tok->PieceToId("▁the");
  const int32_t newline = tok->PieceToId("<0x0A>");
  // The leading space of the first piece is dropped; later ones are kept.
  EXPECT_EQ(tok->Decode({the}), "the");
  EXPECT_EQ(tok->Decode({the, the}), "the the");
  EXPECT_EQ(tok->Decode({the, newline, the}), "the\n the");
  // Byte pieces join into UTF-8.
  std::vector<int32_t> smile;
  for (const char* p : {"<0xF0>", "<0x9F>", "<0x99>", "<0x82>"}) smile.push_back(tok->PieceToId(p));
  EXPECT_EQ(tok->Decode(smile), "🙂");
  // Control pieces print as nothing; ids out of range are skipped.
  EXPECT_EQ(tok->Decode({1, the, 2}), "the");
  EXPECT_EQ(tok->Decode({the, -5, 32000, 1 << 30}), "the");
  EXPECT_EQ(tok->Decode({}), "");
}

TEST(SentencePieceTokenizerTest, ControlPiecesInTextEncodeToTheirIds) {
  auto tok = Llama2();
  ASSERT_NE(tok, nullptr);
  // As Meta's reference chat code encodes a dialog: each turn separately, so the text after
  // </s><s> starts again with the dummy-prefix space ("▁[").
  const std::vector<int32_t> turn1 = tok->Encode("[INST] Hi [/INST] Hello!");
  const std::vector<int32_t> turn2 = tok->Encode("[INST] How? [/INST] ");
  std::vector<int32_t> expected = turn1;
  expected.push_back(2);
  expected.push_back(1);
  expected.insert(expected.end(), turn2.begin(), turn2.end());
  EXPECT_EQ(tok->Encode("[INST] Hi [/INST] Hello!</s><s>[INST] How? [/INST] "), expected);
  EXPECT_EQ(tok->IdToPiece(turn2[0]), "▁[");

  EXPECT_EQ(tok->Encode("<s>"), (std::vector<int32_t>{1}));
  EXPECT_EQ(tok->Encode("</s></s>"), (std::vector<int32_t>{2, 2}));
  // A near miss is ordinary text.
  const std::vector<int32_t> near_miss = tok->Encode("<s >");
  EXPECT_EQ(std::find(near_miss.begin(), near_miss.end(), 1), near_miss.end());
  // "<unk>" is not special: Penn Treebank spells unknown words that way.
  const std::vector<int32_t> unk = tok->Encode("a <unk> b");
  EXPECT_EQ(std::find(unk.begin(), unk.end(), 0), unk.end());
  // Byte pieces written out are text too.
  const std::vector<int32_t> byte = tok->Encode("<0x0A>");
  EXPECT_EQ(std::find(byte.begin(), byte.end(), 13), byte.end());
}

TEST(SentencePieceTokenizerTest, AddedTokensAreMatchedInText) {
  const std::string shared = SharedDir();
  ASSERT_FALSE(shared.empty());
  const std::string path = shared + "/models/llama2-tokenizer/tokenizer.model";
  // Stand-ins for InternLM2's tokenizer_config.json entries: the last two ids of Llama-2.
  TokenizerLoadResult loaded =
      LoadSentencePieceTokenizer(path, {{"<|im_end|>", 31999}, {"<|im_start|>", 31998}});
  ASSERT_NE(loaded.tokenizer, nullptr) << loaded.error;
  const Tokenizer& tok = *loaded.tokenizer;
  EXPECT_EQ(tok.PieceToId("<|im_end|>"), 31999);
  EXPECT_EQ(tok.IdToPiece(31998), "<|im_start|>");
  const std::vector<int32_t> user = tok.Encode("user\nHi");
  std::vector<int32_t> expected = {31998};
  expected.insert(expected.end(), user.begin(), user.end());
  expected.push_back(31999);
  EXPECT_EQ(tok.Encode("<|im_start|>user\nHi<|im_end|>"), expected);
  // Special tokens print as nothing.
  EXPECT_EQ(tok.Decode(expected), "user\nHi");
  // Control pieces still work alongside.
  EXPECT_EQ(tok.Encode("</s><|im_end|>"), (std::vector<int32_t>{2, 31999}));
}

TEST(SentencePieceTokenizerTest, RejectsBadAddedTokens) {
  const std::string shared = SharedDir();
  ASSERT_FALSE(shared.empty());
  const std::string path = shared + "/models/llama2-tokenizer/tokenizer.model";
  for (const std::vector<AddedToken>& bad : std::vector<std::vector<AddedToken>>{
           {{"<|im_end|>", 32000}}, {{"<|im_end|>", -1}}, {{"", 5}},
           {{"<|a|>", 31999}, {"<|a|>", 31998}}}) {
    TokenizerLoadResult loaded = LoadSentencePieceTokenizer(path, bad);
    EXPECT_EQ(loaded.tokenizer, nullptr);
    EXPECT_NE(loaded.error.find(path), std::string::npos) << loaded.error;
  }
}

TEST(SentencePieceTokenizerTest, ErrorsNameTheFile) {
  TempDir dir("nibble_tokenizer_test");
  ASSERT_FALSE(dir.path().empty());
  const std::string missing = dir.path() + "/no-such-tokenizer.model";
  TokenizerLoadResult result = LoadSentencePieceTokenizer(missing);
  EXPECT_EQ(result.tokenizer, nullptr);
  EXPECT_NE(result.error.find(missing), std::string::npos) << result.error;
  EXPECT_NE(result.error.find("No such file"), std::string::npos) << result.error;

  const std::string shared = SharedDir();
  ASSERT_FALSE(shared.empty());
  const std::string real = ReadFile(shared + "/models/stories260K/tok512.model");
  ASSERT_GT(real.size(), 1000u);
  const std::vector<std::pair<std::string, std::string>> garbage = {
      {"empty.model", ""},
      {"text.model", "this is not a SentencePiece model\n"},
      {"binary.model", std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x02", 12)},
      {"truncated.model", real.substr(0, real.size() / 2)},
      {"tokenizer.bin", ReadFile(shared + "/models/stories260K/tok512.bin")},
  };
  for (const auto& [name, bytes] : garbage) {
    const std::string path = dir.Write(name, bytes);
    TokenizerLoadResult bad = LoadSentencePieceTokenizer(path);
    EXPECT_EQ(bad.tokenizer, nullptr) << name;
    EXPECT_NE(bad.error.find(path), std::string::npos) << name << ": " << bad.error;
  }
  // A directory is not a model either.
  TokenizerLoadResult directory = LoadSentencePieceTokenizer(dir.path());
  EXPECT_EQ(directory.tokenizer, nullptr);
  EXPECT_NE(directory.error.find(dir.path()), std::string::npos) << directory.error;
}

}  // namespace
}  // namespace nibble::engine
