// Pixels to the towers' inputs, with torchvision's float32 arithmetic: ToTensor divides the
// 8-bit value by 255, Normalize subtracts the mean and then divides by the std (two correctly
// rounded float32 operations, not a multiply by a precomputed reciprocal), so our values equal
// the reference's bit for bit.
#include <string>

#include "moxin/errors.h"
#include "moxin/image.h"

namespace moxin {
namespace {

void check_rgb_batch(const Tensor& images, const char* what) {
  const bool ok =
      images.defined() && images.dtype() == DType::F32 && images.ndim() == 4 && images.dim(3) == 3;
  if (!ok) {
    throw_error(ErrorKind::Request,
                std::string(what) + ": expected a [B, H, W, 3] F32 tensor, got " +
                    (images.defined() ? shape_to_string(images.shape()) + " " +
                                            std::string(dtype_name(images.dtype()))
                                      : std::string("an undefined tensor")));
  }
}

// [B, H, W, 3] -> [B, H, W, 3]
Tensor normalize(const Tensor& images, const float (&mean)[3], const float (&std)[3],
                 const char* what) {
  check_rgb_batch(images, what);
  Tensor out = Tensor::empty(images.shape(), DType::F32);
  const float* in = images.data<float>();
  float* result = out.data_mut<float>();
  const int64_t pixels = images.numel() / 3;
  for (int64_t p = 0; p < pixels; ++p) {
    for (int c = 0; c < 3; ++c) result[p * 3 + c] = (in[p * 3 + c] - mean[c]) / std[c];
  }
  return out;
}

}  // namespace

Tensor image_to_tensor(const Image& image) {
  if (image.width <= 0 || image.height <= 0 ||
      image.rgb.size() != size_t(image.width) * size_t(image.height) * 3) {
    throw_error(ErrorKind::Request, "image_to_tensor: not a valid RGB image (" +
                                        std::to_string(image.width) + "x" +
                                        std::to_string(image.height) + ", " +
                                        std::to_string(image.rgb.size()) + " bytes)");
  }
  Tensor out = Tensor::empty({1, image.height, image.width, 3}, DType::F32);  // [1, H, W, 3]
  float* values = out.data_mut<float>();
  for (size_t i = 0; i < image.rgb.size(); ++i) values[i] = float(image.rgb[i]) / 255.0f;
  return out;
}

Tensor normalize_dino(const Tensor& images) {
  static const float kMean[3] = {0.485f, 0.456f, 0.406f};
  static const float kStd[3] = {0.229f, 0.224f, 0.225f};
  return normalize(images, kMean, kStd, "normalize_dino");
}

Tensor normalize_siglip(const Tensor& images) {
  static const float kMean[3] = {0.5f, 0.5f, 0.5f};
  static const float kStd[3] = {0.5f, 0.5f, 0.5f};
  return normalize(images, kMean, kStd, "normalize_siglip");
}

PreprocessedImage preprocess_image(const Image& image, int size) {
  if (size <= 0) {
    throw_error(ErrorKind::Request,
                "preprocess_image: size must be positive, got " + std::to_string(size));
  }
  const Tensor pixels = image_to_tensor(resize_bicubic(image, size, size));  // [1, S, S, 3]
  return {normalize_dino(pixels), normalize_siglip(pixels)};
}

}  // namespace moxin
