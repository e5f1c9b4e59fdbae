// SHA-256 digests (OpenSSL EVP), as lower-case hex.
//
// Thread safety: every function may be called from any thread.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace nibble::engine {

// Lower-case hex sha256 of a file's bytes; errors name the path.
absl::StatusOr<std::string> Sha256OfFile(const std::string& path);

// Lower-case hex sha256 of `bytes` (e.g. Sha256OfString("abc") = "ba7816bf...").
std::string Sha256OfString(std::string_view bytes);

}  // namespace nibble::engine
