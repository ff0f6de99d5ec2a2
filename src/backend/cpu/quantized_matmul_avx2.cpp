// AVX2 + FMA kernels for 4- and 8-bit weights, compiled with a target attribute (not -march);
// the dispatcher only calls them after __builtin_cpu_supports("avx2") and ("fma").
#include <immintrin.h>

#include <vector>

#include "backend/cpu/quantized_matmul.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace moxin::cpu::qmm_detail {

namespace {

constexpr int kLanes = 8;

inline __m128i load8(const uint8_t* p) {
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Dequantizes in registers: w = s * q + b (one FMA), then acc += w * x (another), so every
// packed byte is loaded once and the arithmetic mirrors MLX's s * q + b per weight.
inline __m256 affine(__m256i codes, __m256 s, __m256 b) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), s, b);
}

template <int M>
void finish_row(const QuantView& w, __m256 (&acc)[4][M], const float* bias, float* y, int64_t r) {
  for (int m = 0; m < M; ++m) {
    const __m256 sum =
        _mm256_add_ps(_mm256_add_ps(acc[0][m], acc[1][m]), _mm256_add_ps(acc[2][m], acc[3][m]));
    y[m * w.out + r] = hsum(sum) + (bias ? bias[r] : 0.0f);
  }
}

// Each step reads 16 bytes = 32 codes (always inside one group) as two 8-byte halves; a half's
// low nibbles are the even elements of a 16-element block and its high nibbles the odd ones
// (x_prep's [8 even | 8 odd]).
template <int M>
void decode4_rows(const QuantView& w, const float* x_prep, const float* bias, float* y, int64_t r0,
                  int64_t r1) {
  std::vector<float> scales(size_t(w.groups)), biases(size_t(w.groups));
  const __m256i low_nibble = _mm256_set1_epi32(0x0f);
  const int shift = __builtin_ctz(unsigned(w.group_size));
  for (int64_t r = r0; r < r1; ++r) {
    load_params(w, r, scales.data(), biases.data());
    const uint8_t* row = w.packed + r * w.row_bytes;
    __m256 acc[4][M];
    for (auto& chain : acc)
      for (int m = 0; m < M; ++m) chain[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < w.in; k += 32) {
      const __m256 s = _mm256_set1_ps(scales[size_t(k >> shift)]);
      const __m256 b = _mm256_set1_ps(biases[size_t(k >> shift)]);
      const __m256i qa = _mm256_cvtepu8_epi32(load8(row + k / 2));
      const __m256i qb = _mm256_cvtepu8_epi32(load8(row + k / 2 + 8));
      const __m256 w0 = affine(_mm256_and_si256(qa, low_nibble), s, b);
      const __m256 w1 = affine(_mm256_srli_epi32(qa, 4), s, b);
      const __m256 w2 = affine(_mm256_and_si256(qb, low_nibble), s, b);
      const __m256 w3 = affine(_mm256_srli_epi32(qb, 4), s, b);
      for (int m = 0; m < M; ++m) {
        const float* xp = x_prep + m * w.in + k;
        acc[0][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[0][m]);
        acc[1][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), acc[1][m]);
        acc[2][m] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), acc[2][m]);
        acc[3][m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), acc[3][m]);
      }
    }
    finish_row<M>(w, acc, bias, y, r);
  }
}

// 32 codes (four 8-byte loads) per step, natural element order.
template <int M>
void decode8_rows(const QuantView& w, const float* x, const float* bias, float* y, int64_t r0,
                  int64_t r1) {
  std::vector<float> scales(size_t(w.groups)), biases(size_t(w.groups));
  const int shift = __builtin_ctz(unsigned(w.group_size));
  for (int64_t r = r0; r < r1; ++r) {
    load_params(w, r, scales.data(), biases.data());
    const uint8_t* row = w.packed + r * w.row_bytes;
    __m256 acc[4][M];
    for (auto& chain : acc)
      for (int m = 0; m < M; ++m) chain[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < w.in; k += 32) {
      const __m256 s = _mm256_set1_ps(scales[size_t(k >> shift)]);
      const __m256 b = _mm256_set1_ps(biases[size_t(k >> shift)]);
      const __m256 w0 = affine(_mm256_cvtepu8_epi32(load8(row + k)), s, b);
      const __m256 w1 = affine(_mm256_cvtepu8_epi32(load8(row + k + 8)), s, b);
      const __m256 w2 = affine(_mm256_cvtepu8_epi32(load8(row + k + 16)), s, b);
      const __m256 w3 = affine(_mm256_cvtepu8_epi32(load8(row + k + 24)), s, b);
      for (int m = 0; m < M; ++m) {
        const float* xp = x + m * w.in + k;
        acc[0][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[0][m]);
        acc[1][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), acc[1][m]);
        acc[2][m] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), acc[2][m]);
        acc[3][m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), acc[3][m]);
      }
    }
    finish_row<M>(w, acc, bias, y, r);
  }
}

void decode4(const QuantView& w, int M, const float* x_prep, const float* bias, float* y,
             int64_t r0, int64_t r1) {
  switch (M) {
    case 1:
      return decode4_rows<1>(w, x_prep, bias, y, r0, r1);
    case 2:
      return decode4_rows<2>(w, x_prep, bias, y, r0, r1);
    case 3:
      return decode4_rows<3>(w, x_prep, bias, y, r0, r1);
    default:
      return decode4_rows<4>(w, x_prep, bias, y, r0, r1);
  }
}

void decode8(const QuantView& w, int M, const float* x, const float* bias, float* y, int64_t r0,
             int64_t r1) {
  switch (M) {
    case 1:
      return decode8_rows<1>(w, x, bias, y, r0, r1);
    case 2:
      return decode8_rows<2>(w, x, bias, y, r0, r1);
    case 3:
      return decode8_rows<3>(w, x, bias, y, r0, r1);
    default:
      return decode8_rows<4>(w, x, bias, y, r0, r1);
  }
}

// Product and sum rounded separately (mul then add, never FMA): bit-identical to the scalar
// path and to mx.dequantize.
inline void store_affine(float* dst, __m256i codes, __m256 s, __m256 b) {
  _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(codes), s), b));
}

void dequant4(const QuantView& w, int64_t r0, int64_t r1, float* out) {
  std::vector<float> scales(size_t(w.groups)), biases(size_t(w.groups));
  const __m128i low_nibble = _mm_set1_epi8(0x0f);
  for (int64_t r = r0; r < r1; ++r) {
    load_params(w, r, scales.data(), biases.data());
    const uint8_t* row = w.packed + r * w.row_bytes;
    float* dst = out + (r - r0) * w.in;
    for (int64_t g = 0; g < w.groups; ++g) {
      const __m256 s = _mm256_set1_ps(scales[size_t(g)]);
      const __m256 b = _mm256_set1_ps(biases[size_t(g)]);
      for (int j = 0; j < w.group_size; j += 16) {
        const int64_t k = g * w.group_size + j;
        const __m128i v = load8(row + k / 2);
        const __m128i lo = _mm_and_si128(v, low_nibble);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low_nibble);
        // Interleave back to element order: byte i holds elements 2i (low) and 2i+1 (high).
        const __m128i ordered = _mm_unpacklo_epi8(lo, hi);
        store_affine(dst + k, _mm256_cvtepu8_epi32(ordered), s, b);
        store_affine(dst + k + 8, _mm256_cvtepu8_epi32(_mm_srli_si128(ordered, 8)), s, b);
      }
    }
  }
}

void dequant8(const QuantView& w, int64_t r0, int64_t r1, float* out) {
  std::vector<float> scales(size_t(w.groups)), biases(size_t(w.groups));
  for (int64_t r = r0; r < r1; ++r) {
    load_params(w, r, scales.data(), biases.data());
    const uint8_t* row = w.packed + r * w.row_bytes;
    float* dst = out + (r - r0) * w.in;
    for (int64_t g = 0; g < w.groups; ++g) {
      const __m256 s = _mm256_set1_ps(scales[size_t(g)]);
      const __m256 b = _mm256_set1_ps(biases[size_t(g)]);
      for (int j = 0; j < w.group_size; j += 8) {
        const int64_t k = g * w.group_size + j;
        store_affine(dst + k, _mm256_cvtepu8_epi32(load8(row + k)), s, b);
      }
    }
  }
}

}  // namespace

IsaKernels avx2_kernels() {
  return {decode4, decode8, dequant4, dequant8, kLanes};
}

}  // namespace moxin::cpu::qmm_detail

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
