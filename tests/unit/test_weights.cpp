// Loading and saving checkpoints: memory-mapped views, the sharded-directory layout and its
// index, and the errors each broken layout must produce. Files are built in a temporary
// directory per test; the one committed fixture was written by the reference implementation.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/mapped_file.h"
#include "core/safetensors.h"
#include "moxin/errors.h"
#include "moxin/weights.h"

namespace moxin {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "moxin-weights-XXXXXX").string();
    if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// A safetensors image with `header` as given (no padding added) followed by `data`.
std::string safetensors_image(const std::string& header, const std::string& data) {
  std::string image(8, '\0');
  for (int i = 0; i < 8; ++i) image[size_t(i)] = char(uint64_t(header.size()) >> (8 * i));
  return image + header + data;
}

std::vector<std::string> directory_listing(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

bool is_read_only_view(Tensor tensor) {
  try {
    tensor.raw_mut();
    return false;
  } catch (const Error&) {
    return true;
  }
}

// Runs `action`, which must throw a moxin::Error of `kind` whose message holds every phrase.
template <class Action>
void expect_error(Action action, ErrorKind kind, const std::vector<std::string>& phrases) {
  try {
    action();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(e.kind(), kind) << message;
    for (const std::string& phrase : phrases)
      EXPECT_NE(message.find(phrase), std::string::npos)
          << "'" << phrase << "' not in: " << message;
  }
}

Tensor f32_tensor(Shape shape, float start) {
  Tensor t = Tensor::empty(std::move(shape), DType::F32);
  float* values = t.data_mut<float>();
  for (int64_t i = 0; i < t.numel(); ++i) values[i] = start + float(i);
  return t;
}

// How many mappings of `path` this process holds (each shard must be mapped exactly once).
int mappings_of(const fs::path& path) {
  std::ifstream maps("/proc/self/maps");
  const std::string target = fs::canonical(path).string();
  int count = 0;
  for (std::string line; std::getline(maps, line);) {
    if (line.size() >= target.size() &&
        line.compare(line.size() - target.size(), target.size(), target) == 0)
      ++count;
  }
  return count;
}

// ---------------------------------------------------------------------------------------------

TEST(MappedFile, MapsAFileAndReportsOsErrors) {
  TempDir dir;
  write_file(dir / "data.bin", "hello");
  auto file = MappedFile::open(dir / "data.bin");
  ASSERT_EQ(file->size(), 5u);
  EXPECT_EQ(std::memcmp(file->data(), "hello", 5), 0);
  EXPECT_EQ(file->path(), (dir / "data.bin").string());

  const std::string missing = (dir / "missing.bin").string();
  expect_error([&] { MappedFile::open(missing); }, ErrorKind::Io,
               {missing, "No such file or directory"});
  expect_error([&] { MappedFile::open(dir.path()); }, ErrorKind::Io,
               {dir.path().string(), "Is a directory"});
  ASSERT_EQ(::mkfifo((dir / "fifo").c_str(), 0600), 0);
  expect_error([&] { MappedFile::open(dir / "fifo"); }, ErrorKind::Io, {"not a regular file"});
}

TEST(MappedFile, EmptyFileHasNoBytes) {
  TempDir dir;
  write_file(dir / "empty.safetensors", "");
  auto file = MappedFile::open(dir / "empty.safetensors");
  EXPECT_EQ(file->size(), 0u);
  EXPECT_EQ(file->data(), nullptr);
  expect_error([&] { load_safetensors(dir / "empty.safetensors"); }, ErrorKind::FileFormat,
               {(dir / "empty.safetensors").string(), "too short"});
}

TEST(MappedFile, UnreadableFileIsAnIoError) {
  if (::geteuid() == 0) GTEST_SKIP() << "root reads files whatever their permissions";
  TempDir dir;
  write_file(dir / "secret.bin", "x");
  fs::permissions(dir / "secret.bin", fs::perms::none);
  expect_error([&] { MappedFile::open(dir / "secret.bin"); }, ErrorKind::Io,
               {"secret.bin", "Permission denied"});
}

// ---------------------------------------------------------------------------------------------

TEST(WeightMap, InsertsFindsAndRefusesDuplicates) {
  WeightMap weights;
  weights.insert("b", f32_tensor({2}, 0), "one.safetensors");
  weights.insert("a", f32_tensor({1}, 5));
  EXPECT_EQ(weights.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(weights.size(), 2u);
  EXPECT_TRUE(weights.contains("a"));
  EXPECT_EQ(weights.find("zzz"), nullptr);
  EXPECT_EQ(weights.get("a").to_vector(), std::vector<float>{5});
  EXPECT_EQ(weights.source("b"), "one.safetensors");
  EXPECT_EQ(weights.source("a"), "");
  expect_error([&] { weights.insert("b", f32_tensor({2}, 0), "two.safetensors"); },
               ErrorKind::FileFormat, {"'b'", "one.safetensors", "two.safetensors"});
  try {
    weights.get("missing.weight");
    ADD_FAILURE() << "no error";
  } catch (const MissingWeightError& e) {
    EXPECT_EQ(e.name(), "missing.weight");
    EXPECT_EQ(e.kind(), ErrorKind::MissingWeight);
  }
  weights.erase("a");
  EXPECT_FALSE(weights.contains("a"));
  EXPECT_EQ(weights.size(), 1u);
}

// ---------------------------------------------------------------------------------------------

TEST(LoadSafetensors, ReadsAFileTheReferenceImplementationWrote) {
  const fs::path path =
      fs::path(MOXIN_SOURCE_DIR) / "tests/fixtures/safetensors/reference.safetensors";
  const WeightMap weights = load_safetensors(path);
  EXPECT_EQ(weights.names(), (std::vector<std::string>{"bf16", "empty", "f16", "f32", "f64", "i64",
                                                       "scalar", "u32", "u8"}));
  const Tensor& f32 = weights.get("f32");
  EXPECT_EQ(f32.shape(), (Shape{2, 3}));
  EXPECT_EQ(f32.to_vector(), (std::vector<float>{-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f}));
  EXPECT_EQ(weights.get("bf16").dtype(), DType::BF16);
  EXPECT_EQ(weights.get("bf16").to_vector(), (std::vector<float>{0, 0.25f, 0.5f, 0.75f, 1.0f}));
  EXPECT_EQ(weights.get("f16").dtype(), DType::F16);
  EXPECT_EQ(weights.get("f16").to_vector(), (std::vector<float>{0, -1.5f, -3.0f, -4.5f}));
  const Tensor& f64 = weights.get("f64");
  EXPECT_EQ(f64.dtype(), DType::F64);
  EXPECT_EQ(std::vector<double>(f64.data<double>(), f64.data<double>() + 3),
            (std::vector<double>{0.0, 0.25, 0.5}));
  const Tensor& u32 = weights.get("u32");
  EXPECT_EQ(std::vector<uint32_t>(u32.data<uint32_t>(), u32.data<uint32_t>() + 4),
            (std::vector<uint32_t>{0, 1, 2147483648u, 4294967295u}));
  const Tensor& i64 = weights.get("i64");
  EXPECT_EQ(i64.dtype(), DType::I64);
  EXPECT_EQ(i64.data<int64_t>()[0], -1);
  EXPECT_EQ(i64.data<int64_t>()[1], int64_t(1) << 40);
  EXPECT_EQ(std::vector<uint8_t>(weights.get("u8").data<uint8_t>(),
                                 weights.get("u8").data<uint8_t>() + 3),
            (std::vector<uint8_t>{1, 2, 3}));
  EXPECT_EQ(weights.get("empty").shape(), (Shape{0, 3}));
  EXPECT_EQ(weights.get("empty").numel(), 0);
  EXPECT_EQ(weights.get("scalar").shape(), Shape{});
  EXPECT_EQ(weights.get("scalar").to_vector(), std::vector<float>{7.0f});
  // The reference writer aligns every tensor, so all of them are zero-copy views.
  for (const std::string& name : weights.names()) {
    EXPECT_TRUE(is_read_only_view(weights.get(name))) << name;
    EXPECT_EQ(weights.source(name), path.string());
  }
}

TEST(LoadSafetensors, ViewsKeepTheMappingAlive) {
  TempDir dir;
  WeightMap saved;
  saved.insert("w", f32_tensor({64}, 1));
  save_safetensors(dir / "m.safetensors", saved);
  Tensor survivor;
  {
    const WeightMap loaded = load_safetensors(dir / "m.safetensors");
    survivor = loaded.get("w");
    EXPECT_EQ(mappings_of(dir / "m.safetensors"), 1);
  }
  EXPECT_EQ(mappings_of(dir / "m.safetensors"), 1);  // the view holds the mapping
  EXPECT_EQ(survivor.to_vector(), f32_tensor({64}, 1).to_vector());
  survivor = Tensor();
  EXPECT_EQ(mappings_of(dir / "m.safetensors"), 0);  // and releases it with the last view
}

TEST(LoadSafetensors, CopiesTensorsAWriterLeftMisaligned) {
  // A 3-byte... header: the data section starts at byte 8 + header size, which is odd here, so
  // in-place views would be misaligned for every element size above one.
  std::string header =
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]},"
      "\"b\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[12,28]},"
      "\"c\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[28,30]},"
      "\"d\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[30,32]}}";
  if (header.size() % 2 == 0) header += ' ';
  std::string data;
  const float a[3] = {1.5f, -2.0f, 3.25f};
  const double b[2] = {1.0 / 3.0, -7.0};
  data.append(reinterpret_cast<const char*>(a), sizeof a);
  data.append(reinterpret_cast<const char*>(b), sizeof b);
  data += "\x05\x06";
  data += std::string("\x80\x3f", 2);  // bf16 1.0
  TempDir dir;
  write_file(dir / "odd.safetensors", safetensors_image(header, data));

  const WeightMap weights = load_safetensors(dir / "odd.safetensors");
  for (const std::string& name : weights.names()) {
    const Tensor& t = weights.get(name);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % dtype_size(t.dtype()), 0u) << name;
  }
  EXPECT_EQ(weights.get("a").to_vector(), (std::vector<float>{1.5f, -2.0f, 3.25f}));
  EXPECT_EQ(weights.get("b").data<double>()[0], 1.0 / 3.0);
  EXPECT_EQ(weights.get("b").data<double>()[1], -7.0);
  EXPECT_EQ(weights.get("c").data<uint8_t>()[1], 6);
  EXPECT_EQ(weights.get("d").to_vector(), std::vector<float>{1.0f});
  // Single bytes are never misaligned: that tensor stays a view of the mapping.
  EXPECT_TRUE(is_read_only_view(weights.get("c")));
}

TEST(LoadSafetensors, NamesTheFileInFormatErrors) {
  TempDir dir;
  write_file(dir / "bad.safetensors",
             safetensors_image("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                               std::string(8, '\0')));
  expect_error([&] { load_safetensors(dir / "bad.safetensors"); }, ErrorKind::FileFormat,
               {(dir / "bad.safetensors").string(), "tensor 'w'", "run past the data section"});
}

// ---------------------------------------------------------------------------------------------

TEST(SaveSafetensors, RoundTripsEveryDtypeTheEngineStores) {
  WeightMap weights;
  weights.insert("f32", f32_tensor({2, 3}, -2));
  weights.insert("bf16", f32_tensor({5}, 0.5f).to(DType::BF16));
  weights.insert("f16", f32_tensor({3, 1}, -1).to(DType::F16));
  weights.insert("f64", f32_tensor({2}, 0.25f).to(DType::F64));
  Tensor packed = Tensor::empty({3}, DType::U32);
  packed.data_mut<uint32_t>()[0] = 0;
  packed.data_mut<uint32_t>()[1] = 0xdeadbeefu;
  packed.data_mut<uint32_t>()[2] = 0xffffffffu;
  weights.insert("u32", packed);
  weights.insert("zero_rows", Tensor::empty({0, 4}, DType::F32));
  weights.insert("zero_cols", Tensor::empty({2, 0}, DType::BF16));
  weights.insert("scalar", f32_tensor({}, 42));
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "round trip"}};

  TempDir dir;
  const fs::path path = dir / "round.safetensors";
  save_safetensors(path, weights, metadata);

  const WeightMap loaded = load_safetensors(path);
  ASSERT_EQ(loaded.names(), weights.names());
  for (const std::string& name : weights.names()) {
    SCOPED_TRACE(name);
    const Tensor& before = weights.get(name);
    const Tensor& after = loaded.get(name);
    EXPECT_EQ(after.dtype(), before.dtype());
    EXPECT_EQ(after.shape(), before.shape());
    ASSERT_EQ(after.nbytes(), before.nbytes());
    if (before.nbytes()) {
      EXPECT_EQ(std::memcmp(after.raw(), before.raw(), before.nbytes()), 0);
    }
  }

  // The layout: padded header, metadata kept, data in name order.
  const std::string bytes = read_file(path);
  const auto header = safetensors::parse(reinterpret_cast<const uint8_t*>(bytes.data()),
                                         bytes.size(), path.string());
  EXPECT_EQ(header.data_offset % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
  EXPECT_EQ(header.metadata, metadata);
  std::vector<std::string> data_order;
  for (const auto& entry : header.tensors)
    if (entry.end > entry.begin) data_order.push_back(entry.name);
  EXPECT_EQ(data_order, (std::vector<std::string>{"bf16", "f16", "f32", "f64", "scalar", "u32"}));
  EXPECT_EQ(directory_listing(dir.path()), std::vector<std::string>{"round.safetensors"});
}

TEST(SaveSafetensors, ReplacesTheFileAtomically) {
  TempDir dir;
  const fs::path path = dir / "model.safetensors";
  WeightMap first;
  first.insert("w", f32_tensor({4}, 1));
  save_safetensors(path, first);
  const WeightMap old = load_safetensors(path);

  WeightMap second;
  second.insert("w", f32_tensor({4}, 100));
  save_safetensors(path, second);
  // The rename gave the new contents a new inode: the old mapping still reads the old values.
  EXPECT_EQ(old.get("w").to_vector(), f32_tensor({4}, 1).to_vector());
  EXPECT_EQ(load_safetensors(path).get("w").to_vector(), f32_tensor({4}, 100).to_vector());
  EXPECT_EQ(directory_listing(dir.path()), std::vector<std::string>{"model.safetensors"});
}

TEST(SaveSafetensors, ReportsFailuresAndLeavesNothingBehind) {
  TempDir dir;
  WeightMap weights;
  weights.insert("w", f32_tensor({4}, 1));
  const fs::path no_dir = dir / "absent" / "m.safetensors";
  expect_error([&] { save_safetensors(no_dir, weights); }, ErrorKind::Io,
               {(dir / "absent").string(), "No such file or directory"});

  fs::create_directory(dir / "occupied");
  expect_error([&] { save_safetensors(dir / "occupied", weights); }, ErrorKind::Io,
               {(dir / "occupied").string()});
  EXPECT_EQ(directory_listing(dir.path()), std::vector<std::string>{"occupied"});

  WeightMap reserved;
  reserved.insert("__metadata__", f32_tensor({1}, 0));
  expect_error([&] { save_safetensors(dir / "r.safetensors", reserved); }, ErrorKind::Request,
               {"__metadata__"});
  WeightMap undefined;
  undefined.insert("nothing", Tensor());
  expect_error([&] { save_safetensors(dir / "u.safetensors", undefined); }, ErrorKind::Request,
               {"'nothing'"});
  EXPECT_EQ(directory_listing(dir.path()), std::vector<std::string>{"occupied"});
}

// ---------------------------------------------------------------------------------------------

// A model directory with two shards and an index, as Hugging Face writes them.
struct ShardedModel {
  TempDir dir;
  ShardedModel() {
    WeightMap first, second;
    first.insert("embed.weight", f32_tensor({4, 2}, 0));
    first.insert("layers.0.weight", f32_tensor({2, 2}, 10));
    second.insert("layers.1.weight", f32_tensor({2, 2}, 20));
    second.insert("norm.weight", f32_tensor({2}, 30));
    save_safetensors(dir / "model-00001-of-00002.safetensors", first);
    save_safetensors(dir / "model-00002-of-00002.safetensors", second);
  }
  void write_index(const std::string& text) const {
    write_file(dir / "model.safetensors.index.json", text);
  }
  static std::string index_json(const std::string& weight_map) {
    return "{\"metadata\":{\"total_size\":80},\"weight_map\":{" + weight_map + "}}";
  }
  static std::string standard_map() {
    return "\"embed.weight\":\"model-00001-of-00002.safetensors\","
           "\"layers.0.weight\":\"model-00001-of-00002.safetensors\","
           "\"layers.1.weight\":\"model-00002-of-00002.safetensors\","
           "\"norm.weight\":\"model-00002-of-00002.safetensors\"";
  }
};

TEST(LoadSafetensorsDir, LoadsASingleFile) {
  TempDir dir;
  WeightMap weights;
  weights.insert("w", f32_tensor({3}, 7));
  save_safetensors(dir / "model.safetensors", weights);
  const WeightMap loaded = load_safetensors_dir(dir.path());
  EXPECT_EQ(loaded.names(), std::vector<std::string>{"w"});
  EXPECT_EQ(loaded.get("w").to_vector(), (std::vector<float>{7, 8, 9}));
}

TEST(LoadSafetensorsDir, LoadsShardsThroughTheIndexMappingEachOnce) {
  ShardedModel model;
  model.write_index(ShardedModel::index_json(ShardedModel::standard_map()));
  // The index takes precedence over a single-file checkpoint in the same directory.
  WeightMap decoy;
  decoy.insert("decoy", f32_tensor({1}, 0));
  save_safetensors(model.dir / "model.safetensors", decoy);

  const WeightMap weights = load_safetensors_dir(model.dir.path());
  EXPECT_EQ(weights.names(), (std::vector<std::string>{"embed.weight", "layers.0.weight",
                                                       "layers.1.weight", "norm.weight"}));
  EXPECT_EQ(weights.get("layers.1.weight").to_vector(), (std::vector<float>{20, 21, 22, 23}));
  EXPECT_EQ(weights.get("norm.weight").to_vector(), (std::vector<float>{30, 31}));
  EXPECT_EQ(weights.source("embed.weight"),
            (model.dir / "model-00001-of-00002.safetensors").string());
  EXPECT_EQ(weights.source("norm.weight"),
            (model.dir / "model-00002-of-00002.safetensors").string());
  EXPECT_EQ(mappings_of(model.dir / "model-00001-of-00002.safetensors"), 1);
  EXPECT_EQ(mappings_of(model.dir / "model-00002-of-00002.safetensors"), 1);
  EXPECT_EQ(mappings_of(model.dir / "model.safetensors"), 0);
}

TEST(LoadSafetensorsDir, RefusesDirectoriesWithoutACheckpoint) {
  TempDir dir;
  const std::string absent = (dir / "absent").string();
  expect_error([&] { load_safetensors_dir(absent); }, ErrorKind::Io, {absent, "does not exist"});
  write_file(dir / "file", "x");
  expect_error([&] { load_safetensors_dir(dir / "file"); }, ErrorKind::Io,
               {(dir / "file").string(), "not a directory"});
  expect_error([&] { load_safetensors_dir(dir.path()); }, ErrorKind::Io,
               {dir.path().string(), "model.safetensors.index.json", "model.safetensors"});
}

TEST(LoadSafetensorsDir, MissingShardIsAnIoErrorNamingIt) {
  ShardedModel model;
  model.write_index(ShardedModel::index_json(ShardedModel::standard_map() +
                                             ",\"extra\":\"model-00003-of-00002.safetensors\""));
  expect_error([&] { load_safetensors_dir(model.dir.path()); }, ErrorKind::Io,
               {"model-00003-of-00002.safetensors", "No such file or directory"});
}

TEST(LoadSafetensorsDir, RefusesShardNamesOutsideTheDirectory) {
  ShardedModel model;
  // Valid checkpoints at the places the names point to, so only the name check can refuse them.
  fs::create_directory(model.dir / "sub");
  fs::copy_file(model.dir / "model-00002-of-00002.safetensors",
                model.dir / "sub/shard.safetensors");
  const std::string absolute = (model.dir / "model-00002-of-00002.safetensors").string();
  const std::string escaping =
      "../" + model.dir.path().filename().string() + "/model-00002-of-00002.safetensors";
  for (const std::string& shard :
       {absolute, escaping, std::string("sub/shard.safetensors"), std::string("./sub"),
        std::string(""), std::string(".."), std::string("."), std::string("sub\\\\x")}) {
    SCOPED_TRACE(shard);
    model.write_index(ShardedModel::index_json("\"norm.weight\":\"" + shard + "\""));
    expect_error([&] { load_safetensors_dir(model.dir.path()); }, ErrorKind::FileFormat,
                 {"model.safetensors.index.json", "'norm.weight'"});
  }
}

TEST(LoadSafetensorsDir, BrokenIndexIsAJsonError) {
  ShardedModel model;
  const std::vector<std::string> broken = {
      "",
      "{",
      "[]",
      "{\"weight_map\":{\"a\":\"x.safetensors\"}} trailing",
      "{}",
      "{\"weight_map\":[]}",
      "{\"weight_map\":{\"norm.weight\":2}}",
      "{\"weight_map\":{\"norm.weight\":null}}",
      "{\"metadata\":\"x\",\"weight_map\":{}}",
      "{\"weight_map\":{\"\xff\":\"model-00002-of-00002.safetensors\"}}",
      "{\"weight_map\":{\"norm.weight\":\"model-00002-of-00002.safetensors\","
      "\"norm.weight\":\"model-00001-of-00002.safetensors\"}}",
  };
  for (const std::string& text : broken) {
    SCOPED_TRACE(text);
    model.write_index(text);
    expect_error([&] { load_safetensors_dir(model.dir.path()); }, ErrorKind::Json,
                 {(model.dir / "model.safetensors.index.json").string()});
  }
}

TEST(LoadSafetensorsDir, TensorMissingFromItsShardIsAFormatError) {
  ShardedModel model;
  model.write_index(ShardedModel::index_json(
      ShardedModel::standard_map() + ",\"lm_head.weight\":\"model-00002-of-00002.safetensors\""));
  expect_error([&] { load_safetensors_dir(model.dir.path()); }, ErrorKind::FileFormat,
               {"'lm_head.weight'", "model-00002-of-00002.safetensors", "lacks it"});

  // Listed in one shard, present only in the other.
  model.write_index(
      ShardedModel::index_json("\"embed.weight\":\"model-00002-of-00002.safetensors\","
                               "\"norm.weight\":\"model-00002-of-00002.safetensors\","
                               "\"layers.0.weight\":\"model-00001-of-00002.safetensors\""));
  expect_error([&] { load_safetensors_dir(model.dir.path()); }, ErrorKind::FileFormat,
               {"'embed.weight'", "model-00002-of-00002.safetensors", "model-00001-of-00002"});
}

TEST(LoadSafetensorsDir, SameTensorInTwoShardsIsAFormatError) {
  ShardedModel model;
  WeightMap clash;
  clash.insert("norm.weight", f32_tensor({2}, 0));
  clash.insert("other.weight", f32_tensor({2}, 0));
  save_safetensors(model.dir / "model-00002-of-00002.safetensors", clash);
  WeightMap first;
  first.insert("norm.weight", f32_tensor({2}, 0));
  save_safetensors(model.dir / "model-00001-of-00002.safetensors", first);
  model.write_index(
      ShardedModel::index_json("\"norm.weight\":\"model-00001-of-00002.safetensors\","
                               "\"other.weight\":\"model-00002-of-00002.safetensors\""));
  expect_error(
      [&] { load_safetensors_dir(model.dir.path()); }, ErrorKind::FileFormat,
      {"'norm.weight'", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"});
}

TEST(LoadSafetensorsDir, MalformedShardNamesTheShard) {
  ShardedModel model;
  model.write_index(ShardedModel::index_json(ShardedModel::standard_map()));
  std::string bytes = read_file(model.dir / "model-00002-of-00002.safetensors");
  bytes.pop_back();  // truncated data
  write_file(model.dir / "model-00002-of-00002.safetensors", bytes);
  expect_error([&] { load_safetensors_dir(model.dir.path()); }, ErrorKind::FileFormat,
               {(model.dir / "model-00002-of-00002.safetensors").string()});
}

}  // namespace
}  // namespace moxin
