// llama2.c's tokenizer.bin and its conversion to a SentencePiece model, against ../shared's
// stories260K/tok512.bin and the SentencePiece model rebuilt from it, tok512.model: the
// converted model must encode every text to the same ids and pieces. A small reimplementation
// of llama2.c run.c's encoder (greedy highest-score merges) is the independent reference for
// what the pieces and scores mean.
#include "engine/llama2c_tokenizer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/tokenizer.h"
#include "tests/testing/test_support.h"

namespace nibble::engine {
namespace {

using ::nibble::testing::Pieces;
using ::nibble::testing::ReadFile;
using ::nibble::testing::SharedDir;
using ::nibble::testing::TempDir;

// ---- A protobuf wire-format reader, to compare the converter's output with tok512.model. ----

struct ProtoField {
  uint32_t number = 0;
  uint32_t wire_type = 0;
  uint64_t varint = 0;   // wire type 0
  std::string payload;   // wire types 2 (contents) and 5 (4 raw bytes)
  std::string record;    // the whole field: tag, length and payload
};

std::optional<uint64_t> ReadVarint(const std::string& b, size_t* pos) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64 && *pos < b.size(); shift += 7) {
    const uint8_t c = static_cast<uint8_t>(b[(*pos)++]);
    v |= uint64_t{c & 0x7Fu} << shift;
    if (c < 0x80) return v;
  }
  return std::nullopt;
}

// The top-level fields of a message, in file order; nullopt if it does not parse.
std::optional<std::vector<ProtoField>> ParseProto(const std::string& b) {
  std::vector<ProtoField> fields;
  size_t pos = 0;
  while (pos < b.size()) {
    const size_t start = pos;
    std::optional<uint64_t> tag = ReadVarint(b, &pos);
    if (!tag) return std::nullopt;
    ProtoField f;
    f.number = static_cast<uint32_t>(*tag >> 3);
    f.wire_type = static_cast<uint32_t>(*tag & 7);
    if (f.wire_type == 0) {
      std::optional<uint64_t> v = ReadVarint(b, &pos);
      if (!v) return std::nullopt;
      f.varint = *v;
    } else if (f.wire_type == 2) {
      std::optional<uint64_t> n = ReadVarint(b, &pos);
      if (!n || *n > b.size() - pos) return std::nullopt;
      f.payload = b.substr(pos, *n);
      pos += *n;
    } else if (f.wire_type == 5) {
      if (b.size() - pos < 4) return std::nullopt;
      f.payload = b.substr(pos, 4);
      pos += 4;
    } else {
      return std::nullopt;
    }
    f.record = b.substr(start, pos - start);
    fields.push_back(std::move(f));
  }
  return fields;
}

std::vector<ProtoField> FieldsNumbered(const std::vector<ProtoField>& fields, uint32_t number) {
  std::vector<ProtoField> out;
  for (const ProtoField& f : fields) {
    if (f.number == number) out.push_back(f);
  }
  return out;
}

// ---- llama2.c run.c's encoder, reimplemented as the reference. ----
// Dummy-prefix " " piece; each UTF-8 character's piece, or its bytes as byte pieces (id =
// byte + 3); then repeatedly merge the adjacent pair whose concatenation is a piece with the
// highest score (the leftmost on ties) until no pair is a piece.
std::vector<int32_t> RunCEncode(const Llama2cTokenizer& tok, const std::string& text) {
  std::unordered_map<std::string, int32_t> id_of;
  for (size_t i = 0; i < tok.pieces.size(); ++i) {
    id_of.emplace(tok.pieces[i].text, static_cast<int32_t>(i));
  }
  std::vector<int32_t> ids;
  if (text.empty()) return ids;
  ids.push_back(id_of.at(" "));
  for (size_t i = 0; i < text.size();) {
    size_t len = 1;
    while (len < 4 && i + len < text.size() &&
           (static_cast<uint8_t>(text[i + len]) & 0xC0) == 0x80) {
      ++len;
    }
    auto it = id_of.find(text.substr(i, len));
    if (it != id_of.end()) {
      ids.push_back(it->second);
    } else {
      for (size_t k = 0; k < len; ++k) ids.push_back(static_cast<uint8_t>(text[i + k]) + 3);
    }
    i += len;
  }
  while (true) {
    float best_score = -1e10f;
    int32_t best_id = -1;
    size_t best_at = 0;
    for (size_t j = 0; j + 1 < ids.size(); ++j) {
      auto it = id_of.find(tok.pieces[ids[j]].text + tok.pieces[ids[j + 1]].text);
      if (it != id_of.end() && tok.pieces[it->second].score > best_score) {
        best_score = tok.pieces[it->second].score;
        best_id = it->second;
        best_at = j;
      }
    }
    if (best_id < 0) break;
    ids[best_at] = best_id;
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
  }
  return ids;
}

// ---- Fixture: tok512.bin read and converted, and both SentencePiece models loaded. ----

class Llama2cTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    shared_ = SharedDir();
    ASSERT_FALSE(shared_.empty());
    bin_path_ = shared_ + "/models/stories260K/tok512.bin";
    reference_path_ = shared_ + "/models/stories260K/tok512.model";
    ASSERT_FALSE(dir_.path().empty());

    absl::StatusOr<Llama2cTokenizer> tok = ReadLlama2cTokenizer(bin_path_, 512);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = *tok;
    absl::StatusOr<std::string> model = Llama2cTokenizerToSentencePieceModel(tok_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *model;

    TokenizerLoadResult converted = LoadSentencePieceTokenizer(dir_.Write("tok512.model", model_));
    ASSERT_NE(converted.tokenizer, nullptr) << converted.error;
    converted_ = std::move(converted.tokenizer);
    TokenizerLoadResult reference = LoadSentencePieceTokenizer(reference_path_);
    ASSERT_NE(reference.tokenizer, nullptr) << reference.error;
    reference_ = std::move(reference.tokenizer);
  }

  // The converted model and tok512.model agree on `text`, ids and pieces.
  void ExpectSameEncoding(const std::string& text) {
    const std::vector<int32_t> ids = converted_->Encode(text);
    EXPECT_EQ(ids, reference_->Encode(text)) << text;
    EXPECT_EQ(Pieces(*converted_, ids), Pieces(*reference_, reference_->Encode(text))) << text;
  }

  std::string shared_;
  std::string bin_path_;
  std::string reference_path_;
  TempDir dir_{"nibble_llama2c_tokenizer_test"};
  Llama2cTokenizer tok_;
  std::string model_;
  std::unique_ptr<Tokenizer> converted_;
  std::unique_ptr<Tokenizer> reference_;
};

TEST_F(Llama2cTokenizerTest, ReadsTok512Bin) {
  EXPECT_EQ(tok_.max_token_length, 7);
  ASSERT_EQ(tok_.pieces.size(), 512u);
  EXPECT_EQ(tok_.pieces[0].text, "<unk>");
  EXPECT_EQ(tok_.pieces[1].text, "\n<s>\n");  // llama2.c's exporter's spelling
  EXPECT_EQ(tok_.pieces[2].text, "\n</s>\n");
  EXPECT_EQ(tok_.pieces[3].text, "<0x00>");
  EXPECT_EQ(tok_.pieces[13].text, "<0x0A>");
  EXPECT_EQ(tok_.pieces[258].text, "<0xFF>");
  EXPECT_EQ(tok_.pieces[259].text, " t");
  EXPECT_EQ(tok_.pieces[260].text, "he");
  EXPECT_EQ(tok_.pieces[260].score, -1.0f);
  EXPECT_EQ(tok_.pieces[511].score, -252.0f);
  size_t longest = 0;
  for (const Llama2cTokenizerPiece& p : tok_.pieces) longest = std::max(longest, p.text.size());
  EXPECT_EQ(longest, static_cast<size_t>(tok_.max_token_length));
}

TEST_F(Llama2cTokenizerTest, ConvertedModelHasTheSamePieces) {
  EXPECT_EQ(converted_->VocabSize(), 512);
  EXPECT_EQ(converted_->BosId(), 1);
  EXPECT_EQ(converted_->EosId(), 2);
  for (int32_t id = 0; id < 512; ++id) {
    EXPECT_EQ(converted_->IdToPiece(id), reference_->IdToPiece(id)) << id;
  }
  EXPECT_EQ(converted_->IdToPiece(1), "<s>");
  EXPECT_EQ(converted_->IdToPiece(259), "▁t");
  EXPECT_EQ(converted_->PieceToId("▁"), reference_->PieceToId("▁"));  // " " in tokenizer.bin
}

TEST_F(Llama2cTokenizerTest, SerializedPiecesAndNormalizerMatchTok512Model) {
  std::optional<std::vector<ProtoField>> mine = ParseProto(model_);
  std::optional<std::vector<ProtoField>> theirs = ParseProto(ReadFile(reference_path_));
  ASSERT_TRUE(mine.has_value());
  ASSERT_TRUE(theirs.has_value());
  // ModelProto.pieces (1): every record byte for byte, scores' bits included (-0.0 at 259).
  const std::vector<ProtoField> my_pieces = FieldsNumbered(*mine, 1);
  const std::vector<ProtoField> their_pieces = FieldsNumbered(*theirs, 1);
  ASSERT_EQ(my_pieces.size(), 512u);
  ASSERT_EQ(their_pieces.size(), 512u);
  for (size_t i = 0; i < 512; ++i) EXPECT_EQ(my_pieces[i].record, their_pieces[i].record) << i;
  // ModelProto.normalizer_spec (3): byte for byte.
  ASSERT_EQ(FieldsNumbered(*mine, 3).size(), 1u);
  ASSERT_EQ(FieldsNumbered(*theirs, 3).size(), 1u);
  EXPECT_EQ(FieldsNumbered(*mine, 3)[0].record, FieldsNumbered(*theirs, 3)[0].record);
  // ModelProto.trainer_spec (2): every field written has tok512.model's value (tok512.model
  // also records its training input, file prefix and character coverage).
  ASSERT_EQ(FieldsNumbered(*mine, 2).size(), 1u);
  ASSERT_EQ(FieldsNumbered(*theirs, 2).size(), 1u);
  auto my_trainer = ParseProto(FieldsNumbered(*mine, 2)[0].payload);
  auto their_trainer = ParseProto(FieldsNumbered(*theirs, 2)[0].payload);
  ASSERT_TRUE(my_trainer.has_value());
  ASSERT_TRUE(their_trainer.has_value());
  std::map<uint32_t, std::string> their_records;
  for (const ProtoField& f : *their_trainer) their_records[f.number] = f.record;
  for (const ProtoField& f : *my_trainer) {
    ASSERT_EQ(their_records.count(f.number), 1u) << "trainer_spec field " << f.number;
    EXPECT_EQ(f.record, their_records[f.number]) << "trainer_spec field " << f.number;
  }
  // Among them, the two that change encoding: model_type BPE (3) and byte_fallback (35).
  std::map<uint32_t, uint64_t> my_values;
  for (const ProtoField& f : *my_trainer) my_values[f.number] = f.varint;
  EXPECT_EQ(my_values[3], 2u);
  EXPECT_EQ(my_values[35], 1u);
  // Top-level field order: pieces, then trainer_spec, then normalizer_spec.
  EXPECT_EQ(mine->size(), 514u);
  EXPECT_EQ((*mine)[512].number, 2u);
  EXPECT_EQ((*mine)[513].number, 3u);
}

TEST_F(Llama2cTokenizerTest, EncodesTinyStoriesLikeTok512Model) {
  const std::string sample = ReadFile(shared_ + "/datasets/tinystories/sample.txt");
  ASSERT_GT(sample.size(), 3000u);
  ExpectSameEncoding(sample);
  // Line by line too: each line then starts a text (dummy prefix).
  size_t start = 0;
  int lines = 0;
  while (start < sample.size()) {
    size_t end = sample.find('\n', start);
    if (end == std::string::npos) end = sample.size();
    ExpectSameEncoding(sample.substr(start, end - start));
    start = end + 1;
    ++lines;
  }
  EXPECT_GT(lines, 5);
  // A bigger text: the first ~197 KB of TinyStories' training split.
  const std::string train = ReadFile(shared_ + "/datasets/tinystories/train-head.txt");
  ASSERT_GT(train.size(), 100000u);
  ExpectSameEncoding(train);
}

TEST_F(Llama2cTokenizerTest, EncodesOtherTextsLikeTok512Model) {
  for (const std::string text : {
           "Once upon a time",
           "",
           "x",
           "\n",
           "line one\nline two\n\nafter a blank line\n",
           "digits 0123456789, 3.14159 and 2024-06-01",
           "書生·浦語 café 🙂 naïve Ångström",
           "tabs\tand\u00a0no-break spaces",
           "  leading, trailing  and   repeated spaces  ",
           "<s> </s> <unk> <0x0A> written out",
           "\xE2\x80\x8A hair space (the last piece of tok512)",
       }) {
    ExpectSameEncoding(text);
    // Byte fallback: nothing becomes <unk>, and decoding gives the text back (with spaces
    // normalized).
    for (int32_t id : converted_->Encode(text)) EXPECT_NE(id, 0) << text;
  }
  EXPECT_EQ(converted_->Decode(converted_->Encode("書生·浦語 café 🙂")), "書生·浦語 café 🙂");
  EXPECT_EQ(converted_->Encode("Once upon a time"), (std::vector<int32_t>{403, 407, 261, 378}));
}

TEST_F(Llama2cTokenizerTest, MatchesLlama2cRunCEncoder) {
  const std::string sample = ReadFile(shared_ + "/datasets/tinystories/sample.txt");
  EXPECT_EQ(converted_->Encode(sample), RunCEncode(tok_, sample));
  for (const std::string text : {"Once upon a time", "digits 0123456789 and 3.14",
                                 "書生·浦語 café 🙂", "a\nb\n\nc"}) {
    EXPECT_EQ(converted_->Encode(text), RunCEncode(tok_, text)) << text;
  }
  // The one documented difference: SentencePiece's normalizer collapses runs of spaces and
  // drops leading and trailing ones, run.c keeps them.
  EXPECT_EQ(converted_->Encode("  a   b  "), RunCEncode(tok_, "a b"));
  EXPECT_NE(RunCEncode(tok_, "a   b"), RunCEncode(tok_, "a b"));
}

// ---- Errors. ----

std::string Int32Bytes(int32_t v) {
  std::string b(4, '\0');
  std::memcpy(b.data(), &v, 4);
  return b;
}

std::string FloatBytes(float v) {
  std::string b(4, '\0');
  std::memcpy(b.data(), &v, 4);
  return b;
}

// Byte offset of piece `index`'s record (score, length, bytes) in a tokenizer.bin.
size_t PieceOffset(const std::string& bin, int index) {
  size_t offset = 4;
  for (int i = 0; i < index; ++i) {
    int32_t len;
    std::memcpy(&len, bin.data() + offset + 4, 4);
    offset += 8 + static_cast<size_t>(len);
  }
  return offset;
}

TEST_F(Llama2cTokenizerTest, CorruptTokenizerBinErrorsNameTheFile) {
  const std::string bin = ReadFile(bin_path_);
  ASSERT_EQ(bin.size(), 6227u);
  const size_t piece5 = PieceOffset(bin, 5);

  struct Case {
    std::string name;
    std::string bytes;
    int32_t vocab_size;
    std::string expected;  // a phrase of the message
  };
  std::vector<Case> cases = {
      {"empty.bin", "", 512, "truncated"},
      {"header-only.bin", bin.substr(0, 2), 512, "truncated"},
      {"no-pieces.bin", bin.substr(0, 4), 512, "truncated"},
      {"mid-record.bin", bin.substr(0, piece5 + 6), 512, "truncated"},
      {"mid-text.bin", bin.substr(0, piece5 + 9), 512, "truncated"},
      {"half.bin", bin.substr(0, bin.size() / 2), 512, "truncated"},
      {"one-short.bin", bin.substr(0, bin.size() - 1), 512, "truncated"},
      {"trailing.bin", bin + "x", 512, "follow the last"},
      {"smaller-vocab.bin", bin, 511, "follow the last"},
      {"larger-vocab.bin", bin, 513, "truncated"},
      {"zero-max.bin", Int32Bytes(0) + bin.substr(4), 512, "max_token_length"},
      {"huge-max.bin", Int32Bytes(1 << 30) + bin.substr(4), 512, "max_token_length"},
      {"negative-length.bin",
       bin.substr(0, piece5 + 4) + Int32Bytes(-1) + bin.substr(piece5 + 8), 512, "length -1"},
      {"oversized-length.bin",
       bin.substr(0, piece5 + 4) + Int32Bytes(8) + bin.substr(piece5 + 8), 512, "length 8"},
      {"nan-score.bin", bin.substr(0, piece5) + FloatBytes(std::nanf("")) + bin.substr(piece5 + 4),
       512, "score"},
      {"text.bin", "this is a text file, not a tokenizer\n", 512, "max_token_length"},
  };
  for (const Case& c : cases) {
    const std::string path = dir_.Write(c.name, c.bytes);
    absl::StatusOr<Llama2cTokenizer> tok = ReadLlama2cTokenizer(path, c.vocab_size);
    ASSERT_FALSE(tok.ok()) << c.name;
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
    const std::string message(tok.status().message());
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_NE(message.find(c.expected), std::string::npos) << message;
  }

  const std::string missing = dir_.path() + "/missing.bin";
  absl::StatusOr<Llama2cTokenizer> tok = ReadLlama2cTokenizer(missing, 512);
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound) << tok.status();
  EXPECT_NE(tok.status().message().find(missing), absl::string_view::npos) << tok.status();

  tok = ReadLlama2cTokenizer(bin_path_, 0);
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
  EXPECT_NE(tok.status().message().find(bin_path_), absl::string_view::npos) << tok.status();
}

TEST_F(Llama2cTokenizerTest, ConversionRejectsPiecesOutsideLlama2csLayout) {
  Llama2cTokenizer too_small = tok_;
  too_small.pieces.resize(258);
  EXPECT_EQ(Llama2cTokenizerToSentencePieceModel(too_small).status().code(),
            absl::StatusCode::kInvalidArgument);

  Llama2cTokenizer misnamed_byte = tok_;
  misnamed_byte.pieces[13].text = "\n";
  absl::StatusOr<std::string> bad = Llama2cTokenizerToSentencePieceModel(misnamed_byte);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("<0x0A>"), absl::string_view::npos) << bad.status();

  Llama2cTokenizer empty_piece = tok_;
  empty_piece.pieces[300].text = "";
  bad = Llama2cTokenizerToSentencePieceModel(empty_piece);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("300"), absl::string_view::npos) << bad.status();

  Llama2cTokenizer duplicate = tok_;
  duplicate.pieces[400].text = duplicate.pieces[300].text;
  bad = Llama2cTokenizerToSentencePieceModel(duplicate);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("duplicate"), absl::string_view::npos) << bad.status();

  // The minimal llama2.c vocabulary (no merges) converts and loads.
  Llama2cTokenizer minimal = tok_;
  minimal.pieces.resize(259);
  minimal.pieces.push_back({" ", -1.0f});
  absl::StatusOr<std::string> model = Llama2cTokenizerToSentencePieceModel(minimal);
  ASSERT_TRUE(model.ok()) << model.status();
  TokenizerLoadResult loaded = LoadSentencePieceTokenizer(dir_.Write("minimal.model", *model));
  ASSERT_NE(loaded.tokenizer, nullptr) << loaded.error;
  EXPECT_EQ(loaded.tokenizer->VocabSize(), 260);
  EXPECT_EQ(loaded.tokenizer->Decode(loaded.tokenizer->Encode("hi 🙂")), "hi 🙂");
}

}  // namespace
}  // namespace nibble::engine
