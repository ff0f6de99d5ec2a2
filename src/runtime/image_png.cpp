// PNG through libpng, converted to RGB as Pillow converts what its own PNG reader produces:
//   grey 1/2/4/8-bit      -> scaled to 0..255 (Pillow's "1", "L;2", "L;4", "L")
//   grey 16-bit           -> min(value, 255): Pillow opens it as I;16 and I;16 -> RGB clips
//   grey+alpha, RGB, RGBA -> alpha dropped; 16-bit samples keep their high byte
//   palette               -> looked up; indices past a short PLTE are black; tRNS ignored
//
// libpng reports errors by longjmp. Every libpng call sits in a function that calls setjmp
// and owns no C++ object, so a longjmp never skips a destructor; the libpng handles are
// released by a holder in the calling frame, which the longjmp never crosses.
#include <png.h>

#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <vector>

#include "runtime/image_codecs.h"

namespace moxin::image_detail {
namespace {

struct PngReader {
  const uint8_t* data = nullptr;
  size_t size = 0;
  size_t offset = 0;
  std::jmp_buf jump;
  char message[200] = {};
  // Rows libpng has decoded (counted by a no-op user transform) and how many the image has:
  // a file cut off after its last row (missing IDAT CRC, zlib trailer or IEND) is accepted,
  // as Pillow accepts it.
  int64_t rows_decoded = 0;
  int64_t rows_expected = -1;
  bool complete_at_eof = false;
};

struct PngHandles {
  png_structp png = nullptr;
  png_infop info = nullptr;
  PngHandles() = default;
  PngHandles(const PngHandles&) = delete;
  PngHandles& operator=(const PngHandles&) = delete;
  ~PngHandles() {
    if (png != nullptr) png_destroy_read_struct(&png, info != nullptr ? &info : nullptr, nullptr);
  }
};

struct PngHeader {
  uint32_t width = 0;
  uint32_t height = 0;
  int bit_depth = 0;
  int color_type = 0;
  bool interlaced = false;
  uint8_t palette[256 * 3] = {};  // zero-padded: indices past the PLTE's end read as black
};

PngReader& reader_of(png_structp png) {
  return *static_cast<PngReader*>(png_get_error_ptr(png));
}

void on_error(png_structp png, png_const_charp message) {
  PngReader& reader = reader_of(png);
  std::snprintf(reader.message, sizeof reader.message, "%s", message);
  std::longjmp(reader.jump, 1);
}

void on_warning(png_structp, png_const_charp) {}

void on_read(png_structp png, png_bytep out, size_t length) {
  PngReader& reader = *static_cast<PngReader*>(png_get_io_ptr(png));
  if (length > reader.size - reader.offset) {
    reader.complete_at_eof = reader.rows_decoded == reader.rows_expected;
    png_error(png, "truncated file (data ends early)");
  }
  std::memcpy(out, reader.data + reader.offset, length);
  reader.offset += length;
}

void count_row(png_structp png, png_row_infop, png_bytep) {
  ++reader_of(png).rows_decoded;
}

int channels_of(int color_type) {
  switch (color_type) {
    case PNG_COLOR_TYPE_GRAY:
      return 1;
    case PNG_COLOR_TYPE_GRAY_ALPHA:
      return 2;
    case PNG_COLOR_TYPE_RGB:
      return 3;
    case PNG_COLOR_TYPE_RGB_ALPHA:
      return 4;
    case PNG_COLOR_TYPE_PALETTE:
      return 1;
  }
  return 0;
}

// Reads the signature and every chunk up to the first IDAT. No pixel memory yet.
bool read_header(PngHandles& handles, PngReader& reader, PngHeader& header) {
  if (setjmp(reader.jump) != 0) return false;
  handles.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &reader, on_error, on_warning);
  if (handles.png == nullptr) {
    std::snprintf(reader.message, sizeof reader.message, "cannot create the libpng reader");
    return false;
  }
  handles.info = png_create_info_struct(handles.png);
  if (handles.info == nullptr) {
    std::snprintf(reader.message, sizeof reader.message, "cannot create the libpng info");
    return false;
  }
  png_set_read_fn(handles.png, &reader, on_read);
  // Our own pixel limit applies, not libpng's default of 10^6 columns or rows.
  png_set_user_limits(handles.png, PNG_UINT_31_MAX, PNG_UINT_31_MAX);
  // Text and colour-profile chunks do not change the pixels Pillow's convert("RGB") yields;
  // skipping them avoids inflating compressed text for nothing.
  static const png_byte kIgnored[] = "tEXt\0zTXt\0iTXt\0iCCP\0eXIf\0sPLT\0";
  png_set_keep_unknown_chunks(handles.png, PNG_HANDLE_CHUNK_NEVER, kIgnored,
                              int(sizeof kIgnored / 5));
  png_read_info(handles.png, handles.info);

  int interlace = 0;
  png_get_IHDR(handles.png, handles.info, &header.width, &header.height, &header.bit_depth,
               &header.color_type, &interlace, nullptr, nullptr);
  header.interlaced = interlace != PNG_INTERLACE_NONE;
  if (header.color_type == PNG_COLOR_TYPE_PALETTE) {
    png_colorp palette = nullptr;
    int count = 0;
    if (png_get_PLTE(handles.png, handles.info, &palette, &count) == 0 || palette == nullptr) {
      std::snprintf(reader.message, sizeof reader.message, "palette image without a PLTE chunk");
      return false;
    }
    for (int i = 0; i < count && i < 256; ++i) {
      header.palette[i * 3 + 0] = palette[i].red;
      header.palette[i * 3 + 1] = palette[i].green;
      header.palette[i * 3 + 2] = palette[i].blue;
    }
  }
  return true;
}

// One decoded row (after png_set_packing: one byte per sample below 8 bits, big-endian pairs
// at 16 bits) to RGB.
void convert_row(const PngHeader& header, const uint8_t* in, uint8_t* out) {
  const uint32_t width = header.width;
  const bool wide = header.bit_depth == 16;
  switch (header.color_type) {
    case PNG_COLOR_TYPE_GRAY:
      if (wide) {
        for (uint32_t x = 0; x < width; ++x) {
          const unsigned value = (unsigned(in[2 * x]) << 8) | in[2 * x + 1];
          out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = uint8_t(value > 255 ? 255 : value);
        }
      } else {
        const unsigned scale = 255u / ((1u << header.bit_depth) - 1u);  // 255, 85, 17 or 1
        for (uint32_t x = 0; x < width; ++x) {
          out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = uint8_t(in[x] * scale);
        }
      }
      break;
    case PNG_COLOR_TYPE_GRAY_ALPHA: {
      const int step = wide ? 4 : 2;
      for (uint32_t x = 0; x < width; ++x) {
        out[3 * x] = out[3 * x + 1] = out[3 * x + 2] = in[step * x];
      }
      break;
    }
    case PNG_COLOR_TYPE_RGB:
    case PNG_COLOR_TYPE_RGB_ALPHA: {
      const int sample = wide ? 2 : 1;
      const int step = (header.color_type == PNG_COLOR_TYPE_RGB ? 3 : 4) * sample;
      for (uint32_t x = 0; x < width; ++x) {
        out[3 * x + 0] = in[step * x];
        out[3 * x + 1] = in[step * x + sample];
        out[3 * x + 2] = in[step * x + 2 * sample];
      }
      break;
    }
    case PNG_COLOR_TYPE_PALETTE:
      for (uint32_t x = 0; x < width; ++x) {
        std::memcpy(out + 3 * x, header.palette + 3 * size_t(in[x]), 3);
      }
      break;
  }
}

// Decodes the rows. `raw` holds one decoded row, or the whole image when it is interlaced
// (libpng assembles the seven Adam7 passes in place).
bool read_pixels(PngHandles& handles, PngReader& reader, const PngHeader& header, size_t row_bytes,
                 uint8_t* raw, Image& image) {
  uint8_t* const rgb = image.rgb.data();
  const size_t rgb_stride = size_t(header.width) * 3;
  if (setjmp(reader.jump) != 0) {
    if (!reader.complete_at_eof) return false;
    // Cut off after the last row: libpng stopped while reading the data that follows it, the
    // row itself is in `raw`.
    if (!header.interlaced) convert_row(header, raw, rgb + (header.height - 1) * rgb_stride);
    return true;
  }
  png_structp png = handles.png;
  if (header.bit_depth < 8) png_set_packing(png);
  const int passes = header.interlaced ? png_set_interlace_handling(png) : 1;
  png_set_read_user_transform_fn(png, count_row);
  png_read_update_info(png, handles.info);
  if (png_get_rowbytes(png, handles.info) != row_bytes) {
    std::snprintf(reader.message, sizeof reader.message, "unexpected decoded row size");
    return false;
  }
  int64_t expected = 0;
  for (int pass = 0; pass < passes; ++pass) {
    if (!header.interlaced) {
      expected += header.height;
    } else if (PNG_PASS_COLS(header.width, pass) > 0) {
      expected += PNG_PASS_ROWS(header.height, pass);
    }
  }
  reader.rows_expected = expected;

  if (header.interlaced) {
    for (int pass = 0; pass < passes; ++pass) {
      for (uint32_t y = 0; y < header.height; ++y) png_read_row(png, raw + y * row_bytes, nullptr);
    }
    for (uint32_t y = 0; y < header.height; ++y) {
      convert_row(header, raw + y * row_bytes, rgb + y * rgb_stride);
    }
  } else {
    for (uint32_t y = 0; y < header.height; ++y) {
      png_read_row(png, raw, nullptr);
      convert_row(header, raw, rgb + y * rgb_stride);
    }
  }
  // The rest of the file (ancillary chunks, IEND) is not needed, as in Pillow.
  return true;
}

}  // namespace

Image decode_png(const uint8_t* data, size_t size, const ImageLimits& limits) {
  PngReader reader;
  reader.data = data;
  reader.size = size;
  PngHandles handles;
  PngHeader header;
  if (!read_header(handles, reader, header)) fail(std::string("PNG: ") + reader.message);

  check_dimensions("PNG", header.width, header.height, limits);
  const int channels = channels_of(header.color_type);
  if (channels == 0) fail("PNG: unsupported colour type " + std::to_string(header.color_type));
  const size_t row_bytes = size_t(header.width) * channels * (header.bit_depth == 16 ? 2 : 1);
  if (row_bytes / channels / (header.bit_depth == 16 ? 2 : 1) != header.width) {
    fail("PNG: row size overflows");
  }
  const size_t raw_rows = header.interlaced ? header.height : 1;
  if (raw_rows > SIZE_MAX / row_bytes) fail("PNG: image too large to address");

  Image image = allocate_image(header.width, header.height);
  std::vector<uint8_t> raw(row_bytes * raw_rows);
  if (!read_pixels(handles, reader, header, row_bytes, raw.data(), image)) {
    fail(std::string("PNG: ") + reader.message);
  }
  return image;
}

}  // namespace moxin::image_detail
