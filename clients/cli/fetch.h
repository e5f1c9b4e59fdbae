// Downloading model files over HTTP(S) (or file://) with libcurl, verified by sha256.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/sha256.h"

namespace nibble::cli {

// Lower-case hex sha256 of a file; errors name the path (engine/sha256.h).
using engine::Sha256OfFile;

// Fetches `url` to `dest`: into a temporary file beside it, checks its sha256 against
// `expected_sha256` (lower-case hex; empty skips the check), then renames it into place.
// `dest` is never left half-written. A plain path (no "scheme://") is copied the same way.
absl::Status DownloadFile(const std::string& url, const std::string& dest,
                          std::string_view expected_sha256);

struct KnownFile {
  std::string name;
  std::string sha256;
};

struct KnownModel {
  std::string name;
  std::string default_source;  // a URL prefix; "<source>/<file name>" is fetched
  std::vector<KnownFile> files;
};

// Models `nibble fetch` knows by name (their public addresses and pinned checksums).
const std::vector<KnownModel>& KnownModels();

}  // namespace nibble::cli
