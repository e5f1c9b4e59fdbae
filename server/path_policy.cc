#include "server/path_policy.h"

#include <algorithm>
#include <iterator>
#include <optional>
#include <system_error>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace nibble::server {
namespace {

namespace fs = std::filesystem;

// `path` equals `root` or lies below it, comparing whole components ("/a/bc" is not under
// "/a/b"). Both are canonical (no ".", "..", or links).
bool IsWithin(const fs::path& path, const fs::path& root) {
  auto p = path.begin();
  for (auto r = root.begin(); r != root.end(); ++r, ++p) {
    // A trailing separator shows up as an empty last component of `root`.
    if (r->empty() && std::next(r) == root.end()) return true;
    if (p == path.end() || *p != *r) return false;
  }
  return true;
}

absl::StatusOr<fs::path> Canonical(const fs::path& path, const std::string& requested) {
  std::error_code error;
  fs::path canonical = fs::weakly_canonical(path, error);
  if (error) {
    return absl::PermissionDeniedError(absl::StrCat("path \"", absl::CHexEscape(requested),
                                                    "\": cannot resolve: ", error.message()));
  }
  return canonical;
}

}  // namespace

absl::StatusOr<fs::path> ConfineToRoots(const std::string& requested,
                                        const std::vector<fs::path>& roots) {
  const std::string shown = absl::CHexEscape(requested);
  if (requested.empty()) return absl::InvalidArgumentError("empty path");
  if (requested.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("path \"", shown, "\" contains a NUL byte"));
  }
  const fs::path path(requested);
  for (const fs::path& component : path) {
    if (component == "..") {
      return absl::InvalidArgumentError(
          absl::StrCat("path \"", shown, "\": \"..\" is not allowed in a path"));
    }
  }
  if (roots.empty()) {
    return absl::PermissionDeniedError(
        absl::StrCat("path \"", shown, "\": no allowed roots are configured"));
  }
  std::vector<fs::path> canonical_roots;
  std::vector<std::string> root_names;
  for (const fs::path& root : roots) {
    absl::StatusOr<fs::path> canonical = Canonical(fs::absolute(root), root.string());
    if (!canonical.ok()) return canonical.status();
    canonical_roots.push_back(*std::move(canonical));
    root_names.push_back(root.string());
  }
  const std::string allowed = absl::StrJoin(root_names, ", ");

  if (path.is_absolute()) {
    // Lexically inside a root but resolving elsewhere: a link leads out.
    bool lexically_inside = false;
    for (const fs::path& root : roots) {
      lexically_inside |= IsWithin(path.lexically_normal(), fs::absolute(root).lexically_normal());
    }
    absl::StatusOr<fs::path> canonical = Canonical(path, requested);
    if (!canonical.ok()) return canonical.status();
    for (const fs::path& root : canonical_roots) {
      if (IsWithin(*canonical, root)) return canonical;
    }
    if (lexically_inside) {
      return absl::PermissionDeniedError(absl::StrCat("path \"", shown,
                                                      "\" leads out of the allowed roots (",
                                                      allowed, ") through a symbolic link"));
    }
    return absl::PermissionDeniedError(
        absl::StrCat("path \"", shown, "\" is outside the allowed roots (", allowed, ")"));
  }

  std::optional<fs::path> first_confined;
  for (size_t i = 0; i < canonical_roots.size(); ++i) {
    absl::StatusOr<fs::path> canonical = Canonical(canonical_roots[i] / path, requested);
    if (!canonical.ok()) return canonical.status();
    // A link from one root into another stays confined.
    bool confined = false;
    for (const fs::path& root : canonical_roots) confined |= IsWithin(*canonical, root);
    if (!confined) {
      return absl::PermissionDeniedError(absl::StrCat("path \"", shown,
                                                      "\" leads out of the allowed root ",
                                                      root_names[i], " through a symbolic link"));
    }
    std::error_code error;
    if (fs::exists(*canonical, error)) return canonical;
    if (!first_confined) first_confined = *std::move(canonical);
  }
  return *first_confined;
}

absl::Status CheckArtifactName(std::string_view name) {
  constexpr size_t kMaxLength = 64;
  const auto invalid = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "artifact name \"",
        absl::CHexEscape(absl::string_view(name.data(), std::min(name.size(), 2 * kMaxLength))),
        name.size() > 2 * kMaxLength ? "..." : "", "\" ", why));
  };
  if (name.empty()) return absl::InvalidArgumentError("artifact name is empty");
  if (name.size() > kMaxLength) {
    return invalid(absl::StrCat("is longer than ", kMaxLength, " characters"));
  }
  if (name.front() == '.') return invalid("starts with '.'");
  for (char c : name) {
    const bool allowed = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                         (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!allowed) return invalid("may only contain letters, digits, '.', '_' and '-'");
  }
  return absl::OkStatus();
}

}  // namespace nibble::server
