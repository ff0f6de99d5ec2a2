// WebP through libwebp. Pillow decodes every WebP (still or animated) with libwebp's animation
// decoder and shows its first frame: a canvas of the declared size cleared to transparent
// black, the frame decoded into its rectangle without blending (the first frame is a key
// frame), alpha then dropped by convert("RGB"). Decoding straight to RGB yields the same colour
// values as decoding to RGBA (libwebp does not premultiply in these modes).
//
// For an animation we find the first ANMF chunk ourselves rather than link libwebpdemux: its
// payload (optional ALPH chunk, then VP8 or VP8L) is a bitstream WebPDecode accepts as is.
#include <webp/decode.h>

#include <cstring>
#include <string>

#include "runtime/image_codecs.h"

namespace moxin::image_detail {
namespace {

uint32_t read_le24(const uint8_t* p) {
  return p[0] | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16);
}
uint32_t read_le32(const uint8_t* p) {
  return read_le24(p) | (uint32_t(p[3]) << 24);
}

const char* status_text(VP8StatusCode status) {
  switch (status) {
    case VP8_STATUS_OK:
      return "ok";
    case VP8_STATUS_OUT_OF_MEMORY:
      return "out of memory";
    case VP8_STATUS_INVALID_PARAM:
      return "invalid parameter";
    case VP8_STATUS_BITSTREAM_ERROR:
      return "corrupt bitstream";
    case VP8_STATUS_UNSUPPORTED_FEATURE:
      return "unsupported feature";
    case VP8_STATUS_SUSPENDED:
      return "suspended";
    case VP8_STATUS_USER_ABORT:
      return "aborted";
    case VP8_STATUS_NOT_ENOUGH_DATA:
      return "truncated file (not enough data)";
  }
  return "unknown error";
}

struct Frame {
  const uint8_t* data = nullptr;
  size_t size = 0;
  uint32_t x = 0, y = 0, width = 0, height = 0;
};

// The first ANMF chunk of an animated file (whose RIFF header was already validated by
// WebPGetFeatures). The RIFF size bounds the walk; a chunk running past the end is an error.
Frame first_animation_frame(const uint8_t* data, size_t size) {
  size_t end = size;
  const uint64_t riff_end = uint64_t(read_le32(data + 4)) + 8;
  if (riff_end < end) end = size_t(riff_end);
  size_t offset = 12;
  while (offset + 8 <= end) {
    const uint8_t* chunk = data + offset;
    const uint64_t length = read_le32(chunk + 4);
    if (length > end - offset - 8) fail("WebP: truncated file (a chunk runs past the end)");
    if (std::memcmp(chunk, "ANMF", 4) == 0) {
      if (length < 16) fail("WebP: ANMF chunk too short");
      Frame frame;
      frame.x = read_le24(chunk + 8) * 2;
      frame.y = read_le24(chunk + 11) * 2;
      frame.width = read_le24(chunk + 14) + 1;
      frame.height = read_le24(chunk + 17) + 1;
      frame.data = chunk + 8 + 16;
      frame.size = size_t(length) - 16;
      return frame;
    }
    offset += 8 + size_t(length) + (length & 1);  // chunks are padded to even sizes
  }
  fail("WebP: animation without frames");
}

// Decodes a bitstream into rgb at (x, y) of a canvas `canvas_width` pixels wide.
void decode_into(const uint8_t* data, size_t size, Image& image, uint32_t x, uint32_t y,
                 uint32_t width, uint32_t height) {
  const size_t stride = size_t(image.width) * 3;
  uint8_t* out = image.rgb.data() + y * stride + size_t(x) * 3;
  const size_t room = stride * (height - 1) + size_t(width) * 3;
  if (WebPDecodeRGBInto(data, size, out, room, int(stride)) == nullptr) {
    WebPBitstreamFeatures features;
    const VP8StatusCode status = WebPGetFeatures(data, size, &features);
    fail(std::string("WebP: cannot decode: ") +
         (status == VP8_STATUS_OK ? "corrupt or truncated bitstream" : status_text(status)));
  }
}

}  // namespace

Image decode_webp(const uint8_t* data, size_t size, const ImageLimits& limits) {
  WebPBitstreamFeatures features;
  const VP8StatusCode status = WebPGetFeatures(data, size, &features);
  if (status != VP8_STATUS_OK) fail(std::string("WebP: ") + status_text(status));
  check_dimensions("WebP", features.width, features.height, limits);

  Image image = allocate_image(features.width, features.height);
  if (!features.has_animation) {
    decode_into(data, size, image, 0, 0, uint32_t(image.width), uint32_t(image.height));
    return image;
  }
  const Frame frame = first_animation_frame(data, size);
  if (uint64_t(frame.x) + frame.width > uint64_t(image.width) ||
      uint64_t(frame.y) + frame.height > uint64_t(image.height)) {
    fail("WebP: first frame lies outside the canvas");
  }
  WebPBitstreamFeatures frame_features;
  const VP8StatusCode frame_status = WebPGetFeatures(frame.data, frame.size, &frame_features);
  if (frame_status != VP8_STATUS_OK) {
    fail(std::string("WebP: first frame: ") + status_text(frame_status));
  }
  if (uint32_t(frame_features.width) != frame.width ||
      uint32_t(frame_features.height) != frame.height) {
    fail("WebP: first frame's bitstream size differs from its ANMF header");
  }
  decode_into(frame.data, frame.size, image, frame.x, frame.y, frame.width, frame.height);
  return image;
}

}  // namespace moxin::image_detail
