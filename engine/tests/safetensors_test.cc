// Tests of the safetensors reader and writer, and of the atomic file writes under them.
//
// The malformed-file cases each build a tiny file by hand, open it through SafetensorsFile
// (and parse it through ParseSafetensors), and check the status code and that the message
// names the file and the problem. The round trip checks the writer's layout against the
// format with nlohmann::json directly, not only through our own reader.

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "engine/atomic_file.h"
#include "engine/dtype.h"
#include "engine/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_support.h"

namespace nibble::engine {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_FALSE(dir_.empty()); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::vector<std::string> DirEntries() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) {
      names.push_back(entry.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  }

  const nibble::testing::TempDir temp_{"safetensors_test"};
  const std::string dir_ = temp_.path();
};

void WriteRaw(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string LengthField(uint64_t n) {
  std::string field(8, '\0');
  for (int i = 0; i < 8; ++i) field[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return field;
}

// 8-byte length | header | data.
std::string FileImage(const std::string& header, const std::string& data = "") {
  return LengthField(header.size()) + header + data;
}

std::span<const uint8_t> AsBytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

template <typename T>
std::span<const uint8_t> AsBytes(const std::vector<T>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T)};
}

// Status with `code` whose message contains every one of `parts`.
::testing::AssertionResult IsError(const absl::Status& status, absl::StatusCode code,
                                   const std::vector<std::string>& parts) {
  if (status.ok()) return ::testing::AssertionFailure() << "expected an error, got OK";
  if (status.code() != code) {
    return ::testing::AssertionFailure()
           << "expected code " << absl::StatusCodeToString(code) << ", got " << status;
  }
  const std::string message(status.message());
  for (const std::string& part : parts) {
    if (message.find(part) == std::string::npos) {
      return ::testing::AssertionFailure()
             << "message lacks '" << part << "': " << message;
    }
  }
  return ::testing::AssertionSuccess() << status;
}

// ---------------------------------------------------------------------------------------------
// Round trip.

TEST_F(TempDirTest, RoundTripAllDTypesZeroDimEmptyAndMetadata) {
  const std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 1e-3f, 7.0f};
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x7BFF, 0x0001};  // 1, -2, max, tiny
  const std::vector<uint16_t> bf16 = {0x3F80, 0xBF80, 0x4049, 0x0000};
  const std::vector<int32_t> scalar = {-123456};
  const std::vector<int32_t> i32 = {1, -1, 2147483647};
  const std::vector<float> empty;

  SafetensorsWriter writer;
  ASSERT_TRUE(writer.Add("model.w", DType::kF32, {2, 3}, AsBytes(f32)).ok());
  ASSERT_TRUE(writer.Add("half", DType::kF16, {4}, AsBytes(f16)).ok());
  ASSERT_TRUE(writer.Add("brain", DType::kBF16, {2, 1, 2}, AsBytes(bf16)).ok());
  ASSERT_TRUE(writer.Add("scalar", DType::kI32, {}, AsBytes(scalar)).ok());
  ASSERT_TRUE(writer.Add("empty", DType::kF32, {0, 5}, AsBytes(empty)).ok());
  ASSERT_TRUE(writer.Add("ints", DType::kI32, {3}, AsBytes(i32)).ok());
  writer.SetMetadata("format", "pt");
  writer.SetMetadata("note", "h\xC3\xA9llo \"quoted\"");
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());

  auto file_or = SafetensorsFile::Open(path);
  ASSERT_TRUE(file_or.ok()) << file_or.status();
  const SafetensorsFile& file = **file_or;
  EXPECT_EQ(file.path(), path);
  EXPECT_EQ(file.header().metadata.size(), 2u);
  EXPECT_EQ(file.header().metadata.at("format"), "pt");
  EXPECT_EQ(file.header().metadata.at("note"), "h\xC3\xA9llo \"quoted\"");
  ASSERT_EQ(file.header().tensors.size(), 6u);

  auto expect_tensor = [&](const std::string& name, DType dtype, std::vector<int64_t> shape,
                           std::span<const uint8_t> bytes, int64_t elements) {
    SCOPED_TRACE(name);
    const TensorInfo* info = file.Find(name);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->name, name);
    EXPECT_EQ(info->dtype, dtype);
    EXPECT_EQ(info->shape, shape);
    EXPECT_EQ(info->NumElements(), elements);
    const std::span<const uint8_t> got = file.Bytes(*info);
    ASSERT_EQ(got.size(), bytes.size());
    EXPECT_TRUE(std::equal(got.begin(), got.end(), bytes.begin()));
  };
  expect_tensor("model.w", DType::kF32, {2, 3}, AsBytes(f32), 6);
  expect_tensor("half", DType::kF16, {4}, AsBytes(f16), 4);
  expect_tensor("brain", DType::kBF16, {2, 1, 2}, AsBytes(bf16), 4);
  expect_tensor("scalar", DType::kI32, {}, AsBytes(scalar), 1);
  expect_tensor("empty", DType::kF32, {0, 5}, AsBytes(empty), 0);
  expect_tensor("ints", DType::kI32, {3}, AsBytes(i32), 3);
  EXPECT_EQ(file.Find("missing"), nullptr);
  EXPECT_EQ(file.Find("__metadata__"), nullptr);

  // The header's tensors are sorted by offset.
  for (size_t i = 1; i < file.header().tensors.size(); ++i) {
    EXPECT_LE(file.header().tensors[i - 1].data_end, file.header().tensors[i].data_begin);
  }
}

// The layout the reference implementation writes, checked without our reader.
TEST_F(TempDirTest, WriterLayoutMatchesTheFormat) {
  const std::vector<float> a = {1, 2, 3};
  const std::vector<uint16_t> b = {7};
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.Add("zeta", DType::kF32, {3}, AsBytes(a)).ok());
  ASSERT_TRUE(writer.Add("alpha", DType::kBF16, {1}, AsBytes(b)).ok());
  writer.SetMetadata("format", "pt");
  const std::string path = Path("layout.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());

  auto image_or = ReadFileToString(path);
  ASSERT_TRUE(image_or.ok()) << image_or.status();
  const std::string& image = *image_or;
  ASSERT_GE(image.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(image[i]);
  EXPECT_EQ(n % 8, 0u) << "header padded to a multiple of 8";
  ASSERT_EQ(image.size(), 8 + n + 12 + 2);
  const std::string header = image.substr(8, n);
  EXPECT_EQ(header.front(), '{');
  const size_t last = header.find_last_not_of(' ');
  EXPECT_EQ(header[last], '}') << "padding is spaces after the JSON";

  // Metadata first, then tensors in insertion order (not sorted by name).
  const size_t meta_pos = header.find("\"__metadata__\"");
  const size_t zeta_pos = header.find("\"zeta\"");
  const size_t alpha_pos = header.find("\"alpha\"");
  ASSERT_NE(meta_pos, std::string::npos);
  EXPECT_LT(meta_pos, zeta_pos);
  EXPECT_LT(zeta_pos, alpha_pos);

  const nlohmann::json j = nlohmann::json::parse(header, nullptr, false);
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["__metadata__"], nlohmann::json({{"format", "pt"}}));
  EXPECT_EQ(j["zeta"]["dtype"], "F32");
  EXPECT_EQ(j["zeta"]["shape"], nlohmann::json({3}));
  EXPECT_EQ(j["zeta"]["data_offsets"], nlohmann::json({0, 12}));
  EXPECT_EQ(j["alpha"]["dtype"], "BF16");
  EXPECT_EQ(j["alpha"]["data_offsets"], nlohmann::json({12, 14}));
  EXPECT_EQ(std::memcmp(image.data() + 8 + n, a.data(), 12), 0);
  EXPECT_EQ(std::memcmp(image.data() + 8 + n + 12, b.data(), 2), 0);
}

TEST_F(TempDirTest, NoMetadataKeyWithoutMetadata) {
  SafetensorsWriter writer;
  const std::vector<uint8_t> x = {1, 0};
  ASSERT_TRUE(writer.Add("x", DType::kBool, {2}, AsBytes(x)).ok());
  const std::string path = Path("nometa.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());
  auto image = ReadFileToString(path);
  ASSERT_TRUE(image.ok());
  EXPECT_EQ(image->find("__metadata__"), std::string::npos);
}

TEST_F(TempDirTest, EmptyFileWithNoTensors) {
  SafetensorsWriter writer;
  const std::string path = Path("none.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->header().tensors.empty());
  EXPECT_TRUE((*file)->header().metadata.empty());
}

// A file written by hand the way the reference implementation lays it out, with keys in an
// order other than ours and unaligned tensor offsets.
TEST(SafetensorsParseTest, HandWrittenFile) {
  const std::string header =
      R"({"b":{"shape":[1],"dtype":"I8","data_offsets":[4,5]},)"
      R"("a":{"dtype":"F16","shape":[2],"data_offsets":[0,4],"extra":"ignored"},)"
      R"("__metadata__":{"k":"v"}})";
  const std::string data = "\x00\x3C\x00\xC0\x7F";
  const std::string image = FileImage(header, std::string(data.data(), 5));
  auto parsed = ParseSafetensors(AsBytes(image), "hand.safetensors");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->tensors.size(), 2u);
  EXPECT_EQ(parsed->data_offset, 8 + header.size());
  EXPECT_EQ(parsed->tensors[0].name, "a");  // sorted by offset
  EXPECT_EQ(parsed->tensors[0].dtype, DType::kF16);
  EXPECT_EQ(parsed->tensors[1].name, "b");
  EXPECT_EQ(parsed->tensors[1].data_begin, 4u);
  EXPECT_EQ(parsed->tensors[1].data_end, 5u);
  EXPECT_EQ(parsed->metadata.at("k"), "v");
}

TEST(DTypeTest, NamesAndSizes) {
  const DType all[] = {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kI64,
                       DType::kI32, DType::kI16, DType::kI8,  DType::kU8,   DType::kBool};
  const size_t sizes[] = {8, 4, 2, 2, 8, 4, 2, 1, 1, 1};
  for (size_t i = 0; i < std::size(all); ++i) {
    EXPECT_EQ(DTypeSize(all[i]), sizes[i]);
    EXPECT_EQ(ParseDTypeName(DTypeName(all[i])), all[i]) << DTypeName(all[i]);
  }
  EXPECT_EQ(DTypeName(DType::kBF16), "BF16");
  EXPECT_EQ(DTypeName(DType::kBool), "BOOL");
  EXPECT_FALSE(ParseDTypeName("f32").has_value());
  EXPECT_FALSE(ParseDTypeName("F8_E4M3").has_value());
  EXPECT_FALSE(ParseDTypeName("").has_value());
}

// ---------------------------------------------------------------------------------------------
// Malformed files: each must fail with a clear error naming the file and the problem.

struct MalformedCase {
  std::string test_name;
  std::string image;  // the whole file
  absl::StatusCode code;
  std::string problem;  // a substring of the message that names the problem
};

std::string Entry(const std::string& body) { return "{" + body + "}"; }

std::vector<MalformedCase> MalformedCases() {
  using C = absl::StatusCode;
  const std::string good_a = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string data8(8, '\x01');
  std::string deep = R"({"a":)";
  for (int i = 0; i < 100; ++i) deep += "[";
  for (int i = 0; i < 100; ++i) deep += "]";
  deep += "}";
  return {
      {"Empty", "", C::kDataLoss, "too short"},
      {"ShorterThanLengthField", "\x05\x00\x00", C::kDataLoss, "too short"},
      {"HeaderLengthPastEnd", LengthField(100) + "{}", C::kDataLoss,
       "header length 100 runs past the end"},
      {"HeaderLengthAbsurd", LengthField(uint64_t{1} << 63) + "{}", C::kDataLoss,
       "header length 9223372036854775808"},
      {"HeaderLengthAllOnes", LengthField(~uint64_t{0}) + "{}", C::kDataLoss, "header length"},
      {"HeaderEmpty", FileImage(""), C::kInvalidArgument, "not valid JSON"},
      {"BadJson", FileImage(R"({"a":)"), C::kInvalidArgument, "not valid JSON"},
      {"TrailingGarbage", FileImage(R"({} x)"), C::kInvalidArgument, "not valid JSON"},
      {"InvalidUtf8InKey", FileImage("{\"\xFF\":1}"), C::kInvalidArgument, "not valid JSON"},
      {"NulInHeader", FileImage(std::string("{}\0", 3)), C::kInvalidArgument, "not valid JSON"},
      {"JsonArray", FileImage("[1,2]"), C::kInvalidArgument, "not a JSON object"},
      {"JsonString", FileImage(R"("x")"), C::kInvalidArgument, "not a JSON object"},
      {"TooDeep", FileImage(deep), C::kInvalidArgument, "nests deeper"},
      {"EntryNotObject", FileImage(R"({"a":5})"), C::kInvalidArgument,
       "tensor 'a': entry is not a JSON object"},
      {"MissingDtype", FileImage(Entry(R"("a":{"shape":[2],"data_offsets":[0,8]})"), data8),
       C::kInvalidArgument, "tensor 'a': missing \"dtype\""},
      {"MissingShape", FileImage(Entry(R"("a":{"dtype":"F32","data_offsets":[0,8]})"), data8),
       C::kInvalidArgument, "missing \"shape\""},
      {"MissingOffsets", FileImage(Entry(R"("a":{"dtype":"F32","shape":[2]})"), data8),
       C::kInvalidArgument, "missing \"data_offsets\""},
      {"DtypeNotString",
       FileImage(Entry(R"("a":{"dtype":4,"shape":[2],"data_offsets":[0,8]})"), data8),
       C::kInvalidArgument, "\"dtype\" is not a string"},
      {"UnknownDtype",
       FileImage(Entry(R"("a":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]})"), data8),
       C::kInvalidArgument, "unknown dtype 'F8_E4M3'"},
      {"ShapeNotArray",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":2,"data_offsets":[0,8]})"), data8),
       C::kInvalidArgument, "\"shape\" is not an array"},
      {"ShapeDimString",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]})"), data8),
       C::kInvalidArgument, "not an integer"},
      {"ShapeDimFloat",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})"), data8),
       C::kInvalidArgument, "not an integer"},
      {"NegativeDimension",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"), data8),
       C::kInvalidArgument, "negative dimension -2"},
      {"DimensionPastInt64",
       FileImage(Entry(R"("a":{"dtype":"U8","shape":[18446744073709551615],)"
                       R"("data_offsets":[0,8]})"),
                 data8),
       C::kInvalidArgument, "too large"},
      {"ElementCountOverflow",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[4611686018427387904,)"
                       R"(4611686018427387904],"data_offsets":[0,8]})"),
                 data8),
       C::kInvalidArgument, "overflow"},
      {"ByteCountOverflow",
       FileImage(Entry(R"("a":{"dtype":"F64","shape":[4611686018427387904],)"
                       R"("data_offsets":[0,8]})"),
                 data8),
       C::kInvalidArgument, "overflow"},
      {"OverflowEvenWithZeroDim",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[4611686018427387904,)"
                       R"(4611686018427387904,0],"data_offsets":[0,0]})")),
       C::kInvalidArgument, "overflow"},
      {"OffsetsNotArray",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[2],"data_offsets":8})"), data8),
       C::kInvalidArgument, "\"data_offsets\" is not an array of two integers"},
      {"OffsetsOneElement",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8]})"), data8),
       C::kInvalidArgument, "\"data_offsets\" is not an array of two integers"},
      {"OffsetsThreeElements",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]})"), data8),
       C::kInvalidArgument, "\"data_offsets\" is not an array of two integers"},
      {"OffsetNegative",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[0],"data_offsets":[-1,-1]})"), data8),
       C::kInvalidArgument, "\"data_offsets\" are not non-negative integers"},
      {"OffsetString",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[2],"data_offsets":["0","8"]})"), data8),
       C::kInvalidArgument, "\"data_offsets\" are not non-negative integers"},
      {"OffsetFloat",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]})"), data8),
       C::kInvalidArgument, "\"data_offsets\" are not non-negative integers"},
      {"BeginAfterEnd",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]})"), data8),
       C::kInvalidArgument, "begin is after end"},
      {"EndPastDataSection",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]})"), data8),
       C::kDataLoss, "data_offsets [0, 16] end past the 8-byte data section"},
      {"HugeOffsets",
       FileImage(Entry(R"("a":{"dtype":"U8","shape":[1],)"
                       R"("data_offsets":[18446744073709551614,18446744073709551615]})"),
                 data8),
       C::kDataLoss, "end past the 8-byte data section"},
      {"SizeMismatch",
       FileImage(Entry(R"("a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]})"), data8),
       C::kInvalidArgument, "size mismatch: shape [3] of F32 needs 12 bytes"},
      {"Overlap",
       FileImage(Entry(good_a + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]})"),
                 std::string(12, '\0')),
       C::kInvalidArgument, "overlap"},
      {"EmptyTensorInsideAnother",
       FileImage(Entry(good_a + R"(,"b":{"dtype":"F32","shape":[0],"data_offsets":[4,4]})"),
                 data8),
       C::kInvalidArgument, "overlap"},
      {"SameRangeTwice",
       FileImage(Entry(good_a + R"(,"b":{"dtype":"I32","shape":[2],"data_offsets":[0,8]})"),
                 data8),
       C::kInvalidArgument, "overlap"},
      {"DuplicateTensorName",
       FileImage(Entry(good_a + R"(,"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]})"),
                 std::string(16, '\0')),
       C::kInvalidArgument, "duplicate key 'a'"},
      {"DuplicateKeyInsideEntry",
       FileImage(Entry(R"("a":{"dtype":"F32","dtype":"I32","shape":[2],"data_offsets":[0,8]})"),
                 data8),
       C::kInvalidArgument, "duplicate key 'dtype'"},
      {"DuplicateMetadataKey",
       FileImage(R"({"__metadata__":{"k":"1","k":"2"}})"), C::kInvalidArgument,
       "duplicate key 'k'"},
      {"MetadataNotObject", FileImage(R"({"__metadata__":["x"]})"), C::kInvalidArgument,
       "\"__metadata__\" is not a JSON object"},
      {"MetadataValueNotString", FileImage(R"({"__metadata__":{"step":100}})"),
       C::kInvalidArgument, "\"__metadata__\" value for 'step' is not a string"},
      {"MetadataValueNull", FileImage(R"({"__metadata__":{"k":null}})"), C::kInvalidArgument,
       "not a string"},
      {"ControlCharsInNameAreEscaped",
       FileImage(Entry(R"("a\u0001\n":7)")), C::kInvalidArgument,
       "tensor 'a\\x01\\n': entry is not a JSON object"},
  };
}

class MalformedTest : public TempDirTest,
                      public ::testing::WithParamInterface<MalformedCase> {};

TEST_P(MalformedTest, ParseFailsWithClearError) {
  const MalformedCase& c = GetParam();
  const std::string source = "/models/" + c.test_name + ".safetensors";
  auto parsed = ParseSafetensors(AsBytes(c.image), source);
  EXPECT_TRUE(IsError(parsed.status(), c.code, {source + ": ", c.problem}));
}

TEST_P(MalformedTest, OpenFailsWithClearError) {
  const MalformedCase& c = GetParam();
  const std::string path = Path(c.test_name + ".safetensors");
  WriteRaw(path, c.image);
  auto file = SafetensorsFile::Open(path);
  EXPECT_TRUE(IsError(file.status(), c.code, {path + ": ", c.problem}));
}

INSTANTIATE_TEST_SUITE_P(All, MalformedTest, ::testing::ValuesIn(MalformedCases()),
                         [](const auto& info) { return info.param.test_name; });

// A header length just past the 100 MB limit, in a file big enough to hold it: rejected
// before the JSON parser looks at it. The file is sparse, so this costs no disk.
TEST_F(TempDirTest, HeaderOverLimitIsRejected) {
  const uint64_t n = 100'000'001;
  const std::string path = Path("huge_header.safetensors");
  WriteRaw(path, LengthField(n) + "{");
  fs::resize_file(path, 8 + n);
  auto file = SafetensorsFile::Open(path);
  EXPECT_TRUE(IsError(file.status(), absl::StatusCode::kInvalidArgument,
                      {path + ": ", "header length 100000001 exceeds the limit"}));
}

TEST_F(TempDirTest, OpenMissingFileNamesIt) {
  const std::string path = Path("no_such.safetensors");
  auto file = SafetensorsFile::Open(path);
  EXPECT_TRUE(IsError(file.status(), absl::StatusCode::kNotFound,
                      {path, "No such file or directory"}));
}

TEST_F(TempDirTest, OpenDirectoryFails) {
  auto file = SafetensorsFile::Open(dir_);
  EXPECT_TRUE(IsError(file.status(), absl::StatusCode::kFailedPrecondition,
                      {dir_, "not a regular file"}));
}

// Bytes() refuses a range that is not inside this file's data section.
TEST_F(TempDirTest, BytesOfForeignTensorIsEmpty) {
  SafetensorsWriter writer;
  const std::vector<float> x = {1, 2};
  ASSERT_TRUE(writer.Add("x", DType::kF32, {2}, AsBytes(x)).ok());
  const std::string path = Path("x.safetensors");
  ASSERT_TRUE(writer.Write(path).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  TensorInfo foreign;
  foreign.dtype = DType::kF32;
  foreign.shape = {1000};
  foreign.data_begin = 0;
  foreign.data_end = 4000;
  EXPECT_TRUE((*file)->Bytes(foreign).empty());
  foreign.data_begin = 8;
  foreign.data_end = 4;
  EXPECT_TRUE((*file)->Bytes(foreign).empty());
}

// ---------------------------------------------------------------------------------------------
// Writer errors.

TEST(SafetensorsWriterTest, RejectsBadTensors) {
  SafetensorsWriter writer;
  const std::vector<float> two = {1, 2};
  EXPECT_TRUE(IsError(writer.Add("a", DType::kF32, {3}, AsBytes(two)),
                      absl::StatusCode::kInvalidArgument,
                      {"tensor 'a'", "size mismatch", "needs 12 bytes, got 8"}));
  EXPECT_TRUE(IsError(writer.Add("a", DType::kF32, {-2}, AsBytes(two)),
                      absl::StatusCode::kInvalidArgument, {"tensor 'a'", "negative"}));
  EXPECT_TRUE(IsError(writer.Add("a", DType::kF32, {int64_t{1} << 62, int64_t{1} << 62},
                                 AsBytes(two)),
                      absl::StatusCode::kInvalidArgument, {"overflow"}));
  EXPECT_TRUE(IsError(writer.Add("__metadata__", DType::kF32, {2}, AsBytes(two)),
                      absl::StatusCode::kInvalidArgument, {"reserved"}));
  EXPECT_TRUE(IsError(writer.Add("bad\xFF", DType::kF32, {2}, AsBytes(two)),
                      absl::StatusCode::kInvalidArgument, {"UTF-8"}));
  ASSERT_TRUE(writer.Add("a", DType::kF32, {2}, AsBytes(two)).ok());
  EXPECT_TRUE(IsError(writer.Add("a", DType::kF32, {1, 2}, AsBytes(two)),
                      absl::StatusCode::kAlreadyExists, {"tensor 'a'", "duplicate"}));
}

TEST_F(TempDirTest, WriterRejectsNonUtf8Metadata) {
  SafetensorsWriter writer;
  writer.SetMetadata("k", "\xC0\x80");  // overlong NUL
  const std::string path = Path("meta.safetensors");
  EXPECT_TRUE(IsError(writer.Write(path), absl::StatusCode::kInvalidArgument,
                      {path, "metadata", "UTF-8"}));
  EXPECT_FALSE(fs::exists(path));
}

TEST_F(TempDirTest, WriterIntoMissingDirectoryNamesThePath) {
  SafetensorsWriter writer;
  const std::string path = Path("missing/model.safetensors");
  EXPECT_TRUE(IsError(writer.Write(path), absl::StatusCode::kNotFound,
                      {path, "No such file or directory"}));
}

// ---------------------------------------------------------------------------------------------
// Atomic writes.

TEST_F(TempDirTest, AtomicWriteCreatesAndReplaces) {
  const std::string path = Path("config.json");
  ASSERT_TRUE(WriteFileAtomically(path, std::string_view("first")).ok());
  EXPECT_EQ(*ReadFileToString(path), "first");
  ASSERT_TRUE(WriteFileAtomically(path, std::string_view("second, longer")).ok());
  EXPECT_EQ(*ReadFileToString(path), "second, longer");
  ASSERT_TRUE(WriteFileAtomically(path, std::string_view("")).ok());
  EXPECT_EQ(*ReadFileToString(path), "");
  EXPECT_EQ(DirEntries(), std::vector<std::string>{"config.json"}) << "no temporary files left";
}

TEST_F(TempDirTest, AtomicWriteOfPieces) {
  const std::string path = Path("pieces.bin");
  const std::string a = "abc", b = "", c = "defg";
  const std::span<const uint8_t> pieces[] = {AsBytes(a), AsBytes(b), AsBytes(c)};
  ASSERT_TRUE(WriteFileAtomically(path, std::span<const std::span<const uint8_t>>(pieces)).ok());
  EXPECT_EQ(*ReadFileToString(path), "abcdefg");
}

TEST_F(TempDirTest, AtomicWriteRelativePath) {
  const fs::path old_cwd = fs::current_path();
  fs::current_path(dir_);
  const absl::Status status = WriteFileAtomically("relative.txt", std::string_view("r"));
  fs::current_path(old_cwd);
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(*ReadFileToString(Path("relative.txt")), "r");
  EXPECT_EQ(DirEntries(), std::vector<std::string>{"relative.txt"});
}

TEST_F(TempDirTest, AtomicWriteIntoMissingDirectoryFailsAndChangesNothing) {
  const std::string old_path = Path("model.bin");
  ASSERT_TRUE(WriteFileAtomically(old_path, std::string_view("old")).ok());
  const std::string path = Path("no_such_dir/model.bin");
  EXPECT_TRUE(IsError(WriteFileAtomically(path, std::string_view("new")),
                      absl::StatusCode::kNotFound, {path, "No such file or directory"}));
  EXPECT_EQ(*ReadFileToString(old_path), "old");
  EXPECT_EQ(DirEntries(), std::vector<std::string>{"model.bin"});
}

// Renaming over a directory fails after the temporary file was written: it must be removed
// and the directory left alone.
TEST_F(TempDirTest, AtomicWriteOverDirectoryFailsAndCleansUp) {
  const std::string path = Path("subdir");
  fs::create_directory(path);
  WriteRaw(path + "/keep", "kept");
  const absl::Status status = WriteFileAtomically(path, std::string_view("data"));
  EXPECT_TRUE(IsError(status, absl::StatusCode::kFailedPrecondition,
                      {path, "rename", "Is a directory"}));
  EXPECT_EQ(DirEntries(), std::vector<std::string>{"subdir"});
  EXPECT_EQ(*ReadFileToString(path + "/keep"), "kept");
}

TEST_F(TempDirTest, AtomicWriteRejectsDirectoryName) {
  EXPECT_TRUE(IsError(WriteFileAtomically(dir_ + "/", std::string_view("x")),
                      absl::StatusCode::kInvalidArgument, {dir_, "not a file name"}));
}

// Fault injection: a file size limit makes write() fail part way (EFBIG). The old file must
// survive untouched and the temporary file must be gone.
TEST_F(TempDirTest, AtomicWriteFailingMidwayKeepsOldFile) {
  const std::string path = Path("weights.bin");
  ASSERT_TRUE(WriteFileAtomically(path, std::string_view("old contents")).ok());

  struct rlimit old_limit {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  struct rlimit small = old_limit;
  small.rlim_cur = 4096;
  void (*old_handler)(int) = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const std::string big(1 << 16, 'x');
  const absl::Status status = WriteFileAtomically(path, std::string_view(big));
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  ::signal(SIGXFSZ, old_handler);

  EXPECT_TRUE(IsError(status, absl::StatusCode::kOutOfRange, {path, "File too large"}));
  EXPECT_EQ(*ReadFileToString(path), "old contents");
  EXPECT_EQ(DirEntries(), std::vector<std::string>{"weights.bin"});
}

TEST_F(TempDirTest, ConcurrentAtomicWritersLeaveOneWholeFile) {
  const std::string path = Path("shared.txt");
  const std::string a(10000, 'a'), b(20000, 'b');
  auto writer = [&](const std::string& text) {
    for (int i = 0; i < 20; ++i) ASSERT_TRUE(WriteFileAtomically(path, text).ok());
  };
  std::thread t1(writer, std::cref(a)), t2(writer, std::cref(b));
  t1.join();
  t2.join();
  const std::string got = *ReadFileToString(path);
  EXPECT_TRUE(got == a || got == b);
  EXPECT_EQ(DirEntries(), std::vector<std::string>{"shared.txt"});
}

TEST_F(TempDirTest, ReadMissingFileNamesIt) {
  const std::string path = Path("absent.txt");
  EXPECT_TRUE(IsError(ReadFileToString(path).status(), absl::StatusCode::kNotFound,
                      {path, "No such file or directory"}));
}

TEST_F(TempDirTest, ReadDirectoryFails) {
  EXPECT_TRUE(IsError(ReadFileToString(dir_).status(), absl::StatusCode::kFailedPrecondition,
                      {dir_, "is a directory"}));
}

}  // namespace
}  // namespace nibble::engine
