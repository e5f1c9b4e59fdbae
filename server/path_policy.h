// Path confinement for paths that arrive in requests (model directories to quantize, artifact
// names): a request may only name files under the roots the configuration allows.
//
// Thread safety: every function may be called from any thread; they read the file system
// (realpath) and keep no state.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace nibble::server {

// Resolves `requested` to a path under one of `roots`, following symbolic links the way the
// kernel will (std::filesystem::weakly_canonical: realpath of the longest existing prefix,
// the rest appended), so that a link pointing out of a root is caught before anything opens
// it. Callers should use the returned path, not `requested`.
//   - absolute `requested`: must resolve into one of the roots;
//   - relative `requested`: taken under each root in turn; the first root under which it
//     exists wins, else the path under the first root (it may be about to be created).
// Errors (each naming the requested path):
//   InvalidArgument  - empty, contains a NUL byte, or has a ".." component (refused even when
//                      it would stay inside: requests have no business walking up);
//   PermissionDenied - no roots configured, outside every root, or leads out of its root
//                      through a symbolic link.
absl::StatusOr<std::filesystem::path> ConfineToRoots(
    const std::string& requested, const std::vector<std::filesystem::path>& roots);

// An artifact's name: 1 to 64 characters of [A-Za-z0-9._-], not starting with '.'. So it is
// always one path component, never "." or "..", never hidden. InvalidArgument naming the
// (escaped) name otherwise.
absl::Status CheckArtifactName(std::string_view name);

}  // namespace nibble::server
