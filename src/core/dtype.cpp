#include "moxin/dtype.h"

#include <cmath>

namespace moxin {

namespace {
struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::Bool, "BOOL", 1}, {DType::U8, "U8", 1},     {DType::I8, "I8", 1},
    {DType::I16, "I16", 2},   {DType::U16, "U16", 2},   {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2}, {DType::I32, "I32", 4},   {DType::U32, "U32", 4},
    {DType::F32, "F32", 4},   {DType::F64, "F64", 8},   {DType::I64, "I64", 8},
    {DType::U64, "U64", 8},
};
}  // namespace

size_t dtype_size(DType dtype) { return kDTypes[size_t(dtype)].size; }
std::string_view dtype_name(DType dtype) { return kDTypes[size_t(dtype)].name; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& info : kDTypes)
    if (info.name == name) return info.dtype;
  return std::nullopt;
}

bool is_float(DType dtype) {
  return dtype == DType::F16 || dtype == DType::BF16 || dtype == DType::F32 || dtype == DType::F64;
}

float f16_to_f32(uint16_t bits) {
  const uint32_t sign = uint32_t(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(float(mantissa), -24);  // zero or subnormal
  } else if (exponent == 31) {
    magnitude = mantissa ? NAN : INFINITY;
  } else {
    magnitude = std::ldexp(float(mantissa | 0x400u), int(exponent) - 25);
  }
  uint32_t word;
  std::memcpy(&word, &magnitude, sizeof word);
  word |= sign;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

uint16_t f32_to_f16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  const uint16_t sign = uint16_t((word >> 16) & 0x8000u);
  const float magnitude = std::fabs(value);
  if (std::isnan(value)) return sign | 0x7e00u;
  if (magnitude >= 65520.0f) return sign | 0x7c00u;  // rounds to infinity
  if (magnitude < 6.103515625e-05f) {
    // Subnormal: units of 2^-24, rounded to nearest even by rint.
    return sign | uint16_t(std::nearbyint(magnitude * 16777216.0f));
  }
  uint32_t m;
  std::memcpy(&m, &magnitude, sizeof m);
  // Rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  uint32_t rounded = m + 0xfffu + ((m >> 13) & 1u);
  return sign | uint16_t(((rounded >> 13) - (112u << 10)) & 0x7fffu);
}

}  // namespace moxin
