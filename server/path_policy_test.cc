#include "server/path_policy.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

namespace nibble::server {
namespace {

namespace fs = std::filesystem;

// A fresh directory tree per test:
//   <tmp>/root/model/config.json    the allowed root with one model
//   <tmp>/other_root/                a second allowed root
//   <tmp>/outside/secret.txt         not allowed
class PathPolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "path_policy_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    // The temp directory itself may sit behind a link (/tmp on some systems): compare against
    // its resolved form.
    base_ = fs::canonical(pattern);
    root_ = base_ / "root";
    other_root_ = base_ / "other_root";
    outside_ = base_ / "outside";
    fs::create_directories(root_ / "model");
    fs::create_directories(other_root_);
    fs::create_directories(outside_);
    std::ofstream(root_ / "model" / "config.json") << "{}";
    std::ofstream(outside_ / "secret.txt") << "secret";
  }
  void TearDown() override { fs::remove_all(base_); }

  fs::path base_, root_, other_root_, outside_;
};

TEST_F(PathPolicyTest, RelativePathUnderRootIsResolved) {
  auto path = ConfineToRoots("model", {root_});
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, root_ / "model");
}

TEST_F(PathPolicyTest, AbsolutePathUnderRootIsAllowed) {
  auto path = ConfineToRoots((root_ / "model" / "config.json").string(), {root_});
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, root_ / "model" / "config.json");
}

TEST_F(PathPolicyTest, RelativePathFindsTheRootWhereItExists) {
  fs::create_directories(other_root_ / "second");
  auto path = ConfineToRoots("second", {root_, other_root_});
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, other_root_ / "second");
  // Exists nowhere: under the first root.
  auto missing = ConfineToRoots("not-yet", {root_, other_root_});
  ASSERT_TRUE(missing.ok()) << missing.status();
  EXPECT_EQ(*missing, root_ / "not-yet");
}

TEST_F(PathPolicyTest, DotDotIsRefusedEvenWhenItStaysInside) {
  for (const std::string& requested :
       {std::string("../outside/secret.txt"), std::string("model/../model"),
        (root_ / ".." / "outside").string(), std::string("..")}) {
    auto path = ConfineToRoots(requested, {root_});
    ASSERT_FALSE(path.ok()) << requested;
    EXPECT_EQ(path.status().code(), absl::StatusCode::kInvalidArgument) << requested;
    EXPECT_NE(path.status().message().find(requested), std::string::npos)
        << path.status().message();
  }
}

TEST_F(PathPolicyTest, AbsolutePathOutsideRootsIsRefused) {
  for (const std::string& requested :
       {(outside_ / "secret.txt").string(), std::string("/etc/passwd"), std::string("/"),
        // A sibling whose name starts with the root's name is not inside it.
        root_.string() + "_sibling"}) {
    auto path = ConfineToRoots(requested, {root_});
    ASSERT_FALSE(path.ok()) << requested;
    EXPECT_EQ(path.status().code(), absl::StatusCode::kPermissionDenied) << requested;
    EXPECT_NE(path.status().message().find("outside the allowed roots"), std::string::npos)
        << path.status().message();
  }
}

TEST_F(PathPolicyTest, SymlinkLeadingOutIsRefused) {
  fs::create_directory_symlink(outside_, root_ / "escape");
  fs::create_symlink(outside_ / "secret.txt", root_ / "model" / "weights.bin");
  for (const std::string& requested :
       {std::string("escape"), std::string("escape/secret.txt"), std::string("model/weights.bin"),
        (root_ / "escape" / "secret.txt").string()}) {
    auto path = ConfineToRoots(requested, {root_});
    ASSERT_FALSE(path.ok()) << requested << " resolved to " << *path;
    EXPECT_EQ(path.status().code(), absl::StatusCode::kPermissionDenied) << requested;
    EXPECT_NE(path.status().message().find("symbolic link"), std::string::npos)
        << path.status().message();
  }
}

TEST_F(PathPolicyTest, SymlinkThatLeadsOutThroughAParentIsRefused) {
  // A link to "..": every path through it walks up and out.
  fs::create_directory_symlink(base_, root_ / "up");
  auto path = ConfineToRoots("up/outside/secret.txt", {root_});
  ASSERT_FALSE(path.ok());
  EXPECT_EQ(path.status().code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(PathPolicyTest, SymlinkWithinARootIsAllowed) {
  fs::create_directory_symlink(root_ / "model", root_ / "alias");
  auto path = ConfineToRoots("alias/config.json", {root_});
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, root_ / "model" / "config.json");  // the resolved path, not the link
  // Into another allowed root: still confined.
  fs::create_directories(other_root_ / "shared");
  fs::create_directory_symlink(other_root_ / "shared", root_ / "to_other");
  auto other = ConfineToRoots("to_other", {root_, other_root_});
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(*other, other_root_ / "shared");
}

TEST_F(PathPolicyTest, RootGivenThroughASymlinkStillWorks) {
  fs::create_directory_symlink(root_, base_ / "root_link");
  auto path = ConfineToRoots((base_ / "root_link" / "model").string(), {base_ / "root_link"});
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, root_ / "model");
}

TEST_F(PathPolicyTest, EmptyNulAndNoRootsAreRefused) {
  EXPECT_EQ(ConfineToRoots("", {root_}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ConfineToRoots(std::string("model\0x", 7), {root_}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto no_roots = ConfineToRoots("model", {});
  EXPECT_EQ(no_roots.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(no_roots.status().message().find("no allowed roots"), std::string::npos);
}

TEST(ArtifactNameTest, AcceptsTheAllowedAlphabet) {
  for (const char* name : {"a", "stories260K-awq", "model_v1.2", "A-Z.a_z-0.9", "x.."}) {
    EXPECT_TRUE(CheckArtifactName(name).ok()) << name << ": " << CheckArtifactName(name);
  }
  EXPECT_TRUE(CheckArtifactName(std::string(64, 'a')).ok());
}

TEST(ArtifactNameTest, RefusesEverythingElse) {
  for (const std::string& name :
       {std::string(""), std::string("."), std::string(".."), std::string(".hidden"),
        std::string("a/b"), std::string("../x"), std::string("a b"), std::string("a\\b"),
        std::string("name\n"), std::string("caf\xc3\xa9"), std::string(65, 'a'),
        std::string("a\0b", 3)}) {
    absl::Status status = CheckArtifactName(name);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_NE(status.message().find("artifact name"), std::string::npos) << status;
  }
}

}  // namespace
}  // namespace nibble::server
