// JPEG through libjpeg-turbo with Pillow's decoding choices: libjpeg's defaults (ISLOW integer
// IDCT, fancy upsampling, no scaling), colour conversion to RGB inside libjpeg, greyscale
// replicated to three channels, and 4-channel files (CMYK, or YCCK which libjpeg turns into
// CMYK) read as Adobe-inverted CMYK whether or not an Adobe marker is present, then converted
// with Pillow's CMYK -> RGB rule.
//
// libjpeg reports errors through error_exit, which must not return: ours longjmps back to the
// setjmp in the function that made the libjpeg call. Those functions own no C++ object, so no
// destructor is skipped; the decompressor is released by a holder in the calling frame.
#include <stdio.h>  // jpeglib.h needs FILE and size_t declared first

#include <jerror.h>
#include <jpeglib.h>

#include <csetjmp>
#include <cstring>
#include <vector>

#include "runtime/image_codecs.h"

namespace moxin::image_detail {
namespace {

// Real images have a handful of progressive scans; thousands of tiny ones are a known way to
// make libjpeg spin for minutes on a small file (libjpeg-turbo suggests a limit of this kind).
constexpr int kMaxScans = 1000;

struct JpegFailure {
  jpeg_error_mgr manager;  // first, so libjpeg's j_common_ptr->err casts back to us
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX + 64] = {};
};

struct JpegDecoder {
  jpeg_decompress_struct info{};
  JpegFailure failure{};
  jpeg_source_mgr source{};
  jpeg_progress_mgr progress{};
  bool created = false;
  JpegDecoder() = default;
  JpegDecoder(const JpegDecoder&) = delete;
  JpegDecoder& operator=(const JpegDecoder&) = delete;
  ~JpegDecoder() {
    if (created) jpeg_destroy_decompress(&info);
  }
};

JpegFailure& failure_of(j_common_ptr common) {
  return *reinterpret_cast<JpegFailure*>(common->err);
}

[[noreturn]] void bail(j_common_ptr common, const char* message) {
  JpegFailure& failure = failure_of(common);
  std::snprintf(failure.message, sizeof failure.message, "%s", message);
  std::longjmp(failure.jump, 1);
}

void on_error_exit(j_common_ptr common) {
  char text[JMSG_LENGTH_MAX];
  (*common->err->format_message)(common, text);
  bail(common, text);
}

// Warnings (corrupt entropy data and the like) are tolerated, as Pillow tolerates them.
void on_output_message(j_common_ptr) {}

// The whole file is in memory, so the source never refills: running past its end means the
// file is truncated. (libjpeg's own memory source would invent an EOI marker and carry on;
// Pillow refuses truncated files, so we do too.)
void source_init(j_decompress_ptr) {}
boolean source_fill(j_decompress_ptr info) {
  bail(reinterpret_cast<j_common_ptr>(info), "truncated file (data ends before the image does)");
}
void source_skip(j_decompress_ptr info, long count) {
  jpeg_source_mgr& source = *info->src;
  if (count <= 0) return;
  if (size_t(count) > source.bytes_in_buffer) source_fill(info);
  source.next_input_byte += count;
  source.bytes_in_buffer -= size_t(count);
}
void source_term(j_decompress_ptr) {}

void on_progress(j_common_ptr common) {
  auto info = reinterpret_cast<j_decompress_ptr>(common);
  if (info->input_scan_number > kMaxScans) bail(common, "too many progressive scans");
}

bool read_header(JpegDecoder& decoder, const uint8_t* data, size_t size) {
  if (setjmp(decoder.failure.jump) != 0) return false;
  decoder.info.err = jpeg_std_error(&decoder.failure.manager);
  decoder.failure.manager.error_exit = on_error_exit;
  decoder.failure.manager.output_message = on_output_message;
  jpeg_create_decompress(&decoder.info);
  decoder.created = true;

  decoder.source.next_input_byte = data;
  decoder.source.bytes_in_buffer = size;
  decoder.source.init_source = source_init;
  decoder.source.fill_input_buffer = source_fill;
  decoder.source.skip_input_data = source_skip;
  decoder.source.resync_to_restart = jpeg_resync_to_restart;
  decoder.source.term_source = source_term;
  decoder.info.src = &decoder.source;
  decoder.progress.progress_monitor = on_progress;
  decoder.info.progress = &decoder.progress;

  jpeg_read_header(&decoder.info, TRUE);
  return true;
}

// Pillow reads CMYK inverted (its "CMYK;I" raw mode), so its C, M, Y, K are 255 minus
// libjpeg's. Its CMYK -> RGB is then  R = clip(nk - nk * C / 255)  with nk = 255 - K, where
// "* C / 255" is the rounded integer form (t = a * b + 128; ((t >> 8) + t) >> 8).
inline uint8_t pillow_cmyk_channel(unsigned inverted_colour, unsigned inverted_black) {
  const unsigned colour = 255u - inverted_colour;
  const unsigned not_black = inverted_black;  // 255 - (255 - raw K)
  const unsigned t = colour * not_black + 128u;
  const int value = int(not_black) - int(((t >> 8) + t) >> 8);
  return uint8_t(value < 0 ? 0 : value > 255 ? 255 : value);
}

bool read_pixels(JpegDecoder& decoder, uint8_t* row, Image& image) {
  if (setjmp(decoder.failure.jump) != 0) return false;
  jpeg_decompress_struct& info = decoder.info;
  jpeg_start_decompress(&info);
  if (int64_t(info.output_width) != image.width || int64_t(info.output_height) != image.height) {
    bail(reinterpret_cast<j_common_ptr>(&info), "decoded size differs from the header's");
  }
  const size_t width = info.output_width;
  const int components = info.output_components;
  uint8_t* const rgb = image.rgb.data();
  while (info.output_scanline < info.output_height) {
    const size_t y = info.output_scanline;
    JSAMPROW rows[1] = {row};
    if (jpeg_read_scanlines(&info, rows, 1) != 1) {
      bail(reinterpret_cast<j_common_ptr>(&info), "decoder returned no scanline");
    }
    uint8_t* out = rgb + y * width * 3;
    if (components == 3) {
      std::memcpy(out, row, width * 3);
    } else if (components == 1) {
      for (size_t x = 0; x < width; ++x) out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = row[x];
    } else {
      for (size_t x = 0; x < width; ++x) {
        const uint8_t* cmyk = row + 4 * x;
        for (int c = 0; c < 3; ++c) out[3 * x + c] = pillow_cmyk_channel(cmyk[c], cmyk[3]);
      }
    }
  }
  // Reads through to EOI, so a file missing its end is refused, as Pillow refuses it.
  jpeg_finish_decompress(&info);
  return true;
}

}  // namespace

Image decode_jpeg(const uint8_t* data, size_t size, const ImageLimits& limits) {
  JpegDecoder decoder;
  if (!read_header(decoder, data, size)) fail(std::string("JPEG: ") + decoder.failure.message);

  jpeg_decompress_struct& info = decoder.info;
  check_dimensions("JPEG", info.image_width, info.image_height, limits);
  int components = 0;
  switch (info.num_components) {
    case 1:
      info.out_color_space = JCS_GRAYSCALE;
      components = 1;
      break;
    case 3:
      info.out_color_space = JCS_RGB;  // libjpeg converts YCbCr (or passes RGB) itself
      components = 3;
      break;
    case 4:
      info.out_color_space = JCS_CMYK;  // YCCK is converted to CMYK by libjpeg
      components = 4;
      break;
    default:
      fail("JPEG: unsupported number of colour components (" + std::to_string(info.num_components) +
           ")");
  }
  Image image = allocate_image(info.image_width, info.image_height);
  std::vector<uint8_t> row(size_t(info.image_width) * components);
  if (!read_pixels(decoder, row.data(), image)) {
    fail(std::string("JPEG: ") + decoder.failure.message);
  }
  return image;
}

}  // namespace moxin::image_detail
