#include "server/artifacts_service.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <system_error>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/atomic_file.h"
#include "server/grpc_status.h"
#include "server/raw_messages.h"
#include "server/unary_call.h"

namespace nibble::server {
namespace fs = std::filesystem;
namespace {

constexpr uint32_t kMaxChunkBytes = 1 << 20;
constexpr uint32_t kMinChunkBytes = 1 << 10;

grpc::Status Grpc(const absl::Status& status) { return ToGrpcStatus(status); }

template <class Reactor>
class Refused final : public Reactor {
 public:
  explicit Refused(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

void Describe(const StoredArtifact& artifact, bool with_manifest, nibble::v1::ArtifactInfo* info) {
  info->set_name(artifact.name);
  info->set_state(artifact.status.ok() ? nibble::v1::ARTIFACT_STATE_PRESENT
                                       : nibble::v1::ARTIFACT_STATE_INVALID);
  if (!artifact.status.ok()) info->set_problem(std::string(artifact.status.message()));
  DescribeManifest(artifact.manifest, info);
  if (with_manifest) info->set_manifest_json(artifact.manifest_json);
}

// One file from an offset to its end, one chunk at a time.
class DownloadStream final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  // Takes over a counted call and the open file `fd`.
  DownloadStream(ServingState& state, const ServerMetrics* metrics, int fd, std::string path,
                 uint64_t offset, uint64_t size, uint32_t chunk_bytes)
      : state_(state),
        metrics_(metrics),
        fd_(fd),
        path_(std::move(path)),
        offset_(offset),
        size_(size),
        chunk_bytes_(chunk_bytes) {
    Next();
  }

 private:
  ~DownloadStream() override {
    ::close(fd_);
    state_.CallDone();
  }

  void Next() {
    if (offset_ >= size_) {
      Finish(grpc::Status::OK);
      return;
    }
    const size_t want = static_cast<size_t>(std::min<uint64_t>(chunk_bytes_, size_ - offset_));
    std::string data(want, '\0');
    size_t got = 0;
    while (got < want) {
      const ssize_t n = ::pread(fd_, data.data() + got, want - got, static_cast<off_t>(offset_ + got));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    if (got < want) {
      // The file shrank or broke after it was verified.
      Fail(grpc::Status(grpc::StatusCode::DATA_LOSS,
                        absl::StrCat("file \"", path_, "\" could not be read at offset ",
                                     offset_ + got, " (changed on the server?)")));
      return;
    }
    nibble::v1::DownloadChunk chunk;
    chunk.set_path(path_);
    chunk.set_offset(offset_);
    chunk.set_data(std::move(data));
    SerializeResponse(chunk, &buffer_);
    in_flight_ = want;
    StartWrite(&buffer_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Fail(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return;
    }
    if (metrics_ != nullptr) metrics_->AddTransferBytes("sent", in_flight_);
    offset_ += in_flight_;
    Next();
  }

  void Fail(const grpc::Status& status) {
    if (metrics_ != nullptr) metrics_->CountTransferFailure("sent");
    Finish(status);
  }

  void OnDone() override { delete this; }

  ServingState& state_;
  const ServerMetrics* const metrics_;
  const int fd_;
  const std::string path_;
  uint64_t offset_;
  const uint64_t size_;
  const uint32_t chunk_bytes_;
  uint64_t in_flight_ = 0;
  grpc::ByteBuffer buffer_;
};

// A new artifact, written into transfers/<name>/ as it arrives.
class UploadStream final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  UploadStream(ArtifactStore& store, const ServerMetrics* metrics, ServingState& state,
               int64_t max_upload_bytes, grpc::ByteBuffer* response)
      : store_(store),
        metrics_(metrics),
        state_(state),
        max_upload_bytes_(max_upload_bytes),
        response_(response) {
    StartRead(&buffer_);
  }

 private:
  ~UploadStream() override {
    CloseFile();
    state_.CallDone();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The client closed its side (or went away: then Finish reaches nobody).
      Complete();
      return;
    }
    nibble::v1::UploadRequest message;
    grpc::Status status = ParseRequest(buffer_, &message);
    if (status.ok()) status = header_seen_ ? OnChunk(message) : OnHeader(message);
    if (!status.ok()) {
      Fail(status);
      return;
    }
    StartRead(&buffer_);
  }

  grpc::Status OnHeader(const nibble::v1::UploadRequest& message) {
    if (!message.has_header()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "the first message of an upload must be its header (artifact name "
                          "and manifest)");
    }
    header_seen_ = true;
    auto lease = store_.BeginTransfer(message.header().artifact());
    if (!lease.ok()) return Grpc(lease.status());
    lease_.emplace(*std::move(lease));
    dir_ = store_.TransferDir(*lease_);
    std::error_code ec;
    fs::remove_all(dir_, ec);  // an earlier upload that broke off: uploads start afresh
    fs::create_directories(dir_, ec);
    if (ec) {
      return grpc::Status(grpc::StatusCode::INTERNAL,
                          absl::StrCat("cannot create the transfer directory: ", ec.message()));
    }
    if (message.header().manifest_json().empty()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "field header.manifest_json is empty");
    }
    if (absl::Status s = engine::WriteFileAtomically(
            (dir_ / quant::kManifestFileName).string(), message.header().manifest_json());
        !s.ok()) {
      return Grpc(s);
    }
    auto manifest = quant::ReadManifest(dir_.string());
    if (!manifest.ok()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("field header.manifest_json: ", manifest.status().message()));
    }
    manifest_ = *std::move(manifest);
    uint64_t total = 0;
    for (const auto& [path, file] : manifest_.files) total += file.size;
    if (total > static_cast<uint64_t>(max_upload_bytes_)) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          absl::StrCat("the artifact's files hold ", total,
                                       " bytes, more than this daemon accepts in an upload "
                                       "(artifacts.max_upload_bytes ", max_upload_bytes_, ")"));
    }
    return grpc::Status::OK;
  }

  grpc::Status OnChunk(const nibble::v1::UploadRequest& message) {
    if (!message.has_chunk()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "only the first message of an upload is a header; send chunks");
    }
    const nibble::v1::UploadChunk& chunk = message.chunk();
    auto listed = manifest_.files.find(chunk.path());
    if (listed == manifest_.files.end()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("chunk.path \"", chunk.path().substr(0, 256),
                                       "\" is not a file of the manifest"));
    }
    uint64_t& written = written_[chunk.path()];
    if (chunk.offset() != written) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("chunk.offset ", chunk.offset(), " of \"", chunk.path(),
                                       "\": expected ", written, " (chunks come in order)"));
    }
    if (chunk.data().size() > listed->second.size - written) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("chunk of \"", chunk.path(), "\" runs past its size in "
                                       "the manifest (", listed->second.size, " bytes)"));
    }
    total_ += chunk.data().size();
    if (total_ > static_cast<uint64_t>(max_upload_bytes_)) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          absl::StrCat("the upload passed artifacts.max_upload_bytes (",
                                       max_upload_bytes_, ")"));
    }
    if (chunk.path() != open_path_) {
      CloseFile();
      const fs::path local = dir_ / chunk.path();
      std::error_code ec;
      fs::create_directories(local.parent_path(), ec);
      fd_ = ::open(local.c_str(), O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
      if (fd_ < 0) {
        return grpc::Status(grpc::StatusCode::INTERNAL,
                            absl::StrCat("cannot write \"", chunk.path(), "\": ", std::strerror(errno)));
      }
      open_path_ = chunk.path();
    }
    const std::string& data = chunk.data();
    for (size_t done = 0; done < data.size();) {
      const ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done,
                                 static_cast<off_t>(written + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        return grpc::Status(grpc::StatusCode::INTERNAL,
                            absl::StrCat("cannot write \"", chunk.path(), "\": ", std::strerror(errno)));
      }
      done += static_cast<size_t>(n);
    }
    written += data.size();
    if (metrics_ != nullptr) metrics_->AddTransferBytes("received", data.size());
    return grpc::Status::OK;
  }

  void CloseFile() {
    if (fd_ >= 0) {
      ::fsync(fd_);
      ::close(fd_);
    }
    fd_ = -1;
    open_path_.clear();
  }

  // The client is done sending: check, verify, move into place (off the callback thread).
  void Complete() {
    if (!header_seen_) {
      Fail(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the upload sent no header"));
      return;
    }
    for (const auto& [path, file] : manifest_.files) {
      const uint64_t got = written_.count(path) ? written_[path] : 0;
      if (got != file.size) {
        Fail(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("the upload ended with \"", path, "\" at ", got, " of ",
                                       file.size, " bytes")));
        return;
      }
    }
    CloseFile();
    std::thread([this] {
      absl::Status status = store_.Commit(*lease_);
      if (!status.ok()) {
        Fail(Grpc(status));
        return;
      }
      auto artifact = store_.FindVerified(lease_->name());
      if (!artifact.ok()) {
        Fail(Grpc(artifact.status()));
        return;
      }
      nibble::v1::ArtifactInfo info;
      Describe(*artifact, /*with_manifest=*/false, &info);
      SerializeResponse(info, response_);
      Finish(grpc::Status::OK);
    }).detach();
  }

  // Nothing of a failed upload stays.
  void Fail(const grpc::Status& status) {
    CloseFile();
    if (lease_) {
      std::error_code ec;
      fs::remove_all(dir_, ec);
    }
    if (metrics_ != nullptr) metrics_->CountTransferFailure("received");
    Finish(status);
  }

  void OnDone() override { delete this; }

  ArtifactStore& store_;
  const ServerMetrics* const metrics_;
  ServingState& state_;
  const int64_t max_upload_bytes_;
  grpc::ByteBuffer* const response_;
  grpc::ByteBuffer buffer_;
  bool header_seen_ = false;
  std::optional<ArtifactStore::TransferLease> lease_;
  fs::path dir_;
  quant::ArtifactManifest manifest_;
  std::map<std::string, uint64_t> written_;
  uint64_t total_ = 0;
  int fd_ = -1;
  std::string open_path_;
};

}  // namespace

grpc::ServerUnaryReactor* ArtifactsService::List(grpc::CallbackServerContext* context,
                                                 const grpc::ByteBuffer* request,
                                                 grpc::ByteBuffer* response) {
  UnaryCall<nibble::v1::ListArtifactsRequest> call(context, state_, request);
  if (call.ok()) {
    nibble::v1::ListArtifactsResponse out;
    for (const StoredArtifact& artifact : store_.List()) {
      Describe(artifact, /*with_manifest=*/false, out.add_artifacts());
    }
    SerializeResponse(out, response);
  }
  return call.Finish();
}

grpc::ServerUnaryReactor* ArtifactsService::Stat(grpc::CallbackServerContext* context,
                                                 const grpc::ByteBuffer* request,
                                                 grpc::ByteBuffer* response) {
  UnaryCall<nibble::v1::StatArtifactRequest> call(context, state_, request);
  if (call.ok()) {
    auto artifact = store_.FindVerified(call.wire().name());
    if (artifact.ok()) {
      nibble::v1::ArtifactInfo info;
      Describe(*artifact, /*with_manifest=*/true, &info);
      SerializeResponse(info, response);
    } else {
      call.set_status(Grpc(artifact.status()));
    }
  }
  return call.Finish();
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* ArtifactsService::Download(
    grpc::CallbackServerContext* /*context*/, const grpc::ByteBuffer* request) {
  using Reactor = grpc::ServerWriteReactor<grpc::ByteBuffer>;
  CallGuard call(state_);
  if (!call.counted()) return new Refused<Reactor>(DrainingStatus());
  nibble::v1::DownloadRequest wire;
  if (grpc::Status s = ParseRequest(*request, &wire); !s.ok()) return new Refused<Reactor>(s);
  auto artifact = store_.FindVerified(wire.artifact());
  if (!artifact.ok()) return new Refused<Reactor>(Grpc(artifact.status()));
  auto path = store_.FilePath(*artifact, wire.path());
  if (!path.ok()) return new Refused<Reactor>(Grpc(path.status()));
  const uint64_t size = artifact->manifest.files.at(wire.path()).size;
  if (wire.offset() > size) {
    return new Refused<Reactor>(grpc::Status(
        grpc::StatusCode::OUT_OF_RANGE,
        absl::StrCat("offset ", wire.offset(), " is past the end of \"", wire.path(), "\" (",
                     size, " bytes)")));
  }
  uint32_t chunk = wire.max_chunk_bytes() == 0 ? kMaxChunkBytes : wire.max_chunk_bytes();
  chunk = std::clamp(chunk, kMinChunkBytes, kMaxChunkBytes);
  const int fd = ::open(path->c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    return new Refused<Reactor>(grpc::Status(
        grpc::StatusCode::DATA_LOSS,
        absl::StrCat("file \"", wire.path(), "\" cannot be opened: ", std::strerror(errno))));
  }
  call.Release();  // the stream ends the call
  return new DownloadStream(state_, metrics_, fd, wire.path(), wire.offset(), size, chunk);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* ArtifactsService::Upload(
    grpc::CallbackServerContext* /*context*/, grpc::ByteBuffer* response) {
  using Reactor = grpc::ServerReadReactor<grpc::ByteBuffer>;
  CallGuard call(state_);
  if (!call.counted()) return new Refused<Reactor>(DrainingStatus());
  call.Release();
  return new UploadStream(store_, metrics_, state_, max_upload_bytes_, response);
}

}  // namespace nibble::server
