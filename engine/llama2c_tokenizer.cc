#include "engine/llama2c_tokenizer.h"

#include <cmath>
#include <cstring>
#include <string_view>
#include <unordered_set>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/atomic_file.h"
#include "engine/status_macros.h"

namespace nibble::engine {
namespace {

// Far above any real tokenizer (Llama 2's longest piece is 16 bytes, llama2.c's exporter
// writes the longest piece's length); a larger value means the header is garbage.
constexpr int32_t kMaxPlausibleTokenLength = 1 << 16;

// llama2.c's fixed layout: <unk>, <s>, </s>, then one piece per byte value.
constexpr int32_t kFirstBytePiece = 3;
constexpr int32_t kFirstMergedPiece = kFirstBytePiece + 256;

absl::Status FileError(const std::string& path, std::string_view message) {
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": ", absl::string_view(message.data(), message.size())));
}

// Little-endian reads from a byte buffer (llama2.c writes the host's order; every machine it
// runs on is little-endian).
int32_t LoadInt32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return static_cast<int32_t>(v);
}

float LoadFloat32(const char* p) {
  const uint32_t bits = static_cast<uint32_t>(LoadInt32(p));
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// ---- Protocol buffer wire format (https://protobuf.dev/programming-guides/encoding/). ----
// Enough of it to write sentencepiece_model.proto's ModelProto: varints, fixed32 floats and
// length-delimited strings / sub-messages. Fields are written in field-number order, as
// protobuf's own serializer does, so the output matches files written by SentencePiece.

enum WireType : uint32_t { kVarint = 0, kFixed32 = 5, kLengthDelimited = 2 };

class ProtoWriter {
 public:
  void Varint(uint64_t value) {
    while (value >= 0x80) {
      out_.push_back(static_cast<char>((value & 0x7F) | 0x80));
      value >>= 7;
    }
    out_.push_back(static_cast<char>(value));
  }
  void Tag(uint32_t field, WireType type) { Varint((uint64_t{field} << 3) | type); }

  // int32 / enum / bool fields. A negative int32 is sign-extended to 64 bits (10 bytes).
  void Int(uint32_t field, int64_t value) {
    Tag(field, kVarint);
    Varint(static_cast<uint64_t>(value));
  }
  void Bool(uint32_t field, bool value) { Int(field, value ? 1 : 0); }
  void Float(uint32_t field, float value) {
    Tag(field, kFixed32);
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>((bits >> (8 * i)) & 0xFF));
  }
  // string / bytes / embedded message fields.
  void Bytes(uint32_t field, std::string_view bytes) {
    Tag(field, kLengthDelimited);
    Varint(bytes.size());
    out_.append(bytes);
  }

  const std::string& bytes() const { return out_; }

 private:
  std::string out_;
};

// sentencepiece_model.proto field numbers.
namespace model_proto {
constexpr uint32_t kPieces = 1;
constexpr uint32_t kTrainerSpec = 2;
constexpr uint32_t kNormalizerSpec = 3;
}  // namespace model_proto
namespace piece_proto {
constexpr uint32_t kPiece = 1;
constexpr uint32_t kScore = 2;
constexpr uint32_t kType = 3;
// ModelProto.SentencePiece.Type
constexpr int kNormal = 1;
constexpr int kUnknown = 2;
constexpr int kControl = 3;
constexpr int kByte = 6;
}  // namespace piece_proto
namespace trainer_proto {
constexpr uint32_t kModelType = 3;
constexpr uint32_t kVocabSize = 4;
constexpr uint32_t kSplitDigits = 25;
constexpr uint32_t kAllowWhitespaceOnlyPieces = 26;
constexpr uint32_t kByteFallback = 35;
constexpr uint32_t kUnkSurface = 44;
constexpr int kBpe = 2;  // TrainerSpec.ModelType
}  // namespace trainer_proto
namespace normalizer_proto {
constexpr uint32_t kName = 1;
constexpr uint32_t kPrecompiledCharsmap = 2;
constexpr uint32_t kAddDummyPrefix = 3;
constexpr uint32_t kRemoveExtraWhitespaces = 4;
constexpr uint32_t kEscapeWhitespaces = 5;
}  // namespace normalizer_proto

std::string SentencePieceRecord(std::string_view piece, float score, int type) {
  ProtoWriter w;
  w.Bytes(piece_proto::kPiece, piece);
  // Written even when 0, as SentencePiece's trainer does (proto2 keeps explicitly set fields).
  w.Float(piece_proto::kScore, score);
  if (type != piece_proto::kNormal) w.Int(piece_proto::kType, type);  // NORMAL is the default
  return w.bytes();
}

// llama2.c writes the word-boundary space as ' '; SentencePiece escapes it as U+2581.
std::string EscapeSpaces(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (c == ' ') {
      out += "\xE2\x96\x81";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<Llama2cTokenizer> ReadLlama2cTokenizer(const std::string& path,
                                                      int32_t vocab_size) {
  if (vocab_size <= 0) {
    return FileError(path, absl::StrCat("vocab_size must be positive, got ", vocab_size));
  }
  NIBBLE_ASSIGN_OR_RETURN(const std::string bytes, ReadFileToString(path));
  const size_t size = bytes.size();
  if (size < 4) {
    return FileError(path, absl::StrCat("truncated llama2.c tokenizer: ", size,
                                        " bytes, too short for the max_token_length header"));
  }
  Llama2cTokenizer tok;
  tok.max_token_length = LoadInt32(bytes.data());
  if (tok.max_token_length <= 0 || tok.max_token_length > kMaxPlausibleTokenLength) {
    return FileError(path, absl::StrCat("not a llama2.c tokenizer: max_token_length is ",
                                        tok.max_token_length));
  }
  tok.pieces.reserve(static_cast<size_t>(vocab_size));
  size_t offset = 4;
  for (int32_t i = 0; i < vocab_size; ++i) {
    if (size - offset < 8) {
      return FileError(path, absl::StrCat("truncated llama2.c tokenizer: piece ", i, " of ",
                                          vocab_size, " starts at byte ", offset,
                                          " but the file has ", size, " bytes"));
    }
    Llama2cTokenizerPiece piece;
    piece.score = LoadFloat32(bytes.data() + offset);
    const int32_t length = LoadInt32(bytes.data() + offset + 4);
    offset += 8;
    if (!std::isfinite(piece.score)) {
      return FileError(path, absl::StrCat("corrupt llama2.c tokenizer: piece ", i,
                                          " has score ", piece.score));
    }
    if (length < 0 || length > tok.max_token_length) {
      return FileError(path, absl::StrCat("corrupt llama2.c tokenizer: piece ", i, " has length ",
                                          length, " (max_token_length is ",
                                          tok.max_token_length, ")"));
    }
    if (size - offset < static_cast<size_t>(length)) {
      return FileError(path, absl::StrCat("truncated llama2.c tokenizer: piece ", i, " of ",
                                          vocab_size, " needs ", length, " bytes at byte ",
                                          offset, " but the file has ", size, " bytes"));
    }
    piece.text.assign(bytes, offset, static_cast<size_t>(length));
    offset += static_cast<size_t>(length);
    tok.pieces.push_back(std::move(piece));
  }
  if (offset != size) {
    return FileError(path, absl::StrCat(size - offset, " bytes follow the last of ", vocab_size,
                                        " pieces; is the vocabulary size right?"));
  }
  return tok;
}

absl::StatusOr<std::string> Llama2cTokenizerToSentencePieceModel(const Llama2cTokenizer& tok) {
  const int32_t n = static_cast<int32_t>(tok.pieces.size());
  if (n < kFirstMergedPiece) {
    return absl::InvalidArgumentError(absl::StrCat(
        "llama2.c tokenizer has ", n, " pieces; its layout needs at least ", kFirstMergedPiece,
        " (<unk>, <s>, </s> and 256 byte pieces)"));
  }
  ProtoWriter model;
  std::unordered_set<std::string> seen;
  for (int32_t i = 0; i < n; ++i) {
    const Llama2cTokenizerPiece& p = tok.pieces[static_cast<size_t>(i)];
    std::string text;
    int type;
    if (i < kFirstBytePiece) {
      // llama2.c's exporter writes BOS and EOS as "\n<s>\n" and "\n</s>\n" (so that run.c
      // prints them on lines of their own); SentencePiece's names are fixed.
      static constexpr const char* kNames[] = {"<unk>", "<s>", "</s>"};
      text = kNames[i];
      type = i == 0 ? piece_proto::kUnknown : piece_proto::kControl;
    } else if (i < kFirstMergedPiece) {
      text = absl::StrFormat("<0x%02X>", i - kFirstBytePiece);
      if (p.text != text) {
        return absl::InvalidArgumentError(absl::StrCat(
            "llama2.c tokenizer piece ", i, " is \"", absl::CEscape(p.text),
            "\" where llama2.c's layout has the byte piece ", text));
      }
      type = piece_proto::kByte;
    } else {
      if (p.text.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("llama2.c tokenizer piece ", i, " is empty"));
      }
      text = EscapeSpaces(p.text);
      type = piece_proto::kNormal;
    }
    if (!seen.insert(text).second) {
      return absl::InvalidArgumentError(absl::StrCat("llama2.c tokenizer piece ", i, " (\"",
                                                     absl::CEscape(text),
                                                     "\") duplicates an earlier piece"));
    }
    model.Bytes(model_proto::kPieces, SentencePieceRecord(text, p.score, type));
  }

  // The settings of llama2.c's train_vocab (tinystories.py): only model_type and
  // byte_fallback change how SentencePiece encodes (a BPE model with BYTE pieces fails to load
  // without byte_fallback); the rest records how such a vocabulary is trained.
  ProtoWriter trainer;
  trainer.Int(trainer_proto::kModelType, trainer_proto::kBpe);
  trainer.Int(trainer_proto::kVocabSize, n);
  trainer.Bool(trainer_proto::kSplitDigits, true);
  trainer.Bool(trainer_proto::kAllowWhitespaceOnlyPieces, true);
  trainer.Bool(trainer_proto::kByteFallback, true);
  trainer.Bytes(trainer_proto::kUnkSurface, " \xE2\x81\x87 ");  // " ⁇ ", SentencePiece's default
  model.Bytes(model_proto::kTrainerSpec, trainer.bytes());

  // The identity normalizer (an empty charsmap: no Unicode normalization) with SentencePiece's
  // default whitespace handling: a dummy-prefix space, runs of spaces collapsed and leading /
  // trailing spaces dropped (remove_extra_whitespaces), spaces escaped as U+2581. This is the
  // normalizer of the SentencePiece model the llama2.c vocabularies were trained and exported
  // from (tok512.model in ../shared), which differs from run.c's hand-written encoder in one
  // way: run.c keeps runs of spaces.
  ProtoWriter normalizer;
  normalizer.Bytes(normalizer_proto::kName, "identity");
  normalizer.Bytes(normalizer_proto::kPrecompiledCharsmap, "");
  normalizer.Bool(normalizer_proto::kAddDummyPrefix, true);
  normalizer.Bool(normalizer_proto::kRemoveExtraWhitespaces, true);
  normalizer.Bool(normalizer_proto::kEscapeWhitespaces, true);
  model.Bytes(model_proto::kNormalizerSpec, normalizer.bytes());
  return model.bytes();
}

}  // namespace nibble::engine
