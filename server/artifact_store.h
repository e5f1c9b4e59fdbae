// The artifacts of a daemon: `<state_dir>/artifacts/<name>/`, each a directory whose files
// match its nibble_manifest.json (quant::VerifyArtifact). Anything being written (a pull, an
// upload) lives under `<state_dir>/transfers/<name>/` and is moved in with one rename(2) when
// complete and verified, so a directory under artifacts/ is either whole or was damaged
// afterwards — and a damaged one is reported INVALID, never served or loaded.
//
// Verification hashes every file, so its result is kept per artifact with a signature of the
// directory (each entry's path, type, size, modification time and inode); any change to the
// directory makes the next look-up verify again.
//
// Thread safety: every member may be called from any thread.
#pragma once

#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nibble/v1/artifacts.pb.h"
#include "quant/manifest.h"

namespace nibble::server {

// An artifact as found on disk.
struct StoredArtifact {
  std::string name;
  std::filesystem::path dir;
  // OK: every file matches the manifest. Otherwise why not (DataLoss, or ReadManifest's
  // errors); `manifest` and `manifest_json` are then filled only when the manifest parsed.
  absl::Status status;
  quant::ArtifactManifest manifest;
  std::string manifest_json;  // the manifest file's bytes
};

// The manifest as the wire describes it (files, quantization, report); not manifest_json.
void DescribeManifest(const quant::ArtifactManifest& manifest, nibble::v1::ArtifactInfo* info);

class ArtifactStore {
 public:
  // Uses `<state_dir>/artifacts/` and `<state_dir>/transfers/`; Open creates them.
  explicit ArtifactStore(std::filesystem::path state_dir);

  // Creates the directories; error naming the one that cannot be made. Transfers left over by
  // a daemon that stopped midway stay: a pull resumes from them, an upload starts afresh.
  absl::Status Open();

  const std::filesystem::path& artifacts_dir() const { return artifacts_dir_; }
  const std::filesystem::path& transfers_dir() const { return transfers_dir_; }

  // Every directory under artifacts/, sorted by name, verified (or with why not).
  std::vector<StoredArtifact> List();

  // One artifact. InvalidArgument for a bad name, NotFound when absent; a present one that
  // fails verification comes back with its status set (callers decide: Stat refuses it).
  absl::StatusOr<StoredArtifact> Find(std::string_view name);

  // A verified artifact's directory: Find, then its status. What Load and Download use.
  absl::StatusOr<StoredArtifact> FindVerified(std::string_view name);

  // The file `relative` of a verified artifact: it must be a path the manifest lists
  // (InvalidArgument for an absolute path or one with "..", NotFound otherwise), confined
  // to the artifact's directory (no link out).
  absl::StatusOr<std::filesystem::path> FilePath(const StoredArtifact& artifact,
                                                 const std::string& relative);

  // Reserves `name` for a transfer into transfers/<name>/ until the lease is destroyed.
  // AlreadyExists when an artifact of that name exists; Aborted when another transfer of it
  // is running.
  class TransferLease {
   public:
    TransferLease(TransferLease&& other) noexcept : store_(other.store_), name_(std::move(other.name_)) {
      other.store_ = nullptr;
    }
    TransferLease& operator=(TransferLease&&) = delete;
    ~TransferLease();
    const std::string& name() const { return name_; }

   private:
    friend class ArtifactStore;
    TransferLease(ArtifactStore* store, std::string name) : store_(store), name_(std::move(name)) {}
    ArtifactStore* store_;
    std::string name_;
  };
  absl::StatusOr<TransferLease> BeginTransfer(std::string_view name);

  std::filesystem::path TransferDir(const TransferLease& lease) const {
    return transfers_dir_ / lease.name();
  }
  // Verifies transfers/<name>/ and renames it to artifacts/<name>/ (one rename, then an fsync
  // of artifacts/). On a verification failure the transfer directory is left as it is (the
  // caller decides whether to keep it for a resumed pull).
  absl::Status Commit(const TransferLease& lease);

 private:
  struct Verified {
    std::string signature;
    StoredArtifact artifact;
  };
  absl::StatusOr<StoredArtifact> Load(const std::string& name);

  std::filesystem::path artifacts_dir_;
  std::filesystem::path transfers_dir_;
  std::mutex mu_;
  std::map<std::string, Verified> cache_;  // guarded by mu_
  std::set<std::string> transfers_;        // guarded by mu_: names being written
};

}  // namespace nibble::server
