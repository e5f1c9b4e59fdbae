#include "engine/text_stream.h"

#include <algorithm>
#include <cstddef>
#include <string_view>
#include <utility>
#include <vector>

namespace nibble::engine {
namespace {

// SentencePiece decodes an incomplete byte sequence to U+FFFD; the next token may complete it.
constexpr std::string_view kReplacementCharacter = "\xEF\xBF\xBD";

bool EndsWith(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.substr(text.size() - suffix.size()) == suffix;
}

}  // namespace

size_t CompleteUtf8Prefix(std::string_view text) {
  // Walk back over at most 3 continuation bytes to the last lead byte and check that its
  // sequence is complete.
  const size_t n = text.size();
  size_t i = n;
  int continuation = 0;
  while (i > 0 && continuation < 4 && (static_cast<uint8_t>(text[i - 1]) & 0xC0) == 0x80) {
    --i;
    ++continuation;
  }
  if (i == 0) return continuation == 0 ? 0 : n;  // only continuation bytes: not ours to fix
  const uint8_t lead = static_cast<uint8_t>(text[i - 1]);
  int needed = 0;
  if (lead < 0x80) needed = 0;
  else if ((lead & 0xE0) == 0xC0) needed = 1;
  else if ((lead & 0xF0) == 0xE0) needed = 2;
  else if ((lead & 0xF8) == 0xF0) needed = 3;
  else return n;  // invalid lead byte: pass it through rather than hold it forever
  return continuation >= needed ? n : i - 1;
}

TextStream::TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop_strings)
    : tokenizer_(tokenizer), stop_strings_(std::move(stop_strings)) {
  stop_strings_.erase(std::remove(stop_strings_.begin(), stop_strings_.end(), std::string()),
                      stop_strings_.end());
}

std::string TextStream::DecodeFrom(size_t from) const {
  return tokenizer_.Decode(std::vector<int32_t>(ids_.begin() + static_cast<std::ptrdiff_t>(from),
                                                ids_.end()));
}

std::string TextStream::Push(int32_t token) {
  if (stopped_) return "";
  ids_.push_back(token);
  // The text of the tokens past read_offset_, from the window's decode (see the header).
  std::string window = DecodeFrom(prefix_offset_);
  if (window.compare(0, prefix_text_.size(), prefix_text_) != 0) {
    // The window's earlier text changed under the new token (not seen with SentencePiece):
    // start over from the decode of all ids, which is right by definition.
    prefix_offset_ = read_offset_ = final_size_ = 0;
    prefix_text_.clear();
    window = DecodeFrom(0);
  }
  const size_t unchanged = final_size_;  // bytes of text_ that this token cannot change
  text_.resize(final_size_);
  text_.append(window, prefix_text_.size());
  if (text_.size() > final_size_ && CompleteUtf8Prefix(text_) == text_.size() &&
      !EndsWith(text_, kReplacementCharacter)) {
    // No unfinished character: the text so far is final, and the next window may start at
    // the old read offset, if its tokens have text of their own.
    std::string next_prefix = DecodeFrom(read_offset_);
    if (!next_prefix.empty()) {
      prefix_offset_ = read_offset_;
      prefix_text_ = std::move(next_prefix);
    } else {
      prefix_text_ = std::move(window);
    }
    read_offset_ = ids_.size();
    final_size_ = text_.size();
  }
  const std::string& text = text_;
  // Hold back a trailing replacement character (an incomplete byte sequence so far) and
  // any incomplete UTF-8 character.
  size_t safe = CompleteUtf8Prefix(text);
  while (safe >= kReplacementCharacter.size() &&
         EndsWith(std::string_view(text).substr(0, safe), kReplacementCharacter)) {
    safe -= kReplacementCharacter.size();
  }
  // What was emitted must still be the start of the text. The part that was final before
  // this token cannot have changed, so only the emitted text past it is compared.
  const size_t checked_from = std::min(unchanged, emitted_.size());
  if (safe < emitted_.size() ||
      text.compare(checked_from, emitted_.size() - checked_from, emitted_, checked_from,
                   emitted_.size() - checked_from) != 0) {
    // Earlier text changed under a longer decode (should not happen with SentencePiece);
    // keep what was promised and wait.
    return "";
  }
  // A stop string anywhere in the not-yet-emitted tail (it may straddle the boundary with
  // what was emitted, since emitted text never ends inside a possible stop string's start).
  size_t stop_at = std::string::npos;
  for (const std::string& stop : stop_strings_) {
    const size_t search_from = emitted_.size() >= stop.size() ? emitted_.size() - stop.size() + 1 : 0;
    const size_t found = text.find(stop, search_from);
    if (found != std::string::npos) stop_at = std::min(stop_at, found);
  }
  if (stop_at != std::string::npos) {
    stopped_ = true;
    const size_t end = std::max(stop_at, emitted_.size());
    std::string delta = text.substr(emitted_.size(), end - emitted_.size());
    emitted_ += delta;
    return delta;
  }
  // Hold back the longest tail that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const std::string& stop : stop_strings_) {
    for (size_t len = std::min(stop.size() - 1, safe - emitted_.size()); len > hold; --len) {
      if (text.compare(safe - len, len, stop, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  const size_t end = safe - hold;
  std::string delta = text.substr(emitted_.size(), end - emitted_.size());
  emitted_ += delta;
  return delta;
}

std::string TextStream::Finish() {
  if (stopped_) return "";
  std::string text = tokenizer_.Decode(ids_);
  if (text.compare(0, emitted_.size(), emitted_) != 0) return "";
  const size_t end = CompleteUtf8Prefix(text);
  if (end <= emitted_.size()) return "";
  std::string delta = text.substr(emitted_.size(), end - emitted_.size());
  emitted_ += delta;
  return delta;
}

}  // namespace nibble::engine
