// One compressed tar for carrying an artifact to an edge device: `nibble pack` and
// `nibble unpack`, replacing `tar | pigz` and a hand copy.
//
// The archive is a POSIX ustar stream (regular files only, mode 0644, relative '/'-separated
// names, `nibble_manifest.json` first so an unpacker can read it before any other byte)
// compressed as a sequence of independent gzip members, one per chunk of the tar stream,
// deflated in parallel on every core. Concatenated gzip members are one valid gzip file, so
// plain `tar xzf` and `gzip -d` read it.
//
// Unpacking trusts nothing in the archive: it refuses absolute paths, `..` components,
// anything but regular files and directories (symbolic and hard links, devices, FIFOs, pax
// and GNU extension headers), duplicate entries, files the manifest does not list or with
// another size, bad header checksums, corrupt or truncated compressed data and truncated tar
// streams, each error naming the entry. It extracts into a staging directory beside the
// destination, checks every sha256 against the manifest (VerifyArtifact), and only then
// renames it into place: the destination appears complete and verified, or not at all.
//
// Thread safety: the functions may be called from any thread; PackArtifact runs its own
// worker threads. Concurrent unpacks into the same destination are not supported.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace nibble::quant {

struct PackOptions {
  // Bytes of tar stream per gzip member (each compressed independently). Larger chunks
  // compress slightly better; smaller ones spread better over threads.
  uint64_t chunk_bytes = uint64_t{1} << 20;
  // Compression threads; 0 = std::thread::hardware_concurrency().
  int threads = 0;
  // zlib level, 1 (fastest) to 9 (smallest); 6 is gzip's and pigz's default.
  int level = 6;
};

struct PackReport {
  int64_t files = 0;       // entries in the tar, the manifest included
  uint64_t tar_bytes = 0;  // uncompressed tar stream
  uint64_t gz_bytes = 0;   // the written archive
  int64_t members = 0;     // gzip members (chunks)
  int threads = 0;         // compression threads used
  double seconds = 0;
};

// Packs the artifact directory `dir` (VerifyArtifact must pass: every file listed in its
// manifest with the right sha256, nothing else) into `out`, written atomically (temporary
// name beside it, fsync, rename). Errors: VerifyArtifact's, `out` inside `dir`, a file
// changing size while packed, a name too long for ustar (over 255 bytes, or not splittable
// at a '/'), I/O errors naming the path.
absl::StatusOr<PackReport> PackArtifact(const std::string& dir, const std::string& out,
                                        const PackOptions& options = {});

struct UnpackReport {
  int64_t files = 0;       // regular files extracted, the manifest included
  uint64_t tar_bytes = 0;  // uncompressed tar stream read
  int64_t members = 0;     // gzip members read
  double seconds = 0;
};

// Unpacks `archive` (as written by PackArtifact, or any gzip'd ustar/GNU tar of an artifact
// whose first regular file is `nibble_manifest.json`) into `dir`, which must not exist or be
// empty. Errors (InvalidArgument for a refused archive, DataLoss for a checksum mismatch)
// name the archive and the entry; on any error `dir` is left as it was and the staging
// directory is removed.
absl::StatusOr<UnpackReport> UnpackArtifact(const std::string& archive, const std::string& dir);

}  // namespace nibble::quant
