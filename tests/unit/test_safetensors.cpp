// The safetensors parser against a corpus of malformed files built here, byte by byte: every
// case must be refused with a FileFormat error that names the file (and the tensor at fault),
// and must not read outside the buffer (the buffers are sized exactly, so ASan would see it).
#include <gtest/gtest.h>

#include <unistd.h>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>
#include <string>
#include <vector>

#include "core/safetensors.h"
#include "moxin/errors.h"
#include "moxin/weights.h"

// Records the largest single allocation made through operator new, so a test can show that a
// header declaring petabytes of data is refused without trying to allocate them.
namespace {
std::atomic<size_t> g_largest_allocation{0};
void* counted_allocation(size_t size) {
  size_t seen = g_largest_allocation.load();
  while (size > seen && !g_largest_allocation.compare_exchange_weak(seen, size)) {
  }
  if (void* p = std::malloc(size ? size : 1)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(size_t size) {
  return counted_allocation(size);
}
void* operator new[](size_t size) {
  return counted_allocation(size);
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete[](void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, size_t) noexcept {
  std::free(p);
}
void operator delete[](void* p, size_t) noexcept {
  std::free(p);
}

namespace moxin {
namespace {

constexpr const char* kSource = "corpus/bad.safetensors";

std::vector<uint8_t> with_length(uint64_t declared_header_bytes, const std::string& header,
                                 size_t data_bytes) {
  std::vector<uint8_t> file(8 + header.size() + data_bytes);
  for (int i = 0; i < 8; ++i) file[size_t(i)] = uint8_t(declared_header_bytes >> (8 * i));
  std::memcpy(file.data() + 8, header.data(), header.size());
  for (size_t i = 0; i < data_bytes; ++i) file[8 + header.size() + i] = uint8_t(i * 7 + 1);
  return file;
}

// A file image whose length prefix tells the truth about `header`.
std::vector<uint8_t> file_with(const std::string& header, size_t data_bytes) {
  return with_length(header.size(), header, data_bytes);
}

// One F32 tensor entry.
std::string f32(const std::string& name, const std::string& shape, uint64_t begin, uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"F32\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

struct BadCase {
  const char* label;
  std::vector<uint8_t> file;
  std::string tensor;  // the tensor the message must name; empty when none is at fault
  std::string reason;  // a phrase of the message that identifies why the file was refused
};

std::vector<BadCase> malformed_corpus() {
  std::vector<BadCase> cases;
  auto add = [&](const char* label, std::vector<uint8_t> file, std::string tensor,
                 std::string reason) {
    cases.push_back({label, std::move(file), std::move(tensor), std::move(reason)});
  };
  const std::string ok_a = f32("a", "[2]", 0, 8);

  // The length prefix.
  add("empty file", {}, "", "too short");
  add("seven bytes", {2, 0, 0, 0, 0, 0, 0}, "", "too short");
  add("header length above the cap", with_length(safetensors::kMaxHeaderBytes + 1, "{}", 0), "",
      "exceeds the limit");
  add("header length 2^64-1", with_length(~uint64_t(0), "{}", 0), "", "exceeds the limit");
  add("header length beyond the file", with_length(1000, "{" + ok_a + "}", 8), "",
      "runs past the end");
  add(
      "header truncated mid-JSON",
      [&] {
        auto file = file_with("{" + ok_a + "}", 8);
        file.resize(20);
        return file;
      }(),
      "", "runs past the end");
  add("header length zero", with_length(0, "", 0), "", "not valid JSON");
  add("header length one byte short",
      with_length(std::string("{" + ok_a + "}").size() - 1, "{" + ok_a + "}", 8), "",
      "not valid JSON");

  // The header text.
  add("header is an array", file_with("[]", 0), "", "header is a JSON array, not an object");
  add("header is a string", file_with("\"{}\"", 0), "", "header is a JSON string, not an object");
  add("header is blank", file_with("        ", 0), "", "not valid JSON");
  add("unterminated object", file_with("{\"a\":", 0), "", "not valid JSON");
  add("garbage after the object", file_with("{} x", 0), "", "not valid JSON");
  add("NUL padding", file_with(std::string("{}\0\0", 4), 0), "", "NUL byte (byte 2");
  add("NUL before a second entry",
      file_with(
          "{" + f32("a", "[1]", 0, 4) + std::string("\0", 1) + "," + f32("b", "[1]", 4, 8) + "}",
          8),
      "", "NUL byte");
  add("invalid UTF-8 byte", file_with("{\"\xff\":1}", 0), "", "not valid UTF-8");
  add("overlong UTF-8", file_with("{\"\xc0\xaf\":1}", 0), "", "not valid UTF-8");
  add("UTF-8 surrogate", file_with("{\"\xed\xa0\x80\":1}", 0), "", "not valid UTF-8");
  add("UTF-8 above U+10FFFF", file_with("{\"\xf4\x90\x80\x80\":1}", 0), "", "not valid UTF-8");
  add("truncated UTF-8 sequence", file_with("{\"\xe2\x82", 0), "", "not valid UTF-8");
  add("escaped lone surrogate", file_with("{\"\\ud800\":1}", 0), "", "not valid JSON");

  // Entries of the wrong JSON type, or lacking fields.
  add("entry is a string", file_with("{\"a\":\"F32\"}", 0), "a", "entry is a JSON string");
  add("entry is an array", file_with("{\"a\":[1,2]}", 0), "a", "entry is a JSON array");
  add("entry is null", file_with("{\"a\":null}", 0), "a", "entry is a JSON null");
  add("no dtype", file_with("{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "a",
      "lacks \"dtype\"");
  add("no shape", file_with("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8), "a",
      "lacks \"shape\"");
  add("no data_offsets", file_with("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8), "a",
      "lacks \"data_offsets\"");
  add("dtype is a number",
      file_with("{\"a\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "a",
      "\"dtype\" is a JSON number");
  add("unknown dtype",
      file_with("{\"a\":{\"dtype\":\"F128\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "a",
      "unknown dtype \"F128\"");
  add("lower-case dtype",
      file_with("{\"a\":{\"dtype\":\"f32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "a",
      "unknown dtype \"f32\"");
  add("8-bit float dtype",
      file_with("{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2), "a",
      "F8_E4M3 is not supported");
  add("shape is a string", file_with("{" + f32("a", "\"2\"", 0, 8) + "}", 8), "a",
      "\"shape\" is a JSON string");
  add("shape is an object", file_with("{" + f32("a", "{}", 0, 8) + "}", 8), "a",
      "\"shape\" is a JSON object");
  add("shape holds a string", file_with("{" + f32("a", "[\"2\"]", 0, 8) + "}", 8), "a",
      "dimension is a JSON string");
  add("shape holds null", file_with("{" + f32("a", "[null]", 0, 8) + "}", 8), "a",
      "dimension is a JSON null");
  add("shape holds an array", file_with("{" + f32("a", "[[2]]", 0, 8) + "}", 8), "a",
      "nests too deeply");
  add("negative dimension", file_with("{" + f32("a", "[-2]", 0, 8) + "}", 8), "a",
      "negative number -2");
  add("fractional dimension", file_with("{" + f32("a", "[1.5]", 0, 8) + "}", 8), "a",
      "non-integer 1.5");
  add("integral float dimension", file_with("{" + f32("a", "[2.0]", 0, 8) + "}", 8), "a",
      "non-integer 2.0");
  add("exponent dimension", file_with("{" + f32("a", "[2e0]", 0, 8) + "}", 8), "a", "non-integer");
  add("dimension beyond 64 bits",
      file_with("{" + f32("a", "[18446744073709551616]", 0, 8) + "}", 8), "a", "non-integer");
  add("dimension beyond int64", file_with("{" + f32("a", "[9223372036854775808]", 0, 8) + "}", 8),
      "a", "too large");
  add("rank above the limit",
      file_with("{" +
                    f32(
                        "a",
                        "[1" +
                            [] {
                              std::string ones;
                              for (size_t i = 0; i < safetensors::kMaxRank; ++i) ones += ",1";
                              return ones;
                            }() +
                            "]",
                        0, 4) +
                    "}",
                4),
      "a", "more than 32 entries");
  add("data_offsets is a string",
      file_with("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":\"0,8\"}}", 8), "a",
      "must be [begin, end]");
  add("data_offsets with one number",
      file_with("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8]}}", 8), "a",
      "must be [begin, end]");
  add("data_offsets with three numbers",
      file_with("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]}}", 8), "a",
      "must be [begin, end]");
  add("data_offsets holds a string",
      file_with("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,\"8\"]}}", 8), "a",
      "end is a JSON string");
  add("negative begin",
      file_with("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", 8), "a",
      "begin is the negative number -8");
  add("fractional end",
      file_with("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8.0]}}", 8), "a",
      "end is the non-integer 8.0");
  add("empty tensor name", file_with("{" + f32("", "[2]", 0, 8) + "}", 8), "", "empty name");
  add("duplicate tensor name", file_with("{" + ok_a + "," + f32("a", "[2]", 8, 16) + "}", 16), "a",
      "appears twice");
  add("duplicate field",
      file_with(
          "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8),
      "a", "duplicate key 'dtype'");
  add("deep nesting in an unknown field",
      file_with(
          "{\"a\":{\"dtype\":\"F32\",\"x\":[[[[[[]]]]]],\"shape\":[2],\"data_offsets\":[0,8]}}", 8),
      "a", "nests too deeply");

  // Metadata.
  add("metadata is a string", file_with("{\"__metadata__\":\"x\"}", 0), "",
      "\"__metadata__\" is a JSON string");
  add("metadata is an array", file_with("{\"__metadata__\":[\"x\"]}", 0), "",
      "\"__metadata__\" is a JSON array");
  add("metadata value is a number", file_with("{\"__metadata__\":{\"format\":1}}", 0), "",
      "value for 'format' is a JSON number");
  add("metadata value is an object", file_with("{\"__metadata__\":{\"format\":{}}}", 0), "",
      "value for 'format' is a JSON object");
  add("metadata value is null", file_with("{\"__metadata__\":{\"format\":null}}", 0), "",
      "value for 'format' is a JSON null");
  add("duplicate metadata key", file_with("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0), "",
      "has a duplicate key 'k'");

  // Offsets and sizes that lie.
  add("begin after end",
      file_with("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 8), "a",
      "begin after they end");
  add("byte count disagrees with shape", file_with("{" + f32("a", "[2]", 0, 4) + "}", 4), "a",
      "needs 8 bytes but data_offsets [0, 4] hold 4");
  add("data truncated", file_with("{" + ok_a + "}", 7), "a", "run past the data section of 7");
  add("no data at all", file_with("{" + ok_a + "}", 0), "a", "run past the data section of 0");
  add("offsets past the end", file_with("{" + f32("a", "[2]", 8, 16) + "}", 8), "a",
      "run past the data section");
  add("not starting at zero", file_with("{" + f32("a", "[1]", 4, 8) + "}", 8), "a",
      "leave a gap after byte 0");
  add("gap between tensors",
      file_with("{" + f32("a", "[1]", 0, 4) + "," + f32("b", "[1]", 8, 12) + "}", 12), "b",
      "leave a gap after byte 4");
  add("overlapping tensors", file_with("{" + ok_a + "," + f32("b", "[2]", 4, 12) + "}", 12), "b",
      "overlap the previous tensor");
  add("identical offsets", file_with("{" + ok_a + "," + f32("b", "[2]", 0, 8) + "}", 8), "b",
      "overlap the previous tensor");
  add("trailing bytes", file_with("{" + ok_a + "}", 12), "", "trailing bytes");
  add("data but no tensors", file_with("{}", 3), "", "trailing bytes");
  add("overflowing shape",
      file_with("{" + f32("a", "[1099511627776,1099511627776,1099511627776]", 0, 8) + "}", 8), "a",
      "overflows 64-bit sizes");
  add("element count beyond int64",
      file_with(
          "{\"a\":{\"dtype\":\"U8\",\"shape\":[4294967296,2147483648],\"data_offsets\":[0,8]}}", 8),
      "a", "overflows 64-bit sizes");
  add("byte count overflows after the element size",
      file_with("{" + f32("a", "[4611686018427387904]", 0, 8) + "}", 8), "a",
      "overflows 64-bit sizes");
  add("byte count wraps to the declared size",
      // 2^62 F32 elements are 2^64 bytes, which a wrapping multiply would call 0.
      file_with("{" + f32("a", "[4611686018427387904]", 0, 0) + "}", 0), "a",
      "overflows 64-bit sizes");
  add("header-only file declaring a petabyte",
      file_with("{\"a\":{\"dtype\":\"U8\",\"shape\":[33554432,33554432],"
                "\"data_offsets\":[0,1125899906842624]}}",
                0),
      "a", "run past the data section of 0");
  return cases;
}

TEST(SafetensorsParse, RefusesEveryMalformedFileNamingFileAndTensor) {
  const auto cases = malformed_corpus();
  ASSERT_GE(cases.size(), 70u);
  for (const BadCase& bad : cases) {
    SCOPED_TRACE(bad.label);
    // A copy of exactly the file's size, so any read past its end is a heap overflow for ASan.
    const std::unique_ptr<uint8_t[]> exact(new uint8_t[bad.file.size() + (bad.file.empty())]);
    if (!bad.file.empty()) std::memcpy(exact.get(), bad.file.data(), bad.file.size());
    try {
      safetensors::parse(exact.get(), bad.file.size(), kSource);
      ADD_FAILURE() << "parsed without error";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_EQ(e.kind(), ErrorKind::FileFormat) << message;
      EXPECT_EQ(message.rfind(std::string(kSource) + ": ", 0), 0u) << message;
      EXPECT_NE(message.find(bad.reason), std::string::npos) << message;
      if (!bad.tensor.empty()) {
        EXPECT_NE(message.find("tensor '" + bad.tensor + "'"), std::string::npos) << message;
      }
    }
  }
}

TEST(SafetensorsParse, EveryPrefixOfAValidFileIsRefused) {
  const auto file =
      file_with("{\"__metadata__\":{\"format\":\"pt\"}," + f32("a", "[2]", 0, 8) + "," +
                    "\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[8,14]}}",
                14);
  ASSERT_NO_THROW(safetensors::parse(file.data(), file.size(), kSource));
  for (size_t size = 0; size < file.size(); ++size) {
    std::vector<uint8_t> prefix(file.begin(), file.begin() + ptrdiff_t(size));
    try {
      safetensors::parse(prefix.data(), prefix.size(), kSource);
      ADD_FAILURE() << "a " << size << "-byte prefix parsed";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::FileFormat);
    }
  }
}

TEST(SafetensorsParse, ReadsAValidHeader) {
  // Entries out of data order in the JSON, metadata, an unknown key the format tolerates, a
  // scalar and zero-element tensors (legal, and allowed to share an offset).
  const std::string header =
      "{\"w\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[16,28]},"
      "\"__metadata__\":{\"format\":\"pt\",\"note\":\"\xc3\xa9t\xc3\xa9\"},"
      "\"scalar\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[0,8],\"extra\":[1,2]},"
      "\"empty_a\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[8,8]},"
      "\"empty_b\":{\"dtype\":\"U32\",\"shape\":[3,0],\"data_offsets\":[8,8]},"
      "\"ids\":{\"dtype\":\"U32\",\"shape\":[2],\"data_offsets\":[8,16]}}  ";
  const auto file = file_with(header, 28);
  const safetensors::Header parsed = safetensors::parse(file.data(), file.size(), kSource);
  EXPECT_EQ(parsed.data_offset, 8 + header.size());
  ASSERT_EQ(parsed.tensors.size(), 5u);
  const char* order[] = {"scalar", "empty_a", "empty_b", "ids", "w"};
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(parsed.tensors[i].name, order[i]);
  EXPECT_EQ(parsed.tensors[0].dtype, DType::F64);
  EXPECT_EQ(parsed.tensors[0].shape, Shape{});
  EXPECT_EQ(parsed.tensors[1].shape, (Shape{0, 4}));
  EXPECT_EQ(parsed.tensors[4].dtype, DType::BF16);
  EXPECT_EQ(parsed.tensors[4].shape, (Shape{2, 3}));
  EXPECT_EQ(parsed.tensors[4].begin, 16u);
  EXPECT_EQ(parsed.tensors[4].end, 28u);
  EXPECT_EQ(parsed.metadata.at("format"), "pt");
  EXPECT_EQ(parsed.metadata.at("note"), "\xc3\xa9t\xc3\xa9");
}

TEST(SafetensorsParse, AcceptsEveryKnownDtype) {
  const std::pair<const char*, size_t> dtypes[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"I16", 2}, {"U16", 2}, {"F16", 2}, {"BF16", 2},
      {"I32", 4},  {"U32", 4}, {"F32", 4}, {"F64", 8}, {"I64", 8}, {"U64", 8}};
  for (const auto& [name, size] : dtypes) {
    SCOPED_TRACE(name);
    const auto file =
        file_with("{\"t\":{\"dtype\":\"" + std::string(name) +
                      "\",\"shape\":[3],\"data_offsets\":[0," + std::to_string(3 * size) + "]}}",
                  3 * size);
    const auto parsed = safetensors::parse(file.data(), file.size(), kSource);
    ASSERT_EQ(parsed.tensors.size(), 1u);
    EXPECT_EQ(dtype_name(parsed.tensors[0].dtype), name);
  }
}

TEST(SafetensorsParse, EmptyHeaderObjectIsAnEmptyFile) {
  // JSON whitespace around the object is allowed, as the reference implementation allows it.
  const auto file = file_with(" \n{}      ", 0);
  const auto parsed = safetensors::parse(file.data(), file.size(), kSource);
  EXPECT_TRUE(parsed.tensors.empty());
  EXPECT_TRUE(parsed.metadata.empty());
}

TEST(SafetensorsParse, OrderOfDimensionsDoesNotDecideOverflow) {
  // A zero extent makes the tensor empty whatever the other extents multiply to.
  for (const char* shape : {"[0,4611686018427387904,4611686018427387904]",
                            "[4611686018427387904,4611686018427387904,0]"}) {
    SCOPED_TRACE(shape);
    std::string header = "{";
    header += f32("e", shape, 0, 0);
    header += "}";
    const auto file = file_with(header, 0);
    EXPECT_EQ(safetensors::parse(file.data(), file.size(), kSource).tensors.size(), 1u);
  }
}

TEST(SafetensorsParse, CraftedHeaderDoesNotAllocateTheDeclaredSize) {
  // 2^40 bytes declared (and consistent with the shape), none present: the parser and the
  // loader must refuse from the header alone.
  const auto file = file_with(
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[262144,1048576],\"data_offsets\":[0,1099511627776]}}",
      0);
  g_largest_allocation = 0;
  EXPECT_THROW(safetensors::parse(file.data(), file.size(), kSource), Error);
  EXPECT_LT(g_largest_allocation.load(), size_t(1) << 20);

  const auto dir =
      std::filesystem::temp_directory_path() / ("moxin-st-crafted-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "crafted.safetensors";
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(file.data()), std::streamsize(file.size()));
  g_largest_allocation = 0;
  try {
    load_safetensors(path);
    ADD_FAILURE() << "loaded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::FileFormat);
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
  EXPECT_LT(g_largest_allocation.load(), size_t(1) << 20);
  std::filesystem::remove_all(dir);
}

TEST(SafetensorsSerialize, PadsTheHeaderAndRefusesUnwritableNames) {
  std::vector<safetensors::Entry> entries = {{"b", DType::F32, {2}, 0, 8}};
  for (const std::string& note : {std::string(""), std::string("x"), std::string("xyzabcd")}) {
    const std::string header = safetensors::serialize_header(entries, {{"note", note}});
    EXPECT_EQ(header.size() % 8, 0u);
    EXPECT_EQ(header.front(), '{');
    const auto file = file_with(header, 8);
    const auto parsed = safetensors::parse(file.data(), file.size(), kSource);
    EXPECT_EQ(parsed.metadata.at("note"), note);
    ASSERT_EQ(parsed.tensors.size(), 1u);
    EXPECT_EQ(parsed.tensors[0].shape, Shape{2});
  }
  for (const std::string& name :
       {std::string(""), std::string("__metadata__"), std::string("\xff")}) {
    SCOPED_TRACE(name);
    try {
      safetensors::serialize_header({{name, DType::F32, {1}, 0, 4}}, {});
      ADD_FAILURE() << "serialized";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Request);
    }
  }
  EXPECT_THROW(safetensors::serialize_header({}, {{"k", "\xc0\x80"}}), Error);
}

}  // namespace
}  // namespace moxin
