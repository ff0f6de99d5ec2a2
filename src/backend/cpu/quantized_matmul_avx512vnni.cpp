// 4- and 8-bit decode kernels for CPUs with AVX512-VNNI (Ice Lake, Sapphire Rapids, Zen 4 and
// later): the products run on integer dot-product instructions instead of float FMAs.
//
// Why: the float32 kernels need three to four vector instructions per code (widen, shift or
// convert, look up or scale, multiply-add) and stay bound by arithmetic on few cores, well
// below the memory bandwidth. Here one VPDPWSSD multiplies 32 code/activation pairs and adds
// them into 16 int32 lanes. The group's affine map is factored out of the sum,
//   sum_k (s q_k + b) x_k = s * dx * sum_k q_k xq_k + b * sum_k x_k,
// where xq = round(x / dx) is x in 16-bit fixed point with one step dx = max|x| / 32767 per
// group of the weight. The integer sums are exact (|q xq| sums stay far below 2^31); the one
// approximation is xq: each activation is off by at most dx / 2 = max|x_group| / 65534, which
// bounds the result's error by 2^-16 * sum_k |s q_k| * max|x_group| (the tests hold it to that).
// The b * sum(x) term uses the float32 sums of x itself.
#include <immintrin.h>

#include <cmath>
#include <vector>

#include "backend/cpu/quantized_matmul.h"
#include "moxin/dtype.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vnni"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni")
// GCC 12's AVX-512 headers warn about their own uninitialised seeds (GCC PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace moxin::cpu::qmm_detail {

namespace {

// Codes per step: 32 packed bytes, widened to 32 int16 words per vector.
constexpr int kBlock4 = 64;  // 4-bit: low nibbles (even elements) and high nibbles (odd ones)
constexpr int kBlock8 = 32;

// One row of prepared x: `in` int16 values (as in/2 floats), then per group its step dx and
// the float32 sum of its x. For 4-bit weights each block of 64 elements is stored as its 32 even
// elements followed by its 32 odd ones (the order the nibbles unpack to); 8-bit keeps x's order.
int64_t prep_floats(int64_t in, int64_t groups) {
  return in / 2 + 2 * groups;
}

template <int kBits>
bool prepare(const float* x, int64_t M, int64_t in, int group_size, float* out) {
  const int64_t groups = in / group_size, stride = prep_floats(in, groups);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * in;
    int16_t* fixed = reinterpret_cast<int16_t*>(out + m * stride);
    float* steps = out + m * stride + in / 2;
    float* sums = steps + groups;
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = src + g * group_size;
      float peak = 0.0f, sum = 0.0f;
      for (int j = 0; j < group_size; ++j) {
        peak = std::max(peak, std::fabs(xg[j]));
        sum += xg[j];
      }
      if (!std::isfinite(peak)) return false;  // the float kernels propagate inf / NaN
      const float inv = peak > 0.0f ? 32767.0f / peak : 0.0f;
      steps[g] = peak / 32767.0f;
      sums[g] = sum;
      for (int j = 0; j < group_size; ++j) {
        const int64_t k = g * group_size + j;
        int64_t slot = k;
        if constexpr (kBits == 4) {
          const int64_t block = k / kBlock4 * kBlock4, e = k - block;
          slot = block + (e % 2) * (kBlock4 / 2) + e / 2;
        }
        fixed[slot] = int16_t(std::nearbyint(xg[j] * inv));
      }
    }
  }
  return true;
}

// One row's group scales or biases as float32, 16 at a time (the generic loader costs about a
// tenth of a 4-bit decode step when called per row).
void load_param_row(const void* base, DType dtype, int64_t row, int64_t groups, float* out) {
  int64_t g = 0;
  if (dtype == DType::F32) {
    const float* src = static_cast<const float*>(base) + row * groups;
    for (; g < groups; ++g) out[g] = src[g];
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(base) + row * groups;
  for (; g + 16 <= groups; g += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + g));
    const __m512 v = dtype == DType::BF16
                         ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                         : _mm512_cvtph_ps(h);
    _mm512_storeu_ps(out + g, v);
  }
  for (; g < groups; ++g) out[g] = dtype == DType::BF16 ? bf16_to_f32(src[g]) : f16_to_f32(src[g]);
}

// Rows [r0, r1), R at a time (R independent streams of packed bytes keep more memory requests
// in flight, and every x vector loaded serves R rows).
template <int kBits, int M, int R>
void decode_rows(const QuantView& w, const float* x_prep, const float* bias, float* y, int64_t r0,
                 int64_t r1) {
  constexpr int kBlock = kBits == 4 ? kBlock4 : kBlock8;
  std::vector<float> scales(size_t(R * w.groups)), biases(size_t(R * w.groups));
  std::vector<float> unit(size_t(R * M * w.groups));  // s * dx per row of w and of x
  const int64_t stride = prep_floats(w.in, w.groups);
  const int shift = __builtin_ctz(unsigned(w.group_size));
  const __m512i low_nibbles = _mm512_set1_epi16(0x0f);
  const DType param_dtype = w.tensor->scales.dtype();
  const void* scale_base = w.tensor->scales.raw();
  const void* bias_base = w.tensor->biases.raw();
  for (int64_t r = r0; r + R <= r1; r += R) {
    const uint8_t* rows[R];
    for (int i = 0; i < R; ++i) {
      load_param_row(scale_base, param_dtype, r + i, w.groups, scales.data() + i * w.groups);
      load_param_row(bias_base, param_dtype, r + i, w.groups, biases.data() + i * w.groups);
      rows[i] = w.packed + (r + i) * w.row_bytes;
      for (int m = 0; m < M; ++m) {
        const float* steps = x_prep + m * stride + w.in / 2;
        for (int64_t g = 0; g < w.groups; ++g)
          unit[size_t((i * M + m) * w.groups + g)] = scales[size_t(i * w.groups + g)] * steps[g];
      }
    }
    __m512 acc[R][M];
    for (auto& row_acc : acc)
      for (int m = 0; m < M; ++m) row_acc[m] = _mm512_setzero_ps();
    // The next R rows stream in while these are computed: R interleaved row streams (plus
    // the parameter arrays) are more than the hardware prefetcher follows well on its own.
    const bool prefetch_next = r + 2 * R <= r1;
    for (int64_t b = 0; b < w.in; b += kBlock) {
      if (prefetch_next && (b * kBits / 8) % 64 == 0)
        for (int i = 0; i < R; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(rows[i] + R * w.row_bytes + b * kBits / 8),
                       _MM_HINT_T1);
      __m512i lo[R], hi[R];
      for (int i = 0; i < R; ++i) {
        const __m512i words = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + b * kBits / 8)));
        if constexpr (kBits == 4) {
          lo[i] = _mm512_and_si512(words, low_nibbles);
          hi[i] = _mm512_srli_epi16(words, 4);
        } else {
          lo[i] = words;
        }
      }
      // Lane l of a dot product covers 2 words. 4-bit: elements 4l..4l+3 of the 64-block, so
      // lanes 0-7 lie in the group of element b and lanes 8-15 in that of b + 32 (the same
      // group unless groups are 32 wide). 8-bit: a 32-block never straddles a group.
      const int64_t g0 = b >> shift, g1 = kBits == 4 ? (b + 32) >> shift : g0;
      for (int m = 0; m < M; ++m) {
        const __m512i* xv = reinterpret_cast<const __m512i*>(
            reinterpret_cast<const int16_t*>(x_prep + m * stride) + b);
        const __m512i x0 = _mm512_loadu_si512(xv);
        __m512i x1 = x0;
        if constexpr (kBits == 4) x1 = _mm512_loadu_si512(xv + 1);
        for (int i = 0; i < R; ++i) {
          __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo[i], x0);
          if constexpr (kBits == 4) dot = _mm512_dpwssd_epi32(dot, hi[i], x1);
          const float* u = unit.data() + (i * M + m) * w.groups;
          const __m512 step =
              g0 == g1 ? _mm512_set1_ps(u[g0])
                       : _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(u[g0]), _mm512_set1_ps(u[g1]));
          acc[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), step, acc[i][m]);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      const float* bi = biases.data() + i * w.groups;
      for (int m = 0; m < M; ++m) {
        const float* sums = x_prep + m * stride + w.in / 2 + w.groups;
        __m512 bias_terms = _mm512_setzero_ps();
        int64_t g = 0;
        for (; g + 16 <= w.groups; g += 16)
          bias_terms =
              _mm512_fmadd_ps(_mm512_loadu_ps(bi + g), _mm512_loadu_ps(sums + g), bias_terms);
        float total = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][m], bias_terms));
        for (; g < w.groups; ++g) total += bi[g] * sums[g];
        y[m * w.out + r + i] = total + (bias ? bias[r + i] : 0.0f);
      }
    }
  }
}

template <int kBits, int M>
void decode_rows(const QuantView& w, const float* x_prep, const float* bias, float* y, int64_t r0,
                 int64_t r1) {
  constexpr int kRows = M == 1 ? 8 : 2;  // bounded registers: R * (M accumulators + 2 codes)
  const int64_t whole = r0 + (r1 - r0) / kRows * kRows;
  decode_rows<kBits, M, kRows>(w, x_prep, bias, y, r0, whole);
  decode_rows<kBits, M, 1>(w, x_prep, bias, y, whole, r1);
}

template <int kBits>
void decode(const QuantView& w, int M, const float* x_prep, const float* bias, float* y, int64_t r0,
            int64_t r1) {
  switch (M) {
    case 1:
      return decode_rows<kBits, 1>(w, x_prep, bias, y, r0, r1);
    case 2:
      return decode_rows<kBits, 2>(w, x_prep, bias, y, r0, r1);
    case 3:
      return decode_rows<kBits, 3>(w, x_prep, bias, y, r0, r1);
    default:
      return decode_rows<kBits, 4>(w, x_prep, bias, y, r0, r1);
  }
}

}  // namespace

PreparedDecodeKernel avx512vnni_decode(int bits) {
  if (bits == 4) return {decode<4>, prepare<4>, prep_floats, kBlock4};
  return {decode<8>, prepare<8>, prep_floats, kBlock8};
}

}  // namespace moxin::cpu::qmm_detail

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
