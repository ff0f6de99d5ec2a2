#include "moxin/quantize.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "moxin/errors.h"

namespace moxin {

static_assert(std::endian::native == std::endian::little,
              "MLX packs codes into little-endian uint32 words; the byte-wise bit stream "
              "reading used here assumes a little-endian host");

namespace {

std::string quant_params_text(int bits, int group_size) {
  return "bits=" + std::to_string(bits) + ", group_size=" + std::to_string(group_size);
}

bool is_scale_dtype(DType dtype) {
  return dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16;
}

// f16 -> f32 by bit manipulation: the per-row scale loads sit on the matmul's hot path, where
// the generic ldexp-based conversion would cost more than the arithmetic it feeds.
inline float fast_f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  uint32_t word;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in f32.
    float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    std::memcpy(&word, &magnitude, sizeof word);
    word |= sign;
  } else if (exponent == 31) {
    word = sign | 0x7f800000u | (mantissa << 13);
  } else {
    word = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

void load_row_as_f32(const Tensor& t, int64_t row, int64_t width, float* out) {
  const int64_t base = row * width;
  switch (t.dtype()) {
    case DType::F32:
      std::memcpy(out, t.data<float>() + base, size_t(width) * sizeof(float));
      break;
    case DType::BF16: {
      const uint16_t* src = t.data<uint16_t>() + base;
      for (int64_t i = 0; i < width; ++i) out[i] = bf16_to_f32(src[i]);
      break;
    }
    case DType::F16: {
      const uint16_t* src = t.data<uint16_t>() + base;
      for (int64_t i = 0; i < width; ++i) out[i] = fast_f16_to_f32(src[i]);
      break;
    }
    default:
      throw_error(ErrorKind::Compute,
                  "quantized: unexpected dtype " + std::string(dtype_name(t.dtype())));
  }
}

void store_as(DType dtype, float value, void* base, int64_t index) {
  switch (dtype) {
    case DType::F32:
      static_cast<float*>(base)[index] = value;
      break;
    case DType::BF16:
      static_cast<uint16_t*>(base)[index] = f32_to_bf16(value);
      break;
    default:  // F16, checked by the caller
      static_cast<uint16_t*>(base)[index] = f32_to_f16(value);
      break;
  }
}

// Rounds an f32 value to `dtype` and back, as a cast to MLX's bfloat16_t/float16_t does.
float round_to(DType dtype, float value) {
  switch (dtype) {
    case DType::BF16:
      return bf16_to_f32(f32_to_bf16(value));
    case DType::F16:
      return fast_f16_to_f32(f32_to_f16(value));
    default:
      return value;
  }
}

struct GroupParams {
  float scale;
  float bias;
};

// MLX's choice of scale and bias for one group. The zero point is snapped so that the group's
// larger-magnitude edge (min or max) is exactly representable: scale = edge / round(edge / s).
// Each operation is a separate statement so no compiler contracts it into an FMA.
GroupParams choose_group_params(const float* values, int group_size, int bits) {
  float w_min = std::numeric_limits<float>::infinity();
  float w_max = -w_min;
  for (int j = 0; j < group_size; ++j) {
    w_max = std::max(w_max, values[j]);
    w_min = std::min(w_min, values[j]);
  }
  const float n_bins = float((1 << bits) - 1);
  const float eps = 1e-7f;
  if (bits == 1) {
    // One bit has no interior level to snap: MLX keeps the plain min/max range.
    const float range = w_max - w_min;
    return {std::max(range / n_bins, eps), w_min};
  }
  const bool min_is_edge = std::abs(w_min) > std::abs(w_max);
  const float range = w_max - w_min;
  float scale = std::max(range / n_bins, eps);
  scale = min_is_edge ? scale : -scale;
  const float edge = min_is_edge ? w_min : w_max;
  const float q0 = std::rint(edge / scale);
  float bias = 0.0f;
  if (q0 != 0.0f) {
    scale = edge / q0;
    bias = edge;
  }
  return {scale, bias};
}

uint32_t quantize_value(float value, GroupParams p, float n_bins) {
  const float shifted = value - p.bias;
  float code = std::rint(shifted / p.scale);
  // NaN cannot reach here (inputs are checked finite; an infinite scale gives 0), so the
  // conversion below is always in range.
  code = std::min(std::max(code, 0.0f), n_bins);
  return uint32_t(code);
}

void check_finite(const Tensor& w, int64_t out, int64_t in) {
  std::vector<float> row(static_cast<size_t>(in));
  for (int64_t r = 0; r < out; ++r) {
    load_row_as_f32(w, r, in, row.data());
    for (int64_t c = 0; c < in; ++c) {
      if (!std::isfinite(row[size_t(c)]))
        throw_error(ErrorKind::Request, "quantize: weight has a non-finite value at [" +
                                            std::to_string(r) + ", " + std::to_string(c) + "]");
    }
  }
}

}  // namespace

bool is_supported_quant_bits(int bits) {
  return (bits >= 1 && bits <= 6) || bits == 8;
}

bool is_supported_quant_group_size(int size) {
  return size == 32 || size == 64 || size == 128;
}

void QuantizedTensor::validate(const std::string& name) const {
  auto fail = [&](const std::string& why) {
    throw_error(ErrorKind::FileFormat, "quantized tensor '" + name + "': " + why);
  };
  if (!is_supported_quant_bits(bits))
    fail("unsupported bits " + std::to_string(bits) + " (MLX affine supports 1-6 and 8)");
  if (!is_supported_quant_group_size(group_size))
    fail("unsupported group_size " + std::to_string(group_size) + " (32, 64 or 128)");
  if (!weight.defined() || !scales.defined() || !biases.defined())
    fail("weight, scales and biases must all be present");
  if (weight.dtype() != DType::U32)
    fail("packed weight must be U32, got " + std::string(dtype_name(weight.dtype())));
  if (weight.ndim() != 2 || scales.ndim() != 2 || biases.ndim() != 2)
    fail("weight " + shape_to_string(weight.shape()) + ", scales " +
         shape_to_string(scales.shape()) + " and biases " + shape_to_string(biases.shape()) +
         " must all be 2-D");
  if (!is_scale_dtype(scales.dtype()))
    fail("scales must be F32, BF16 or F16, got " + std::string(dtype_name(scales.dtype())));
  if (biases.dtype() != scales.dtype())
    fail("biases dtype " + std::string(dtype_name(biases.dtype())) + " differs from scales dtype " +
         std::string(dtype_name(scales.dtype())));
  if (scales.shape() != biases.shape())
    fail("scales " + shape_to_string(scales.shape()) + " and biases " +
         shape_to_string(biases.shape()) + " differ in shape");
  const int64_t out = scales.dim(0);
  const int64_t groups = scales.dim(1);
  if (out <= 0 || groups <= 0) fail("empty scales " + shape_to_string(scales.shape()));
  if (weight.dim(0) != out)
    fail("weight has " + std::to_string(weight.dim(0)) + " rows but scales have " +
         std::to_string(out));
  // Keep in * bits comfortably inside int64 so the width check below cannot overflow.
  if (groups > (int64_t(1) << 40) / group_size)
    fail("implausibly many groups per row: " + std::to_string(groups));
  const int64_t in = groups * group_size;
  const int64_t expected_words = in * bits / 32;  // exact: in is a multiple of 32
  if (weight.dim(1) != expected_words)
    fail("packed width " + std::to_string(weight.dim(1)) + " words, expected " +
         std::to_string(expected_words) + " for in_features " + std::to_string(in) + " at " +
         quant_params_text(bits, group_size) + " (scales " + shape_to_string(scales.shape()) + ")");
}

QuantizedTensor quantize(const Tensor& w, int group_size, int bits) {
  if (!is_supported_quant_bits(bits))
    throw_error(ErrorKind::Request,
                "quantize: unsupported bits " + std::to_string(bits) + " (1-6 or 8)");
  if (!is_supported_quant_group_size(group_size))
    throw_error(ErrorKind::Request, "quantize: unsupported group_size " +
                                        std::to_string(group_size) + " (32, 64 or 128)");
  if (!w.defined() || w.ndim() != 2)
    throw_error(ErrorKind::Request, "quantize: expected a 2-D weight [out, in], got " +
                                        (w.defined() ? shape_to_string(w.shape())
                                                     : std::string("an undefined tensor")));
  if (!is_scale_dtype(w.dtype()))
    throw_error(ErrorKind::Request, "quantize: weight dtype must be F32, BF16 or F16, got " +
                                        std::string(dtype_name(w.dtype())));
  const int64_t out = w.dim(0);
  const int64_t in = w.dim(1);
  if (out == 0 || in == 0)
    throw_error(ErrorKind::Request, "quantize: empty weight " + shape_to_string(w.shape()));
  if (in % group_size != 0)
    throw_error(ErrorKind::Request, "quantize: in_features " + std::to_string(in) +
                                        " is not divisible by group_size " +
                                        std::to_string(group_size));
  check_finite(w, out, in);

  const int64_t groups = in / group_size;
  const int64_t row_bytes = in * bits / 8;
  QuantizedTensor q;
  q.bits = bits;
  q.group_size = group_size;
  q.weight = Tensor::zeros({out, in * bits / 32}, DType::U32);
  q.scales = Tensor::empty({out, groups}, w.dtype());
  q.biases = Tensor::empty({out, groups}, w.dtype());
  uint8_t* packed = static_cast<uint8_t*>(q.weight.raw_mut());
  void* scales = q.scales.raw_mut();
  void* biases = q.biases.raw_mut();
  const float n_bins = float((1 << bits) - 1);

#pragma omp parallel
  {
    std::vector<float> row(static_cast<size_t>(in));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < out; ++r) {
      load_row_as_f32(w, r, in, row.data());
      uint8_t* dst = packed + r * row_bytes;
      for (int64_t g = 0; g < groups; ++g) {
        const float* values = row.data() + g * group_size;
        const GroupParams p = choose_group_params(values, group_size, bits);
        for (int j = 0; j < group_size; ++j) {
          const uint32_t code = quantize_value(values[j], p, n_bins);
          const int64_t bit = (g * group_size + j) * bits;
          const int shift = int(bit & 7);
          dst[bit >> 3] = uint8_t(dst[bit >> 3] | (code << shift));
          if (shift + bits > 8)
            dst[(bit >> 3) + 1] = uint8_t(dst[(bit >> 3) + 1] | (code >> (8 - shift)));
        }
        // The codes above used the unrounded f32 scale; only the stored copy is rounded.
        store_as(w.dtype(), p.scale, scales, r * groups + g);
        store_as(w.dtype(), p.bias, biases, r * groups + g);
      }
    }
  }
  return q;
}

void load_quant_group_params(const QuantizedTensor& q, int64_t row, float* scales_out,
                             float* biases_out) {
  const int64_t groups = q.groups_per_row();
  load_row_as_f32(q.scales, row, groups, scales_out);
  load_row_as_f32(q.biases, row, groups, biases_out);
}

void dequantize_row(const QuantizedTensor& q, int64_t row, float* out) {
  const int64_t groups = q.groups_per_row();
  std::vector<float> s(static_cast<size_t>(groups)), b(static_cast<size_t>(groups));
  load_quant_group_params(q, row, s.data(), b.data());
  const uint8_t* packed = static_cast<const uint8_t*>(q.weight.raw()) + row * q.row_bytes();
  for (int64_t g = 0; g < groups; ++g) {
    for (int j = 0; j < q.group_size; ++j) {
      const int64_t k = g * q.group_size + j;
      const float product = s[size_t(g)] * float(extract_quant_code(packed, k, q.bits));
      out[k] = product + b[size_t(g)];
    }
  }
}

Tensor dequantize(const QuantizedTensor& q) {
  q.validate("dequantize input");
  const int64_t out = q.out_features();
  const int64_t in = q.in_features();
  Tensor result = Tensor::empty({out, in}, DType::F32);
  float* dst = result.data_mut<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < out; ++r) dequantize_row(q, r, dst + r * in);
  return result;
}

Tensor dequantize_like_mlx(const QuantizedTensor& q) {
  q.validate("dequantize input");
  const int64_t out = q.out_features();
  const int64_t in = q.in_features();
  const int64_t groups = q.groups_per_row();
  const DType dtype = q.scales.dtype();
  Tensor result = Tensor::empty({out, in}, dtype);
  void* dst = result.raw_mut();
#pragma omp parallel
  {
    std::vector<float> s(static_cast<size_t>(groups)), b(static_cast<size_t>(groups));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < out; ++r) {
      load_quant_group_params(q, r, s.data(), b.data());
      const uint8_t* packed = static_cast<const uint8_t*>(q.weight.raw()) + r * q.row_bytes();
      for (int64_t k = 0; k < in; ++k) {
        const int64_t g = k / q.group_size;
        const float product =
            round_to(dtype, s[size_t(g)] * float(extract_quant_code(packed, k, q.bits)));
        store_as(dtype, product + b[size_t(g)], dst, r * in + k);
      }
    }
  }
  return result;
}

}  // namespace moxin
