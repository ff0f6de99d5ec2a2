// Image input: decoding (PNG, JPEG, WebP), conversion to 8-bit RGB, the reference's resize
// (PIL.Image.resize(size, Image.BICUBIC), bit-exact on 8-bit RGB) and the two towers'
// normalisations.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <vector>

#include "moxin/tensor.h"

namespace moxin {

// 8-bit RGB pixels, row-major, interleaved: rgb[(y * width + x) * 3 + c].
struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;
};

struct ImageLimits {
  // Images whose header declares more pixels than this are refused before any pixel buffer
  // is allocated (a decompression-bomb guard).
  int64_t max_pixels = 50'000'000;
};

// Decodes PNG, JPEG or WebP (told apart by their magic bytes, not by file name) and converts
// to RGB the way PIL's Image.open(f).convert("RGB") does: alpha dropped without compositing,
// 16-bit and palette modes reduced as Pillow reduces them, CMYK/YCCK JPEG by Pillow's
// inverted-CMYK rule, the first frame of an animated WebP. Throws Error(Image), naming the
// problem, for anything else: another format, a corrupt or truncated file, an empty image, or
// one whose header declares more than limits.max_pixels (refused before pixels are allocated).
Image decode_image(const uint8_t* data, size_t size, const ImageLimits& limits = {});
// As decode_image on the file's bytes; Error(Io) when it cannot be read, and the file name in
// every message.
Image load_image(const std::filesystem::path& file, const ImageLimits& limits = {});

// Exactly PIL.Image.resize((width, height), Image.BICUBIC) on an RGB image, as Pillow 13 does
// it (including its choice of which axis to filter first). Throws Error(Request) for an invalid
// image or a target that is not positive or exceeds ImageLimits{}.max_pixels.
Image resize_bicubic(const Image& image, int width, int height);

// [1, H, W, 3] float32 in [0, 1] (value / 255, as torchvision's ToTensor computes it).
Tensor image_to_tensor(const Image& image);

// (x - mean) / std per channel, on [B, H, W, 3] float32 in [0, 1], computed as torchvision's
// Normalize does (float32 subtract, then divide). Throws Error(Request) unless [B, H, W, 3] F32.
// DINOv2: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
Tensor normalize_dino(const Tensor& images);
// SigLIP: mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5).
Tensor normalize_siglip(const Tensor& images);

// The reference's whole preprocessing: resize to size x size, /255, both normalisations.
struct PreprocessedImage {
  Tensor dino;    // [1, size, size, 3]
  Tensor siglip;  // [1, size, size, 3]
};
PreprocessedImage preprocess_image(const Image& image, int size = 224);

}  // namespace moxin
