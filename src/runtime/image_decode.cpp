// Format detection by magic bytes, file loading and the checks every decoder shares.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>

#include "moxin/errors.h"
#include "moxin/image.h"
#include "runtime/image_codecs.h"

namespace moxin {
namespace image_detail {

void fail(const std::string& message) {
  throw_error(ErrorKind::Image, message);
}

void check_dimensions(const char* format, int64_t width, int64_t height,
                      const ImageLimits& limits) {
  const std::string size = std::to_string(width) + "x" + std::to_string(height);
  if (width <= 0 || height <= 0) fail(std::string(format) + ": empty image (" + size + ")");
  // Both are at most 2^32 (the largest any of the three formats can declare), so the product
  // does not overflow int64.
  const int64_t pixels = width * height;
  if (pixels > limits.max_pixels) {
    fail(std::string(format) + ": " + size + " is " + std::to_string(pixels) +
         " pixels, more than the limit of " + std::to_string(limits.max_pixels) + " pixels");
  }
  if (uint64_t(pixels) > std::numeric_limits<size_t>::max() / 4 ||
      width > std::numeric_limits<int>::max() || height > std::numeric_limits<int>::max()) {
    fail(std::string(format) + ": " + size + " is too large to address");
  }
}

Image allocate_image(int64_t width, int64_t height) {
  Image image;
  image.width = int(width);
  image.height = int(height);
  image.rgb.assign(size_t(width) * size_t(height) * 3, 0);
  return image;
}

}  // namespace image_detail

namespace {

enum class Format { Png, Jpeg, WebP, Unknown };

Format sniff(const uint8_t* data, size_t size) {
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (size >= 8 && std::memcmp(data, kPng, 8) == 0) return Format::Png;
  if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) return Format::Jpeg;
  if (size >= 12 && std::memcmp(data, "RIFF", 4) == 0 && std::memcmp(data + 8, "WEBP", 4) == 0) {
    return Format::WebP;
  }
  return Format::Unknown;
}

const char* describe_unknown(const uint8_t* data, size_t size) {
  if (size >= 6 && (std::memcmp(data, "GIF87a", 6) == 0 || std::memcmp(data, "GIF89a", 6) == 0)) {
    return "unsupported image format GIF (PNG, JPEG and WebP are supported)";
  }
  if (size >= 2 && data[0] == 'B' && data[1] == 'M') {
    return "unsupported image format BMP (PNG, JPEG and WebP are supported)";
  }
  if (size >= 4 && (std::memcmp(data, "II*\0", 4) == 0 || std::memcmp(data, "MM\0*", 4) == 0)) {
    return "unsupported image format TIFF (PNG, JPEG and WebP are supported)";
  }
  return "unrecognised image format (not a PNG, JPEG or WebP signature)";
}

}  // namespace

Image decode_image(const uint8_t* data, size_t size, const ImageLimits& limits) {
  if (data == nullptr || size == 0) image_detail::fail("empty input: no image data");
  switch (sniff(data, size)) {
    case Format::Png:
      return image_detail::decode_png(data, size, limits);
    case Format::Jpeg:
      return image_detail::decode_jpeg(data, size, limits);
    case Format::WebP:
      return image_detail::decode_webp(data, size, limits);
    case Format::Unknown:
      break;
  }
  image_detail::fail(describe_unknown(data, size));
}

Image load_image(const std::filesystem::path& file, const ImageLimits& limits) {
  std::unique_ptr<FILE, int (*)(FILE*)> stream(std::fopen(file.c_str(), "rb"), &std::fclose);
  if (!stream) {
    throw_error(ErrorKind::Io, "cannot open image " + file.string() + ": " + std::strerror(errno));
  }
  std::vector<uint8_t> bytes;
  uint8_t chunk[1 << 16];
  size_t got;
  while ((got = std::fread(chunk, 1, sizeof chunk, stream.get())) > 0) {
    bytes.insert(bytes.end(), chunk, chunk + got);
  }
  if (std::ferror(stream.get())) {
    throw_error(ErrorKind::Io, "cannot read image " + file.string() + ": " + std::strerror(errno));
  }
  try {
    return decode_image(bytes.data(), bytes.size(), limits);
  } catch (const Error& error) {
    throw Error(error.kind(), file.string() + ": " + error.what());
  }
}

}  // namespace moxin
