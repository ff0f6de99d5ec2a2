// The machine's memory read bandwidth, the ceiling of a decode step (benchmarks report their
// speed as a fraction of the roofline it implies).
#include "backend/cpu/bandwidth.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "moxin/tensor.h"

// GCC 12's AVX-512 headers trip its own uninitialized-value warnings inside the intrinsics
// (GCC bug 105593); nothing of ours is uninitialized.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace moxin::cpu {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Sums a buffer with the widest loads the CPU has, four independent accumulators, so the
// loop is bound by memory and not by the adds (plain C++ built for baseline x86-64 is not).
__attribute__((target("avx512f"))) float sum_avx512(const float* p, size_t n) {
  __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
  for (size_t i = 0; i + 64 <= n; i += 64) {
    a = _mm512_add_ps(a, _mm512_load_ps(p + i));
    b = _mm512_add_ps(b, _mm512_load_ps(p + i + 16));
    c = _mm512_add_ps(c, _mm512_load_ps(p + i + 32));
    d = _mm512_add_ps(d, _mm512_load_ps(p + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

__attribute__((target("avx2"))) float sum_avx2(const float* p, size_t n) {
  __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    a = _mm256_add_ps(a, _mm256_load_ps(p + i));
    b = _mm256_add_ps(b, _mm256_load_ps(p + i + 8));
    c = _mm256_add_ps(c, _mm256_load_ps(p + i + 16));
    d = _mm256_add_ps(d, _mm256_load_ps(p + i + 24));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
  float total = 0;
  for (float v : lanes) total += v;
  return total;
}

}  // namespace

// Read bandwidth: the best of several passes summing a buffer far larger than the caches, on
// all threads, the access pattern of a decode step streaming its weights.
double measure_read_bandwidth_gbs(size_t bytes) {
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const size_t n = bytes / sizeof(float);
  Tensor buffer = Tensor::empty({int64_t(n)});  // 64-byte aligned
  float* data = buffer.data_mut<float>();
  const int threads = omp_get_max_threads();
  const size_t chunk = n / size_t(threads) / 64 * 64;
#pragma omp parallel for
  for (size_t i = 0; i < n; ++i) data[i] = 1.0f;
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    float total = 0;
    const auto start = Clock::now();
#pragma omp parallel reduction(+ : total)
    {
      const float* mine = data + size_t(omp_get_thread_num()) * chunk;
      total += avx512 ? sum_avx512(mine, chunk) : sum_avx2(mine, chunk);
    }
    const double s = seconds_since(start);
    if (total == 42) std::fprintf(stderr, " ");  // keeps the sum alive
    best = std::max(best, double(chunk * size_t(threads) * sizeof(float)) / s / 1e9);
  }
  return best;
}

}  // namespace moxin::cpu
