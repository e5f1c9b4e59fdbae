// Helpers shared by the unit and integration tests: required environment variables (ctest sets
// them; tests/CMakeLists.txt, engine/tests/CMakeLists.txt), the shared/ directory, temporary
// directories, whole-file reads and the real tokenizers in shared/. Header-only; every test
// target already has the repository root on its include path through nibble_engine.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "engine/tokenizer.h"

namespace nibble::testing {

// The value of the environment variable `name`. Unset or empty, the test fails (never skips):
// a failure is recorded and `if_unset` comes back, by default a path that does not exist.
inline std::string RequiredEnv(const char* name, const std::string& if_unset = "/nonexistent") {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    ADD_FAILURE() << name << " is not set; run the tests through ctest (or set it by hand "
                             "when running a test binary directly)";
    return if_unset;
  }
  return value;
}

// The shared/ directory with the test models and texts ($NIBBLE_SHARED_DIR), or "" after a
// recorded failure, so that a caller can ASSERT_FALSE(SharedDir().empty()).
inline std::string SharedDir() { return RequiredEnv("NIBBLE_SHARED_DIR", ""); }

// The whole file at `path`; a failure is recorded when it cannot be opened.
inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A fresh directory `<temp_directory_path>/<prefix>.XXXXXX`, removed with everything in it on
// destruction. path() is "" (after a recorded failure) when it could not be created.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix) {
    std::string pattern = (std::filesystem::temp_directory_path() / (prefix + ".XXXXXX")).string();
    if (::mkdtemp(pattern.data()) != nullptr) {
      path_ = pattern;
    } else {
      ADD_FAILURE() << "cannot create " << pattern << ": " << std::strerror(errno);
    }
  }
  ~TempDir() {
    std::error_code ignored;
    if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }

  // Writes `bytes` to the file `name` in this directory; returns its path.
  std::string Write(const std::string& name, const std::string& bytes) const {
    const std::string path = path_ + "/" + name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

 private:
  std::string path_;
};

// The SentencePiece tokenizer at `relative_path` under shared/ (say
// "models/stories260K/tok512.model"), or null after a recorded failure.
inline std::unique_ptr<engine::Tokenizer> LoadSharedTokenizer(const std::string& relative_path) {
  const std::string shared = SharedDir();
  if (shared.empty()) return nullptr;
  engine::TokenizerLoadResult result =
      engine::LoadSentencePieceTokenizer(shared + "/" + relative_path);
  EXPECT_NE(result.tokenizer, nullptr) << result.error;
  EXPECT_EQ(result.error, "");
  return std::move(result.tokenizer);
}

// The piece strings of `ids`.
inline std::vector<std::string> Pieces(const engine::Tokenizer& tokenizer,
                                       const std::vector<int32_t>& ids) {
  std::vector<std::string> pieces;
  for (int32_t id : ids) pieces.push_back(tokenizer.IdToPiece(id));
  return pieces;
}

}  // namespace nibble::testing
