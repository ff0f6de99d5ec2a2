// Image input against Pillow and torchvision: decoding (PNG, JPEG, WebP and their odd modes),
// the bicubic resize, the normalisations, and refusal of bad input. Expected values come from
// reference/make_image_fixtures.py (tests/fixtures/images/manifest.json lists the cases).
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/npy.h"
#include "moxin/errors.h"
#include "moxin/image.h"
#include "test_support.h"

namespace moxin {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

fs::path images_dir() {
  return test::fixtures_dir() / "images";
}

const json& manifest() {
  static const json parsed = [] {
    std::ifstream in(images_dir() / "manifest.json");
    if (!in) return json::object();
    return json::parse(in);
  }();
  return parsed;
}

const json& cases(const char* kind) {
  static const json empty = json::array();
  const json& all = manifest();
  return all.contains(kind) ? all.at(kind) : empty;
}

std::vector<uint8_t> read_bytes(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A [H, W, 3] uint8 reference as an Image.
Image load_reference(const fs::path& file) {
  const Tensor t = npy::load(file);
  EXPECT_EQ(t.dtype(), DType::U8) << file;
  EXPECT_EQ(t.ndim(), 3) << file;
  Image image;
  if (t.dtype() != DType::U8 || t.ndim() != 3 || t.dim(2) != 3) return image;
  image.height = int(t.dim(0));
  image.width = int(t.dim(1));
  const uint8_t* p = t.data<uint8_t>();
  image.rgb.assign(p, p + t.numel());
  return image;
}

// Largest |a - b| over all samples; -1 when the sizes differ.
int max_abs_diff(const Image& a, const Image& b) {
  if (a.width != b.width || a.height != b.height || a.rgb.size() != b.rgb.size()) return -1;
  int worst = 0;
  for (size_t i = 0; i < a.rgb.size(); ++i) worst = std::max(worst, std::abs(a.rgb[i] - b.rgb[i]));
  return worst;
}

Image crop(const Image& image, int x0, int y0, int width, int height) {
  Image out;
  out.width = width;
  out.height = height;
  for (int y = y0; y < y0 + height; ++y) {
    const uint8_t* row = image.rgb.data() + (size_t(y) * image.width + x0) * 3;
    out.rgb.insert(out.rgb.end(), row, row + size_t(width) * 3);
  }
  return out;
}

// The fixture script's row hash: h[y] = sum_i row[i] * splitmix64(i), mod 2^64.
std::vector<uint64_t> row_hashes(const Image& image) {
  const size_t row_size = size_t(image.width) * 3;
  std::vector<uint64_t> weights(row_size);
  for (size_t i = 0; i < row_size; ++i) {
    uint64_t z = (uint64_t(i) + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    weights[i] = z ^ (z >> 31);
  }
  std::vector<uint64_t> hashes(image.height, 0);
  for (int y = 0; y < image.height; ++y) {
    const uint8_t* row = image.rgb.data() + size_t(y) * row_size;
    for (size_t i = 0; i < row_size; ++i) hashes[y] += row[i] * weights[i];
  }
  return hashes;
}

// Rows whose hash differs from the reference's (or -1 on a shape mismatch).
int differing_rows(const Image& image, const fs::path& reference) {
  const Tensor expected = npy::load(reference);
  if (expected.dtype() != DType::U64 || expected.ndim() != 1 || expected.dim(0) != image.height) {
    return -1;
  }
  const std::vector<uint64_t> ours = row_hashes(image);
  const uint64_t* theirs = expected.data<uint64_t>();
  int count = 0;
  for (int y = 0; y < image.height; ++y) count += ours[y] != theirs[y];
  return count;
}

bool is_lossless(const std::string& file) {
  return file.ends_with(".png") || file.find("lossless") != std::string::npos;
}

// --- decoding ---------------------------------------------------------------------------------

TEST(ImageDecode, ManifestIsPresent) {
  ASSERT_TRUE(fs::exists(images_dir() / "manifest.json"))
      << "run python3 reference/make_image_fixtures.py";
  EXPECT_GE(cases("decode").size(), 50u);
  EXPECT_GE(cases("resize").size(), 20u);
  EXPECT_GE(cases("bad").size(), 25u);
  EXPECT_EQ(cases("normalize").size(), 1u);
  EXPECT_EQ(cases("preprocess").size(), 1u);
  EXPECT_EQ(cases("resize_formula").size(), 3u);
}

// Every fixture decodes to Pillow's Image.open(f).convert("RGB"). The requirement is a max
// difference of 1 per channel; lossless formats must be exact, and in practice all are.
TEST(ImageDecode, MatchesPillow) {
  int exact = 0;
  for (const json& c : cases("decode")) {
    const std::string file = c.at("file");
    SCOPED_TRACE(file);
    Image image;
    try {
      image = load_image(images_dir() / file);
    } catch (const Error& e) {
      ADD_FAILURE() << "decode failed: " << e.what();
      continue;
    }
    ASSERT_EQ(image.width, c.at("width").get<int>());
    ASSERT_EQ(image.height, c.at("height").get<int>());
    ASSERT_EQ(image.rgb.size(), size_t(image.width) * image.height * 3);
    int diff = 0;
    std::string detail;
    if (c.contains("rgb")) {
      diff = max_abs_diff(image, load_reference(images_dir() / c.at("rgb").get<std::string>()));
    } else {
      const int rows = differing_rows(image, images_dir() / c.at("row_hash").get<std::string>());
      const json& box = c.at("crop_box");
      diff = max_abs_diff(crop(image, box[0], box[1], box[2], box[3]),
                          load_reference(images_dir() / c.at("crop").get<std::string>()));
      EXPECT_EQ(rows, 0) << "rows differing from Pillow's decode";
      detail = " (whole-image row hashes: " + std::to_string(rows) + " rows differ; max diff " +
               "measured on the " + box[2].dump() + "x" + box[3].dump() + " crop)";
      if (rows != 0 && diff == 0) diff = 1;  // not exact, though the crop happens to be
    }
    std::printf("  decode %-34s %4dx%-4d max |ours - Pillow| = %d%s\n", file.c_str(), image.width,
                image.height, diff, detail.c_str());
    EXPECT_GE(diff, 0) << "size mismatch with the reference";
    EXPECT_LE(diff, 1);
    if (is_lossless(file)) {
      EXPECT_EQ(diff, 0) << "lossless decode must be exact";
    }
    exact += diff == 0;
  }
  std::printf("  %d of %zu decodes bit-exact with Pillow\n", exact, cases("decode").size());
}

TEST(ImageDecode, MemoryBufferEqualsFile) {
  for (const char* file : {"photo_rocket.jpg", "png_palette4_interlaced.png", "webp_lossy.webp"}) {
    const std::vector<uint8_t> bytes = read_bytes(images_dir() / file);
    ASSERT_FALSE(bytes.empty()) << file;
    const Image from_memory = decode_image(bytes.data(), bytes.size());
    const Image from_file = load_image(images_dir() / file);
    EXPECT_EQ(from_memory.rgb, from_file.rgb) << file;
    EXPECT_GT(from_memory.width, 0);
  }
}

TEST(ImageDecode, FormatComesFromContentNotName) {
  // A PNG's bytes decode as PNG whatever they are called; JPEG magic in a ".png" file is JPEG.
  const fs::path dir = fs::temp_directory_path() / "moxin_test_image";
  fs::create_directories(dir);
  fs::copy_file(images_dir() / "jpeg_gray.jpg", dir / "actually_jpeg.png",
                fs::copy_options::overwrite_existing);
  const Image image = load_image(dir / "actually_jpeg.png");
  EXPECT_EQ(image.rgb, load_image(images_dir() / "jpeg_gray.jpg").rgb);
  fs::remove_all(dir);
}

TEST(ImageDecode, MissingFileIsAnIoError) {
  try {
    load_image(images_dir() / "no_such_image.png");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Io);
    EXPECT_NE(std::string(e.what()).find("no_such_image.png"), std::string::npos) << e.what();
  }
}

long max_rss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

// Each bad file fails with an Image error naming the problem, quickly and without allocating
// the declared size (a bomb's header claims up to 10^12 pixels).
TEST(ImageDecode, BadInputsFailCleanly) {
  for (const json& c : cases("bad")) {
    const std::string file = c.at("file");
    const std::string expect = c.at("expect");
    SCOPED_TRACE(file);
    const long rss_before = max_rss_kib();
    const auto start = std::chrono::steady_clock::now();
    try {
      const Image image = load_image(images_dir() / file);
      ADD_FAILURE() << "decoded as " << image.width << "x" << image.height;
    } catch (const Error& e) {
      const std::string message = e.what();
      std::printf("  bad %-32s -> %s\n", file.c_str(), message.c_str());
      EXPECT_EQ(e.kind(), ErrorKind::Image) << message;
      EXPECT_NE(message.find(file), std::string::npos) << "message should name the file";
      EXPECT_NE(message.find(expect), std::string::npos) << "expected '" << expect << "'";
    }
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(ms, 1000.0);
    EXPECT_LT(max_rss_kib() - rss_before, 64 * 1024) << "peak memory grew";
  }
}

TEST(ImageDecode, EmptyAndNullInput) {
  const uint8_t byte = 0x89;
  for (auto [data, size] :
       {std::pair<const uint8_t*, size_t>{nullptr, 0}, {&byte, 0}, {&byte, 1}}) {
    try {
      decode_image(data, size);
      FAIL() << "expected an error";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Image);
    }
  }
}

// The cap is inclusive: an image of exactly max_pixels decodes, one pixel fewer refuses it.
TEST(ImageDecode, PixelLimitIsAppliedToEveryFormat) {
  for (const char* file : {"photo_rocket.jpg", "png_rgb16.png", "webp_lossless.webp",
                           "webp_animated.webp", "png_rgb8_interlaced.png"}) {
    SCOPED_TRACE(file);
    const std::vector<uint8_t> bytes = read_bytes(images_dir() / file);
    const Image image = decode_image(bytes.data(), bytes.size());
    const int64_t pixels = int64_t(image.width) * image.height;
    ImageLimits exact{pixels};
    EXPECT_NO_THROW(decode_image(bytes.data(), bytes.size(), exact));
    ImageLimits below{pixels - 1};
    try {
      decode_image(bytes.data(), bytes.size(), below);
      ADD_FAILURE() << "limit not applied";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Image);
      EXPECT_NE(std::string(e.what()).find("limit"), std::string::npos) << e.what();
    }
  }
}

// Prefixes and corrupted copies of valid files: each either decodes or throws Error(Image) -
// never a crash, hang or sanitizer report.
TEST(ImageDecode, TruncatedAndCorruptedCopiesNeverCrash) {
  std::mt19937 rng(20240601);
  int decoded = 0, refused = 0;
  for (const char* file :
       {"png_rgb8.png", "png_palette4_interlaced.png", "png_rgba16_interlaced.png",
        "jpeg_progressive_420.jpg", "jpeg_baseline_422.jpg", "jpeg_ycck.jpg", "webp_lossy.webp",
        "webp_lossless_alpha.webp", "webp_animated_alpha.webp"}) {
    const std::vector<uint8_t> bytes = read_bytes(images_dir() / file);
    ASSERT_FALSE(bytes.empty()) << file;
    auto attempt = [&](const std::vector<uint8_t>& data) {
      try {
        // A flipped size byte may declare a large image; a lower cap keeps the test quick.
        const Image image = decode_image(data.data(), data.size(), ImageLimits{4'000'000});
        EXPECT_EQ(image.rgb.size(), size_t(image.width) * image.height * 3);
        ++decoded;
      } catch (const Error& e) {
        EXPECT_EQ(e.kind(), ErrorKind::Image) << file << ": " << e.what();
        ++refused;
      }
    };
    const size_t step = std::max<size_t>(1, bytes.size() / 150);
    for (size_t n = 0; n < bytes.size(); n += step) {
      attempt(std::vector<uint8_t>(bytes.begin(), bytes.begin() + n));
    }
    for (int trial = 0; trial < 100; ++trial) {
      std::vector<uint8_t> copy = bytes;
      const int flips = 1 + int(rng() % 8);
      for (int f = 0; f < flips; ++f) copy[rng() % copy.size()] ^= uint8_t(1 + rng() % 255);
      attempt(copy);
    }
  }
  std::printf("  %d damaged copies decoded, %d refused\n", decoded, refused);
  EXPECT_GT(refused, 0);
}

// --- resize -----------------------------------------------------------------------------------

TEST(ImageResize, MatchesPillowBicubic) {
  int exact = 0;
  for (const json& c : cases("resize")) {
    const std::string input = c.at("input");
    const int width = c.at("width"), height = c.at("height");
    SCOPED_TRACE(input + " -> " + std::to_string(width) + "x" + std::to_string(height));
    const Image source = load_image(images_dir() / input);
    const Image ours = resize_bicubic(source, width, height);
    const Image expected = load_reference(images_dir() / c.at("expected").get<std::string>());
    const int diff = max_abs_diff(ours, expected);
    std::printf("  resize %-24s %4dx%-4d -> %4dx%-4d max |ours - Pillow| = %d\n", input.c_str(),
                source.width, source.height, width, height, diff);
    EXPECT_EQ(diff, 0);
    exact += diff == 0;
  }
  std::printf("  %d of %zu resizes bit-exact with Pillow\n", exact, cases("resize").size());
}

// The synthetic inputs of the fixture script, recomputed from the same formula.
Image formula_image(int width, int height) {
  Image image;
  image.width = width;
  image.height = height;
  image.rgb.resize(size_t(width) * height * 3);
  for (uint32_t y = 0; y < uint32_t(height); ++y) {
    for (uint32_t x = 0; x < uint32_t(width); ++x) {
      for (uint32_t c = 0; c < 3; ++c) {
        const uint32_t v = ((x * x + 3 * y * y) >> 9) + (x ^ (y * 3)) + ((x * y) >> 11) + 85 * c;
        image.rgb[(size_t(y) * width + x) * 3 + c] = uint8_t(v & 255);
      }
    }
  }
  return image;
}

// A 12-megapixel photo-sized input: exact, and timed.
TEST(ImageResize, LargeInputIsExactAndFast) {
  for (const json& c : cases("resize_formula")) {
    const int iw = c.at("input_width"), ih = c.at("input_height");
    const int width = c.at("width"), height = c.at("height");
    const Image source = formula_image(iw, ih);
    ASSERT_EQ(differing_rows(source, images_dir() / c.at("input_row_hash").get<std::string>()), 0)
        << "the C++ and Python formulas disagree";
    double best_ms = 1e30;
    Image ours;
    for (int run = 0; run < 3; ++run) {
      const auto start = std::chrono::steady_clock::now();
      ours = resize_bicubic(source, width, height);
      best_ms = std::min(best_ms, std::chrono::duration<double, std::milli>(
                                      std::chrono::steady_clock::now() - start)
                                      .count());
    }
    const int diff =
        max_abs_diff(ours, load_reference(images_dir() / c.at("expected").get<std::string>()));
    std::printf("  resize %dx%d -> %dx%d: %.1f ms (best of 3), max |ours - Pillow| = %d\n", iw, ih,
                width, height, best_ms, diff);
    EXPECT_EQ(diff, 0);
  }
}

TEST(ImageResize, IdentityReturnsTheSamePixels) {
  const Image source = load_image(images_dir() / "png_rgb8.png");
  EXPECT_EQ(resize_bicubic(source, source.width, source.height).rgb, source.rgb);
}

TEST(ImageResize, RejectsInvalidArguments) {
  const Image source = load_image(images_dir() / "png_rgb8.png");
  Image broken = source;
  broken.rgb.pop_back();
  for (auto call : std::vector<std::function<void()>>{
           [&] { resize_bicubic(source, 0, 10); }, [&] { resize_bicubic(source, 10, -1); },
           [&] { resize_bicubic(source, 100000, 100000); }, [&] { resize_bicubic(broken, 10, 10); },
           [&] { resize_bicubic(Image{}, 10, 10); }}) {
    try {
      call();
      ADD_FAILURE() << "expected an error";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Request) << e.what();
    }
  }
}

// --- tensors and normalisation ------------------------------------------------------------------

void expect_tensor_equal(const Tensor& ours, const fs::path& reference, const char* what) {
  const Tensor expected = npy::load(reference);
  ASSERT_EQ(ours.shape(), expected.shape()) << what;
  ASSERT_EQ(expected.dtype(), DType::F32) << what;
  const float* a = ours.data<float>();
  const float* b = expected.data<float>();
  double worst = 0;
  int64_t unequal = 0;
  for (int64_t i = 0; i < ours.numel(); ++i) {
    worst = std::max(worst, double(std::fabs(a[i] - b[i])));
    unequal += a[i] != b[i];
  }
  std::printf("  %-28s max |ours - torchvision| = %.3g (%lld of %lld values not identical)\n", what,
              worst, (long long)unequal, (long long)ours.numel());
  EXPECT_LE(worst, 1e-6) << what;
}

TEST(ImageTensor, NormalizationMatchesTorchvision) {
  ASSERT_EQ(cases("normalize").size(), 1u);
  const json& c = cases("normalize")[0];
  const Image pixels = load_reference(images_dir() / c.at("input").get<std::string>());
  const Tensor tensor = image_to_tensor(pixels);  // [1, H, W, 3]
  ASSERT_EQ(tensor.shape(), (Shape{1, pixels.height, pixels.width, 3}));
  expect_tensor_equal(tensor, images_dir() / c.at("to_tensor").get<std::string>(), "to_tensor");
  expect_tensor_equal(normalize_dino(tensor), images_dir() / c.at("dino").get<std::string>(),
                      "normalize_dino");
  expect_tensor_equal(normalize_siglip(tensor), images_dir() / c.at("siglip").get<std::string>(),
                      "normalize_siglip");

  // A batch of two normalises each image independently.
  Tensor batch = Tensor::empty({2, pixels.height, pixels.width, 3});
  const size_t bytes = tensor.nbytes();
  std::memcpy(batch.data_mut<float>(), tensor.data<float>(), bytes);
  std::memcpy(batch.data_mut<float>() + tensor.numel(), tensor.data<float>(), bytes);
  const Tensor normalized = normalize_dino(batch);
  const Tensor single = normalize_dino(tensor);
  EXPECT_EQ(std::memcmp(normalized.data<float>() + tensor.numel(), single.data<float>(), bytes), 0);
}

TEST(ImageTensor, PreprocessMatchesTheReferencePipeline) {
  ASSERT_EQ(cases("preprocess").size(), 1u);
  const json& c = cases("preprocess")[0];
  const Image image = load_image(images_dir() / c.at("input").get<std::string>());
  const PreprocessedImage out = preprocess_image(image, c.at("size"));
  expect_tensor_equal(out.dino, images_dir() / c.at("dino").get<std::string>(), "preprocess dino");
  expect_tensor_equal(out.siglip, images_dir() / c.at("siglip").get<std::string>(),
                      "preprocess siglip");
  const PreprocessedImage standard = preprocess_image(image);
  EXPECT_EQ(standard.dino.shape(), (Shape{1, 224, 224, 3}));
  EXPECT_EQ(standard.siglip.shape(), (Shape{1, 224, 224, 3}));
}

TEST(ImageTensor, RejectsWrongShapesAndTypes) {
  const std::vector<Tensor> bad = {
      Tensor(),
      Tensor::zeros({1, 4, 4, 4}),
      Tensor::zeros({4, 4, 3}),
      Tensor::zeros({1, 1, 4, 4, 3}),
      Tensor::zeros({1, 4, 4, 3}, DType::BF16),
  };
  for (const Tensor& t : bad) {
    for (auto normalize : {&normalize_dino, &normalize_siglip}) {
      try {
        normalize(t);
        ADD_FAILURE() << "accepted " << shape_to_string(t.shape());
      } catch (const Error& e) {
        EXPECT_EQ(e.kind(), ErrorKind::Request) << e.what();
      }
    }
  }
  EXPECT_NO_THROW(normalize_siglip(Tensor::zeros({3, 2, 5, 3})));
  try {
    preprocess_image(load_image(images_dir() / "png_rgb8.png"), 0);
    ADD_FAILURE() << "size 0 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Request);
  }
  try {
    image_to_tensor(Image{});
    ADD_FAILURE() << "empty image accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Request);
  }
}

}  // namespace
}  // namespace moxin
