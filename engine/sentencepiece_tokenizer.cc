// The only translation unit that includes sentencepiece_processor.h. SentencePiece 0.1.97
// declares `namespace absl { using std::string_view; }`, which clashes with Debian's Abseil
// (whose absl::string_view is a class of its own), so this file must not include any absl/
// header, directly or through a nibble header: it reports errors as plain strings
// (TokenizerLoadResult) and the absl world wraps them.
#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sentencepiece_processor.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/tokenizer.h"

namespace nibble::engine {
namespace {

// A piece that Encode matches in raw text before SentencePiece sees it.
struct SpecialPiece {
  std::string text;
  int32_t id;
};

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(std::unique_ptr<sentencepiece::SentencePieceProcessor> processor,
                         std::vector<SpecialPiece> specials,
                         std::unordered_map<int32_t, std::string> added_by_id)
      : sp_(std::move(processor)),
        specials_(std::move(specials)),
        added_by_id_(std::move(added_by_id)) {
    // Longest first, so that at one position "<|im_end|>" wins over any shorter special
    // token it begins with.
    std::stable_sort(specials_.begin(), specials_.end(),
                     [](const SpecialPiece& a, const SpecialPiece& b) {
                       return a.text.size() > b.text.size();
                     });
    for (const SpecialPiece& s : specials_) {
      special_first_byte_[static_cast<unsigned char>(s.text[0])] = true;
      special_by_text_.emplace(s.text, s.id);
    }
  }

  int32_t VocabSize() const override { return sp_->GetPieceSize(); }
  int32_t BosId() const override { return sp_->bos_id(); }
  int32_t EosId() const override { return sp_->eos_id(); }

  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    size_t span_begin = 0;
    size_t pos = 0;
    while (pos < text.size()) {
      const SpecialPiece* match = nullptr;
      if (special_first_byte_[static_cast<unsigned char>(text[pos])]) {
        for (const SpecialPiece& s : specials_) {
          if (text.compare(pos, s.text.size(), s.text) == 0) {
            match = &s;
            break;
          }
        }
      }
      if (match == nullptr) {
        ++pos;
        continue;
      }
      EncodeSpan(text.substr(span_begin, pos - span_begin), &ids);
      ids.push_back(match->id);
      pos += match->text.size();
      span_begin = pos;
    }
    EncodeSpan(text.substr(span_begin), &ids);
    return ids;
  }

  std::string Decode(const std::vector<int32_t>& ids) const override {
    std::vector<int> kept;
    kept.reserve(ids.size());
    const int32_t size = VocabSize();
    for (int32_t id : ids) {
      // SentencePiece prints control pieces as nothing; added tokens (which replace ordinary
      // pieces of the model) are special tokens too, so they print as nothing as well.
      if (id < 0 || id >= size || added_by_id_.count(id) != 0) continue;
      kept.push_back(id);
    }
    std::string text;
    // Every id is in range, so this cannot fail.
    sp_->Decode(kept, &text).IgnoreError();
    return text;
  }

  std::string IdToPiece(int32_t id) const override {
    if (id < 0 || id >= VocabSize()) return "";
    auto it = added_by_id_.find(id);
    if (it != added_by_id_.end()) return it->second;
    return sp_->IdToPiece(id);
  }

  int32_t PieceToId(std::string_view piece) const override {
    auto it = special_by_text_.find(std::string(piece));
    if (it != special_by_text_.end()) return it->second;
    const int id = sp_->PieceToId(piece);
    // SentencePiece answers unk_id for pieces it does not know.
    if (id == sp_->unk_id() && piece != sp_->IdToPiece(id)) return -1;
    return id;
  }

 private:
  void EncodeSpan(std::string_view span, std::vector<int32_t>* ids) const {
    if (span.empty()) return;
    std::vector<int> span_ids;
    // Encoding fails only when the processor is not loaded, which construction rules out.
    sp_->Encode(span, &span_ids).IgnoreError();
    ids->insert(ids->end(), span_ids.begin(), span_ids.end());
  }

  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::vector<SpecialPiece> specials_;  // longest text first
  std::array<bool, 256> special_first_byte_{};
  std::unordered_map<std::string, int32_t> special_by_text_;
  std::unordered_map<int32_t, std::string> added_by_id_;
};

// POSIX reads: std::ifstream throws (from a noexcept-less streambuf) on a directory.
bool ReadWholeFile(const std::string& path, std::string* bytes, std::string* error) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *error = std::string("cannot open SentencePiece model: ") + std::strerror(errno);
    return false;
  }
  struct stat st {};
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    ::close(fd);
    *error = "cannot read SentencePiece model: it is a directory";
    return false;
  }
  char buffer[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      *error = std::string("cannot read SentencePiece model: ") + std::strerror(errno);
      ::close(fd);
      return false;
    }
    if (n == 0) break;
    bytes->append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return true;
}

TokenizerLoadResult Failure(const std::string& path, const std::string& message) {
  TokenizerLoadResult result;
  result.error = path + ": " + message;
  return result;
}

}  // namespace

TokenizerLoadResult LoadSentencePieceTokenizer(const std::string& path) {
  return LoadSentencePieceTokenizer(path, {});
}

TokenizerLoadResult LoadSentencePieceTokenizer(const std::string& path,
                                               const std::vector<AddedToken>& added_tokens) {
  // Read the file here rather than through SentencePiece's Load(path), to tell "cannot read"
  // apart from "not a model". (atomic_file.h's reader returns absl::Status, out of bounds here.)
  std::string bytes;
  std::string read_error;
  if (!ReadWholeFile(path, &bytes, &read_error)) return Failure(path, read_error);
  if (bytes.empty()) return Failure(path, "not a SentencePiece model: the file is empty");

  auto sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const sentencepiece::util::Status status = sp->LoadFromSerializedProto(bytes);
  if (!status.ok()) {
    const std::string message = status.message();
    // SentencePiece reports a protobuf parse failure as the failed source line.
    if (message.find("ParseFromArray") != std::string::npos) {
      return Failure(path, "not a SentencePiece model: it does not parse as a ModelProto");
    }
    return Failure(path, "not a valid SentencePiece model: " + message);
  }
  const int size = sp->GetPieceSize();
  if (size <= 0) return Failure(path, "not a valid SentencePiece model: it has no pieces");

  std::vector<SpecialPiece> specials;
  for (int id = 0; id < size; ++id) {
    // Control pieces are never produced by SentencePiece's segmentation of text ("Note that
    // when the input sentence contains control symbols, they are not treated as one token",
    // sentencepiece_model.proto), so Encode matches them itself. Unknown, byte and unused
    // pieces are not control pieces; user-defined ones SentencePiece matches on its own.
    if (sp->IsControl(id) && !sp->IdToPiece(id).empty()) {
      specials.push_back({sp->IdToPiece(id), id});
    }
  }
  std::unordered_map<int32_t, std::string> added_by_id;
  for (const AddedToken& token : added_tokens) {
    if (token.content.empty()) return Failure(path, "added token with empty content");
    if (token.id < 0 || token.id >= size) {
      return Failure(path, "added token \"" + token.content + "\" has id " +
                               std::to_string(token.id) + ", outside the vocabulary of " +
                               std::to_string(size) + " pieces");
    }
    for (const SpecialPiece& s : specials) {
      if (s.text == token.content && s.id != token.id) {
        return Failure(path, "added token \"" + token.content + "\" is given ids " +
                                 std::to_string(s.id) + " and " + std::to_string(token.id));
      }
    }
    // An added token replaces whatever piece its id had; a control piece of that id stops
    // being matched under its old text.
    std::erase_if(specials, [&](const SpecialPiece& s) { return s.id == token.id; });
    specials.push_back({token.content, token.id});
    added_by_id[token.id] = token.content;
  }
  TokenizerLoadResult result;
  result.tokenizer = std::make_unique<SentencePieceTokenizer>(std::move(sp), std::move(specials),
                                                             std::move(added_by_id));
  return result;
}

}  // namespace nibble::engine
