// MLX-compatible group-wise affine quantization ("affine" mode of mlx.core.quantize).
//
// Layout, for a linear weight w [out, in]:
//   weight  U32 [out, in * bits / 32]   codes packed as one little-endian bit stream per row: code
//   k
//                                       occupies bits [k * bits, (k + 1) * bits) of the row, so for
//                                       bits 1/2/4/8 every word holds 32/bits whole codes and for
//                                       3/5/6 codes may straddle bytes and words.
//   scales  [out, in / group_size]      same float dtype as the quantized weight (F32, BF16 or F16)
//   biases  [out, in / group_size]      same dtype as scales
// Dequantized value of code q in group g of a row: scales[g] * q + biases[g].
#pragma once

#include <cstdint>
#include <string>

#include "moxin/tensor.h"

namespace moxin {

struct QuantizedTensor {
  Tensor weight;  // U32 [out, in * bits / 32]
  Tensor scales;  // [out, in / group_size], F32 / BF16 / F16
  Tensor biases;  // [out, in / group_size], same dtype as scales
  int group_size = 64;
  int bits = 4;

  int64_t out_features() const { return scales.defined() ? scales.dim(0) : 0; }
  int64_t in_features() const { return scales.defined() ? scales.dim(1) * group_size : 0; }
  int64_t groups_per_row() const { return scales.defined() ? scales.dim(1) : 0; }
  // Bytes of packed codes per output row (in * bits / 8; always a whole number of words).
  int64_t row_bytes() const { return in_features() * bits / 8; }

  // Throws FileFormat naming `name` unless every invariant the kernels rely on holds: bits and
  // group size supported, weight U32 2-D, scales/biases 2-D of one float dtype and equal shapes,
  // packed width == in * bits / 32, no empty dimension. Loaders call it on untrusted checkpoints.
  void validate(const std::string& name) const;
};

// Bits and group sizes MLX's affine mode accepts.
bool is_supported_quant_bits(int bits);        // 1, 2, 3, 4, 5, 6, 8
bool is_supported_quant_group_size(int size);  // 32, 64, 128

// Same packed words, scales and biases as mlx.core.quantize(w, group_size, bits) (mode "affine"):
// scales/biases take w's dtype, the codes are computed in f32 from the unrounded scale, exactly
// as MLX does. w is [out, in] of F32, BF16 or F16 with finite values.
// Throws Request for an unsupported bits/group size, in % group_size != 0, a non-2-D or non-float
// input, or a NaN/Inf weight (MLX's output is meaningless there; we refuse instead of guessing).
QuantizedTensor quantize(const Tensor& w, int group_size, int bits);

// F32 [out, in]: scale * code + bias in f32 with no fused multiply-add. Bit-identical to
// mlx.core.dequantize when scales are F32; for BF16/F16 scales it is the exact value that MLX
// then rounds twice (product and sum) to the scales dtype.
Tensor dequantize(const QuantizedTensor& q);
// Bit-identical to mlx.core.dequantize, in the scales' dtype (MLX computes scale * code and then
// + bias in that dtype, rounding after each step).
Tensor dequantize_like_mlx(const QuantizedTensor& q);

// Row `row` of dequantize(q) into out[0 .. in_features()): a scalar reference, also used for
// quantized embedding lookups. q must have passed validate().
void dequantize_row(const QuantizedTensor& q, int64_t row, float* out);

// The code of element `k` of a packed row (no bounds checks: k < in_features()).
inline uint32_t extract_quant_code(const uint8_t* row, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int64_t byte = bit >> 3;
  const int shift = int(bit & 7);
  uint32_t window = row[byte];
  // A code of at most 8 bits spans at most two bytes; only touch the second when it is needed,
  // so the last code of the last row never reads past the buffer.
  if (shift + bits > 8) window |= uint32_t(row[byte + 1]) << 8;
  return (window >> shift) & ((1u << bits) - 1u);
}

// Scales and biases of one row as f32, whatever their stored dtype.
void load_quant_group_params(const QuantizedTensor& q, int64_t row, float* scales_out,
                             float* biases_out);

}  // namespace moxin
