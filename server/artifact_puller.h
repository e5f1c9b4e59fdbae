// Pulls an artifact from a nibbled (nibble.v1.Artifacts: Stat, then Download per file) into a
// local directory, resumably and verified. The client half of the Artifacts service: a daemon
// uses it for Models.Load {peer, artifact}, and `nibble artifacts pull` for a local copy, so
// it depends on proto/, rpc/, quant/ and engine/'s file helpers only (its own library,
// nibble_artifact_transfer), never on the daemon's internals.
//
// On disk, beside the destination `final_dir`:
//   `partial_dir/`                 the files as they arrive (each appended at its offset);
//   `partial_dir.manifest/`        the manifest the pull started from (nibble_manifest.json);
//   `partial_dir.lock`             held (flock) while a pull runs: one pull per destination.
// A broken pull (network, SIGKILL) leaves them; the next pull of the same artifact asks each
// file from the size already on disk, after checking that the source's manifest is still the
// same (else it starts over). Every file's size and sha256 is checked against the manifest,
// the manifest is written last, the directory is checked whole (quant::VerifyArtifact) and
// then renamed to `final_dir` in one rename(2): `final_dir` never holds a partial artifact.
//
// Thread safety: PullArtifact may run on any thread; concurrent pulls need distinct
// destinations (the lock file refuses a second pull of the same one).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "rpc/channel.h"

namespace nibble::server {

struct PullProgress {
  uint64_t bytes_done = 0;         // of all files, what is on disk now (resumed bytes included)
  uint64_t bytes_total = 0;        // the manifest's sizes summed
  uint64_t bytes_transferred = 0;  // received by this pull so far
  std::string file;                // the file being fetched
};

struct PullOptions {
  uint32_t chunk_bytes = 0;          // Download's max_chunk_bytes; 0: the server's (1 MiB)
  double max_bytes_per_second = 0;   // 0: no limit (an edge link may want one)
  double stat_timeout_seconds = 30;  // the Stat call's deadline
  // Called after every chunk written (on the pulling thread).
  std::function<void(const PullProgress&)> on_progress;
  // Called with the size of every chunk received (what a daemon counts in its metrics).
  std::function<void(uint64_t bytes)> on_bytes;
  // Asked after every chunk: true ends the pull (Cancelled), keeping what arrived for a
  // later pull to resume from (a daemon shutting down).
  std::function<bool()> should_stop;
};

struct PullResult {
  uint64_t bytes_total = 0;        // the artifact's files
  uint64_t bytes_resumed = 0;      // found on disk from an earlier, broken pull
  uint64_t bytes_transferred = 0;  // received by this pull
};

// Pulls `artifact` from the daemon at `channel` into `final_dir` (which must not exist),
// staging in `partial_dir` (see above). Errors: the source's (NOT_FOUND, DATA_LOSS,
// PERMISSION_DENIED... as "ADDRESS: CODE: message"), AlreadyExists (final_dir exists),
// FailedPrecondition (another pull holds the lock), DataLoss (a file whose sha256 differs
// from the manifest: it is deleted, so the next pull fetches it afresh; the source sent
// more than the manifest's size), the local file system's errors naming the path.
absl::StatusOr<PullResult> PullArtifact(const std::shared_ptr<grpc::Channel>& channel,
                                        const std::string& address,
                                        const rpc::ClientSecurity& security,
                                        const std::string& artifact,
                                        const std::string& partial_dir,
                                        const std::string& final_dir, const PullOptions& options);

}  // namespace nibble::server
