#include "quant/bundle.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/atomic_file.h"
#include "engine/status_macros.h"
#include "quant/manifest.h"

namespace nibble::quant {
namespace fs = std::filesystem;
namespace {

constexpr size_t kBlock = 512;
constexpr uint64_t kMaxManifestBytes = uint64_t{64} << 20;
constexpr size_t kIoBytes = size_t{1} << 20;

std::string S(absl::string_view v) { return std::string(v); }

std::string Errno(int err) { return std::strerror(err); }

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Writes all of `data` to `fd`; errors name `path`.
absl::Status WriteAll(int fd, const char* data, size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat(path, ": write failed: ", Errno(errno)));
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

// Reads up to `n` bytes (fewer only at end of file).
absl::StatusOr<size_t> ReadUpTo(int fd, char* data, size_t n, const std::string& path) {
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::read(fd, data + got, n - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat(path, ": read failed: ", Errno(errno)));
    }
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  return got;
}

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  void reset(int fd) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

// ---------------------------------------------------------------------------------------
// ustar headers.

// Octal, zero-padded, NUL-terminated in a field of `width` bytes; GNU base-256 (high bit of
// the first byte set, big-endian) for a value too large for octal.
void PutNumber(char* field, size_t width, uint64_t value) {
  const int digits = static_cast<int>(width) - 1;
  if (digits >= 22 || value < (uint64_t{1} << (3 * digits))) {
    for (int i = digits - 1; i >= 0; --i) {
      field[i] = static_cast<char>('0' + (value & 7));
      value >>= 3;
    }
    field[digits] = '\0';
    return;
  }
  std::memset(field, 0, width);
  for (size_t i = width; i-- > 1 && value > 0;) {
    field[i] = static_cast<char>(value & 0xff);
    value >>= 8;
  }
  field[0] = static_cast<char>(0x80);
}

// Parses an octal field (leading spaces, digits, then NUL or spaces) or a GNU base-256 one.
std::optional<uint64_t> ParseNumber(const char* field, size_t width) {
  const auto* u = reinterpret_cast<const unsigned char*>(field);
  if (u[0] & 0x80) {
    if (u[0] != 0x80) return std::nullopt;  // negative or unsupported
    uint64_t value = 0;
    for (size_t i = 1; i < width; ++i) {
      if (value >> 56) return std::nullopt;
      value = (value << 8) | u[i];
    }
    return value;
  }
  size_t i = 0;
  while (i < width && field[i] == ' ') ++i;
  uint64_t value = 0;
  bool any = false;
  for (; i < width && field[i] >= '0' && field[i] <= '7'; ++i) {
    if (value >> 60) return std::nullopt;
    value = value * 8 + static_cast<uint64_t>(field[i] - '0');
    any = true;
  }
  for (; i < width; ++i) {
    if (field[i] != ' ' && field[i] != '\0') return std::nullopt;
  }
  if (!any) return uint64_t{0};
  return value;
}

std::string Field(const char* field, size_t width) {
  return std::string(field, strnlen(field, width));
}

// Header checksum: the sum of the header's bytes with the checksum field taken as spaces.
// Some old tars summed signed chars; both are accepted on reading.
void HeaderSums(const char* block, uint64_t* unsigned_sum, int64_t* signed_sum) {
  *unsigned_sum = 0;
  *signed_sum = 0;
  for (size_t i = 0; i < kBlock; ++i) {
    const bool in_chksum = i >= 148 && i < 156;
    const char c = in_chksum ? ' ' : block[i];
    *unsigned_sum += static_cast<unsigned char>(c);
    *signed_sum += static_cast<signed char>(c);
  }
}

// A ustar header for a regular file, mode 0644, uid/gid 0. Long names go through the
// 155-byte prefix field, split at a '/'.
absl::StatusOr<std::string> FileHeader(const std::string& name, uint64_t size, int64_t mtime) {
  std::string block(kBlock, '\0');
  char* h = block.data();
  std::string prefix;
  std::string base = name;
  if (name.size() > 100) {
    // The prefix takes as much as fits; the rest (<= 100 bytes) is the name.
    size_t split = std::string::npos;
    for (size_t i = 0; i < name.size() && i <= 155; ++i) {
      if (name[i] == '/' && name.size() - i - 1 <= 100 && name.size() - i - 1 > 0) {
        split = i;
        break;
      }
    }
    if (split == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": name too long for a ustar archive (at most 255 bytes, split "
                             "at a '/' into 155 + 100)"));
    }
    prefix = name.substr(0, split);
    base = name.substr(split + 1);
  }
  std::memcpy(h + 0, base.data(), base.size());
  PutNumber(h + 100, 8, 0644);
  PutNumber(h + 108, 8, 0);
  PutNumber(h + 116, 8, 0);
  PutNumber(h + 124, 12, size);
  PutNumber(h + 136, 12, static_cast<uint64_t>(std::max<int64_t>(0, mtime)));
  h[156] = '0';
  std::memcpy(h + 257, "ustar", 6);  // magic "ustar\0"
  std::memcpy(h + 263, "00", 2);     // version
  std::memcpy(h + 345, prefix.data(), prefix.size());
  uint64_t sum = 0;
  int64_t unused = 0;
  HeaderSums(h, &sum, &unused);
  // Six octal digits, NUL, space: the traditional layout.
  PutNumber(h + 148, 7, sum);
  h[155] = ' ';
  return block;
}

// ---------------------------------------------------------------------------------------
// Parallel gzip: every chunk of the tar stream becomes an independent gzip member.

absl::StatusOr<std::string> GzipMember(std::string_view in, int level) {
  z_stream s{};
  if (deflateInit2(&s, level, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
    return absl::InternalError("zlib: deflateInit2 failed");
  }
  std::string out(deflateBound(&s, static_cast<uLong>(in.size())) + 64, '\0');
  s.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  s.avail_in = static_cast<uInt>(in.size());
  s.next_out = reinterpret_cast<Bytef*>(out.data());
  s.avail_out = static_cast<uInt>(out.size());
  const int rc = deflate(&s, Z_FINISH);
  const uLong total = s.total_out;
  deflateEnd(&s);
  if (rc != Z_STREAM_END) {
    return absl::InternalError(absl::StrCat("zlib: deflate failed (", rc, ")"));
  }
  out.resize(total);
  return out;
}

// Chunks go in from one thread (Submit), are deflated by `threads` workers, and come out in
// order to `fd`. At most 2 * threads chunks are in memory at once.
class ParallelGzipWriter {
 public:
  ParallelGzipWriter(int fd, std::string path, int threads, int level)
      : fd_(fd), path_(std::move(path)), threads_(threads), level_(level) {
    for (int i = 0; i < threads_; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~ParallelGzipWriter() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      queue_.clear();  // an error stopped the pack: drop the work not yet started
    }
    work_cv_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  absl::Status Submit(std::string chunk) {
    while (order_.size() >= static_cast<size_t>(2 * threads_)) {
      NIBBLE_RETURN_IF_ERROR(WriteFront());
    }
    auto job = std::make_shared<Job>();
    job->in = std::move(chunk);
    order_.push_back(job);
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(job);
    }
    work_cv_.notify_one();
    return absl::OkStatus();
  }

  absl::Status Finish() {
    while (!order_.empty()) NIBBLE_RETURN_IF_ERROR(WriteFront());
    return absl::OkStatus();
  }

  uint64_t bytes_written() const { return bytes_written_; }
  int64_t members() const { return members_; }

 private:
  struct Job {
    std::string in;
    absl::StatusOr<std::string> out;
    bool done = false;
  };

  void Work() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping
        job = queue_.front();
        queue_.pop_front();
      }
      absl::StatusOr<std::string> out = GzipMember(job->in, level_);
      {
        std::lock_guard<std::mutex> lock(mu_);
        job->out = std::move(out);
        job->in = std::string();
        job->done = true;
      }
      done_cv_.notify_all();
    }
  }

  absl::Status WriteFront() {
    std::shared_ptr<Job> job = order_.front();
    order_.pop_front();
    {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [&] { return job->done; });
    }
    if (!job->out.ok()) return job->out.status();
    NIBBLE_RETURN_IF_ERROR(WriteAll(fd_, job->out->data(), job->out->size(), path_));
    bytes_written_ += job->out->size();
    ++members_;
    return absl::OkStatus();
  }

  const int fd_;
  const std::string path_;
  const int threads_;
  const int level_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<std::shared_ptr<Job>> queue_;  // waiting for a worker (guarded by mu_)
  std::deque<std::shared_ptr<Job>> order_;  // submitted, not yet written (Submit's thread)
  bool stop_ = false;
  std::vector<std::thread> workers_;
  uint64_t bytes_written_ = 0;
  int64_t members_ = 0;
};

// Cuts the tar stream into chunks of `chunk_bytes` for the writer.
class ChunkedSink {
 public:
  ChunkedSink(ParallelGzipWriter* writer, uint64_t chunk_bytes)
      : writer_(writer), chunk_bytes_(chunk_bytes) {
    chunk_.reserve(chunk_bytes_);
  }
  absl::Status Append(const char* data, size_t n) {
    total_ += n;
    while (n > 0) {
      const size_t take = std::min<uint64_t>(n, chunk_bytes_ - chunk_.size());
      chunk_.append(data, take);
      data += take;
      n -= take;
      if (chunk_.size() == chunk_bytes_) NIBBLE_RETURN_IF_ERROR(Flush());
    }
    return absl::OkStatus();
  }
  absl::Status Flush() {
    if (chunk_.empty()) return absl::OkStatus();
    std::string full;
    full.reserve(chunk_bytes_);
    full.swap(chunk_);
    return writer_->Submit(std::move(full));
  }
  uint64_t total() const { return total_; }

 private:
  ParallelGzipWriter* writer_;
  const uint64_t chunk_bytes_;
  std::string chunk_;
  uint64_t total_ = 0;
};

absl::Status AppendFile(ChunkedSink& sink, const std::string& dir, const std::string& name,
                        std::vector<char>& buffer) {
  const std::string path = (fs::path(dir) / name).string();
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (fd.get() < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", Errno(errno)));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  NIBBLE_ASSIGN_OR_RETURN(std::string header, FileHeader(name, size, st.st_mtime));
  NIBBLE_RETURN_IF_ERROR(sink.Append(header.data(), header.size()));
  uint64_t left = size;
  while (left > 0) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(left, buffer.size()));
    NIBBLE_ASSIGN_OR_RETURN(size_t got, ReadUpTo(fd.get(), buffer.data(), want, path));
    if (got == 0) {
      return absl::AbortedError(absl::StrCat(path, ": changed size while being packed"));
    }
    NIBBLE_RETURN_IF_ERROR(sink.Append(buffer.data(), got));
    left -= got;
  }
  char extra = 0;
  NIBBLE_ASSIGN_OR_RETURN(size_t more, ReadUpTo(fd.get(), &extra, 1, path));
  if (more != 0) return absl::AbortedError(absl::StrCat(path, ": changed size while being packed"));
  const size_t pad = static_cast<size_t>((kBlock - size % kBlock) % kBlock);
  static const char kZeros[kBlock] = {};
  return sink.Append(kZeros, pad);
}

bool IsInside(const fs::path& child, const fs::path& parent) {
  std::error_code ec;
  const fs::path c = fs::weakly_canonical(child, ec);
  if (ec) return false;
  const fs::path p = fs::weakly_canonical(parent, ec);
  if (ec) return false;
  auto [pe, ce] = std::mismatch(p.begin(), p.end(), c.begin(), c.end());
  // A trailing empty element ("dir/") in the parent counts as matched.
  return pe == p.end() || (std::next(pe) == p.end() && pe->empty());
}

// ---------------------------------------------------------------------------------------
// Unpacking.

// Streams the decompressed bytes of a file of one or more concatenated gzip members.
class GzipReader {
 public:
  explicit GzipReader(std::string path) : path_(std::move(path)), in_(kIoBytes) {}
  ~GzipReader() {
    if (initialized_) inflateEnd(&s_);
  }

  absl::Status Open() {
    fd_.reset(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd_.get() < 0) {
      return absl::NotFoundError(absl::StrCat(path_, ": cannot open: ", Errno(errno)));
    }
    if (inflateInit2(&s_, 31) != Z_OK) return absl::InternalError("zlib: inflateInit2 failed");
    initialized_ = true;
    return absl::OkStatus();
  }

  // Reads up to `n` bytes; fewer only at the end of the last member.
  absl::StatusOr<size_t> Read(char* dst, size_t n) {
    size_t got = 0;
    while (got < n && !finished_) {
      if (member_ended_) {
        NIBBLE_RETURN_IF_ERROR(Refill());
        if (s_.avail_in == 0) {
          finished_ = true;
          break;
        }
        inflateReset(&s_);
        member_ended_ = false;
      }
      if (s_.avail_in == 0) {
        NIBBLE_RETURN_IF_ERROR(Refill());
        if (s_.avail_in == 0) {
          return absl::InvalidArgumentError(absl::StrCat(
              path_, ": truncated archive: the compressed stream ends in the middle of a "
                     "gzip member"));
        }
      }
      s_.next_out = reinterpret_cast<Bytef*>(dst + got);
      s_.avail_out = static_cast<uInt>(std::min<size_t>(n - got, 1u << 30));
      const uInt before = s_.avail_out;
      const int rc = inflate(&s_, Z_NO_FLUSH);
      got += before - s_.avail_out;
      if (rc == Z_STREAM_END) {
        member_ended_ = true;
        ++members_;
      } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
        return absl::InvalidArgumentError(absl::StrCat(
            path_, ": corrupt gzip data in member ", members_ + 1, ": ",
            s_.msg != nullptr ? s_.msg : "zlib error " + std::to_string(rc)));
      }
    }
    total_ += got;
    return got;
  }

  int64_t members() const { return members_; }
  uint64_t total() const { return total_; }

 private:
  absl::Status Refill() {
    if (s_.avail_in > 0 || eof_) return absl::OkStatus();
    NIBBLE_ASSIGN_OR_RETURN(size_t got, ReadUpTo(fd_.get(), in_.data(), in_.size(), path_));
    if (got == 0) eof_ = true;
    s_.next_in = reinterpret_cast<Bytef*>(in_.data());
    s_.avail_in = static_cast<uInt>(got);
    return absl::OkStatus();
  }

  std::string path_;
  Fd fd_;
  std::vector<char> in_;
  z_stream s_{};
  bool initialized_ = false;
  bool eof_ = false;
  bool member_ended_ = false;
  bool finished_ = false;
  int64_t members_ = 0;
  uint64_t total_ = 0;
};

// Checks an archive path: relative, no empty, "." or ".." components (a leading "./" and a
// trailing "/" are dropped). Returns the normalized path, or why it is refused.
absl::StatusOr<std::string> NormalizeEntryPath(std::string name) {
  if (name.empty()) return absl::InvalidArgumentError("empty name");
  if (name[0] == '/') return absl::InvalidArgumentError("absolute path");
  while (name.size() >= 2 && name[0] == '.' && name[1] == '/') {
    name.erase(0, 2);
    while (!name.empty() && name[0] == '/') name.erase(0, 1);
  }
  while (!name.empty() && name.back() == '/') name.pop_back();
  if (name.empty() || name == ".") return std::string();  // the archive's root
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('/', start);
    if (end == std::string::npos) end = name.size();
    const std::string_view part(name.data() + start, end - start);
    if (part == "..") return absl::InvalidArgumentError("'..' component leaves the directory");
    if (part.empty() || part == ".") {
      return absl::InvalidArgumentError("empty or '.' component");
    }
    start = end + 1;
  }
  return name;
}

std::string TypeName(char type) {
  switch (type) {
    case '1': return "a hard link";
    case '2': return "a symbolic link";
    case '3': return "a character device";
    case '4': return "a block device";
    case '6': return "a FIFO";
    case '7': return "a contiguous file";
    case 'x': return "a pax extended header";
    case 'g': return "a pax global header";
    case 'L': return "a GNU long name";
    case 'K': return "a GNU long link name";
    default: return absl::StrCat("an entry of type '", std::string(1, type), "'");
  }
}

bool AllZero(const char* block, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (block[i] != 0) return false;
  }
  return true;
}

class Unpacker {
 public:
  Unpacker(std::string archive, const engine::StagingDirectory& staging)
      : archive_(std::move(archive)), staging_(staging), reader_(archive_), buffer_(kIoBytes) {}

  absl::Status Run() {
    NIBBLE_RETURN_IF_ERROR(reader_.Open());
    char block[kBlock];
    for (;;) {
      NIBBLE_ASSIGN_OR_RETURN(size_t got, Read(block, kBlock));
      if (got < kBlock) {
        return Refuse(absl::StrCat("truncated archive: ends ", Where(),
                                   " without the end-of-archive marker"));
      }
      if (AllZero(block, kBlock)) return FinishEnd();
      NIBBLE_RETURN_IF_ERROR(Entry(block));
      in_data_ = false;
    }
  }

  int64_t files() const { return files_; }
  const GzipReader& reader() const { return reader_; }

 private:
  absl::Status Refuse(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(archive_, ": refused: ", what));
  }
  absl::Status RefuseEntry(const std::string& entry, const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(archive_, ": refused entry '", entry, "': ", what));
  }
  std::string Where() const {
    if (last_.empty()) return "before the first entry";
    return absl::StrCat(in_data_ ? "in entry '" : "after entry '", last_, "'");
  }

  // The decompressed stream; its errors (corrupt or truncated gzip) say where in the tar.
  absl::StatusOr<size_t> Read(char* dst, size_t n) {
    absl::StatusOr<size_t> got = reader_.Read(dst, n);
    if (!got.ok()) {
      return absl::Status(got.status().code(),
                          absl::StrCat(S(got.status().message()), " (", Where(), ")"));
    }
    return got;
  }

  // The end marker is two zero blocks; whatever follows (tar's record padding) must be zeros.
  absl::Status FinishEnd() {
    char block[kBlock];
    NIBBLE_ASSIGN_OR_RETURN(size_t got, Read(block, kBlock));
    if (got < kBlock) {
      return Refuse(absl::StrCat("truncated archive: ends ", Where(),
                                 " in the end-of-archive marker"));
    }
    if (!AllZero(block, kBlock)) {
      return Refuse(absl::StrCat("a zero block ", Where(), " is not followed by another"));
    }
    for (;;) {
      NIBBLE_ASSIGN_OR_RETURN(size_t n, Read(buffer_.data(), buffer_.size()));
      if (!AllZero(buffer_.data(), n)) {
        return Refuse("data after the end-of-archive marker");
      }
      if (n < buffer_.size()) break;
    }
    if (!manifest_) return Refuse(absl::StrCat("no ", kManifestFileName, " in the archive"));
    return absl::OkStatus();
  }

  absl::Status Entry(const char* h) {
    std::string raw_name = Field(h + 0, 100);
    const std::string magic(h + 257, 6);
    if (std::memcmp(h + 257, "ustar\0", 6) == 0) {  // POSIX: the prefix is part of the name
      const std::string prefix = Field(h + 345, 155);
      if (!prefix.empty()) raw_name = absl::StrCat(prefix, "/", raw_name);
    } else if (std::memcmp(h + 257, "ustar ", 6) != 0) {  // GNU "ustar  \0"
      return Refuse(absl::StrCat("the header ", Where(), " is not a ustar header"));
    }
    const std::string shown = raw_name.empty() ? "(empty name)" : raw_name;
    uint64_t usum = 0;
    int64_t ssum = 0;
    HeaderSums(h, &usum, &ssum);
    const std::optional<uint64_t> chksum = ParseNumber(h + 148, 8);
    if (!chksum || (*chksum != usum && static_cast<int64_t>(*chksum) != ssum)) {
      return RefuseEntry(shown, absl::StrCat("bad header checksum (", Where(), ")"));
    }
    const std::optional<uint64_t> size = ParseNumber(h + 124, 12);
    if (!size) return RefuseEntry(shown, "malformed size field");
    const char type = h[156];
    const bool regular = type == '0' || type == '\0';
    const bool directory = type == '5';
    if (!regular && !directory) {
      return RefuseEntry(shown, absl::StrCat(TypeName(type),
                                             "; an artifact holds only regular files and "
                                             "directories"));
    }
    auto normalized = NormalizeEntryPath(raw_name);
    if (!normalized.ok()) return RefuseEntry(shown, S(normalized.status().message()));
    const std::string& name = *normalized;
    if (!seen_.insert(name).second) return RefuseEntry(shown, "duplicate entry");
    last_ = shown;
    in_data_ = true;
    if (directory) {
      if (!name.empty()) {
        std::error_code ec;
        fs::create_directories(fs::path(staging_.path()) / name, ec);
        if (ec) return RefuseEntry(shown, absl::StrCat("cannot create directory: ", ec.message()));
      }
      return Skip(*size, shown);
    }
    if (name.empty()) return RefuseEntry(shown, "a regular file without a name");
    if (!manifest_) {
      if (name != kManifestFileName) {
        return RefuseEntry(shown, absl::StrCat("the first file must be ", kManifestFileName,
                                               " (not an artifact packed by nibble?)"));
      }
      if (*size > kMaxManifestBytes) return RefuseEntry(shown, "manifest larger than 64 MiB");
      NIBBLE_RETURN_IF_ERROR(Extract(name, *size, shown));
      auto manifest = ReadManifest(staging_.path());
      if (!manifest.ok()) {
        return RefuseEntry(shown, absl::StrCat("bad manifest: ", S(manifest.status().message())));
      }
      manifest_ = std::move(manifest).value();
      return absl::OkStatus();
    }
    auto it = manifest_->files.find(name);
    if (it == manifest_->files.end()) return RefuseEntry(shown, "not listed in the manifest");
    if (it->second.size != *size) {
      return RefuseEntry(shown, absl::StrCat("size ", *size, " bytes, the manifest says ",
                                             it->second.size));
    }
    return Extract(name, *size, shown);
  }

  // Reads `size` bytes of entry data plus the padding to the next block.
  absl::Status Skip(uint64_t size, const std::string& shown) {
    uint64_t left = size + (kBlock - size % kBlock) % kBlock;
    while (left > 0) {
      const size_t want = static_cast<size_t>(std::min<uint64_t>(left, buffer_.size()));
      NIBBLE_ASSIGN_OR_RETURN(size_t got, Read(buffer_.data(), want));
      if (got < want) return RefuseEntry(shown, "truncated archive: the entry's data ends early");
      left -= got;
    }
    return absl::OkStatus();
  }

  absl::Status Extract(const std::string& name, uint64_t size, const std::string& shown) {
    const fs::path path = fs::path(staging_.path()) / name;
    std::error_code ec;
    fs::create_directories(path.parent_path(), ec);
    if (ec) {
      return RefuseEntry(shown, absl::StrCat("cannot create its directory: ", ec.message()));
    }
    Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (fd.get() < 0) {
      return RefuseEntry(shown, absl::StrCat("cannot create: ", Errno(errno)));
    }
    uint64_t left = size;
    while (left > 0) {
      const size_t want = static_cast<size_t>(std::min<uint64_t>(left, buffer_.size()));
      NIBBLE_ASSIGN_OR_RETURN(size_t got, Read(buffer_.data(), want));
      if (got < want) return RefuseEntry(shown, "truncated archive: the file's data ends early");
      NIBBLE_RETURN_IF_ERROR(WriteAll(fd.get(), buffer_.data(), got, path.string()));
      left -= got;
    }
    if (::fsync(fd.get()) != 0) {
      return absl::InternalError(absl::StrCat(path.string(), ": fsync failed: ", Errno(errno)));
    }
    if (::close(fd.release()) != 0) {
      return absl::InternalError(absl::StrCat(path.string(), ": close failed: ", Errno(errno)));
    }
    ++files_;
    return SkipPadding(size, shown);
  }

  absl::Status SkipPadding(uint64_t size, const std::string& shown) {
    const size_t pad = static_cast<size_t>((kBlock - size % kBlock) % kBlock);
    if (pad == 0) return absl::OkStatus();
    NIBBLE_ASSIGN_OR_RETURN(size_t got, Read(buffer_.data(), pad));
    if (got < pad) return RefuseEntry(shown, "truncated archive: the file's padding ends early");
    return absl::OkStatus();
  }

  const std::string archive_;
  const engine::StagingDirectory& staging_;
  GzipReader reader_;
  std::vector<char> buffer_;
  std::optional<ArtifactManifest> manifest_;
  std::set<std::string> seen_;
  std::string last_;  // the latest entry's name
  bool in_data_ = false;  // reading its data (else: between entries)
  int64_t files_ = 0;
};

}  // namespace

absl::StatusOr<PackReport> PackArtifact(const std::string& dir, const std::string& out,
                                        const PackOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.level < 1 || options.level > 9) {
    return absl::InvalidArgumentError(absl::StrCat("compression level ", options.level,
                                                   ": must be 1 to 9"));
  }
  if (options.chunk_bytes == 0 || options.chunk_bytes > (uint64_t{1} << 30)) {
    return absl::InvalidArgumentError("chunk size must be 1 byte to 1 GiB");
  }
  NIBBLE_RETURN_IF_ERROR(VerifyArtifact(dir));
  NIBBLE_ASSIGN_OR_RETURN(ArtifactManifest manifest, ReadManifest(dir));
  if (IsInside(fs::path(out), fs::path(dir))) {
    return absl::InvalidArgumentError(
        absl::StrCat(out, ": the archive may not be written inside the artifact ", dir));
  }
  int threads = options.threads;
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  // A temporary file beside `out`, renamed over it once complete and synced.
  fs::path out_path(out);
  const fs::path parent = out_path.parent_path().empty() ? fs::path(".") : out_path.parent_path();
  // O_EXCL with a name unique to this process and call; the mode is 0666 minus the umask,
  // as for any file (mkstemp's 0600 would need a process-wide umask change to widen).
  static std::atomic<uint64_t> counter{0};
  std::string tmp;
  Fd fd;
  for (int attempt = 0; attempt < 100 && fd.get() < 0; ++attempt) {
    tmp = (parent / absl::StrCat(".", out_path.filename().string(), ".tmp-", getpid(), "-",
                                 counter.fetch_add(1)))
              .string();
    fd.reset(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
    if (fd.get() < 0 && errno != EEXIST) break;
  }
  if (fd.get() < 0) {
    return absl::PermissionDeniedError(
        absl::StrCat(out, ": cannot create a temporary file beside it: ", Errno(errno)));
  }
  struct TmpGuard {
    std::string path;
    bool keep = false;
    ~TmpGuard() {
      if (!keep) ::unlink(path.c_str());
    }
  } guard{tmp};

  PackReport report;
  report.threads = threads;
  {
    ParallelGzipWriter writer(fd.get(), tmp, threads, options.level);
    ChunkedSink sink(&writer, options.chunk_bytes);
    std::vector<char> buffer(kIoBytes);
    NIBBLE_RETURN_IF_ERROR(AppendFile(sink, dir, kManifestFileName, buffer));
    report.files = 1;
    for (const auto& [name, file] : manifest.files) {
      NIBBLE_RETURN_IF_ERROR(AppendFile(sink, dir, name, buffer));
      ++report.files;
    }
    static const char kEnd[2 * kBlock] = {};
    NIBBLE_RETURN_IF_ERROR(sink.Append(kEnd, sizeof(kEnd)));
    NIBBLE_RETURN_IF_ERROR(sink.Flush());
    NIBBLE_RETURN_IF_ERROR(writer.Finish());
    report.tar_bytes = sink.total();
    report.gz_bytes = writer.bytes_written();
    report.members = writer.members();
  }
  if (::fsync(fd.get()) != 0) {
    return absl::InternalError(absl::StrCat(tmp, ": fsync failed: ", Errno(errno)));
  }
  if (::close(fd.release()) != 0) {
    return absl::InternalError(absl::StrCat(tmp, ": close failed: ", Errno(errno)));
  }
  if (::rename(tmp.c_str(), out.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot rename ", tmp, " to ", out, ": ",
                                            Errno(errno)));
  }
  guard.keep = true;
  Fd dir_fd(::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.get() >= 0) ::fsync(dir_fd.get());
  report.seconds = SecondsSince(start);
  return report;
}

absl::StatusOr<UnpackReport> UnpackArtifact(const std::string& archive, const std::string& dir) {
  const auto start = std::chrono::steady_clock::now();
  {
    std::error_code ec;
    if (!fs::is_regular_file(archive, ec)) {
      return absl::NotFoundError(absl::StrCat(archive, ": not a regular file"));
    }
  }
  NIBBLE_ASSIGN_OR_RETURN(engine::StagingDirectory staging, engine::StagingDirectory::Create(dir));
  Unpacker unpacker(archive, staging);
  NIBBLE_RETURN_IF_ERROR(unpacker.Run());
  absl::Status verified = VerifyArtifact(staging.path());
  if (!verified.ok()) {
    return absl::Status(verified.code(),
                        absl::StrCat(archive, ": refused: ", S(verified.message())));
  }
  NIBBLE_RETURN_IF_ERROR(staging.Commit());
  UnpackReport report;
  report.files = unpacker.files();
  report.tar_bytes = unpacker.reader().total();
  report.members = unpacker.reader().members();
  report.seconds = SecondsSince(start);
  return report;
}

}  // namespace nibble::quant
