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
  // Ids of `text`, without BOS/EOS. Special tokens written in the text encode to their single
  // id, as Hugging Face tokenizers do with their special tokens:
  //  - the model's CONTROL pieces (Llama-2's "<s>", "</s>") and the added tokens given at load
  //    time (InternLM2's "<|im_end|>") are matched first, longest match at the leftmost
  //    position; the text between them is encoded by SentencePiece one span at a time, so each
  //    span gets the model's dummy-prefix space as if it began a text (this is how Meta's
  //    reference Llama-2 chat code encodes "[INST] ... [/INST] a</s><s>[INST] ...": every turn
  //    is encoded separately and starts with "▁[");
  //  - USER_DEFINED pieces are matched by SentencePiece itself, inside a span;
  //  - "<unk>" and byte pieces such as "<0x0A>" are not special: they encode as ordinary text
  //    (Penn Treebank text spells "<unk>" as a word).
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  // The text of a whole sequence of ids (as SentencePiece decodes it: the leading space of
  // the first piece is removed, byte pieces are joined into UTF-8). Control pieces and added
  // tokens decode to nothing; ids out of range are skipped.
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

// A special token defined outside the SentencePiece model, by Hugging Face's
// tokenizer_config.json ("added_tokens_decoder": {"92542": {"content": "<|im_end|>", ...}}).
// InternLM2 needs these: its tokenizer.model has neither user-defined nor control pieces for
// them; ids 92538..92543 are the pieces "[UNUSED_TOKEN_141]".."[UNUSED_TOKEN_146]", and only
// tokenizer_config.json names them "<|plugin|>".."<|im_start|>" (piece dump in
// oobabooga/text-generation-webui issue #5375; InternLM/InternLM issue #693 shows an old
// transformers not encoding "<|im_start|>" as 92543). The content replaces the piece of `id`,
// which must lie inside the SentencePiece vocabulary. The caller (the model loader) reads the
// list from tokenizer_config.json; this file reads no JSON.
struct AddedToken {
  std::string content;
  int32_t id = -1;
};

// Loads a SentencePiece model file (tokenizer.model).
TokenizerLoadResult LoadSentencePieceTokenizer(const std::string& path);
// The same, with special tokens defined outside the model (see AddedToken). Errors name the
// path and the offending token (empty content, id out of range, the same content twice).
TokenizerLoadResult LoadSentencePieceTokenizer(const std::string& path,
                                               const std::vector<AddedToken>& added_tokens);

}  // namespace nibble::engine
