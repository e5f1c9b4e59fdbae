// pack/unpack: round trips byte-identical (one gzip member or many), the archive is read by
// the system's tar and gzip, and every hostile archive (absolute path, `..`, link, unlisted
// file, tampered content, truncation, bad checksum, duplicate) is refused with the entry
// named, leaving nothing at the destination and nothing beside it.
#include "quant/bundle.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "quant/manifest.h"

namespace nibble::quant {
namespace {
namespace fs = std::filesystem;

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteAll(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// Every entry below `dir`: regular files with their bytes, anything else marked.
std::map<std::string, std::string> Snapshot(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    const std::string rel = entry.path().lexically_relative(dir).generic_string();
    if (entry.is_symlink()) files[rel] = "<symlink>";
    else if (entry.is_regular_file()) files[rel] = ReadAll(entry.path());
    else if (!entry.is_directory()) files[rel] = "<special>";
  }
  return files;
}

// ustar, built by hand: the test's own writer, independent of the one under test.
std::string TarHeader(const std::string& name, char type, size_t size,
                      const std::string& link = "") {
  std::string h(512, '\0');
  std::memcpy(h.data(), name.data(), std::min<size_t>(name.size(), 100));
  std::snprintf(h.data() + 100, 8, "%07o", 0644);
  std::snprintf(h.data() + 108, 8, "%07o", 0);
  std::snprintf(h.data() + 116, 8, "%07o", 0);
  std::snprintf(h.data() + 124, 12, "%011zo", size);
  std::snprintf(h.data() + 136, 12, "%011o", 0);
  h[156] = type;
  std::memcpy(h.data() + 157, link.data(), std::min<size_t>(link.size(), 100));
  std::memcpy(h.data() + 257, "ustar\0" "00", 8);
  std::memset(h.data() + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : h) sum += c;
  std::snprintf(h.data() + 148, 8, "%06o", sum);
  return h;
}

std::string TarEntry(const std::string& name, const std::string& content, char type = '0',
                     const std::string& link = "") {
  std::string out = TarHeader(name, type, content.size(), link) + content;
  out.append((512 - content.size() % 512) % 512, '\0');
  return out;
}

std::string TarEnd() { return std::string(1024, '\0'); }

std::string Gzip(const std::string& bytes) {
  z_stream s{};
  EXPECT_EQ(deflateInit2(&s, 6, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY), Z_OK);
  std::string out(deflateBound(&s, bytes.size()) + 64, '\0');
  s.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data()));
  s.avail_in = static_cast<uInt>(bytes.size());
  s.next_out = reinterpret_cast<Bytef*>(out.data());
  s.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&s, Z_FINISH), Z_STREAM_END);
  out.resize(s.total_out);
  deflateEnd(&s);
  return out;
}

class BundleTest : public testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::path(testing::TempDir()) /
            ("bundle_" + std::to_string(getpid()) + "_" +
             testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    artifact_ = root_ / "artifact";
    outside_ = root_ / "unpacked";
    fs::create_directories(artifact_);
    fs::create_directories(outside_);
    std::mt19937 rng(7);
    std::string weights(300000, '\0');
    for (char& c : weights) c = static_cast<char>(rng() % 16);  // compressible, not trivially
    WriteAll(artifact_ / "config.json", "{\"architectures\": [\"LlamaForCausalLM\"]}\n");
    WriteAll(artifact_ / "model.safetensors", weights);
    WriteAll(artifact_ / "sub" / "tokenizer.model", "pieces");
    WriteAll(artifact_ / "empty.txt", "");
    WriteAll(artifact_ / "exactly512.bin", std::string(512, 'z'));
    ArtifactManifest manifest;
    manifest.architecture = "LlamaForCausalLM";
    manifest.chat_template = "llama2";
    ASSERT_TRUE(WriteManifest(artifact_.string(), manifest).ok());
    ASSERT_TRUE(VerifyArtifact(artifact_.string()).ok());
  }
  void TearDown() override { fs::remove_all(root_); }

  std::string Dest() const { return (outside_ / "model").string(); }

  // Unpacks `archive` expecting refusal with `needle` in the message; nothing may be left
  // at the destination or beside it, and nothing anywhere else under the test's root.
  void ExpectRefused(const std::string& archive, const std::string& needle) {
    const auto before = Snapshot(root_);
    auto result = UnpackArtifact(archive, Dest());
    ASSERT_FALSE(result.ok()) << "accepted an archive that should be refused: " << needle;
    EXPECT_NE(result.status().message().find(needle), std::string::npos)
        << result.status().message();
    EXPECT_FALSE(fs::exists(Dest()));
    EXPECT_TRUE(fs::is_empty(outside_)) << "left something beside the destination";
    EXPECT_EQ(Snapshot(root_), before);
  }

  std::string WriteArchive(const std::string& name, const std::string& gz) {
    const std::string path = (root_ / name).string();
    WriteAll(path, gz);
    return path;
  }

  // The artifact's manifest entry, then `rest`, then the end marker; gzip'd and written.
  std::string Hostile(const std::string& name, const std::string& rest, bool end = true) {
    std::string tar = TarEntry(kManifestFileName, ReadAll(artifact_ / kManifestFileName)) + rest;
    if (end) tar += TarEnd();
    return WriteArchive(name, Gzip(tar));
  }

  // Every listed file of the artifact as tar entries, `edit` applied to each content.
  std::string AllFiles(const std::function<std::string(const std::string&, std::string)>& edit) {
    auto manifest = ReadManifest(artifact_.string());
    EXPECT_TRUE(manifest.ok());
    std::string tar;
    for (const auto& [name, file] : manifest->files) {
      tar += TarEntry(name, edit(name, ReadAll(artifact_ / name)));
    }
    return tar;
  }

  fs::path root_, artifact_, outside_;
};

TEST_F(BundleTest, RoundTripIsByteIdentical) {
  const std::string archive = (root_ / "model.tar.gz").string();
  auto packed = PackArtifact(artifact_.string(), archive);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_EQ(packed->files, 6);
  EXPECT_EQ(packed->gz_bytes, fs::file_size(archive));
  EXPECT_LT(packed->gz_bytes, packed->tar_bytes);
  auto unpacked = UnpackArtifact(archive, Dest());
  ASSERT_TRUE(unpacked.ok()) << unpacked.status();
  EXPECT_EQ(unpacked->files, 6);
  EXPECT_EQ(unpacked->tar_bytes, packed->tar_bytes);
  EXPECT_EQ(unpacked->members, packed->members);
  EXPECT_EQ(Snapshot(Dest()), Snapshot(artifact_));
  EXPECT_TRUE(VerifyArtifact(Dest()).ok());
  // Nothing left beside it (the staging directory is gone).
  EXPECT_EQ(std::distance(fs::directory_iterator(outside_), fs::directory_iterator()), 1);
  // Nor any temporary file beside the archive.
  for (const auto& entry : fs::directory_iterator(root_)) {
    EXPECT_EQ(entry.path().filename().string().find(".tmp-"), std::string::npos) << entry.path();
  }
}

TEST_F(BundleTest, ManifestIsTheFirstEntry) {
  const std::string archive = (root_ / "model.tar.gz").string();
  ASSERT_TRUE(PackArtifact(artifact_.string(), archive).ok());
  const std::string list = (root_ / "list.txt").string();
  ASSERT_EQ(std::system(("tar tzf '" + archive + "' > '" + list + "'").c_str()), 0);
  const std::string names = ReadAll(list);
  EXPECT_EQ(names.substr(0, names.find('\n')), kManifestFileName) << names;
}

TEST_F(BundleTest, SystemTarAndGzipReadIt) {
  const std::string archive = (root_ / "model.tar.gz").string();
  ASSERT_TRUE(PackArtifact(artifact_.string(), archive).ok());
  EXPECT_EQ(std::system(("gzip -t '" + archive + "'").c_str()), 0);
  const fs::path by_tar = root_ / "by_tar";
  fs::create_directories(by_tar);
  ASSERT_EQ(std::system(("tar xzf '" + archive + "' -C '" + by_tar.string() + "'").c_str()), 0);
  EXPECT_EQ(Snapshot(by_tar), Snapshot(artifact_));
}

TEST_F(BundleTest, ManyMembersOnManyThreadsRoundTrip) {
  // A long name exercises the ustar prefix field too.
  const std::string long_name = std::string(60, 'd') + "/" + std::string(70, 'e') + "/" +
                                std::string(90, 'f') + ".bin";
  WriteAll(artifact_ / long_name, "long");
  ArtifactManifest manifest;
  manifest.architecture = "LlamaForCausalLM";
  manifest.chat_template = "llama2";
  ASSERT_TRUE(WriteManifest(artifact_.string(), manifest).ok());
  const std::string archive = (root_ / "model.tar.gz").string();
  PackOptions options;
  options.chunk_bytes = 1000;  // not a multiple of the tar block: members cut through headers
  options.threads = 3;
  options.level = 1;
  auto packed = PackArtifact(artifact_.string(), archive, options);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_EQ(packed->members, static_cast<int64_t>((packed->tar_bytes + 999) / 1000));
  EXPECT_GT(packed->members, 100);
  auto unpacked = UnpackArtifact(archive, Dest());
  ASSERT_TRUE(unpacked.ok()) << unpacked.status();
  EXPECT_EQ(unpacked->members, packed->members);
  EXPECT_EQ(Snapshot(Dest()), Snapshot(artifact_));
  EXPECT_EQ(std::system(("gzip -t '" + archive + "'").c_str()), 0);
  const fs::path by_tar = root_ / "by_tar";
  fs::create_directories(by_tar);
  ASSERT_EQ(std::system(("tar xzf '" + archive + "' -C '" + by_tar.string() + "'").c_str()), 0);
  EXPECT_EQ(Snapshot(by_tar), Snapshot(artifact_));
}

TEST_F(BundleTest, UnpacksIntoAnEmptyDirectoryButNotANonEmptyOne) {
  const std::string archive = (root_ / "model.tar.gz").string();
  ASSERT_TRUE(PackArtifact(artifact_.string(), archive).ok());
  fs::create_directories(Dest());
  ASSERT_TRUE(UnpackArtifact(archive, Dest()).ok());
  EXPECT_EQ(Snapshot(Dest()), Snapshot(artifact_));
  auto again = UnpackArtifact(archive, Dest());
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(Snapshot(Dest()), Snapshot(artifact_));
}

TEST_F(BundleTest, RefusesToPackAnArtifactThatFailsVerification) {
  WriteAll(artifact_ / "stray.bin", "not in the manifest");
  const std::string archive = (root_ / "model.tar.gz").string();
  auto packed = PackArtifact(artifact_.string(), archive);
  ASSERT_FALSE(packed.ok());
  EXPECT_NE(packed.status().message().find("stray.bin"), std::string::npos)
      << packed.status().message();
  EXPECT_FALSE(fs::exists(archive));
  fs::remove(artifact_ / "stray.bin");
  WriteAll(artifact_ / "sub" / "tokenizer.model", "PIECES");  // same size, other bytes
  packed = PackArtifact(artifact_.string(), archive);
  ASSERT_FALSE(packed.ok());
  EXPECT_NE(packed.status().message().find("sub/tokenizer.model"), std::string::npos);
  EXPECT_FALSE(fs::exists(archive));
  // Nor one inside the artifact itself.
  WriteAll(artifact_ / "sub" / "tokenizer.model", "pieces");
  packed = PackArtifact(artifact_.string(), (artifact_ / "self.tar.gz").string());
  ASSERT_FALSE(packed.ok());
  EXPECT_FALSE(fs::exists(artifact_ / "self.tar.gz"));
}

TEST_F(BundleTest, RefusesAbsolutePath) {
  const fs::path target = root_ / "abs_evil";
  ExpectRefused(Hostile("abs.tar.gz", TarEntry(target.string(), "x")), target.string());
  EXPECT_FALSE(fs::exists(target));
}

TEST_F(BundleTest, RefusesDotDot) {
  ExpectRefused(Hostile("dotdot.tar.gz", TarEntry("../evil", "x")), "../evil");
  ExpectRefused(Hostile("dotdot2.tar.gz", TarEntry("sub/../../evil", "x")), "sub/../../evil");
  EXPECT_FALSE(fs::exists(outside_ / "evil"));
  EXPECT_FALSE(fs::exists(root_ / "evil"));
}

TEST_F(BundleTest, RefusesLinksAndSpecialFiles) {
  ExpectRefused(Hostile("symlink.tar.gz", TarEntry("link", "", '2', "/etc/passwd")),
                "'link': a symbolic link");
  ExpectRefused(Hostile("hardlink.tar.gz", TarEntry("hard", "", '1', "config.json")),
                "'hard': a hard link");
  ExpectRefused(Hostile("fifo.tar.gz", TarEntry("fifo", "", '6')), "'fifo': a FIFO");
  ExpectRefused(Hostile("pax.tar.gz", TarEntry("paxhdr", "30 path=../../../etc/passwd\n", 'x')),
                "'paxhdr': a pax extended header");
}

TEST_F(BundleTest, RefusesFilesNotInTheManifest) {
  ExpectRefused(Hostile("extra.tar.gz", AllFiles([](auto&, std::string c) { return c; }) +
                                            TarEntry("extra.bin", "payload")),
                "'extra.bin': not listed in the manifest");
  // Nor a manifest that is not first.
  const std::string tar = TarEntry("config.json", ReadAll(artifact_ / "config.json")) +
                          TarEntry(kManifestFileName, ReadAll(artifact_ / kManifestFileName)) +
                          TarEnd();
  ExpectRefused(WriteArchive("late.tar.gz", Gzip(tar)), "'config.json': the first file must be");
}

TEST_F(BundleTest, RefusesTamperedContent) {
  const std::string archive =
      Hostile("tampered.tar.gz", AllFiles([](const std::string& name, std::string c) {
                if (name == "model.safetensors") c[1234] ^= 1;
                return c;
              }));
  ExpectRefused(archive, "model.safetensors: sha256");
  // A size that disagrees with the manifest is refused before extracting it.
  ExpectRefused(Hostile("resized.tar.gz", TarEntry("config.json", "{}")),
                "'config.json': size 2 bytes, the manifest says");
  // A listed file missing from the archive.
  ExpectRefused(Hostile("missing.tar.gz", AllFiles([](const std::string& name, std::string c) {
                          return c;
                        }).substr(0, 0)),
                ": missing");
}

TEST_F(BundleTest, RefusesDuplicatesAndBadChecksums) {
  ExpectRefused(Hostile("dup.tar.gz", AllFiles([](auto&, std::string c) { return c; }) +
                                          TarEntry("config.json", ReadAll(artifact_ / "config.json"))),
                "'config.json': duplicate entry");
  std::string bad = TarEntry("config.json", ReadAll(artifact_ / "config.json"));
  bad[20] = 'X';  // inside the name field, after its NUL: the checksum no longer matches
  ExpectRefused(Hostile("chksum.tar.gz", bad), "bad header checksum");
}

TEST_F(BundleTest, RefusesTruncatedArchives) {
  const std::string archive = (root_ / "model.tar.gz").string();
  PackOptions options;
  options.chunk_bytes = 4096;
  ASSERT_TRUE(PackArtifact(artifact_.string(), archive, options).ok());
  const std::string whole = ReadAll(archive);
  fs::remove(archive);
  // Cut inside a member.
  ExpectRefused(WriteArchive("cut.tar.gz", whole.substr(0, whole.size() / 2)), "truncated");
  ExpectRefused(WriteArchive("cut2.tar.gz", whole.substr(0, whole.size() / 2)),
                "entry 'model.safetensors'");
  // Cut at a member boundary: the gzip is well-formed, the tar stream ends early.
  const std::string tar = TarEntry(kManifestFileName, ReadAll(artifact_ / kManifestFileName)) +
                          TarEntry("config.json", ReadAll(artifact_ / "config.json"));
  ExpectRefused(WriteArchive("short.tar.gz", Gzip(tar)),
                "truncated archive: ends after entry 'config.json'");
  // A header promising more data than there is.
  std::string partial = TarEntry(kManifestFileName, ReadAll(artifact_ / kManifestFileName)) +
                        TarHeader("model.safetensors", '0', 300000) + std::string(1024, 'q');
  ExpectRefused(WriteArchive("partial.tar.gz", Gzip(partial)),
                "'model.safetensors': truncated archive");
  // Not gzip at all.
  ExpectRefused(WriteArchive("plain.tar.gz", tar + TarEnd()), "corrupt gzip data");
  ExpectRefused(WriteArchive("empty.tar.gz", ""), "truncated");
}

}  // namespace
}  // namespace nibble::quant
