// llama2.c's tokenizer.bin format, and its conversion to a SentencePiece model.
//
// tokenizer.bin: int32 max_token_length, then for each of the vocab_size pieces (the count
// comes from the model checkpoint, not this file): float32 score, int32 length, the bytes.
// Ids 0..2 are <unk>, <s>, </s>; 3..258 are the byte pieces <0x00>..<0xFF>; the rest are
// BPE pieces whose leading space is written as ' ' (SentencePiece writes U+2581 '▁').
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace nibble::engine {

struct Llama2cTokenizerPiece {
  std::string text;  // as stored: ' ' for a space, "<0x0A>" for byte pieces
  float score = 0;
};

struct Llama2cTokenizer {
  int32_t max_token_length = 0;
  std::vector<Llama2cTokenizerPiece> pieces;
};

// Reads a llama2.c tokenizer.bin holding exactly `vocab_size` pieces. Errors name the file
// and what is wrong: ReadFileToString's errors (NotFound, ...) when it cannot be read;
// InvalidArgument when it is truncated, has an implausible max_token_length, a negative
// length or one above max_token_length, a non-finite score, or bytes after the last piece.
absl::StatusOr<Llama2cTokenizer> ReadLlama2cTokenizer(const std::string& path,
                                                      int32_t vocab_size);

// Serializes a SentencePiece ModelProto (BPE, byte fallback, identity normalizer, dummy
// prefix, split digits; <unk>/<s>/</s> at 0/1/2 whatever their text in tokenizer.bin, ids
// 3..258 BYTE pieces, the rest NORMAL with ' ' written as U+2581, scores kept bit for bit),
// so `nibble convert llama2c` can write a tokenizer.model from the public tok512.bin. From
// tok512.bin it writes the same pieces and normalizer as ../shared's tok512.model, so it
// encodes every text to the same ids. That is also what llama2.c's run.c encoder gives (the
// same greedy highest-score merges over the same pieces) except for runs of spaces and
// leading/trailing spaces, which SentencePiece's normalizer (remove_extra_whitespaces, as in
// the SentencePiece model the llama2.c vocabularies were exported from) collapses or drops and
// run.c keeps. Errors (InvalidArgument): fewer than 259 pieces, ids 3..258 that are not the
// byte pieces <0x00>..<0xFF>, empty or duplicate pieces.
absl::StatusOr<std::string> Llama2cTokenizerToSentencePieceModel(const Llama2cTokenizer& tok);

}  // namespace nibble::engine
