// Internal to the image decoder: one entry point per format, and the checks they share.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "moxin/image.h"

namespace moxin::image_detail {

[[noreturn]] void fail(const std::string& message);  // throws Error(ErrorKind::Image)

// Refuses a declared size that is empty, larger than limits.max_pixels, or whose RGB buffer
// would not fit in memory's address arithmetic. Called on header values, before any pixel
// buffer exists.
void check_dimensions(const char* format, int64_t width, int64_t height, const ImageLimits& limits);

// An Image with width x height pixels, zero-filled (the size must have been checked).
Image allocate_image(int64_t width, int64_t height);

// Each decodes one whole file held in memory and converts it to RGB as Pillow's
// Image.open(...).convert("RGB") does.
Image decode_png(const uint8_t* data, size_t size, const ImageLimits& limits);
Image decode_jpeg(const uint8_t* data, size_t size, const ImageLimits& limits);
Image decode_webp(const uint8_t* data, size_t size, const ImageLimits& limits);

}  // namespace moxin::image_detail
