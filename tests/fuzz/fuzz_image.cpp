// libFuzzer target over the image decoders (and the resize of whatever decodes).
// Build: CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DMOXIN_FUZZ=ON
//        ninja -C build-fuzz fuzz_image
// Run:   build-fuzz/tests/fuzz_image -max_len=200000 tests/fixtures/images
// Any input must either decode or throw moxin::Error(Image); anything else (a crash, a sanitizer
// report, another exception, a hang) is a bug.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "moxin/errors.h"
#include "moxin/image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A lower cap than the default keeps each run fast; the cap logic itself is what matters.
  moxin::ImageLimits limits;
  limits.max_pixels = 4'000'000;
  try {
    const moxin::Image image = moxin::decode_image(data, size, limits);
    if (image.width <= 0 || image.height <= 0 ||
        image.rgb.size() != size_t(image.width) * size_t(image.height) * 3) {
      std::abort();
    }
    // Shrink and stretch along both axes, so both pass orders of the resize run.
    const moxin::Image small = moxin::resize_bicubic(image, 1 + image.width / 3, 7);
    if (small.rgb.size() != size_t(small.width) * 7 * 3) std::abort();
    moxin::resize_bicubic(image, 5, 1 + image.height / 5);
  } catch (const moxin::Error& error) {
    if (error.kind() != moxin::ErrorKind::Image) std::abort();
  }
  return 0;
}
