#include "backend/cpu/half_gemv.h"

#include <immintrin.h>
// GCC 12's AVX-512 headers trip its own uninitialized-value warnings inside the intrinsics
// (GCC bug 105593); nothing of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>

namespace moxin::cpu {

namespace {

// Rows of w handled together: independent accumulators hide the FMA latency, and each loaded
// x vector is reused across them.
constexpr int kRowBlock = 4;

// bf16 is the high half of an f32: zero-extend and shift. f16 has a conversion instruction.
template <bool kBf16>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 widen16(__m256i h) {
  if constexpr (kBf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(h);
  }
}

template <bool kBf16>
__attribute__((target("avx2,fma,f16c"))) inline __m256 widen8(__m128i h) {
  if constexpr (kBf16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(h);
  }
}

template <int M, bool kBf16>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void rows_avx512(const float* x, int64_t K,
                                                              const uint16_t* w, int64_t n0,
                                                              int rows, float* acc_out) {
  __m512 acc[kRowBlock][M];
  for (int r = 0; r < kRowBlock; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < kRowBlock; ++r) {
      if (r >= rows) break;
      const __m512 wv = widen16<kBf16>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + r) * K + k)));
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  if (k < K) {  // masked tail: never reads past the row
    const __mmask16 mask = __mmask16((1u << (K - k)) - 1);
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
    for (int r = 0; r < rows; ++r) {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, w + (n0 + r) * K + k);
      const __m512 wv = widen16<kBf16>(h);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int m = 0; m < M; ++m) acc_out[r * M + m] = _mm512_reduce_add_ps(acc[r][m]);
}

__attribute__((target("avx2,fma,f16c"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int M, bool kBf16>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const float* x, int64_t K,
                                                         const uint16_t* w, int64_t n0, int rows,
                                                         float* acc_out) {
  __m256 acc[kRowBlock][M];
  for (int r = 0; r < kRowBlock; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < kRowBlock; ++r) {
      if (r >= rows) break;
      const __m256 wv = widen8<kBf16>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n0 + r) * K + k)));
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int m = 0; m < M; ++m) {
      float sum = hsum256(acc[r][m]);
      for (int64_t t = k; t < K; ++t) {  // scalar tail
        const uint16_t h = w[(n0 + r) * K + t];
        const float wv = kBf16 ? bf16_to_f32(h) : f16_to_f32(h);
        sum += wv * x[m * K + t];
      }
      acc_out[r * M + m] = sum;
    }
}

using RowKernel = void (*)(const float*, int64_t, const uint16_t*, int64_t, int, float*);

template <int M>
RowKernel pick(bool avx512, bool bf16) {
  if (avx512) return bf16 ? rows_avx512<M, true> : rows_avx512<M, false>;
  return bf16 ? rows_avx2<M, true> : rows_avx2<M, false>;
}

}  // namespace

bool half_gemv(const float* x, int64_t M, int64_t K, const uint16_t* w, DType w_dtype, int64_t N,
               const float* bias, float* y, HalfGemvIsa isa) {
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                               __builtin_cpu_supports("f16c");
  if (isa == HalfGemvIsa::Avx512 && !has_avx512) return false;
  if (isa == HalfGemvIsa::Avx2 && !has_avx2) return false;
  const bool use_avx512 = has_avx512 && isa != HalfGemvIsa::Avx2;
  if ((!use_avx512 && !has_avx2) || M < 1 || M > kHalfGemvMaxRows) return false;
  if (w_dtype != DType::BF16 && w_dtype != DType::F16) return false;
  const bool bf16 = w_dtype == DType::BF16;
  RowKernel kernel = M == 1 ? pick<1>(use_avx512, bf16)
                   : M == 2 ? pick<2>(use_avx512, bf16)
                   : M == 3 ? pick<3>(use_avx512, bf16)
                            : pick<4>(use_avx512, bf16);
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  // Dynamic chunks of blocks: cores shared with other work finish at different times. Small
  // products stay on one thread: a parallel region's barrier costs more than they do, and far
  // more when another process holds a core.
#pragma omp parallel for schedule(dynamic, 16) if (N * K >= (int64_t(1) << 18))
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * kRowBlock;
    const int rows = int(std::min<int64_t>(kRowBlock, N - n0));
    float acc[kRowBlock * kHalfGemvMaxRows];
    kernel(x, K, w, n0, rows, acc);
    for (int r = 0; r < rows; ++r)
      for (int64_t m = 0; m < M; ++m)
        y[m * N + n0 + r] = acc[r * M + m] + (bias ? bias[n0 + r] : 0.0f);
  }
  return true;
}

}  // namespace moxin::cpu
