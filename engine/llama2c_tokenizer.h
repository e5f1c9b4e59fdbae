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
// and what is wrong (truncated, negative or oversized lengths, trailing bytes).
absl::StatusOr<Llama2cTokenizer> ReadLlama2cTokenizer(const std::string& path,
                                                      int32_t vocab_size);

// Serializes a SentencePiece ModelProto (BPE, byte fallback, identity normalizer, dummy
// prefix, split digits; <unk>/<s>/</s> at 0/1/2) that encodes text exactly as llama2.c's own
// encoder does with the same pieces and scores, so `nibble convert llama2c` can write a
// tokenizer.model from the public tok512.bin.
absl::StatusOr<std::string> Llama2cTokenizerToSentencePieceModel(const Llama2cTokenizer& tok);

}  // namespace nibble::engine
