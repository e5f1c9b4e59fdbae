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
  // Decode of ids_[from, ids_.size()).
  std::string DecodeFrom(size_t from) const;

  const Tokenizer& tokenizer_;
  std::vector<std::string> stop_strings_;
  std::vector<int32_t> ids_;
  // Incremental detokenization (the scheme of Hugging Face's and vLLM's streaming
  // detokenizers): each Push decodes only the window ids_[prefix_offset_, end), and the text
  // its tokens past read_offset_ add is the window's decode minus prefix_text_, the decode of
  // ids_[prefix_offset_, read_offset_). SentencePiece treats the start of a decode specially
  // (it drops the leading space of the first piece; byte pieces join into characters), so a
  // window is only used where that cannot change what its new tokens add: its start is a
  // token boundary where the whole text so far was complete (no unfinished character), and
  // prefix_text_ is not empty (then no later piece's leading space is dropped, as in the
  // decode of all ids) -- or the window starts at token 0, where it is the whole decode.
  size_t prefix_offset_ = 0;
  size_t read_offset_ = 0;
  std::string prefix_text_;
  // The decode of every id pushed so far; its first final_size_ bytes, the decode of
  // ids_[0, read_offset_), never change again.
  std::string text_;
  size_t final_size_ = 0;
  std::string emitted_;
  bool stopped_ = false;
};

// Length of the longest prefix of `text` that ends on a complete UTF-8 character.
size_t CompleteUtf8Prefix(std::string_view text);

}  // namespace nibble::engine
