// Bicubic resize with the exact arithmetic of PIL.Image.resize(size, Image.BICUBIC) on 8-bit
// RGB, so that the vision towers see the reference's pixels bit for bit.
//
// What Pillow does (documented behaviour of its resampler, reimplemented here):
// - Separable convolution in two passes; an axis whose size does not change is not filtered.
//   Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
//   pixels as the width does ((H - h) > 2 (W - w), h < H), else the horizontal pass first (the
//   only order of earlier Pillow versions). The order matters because the intermediate image
//   is rounded to 8 bits. Horizontal first only filters the source rows the vertical pass will
//   read; rows are independent, so that changes nothing but the work done.
// - Filter: Keys' cubic with a = -0.5, support 2. When shrinking by a factor s > 1 the kernel is
//   stretched by s (support 2s), which is what antialiases.
// - Output pixel i samples around center = (i + 0.5) * s in input coordinates; its taps are the
//   inputs [int(center - support + 0.5), int(center + support + 0.5)) clipped to the image, tap
//   x weighted by filter((x - center + 0.5) / max(s, 1)), the weights divided by their sum.
// - Weights become fixed point with 22 fractional bits, rounded half away from zero. Each pass
//   accumulates in int32 from 1 << 21 (for rounding), shifts right by 22 and clips to
//   [0, 255]; the intermediate image is 8-bit.
// The coefficient arithmetic must not be contracted into fused multiply-adds (Pillow's builds
// do not use FMA), or a weight can differ in its last bit and flip a rounding.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moxin/errors.h"
#include "moxin/image.h"

namespace moxin {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // headroom for 8-bit inputs times weights > 1
constexpr double kBicubicSupport = 2.0;

double bicubic(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Per output position: the first input tap, the number of taps and their fixed-point weights
// (stored `taps` apart).
struct Taps {
  int max_taps = 0;
  std::vector<int> first;
  std::vector<int> count;
  std::vector<int32_t> weights;
};

Taps compute_taps(int in_size, int out_size) {
  // Pillow passes the box edges as float; for integer sizes below 2^24 they are exact.
  const double scale = double(float(in_size)) / out_size;
  const double filter_scale = scale < 1.0 ? 1.0 : scale;
  const double support = kBicubicSupport * filter_scale;
  Taps taps;
  taps.max_taps = int(std::ceil(support)) * 2 + 1;
  taps.first.resize(out_size);
  taps.count.resize(out_size);
  taps.weights.assign(size_t(out_size) * taps.max_taps, 0);
  std::vector<double> weights(taps.max_taps);
  const double inverse_filter_scale = 1.0 / filter_scale;
  for (int i = 0; i < out_size; ++i) {
    const double center = (i + 0.5) * scale;
    int first = int(center - support + 0.5);  // truncation toward zero, then clipped
    if (first < 0) first = 0;
    int end = int(center + support + 0.5);
    if (end > in_size) end = in_size;
    const int count = end - first;
    double total = 0.0;
    for (int k = 0; k < count; ++k) {
      const double w = bicubic((k + first - center + 0.5) * inverse_filter_scale);
      weights[k] = w;
      total += w;
    }
    int32_t* fixed = &taps.weights[size_t(i) * taps.max_taps];
    for (int k = 0; k < count; ++k) {
      const double w = total != 0.0 ? weights[k] / total : weights[k];
      const double scaled = w * (1 << kPrecisionBits);
      fixed[k] = int32_t(w < 0 ? -0.5 + scaled : 0.5 + scaled);
    }
    taps.first[i] = first;
    taps.count[i] = std::max(count, 0);
  }
  return taps;
}

inline uint8_t clip_fixed(int32_t sum) {
  const int32_t value = sum >> kPrecisionBits;  // arithmetic shift: floors negatives
  return uint8_t(value < 0 ? 0 : value > 255 ? 255 : value);
}

// [rows, in_width, 3] -> [rows, out_width, 3]
void resize_rows(const uint8_t* in, int in_width, int rows, const Taps& taps, int out_width,
                 uint8_t* out) {
#pragma omp parallel for schedule(static) if (int64_t(rows) * out_width * taps.max_taps > 200000)
  for (int y = 0; y < rows; ++y) {
    const uint8_t* in_row = in + size_t(y) * in_width * 3;
    uint8_t* out_row = out + size_t(y) * out_width * 3;
    for (int x = 0; x < out_width; ++x) {
      const int32_t* w = &taps.weights[size_t(x) * taps.max_taps];
      const uint8_t* p = in_row + size_t(taps.first[x]) * 3;
      int32_t r = 1 << (kPrecisionBits - 1), g = r, b = r;
      for (int k = 0, n = taps.count[x]; k < n; ++k) {
        r += p[3 * k + 0] * w[k];
        g += p[3 * k + 1] * w[k];
        b += p[3 * k + 2] * w[k];
      }
      out_row[3 * x + 0] = clip_fixed(r);
      out_row[3 * x + 1] = clip_fixed(g);
      out_row[3 * x + 2] = clip_fixed(b);
    }
  }
}

// [in_rows, width, 3] -> [out_height, width, 3]; taps index rows of `in`, shifted by -row0.
void resize_columns(const uint8_t* in, int width, int row0, const Taps& taps, int out_height,
                    uint8_t* out) {
  const size_t row_size = size_t(width) * 3;
#pragma omp parallel if (int64_t(out_height) * width * taps.max_taps > 200000)
  {
    std::vector<int32_t> sums(row_size);
#pragma omp for schedule(static)
    for (int y = 0; y < out_height; ++y) {
      std::fill(sums.begin(), sums.end(), int32_t(1) << (kPrecisionBits - 1));
      const int32_t* w = &taps.weights[size_t(y) * taps.max_taps];
      const uint8_t* first_row = in + size_t(taps.first[y] - row0) * row_size;
      for (int k = 0, n = taps.count[y]; k < n; ++k) {
        const uint8_t* row = first_row + size_t(k) * row_size;
        const int32_t weight = w[k];
        for (size_t i = 0; i < row_size; ++i) sums[i] += row[i] * weight;
      }
      uint8_t* out_row = out + size_t(y) * row_size;
      for (size_t i = 0; i < row_size; ++i) out_row[i] = clip_fixed(sums[i]);
    }
  }
}

}  // namespace

Image resize_bicubic(const Image& image, int width, int height) {
  if (image.width <= 0 || image.height <= 0 ||
      image.rgb.size() != size_t(image.width) * size_t(image.height) * 3) {
    throw_error(ErrorKind::Request, "resize_bicubic: input is not a valid RGB image (" +
                                        std::to_string(image.width) + "x" +
                                        std::to_string(image.height) + ", " +
                                        std::to_string(image.rgb.size()) + " bytes)");
  }
  const ImageLimits limits;
  if (width <= 0 || height <= 0 || int64_t(width) * height > limits.max_pixels) {
    throw_error(ErrorKind::Request, "resize_bicubic: target size " + std::to_string(width) + "x" +
                                        std::to_string(height) + " must be positive and at most " +
                                        std::to_string(limits.max_pixels) + " pixels");
  }
  Image out;
  out.width = width;
  out.height = height;
  if (width == image.width && height == image.height) {
    out.rgb = image.rgb;
    return out;
  }

  const Taps rows_taps = compute_taps(image.height, height);
  const bool resize_x = width != image.width;
  const bool resize_y = height != image.height;
  const bool vertical_first = resize_x && resize_y && height < image.height &&
                              int64_t(image.height) - height > 2 * (int64_t(image.width) - width);
  if (vertical_first) {
    std::vector<uint8_t> vertical(size_t(image.width) * height * 3);  // [h, W, 3]
    resize_columns(image.rgb.data(), image.width, 0, rows_taps, height, vertical.data());
    out.rgb.resize(size_t(width) * height * 3);
    resize_rows(vertical.data(), image.width, height, compute_taps(image.width, width), width,
                out.rgb.data());
    return out;
  }

  const uint8_t* source = image.rgb.data();
  int source_width = image.width;
  int row0 = 0;
  std::vector<uint8_t> horizontal;
  if (resize_x) {
    // Only the source rows the vertical pass reads: [first tap of row 0, last tap of the last).
    int row_end = image.height;
    if (resize_y) {
      row0 = rows_taps.first.front();
      row_end = rows_taps.first.back() + rows_taps.count.back();
    }
    horizontal.resize(size_t(row_end - row0) * width * 3);  // [rows, w, 3]
    resize_rows(source + size_t(row0) * image.width * 3, image.width, row_end - row0,
                compute_taps(image.width, width), width, horizontal.data());
    source = horizontal.data();
    source_width = width;
  }
  if (resize_y) {
    out.rgb.resize(size_t(width) * height * 3);
    resize_columns(source, source_width, row0, rows_taps, height, out.rgb.data());
  } else {
    out.rgb = std::move(horizontal);
  }
  return out;
}

}  // namespace moxin
