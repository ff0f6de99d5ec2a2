// Element types of stored and computed tensors, and the scalar conversions between them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace moxin {

// The safetensors dtypes; compute happens in F32, weights may be stored in any float type
// (and U32 for MLX-packed quantized weights).
enum class DType : uint8_t { Bool, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

size_t dtype_size(DType dtype);
std::string_view dtype_name(DType dtype);               // "BF16", as safetensors spells it
std::optional<DType> dtype_from_name(std::string_view name);
bool is_float(DType dtype);

inline float bf16_to_f32(uint16_t bits) {
  uint32_t word = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

// Round to nearest, ties to even, as torch's .to(torch.bfloat16) does; NaN stays NaN.
inline uint16_t f32_to_bf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  if ((word & 0x7fffffffu) > 0x7f800000u) return uint16_t((word >> 16) | 0x0040u);
  word += 0x7fffu + ((word >> 16) & 1u);
  return uint16_t(word >> 16);
}

float f16_to_f32(uint16_t bits);
uint16_t f32_to_f16(float value);

}  // namespace moxin
