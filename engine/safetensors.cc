#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/atomic_file.h"
#include "engine/status_macros.h"
#include "nlohmann/json.hpp"

namespace nibble::engine {
namespace {

using Json = nlohmann::json;

// The reference implementation refuses headers over 100 MB; so do we, so that a file that
// claims a huge header fails before the JSON parser spends time and memory on it.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// A valid header nests three levels deep ({name: {shape: [..]}}); anything far deeper is junk.
// nlohmann's parser and destructor are iterative, so this is about wasted work, not the stack.
constexpr size_t kMaxJsonDepth = 32;
constexpr std::string_view kMetadataKey = "__metadata__";
constexpr size_t kLengthFieldBytes = 8;

// Debian's Abseil is built with its own absl::string_view (ABSL_OPTION_USE_STD_STRING_VIEW 0),
// which std::string_view does not convert to implicitly.
absl::string_view ToAbsl(std::string_view text) { return {text.data(), text.size()}; }

// Length of the well-formed UTF-8 sequence at p (1 to 4), or 0 if there is none: no overlong
// forms, surrogates or code points past U+10FFFF, the rules nlohmann::json applies when it
// reads or dumps a string.
size_t Utf8SequenceLength(const uint8_t* p, const uint8_t* end) {
  const uint8_t c = *p;
  if (c < 0x80) return 1;
  size_t extra;
  uint32_t code;
  uint32_t min_code;
  if ((c & 0xE0) == 0xC0) {
    extra = 1, code = c & 0x1F, min_code = 0x80;
  } else if ((c & 0xF0) == 0xE0) {
    extra = 2, code = c & 0x0F, min_code = 0x800;
  } else if ((c & 0xF8) == 0xF0) {
    extra = 3, code = c & 0x07, min_code = 0x10000;
  } else {
    return 0;
  }
  if (static_cast<size_t>(end - p) <= extra) return 0;
  for (size_t i = 1; i <= extra; ++i) {
    if ((p[i] & 0xC0) != 0x80) return 0;
    code = (code << 6) | (p[i] & 0x3F);
  }
  if (code < min_code || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return 0;
  return extra + 1;
}

bool IsValidUtf8(std::string_view text) {
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  const auto* end = p + text.size();
  while (p < end) {
    const size_t n = Utf8SequenceLength(p, end);
    if (n == 0) return false;
    p += n;
  }
  return true;
}

// Text from the file made fit for an error message (a log line): control characters and bytes
// that are not well-formed UTF-8 become \xNN escapes; at most `max_bytes` of input are shown,
// cut at a character boundary, with "..." if cut.
std::string Printable(std::string_view text, size_t max_bytes) {
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  const auto* end = p + text.size();
  const auto* limit = p + std::min(text.size(), max_bytes);
  std::string out;
  while (p < end) {
    const size_t n = Utf8SequenceLength(p, end);
    if (p + std::max<size_t>(n, 1) > limit) {
      out += "...";
      break;
    }
    if (n == 1 && *p >= 0x20 && *p != 0x7F && *p != '\\') {
      out += static_cast<char>(*p);
    } else if (n > 1) {
      out.append(reinterpret_cast<const char*>(p), n);
    } else if (*p == '\n') {
      out += "\\n";
    } else if (*p == '\\') {
      out += "\\\\";
    } else {
      constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[*p >> 4];
      out += kHex[*p & 0xF];
    }
    p += std::max<size_t>(n, 1);
  }
  return out;
}

// A name from the file, quoted for an error message.
std::string Quoted(std::string_view text) { return absl::StrCat("'", Printable(text, 96), "'"); }

std::string TensorLabel(std::string_view name) { return absl::StrCat("tensor ", Quoted(name)); }

// Malformed content.
template <typename... Parts>
absl::Status Invalid(std::string_view source, const Parts&... parts) {
  return absl::InvalidArgumentError(
      absl::StrCat(ToAbsl(source), ": invalid safetensors file: ", parts...));
}

// Content that points past the end of the file: most likely a truncated copy or download.
template <typename... Parts>
absl::Status Truncated(std::string_view source, const Parts&... parts) {
  return absl::DataLossError(
      absl::StrCat(ToAbsl(source), ": truncated safetensors file: ", parts...));
}

// The element count of `shape` if it is representable (as int64), else nullopt. Overflow of
// any partial product counts, as in the reference implementation, even if a later 0 would
// bring the product back to 0: such a shape is nonsense either way.
std::optional<uint64_t> CheckedElementCount(const std::vector<int64_t>& shape) {
  uint64_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) return std::nullopt;
    if (__builtin_mul_overflow(count, static_cast<uint64_t>(dim), &count)) return std::nullopt;
    if (count > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
  }
  return count;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// First pass over the header JSON, as a SAX consumer: finds what nlohmann's DOM parser would
// silently accept or hide. nlohmann keeps the last of duplicate object keys, so a header that
// names a tensor twice would load whichever came last; this rejects it instead. It also caps
// nesting depth and keeps the parser's error message (the DOM parser without exceptions only
// says "discarded").
class HeaderSyntaxChecker {
 public:
  using string_t = Json::string_t;

  const std::string& error() const { return error_; }

  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(Json::number_integer_t) { return true; }
  bool number_unsigned(Json::number_unsigned_t) { return true; }
  bool number_float(Json::number_float_t, const string_t&) { return true; }
  bool string(string_t&) { return true; }
  bool binary(Json::binary_t&) { return true; }

  bool start_object(size_t) {
    if (!Enter()) return false;
    object_keys_.emplace_back();
    return true;
  }
  bool key(string_t& key) {
    if (!object_keys_.back().insert(key).second) {
      error_ = absl::StrCat("duplicate key ", Quoted(key), " in a JSON object");
      return false;
    }
    return true;
  }
  bool end_object() {
    object_keys_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(size_t) { return Enter(); }
  bool end_array() {
    --depth_;
    return true;
  }

  bool parse_error(size_t /*position*/, const std::string& /*last_token*/,
                   const Json::exception& error) {
    // what() is "[json.exception.parse_error.101] parse error at line 1, column 7: ...";
    // the bracketed id means nothing to a user. The rest quotes bytes of the file: escape.
    std::string_view what = error.what();
    const size_t id_end = what.find("] ");
    if (id_end != std::string_view::npos) what.remove_prefix(id_end + 2);
    error_ = absl::StrCat("header is not valid JSON: ", Printable(what, 400));
    return false;
  }

 private:
  bool Enter() {
    if (++depth_ > kMaxJsonDepth) {
      error_ = absl::StrCat("header JSON nests deeper than ", kMaxJsonDepth, " levels");
      return false;
    }
    return true;
  }

  size_t depth_ = 0;
  std::vector<std::set<std::string>> object_keys_;  // one per open object
  std::string error_;
};

// "an array", "a string", ... for "X is not Y but <this>".
const char* Described(const Json& j) {
  switch (j.type()) {
    case Json::value_t::object: return "an object";
    case Json::value_t::array: return "an array";
    case Json::value_t::string: return "a string";
    case Json::value_t::boolean: return "a boolean";
    case Json::value_t::null: return "null";
    case Json::value_t::binary: return "binary data";
    case Json::value_t::discarded: return "nothing";
    default: return "a number";
  }
}

// The unsigned integer value of `j`, or nullopt if it is not a non-negative JSON integer.
std::optional<uint64_t> AsUnsigned(const Json& j) {
  if (!j.is_number_unsigned()) return std::nullopt;
  return j.get<uint64_t>();
}

absl::StatusOr<std::vector<int64_t>> ParseShape(const Json& shape_json, std::string_view source,
                                                std::string_view name) {
  if (!shape_json.is_array()) {
    return Invalid(source, TensorLabel(name), ": \"shape\" is not an array but ",
                   Described(shape_json));
  }
  std::vector<int64_t> shape;
  shape.reserve(shape_json.size());
  for (const Json& dim : shape_json) {
    if (dim.is_number_unsigned()) {
      const uint64_t value = dim.get<uint64_t>();
      if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Invalid(source, TensorLabel(name), ": shape dimension ", value,
                       " is too large (overflow)");
      }
      shape.push_back(static_cast<int64_t>(value));
    } else if (dim.is_number_integer()) {
      return Invalid(source, TensorLabel(name), ": negative dimension ", dim.get<int64_t>(),
                     " in shape");
    } else {
      return Invalid(source, TensorLabel(name), ": shape dimension is not an integer but ",
                     Described(dim));
    }
  }
  return shape;
}

absl::StatusOr<TensorInfo> ParseTensorEntry(std::string_view name, const Json& entry,
                                            uint64_t data_size, std::string_view source) {
  const std::string label = TensorLabel(name);
  if (!entry.is_object()) {
    return Invalid(source, label, ": entry is not a JSON object but ", Described(entry));
  }
  const auto dtype_it = entry.find("dtype");
  const auto shape_it = entry.find("shape");
  const auto offsets_it = entry.find("data_offsets");
  // Other keys are ignored, as the reference implementation does, for forward compatibility.
  if (dtype_it == entry.end()) return Invalid(source, label, ": missing \"dtype\"");
  if (shape_it == entry.end()) return Invalid(source, label, ": missing \"shape\"");
  if (offsets_it == entry.end()) return Invalid(source, label, ": missing \"data_offsets\"");

  TensorInfo info;
  info.name = std::string(name);
  if (!dtype_it->is_string()) {
    return Invalid(source, label, ": \"dtype\" is not a string but ", Described(*dtype_it));
  }
  const std::string& dtype_name = dtype_it->get_ref<const std::string&>();
  const std::optional<DType> dtype = ParseDTypeName(dtype_name);
  if (!dtype) return Invalid(source, label, ": unknown dtype ", Quoted(dtype_name));
  info.dtype = *dtype;

  NIBBLE_ASSIGN_OR_RETURN(info.shape, ParseShape(*shape_it, source, name));

  const Json& offsets = *offsets_it;
  if (!offsets.is_array() || offsets.size() != 2) {
    return Invalid(source, label, ": \"data_offsets\" is not an array of two integers");
  }
  const std::optional<uint64_t> begin = AsUnsigned(offsets[0]);
  const std::optional<uint64_t> end = AsUnsigned(offsets[1]);
  if (!begin || !end) {
    return Invalid(source, label, ": \"data_offsets\" are not non-negative integers");
  }
  const std::string range = absl::StrCat("data_offsets [", *begin, ", ", *end, "]");
  if (*begin > *end) return Invalid(source, label, ": ", range, ": begin is after end");
  if (*end > data_size) {
    return Truncated(source, label, ": ", range, " end past the ", data_size,
                     "-byte data section");
  }
  info.data_begin = *begin;
  info.data_end = *end;

  const std::optional<uint64_t> count = CheckedElementCount(info.shape);
  uint64_t expected_bytes = 0;
  if (!count || __builtin_mul_overflow(*count, DTypeSize(info.dtype), &expected_bytes)) {
    return Invalid(source, label, ": element count of shape ", ShapeString(info.shape),
                   " overflows");
  }
  if (expected_bytes != *end - *begin) {
    return Invalid(source, label, ": size mismatch: shape ", ShapeString(info.shape), " of ",
                   ToAbsl(DTypeName(info.dtype)), " needs ", expected_bytes, " bytes but ", range,
                   " cover ", *end - *begin);
  }
  return info;
}

absl::Status ParseMetadata(const Json& metadata_json, std::string_view source,
                           std::map<std::string, std::string>& metadata) {
  if (!metadata_json.is_object()) {
    return Invalid(source, "\"__metadata__\" is not a JSON object but ",
                   Described(metadata_json));
  }
  for (const auto& [key, value] : metadata_json.items()) {
    if (!value.is_string()) {
      return Invalid(source, "\"__metadata__\" value for ", Quoted(key),
                     " is not a string but ", Described(value));
    }
    metadata.emplace(key, value.get<std::string>());
  }
  return absl::OkStatus();
}

}  // namespace

int64_t TensorInfo::NumElements() const {
  // Unsigned arithmetic: a hand-built TensorInfo with absurd dimensions wraps instead of
  // invoking undefined behaviour; parsed ones are checked to fit in int64.
  uint64_t count = 1;
  for (int64_t dim : shape) count *= static_cast<uint64_t>(dim);
  return static_cast<int64_t>(count);
}

absl::StatusOr<SafetensorsHeader> ParseSafetensors(std::span<const uint8_t> file_bytes,
                                                   std::string_view source) {
  if (file_bytes.size() < kLengthFieldBytes) {
    return Truncated(source, "file is too short (", file_bytes.size(),
                     " bytes) to hold the 8-byte header length");
  }
  uint64_t header_size = 0;
  for (size_t i = 0; i < kLengthFieldBytes; ++i) {
    header_size |= static_cast<uint64_t>(file_bytes[i]) << (8 * i);
  }
  const uint64_t after_length = file_bytes.size() - kLengthFieldBytes;
  if (header_size > after_length) {
    return Truncated(source, "header length ", header_size, " runs past the end of the file (",
                     after_length, " bytes follow the length field)");
  }
  if (header_size > kMaxHeaderBytes) {
    return Invalid(source, "header length ", header_size, " exceeds the limit of ",
                   kMaxHeaderBytes, " bytes");
  }
  const char* json_begin = reinterpret_cast<const char*>(file_bytes.data()) + kLengthFieldBytes;
  const char* json_end = json_begin + header_size;

  // nlohmann's lexer takes a NUL byte for the end of input (for C strings), so "{}\0junk"
  // would parse; NUL is never valid in JSON text, so reject it outright.
  if (const void* nul = std::memchr(json_begin, '\0', header_size); nul != nullptr) {
    return Invalid(source, "header is not valid JSON: NUL byte at header offset ",
                   static_cast<const char*>(nul) - json_begin);
  }
  HeaderSyntaxChecker checker;
  if (!Json::sax_parse(json_begin, json_end, &checker)) {
    return Invalid(source, checker.error().empty() ? "header is not valid JSON" : checker.error());
  }
  const Json root = Json::parse(json_begin, json_end, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return Invalid(source, "header is not valid JSON");
  if (!root.is_object()) {
    return Invalid(source, "header is not a JSON object but ", Described(root));
  }

  SafetensorsHeader header;
  header.data_offset = kLengthFieldBytes + header_size;
  const uint64_t data_size = after_length - header_size;
  header.tensors.reserve(root.size());
  for (const auto& [key, value] : root.items()) {
    if (key == kMetadataKey) {
      NIBBLE_RETURN_IF_ERROR(ParseMetadata(value, source, header.metadata));
      continue;
    }
    NIBBLE_ASSIGN_OR_RETURN(TensorInfo info, ParseTensorEntry(key, value, data_size, source));
    header.tensors.push_back(std::move(info));
  }

  // Sorted by range, an overlap can only be between neighbours. Ties (empty tensors at one
  // offset) are ordered by name so that the order does not depend on the JSON key order.
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) {
              return std::tie(a.data_begin, a.data_end, a.name) <
                     std::tie(b.data_begin, b.data_end, b.name);
            });
  for (size_t i = 1; i < header.tensors.size(); ++i) {
    const TensorInfo& prev = header.tensors[i - 1];
    const TensorInfo& next = header.tensors[i];
    if (next.data_begin < prev.data_end) {
      return Invalid(source, "data ranges overlap: ", TensorLabel(prev.name), " [",
                     prev.data_begin, ", ", prev.data_end, ") and ", TensorLabel(next.name),
                     " [", next.data_begin, ", ", next.data_end, ")");
    }
  }
  return header;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int error_number = errno;
    return absl::ErrnoToStatus(error_number, absl::StrCat("open ", path));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int error_number = errno;
    ::close(fd);
    return absl::ErrnoToStatus(error_number, absl::StrCat("stat ", path));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::FailedPreconditionError(absl::StrCat(path, ": not a regular file"));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  const size_t size = static_cast<size_t>(st.st_size);
  if (size > 0) {  // mmap refuses length 0; the parser then reports the file as too short
    void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapping == MAP_FAILED) {
      const int error_number = errno;
      ::close(fd);
      return absl::ErrnoToStatus(error_number, absl::StrCat("mmap ", path));
    }
    file->mapping_ = static_cast<const uint8_t*>(mapping);
    file->mapping_size_ = size;
  }
  ::close(fd);  // the mapping keeps the file open
  NIBBLE_ASSIGN_OR_RETURN(file->header_,
                          ParseSafetensors({file->mapping_, file->mapping_size_}, path));
  for (size_t i = 0; i < file->header_.tensors.size(); ++i) {
    file->index_.emplace(file->header_.tensors[i].name, i);
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(const_cast<uint8_t*>(mapping_), mapping_size_);
}

void SafetensorsFile::ReleaseResidentPages() const {
  // Advice only: a failure leaves the pages resident, which costs memory, not correctness.
  if (mapping_ != nullptr) ::madvise(const_cast<uint8_t*>(mapping_), mapping_size_, MADV_DONTNEED);
}

const TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

std::span<const uint8_t> SafetensorsFile::Bytes(const TensorInfo& tensor) const {
  // The parser guarantees this for tensors of this file; a TensorInfo from elsewhere gets an
  // empty span rather than a view past the mapping.
  if (tensor.data_begin > tensor.data_end ||
      tensor.data_end > mapping_size_ - std::min(mapping_size_, header_.data_offset)) {
    return {};
  }
  return {mapping_ + header_.data_offset + tensor.data_begin,
          static_cast<size_t>(tensor.data_end - tensor.data_begin)};
}

absl::Status SafetensorsWriter::Add(std::string name, DType dtype, std::vector<int64_t> shape,
                                    std::span<const uint8_t> bytes) {
  const std::string label = TensorLabel(name);
  if (name == kMetadataKey) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": the name is reserved for the metadata map"));
  }
  if (!IsValidUtf8(name)) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": name is not valid UTF-8"));
  }
  for (int64_t dim : shape) {
    if (dim < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": negative dimension in shape ", ShapeString(shape)));
    }
  }
  const std::optional<uint64_t> count = CheckedElementCount(shape);
  uint64_t expected_bytes = 0;
  if (!count || __builtin_mul_overflow(*count, DTypeSize(dtype), &expected_bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": element count of shape ", ShapeString(shape), " overflows"));
  }
  if (expected_bytes != bytes.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        label, ": size mismatch: shape ", ShapeString(shape), " of ", ToAbsl(DTypeName(dtype)),
        " needs ", expected_bytes, " bytes, got ", bytes.size()));
  }
  if (!names_.insert(name).second) {
    return absl::AlreadyExistsError(absl::StrCat(label, ": duplicate tensor name"));
  }
  entries_.push_back(
      Entry{std::move(name), dtype, std::move(shape), {bytes.begin(), bytes.end()}});
  return absl::OkStatus();
}

void SafetensorsWriter::SetMetadata(std::string key, std::string value) {
  metadata_.insert_or_assign(std::move(key), std::move(value));
}

absl::Status SafetensorsWriter::Write(const std::string& path) const {
  for (const auto& [key, value] : metadata_) {
    if (!IsValidUtf8(key) || !IsValidUtf8(value)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "write ", path, ": metadata entry ", Quoted(key), " is not valid UTF-8"));
    }
  }
  // ordered_json keeps insertion order: metadata first, then tensors in the order added, the
  // layout the reference implementation writes.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) {
    nlohmann::ordered_json metadata = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata_) metadata[key] = value;
    header[std::string(kMetadataKey)] = std::move(metadata);
  }
  uint64_t offset = 0;
  for (const Entry& entry : entries_) {
    const uint64_t end = offset + entry.bytes.size();
    nlohmann::ordered_json tensor = nlohmann::ordered_json::object();
    tensor["dtype"] = std::string(DTypeName(entry.dtype));
    tensor["shape"] = entry.shape;
    tensor["data_offsets"] = {offset, end};
    header[entry.name] = std::move(tensor);
    offset = end;
  }
  // All strings were checked to be valid UTF-8, so `replace` never fires; it only guarantees
  // that dump() cannot throw.
  std::string header_text =
      header.dump(/*indent=*/-1, ' ', /*ensure_ascii=*/false, Json::error_handler_t::replace);
  // Pad with spaces so that the data section starts 8-byte aligned, as the reference does.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  uint8_t length_field[kLengthFieldBytes];
  for (size_t i = 0; i < kLengthFieldBytes; ++i) {
    length_field[i] = static_cast<uint8_t>(static_cast<uint64_t>(header_text.size()) >> (8 * i));
  }
  std::vector<std::span<const uint8_t>> pieces;
  pieces.reserve(2 + entries_.size());
  pieces.emplace_back(length_field, kLengthFieldBytes);
  pieces.emplace_back(reinterpret_cast<const uint8_t*>(header_text.data()), header_text.size());
  for (const Entry& entry : entries_) pieces.emplace_back(entry.bytes);
  return WriteFileAtomically(path, pieces);
}

}  // namespace nibble::engine
