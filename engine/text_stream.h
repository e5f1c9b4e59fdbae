// Turns a growing list of generated token ids into text deltas that are safe to show: never
// half a UTF-8 character, never text that may turn out to be the start of a stop string.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer.h"

namespace nibble::engine {

class TextStream {
 public:
  TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop_strings);

  // Adds one generated token; returns the text that became final with it (possibly empty).
  std::string Push(int32_t token);
  // True once a stop string appeared; the text before it has been returned, the stop string
  // and anything after it never will be.
  bool stopped() const { return stopped_; }
  // At the end of generation: whatever was held back (a partial stop string is real text
  // after all; an unfinished byte sequence comes out as SentencePiece decodes it, U+FFFD).
  std::string Finish();
  // All text returned so far.
  const std::string& text() const { return emitted_; }

 private:
  const Tokenizer& tokenizer_;
  std::vector<std::string> stop_strings_;
  std::vector<int32_t> ids_;
  std::string emitted_;
  bool stopped_ = false;
};

// Length of the longest prefix of `text` that ends on a complete UTF-8 character.
size_t CompleteUtf8Prefix(std::string_view text);

}  // namespace nibble::engine
