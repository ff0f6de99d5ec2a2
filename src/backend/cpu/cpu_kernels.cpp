#include "backend/cpu/cpu_kernels.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "backend/cpu/half_gemv.h"
#include "moxin/errors.h"

namespace moxin::cpu {

namespace {

// OpenBLAS picks its kernels from the CPU model at start-up; on virtual CPUs that report an
// unknown model (as the development machines here do) it falls back to its SSE3 "Prescott"
// kernels, 5-10x slower than the AVX-512/AVX2 kernels the CPU runs. This runs before OpenBLAS's
// own constructor (lower priority number first) and, unless the user chose a core type, names
// the one the CPU's features support. The parity tests check the results either way.
__attribute__((constructor(101))) void choose_openblas_kernels() {
  if (std::getenv("OPENBLAS_CORETYPE")) return;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    setenv("OPENBLAS_CORETYPE", "SkylakeX", 0);
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    setenv("OPENBLAS_CORETYPE", "Haswell", 0);
  }
}

// F16 -> F32 through a table: 256 KiB, built once, exact for every bit pattern.
const float* f16_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; ++i) t[i] = f16_to_f32(uint16_t(i));
    return t;
  }();
  return table.data();
}

void widen_bf16(const uint16_t* src, int64_t n, float* out) {
  // bf16 is the high half of an f32: a shift, which the compiler vectorises.
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t i = 0; i < n; ++i) dst[i] = uint32_t(src[i]) << 16;
}

void widen_f16(const uint16_t* src, int64_t n, float* out) {
  const float* table = f16_table();
  for (int64_t i = 0; i < n; ++i) out[i] = table[src[i]];
}

// Rows of weight per tile: small batches stream the weight through an L2-sized tile; large
// ones take wider tiles so sgemm runs on panels big enough to be efficient.
int64_t tile_rows(int64_t M, int64_t K, int64_t N) {
  const int64_t target_floats = M <= 16 ? (128 << 10) : (1 << 20);
  int64_t rows = std::max<int64_t>(16, target_floats / std::max<int64_t>(K, 1));
  rows = std::min(rows, N);
  return std::max<int64_t>(rows, 1);
}

}  // namespace

void widen(const void* src, DType dtype, int64_t n, float* out) {
  switch (dtype) {
    case DType::F32: std::memcpy(out, src, size_t(n) * sizeof(float)); return;
    case DType::BF16: widen_bf16(static_cast<const uint16_t*>(src), n, out); return;
    case DType::F16: widen_f16(static_cast<const uint16_t*>(src), n, out); return;
    default:
      throw_error(ErrorKind::Compute, "cannot compute with weights of dtype " +
                                          std::string(dtype_name(dtype)));
  }
}

void matmul_nt(const float* x, int64_t M, int64_t K, const void* w, DType w_dtype, int64_t N,
               const float* bias, float* y) {
  if (M == 0 || N == 0) return;
  if (M <= kHalfGemvMaxRows && half_gemv(x, M, K, static_cast<const uint16_t*>(w), w_dtype, N, bias, y))
    return;
  if (w_dtype == DType::F32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(N), int(K), 1.0f, x, int(K),
                static_cast<const float*>(w), int(K), 0.0f, y, int(N));
  } else {
    if (w_dtype != DType::BF16 && w_dtype != DType::F16)
      throw_error(ErrorKind::Compute, "matmul with weights of dtype " +
                                          std::string(dtype_name(w_dtype)));
    const int64_t rows = tile_rows(M, K, N);
    const int64_t tiles = (N + rows - 1) / rows;
    const size_t element = dtype_size(w_dtype);
#pragma omp parallel if (M * N * K >= (int64_t(1) << 20))
    {
      std::vector<float> tile(size_t(rows * K));
#pragma omp for schedule(dynamic)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * rows;
        const int64_t nb = std::min(rows, N - n0);
        widen(static_cast<const char*>(w) + size_t(n0 * K) * element, w_dtype, nb * K,
              tile.data());
        // Inside a parallel region the OpenMP build of OpenBLAS runs on this thread alone.
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(nb), int(K), 1.0f, x,
                    int(K), tile.data(), int(K), 0.0f, y + n0, int(N));
      }
    }
  }
  if (bias) {
#pragma omp parallel for if (M * N > (1 << 16))
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias[n];
  }
}

void gather_rows(const void* table, DType dtype, int64_t D, const int64_t* ids, int64_t n,
                 float* out) {
  const size_t row_bytes = size_t(D) * dtype_size(dtype);
  for (int64_t i = 0; i < n; ++i)
    widen(static_cast<const char*>(table) + size_t(ids[i]) * row_bytes, dtype, D, out + i * D);
}

void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows,
               int64_t row_len) {
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + r * dst_stride, src + r * src_stride, size_t(row_len) * sizeof(float));
}

void patchify(const float* images, int64_t B, int64_t S, int64_t C, int64_t P, float* out) {
  const int64_t G = S / P;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t gy = 0; gy < G; ++gy)
      for (int64_t gx = 0; gx < G; ++gx) {
        float* row = out + ((b * G + gy) * G + gx) * C * P * P;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t ky = 0; ky < P; ++ky)
            for (int64_t kx = 0; kx < P; ++kx)
              row[(c * P + ky) * P + kx] = images[((b * S + gy * P + ky) * S + gx * P + kx) * C + c];
      }
}

void layer_norm(const float* x, int64_t rows, int64_t D, const float* weight, const float* bias,
                float eps, float* y) {
#pragma omp parallel for if (rows * D > (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    // Two passes (mean, then centred variance) as torch computes it, for exactness.
    double sum = 0;
    for (int64_t i = 0; i < D; ++i) sum += xr[i];
    const float mean = float(sum / double(D));
    double sq = 0;
    for (int64_t i = 0; i < D; ++i) {
      const float d = xr[i] - mean;
      sq += double(d) * d;
    }
    const float inv = 1.0f / std::sqrt(float(sq / double(D)) + eps);
    for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] - mean) * inv * weight[i] + bias[i];
  }
}

void rms_norm(const float* x, int64_t rows, int64_t D, const float* weight, float eps, float* y) {
#pragma omp parallel for if (rows * D > (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    double sq = 0;
    for (int64_t i = 0; i < D; ++i) sq += double(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(float(sq / double(D)) + eps);
    for (int64_t i = 0; i < D; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

void gelu_erf_inplace(float* x, int64_t n) {
  constexpr float kInvSqrt2 = 0.70710678118654752440f;
#pragma omp parallel for if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * kInvSqrt2));
}

void silu_mul(const float* gate, const float* up, int64_t n, float* out) {
#pragma omp parallel for if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void add_inplace(float* x, const float* y, int64_t n) {
#pragma omp parallel for if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void add_scaled_rows_inplace(float* x, const float* y, const float* scale, int64_t rows,
                             int64_t D) {
#pragma omp parallel for if (rows * D > (1 << 16))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < D; ++i) x[r * D + i] += y[r * D + i] * scale[i];
}

void rope_inplace(float* x, int64_t rows, int64_t n_heads, int64_t head_dim,
                  const int64_t* positions, float theta) {
  const int64_t half = head_dim / 2;
  // inv_freq as transformers computes it in float32: 1 / theta^(2i / d).
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[size_t(i)] = 1.0f / std::pow(theta, float(2 * i) / float(head_dim));
#pragma omp parallel for if (rows * n_heads * head_dim > (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> cos_v(static_cast<size_t>(half)), sin_v(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(positions[r]) * inv_freq[size_t(i)];
      cos_v[size_t(i)] = std::cos(angle);
      sin_v[size_t(i)] = std::sin(angle);
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + (r * n_heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_v[size_t(i)] - b * sin_v[size_t(i)];
        v[i + half] = b * cos_v[size_t(i)] + a * sin_v[size_t(i)];
      }
    }
  }
}

void attention(const float* q, const float* k, const float* v, float* out,
               const AttentionShape& s) {
  if (s.Hkv <= 0 || s.Hq % s.Hkv != 0)
    throw_error(ErrorKind::Compute, "attention: query heads not a multiple of KV heads");
  const int64_t group = s.Hq / s.Hkv;
  constexpr int64_t kBlock = 64;  // query rows per task: bounds the score buffer
  const int64_t blocks = (s.Lq + kBlock - 1) / kBlock;
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel if (s.Hq * s.Lq * s.Lk * s.Dh >= (int64_t(1) << 16))
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic) collapse(2)
    for (int64_t h = 0; h < s.Hq; ++h) {
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t i0 = blk * kBlock;
        const int64_t rows = std::min(kBlock, s.Lq - i0);
        // Keys past the last row's position are masked for every row of a causal block.
        const int64_t keys = s.causal ? std::min(s.Lk, s.q_offset + i0 + rows) : s.Lk;
        const int64_t g = h / group;
        const float* kh = k + g * s.kv_head_stride;
        const float* vh = v + g * s.kv_head_stride;
        scores.resize(size_t(rows * keys));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(keys), int(s.Dh),
                    s.scale, q + i0 * s.q_row_stride + h * s.Dh, int(s.q_row_stride), kh,
                    int(s.kv_row_stride), 0.0f, scores.data(), int(keys));
        for (int64_t r = 0; r < rows; ++r) {
          float* row = scores.data() + r * keys;
          int64_t first = 0, last = keys;  // visible keys [first, last)
          if (s.causal) {
            const int64_t pos = s.q_offset + i0 + r;
            last = std::min(keys, pos + 1);
            if (s.window > 0) first = std::max<int64_t>(0, pos - s.window + 1);
          }
          float max_v = neg_inf;
          for (int64_t j = first; j < last; ++j) max_v = std::max(max_v, row[j]);
          double sum = 0;
          for (int64_t j = 0; j < keys; ++j) {
            if (j < first || j >= last) {
              row[j] = 0.0f;
            } else {
              row[j] = std::exp(row[j] - max_v);
              sum += row[j];
            }
          }
          const float inv = sum > 0 ? float(1.0 / sum) : 0.0f;
          for (int64_t j = first; j < last; ++j) row[j] *= inv;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(s.Dh), int(keys),
                    1.0f, scores.data(), int(keys), vh, int(s.kv_row_stride), 0.0f,
                    out + i0 * s.out_row_stride + h * s.Dh, int(s.out_row_stride));
      }
    }
  }
}

}  // namespace moxin::cpu
