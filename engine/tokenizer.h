// Text <-> token ids. The SentencePiece implementation lives in its own translation unit
// because SentencePiece 0.1.97's header declares an absl::string_view of its own that
// clashes with Debian's Abseil (TOOLCHAIN.md): no file that includes it may include absl/.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::engine {

// Thread-compatible: after loading, const methods may be called from any thread.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  virtual int32_t VocabSize() const = 0;
  virtual int32_t BosId() const = 0;
  virtual int32_t EosId() const = 0;
  // Ids of `text`, without BOS/EOS. Pieces written in the text as control tokens (for
  // example "<|im_end|>" of InternLM2) encode to their single id where the model defines
  // them as user-defined or control pieces.
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  // The text of a whole sequence of ids (as SentencePiece decodes it: the leading space of
  // the first piece is removed, byte pieces are joined into UTF-8).
  virtual std::string Decode(const std::vector<int32_t>& ids) const = 0;
  // The piece string of one id ("▁the", "<0x0A>", "<|im_end|>"); empty if out of range.
  virtual std::string IdToPiece(int32_t id) const = 0;
  // The id of a piece, or -1 when the vocabulary has no such piece.
  virtual int32_t PieceToId(std::string_view piece) const = 0;
};

struct TokenizerLoadResult {
  std::unique_ptr<Tokenizer> tokenizer;  // null on failure
  std::string error;                     // names the file and the problem on failure
};

// Loads a SentencePiece model file (tokenizer.model).
TokenizerLoadResult LoadSentencePieceTokenizer(const std::string& path);

}  // namespace nibble::engine
