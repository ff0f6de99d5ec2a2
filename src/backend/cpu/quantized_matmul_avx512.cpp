// AVX-512F kernels for 4- and 8-bit weights. Compiled with a target attribute (not -march) so
// the library still runs on CPUs without AVX-512; the dispatcher only calls these after
// __builtin_cpu_supports("avx512f").
#include <immintrin.h>

#include <vector>

#include "backend/cpu/quantized_matmul.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12's avx512fintrin.h seeds some conversions with _mm512_undefined_*() and then warns about
// its own uninitialised value once inlined (GCC PR 105593); the warning is not about our code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace moxin::cpu::qmm_detail {

namespace {

constexpr int kLanes = 16;

inline __m128i load16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline __m128i load8(const uint8_t* p) {
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
}

// Dequantizes in registers: w = s * q + b (one FMA), then acc += w * x (another), so every
// packed byte is loaded once and the arithmetic mirrors MLX's s * q + b per weight.
inline __m512 affine(__m512i codes, __m512 s, __m512 b) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), s, b);
}

template <int M>
void finish_row(const QuantView& w, __m512 (&acc)[4][M], const float* bias, float* y, int64_t r) {
  for (int m = 0; m < M; ++m) {
    const __m512 sum =
        _mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]), _mm512_add_ps(acc[2][m], acc[3][m]));
    y[m * w.out + r] = _mm512_reduce_add_ps(sum) + (bias ? bias[r] : 0.0f);
  }
}

// 32 codes (16 bytes) per step: the low nibbles are the even elements, the high nibbles the odd
// ones, matching x_prep's [16 even | 16 odd] blocks. A 4-bit code has only 16 values, so each
// group first builds its 16 dequantized weights s * j + b (the FMA affine() applies per weight,
// so the values are identical) and every code then becomes its weight with one in-register
// table lookup (vpermps reads the low 4 bits of each lane; the high nibble needs one shift):
// widen, shift, two lookups and two product FMAs per 32 codes.
// R rows at once: R streams of packed bytes keep more memory requests in flight than one, each
// x vector loaded serves R rows, and 2 * R independent accumulator chains hide FMA latency.
template <int M, int R>
void decode4_rows(const QuantView& w, const float* x_prep, const float* bias, float* y, int64_t r0,
                  int64_t r1) {
  std::vector<float> scales(size_t(R * w.groups)), biases(size_t(R * w.groups));
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t steps_per_group = w.group_size / 32;
  for (int64_t r = r0; r + R <= r1; r += R) {
    const uint8_t* rows[R];
    for (int i = 0; i < R; ++i) {
      load_params(w, r + i, scales.data() + i * w.groups, biases.data() + i * w.groups);
      rows[i] = w.packed + (r + i) * w.row_bytes;
    }
    __m512 acc[R][2][M];
    for (auto& row_acc : acc)
      for (auto& chain : row_acc)
        for (int m = 0; m < M; ++m) chain[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < w.groups; ++g) {
      __m512 table[R];
      for (int i = 0; i < R; ++i)
        table[i] = _mm512_fmadd_ps(iota, _mm512_set1_ps(scales[size_t(i * w.groups + g)]),
                                   _mm512_set1_ps(biases[size_t(i * w.groups + g)]));
      for (int64_t step = 0; step < steps_per_group; ++step) {
        const int64_t k = (g * steps_per_group + step) * 32;
        __m512 even[R], odd[R];
        for (int i = 0; i < R; ++i) {
          const __m512i codes = _mm512_cvtepu8_epi32(load16(rows[i] + k / 2));
          even[i] = _mm512_permutexvar_ps(codes, table[i]);
          odd[i] = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table[i]);
        }
        for (int m = 0; m < M; ++m) {
          const __m512 x_even = _mm512_loadu_ps(x_prep + m * w.in + k);
          const __m512 x_odd = _mm512_loadu_ps(x_prep + m * w.in + k + 16);
          for (int i = 0; i < R; ++i) {
            acc[i][0][m] = _mm512_fmadd_ps(even[i], x_even, acc[i][0][m]);
            acc[i][1][m] = _mm512_fmadd_ps(odd[i], x_odd, acc[i][1][m]);
          }
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int m = 0; m < M; ++m)
        y[m * w.out + r + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0][m], acc[i][1][m])) +
                               (bias ? bias[r + i] : 0.0f);
  }
}

template <int M>
void decode4_rows(const QuantView& w, const float* x_prep, const float* bias, float* y, int64_t r0,
                  int64_t r1) {
  constexpr int kRows = M == 1 ? 4 : 2;  // bounded accumulator registers: 2 * kRows * M
  const int64_t whole = r0 + (r1 - r0) / kRows * kRows;
  decode4_rows<M, kRows>(w, x_prep, bias, y, r0, whole);
  decode4_rows<M, 1>(w, x_prep, bias, y, whole, r1);
}

// 16 codes per 16-byte load, natural element order; four loads (64 elements) per iteration.
template <int M>
void decode8_rows(const QuantView& w, const float* x, const float* bias, float* y, int64_t r0,
                  int64_t r1) {
  std::vector<float> scales(size_t(w.groups)), biases(size_t(w.groups));
  const int shift = __builtin_ctz(unsigned(w.group_size));
  for (int64_t r = r0; r < r1; ++r) {
    load_params(w, r, scales.data(), biases.data());
    const uint8_t* row = w.packed + r * w.row_bytes;
    __m512 acc[4][M];
    for (auto& chain : acc)
      for (int m = 0; m < M; ++m) chain[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= w.in; k += 64) {
      const __m512 sa = _mm512_set1_ps(scales[size_t(k >> shift)]);
      const __m512 ba = _mm512_set1_ps(biases[size_t(k >> shift)]);
      const __m512 sb = _mm512_set1_ps(scales[size_t((k + 32) >> shift)]);
      const __m512 bb = _mm512_set1_ps(biases[size_t((k + 32) >> shift)]);
      const __m512 w0 = affine(_mm512_cvtepu8_epi32(load16(row + k)), sa, ba);
      const __m512 w1 = affine(_mm512_cvtepu8_epi32(load16(row + k + 16)), sa, ba);
      const __m512 w2 = affine(_mm512_cvtepu8_epi32(load16(row + k + 32)), sb, bb);
      const __m512 w3 = affine(_mm512_cvtepu8_epi32(load16(row + k + 48)), sb, bb);
      for (int m = 0; m < M; ++m) {
        const float* xp = x + m * w.in + k;
        acc[0][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[0][m]);
        acc[1][m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + 16), acc[1][m]);
        acc[2][m] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xp + 32), acc[2][m]);
        acc[3][m] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xp + 48), acc[3][m]);
      }
    }
    if (k < w.in) {
      const __m512 sa = _mm512_set1_ps(scales[size_t(k >> shift)]);
      const __m512 ba = _mm512_set1_ps(biases[size_t(k >> shift)]);
      const __m512 w0 = affine(_mm512_cvtepu8_epi32(load16(row + k)), sa, ba);
      const __m512 w1 = affine(_mm512_cvtepu8_epi32(load16(row + k + 16)), sa, ba);
      for (int m = 0; m < M; ++m) {
        const float* xp = x + m * w.in + k;
        acc[0][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[0][m]);
        acc[1][m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + 16), acc[1][m]);
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

// Product and sum rounded separately (mul then add, never FMA), so the values are bit-identical
// to the scalar path and to mx.dequantize.
inline void store_affine(float* dst, __m512i codes, __m512 s, __m512 b) {
  _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(codes), s), b));
}

void dequant4(const QuantView& w, int64_t r0, int64_t r1, float* out) {
  std::vector<float> scales(size_t(w.groups)), biases(size_t(w.groups));
  const __m128i low_nibble = _mm_set1_epi8(0x0f);
  for (int64_t r = r0; r < r1; ++r) {
    load_params(w, r, scales.data(), biases.data());
    const uint8_t* row = w.packed + r * w.row_bytes;
    float* dst = out + (r - r0) * w.in;
    for (int64_t g = 0; g < w.groups; ++g) {
      const __m512 s = _mm512_set1_ps(scales[size_t(g)]);
      const __m512 b = _mm512_set1_ps(biases[size_t(g)]);
      for (int j = 0; j < w.group_size; j += 16) {
        const int64_t k = g * w.group_size + j;
        const __m128i v = load8(row + k / 2);
        const __m128i lo = _mm_and_si128(v, low_nibble);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low_nibble);
        // Interleave back to element order: byte i holds elements 2i (low) and 2i+1 (high).
        const __m128i ordered = _mm_unpacklo_epi8(lo, hi);
        store_affine(dst + k, _mm512_cvtepu8_epi32(ordered), s, b);
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
      const __m512 s = _mm512_set1_ps(scales[size_t(g)]);
      const __m512 b = _mm512_set1_ps(biases[size_t(g)]);
      for (int j = 0; j < w.group_size; j += 16) {
        const int64_t k = g * w.group_size + j;
        store_affine(dst + k, _mm512_cvtepu8_epi32(load16(row + k)), s, b);
      }
    }
  }
}

}  // namespace

IsaKernels avx512_kernels() {
  return {decode4, decode8, dequant4, dequant8, kLanes};
}

}  // namespace moxin::cpu::qmm_detail

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
